//! A simulated xenstored speaking the real wire protocol on unix sockets, so the real
//! [`crate::xenstore`] client is the code under test (Debian's C xenstored needs a
//! hypervisor to start).
//!
//! It follows tools/xenstored closely: the same errno names in `XS_ERROR` replies, watches
//! that fire once on registration and then for the node and its subtree (on removal, exactly
//! for each removed descendant), only for connections allowed to read the node; transactions
//! that fail with `EAGAIN` at commit when a node they read has changed, firing their watches
//! at commit; permissions where the first entry names the owner and the default for others,
//! new nodes inherit their parent's and belong to an unprivileged creator; quotas (watches
//! per domain: `E2BIG`; nodes, node size, permissions, transactions: `ENOSPC`).
//!
//! Identity is the socket one connects to: in the directory given to
//! [`SimXenstored::start`], `socket` is dom0's (privileged) and `socket.d<N>` is domain N's,
//! created by [`SimXenstored::introduce_domain`] or by `XS_INTRODUCE` on dom0's socket (so
//! another process can introduce and release domains). Other processes connect with
//! `XENSTORED_PATH=<dir>/socket`.
//!
//! [`SimXenstored::restart`] ends every connection and takes the sockets away for a while,
//! keeping the tree: what a socket client sees when xenstored restarts, or when a live update
//! does not carry its connection over (C xenstored's keeps socket connections open across the
//! exec; a crash and restart does not).
//!
//! Known differences: no rate limiting or event timeouts, no duplicate-event suppression, no
//! per-domain memory quota, and the node quota inside a transaction counts committed nodes
//! only.

mod store;

use std::collections::{BTreeSet, HashMap};
use std::io::Read;
use std::net::Shutdown;
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use rustix::event::{eventfd, poll, EventfdFlags, PollFd, PollFlags};

use store::{Caller, Fire, Store, Tx, View};
use xen::xenstore::wire::{self, FrameReader, Message, MsgType, PAYLOAD_MAX};
use xen::xenstore::{Perm, XsError};
use xen::DomId;

/// Watches an unprivileged domain may hold beyond which `XS_WATCH` fails with `E2BIG`
/// (`quota_nb_watch_per_domain`; xenstored checks `count > quota` before adding).
pub const QUOTA_WATCHES: usize = 128;
/// Open transactions per unprivileged connection beyond which `ENOSPC` (`quota_max_transaction`).
pub const QUOTA_TRANSACTIONS: usize = 10;

/// A failure to run the simulated xenstored.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SimXenstoredError {
    /// A socket or thread could not be created.
    #[error("simulated xenstored: I/O on {path}")]
    Io {
        /// The socket or directory concerned.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The domain already has its socket.
    #[error("domain {0} is already introduced")]
    AlreadyIntroduced(DomId),
    /// The domain has no socket.
    #[error("domain {0} is not introduced")]
    NotIntroduced(DomId),
    /// Domain 0 is the privileged `socket`, not an introduced domain.
    #[error("domain 0 cannot be introduced or released")]
    Dom0,
}

/// A fault to inject, for testing how clients cope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fault {
    /// The next reply (to any connection) is cut after its header and half its payload, and
    /// that connection is closed.
    CloseMidReply,
}

/// What a connection's writer thread sends.
#[derive(Debug)]
enum Out {
    Frame(Vec<u8>),
    /// Send part of this frame, then close the connection.
    Cut(Vec<u8>),
}

#[derive(Debug)]
struct Watch {
    node: String,
    token: String,
    /// Bytes to strip from event paths of a relative watch (its home path and `/`).
    prefix_len: usize,
}

#[derive(Debug)]
struct Conn {
    caller: Caller,
    out: Sender<Out>,
    stream: UnixStream,
    watches: Vec<Watch>,
    txs: HashMap<u32, Tx>,
    next_tx: u32,
}

#[derive(Debug)]
struct State {
    store: Store,
    conns: HashMap<u64, Conn>,
    next_conn: u64,
    introduced: BTreeSet<DomId>,
    fault: Option<Fault>,
    stopped: bool,
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    state: Mutex<State>,
    /// The listening sockets, by domain (0: dom0's `socket`); the acceptor polls copies.
    listeners: Mutex<HashMap<DomId, UnixListener>>,
    /// Wakes the acceptor: the listener set changed, or stop.
    wake: OwnedFd,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Each critical section leaves the data consistent, so a poisoned lock is still usable.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A running simulated xenstored; stopped (threads joined, sockets removed) by
/// [`SimXenstored::stop`] or on drop.
#[derive(Debug)]
pub struct SimXenstored {
    inner: Arc<Inner>,
    acceptor: Option<JoinHandle<()>>,
}

impl SimXenstored {
    /// Starts serving in `dir` (created if missing): dom0's `socket` now, domains' sockets as
    /// they are introduced. The tree starts with just `/`, owned by dom0 (`n0`).
    ///
    /// # Errors
    /// When the directory, the socket or a thread cannot be created.
    pub fn start(dir: impl AsRef<Path>) -> Result<Self, SimXenstoredError> {
        let dir = dir.as_ref().to_path_buf();
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| SimXenstoredError::Io { path, source }
        };
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let dom0_path = dir.join("socket");
        let dom0 = bind(&dom0_path)?;
        let wake = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK).map_err(|e| {
            SimXenstoredError::Io {
                path: dir.clone(),
                source: e.into(),
            }
        })?;
        let inner = Arc::new(Inner {
            dir: dir.clone(),
            state: Mutex::new(State {
                store: Store::new(),
                conns: HashMap::new(),
                next_conn: 1,
                introduced: BTreeSet::new(),
                fault: None,
                stopped: false,
            }),
            listeners: Mutex::new(HashMap::from([(0, dom0)])),
            wake,
            threads: Mutex::new(Vec::new()),
        });
        let acceptor = {
            let inner = Arc::clone(&inner);
            std::thread::Builder::new()
                .name("sim-xenstored".into())
                .spawn(move || accept_loop(&inner))
                .map_err(io(&dom0_path))?
        };
        Ok(Self {
            inner,
            acceptor: Some(acceptor),
        })
    }

    /// The directory holding the sockets.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// dom0's socket: connect here (or set `XENSTORED_PATH` to it) for a privileged client.
    pub fn socket_path(&self) -> PathBuf {
        socket_path(&self.inner.dir, 0)
    }

    /// Domain `domid`'s socket (exists while the domain is introduced).
    pub fn domain_socket_path(&self, domid: DomId) -> PathBuf {
        socket_path(&self.inner.dir, domid)
    }

    /// Introduces a domain: creates its socket and fires `@introduceDomain`. Its home
    /// `/local/domain/<domid>` is not created, as with the real xenstored: the toolstack does.
    ///
    /// # Errors
    /// When already introduced, for domain 0, or when the socket cannot be created.
    pub fn introduce_domain(&self, domid: DomId) -> Result<PathBuf, SimXenstoredError> {
        introduce(&self.inner, domid)
    }

    /// Releases a domain: fires `@releaseDomain`, removes its socket and closes its
    /// connections (their watches and transactions go with them).
    ///
    /// # Errors
    /// When the domain is not introduced.
    pub fn release_domain(&self, domid: DomId) -> Result<(), SimXenstoredError> {
        release(&self.inner, domid)
    }

    /// Restarts, as a client on a socket sees it: every connection ends (its watches and
    /// transactions with it), the sockets are gone for `down` (connecting fails), then back.
    /// The tree and the introduced domains are kept, as a live update keeps them.
    ///
    /// # Errors
    /// When a socket cannot be created again; the ones created stay.
    pub fn restart(&self, down: Duration) -> Result<(), SimXenstoredError> {
        // The sockets go first, so that clients redialling at once find none.
        let sockets: Vec<(DomId, PathBuf)> = {
            let mut st = lock(&self.inner.state);
            lock(&self.inner.listeners).clear();
            let sockets: Vec<(DomId, PathBuf)> = std::iter::once(0)
                .chain(st.introduced.iter().copied())
                .map(|d| (d, socket_path(&self.inner.dir, d)))
                .collect();
            for (_, path) in &sockets {
                let _ = std::fs::remove_file(path);
            }
            // The acceptor drops its copies of the old listeners.
            signal(&self.inner.wake);
            for (_, conn) in st.conns.drain() {
                let _ = conn.stream.shutdown(Shutdown::Both);
            }
            sockets
        };
        std::thread::sleep(down);
        for (domid, path) in &sockets {
            let listener = bind(path)?;
            lock(&self.inner.listeners).insert(*domid, listener);
        }
        signal(&self.inner.wake);
        Ok(())
    }

    /// Arms a fault that triggers once.
    pub fn inject_fault(&self, fault: Fault) {
        lock(&self.inner.state).fault = Some(fault);
    }

    /// Stops: closes every connection, removes the sockets, joins the threads.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        {
            let mut st = lock(&self.inner.state);
            st.stopped = true;
            for conn in st.conns.values() {
                let _ = conn.stream.shutdown(Shutdown::Both);
            }
        }
        signal(&self.inner.wake);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        let threads = std::mem::take(&mut *lock(&self.inner.threads));
        for t in threads {
            let _ = t.join();
        }
        lock(&self.inner.listeners).clear();
        let introduced = std::mem::take(&mut lock(&self.inner.state).introduced);
        for domid in introduced {
            let _ = std::fs::remove_file(self.domain_socket_path(domid));
        }
        let _ = std::fs::remove_file(self.socket_path());
    }
}

impl Drop for SimXenstored {
    fn drop(&mut self) {
        if self.acceptor.is_some() {
            self.shutdown();
        }
    }
}

/// dom0's socket (`socket`) or domain `domid`'s (`socket.d<N>`) in `dir`.
fn socket_path(dir: &Path, domid: DomId) -> PathBuf {
    match domid {
        0 => dir.join("socket"),
        d => dir.join(format!("socket.d{d}")),
    }
}

fn bind(path: &Path) -> Result<UnixListener, SimXenstoredError> {
    let io = |source| SimXenstoredError::Io {
        path: path.to_path_buf(),
        source,
    };
    // A socket file left by an earlier run that did not clean up would make bind fail.
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    let listener = UnixListener::bind(path).map_err(io)?;
    listener.set_nonblocking(true).map_err(io)?;
    Ok(listener)
}

fn signal(fd: &OwnedFd) {
    // Fails only when the counter would overflow; the fd is readable then anyway.
    let _ = rustix::io::write(fd, &1u64.to_ne_bytes());
}

fn introduce(inner: &Inner, domid: DomId) -> Result<PathBuf, SimXenstoredError> {
    if domid == 0 {
        return Err(SimXenstoredError::Dom0);
    }
    let path = socket_path(&inner.dir, domid);
    let mut st = lock(&inner.state);
    if st.introduced.contains(&domid) {
        return Err(SimXenstoredError::AlreadyIntroduced(domid));
    }
    let listener = bind(&path)?;
    lock(&inner.listeners).insert(domid, listener);
    st.introduced.insert(domid);
    let fire = Fire::special(
        "@introduceDomain",
        st.store.special_perms("@introduceDomain"),
    );
    st.deliver(&[fire]);
    drop(st);
    signal(&inner.wake);
    Ok(path)
}

fn release(inner: &Inner, domid: DomId) -> Result<(), SimXenstoredError> {
    if domid == 0 {
        return Err(SimXenstoredError::Dom0);
    }
    let mut st = lock(&inner.state);
    if !st.introduced.remove(&domid) {
        return Err(SimXenstoredError::NotIntroduced(domid));
    }
    lock(&inner.listeners).remove(&domid);
    let _ = std::fs::remove_file(socket_path(&inner.dir, domid));
    let gone: Vec<u64> = st
        .conns
        .iter()
        .filter(|(_, c)| c.caller.domid == domid)
        .map(|(&id, _)| id)
        .collect();
    for id in gone {
        if let Some(conn) = st.conns.remove(&id) {
            let _ = conn.stream.shutdown(Shutdown::Both);
        }
    }
    let fire = Fire::special("@releaseDomain", st.store.special_perms("@releaseDomain"));
    st.deliver(&[fire]);
    drop(st);
    signal(&inner.wake);
    Ok(())
}

/// Accepts on every listening socket until stopped.
fn accept_loop(inner: &Arc<Inner>) {
    let mut listeners: Vec<(DomId, UnixListener)> = Vec::new();
    loop {
        if lock(&inner.state).stopped {
            return;
        }
        // Take the current listener set (copies: introduce, release and restart may change it
        // meanwhile, and wake this loop when they do).
        listeners.clear();
        for (&d, l) in lock(&inner.listeners).iter() {
            match l.try_clone() {
                Ok(l) => listeners.push((d, l)),
                Err(e) => tracing::warn!("sim-xenstored: listener of domain {d}: {e}"),
            }
        }
        let mut fds = vec![PollFd::new(&inner.wake, PollFlags::IN)];
        fds.extend(listeners.iter().map(|(_, l)| PollFd::new(l, PollFlags::IN)));
        match poll(&mut fds, None) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => {
                tracing::warn!("sim-xenstored: poll: {e}");
                return;
            }
        }
        let ready: Vec<bool> = fds.iter().map(|f| !f.revents().is_empty()).collect();
        drop(fds);
        if ready[0] {
            let mut b = [0u8; 8];
            let _ = rustix::io::read(&inner.wake, &mut b);
            continue;
        }
        for ((domid, listener), _) in listeners.iter().zip(&ready[1..]).filter(|(_, &r)| r) {
            let caller = Caller {
                domid: *domid,
                privileged: *domid == 0,
            };
            accept(inner, listener, caller);
        }
    }
}

fn accept(inner: &Arc<Inner>, listener: &UnixListener, caller: Caller) {
    let stream = match listener.accept() {
        Ok((s, _)) => s,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
        Err(e) => {
            tracing::warn!("sim-xenstored: accept: {e}");
            return;
        }
    };
    if let Err(e) = serve(inner, stream, caller) {
        tracing::warn!("sim-xenstored: cannot serve a connection: {e}");
    }
}

/// Registers a connection and starts its reader and writer threads.
fn serve(inner: &Arc<Inner>, stream: UnixStream, caller: Caller) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    let (tx, rx) = channel();
    let reader_stream = stream.try_clone()?;
    let writer_stream = stream.try_clone()?;
    let id = {
        let mut st = lock(&inner.state);
        // A domain released (or a stop) between accept and now: refuse the connection.
        if st.stopped || (!caller.privileged && !st.introduced.contains(&caller.domid)) {
            return Ok(());
        }
        let id = st.next_conn;
        st.next_conn += 1;
        let conn = Conn {
            caller,
            out: tx,
            stream,
            watches: Vec::new(),
            txs: HashMap::new(),
            next_tx: 1,
        };
        st.conns.insert(id, conn);
        id
    };
    let writer = std::thread::Builder::new()
        .name("sim-xenstored-w".into())
        .spawn(move || write_loop(writer_stream, &rx))?;
    let reader = {
        let inner = Arc::clone(inner);
        std::thread::Builder::new()
            .name("sim-xenstored-r".into())
            .spawn(move || read_loop(&inner, reader_stream, id))
    };
    let mut threads = lock(&inner.threads);
    // Forget connections that have ended, so a long run does not pile up handles.
    threads.retain(|t| !t.is_finished());
    threads.push(writer);
    match reader {
        Ok(r) => threads.push(r),
        Err(e) => {
            if let Some(conn) = lock(&inner.state).conns.remove(&id) {
                let _ = conn.stream.shutdown(Shutdown::Both);
            }
            return Err(e);
        }
    }
    Ok(())
}

fn write_loop(stream: UnixStream, rx: &Receiver<Out>) {
    while let Ok(out) = rx.recv() {
        match out {
            Out::Frame(f) => {
                if send_all(&stream, &f).is_err() {
                    break;
                }
            }
            Out::Cut(f) => {
                let keep = wire::HEADER_LEN + (f.len() - wire::HEADER_LEN) / 2;
                let _ = send_all(&stream, &f[..keep]);
                break;
            }
        }
    }
    let _ = stream.shutdown(Shutdown::Both);
}

/// Sends all of `buf` with MSG_NOSIGNAL: a client gone away must not SIGPIPE the server.
fn send_all(stream: &UnixStream, mut buf: &[u8]) -> rustix::io::Result<()> {
    while !buf.is_empty() {
        match rustix::net::send(stream, buf, rustix::net::SendFlags::NOSIGNAL) {
            Ok(0) => return Err(rustix::io::Errno::PIPE),
            Ok(n) => buf = &buf[n..],
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn read_loop(inner: &Inner, mut stream: UnixStream, id: u64) {
    let mut frames = FrameReader::new(PAYLOAD_MAX);
    let mut buf = vec![0u8; wire::HEADER_LEN + PAYLOAD_MAX];
    'conn: loop {
        let n = match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        frames.push(&buf[..n]);
        loop {
            match frames.next_message() {
                Ok(Some(msg)) => {
                    let domain_op = domain_op(inner, id, &msg);
                    let mut st = lock(&inner.state);
                    if !st.conns.contains_key(&id) {
                        break 'conn;
                    }
                    match domain_op {
                        Some(result) => st.respond(id, &msg, result.map(|p| (p, After::Nothing))),
                        None => st.handle(id, &msg),
                    }
                }
                Ok(None) => break,
                // xenstored drops a client that announces an oversized message.
                Err(e) => {
                    tracing::debug!("sim-xenstored: {e}; closing the connection");
                    break 'conn;
                }
            }
        }
    }
    if let Some(conn) = lock(&inner.state).conns.remove(&id) {
        let _ = conn.stream.shutdown(Shutdown::Both);
    }
}

/// XS_INTRODUCE (`domid\0mfn\0port\0`) and XS_RELEASE (`domid\0`) from the toolstack: the
/// same as [`SimXenstored::introduce_domain`] and [`SimXenstored::release_domain`], so another
/// process can manage domains through dom0's socket. `None` for other requests.
fn domain_op(inner: &Inner, id: u64, msg: &Message) -> Option<Result<Vec<u8>, XsError>> {
    let ty = msg
        .msg_type()
        .filter(|t| matches!(t, MsgType::Introduce | MsgType::Release))?;
    let privileged = lock(&inner.state)
        .conns
        .get(&id)
        .is_some_and(|c| c.caller.privileged);
    let result = (|| {
        if !privileged {
            return Err(XsError::PermissionDenied);
        }
        let domid = if ty == MsgType::Introduce {
            let [domid, _mfn, _port] = args::<3>(&msg.payload)?;
            parse_domid(domid)?
        } else {
            parse_domid(one_arg(&msg.payload)?)?
        };
        let outcome = if ty == MsgType::Introduce {
            introduce(inner, domid).map(drop)
        } else {
            release(inner, domid)
        };
        match outcome {
            // Introducing a domain again is accepted, as xenstored does for a known domain.
            Ok(()) | Err(SimXenstoredError::AlreadyIntroduced(_)) => Ok(b"OK\0".to_vec()),
            Err(SimXenstoredError::NotIntroduced(_)) => Err(XsError::NotFound),
            Err(SimXenstoredError::Dom0) => Err(XsError::Invalid),
            Err(SimXenstoredError::Io { .. }) => Err(XsError::RemoteIo),
        }
    })();
    Some(result)
}

/// The single argument of a request: exactly one NUL, at the end (`onearg`).
fn one_arg(payload: &[u8]) -> Result<&[u8], XsError> {
    match payload.split_last() {
        Some((0, s)) if !s.contains(&0) => Ok(s),
        _ => Err(XsError::Invalid),
    }
}

/// Exactly `N` NUL-terminated strings (`get_strings(...) == N`).
fn args<const N: usize>(payload: &[u8]) -> Result<[&[u8]; N], XsError> {
    let (0, body) = payload.split_last().ok_or(XsError::Invalid)? else {
        return Err(XsError::Invalid);
    };
    let parts: Vec<&[u8]> = body.split(|&b| b == 0).collect();
    parts.try_into().map_err(|_| XsError::Invalid)
}

fn parse_domid(s: &[u8]) -> Result<DomId, XsError> {
    if s.is_empty() || s.len() > 5 || !s.iter().all(u8::is_ascii_digit) {
        return Err(XsError::Invalid);
    }
    std::str::from_utf8(s)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or(XsError::Invalid)
}

/// Is `child` the node `parent` or below it (`is_child`; everything is below `/`)?
fn is_child(child: &str, parent: &str) -> bool {
    parent == "/"
        || child
            .strip_prefix(parent)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// What a request produced besides its reply.
enum After {
    Nothing,
    /// The registration event of a new watch, sent after the reply.
    WatchEvent(Vec<u8>),
}

impl State {
    /// Sends watch events for `fires` to every connection allowed to see them.
    fn deliver(&self, fires: &[Fire]) {
        for conn in self.conns.values() {
            let visible = |f: &&Fire| {
                f.visible_to(&conn.caller) || self.store.parent_readable(&f.path, &conn.caller)
            };
            for fire in fires.iter().filter(visible) {
                for w in &conn.watches {
                    let hit = if fire.exact {
                        fire.path == w.node
                    } else {
                        is_child(&fire.path, &w.node)
                    };
                    if hit {
                        let path = fire.path.get(w.prefix_len..).unwrap_or(&fire.path);
                        let _ = conn.out.send(Out::Frame(event_frame(path, &w.token)));
                    }
                }
            }
        }
    }

    fn handle(&mut self, id: u64, msg: &Message) {
        let mut fires = Vec::new();
        let result = self.execute(id, msg, &mut fires);
        self.deliver(&fires);
        self.respond(id, msg, result);
    }

    /// Sends the reply (and what follows it) to request `msg` of connection `id`.
    fn respond(&mut self, id: u64, msg: &Message, result: Result<(Vec<u8>, After), XsError>) {
        let (ty, payload, after) = match result {
            Ok((payload, after)) if payload.len() <= PAYLOAD_MAX => (msg.ty, payload, after),
            Ok(_) => (
                MsgType::Error as u32,
                errno_payload(&XsError::TooBig),
                After::Nothing,
            ),
            Err(e) => (MsgType::Error as u32, errno_payload(&e), After::Nothing),
        };
        let frame = wire::encode(ty, msg.req_id, msg.tx_id, &payload);
        let out = if self.fault.take() == Some(Fault::CloseMidReply) {
            Out::Cut(frame)
        } else {
            Out::Frame(frame)
        };
        let Some(conn) = self.conns.get(&id) else {
            return;
        };
        let _ = conn.out.send(out);
        if let After::WatchEvent(ev) = after {
            let _ = conn.out.send(Out::Frame(ev));
        }
    }

    /// Runs one request, inside its transaction if it names one (`transaction_lookup`: an
    /// unknown transaction id is ENOENT). The transaction stays open unless ended.
    fn execute(
        &mut self,
        id: u64,
        msg: &Message,
        fires: &mut Vec<Fire>,
    ) -> Result<(Vec<u8>, After), XsError> {
        let conn = self.conns.get_mut(&id).ok_or(XsError::RemoteIo)?;
        let mut tx = match msg.tx_id {
            0 => None,
            t => Some((t, conn.txs.remove(&t).ok_or(XsError::NotFound)?)),
        };
        let result = self.run(id, &mut tx, msg, fires);
        self.put_back(id, tx);
        result
    }

    fn run(
        &mut self,
        id: u64,
        tx: &mut Option<(u32, Tx)>,
        msg: &Message,
        fires: &mut Vec<Fire>,
    ) -> Result<(Vec<u8>, After), XsError> {
        let ok = |p: Vec<u8>| Ok((p, After::Nothing));
        let ack = || Ok((b"OK\0".to_vec(), After::Nothing));
        let conn = self.conns.get_mut(&id).ok_or(XsError::RemoteIo)?;
        let caller = conn.caller;
        let p = msg.payload.as_slice();
        match msg.msg_type() {
            Some(MsgType::TransactionStart) if tx.is_some() => Err(XsError::Busy),
            Some(MsgType::TransactionStart) => {
                if !caller.privileged && conn.txs.len() > QUOTA_TRANSACTIONS {
                    return Err(XsError::NoSpace);
                }
                let mut t = conn.next_tx;
                while t == 0 || conn.txs.contains_key(&t) {
                    t = t.wrapping_add(1);
                }
                conn.next_tx = t.wrapping_add(1);
                conn.txs.insert(t, Tx::default());
                ok(wire::nul_terminated(t.to_string().as_bytes()))
            }
            Some(MsgType::TransactionEnd) => {
                let commit = match one_arg(p)? {
                    b"T" => true,
                    b"F" => false,
                    _ => return Err(XsError::Invalid),
                };
                let (_, t) = tx.take().ok_or(XsError::NotFound)?;
                if commit {
                    fires.extend(t.commit(&mut self.store)?);
                }
                ack()
            }
            Some(MsgType::Watch) => self.watch(id, p),
            Some(MsgType::Unwatch) => self.unwatch(id, p).and_then(|()| ack()),
            Some(MsgType::GetDomainPath) => {
                let domid = parse_domid(one_arg(p)?)?;
                ok(wire::nul_terminated(
                    format!("/local/domain/{domid}").as_bytes(),
                ))
            }
            Some(MsgType::IsDomainIntroduced) => {
                let domid = parse_domid(one_arg(p)?)?;
                let yes = domid == 0 || self.introduced.contains(&domid);
                ok(if yes {
                    b"T\0".to_vec()
                } else {
                    b"F\0".to_vec()
                })
            }
            Some(MsgType::ResetWatches) => {
                conn.watches.clear();
                conn.txs.clear();
                *tx = None;
                ack()
            }
            // Handled before the state lock is taken (they create and remove sockets).
            Some(MsgType::Introduce | MsgType::Release) => Err(XsError::RemoteIo),
            Some(
                t @ (MsgType::Read
                | MsgType::Directory
                | MsgType::DirectoryPart
                | MsgType::GetPerms
                | MsgType::Write
                | MsgType::Mkdir
                | MsgType::Rm
                | MsgType::SetPerms),
            ) => {
                let mut view = View::new(&mut self.store, tx.as_mut().map(|(_, t)| t), caller);
                node_op(&mut view, t, p, fires)
            }
            Some(MsgType::Control | MsgType::Resume | MsgType::SetTarget) => {
                Err(XsError::NotSupported)
            }
            Some(MsgType::WatchEvent | MsgType::Error) | None => Err(XsError::Invalid),
        }
    }

    fn put_back(&mut self, id: u64, tx: Option<(u32, Tx)>) {
        if let (Some((t, tx)), Some(conn)) = (tx, self.conns.get_mut(&id)) {
            conn.txs.insert(t, tx);
        }
    }

    fn watch(&mut self, id: u64, p: &[u8]) -> Result<(Vec<u8>, After), XsError> {
        let [path, token] = args::<2>(p)?;
        let caller = self.conns.get(&id).ok_or(XsError::RemoteIo)?.caller;
        let view = View::new(&mut self.store, None, caller);
        let node = view.canonicalize(path, true)?;
        let relative = !path.starts_with(b"/") && !path.starts_with(b"@");
        let token = String::from_utf8(token.to_vec()).map_err(|_| XsError::Invalid)?;
        let held: usize = if caller.privileged {
            0
        } else {
            self.conns
                .values()
                .filter(|c| c.caller.domid == caller.domid)
                .map(|c| c.watches.len())
                .sum()
        };
        let conn = self.conns.get_mut(&id).ok_or(XsError::RemoteIo)?;
        if conn
            .watches
            .iter()
            .any(|w| w.node == node && w.token == token)
        {
            return Err(XsError::Exists);
        }
        if held > QUOTA_WATCHES {
            return Err(XsError::TooBig);
        }
        let prefix_len = if relative { caller.home().len() + 1 } else { 0 };
        let event = event_frame(node.get(prefix_len..).unwrap_or(&node), &token);
        conn.watches.push(Watch {
            node,
            token,
            prefix_len,
        });
        Ok((b"OK\0".to_vec(), After::WatchEvent(event)))
    }

    fn unwatch(&mut self, id: u64, p: &[u8]) -> Result<(), XsError> {
        let [path, token] = args::<2>(p)?;
        let caller = self.conns.get(&id).ok_or(XsError::RemoteIo)?.caller;
        let node = View::new(&mut self.store, None, caller).canonicalize(path, true)?;
        let conn = self.conns.get_mut(&id).ok_or(XsError::RemoteIo)?;
        let before = conn.watches.len();
        conn.watches
            .retain(|w| !(w.node == node && w.token.as_bytes() == token));
        if conn.watches.len() == before {
            return Err(XsError::NotFound);
        }
        Ok(())
    }
}

/// The operations on nodes, in or out of a transaction.
fn node_op(
    view: &mut View<'_>,
    ty: MsgType,
    p: &[u8],
    fires: &mut Vec<Fire>,
) -> Result<(Vec<u8>, After), XsError> {
    let ack = Ok((b"OK\0".to_vec(), After::Nothing));
    let reply = match ty {
        MsgType::Read => view.read(&view.canonicalize(one_arg(p)?, false)?)?,
        MsgType::Directory => view.directory(&view.canonicalize(one_arg(p)?, false)?)?,
        MsgType::DirectoryPart => {
            let [path, off] = args::<2>(p)?;
            let off = std::str::from_utf8(off)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or(XsError::Invalid)?;
            view.directory_part(&view.canonicalize(path, false)?, off)?
        }
        MsgType::GetPerms => {
            let perms = view.get_perms(&view.canonicalize(one_arg(p)?, true)?)?;
            perms
                .iter()
                .flat_map(|p| p.to_string().into_bytes().into_iter().chain([0]))
                .collect()
        }
        MsgType::Write => {
            let nul = p.iter().position(|&b| b == 0).ok_or(XsError::Invalid)?;
            let name = view.canonicalize(&p[..nul], false)?;
            view.write(&name, &p[nul + 1..], fires)?;
            return ack;
        }
        MsgType::Mkdir => {
            view.mkdir(&view.canonicalize(one_arg(p)?, false)?, fires)?;
            return ack;
        }
        MsgType::Rm => {
            view.rm(&view.canonicalize(one_arg(p)?, false)?, fires)?;
            return ack;
        }
        MsgType::SetPerms => {
            let strings = wire::split_strings(p);
            if p.last() != Some(&0) || strings.len() < 2 {
                return Err(XsError::Invalid);
            }
            let perms = strings[1..]
                .iter()
                .map(|s| Perm::parse(s))
                .collect::<Result<Vec<_>, _>>()?;
            view.set_perms(&view.canonicalize(strings[0], true)?, perms, fires)?;
            return ack;
        }
        _ => return Err(XsError::Invalid),
    };
    Ok((reply, After::Nothing))
}

fn event_frame(path: &str, token: &str) -> Vec<u8> {
    let mut payload = wire::nul_terminated(path.as_bytes());
    payload.extend_from_slice(&wire::nul_terminated(token.as_bytes()));
    wire::encode(MsgType::WatchEvent as u32, 0, 0, &payload)
}

fn errno_payload(e: &XsError) -> Vec<u8> {
    // Local-only errors never come out of the store; EINVAL is xenstored's fallback too.
    wire::nul_terminated(e.errno_name().unwrap_or("EINVAL").as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argument_parsing() {
        assert_eq!(one_arg(b"/a\0").unwrap(), b"/a");
        assert!(one_arg(b"/a").is_err());
        assert!(one_arg(b"/a\0b\0").is_err());
        assert!(one_arg(b"").is_err());
        assert_eq!(args::<2>(b"/a\0tok\0").unwrap(), [&b"/a"[..], &b"tok"[..]]);
        assert!(args::<2>(b"/a\0").is_err());
        assert!(args::<2>(b"/a\0b\0c\0").is_err());
        assert!(is_child("/a/b", "/a") && is_child("/a", "/a") && is_child("/x", "/"));
        assert!(!is_child("/ab", "/a"));
        assert_eq!(parse_domid(b"12").unwrap(), 12);
        assert!(parse_domid(b"65536").is_err() && parse_domid(b"x").is_err());
    }
}
