//! XenStore client: the wire protocol over the xenstored socket or `/dev/xen/xenbus`.
//!
//! One [`XenStore`] is one connection, shared by any number of threads (`Send + Sync`):
//! requests carry a fresh request id and wait for the reply with that id, which a reader
//! thread hands over. Watch events go to a queue whose [`XenStore::watch_fd`] polls readable
//! while events wait, so watches fit into the same event loop as everything else.
//!
//! The operations (read, write, mkdir, rm, directory, permissions) live in the [`XsOps`]
//! trait, implemented by [`XenStore`] (outside any transaction) and by [`Transaction`], so code
//! can be written once for both: `use xen::xenstore::XsOps;`.
//!
//! A connection opened with [`XenStore::open_reconnecting`] survives xenstored restarting: it
//! connects again, registers its watches again (each fires once, so callers re-read), and
//! sends again the requests in flight; a transaction in flight fails with [`XsError::Again`]
//! and is run again by [`XenStore::transaction`]. The details are in `conn.rs`.
//!
//! ```no_run
//! use xen::xenstore::{XenStore, XsOps};
//! # fn main() -> Result<(), xen::xenstore::XsError> {
//! let xs = XenStore::open()?;
//! xs.transaction(|tx| {
//!     tx.write("/local/domain/0/backend/vbd/1/51712/sectors", "2048")?;
//!     tx.write("/local/domain/0/backend/vbd/1/51712/state", "4")
//! })?;
//! xs.watch("/local/domain/1/device/vbd/51712/state", "fe-state")?;
//! let first = xs.wait_watch_event(None)?; // every watch fires once when registered
//! # Ok(()) }
//! ```

mod backend_path;
mod conn;
mod error;
mod perms;
pub mod wire;

use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use backend_path::{BackendPath, BadBackendPath};
pub use conn::{Dial, Transport};
pub use error::XsError;
pub use perms::{Perm, PermAccess};
use wire::MsgType;

use crate::DomId;

/// The socket libxenstore uses when `XENSTORED_PATH` is not set.
pub const DEFAULT_SOCKET: &str = "/var/run/xenstored/socket";
/// The kernel's XenStore device, used when no socket is there (e.g. in a driver domain).
pub const XENBUS_DEVICE: &str = "/dev/xen/xenbus";
/// How long the backends try to reconnect after xenstored went away (a restart or a live
/// update) before the connection counts as lost for good.
pub const RECONNECT_WITHIN: Duration = Duration::from_secs(60);
/// How often [`XenStore::transaction`] runs a conflicting transaction before giving up.
pub const TRANSACTION_ATTEMPTS: u32 = 32;
/// The longest pause between two attempts of a conflicting transaction.
const MAX_BACKOFF: Duration = Duration::from_millis(20);

/// A watch event: `path` changed (or the watch was just registered), for the watch
/// registered with `token`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchEvent {
    /// The node that changed: the watched path or a node below it.
    pub path: String,
    /// The token given to [`XenStore::watch`].
    pub token: String,
}

/// A connection to xenstored.
#[derive(Debug)]
pub struct XenStore {
    conn: conn::Connection,
}

impl XenStore {
    /// Connects the way libxenstore does: `$XENSTORED_PATH` if set, else
    /// [`DEFAULT_SOCKET`], else [`XENBUS_DEVICE`].
    ///
    /// # Errors
    /// The error of the last candidate when none can be opened.
    pub fn open() -> Result<Self, XsError> {
        if let Some(path) = std::env::var_os("XENSTORED_PATH") {
            return Self::open_at(PathBuf::from(path));
        }
        Self::open_at(DEFAULT_SOCKET).or_else(|_| Self::open_at(XENBUS_DEVICE))
    }

    /// Connects to `path`: a character device is treated as `/dev/xen/xenbus`, anything else
    /// as xenstored's unix socket.
    ///
    /// # Errors
    /// [`XsError::Io`] when the path cannot be opened or connected to.
    pub fn open_at(path: impl AsRef<Path>) -> Result<Self, XsError> {
        let (fd, transport) = conn::dial(path.as_ref())?;
        Self::from_fd(fd, transport)
    }

    /// Connects with `dial` (a [`PathBuf`] connects as [`XenStore::open_at`] does), and
    /// again whenever xenstored ends the connection (a restart, a live update), trying for up
    /// to `within` each time: watches are registered again and waiting requests sent again
    /// (see the module). Only when no connection comes back within `within` does the
    /// connection close ([`XsError::Closed`]).
    ///
    /// # Errors
    /// As [`XenStore::open_at`]: the first connection is not retried.
    pub fn open_reconnecting(dial: impl Dial, within: Duration) -> Result<Self, XsError> {
        let (fd, transport) = dial.dial()?;
        let redial = conn::Redial {
            dial: Box::new(dial),
            within,
        };
        Ok(Self {
            conn: conn::Connection::new(fd, transport, Some(redial))?,
        })
    }

    /// Uses an already open connection (an inherited fd, or a socketpair in tests).
    ///
    /// # Errors
    /// [`XsError::Io`] when the eventfds or the reader thread cannot be created.
    pub fn from_fd(fd: OwnedFd, transport: Transport) -> Result<Self, XsError> {
        Ok(Self {
            conn: conn::Connection::new(fd, transport, None)?,
        })
    }

    /// The transport in use.
    pub fn transport(&self) -> Transport {
        self.conn.transport()
    }

    /// Runs `f` in a transaction and commits it; when the commit conflicts (`EAGAIN`), runs
    /// `f` again, up to [`TRANSACTION_ATTEMPTS`] times. An error from `f` aborts the
    /// transaction and is returned as is (an `EAGAIN` from `f` also retries). `f` must
    /// therefore be safe to run several times; to give up without an error, return the
    /// outcome inside `R`.
    ///
    /// # Errors
    /// `f`'s error, the commit's error, or [`XsError::Again`] when every attempt conflicted.
    pub fn transaction<R>(
        &self,
        mut f: impl FnMut(&Transaction<'_>) -> Result<R, XsError>,
    ) -> Result<R, XsError> {
        for attempt in 1..=TRANSACTION_ATTEMPTS {
            let tx = self.transaction_start()?;
            let outcome = match f(&tx) {
                Ok(r) => tx.commit().map(|()| r),
                Err(e) => {
                    // The abort's own failure matters less than the error that caused it.
                    let _ = tx.abort();
                    Err(e)
                }
            };
            match outcome {
                Err(XsError::Again) => {
                    tracing::debug!(attempt, "xenstore: transaction conflict, retrying");
                    std::thread::sleep(backoff(attempt));
                }
                other => return other,
            }
        }
        Err(XsError::Again)
    }

    /// Starts a transaction by hand; end it with [`Transaction::commit`] or
    /// [`Transaction::abort`] (dropping it aborts). [`XenStore::transaction`] is usually
    /// what you want.
    ///
    /// # Errors
    /// As xenstored answers (e.g. [`XsError::Quota`] with too many open transactions).
    pub fn transaction_start(&self) -> Result<Transaction<'_>, XsError> {
        let (reply, generation) = self.conn.request(MsgType::TransactionStart, None, b"\0")?;
        let id = std::str::from_utf8(wire::strip_nul(&reply))
            .ok()
            .and_then(|s| s.parse::<u32>().ok())
            .filter(|&id| id != 0)
            .ok_or_else(|| XsError::Protocol(format!("bad transaction id {reply:?}")))?;
        Ok(Transaction {
            xs: self,
            id,
            generation,
            ended: false,
        })
    }

    /// Registers a watch on `path` and its subtree. xenstored fires it once right away (the
    /// event arrives through the queue like any other), then on every change to the node or
    /// below it, and once more after each reconnect. `path` may also be `@introduceDomain`
    /// or `@releaseDomain`.
    ///
    /// # Errors
    /// [`XsError::Exists`] for the same path and token twice, [`XsError::TooBig`] past the
    /// per-connection watch limit, [`XsError::Invalid`] for a bad path.
    pub fn watch(&self, path: &str, token: &str) -> Result<(), XsError> {
        self.conn.watch(path, token, &two_strings(path, token)?)
    }

    /// Removes a watch. Events it queued before stay queued.
    ///
    /// # Errors
    /// [`XsError::NotFound`] when no such watch exists.
    pub fn unwatch(&self, path: &str, token: &str) -> Result<(), XsError> {
        self.conn.unwatch(path, token, &two_strings(path, token)?)
    }

    /// An fd that polls readable while watch events are queued, and for good once the
    /// connection has closed (then [`XenStore::is_closed`] is true). Never read it: take
    /// events with [`XenStore::next_watch_event`].
    pub fn watch_fd(&self) -> BorrowedFd<'_> {
        self.conn.watch_fd()
    }

    /// The next queued watch event, without blocking.
    pub fn next_watch_event(&self) -> Option<WatchEvent> {
        self.conn.next_watch_event()
    }

    /// The next watch event, waiting up to `timeout` (`None`: forever); `Ok(None)` when the
    /// time ran out.
    ///
    /// # Errors
    /// [`XsError::Closed`] once the connection is closed and no events are left.
    pub fn wait_watch_event(
        &self,
        timeout: Option<Duration>,
    ) -> Result<Option<WatchEvent>, XsError> {
        self.conn.wait_watch_event(timeout)
    }

    /// Replaces the thread that reads replies and watch events by a new one started from
    /// the calling thread, without losing or repeating any message.
    ///
    /// For a process that confines itself after connecting: on Linux, credentials
    /// (`setresuid` as a raw system call), capabilities and the Landlock domain are per
    /// thread, and only threads started afterwards inherit them. The reader started by
    /// [`XenStore::open`] predates the confinement; once this returns, the thread parsing
    /// xenstored's bytes is one the confined thread started.
    ///
    /// # Errors
    /// [`XsError::Io`] when no thread can be started; the connection is then closed (every
    /// request fails with [`XsError::Closed`]).
    pub fn restart_reader(&self) -> Result<(), XsError> {
        self.conn.restart_reader()
    }

    /// Whether the connection has closed; every request now fails with [`XsError::Closed`].
    pub fn is_closed(&self) -> bool {
        self.conn.is_closed()
    }

    /// The home path of a domain, `/local/domain/<domid>`, as xenstored reports it.
    ///
    /// # Errors
    /// As xenstored answers.
    pub fn get_domain_path(&self, domid: DomId) -> Result<String, XsError> {
        let reply = self.request(
            MsgType::GetDomainPath,
            &wire::nul_terminated(domid.to_string().as_bytes()),
        )?;
        reply_string(&reply)
    }
}

/// An open transaction; the [`XsOps`] methods act inside it. Dropping it without
/// [`Transaction::commit`] aborts it.
#[derive(Debug)]
pub struct Transaction<'a> {
    xs: &'a XenStore,
    id: u32,
    /// The connection's generation when it began: after a reconnect, every use is `EAGAIN`.
    generation: u64,
    ended: bool,
}

impl Transaction<'_> {
    /// The transaction id xenstored gave.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Commits.
    ///
    /// # Errors
    /// [`XsError::Again`] when another change conflicted, or xenstored's connection was
    /// lost meanwhile: run the transaction again.
    pub fn commit(mut self) -> Result<(), XsError> {
        self.end(true)
    }

    /// Aborts, discarding every change made in the transaction.
    ///
    /// # Errors
    /// As xenstored answers (e.g. [`XsError::Closed`]).
    pub fn abort(mut self) -> Result<(), XsError> {
        self.end(false)
    }

    fn end(&mut self, commit: bool) -> Result<(), XsError> {
        self.ended = true;
        let arg: &[u8] = if commit { b"T\0" } else { b"F\0" };
        self.xs
            .conn
            .request(
                MsgType::TransactionEnd,
                Some((self.id, self.generation)),
                arg,
            )
            .map(drop)
    }
}

impl Drop for Transaction<'_> {
    fn drop(&mut self) {
        if !self.ended {
            let _ = self.end(false);
        }
    }
}

/// The XenStore operations, inside a transaction ([`Transaction`]) or not ([`XenStore`]).
/// Paths are absolute (`/local/domain/...`) or relative to the connection's home path.
pub trait XsOps {
    /// Sends one raw request of type `ty` in this scope and returns the reply payload; the
    /// other methods are built on it. `XS_ERROR` replies become their typed [`XsError`].
    /// A watch registered this way is not registered again after a reconnect: use
    /// [`XenStore::watch`].
    ///
    /// # Errors
    /// xenstored's error, [`XsError::PayloadTooLarge`], or [`XsError::Closed`].
    fn request(&self, ty: MsgType, payload: &[u8]) -> Result<Vec<u8>, XsError>;

    /// A node's value.
    ///
    /// # Errors
    /// [`XsError::NotFound`], [`XsError::PermissionDenied`], ...
    fn read(&self, path: &str) -> Result<Vec<u8>, XsError> {
        self.request(MsgType::Read, &path_arg(path)?)
    }

    /// A node's value as UTF-8 text.
    ///
    /// # Errors
    /// As [`XsOps::read`]; [`XsError::Invalid`] when the value is not UTF-8.
    fn read_string(&self, path: &str) -> Result<String, XsError> {
        String::from_utf8(self.read(path)?).map_err(|_| XsError::Invalid)
    }

    /// Writes a value, creating the node and its missing parents.
    ///
    /// # Errors
    /// [`XsError::PermissionDenied`], [`XsError::Invalid`], [`XsError::PayloadTooLarge`], ...
    fn write(&self, path: &str, value: impl AsRef<[u8]>) -> Result<(), XsError>
    where
        Self: Sized,
    {
        let mut payload = path_arg(path)?;
        payload.extend_from_slice(value.as_ref());
        self.request(MsgType::Write, &payload).map(drop)
    }

    /// Creates a node (empty value) and its missing parents; an existing node is left alone.
    ///
    /// # Errors
    /// [`XsError::PermissionDenied`], [`XsError::Invalid`], ...
    fn mkdir(&self, path: &str) -> Result<(), XsError> {
        self.request(MsgType::Mkdir, &path_arg(path)?).map(drop)
    }

    /// Removes a node and everything below it.
    ///
    /// # Errors
    /// [`XsError::NotFound`] when the node is missing (its parent existing or not, as
    /// xenstored decides), [`XsError::PermissionDenied`], ...
    fn rm(&self, path: &str) -> Result<(), XsError> {
        self.request(MsgType::Rm, &path_arg(path)?).map(drop)
    }

    /// The names of a node's children. A list too long for one reply (`E2BIG`) is fetched in
    /// parts with `XS_DIRECTORY_PART`, as libxenstore does.
    ///
    /// # Errors
    /// [`XsError::NotFound`], [`XsError::PermissionDenied`], ...
    fn directory(&self, path: &str) -> Result<Vec<String>, XsError> {
        let reply = match self.request(MsgType::Directory, &path_arg(path)?) {
            Err(XsError::TooBig) => directory_in_parts(self, path)?,
            other => other?,
        };
        wire::split_strings(&reply)
            .into_iter()
            .map(|s| {
                String::from_utf8(s.to_vec())
                    .map_err(|_| XsError::Protocol("non-UTF-8 child name".into()))
            })
            .collect()
    }

    /// A node's permissions: the owner (with the access of domains not listed) first.
    ///
    /// # Errors
    /// [`XsError::NotFound`], [`XsError::PermissionDenied`], ...
    fn get_perms(&self, path: &str) -> Result<Vec<Perm>, XsError> {
        let reply = self.request(MsgType::GetPerms, &path_arg(path)?)?;
        Perm::parse_list(&reply)
            .map_err(|_| XsError::Protocol(format!("bad permissions {reply:?}")))
    }

    /// Sets a node's permissions (the first entry names the new owner).
    ///
    /// # Errors
    /// [`XsError::Invalid`] for an empty list, [`XsError::PermissionDenied`] unless the
    /// caller owns the node or is privileged, ...
    fn set_perms(&self, path: &str, perms: &[Perm]) -> Result<(), XsError> {
        if perms.is_empty() {
            return Err(XsError::Invalid);
        }
        let mut payload = path_arg(path)?;
        for p in perms {
            payload.extend_from_slice(p.to_string().as_bytes());
            payload.push(0);
        }
        self.request(MsgType::SetPerms, &payload).map(drop)
    }
}

impl XsOps for XenStore {
    fn request(&self, ty: MsgType, payload: &[u8]) -> Result<Vec<u8>, XsError> {
        self.conn.request(ty, None, payload).map(|(reply, _)| reply)
    }
}

impl XsOps for Transaction<'_> {
    fn request(&self, ty: MsgType, payload: &[u8]) -> Result<Vec<u8>, XsError> {
        self.xs
            .conn
            .request(ty, Some((self.id, self.generation)), payload)
            .map(|(reply, _)| reply)
    }
}

/// How often a listing in parts restarts because the node changed in between.
const DIRECTORY_PART_RESTARTS: u32 = 8;

/// `xs_directory_part`: the NUL-terminated child names, collected from replies that each
/// start with the node's generation; a changed generation means the list changed, so start
/// over.
fn directory_in_parts<S: XsOps + ?Sized>(s: &S, path: &str) -> Result<Vec<u8>, XsError> {
    let bad = |what: &str| XsError::Protocol(format!("XS_DIRECTORY_PART reply: {what}"));
    'restart: for _ in 0..DIRECTORY_PART_RESTARTS {
        let mut names: Vec<u8> = Vec::new();
        let mut generation: Option<Vec<u8>> = None;
        loop {
            let mut req = path_arg(path)?;
            req.extend_from_slice(&wire::nul_terminated(names.len().to_string().as_bytes()));
            let reply = s.request(MsgType::DirectoryPart, &req)?;
            let nul = reply
                .iter()
                .position(|&b| b == 0)
                .ok_or_else(|| bad("no generation"))?;
            let (gen, data) = (&reply[..nul], &reply[nul + 1..]);
            match &generation {
                Some(g) if g.as_slice() != gen => continue 'restart,
                Some(_) => {}
                None => generation = Some(gen.to_vec()),
            }
            if data.is_empty() {
                return Err(bad("no progress"));
            }
            names.extend_from_slice(data);
            // The last part ends with an extra NUL (an empty list is just that NUL).
            if names == [0] {
                return Ok(Vec::new());
            }
            if names.ends_with(&[0, 0]) {
                names.pop();
                return Ok(names);
            }
        }
    }
    Err(XsError::Again)
}

/// A growing, jittered pause after the `attempt`th conflict, so that transactions that keep
/// colliding (the same node rewritten by several clients) stop doing so in lockstep.
fn backoff(attempt: u32) -> Duration {
    let base = Duration::from_micros(50)
        .saturating_mul(1 << attempt.min(16))
        .min(MAX_BACKOFF);
    // Jitter from the clock's nanoseconds: no randomness source needed for spreading retries.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    base / 2 + base.mul_f64(f64::from(nanos % 1000) / 1000.0)
}

/// `path\0`, refusing what cannot be framed.
fn path_arg(path: &str) -> Result<Vec<u8>, XsError> {
    if path.is_empty() || path.contains('\0') {
        return Err(XsError::BadArgument(path.to_owned()));
    }
    Ok(wire::nul_terminated(path.as_bytes()))
}

/// `a\0b\0`.
fn two_strings(a: &str, b: &str) -> Result<Vec<u8>, XsError> {
    if b.contains('\0') {
        return Err(XsError::BadArgument(b.to_owned()));
    }
    let mut v = path_arg(a)?;
    v.extend_from_slice(&wire::nul_terminated(b.as_bytes()));
    Ok(v)
}

fn reply_string(reply: &[u8]) -> Result<String, XsError> {
    String::from_utf8(wire::strip_nul(reply).to_vec())
        .map_err(|_| XsError::Protocol("non-UTF-8 reply".into()))
}
