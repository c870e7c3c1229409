//! The node tree and the operations on it, with xenstored's rules (tools/xenstored/core.c,
//! transaction.c): permission checks that hide whether a node exists from a domain that may
//! not know, creation of missing parents inheriting the parent's permissions, generation
//! counts for transaction conflicts.

use std::collections::HashMap;

use xen::xenstore::wire::{ABS_PATH_MAX, REL_PATH_MAX};
use xen::xenstore::{Perm, PermAccess, XsError};
use xen::DomId;

/// Nodes a domain may own (xenstored's `quota_nb_entry_per_domain`).
pub(super) const QUOTA_NODES: usize = 1000;
/// Bytes of value plus child names a node of an unprivileged domain may hold (`quota_max_entry_size`).
pub(super) const QUOTA_NODE_SIZE: usize = 2048;
/// Permission entries per node for unprivileged domains (`quota_nb_perms_per_node`).
pub(super) const QUOTA_PERMS: usize = 5;

/// Who is asking: the domain behind the socket it connected to.
#[derive(Debug, Clone, Copy)]
pub(super) struct Caller {
    pub(super) domid: DomId,
    pub(super) privileged: bool,
}

impl Caller {
    /// Relative paths are relative to this (`get_implicit_path`).
    pub(super) fn home(&self) -> String {
        format!("/local/domain/{}", self.domid)
    }

    /// `perm_for_conn`: privileged connections and owners may do anything; otherwise the
    /// first entry naming the domain, else the owner entry's access for everyone else.
    fn access(&self, perms: &[Perm]) -> Rights {
        let Some(owner) = perms.first() else {
            return Rights::default();
        };
        if self.privileged || owner.domid == self.domid {
            return Rights {
                read: true,
                write: true,
                owner: true,
            };
        }
        let entry = perms[1..]
            .iter()
            .find(|p| p.domid == self.domid)
            .unwrap_or(owner);
        Rights {
            read: entry.access.can_read(),
            write: entry.access.can_write(),
            owner: false,
        }
    }

    pub(super) fn can_read(&self, perms: &[Perm]) -> bool {
        self.access(perms).read
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Rights {
    read: bool,
    write: bool,
    owner: bool,
}

/// What an operation needs on a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Need {
    Read,
    Write,
    /// Write and ownership (set_perms).
    Own,
}

impl Rights {
    fn grants(self, need: Need) -> bool {
        match need {
            Need::Read => self.read,
            Need::Write => self.write,
            Need::Own => self.write && self.owner,
        }
    }

    /// `errno_from_parents` asks whether any of the needed bits is there.
    fn grants_any(self, need: Need) -> bool {
        match need {
            Need::Read => self.read,
            Need::Write => self.write,
            Need::Own => self.write || self.owner,
        }
    }
}

/// One node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Node {
    pub(super) value: Vec<u8>,
    pub(super) perms: Vec<Perm>,
    /// Child names in creation order, as xenstored lists them.
    pub(super) children: Vec<String>,
    /// The global generation of the node's last change.
    gen: u64,
}

impl Node {
    fn new(perms: Vec<Perm>) -> Self {
        Self {
            value: Vec::new(),
            perms,
            children: Vec::new(),
            gen: 0,
        }
    }

    fn owner(&self) -> DomId {
        self.perms.first().map_or(0, |p| p.domid)
    }
}

/// A change that may fire watches, with the permissions deciding who may see it
/// (`fire_watches`: the node's, its old ones for set_perms, or its parent's).
#[derive(Debug, Clone)]
pub(super) struct Fire {
    pub(super) path: String,
    /// Only watches on exactly this path fire (nodes below a removed node).
    pub(super) exact: bool,
    perms: Vec<Vec<Perm>>,
}

impl Fire {
    /// Whether `caller` may learn of this change (`watch_permitted`).
    pub(super) fn visible_to(&self, caller: &Caller) -> bool {
        self.perms.iter().any(|p| caller.can_read(p))
    }

    /// A special event (`@introduceDomain`, `@releaseDomain`) guarded by `perms`.
    pub(super) fn special(path: &str, perms: Vec<Perm>) -> Self {
        Self {
            path: path.to_owned(),
            exact: false,
            perms: vec![perms],
        }
    }
}

/// The special nodes xenstored keeps outside the tree.
pub(super) const SPECIAL_NODES: [&str; 2] = ["@introduceDomain", "@releaseDomain"];

/// The committed tree.
#[derive(Debug)]
pub(super) struct Store {
    nodes: HashMap<String, Node>,
    generation: u64,
}

impl Store {
    /// A tree with just `/` (and the special nodes), owned by dom0 and closed to others.
    pub(super) fn new() -> Self {
        let mut nodes = HashMap::new();
        let dom0_only = vec![Perm::new(0, PermAccess::None)];
        nodes.insert("/".to_owned(), Node::new(dom0_only.clone()));
        for s in SPECIAL_NODES {
            nodes.insert(s.to_owned(), Node::new(dom0_only.clone()));
        }
        Self {
            nodes,
            generation: 1,
        }
    }

    /// The permissions of a special node.
    pub(super) fn special_perms(&self, path: &str) -> Vec<Perm> {
        self.nodes
            .get(path)
            .map(|n| n.perms.clone())
            .unwrap_or_default()
    }

    fn gen_of(&self, path: &str) -> Option<u64> {
        self.nodes.get(path).map(|n| n.gen)
    }

    /// `watch_permitted`'s fallback: may `caller` read the parent of `path` (committed)?
    pub(super) fn parent_readable(&self, path: &str, caller: &Caller) -> bool {
        self.nodes
            .get(&parent_of(path))
            .is_some_and(|n| caller.can_read(&n.perms))
    }

    fn owned_by(&self, domid: DomId) -> usize {
        self.nodes.values().filter(|n| n.owner() == domid).count()
    }
}

/// An open transaction: nodes touched so far (with the generation first seen, `None` for
/// absent) and their private versions (`None`: removed in the transaction).
#[derive(Debug, Default)]
pub(super) struct Tx {
    seen: HashMap<String, Option<u64>>,
    overlay: HashMap<String, Option<Node>>,
    fires: Vec<Fire>,
}

impl Tx {
    /// Commits into `store` unless a node it saw has changed since (`finalize_transaction`).
    ///
    /// # Errors
    /// [`XsError::Again`] on a conflict; nothing is written then.
    pub(super) fn commit(self, store: &mut Store) -> Result<Vec<Fire>, XsError> {
        if self
            .seen
            .iter()
            .any(|(path, gen)| store.gen_of(path) != *gen)
        {
            return Err(XsError::Again);
        }
        for (path, node) in self.overlay {
            match node {
                Some(mut node) => {
                    store.generation += 1;
                    node.gen = store.generation;
                    store.nodes.insert(path, node);
                }
                None => {
                    store.nodes.remove(&path);
                }
            }
        }
        Ok(self.fires)
    }
}

/// The tree as one request sees it: the committed tree, or a transaction's view of it.
pub(super) struct View<'a> {
    store: &'a mut Store,
    tx: Option<&'a mut Tx>,
    caller: Caller,
}

impl<'a> View<'a> {
    pub(super) fn new(store: &'a mut Store, tx: Option<&'a mut Tx>, caller: Caller) -> Self {
        Self { store, tx, caller }
    }

    fn get(&mut self, path: &str) -> Option<Node> {
        match self.tx.as_deref_mut() {
            None => self.store.nodes.get(path).cloned(),
            Some(tx) => {
                if let Some(n) = tx.overlay.get(path) {
                    return n.clone();
                }
                let live = self.store.nodes.get(path);
                tx.seen
                    .entry(path.to_owned())
                    .or_insert_with(|| live.map(|n| n.gen));
                live.cloned()
            }
        }
    }

    fn put(&mut self, path: &str, mut node: Node) {
        match self.tx.as_deref_mut() {
            None => {
                self.store.generation += 1;
                node.gen = self.store.generation;
                self.store.nodes.insert(path.to_owned(), node);
            }
            Some(tx) => {
                let live = self.store.nodes.get(path).map(|n| n.gen);
                tx.seen.entry(path.to_owned()).or_insert(live);
                tx.overlay.insert(path.to_owned(), Some(node));
            }
        }
    }

    fn remove(&mut self, path: &str) {
        match self.tx.as_deref_mut() {
            None => {
                self.store.nodes.remove(path);
            }
            Some(tx) => {
                let live = self.store.nodes.get(path).map(|n| n.gen);
                tx.seen.entry(path.to_owned()).or_insert(live);
                tx.overlay.insert(path.to_owned(), None);
            }
        }
    }

    /// Fires now, or at commit inside a transaction (`queue_watches`).
    fn fired(&mut self, out: &mut Vec<Fire>, path: &str, exact: bool, perms: Vec<Vec<Perm>>) {
        let fire = Fire {
            path: path.to_owned(),
            exact,
            perms,
        };
        match self.tx.as_deref_mut() {
            Some(tx) => tx.fires.push(fire),
            None => out.push(fire),
        }
    }

    /// `canonicalize`: the absolute path, or EINVAL.
    pub(super) fn canonicalize(&self, path: &[u8], allow_special: bool) -> Result<String, XsError> {
        let valid = path
            .iter()
            .all(|&c| c.is_ascii_alphanumeric() || b"-/_@".contains(&c));
        if path.is_empty() || !valid || (path[0] == b'@' && !allow_special) {
            return Err(XsError::Invalid);
        }
        // Only ASCII passed the check above.
        let path = String::from_utf8_lossy(path);
        let name = if path.starts_with('/') || path.starts_with('@') {
            path.into_owned()
        } else {
            format!("{}/{path}", self.caller.home())
        };
        if (name.ends_with('/') && name != "/") || name.contains("//") || name.len() > ABS_PATH_MAX
        {
            return Err(XsError::Invalid);
        }
        if !self.caller.privileged && name.len() - local_prefix_len(&name) > REL_PATH_MAX {
            return Err(XsError::Invalid);
        }
        Ok(name)
    }

    /// `get_node`: the node if it exists and `need` is granted; otherwise ENOENT or EACCES,
    /// EACCES whenever the caller may not even learn that (`errno_from_parents`).
    fn get_checked(&mut self, name: &str, need: Need) -> Result<Node, XsError> {
        let err = match self.get(name) {
            Some(node) if self.caller.access(&node.perms).grants(need) => return Ok(node),
            Some(_) => XsError::PermissionDenied,
            None => XsError::NotFound,
        };
        let mut parent = name.to_owned();
        loop {
            parent = parent_of(&parent);
            if let Some(node) = self.get(&parent) {
                return Err(if self.caller.access(&node.perms).grants_any(need) {
                    err
                } else {
                    XsError::PermissionDenied
                });
            }
            if parent == "/" {
                return Err(XsError::PermissionDenied);
            }
        }
    }

    /// XS_READ.
    pub(super) fn read(&mut self, name: &str) -> Result<Vec<u8>, XsError> {
        Ok(self.get_checked(name, Need::Read)?.value)
    }

    /// XS_DIRECTORY: children, each NUL-terminated.
    pub(super) fn directory(&mut self, name: &str) -> Result<Vec<u8>, XsError> {
        let node = self.get_checked(name, Need::Read)?;
        Ok(node
            .children
            .iter()
            .flat_map(|c| c.bytes().chain([0]))
            .collect())
    }

    /// XS_DIRECTORY_PART (`send_directory_part`): the node's generation, then the children
    /// from byte offset `off` of the child list that fit in one reply; the last part ends
    /// with an empty string.
    pub(super) fn directory_part(&mut self, name: &str, off: usize) -> Result<Vec<u8>, XsError> {
        let node = self.get_checked(name, Need::Read)?;
        let children: Vec<u8> = node
            .children
            .iter()
            .flat_map(|c| c.bytes().chain([0]))
            .collect();
        let mut out = node.gen.to_string().into_bytes();
        out.push(0);
        let Some(rest) = children.get(off..).filter(|r| !r.is_empty()) else {
            out.push(0);
            return Ok(out);
        };
        let max = xen::xenstore::wire::PAYLOAD_MAX - out.len() - 1;
        let mut len = 0;
        for child in rest.split_inclusive(|&b| b == 0) {
            if len + child.len() > max {
                break;
            }
            len += child.len();
        }
        out.extend_from_slice(&rest[..len]);
        if len == rest.len() {
            out.push(0);
        }
        Ok(out)
    }

    /// XS_GET_PERMS.
    pub(super) fn get_perms(&mut self, name: &str) -> Result<Vec<Perm>, XsError> {
        Ok(self.get_checked(name, Need::Read)?.perms)
    }

    /// XS_WRITE: replaces the value, creating the node and missing parents.
    pub(super) fn write(
        &mut self,
        name: &str,
        value: &[u8],
        fires: &mut Vec<Fire>,
    ) -> Result<(), XsError> {
        let node = match self.get_checked(name, Need::Write) {
            Ok(mut node) => {
                node.value = value.to_vec();
                self.check_size(&node)?;
                self.put(name, node.clone());
                node
            }
            Err(XsError::NotFound) => self.create(name, value)?,
            Err(e) => return Err(e),
        };
        self.fired(fires, name, false, vec![node.perms]);
        Ok(())
    }

    /// XS_MKDIR: creates the node (and parents) if missing; an existing node is fine.
    pub(super) fn mkdir(&mut self, name: &str, fires: &mut Vec<Fire>) -> Result<(), XsError> {
        match self.get_checked(name, Need::Write) {
            Ok(_) => Ok(()),
            Err(XsError::NotFound) => {
                let node = self.create(name, b"")?;
                self.fired(fires, name, false, vec![node.perms]);
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// `construct_node` + `create_node`: the missing nodes from the nearest existing
    /// ancestor down, each inheriting its parent's permissions, owned by an unprivileged
    /// creator.
    fn create(&mut self, name: &str, value: &[u8]) -> Result<Node, XsError> {
        let mut missing = vec![name.to_owned()];
        let mut parent_name = parent_of(name);
        let mut parent = loop {
            if let Some(p) = self.get(&parent_name) {
                break p;
            }
            if parent_name == "/" {
                return Err(XsError::RemoteIo);
            }
            missing.push(parent_name.clone());
            parent_name = parent_of(&parent_name);
        };
        if !self.caller.privileged
            && self.store.owned_by(self.caller.domid) + missing.len() > QUOTA_NODES
        {
            return Err(XsError::NoSpace);
        }
        let mut node = Node::new(Vec::new());
        while let Some(child_name) = missing.pop() {
            parent.children.push(base_name(&child_name).to_owned());
            self.check_size(&parent)?;
            self.put(&parent_name, parent.clone());
            let mut perms = parent.perms.clone();
            if !self.caller.privileged {
                if let Some(owner) = perms.first_mut() {
                    owner.domid = self.caller.domid;
                }
            }
            node = Node::new(perms);
            if missing.is_empty() {
                node.value = value.to_vec();
                self.check_size(&node)?;
            }
            self.put(&child_name, node.clone());
            parent = node.clone();
            parent_name = child_name;
        }
        Ok(node)
    }

    /// `quota_max_entry_size` for unprivileged callers: ENOSPC.
    fn check_size(&self, node: &Node) -> Result<(), XsError> {
        let size = node.value.len() + node.children.iter().map(|c| c.len() + 1).sum::<usize>();
        if !self.caller.privileged && size > QUOTA_NODE_SIZE {
            return Err(XsError::NoSpace);
        }
        Ok(())
    }

    /// XS_RM: removes the node and its subtree. A missing node is fine when its parent
    /// exists. Watches fire on the node and its ancestors' watchers, and exactly on each
    /// removed descendant (`delnode_sub`).
    pub(super) fn rm(&mut self, name: &str, fires: &mut Vec<Fire>) -> Result<(), XsError> {
        match self.get_checked(name, Need::Write) {
            Ok(_) => {}
            Err(XsError::NotFound) => {
                return if self.get(&parent_of(name)).is_some() {
                    Ok(())
                } else {
                    Err(XsError::NotFound)
                };
            }
            Err(e) => return Err(e),
        }
        if name == "/" {
            return Err(XsError::Invalid);
        }
        let parent_name = parent_of(name);
        let mut parent = self.get(&parent_name).ok_or(XsError::RemoteIo)?;
        self.remove_subtree(name, name, fires);
        let base = base_name(name);
        parent.children.retain(|c| c != base);
        self.put(&parent_name, parent);
        Ok(())
    }

    fn remove_subtree(&mut self, root: &str, name: &str, fires: &mut Vec<Fire>) {
        let Some(node) = self.get(name) else { return };
        for child in &node.children {
            self.remove_subtree(root, &child_path(name, child), fires);
        }
        self.fired(fires, name, name != root, vec![node.perms]);
        self.remove(name);
    }

    /// XS_SET_PERMS. Only the owner (or a privileged caller) may; an unprivileged owner may
    /// not give the node away (EPERM).
    pub(super) fn set_perms(
        &mut self,
        name: &str,
        perms: Vec<Perm>,
        fires: &mut Vec<Fire>,
    ) -> Result<(), XsError> {
        if perms.is_empty() {
            return Err(XsError::Invalid);
        }
        if !self.caller.privileged && perms.len() > QUOTA_PERMS {
            return Err(XsError::NoSpace);
        }
        let mut node = self.get_checked(name, Need::Own)?;
        if !self.caller.privileged && perms[0].domid != node.owner() {
            return Err(XsError::NotPermitted);
        }
        let old = std::mem::replace(&mut node.perms, perms.clone());
        self.put(name, node);
        self.fired(fires, name, false, vec![perms, old]);
        Ok(())
    }
}

/// `get_parent`: `/a/b` -> `/a`, `/a` -> `/`, `@x` -> `/`.
pub(super) fn parent_of(path: &str) -> String {
    match path.get(1..).and_then(|rest| rest.rfind('/')) {
        Some(i) => path[..=i].to_owned(),
        None => "/".to_owned(),
    }
}

fn base_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

fn child_path(parent: &str, child: &str) -> String {
    if parent == "/" {
        format!("/{child}")
    } else {
        format!("{parent}/{child}")
    }
}

/// The length of a `/local/domain/<N>/` prefix (not counted against the path quota).
fn local_prefix_len(path: &str) -> usize {
    let Some(rest) = path.strip_prefix("/local/domain/") else {
        return 0;
    };
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    if (1..=5).contains(&digits) && rest.as_bytes().get(digits) == Some(&b'/') {
        "/local/domain/".len() + digits + 1
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOM0: Caller = Caller {
        domid: 0,
        privileged: true,
    };
    const DOM5: Caller = Caller {
        domid: 5,
        privileged: false,
    };

    #[test]
    fn paths() {
        assert_eq!(parent_of("/a/b"), "/a");
        assert_eq!(parent_of("/a"), "/");
        assert_eq!(parent_of("@introduceDomain"), "/");
        assert_eq!(base_name("/a/b"), "b");
        assert_eq!(
            local_prefix_len("/local/domain/12/x"),
            "/local/domain/12/".len()
        );
        assert_eq!(local_prefix_len("/local/domain/x"), 0);
        let mut store = Store::new();
        let v = View::new(&mut store, None, DOM5);
        assert_eq!(
            v.canonicalize(b"device/vbd", false).unwrap(),
            "/local/domain/5/device/vbd"
        );
        for bad in [&b"/a/"[..], b"/a//b", b"", b"/a b", b"@x", b"/a\xff"] {
            assert!(
                matches!(v.canonicalize(bad, false), Err(XsError::Invalid)),
                "{bad:?}"
            );
        }
        assert_eq!(
            v.canonicalize(b"@releaseDomain", true).unwrap(),
            "@releaseDomain"
        );
        assert_eq!(v.canonicalize(b"/", false).unwrap(), "/");
    }

    #[test]
    fn creation_inherits_parent_perms_with_creator_as_owner() {
        let mut store = Store::new();
        let mut fires = Vec::new();
        let mut v = View::new(&mut store, None, DOM0);
        v.write("/local/domain/5", b"", &mut fires).unwrap();
        v.set_perms(
            "/local/domain/5",
            vec![
                Perm::new(0, PermAccess::None),
                Perm::new(5, PermAccess::Both),
            ],
            &mut fires,
        )
        .unwrap();
        let mut v = View::new(&mut store, None, DOM5);
        v.write("/local/domain/5/a/b", b"x", &mut fires).unwrap();
        let perms = v.get_perms("/local/domain/5/a").unwrap();
        assert_eq!(
            perms,
            vec![
                Perm::new(5, PermAccess::None),
                Perm::new(5, PermAccess::Both)
            ]
        );
        // The domain cannot see /local/domain (owned by dom0, closed): EACCES, not ENOENT.
        assert!(matches!(
            v.read("/local/domain/5/a/missing"),
            Err(XsError::NotFound)
        ));
        assert!(matches!(
            v.read("/local/domain/6"),
            Err(XsError::PermissionDenied)
        ));
        assert!(matches!(
            v.read("/local/domain"),
            Err(XsError::PermissionDenied)
        ));
    }

    #[test]
    fn transaction_conflict_on_read_node() {
        let mut store = Store::new();
        let mut fires = Vec::new();
        View::new(&mut store, None, DOM0)
            .write("/a", b"1", &mut fires)
            .unwrap();
        let mut tx = Tx::default();
        assert_eq!(
            View::new(&mut store, Some(&mut tx), DOM0)
                .read("/a")
                .unwrap(),
            b"1"
        );
        View::new(&mut store, Some(&mut tx), DOM0)
            .write("/b", b"2", &mut fires)
            .unwrap();
        View::new(&mut store, None, DOM0)
            .write("/a", b"3", &mut fires)
            .unwrap();
        assert!(matches!(tx.commit(&mut store), Err(XsError::Again)));
        assert!(matches!(
            View::new(&mut store, None, DOM0).read("/b"),
            Err(XsError::NotFound)
        ));
    }
}
