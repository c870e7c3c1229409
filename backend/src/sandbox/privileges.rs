//! Capabilities, `no_new_privs` and the user switch.

use std::sync::atomic::{AtomicBool, Ordering};

use caps::{CapSet, Capability, CapsHashSet};

use super::SandboxError;

/// A user to run as after set-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct User {
    /// The user id.
    pub uid: u32,
    /// The group id.
    pub gid: u32,
}

impl User {
    /// Parses `--user`: `NAME` (looked up in `/etc/passwd`, its primary group), `UID` or
    /// `UID:GID` (decimal). Root is refused: switching to it would keep nothing from happening.
    ///
    /// # Errors
    /// [`SandboxError::BadUser`] for an unknown name, a malformed number or root.
    pub fn parse(spec: &str) -> Result<Self, SandboxError> {
        let bad = |reason: &str| SandboxError::BadUser {
            spec: spec.to_owned(),
            reason: reason.to_owned(),
        };
        let number = |s: &str| {
            (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .then(|| s.parse::<u32>().ok())
                .flatten()
        };
        let user = if let Some((u, g)) = spec.split_once(':') {
            Self {
                uid: number(u).ok_or_else(|| bad("not UID:GID"))?,
                gid: number(g).ok_or_else(|| bad("not UID:GID"))?,
            }
        } else if let Some(uid) = number(spec) {
            Self { uid, gid: uid }
        } else {
            let passwd = std::fs::read_to_string("/etc/passwd")
                .map_err(|e| bad(&format!("reading /etc/passwd: {e}")))?;
            Self::from_passwd(&passwd, spec).ok_or_else(|| bad("no such user in /etc/passwd"))?
        };
        if user.uid == 0 || user.gid == 0 {
            return Err(bad("root would keep every privilege"));
        }
        Ok(user)
    }

    fn from_passwd(passwd: &str, name: &str) -> Option<Self> {
        passwd.lines().find_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            match f.as_slice() {
                [n, _, uid, gid, ..] if *n == name => Some(Self {
                    uid: uid.parse().ok()?,
                    gid: gid.parse().ok()?,
                }),
                _ => None,
            }
        })
    }
}

fn privileges(what: &'static str) -> impl FnOnce(std::io::Error) -> SandboxError {
    move |source| SandboxError::Privileges { what, source }
}

fn caps_error(what: &'static str) -> impl FnOnce(caps::errors::CapsError) -> SandboxError {
    move |e| SandboxError::Privileges {
        what,
        source: std::io::Error::other(e.to_string()),
    }
}

/// `PR_SET_NO_NEW_PRIVS`: nothing this process executes gains privileges.
pub(super) fn set_no_new_privs() -> Result<(), SandboxError> {
    rustix::thread::set_no_new_privs(true)
        .map_err(|e| privileges("prctl(PR_SET_NO_NEW_PRIVS)")(e.into()))
}

/// Whether `CAP_IPC_LOCK` must stay (see [`lift_memlock_limit`]).
static KEEP_IPC_LOCK: AtomicBool = AtomicBool::new(false);

/// Lifts `RLIMIT_MEMLOCK` while `CAP_SYS_RESOURCE` is still held: without `CAP_IPC_LOCK` the
/// io_uring's registered bounce buffers (up to 30 MiB per queue, sized and capped by the data
/// plane, see [`super`]) are charged to it, and the usual 8 MiB would refuse them. Where the
/// limit cannot be lifted (no `CAP_SYS_RESOURCE`, as in many containers), `CAP_IPC_LOCK` is
/// kept instead, and said so.
pub(super) fn lift_memlock_limit() {
    use rustix::process::{setrlimit, Resource, Rlimit};
    let unlimited = Rlimit {
        current: None,
        maximum: None,
    };
    if let Err(e) = setrlimit(Resource::Memlock, unlimited) {
        tracing::info!(
            "cannot lift RLIMIT_MEMLOCK ({e}): keeping CAP_IPC_LOCK so that io_uring can \
             register the bounce buffers"
        );
        KEEP_IPC_LOCK.store(true, Ordering::Relaxed);
    }
}

/// The capabilities that stay after [`drop_capabilities`].
pub(super) fn kept(keep_setid: bool) -> CapsHashSet {
    let mut keep = CapsHashSet::new();
    if keep_setid {
        keep.extend([Capability::CAP_SETUID, Capability::CAP_SETGID]);
    }
    if KEEP_IPC_LOCK.load(Ordering::Relaxed) {
        keep.insert(Capability::CAP_IPC_LOCK);
    }
    keep
}

/// Drops every capability of the calling thread (and so of the threads it starts), from the
/// bounding set too; `keep_setid` keeps `CAP_SETUID` and `CAP_SETGID` for a later switch, in
/// the effective and permitted sets only: `setresuid` needs them there, while the bounding
/// set only limits what an `execve` could gain, and emptying it later would need
/// `CAP_SETPCAP`, which is dropped now.
pub(super) fn drop_capabilities(keep_setid: bool) -> Result<(), SandboxError> {
    // Only what is held can be kept (an unprivileged run holds nothing).
    let permitted =
        caps::read(None, CapSet::Permitted).map_err(caps_error("reading capabilities"))?;
    let keep: CapsHashSet = kept(keep_setid).intersection(&permitted).copied().collect();
    let keep_bounding = kept(false);
    // The bounding set first: dropping from it needs CAP_SETPCAP. Without it (an unprivileged
    // run) the bounding set stays, harmless with an empty permitted set and no_new_privs.
    if caps::has_cap(None, CapSet::Effective, Capability::CAP_SETPCAP).unwrap_or(false) {
        for cap in caps::all() {
            if !keep_bounding.contains(&cap)
                && caps::has_cap(None, CapSet::Bounding, cap).unwrap_or(false)
            {
                caps::drop(None, CapSet::Bounding, cap)
                    .map_err(caps_error("dropping from the bounding set"))?;
            }
        }
    }
    caps::clear(None, CapSet::Ambient).map_err(caps_error("clearing ambient capabilities"))?;
    caps::clear(None, CapSet::Inheritable)
        .map_err(caps_error("clearing inheritable capabilities"))?;
    caps::set(None, CapSet::Effective, &keep)
        .map_err(caps_error("setting effective capabilities"))?;
    caps::set(None, CapSet::Permitted, &keep)
        .map_err(caps_error("setting permitted capabilities"))?;
    Ok(())
}

/// Switches the calling thread to `user`, with no supplementary groups (group first, while
/// `CAP_SETGID` is still there).
pub(super) fn switch_user(user: &User) -> Result<(), SandboxError> {
    use rustix::process::{Gid, Uid};
    let (uid, gid) = (Uid::from_raw(user.uid), Gid::from_raw(user.gid));
    rustix::thread::set_thread_groups(&[]).map_err(|e| privileges("setgroups")(e.into()))?;
    rustix::thread::set_thread_res_gid(gid, gid, gid)
        .map_err(|e| privileges("setresgid")(e.into()))?;
    // Leaving uid 0 clears the permitted set unless told otherwise; CAP_IPC_LOCK may have to
    // survive it (see lift_memlock_limit).
    let keep = kept(false);
    if !keep.is_empty() {
        rustix::thread::set_keep_capabilities(true)
            .map_err(|e| privileges("prctl(PR_SET_KEEPCAPS)")(e.into()))?;
    }
    rustix::thread::set_thread_res_uid(uid, uid, uid)
        .map_err(|e| privileges("setresuid")(e.into()))?;
    if !keep.is_empty() {
        rustix::thread::set_keep_capabilities(false)
            .map_err(|e| privileges("prctl(PR_SET_KEEPCAPS)")(e.into()))?;
        caps::set(None, CapSet::Effective, &keep)
            .map_err(caps_error("setting effective capabilities"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_users() {
        assert_eq!(
            User::parse("1000").unwrap(),
            User {
                uid: 1000,
                gid: 1000
            }
        );
        assert_eq!(
            User::parse("1000:100").unwrap(),
            User {
                uid: 1000,
                gid: 100
            }
        );
        for bad in [
            "",
            "0",
            "0:5",
            "5:0",
            "1000:",
            ":1",
            "-1",
            "1e3",
            "99999999999",
            "no-such-user-x",
        ] {
            assert!(User::parse(bad).is_err(), "{bad:?}");
        }
        let passwd = "root:x:0:0::/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n";
        assert_eq!(
            User::from_passwd(passwd, "nobody"),
            Some(User {
                uid: 65534,
                gid: 65534
            })
        );
        assert_eq!(User::from_passwd(passwd, "nobod"), None);
    }
}
