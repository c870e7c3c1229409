//! One connection to xenstored: requests from any thread, replies matched by request id, watch
//! events queued behind an eventfd. A reader thread owns the receiving side.
//!
//! The reader can be replaced by a new one started from another thread
//! ([`Connection::restart_reader`]): on Linux, credentials, capabilities and the Landlock
//! domain belong to each thread and are inherited only by the threads it starts later, so a
//! process that confines itself after connecting restarts the reader from its confined
//! thread. The old reader stops between two reads: every byte it took from the connection is
//! either dispatched already or, for a message received in part, handed to its successor.
//!
//! # xenstored restarting
//! A connection opened with a [`Redial`] outlives xenstored (a restart, or a live update that
//! drops socket connections): when the reader sees the end of the connection (EOF, or a read
//! error, as `/dev/xen/xenbus` may give), it dials again ([`Dial`]: the same path, or through
//! a helper for a process that may not connect itself), pausing longer each time, for up to
//! [`Redial::within`]. On the new connection it first registers every watch
//! again, with its token (each fires once, as on any registration, so callers re-read what
//! they watch), then sends again every request still waiting for a reply; requests made
//! meanwhile wait. Transaction ids die with the connection: a request of a transaction in
//! flight, and any later use of a transaction begun before, fails with [`XsError::Again`],
//! which [`super::XenStore::transaction`] retries (a commit lost in flight may have been
//! applied; transactions are written to be run again anyway). The other requests are
//! idempotent when sent again (a read, a write of the same value, mkdir, a watch), except an
//! `rm` that was done before the loss, which then answers `ENOENT`. With no connection back
//! within the bound, the connection closes as it does without a redial: every request fails
//! with [`XsError::Closed`]. A protocol violation closes it at once: a xenstored that sends
//! garbage is not retried.

use std::collections::{HashMap, VecDeque};
use std::fs::OpenOptions;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::event::{eventfd, poll, EventfdFlags, PollFd, PollFlags};
use rustix::io::Errno;
use rustix::net::SendFlags;

use super::wire::{self, FrameReader, Message, MsgType};
use super::{WatchEvent, XsError};

/// Which kind of file the connection is; they differ in small ways that matter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// xenstored's unix socket: payloads up to 4096 bytes.
    Socket,
    /// `/dev/xen/xenbus`: payloads up to 4080 bytes; the kernel forwards watch events with
    /// whatever request id it had, so events are told apart by type only (done for both).
    XenbusDevice,
}

impl Transport {
    /// The largest request payload this transport carries.
    pub fn payload_max(self) -> usize {
        match self {
            Self::Socket => wire::PAYLOAD_MAX,
            Self::XenbusDevice => wire::XENBUS_DEV_PAYLOAD_MAX,
        }
    }
}

/// Opens `path`: a character device is `/dev/xen/xenbus`, anything else xenstored's socket.
pub(super) fn dial(path: &Path) -> std::io::Result<(OwnedFd, Transport)> {
    if std::fs::metadata(path)?.file_type().is_char_device() {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        Ok((file.into(), Transport::XenbusDevice))
    } else {
        Ok((UnixStream::connect(path)?.into(), Transport::Socket))
    }
}

/// How a connection opened with [`super::XenStore::open_reconnecting`] connects again: by
/// path (a [`PathBuf`]) for a process that may connect, or through a helper that passes the
/// connection over for one that may not (a confined `blkbackd serve`).
pub trait Dial: Send + Sync + std::fmt::Debug + 'static {
    /// A new connection to xenstored, and its kind.
    ///
    /// # Errors
    /// Why there is none (yet): the caller tries again until its bound.
    fn dial(&self) -> std::io::Result<(OwnedFd, Transport)>;
}

impl Dial for PathBuf {
    fn dial(&self) -> std::io::Result<(OwnedFd, Transport)> {
        dial(self)
    }
}

/// How to connect again when xenstored ends the connection, and for how long to try.
#[derive(Debug)]
pub(super) struct Redial {
    pub(super) dial: Box<dyn Dial>,
    pub(super) within: Duration,
}

/// The first pause between two attempts to reconnect; it doubles up to [`REDIAL_PAUSE_MAX`].
const REDIAL_PAUSE_FIRST: Duration = Duration::from_millis(10);
const REDIAL_PAUSE_MAX: Duration = Duration::from_secs(1);

/// A reply and the generation of the connection it came on.
type Reply = Result<(Message, u64), XsError>;

/// Who waits for the reply to a request.
#[derive(Debug)]
enum Waiter {
    /// A caller; the frame is kept to be sent again on a new connection, unless it names a
    /// transaction (`in_tx`: failed with `EAGAIN` instead).
    Caller {
        reply: SyncSender<Reply>,
        frame: Vec<u8>,
        in_tx: bool,
    },
    /// The registration of this watch path again after a reconnect: a failure is logged.
    Rewatch(String),
}

/// The connection in use, replaced by a reconnect. Its lock also keeps writes whole.
#[derive(Debug)]
struct Link {
    fd: Arc<OwnedFd>,
    /// The number of reconnects so far: a transaction begun on an older connection is gone.
    generation: u64,
    /// False from the loss of the connection until a new one is up: requests wait.
    up: bool,
    /// The watches (path, token) xenstored confirmed, to register again after a reconnect.
    watches: Vec<(String, String)>,
}

/// State shared with the reader thread.
#[derive(Debug)]
struct Shared {
    /// Waiting requests by id; `None` once the connection is closed (no new waiters).
    pending: Mutex<Option<HashMap<u32, Waiter>>>,
    /// Taken before `pending` when both are.
    link: Mutex<Link>,
    next_req: AtomicU32,
    transport: Transport,
    redial: Option<Redial>,
    watch: Mutex<WatchQueue>,
    watch_cv: Condvar,
    /// Readable while watch events are queued or the connection is closed.
    watch_efd: OwnedFd,
}

#[derive(Debug, Default)]
struct WatchQueue {
    events: VecDeque<WatchEvent>,
    closed: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding these locks leaves consistent data (single push/pop/insert), so
    // carrying on is safe.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn efd_signal(fd: &OwnedFd) {
    // Only fails when the counter would overflow, which needs 2^64-1 unread signals.
    let _ = rustix::io::write(fd, &1u64.to_ne_bytes());
}

fn efd_drain(fd: &OwnedFd) {
    let mut b = [0u8; 8];
    // EAGAIN when already drained: nothing to do.
    let _ = rustix::io::read(fd, &mut b);
}

/// How a reconnect ended.
enum Redialled {
    /// On a new connection of this generation.
    Up(Arc<OwnedFd>, u64),
    /// The reader was asked to stop; the link stays down for its successor to redial.
    Stopped,
    /// Given up (or no redial): the shared state is closed.
    Closed,
}

impl Shared {
    fn push_event(&self, ev: WatchEvent) {
        let mut q = lock(&self.watch);
        q.events.push_back(ev);
        efd_signal(&self.watch_efd);
        self.watch_cv.notify_all();
    }

    fn pop_event(&self, q: &mut WatchQueue) -> Option<WatchEvent> {
        let ev = q.events.pop_front();
        if q.events.is_empty() && !q.closed {
            efd_drain(&self.watch_efd);
        }
        ev
    }

    /// Marks the connection closed (first, so `is_closed` holds for anyone woken), then
    /// fails every pending request.
    fn close(&self) {
        {
            let mut q = lock(&self.watch);
            q.closed = true;
            efd_signal(&self.watch_efd);
            self.watch_cv.notify_all();
        }
        if let Some(pending) = lock(&self.pending).take() {
            for waiter in pending.into_values() {
                if let Waiter::Caller { reply, .. } = waiter {
                    let _ = reply.try_send(Err(XsError::Closed));
                }
            }
        }
    }

    fn dispatch(&self, msg: Message, generation: u64) {
        if msg.msg_type() == Some(MsgType::WatchEvent) {
            let mut parts = wire::split_strings(&msg.payload).into_iter();
            match (parts.next(), parts.next()) {
                (Some(path), Some(token)) => self.push_event(WatchEvent {
                    path: String::from_utf8_lossy(path).into_owned(),
                    token: String::from_utf8_lossy(token).into_owned(),
                }),
                _ => tracing::warn!("xenstore: malformed watch event ignored"),
            }
            return;
        }
        let waiter = lock(&self.pending)
            .as_mut()
            .and_then(|p| p.remove(&msg.req_id));
        match waiter {
            Some(Waiter::Caller { reply, .. }) => {
                let _ = reply.try_send(Ok((msg, generation)));
            }
            Some(Waiter::Rewatch(path)) => {
                if msg.msg_type() != Some(MsgType::Watch) {
                    let why = String::from_utf8_lossy(wire::strip_nul(&msg.payload));
                    tracing::error!(path, "xenstore: registering a watch again failed: {why}");
                }
            }
            None => tracing::warn!(
                req_id = msg.req_id,
                ty = msg.ty,
                "xenstore: reply to no request ignored"
            ),
        }
    }

    /// After the connection ended (`why`): dials again when configured (see the module),
    /// closes the shared state otherwise or when the bound passes.
    fn reconnect(&self, stop: &OwnedFd, why: &str) -> Redialled {
        let Some(redial) = &self.redial else {
            tracing::debug!("xenstore: connection ended ({why})");
            self.close();
            return Redialled::Closed;
        };
        tracing::warn!(
            dial = ?redial.dial,
            "xenstore: connection lost ({why}); reconnecting"
        );
        lock(&self.link).up = false;
        self.drop_stale();
        let started = Instant::now();
        let mut pause = REDIAL_PAUSE_FIRST;
        let last = loop {
            let e = match redial.dial.dial() {
                Ok((fd, transport)) if transport == self.transport => {
                    return self.resume(Arc::new(fd))
                }
                // Writes differ by kind (and the payload limit was checked for this one).
                Ok((_, transport)) => std::io::Error::other(format!(
                    "the path is now a {transport:?}, not a {:?}",
                    self.transport
                )),
                Err(e) => e,
            };
            let left = redial.within.saturating_sub(started.elapsed());
            if left.is_zero() {
                break e;
            }
            if stop_within(stop, pause.min(left)) {
                return Redialled::Stopped;
            }
            pause = (pause * 2).min(REDIAL_PAUSE_MAX);
        };
        tracing::error!(
            dial = ?redial.dial,
            "xenstore: no connection within {:?} (last attempt: {last}); giving up",
            redial.within
        );
        self.close();
        Redialled::Closed
    }

    /// Drops the waiters tied to the lost connection: requests of a transaction fail with
    /// `EAGAIN`; registrations of watches are redone from the list anyway.
    fn drop_stale(&self) {
        let mut pending = lock(&self.pending);
        let Some(p) = pending.as_mut() else {
            return;
        };
        p.retain(|_, waiter| match waiter {
            Waiter::Caller {
                reply, in_tx: true, ..
            } => {
                let _ = reply.try_send(Err(XsError::Again));
                false
            }
            Waiter::Caller { .. } => true,
            Waiter::Rewatch(_) => false,
        });
    }

    /// Switches to a new connection: every watch registered again, then every waiting
    /// request sent again.
    fn resume(&self, fd: Arc<OwnedFd>) -> Redialled {
        let mut link = lock(&self.link);
        link.fd = Arc::clone(&fd);
        link.generation += 1;
        link.up = true;
        let mut frames = Vec::new();
        {
            let mut pending = lock(&self.pending);
            let Some(p) = pending.as_mut() else {
                return Redialled::Closed;
            };
            let resent: Vec<Vec<u8>> = p
                .values()
                .filter_map(|w| match w {
                    Waiter::Caller { frame, .. } => Some(frame.clone()),
                    Waiter::Rewatch(_) => None,
                })
                .collect();
            for (path, token) in &link.watches {
                let req_id = self.next_req.fetch_add(1, Ordering::Relaxed);
                let mut payload = wire::nul_terminated(path.as_bytes());
                payload.extend_from_slice(&wire::nul_terminated(token.as_bytes()));
                frames.push(wire::encode(MsgType::Watch as u32, req_id, 0, &payload));
                p.insert(req_id, Waiter::Rewatch(path.clone()));
            }
            frames.extend(resent);
        }
        tracing::info!(
            reconnects = link.generation,
            watches = link.watches.len(),
            requests = frames.len() - link.watches.len(),
            "xenstore: reconnected; watches registered again, waiting requests sent again"
        );
        for frame in &frames {
            if let Err(e) = write_frame(&fd, self.transport, frame) {
                // The reader will see this connection end too, and start over.
                tracing::warn!("xenstore: writing on the new connection: {e}");
                break;
            }
        }
        Redialled::Up(fd, link.generation)
    }
}

/// Waits up to `pause`; true when the stop eventfd was signalled meanwhile.
fn stop_within(stop: &OwnedFd, pause: Duration) -> bool {
    let timeout = rustix::time::Timespec {
        tv_sec: i64::try_from(pause.as_secs()).unwrap_or(i64::MAX),
        tv_nsec: i64::from(pause.subsec_nanos()),
    };
    let mut fds = [PollFd::new(stop, PollFlags::IN)];
    // EINTR: a shorter pause, which only means an earlier attempt.
    let _ = poll(&mut fds, Some(&timeout));
    !fds[0].revents().is_empty()
}

/// How a reader thread ended: asked to stop, with the bytes of a message received in part, or
/// because the connection ended (the shared state is closed).
type ReaderEnd = Option<FrameReader>;

/// A live connection. Dropping it stops and joins the reader thread.
#[derive(Debug)]
pub(super) struct Connection {
    shared: Arc<Shared>,
    /// Signalled to stop the reader (by a restart or the drop).
    stop_efd: Arc<OwnedFd>,
    /// The reader thread; `None` once it could not be restarted (the connection is closed).
    reader: Mutex<Option<JoinHandle<ReaderEnd>>>,
}

impl Connection {
    /// A connection on `fd`; with `redial`, it reconnects when xenstored goes away (see the
    /// module).
    pub(super) fn new(
        fd: OwnedFd,
        transport: Transport,
        redial: Option<Redial>,
    ) -> Result<Self, XsError> {
        let flags = EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK;
        let shared = Arc::new(Shared {
            pending: Mutex::new(Some(HashMap::new())),
            link: Mutex::new(Link {
                fd: Arc::new(fd),
                generation: 0,
                up: true,
                watches: Vec::new(),
            }),
            next_req: AtomicU32::new(1),
            transport,
            redial,
            watch: Mutex::new(WatchQueue::default()),
            watch_cv: Condvar::new(),
            watch_efd: eventfd(0, flags).map_err(std::io::Error::from)?,
        });
        let stop_efd = Arc::new(eventfd(0, flags).map_err(std::io::Error::from)?);
        let reader = spawn_reader(&shared, &stop_efd, FrameReader::new(wire::PAYLOAD_MAX))?;
        Ok(Self {
            shared,
            stop_efd,
            reader: Mutex::new(Some(reader)),
        })
    }

    /// Stops the reader thread and starts a new one from the calling thread, which carries on
    /// where the old one stopped (see the module). Requests and watch events keep flowing:
    /// what arrives meanwhile waits in the connection, and the waiters stay registered.
    ///
    /// On return no thread started before this call reads the connection any more. When the
    /// connection had already ended there is nothing to restart: `Ok`, and the connection
    /// stays closed as before.
    ///
    /// # Errors
    /// [`XsError::Io`] when the new thread cannot be started, [`XsError::Protocol`] when the
    /// old one had panicked; the connection is then closed (every waiter is told), as no
    /// thread reads it any more.
    pub(super) fn restart_reader(&self) -> Result<(), XsError> {
        let mut reader = lock(&self.reader);
        let Some(old) = reader.take() else {
            return Ok(());
        };
        efd_signal(&self.stop_efd);
        let end = old.join();
        // Only this function (under the lock) and the drop signal it: back to unsignalled.
        efd_drain(&self.stop_efd);
        let frames = match end {
            Ok(Some(frames)) => frames,
            Ok(None) => return Ok(()),
            Err(_) => {
                self.shared.close();
                return Err(XsError::Protocol(
                    "the XenStore reader thread panicked".into(),
                ));
            }
        };
        match spawn_reader(&self.shared, &self.stop_efd, frames) {
            Ok(new) => {
                *reader = Some(new);
                Ok(())
            }
            Err(e) => {
                self.shared.close();
                Err(e)
            }
        }
    }

    pub(super) fn transport(&self) -> Transport {
        self.shared.transport
    }

    /// Sends one request and waits for its reply; an `XS_ERROR` reply becomes its typed error.
    /// `tx` is the transaction's id and the generation it was begun on, if any. Returns the
    /// payload and the generation of the connection that answered.
    pub(super) fn request(
        &self,
        ty: MsgType,
        tx: Option<(u32, u64)>,
        payload: &[u8],
    ) -> Result<(Vec<u8>, u64), XsError> {
        let max = self.shared.transport.payload_max();
        if payload.len() > max {
            return Err(XsError::PayloadTooLarge {
                len: payload.len(),
                max,
            });
        }
        let req_id = self.shared.next_req.fetch_add(1, Ordering::Relaxed);
        let frame = wire::encode(ty as u32, req_id, tx.map_or(0, |(id, _)| id), payload);
        let (reply, rx) = sync_channel(1);
        {
            let link = lock(&self.shared.link);
            // A transaction cannot outlive its connection, nor wait for a new one.
            if tx.is_some_and(|(_, generation)| !link.up || generation != link.generation) {
                return Err(XsError::Again);
            }
            lock(&self.shared.pending)
                .as_mut()
                .ok_or(XsError::Closed)?
                .insert(
                    req_id,
                    Waiter::Caller {
                        reply,
                        frame: frame.clone(),
                        in_tx: tx.is_some(),
                    },
                );
            if link.up {
                match write_frame(&link.fd, self.shared.transport, &frame) {
                    // The reader sees the end too: it sends the request again or fails it.
                    Ok(()) | Err(XsError::Closed) => {}
                    Err(e) => {
                        if let Some(p) = lock(&self.shared.pending).as_mut() {
                            p.remove(&req_id);
                        }
                        return Err(e);
                    }
                }
            }
        }
        let (reply, generation) = rx.recv().map_err(|_| XsError::Closed)??;
        match reply.msg_type() {
            Some(t) if t == ty => Ok((reply.payload, generation)),
            Some(MsgType::Error) => {
                let name = wire::strip_nul(&reply.payload);
                Err(XsError::from_errno_name(&String::from_utf8_lossy(name)))
            }
            _ => Err(XsError::Protocol(format!(
                "reply of type {} to a request of type {ty:?}",
                reply.ty
            ))),
        }
    }

    /// The number of reconnects so far.
    fn generation(&self) -> u64 {
        lock(&self.shared.link).generation
    }

    /// Registers a watch (`payload` is `path\0token\0`) and remembers it for reconnects.
    pub(super) fn watch(&self, path: &str, token: &str, payload: &[u8]) -> Result<(), XsError> {
        loop {
            let (_, generation) = self.request(MsgType::Watch, None, payload)?;
            let mut link = lock(&self.shared.link);
            if link.generation == generation {
                link.watches.push((path.to_owned(), token.to_owned()));
                return Ok(());
            }
            // A reconnect registered the watches again before this one was known: register
            // it on the new connection too.
        }
    }

    /// Removes a watch (`payload` as for [`Connection::watch`]) and forgets it.
    pub(super) fn unwatch(&self, path: &str, token: &str, payload: &[u8]) -> Result<(), XsError> {
        let generation = {
            let mut link = lock(&self.shared.link);
            link.watches.retain(|(p, t)| !(p == path && t == token));
            link.generation
        };
        match self.request(MsgType::Unwatch, None, payload) {
            // Forgotten before a reconnect: the new connection never had it.
            Err(XsError::NotFound) if self.generation() != generation => Ok(()),
            other => other.map(drop),
        }
    }

    pub(super) fn watch_fd(&self) -> BorrowedFd<'_> {
        self.shared.watch_efd.as_fd()
    }

    pub(super) fn is_closed(&self) -> bool {
        lock(&self.shared.watch).closed
    }

    pub(super) fn next_watch_event(&self) -> Option<WatchEvent> {
        let mut q = lock(&self.shared.watch);
        self.shared.pop_event(&mut q)
    }

    pub(super) fn wait_watch_event(
        &self,
        timeout: Option<Duration>,
    ) -> Result<Option<WatchEvent>, XsError> {
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        let mut q = lock(&self.shared.watch);
        loop {
            if let Some(ev) = self.shared.pop_event(&mut q) {
                return Ok(Some(ev));
            }
            if q.closed {
                return Err(XsError::Closed);
            }
            q = match (timeout, deadline) {
                (Some(_), Some(deadline)) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Ok(None);
                    }
                    self.shared
                        .watch_cv
                        .wait_timeout(q, left)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
                // No timeout, or one too long to represent: wait for good.
                _ => self
                    .shared
                    .watch_cv
                    .wait(q)
                    .unwrap_or_else(PoisonError::into_inner),
            };
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        efd_signal(&self.stop_efd);
        let reader = self
            .reader
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(reader) = reader {
            let _ = reader.join();
        }
        self.shared.close();
    }
}

fn write_frame(fd: &OwnedFd, transport: Transport, frame: &[u8]) -> Result<(), XsError> {
    let mut rest = frame;
    while !rest.is_empty() {
        // On the socket, MSG_NOSIGNAL: a closed xenstored must be an error, not a SIGPIPE.
        let sent = match transport {
            Transport::Socket => rustix::net::send(fd, rest, SendFlags::NOSIGNAL),
            Transport::XenbusDevice => rustix::io::write(fd, rest),
        };
        match sent {
            Ok(0) => return Err(XsError::Closed),
            Ok(n) => rest = &rest[n..],
            Err(Errno::INTR) => {}
            Err(Errno::PIPE | Errno::CONNRESET) => return Err(XsError::Closed),
            Err(e) => return Err(XsError::Io(e.into())),
        }
    }
    Ok(())
}

/// Starts a reader thread that continues from `frames` (what its predecessor had received of
/// a message).
fn spawn_reader(
    shared: &Arc<Shared>,
    stop: &Arc<OwnedFd>,
    frames: FrameReader,
) -> Result<JoinHandle<ReaderEnd>, XsError> {
    let (shared, stop) = (Arc::clone(shared), Arc::clone(stop));
    Ok(std::thread::Builder::new()
        .name("xenstore-reader".into())
        .spawn(move || reader_loop(&shared, &stop, frames))?)
}

/// Reads messages until the stop signal, or the connection's end when it cannot be replaced
/// (see the module), or a protocol error. On the stop signal returns what it had received of
/// the next message (nothing of it is dispatched); otherwise closes the shared state so every
/// waiter learns of it, and returns `None`. The stop signal is only looked at between two
/// reads, after every complete message read so far has been dispatched.
fn reader_loop(shared: &Shared, stop: &OwnedFd, mut frames: FrameReader) -> ReaderEnd {
    let (mut fd, mut generation) = {
        let link = lock(&shared.link);
        (Arc::clone(&link.fd), link.generation)
    };
    let mut buf = vec![0u8; wire::HEADER_LEN + wire::PAYLOAD_MAX];
    loop {
        let mut fds = [
            PollFd::new(&*fd, PollFlags::IN),
            PollFd::new(stop, PollFlags::IN),
        ];
        match poll(&mut fds, None) {
            Ok(_) => {}
            Err(Errno::INTR) => continue,
            Err(e) => {
                tracing::warn!("xenstore: poll failed: {e}");
                shared.close();
                return None;
            }
        }
        if !fds[1].revents().is_empty() {
            return Some(frames);
        }
        if fds[0].revents().is_empty() {
            continue;
        }
        let why = match rustix::io::read(&*fd, &mut buf) {
            Ok(0) => "EOF".to_owned(),
            Ok(n) => {
                frames.push(&buf[..n]);
                loop {
                    match frames.next_message() {
                        Ok(Some(msg)) => shared.dispatch(msg, generation),
                        Ok(None) => break,
                        Err(e) => {
                            tracing::warn!("xenstore: {e}; dropping the connection");
                            shared.close();
                            return None;
                        }
                    }
                }
                continue;
            }
            Err(Errno::INTR | Errno::AGAIN) => continue,
            Err(e) => e.to_string(),
        };
        if frames.has_partial() {
            tracing::warn!("xenstore: connection ended in the middle of a message");
        }
        match shared.reconnect(stop, &why) {
            Redialled::Up(new_fd, new_generation) => {
                (fd, generation) = (new_fd, new_generation);
                frames = FrameReader::new(wire::PAYLOAD_MAX);
            }
            Redialled::Stopped => return Some(FrameReader::new(wire::PAYLOAD_MAX)),
            Redialled::Closed => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::net::{UnixListener, UnixStream};

    use super::*;

    fn connection() -> (Connection, UnixStream) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        (
            Connection::new(ours.into(), Transport::Socket, None).unwrap(),
            theirs,
        )
    }

    fn event_frame(i: usize) -> Vec<u8> {
        let payload = format!("/local/domain/1/node{i}\0token{i}\0");
        wire::encode(MsgType::WatchEvent as u32, 0, 0, payload.as_bytes())
    }

    fn event(i: usize) -> WatchEvent {
        WatchEvent {
            path: format!("/local/domain/1/node{i}"),
            token: format!("token{i}"),
        }
    }

    fn reader_id(conn: &Connection) -> std::thread::ThreadId {
        lock(&conn.reader).as_ref().unwrap().thread().id()
    }

    const WAIT: Option<Duration> = Some(Duration::from_secs(10));

    #[test]
    fn a_restart_keeps_a_message_received_in_part_and_a_pending_request() {
        let (conn, mut xenstored) = connection();
        // One event whole and the first half of the next, in one write: the old reader takes
        // both at once.
        let (first, second) = (event_frame(1), event_frame(2));
        let (head, tail) = second.split_at(second.len() / 2);
        xenstored.write_all(&[&first[..], head].concat()).unwrap();
        assert_eq!(conn.wait_watch_event(WAIT).unwrap(), Some(event(1)));
        // A request waits for its reply across the restart.
        std::thread::scope(|s| {
            let request = s.spawn(|| conn.request(MsgType::Read, None, b"/a\0"));
            let mut header = [0u8; wire::HEADER_LEN + 3];
            xenstored.read_exact(&mut header).unwrap();
            let req_id = u32::from_ne_bytes(header[4..8].try_into().unwrap());
            let before = reader_id(&conn);
            conn.restart_reader().unwrap();
            assert_ne!(
                reader_id(&conn),
                before,
                "the reader thread was not replaced"
            );
            xenstored.write_all(tail).unwrap();
            let reply = wire::encode(MsgType::Read as u32, req_id, 0, b"value");
            xenstored.write_all(&reply).unwrap();
            assert_eq!(request.join().unwrap().unwrap().0, b"value");
        });
        assert_eq!(conn.wait_watch_event(WAIT).unwrap(), Some(event(2)));
        assert_eq!(conn.next_watch_event(), None);
        assert!(!conn.is_closed());
    }

    #[test]
    fn events_streamed_across_many_restarts_arrive_once_and_in_order() {
        const EVENTS: usize = 400;
        let (conn, mut xenstored) = connection();
        let stream: Vec<u8> = (0..EVENTS).flat_map(event_frame).collect();
        std::thread::scope(|s| {
            let writer = s.spawn(move || {
                // Odd-sized pieces: most restarts fall in the middle of a message.
                for piece in stream.chunks(7) {
                    xenstored.write_all(piece).unwrap();
                }
                xenstored
            });
            let mut got = Vec::new();
            while got.len() < EVENTS {
                conn.restart_reader().unwrap();
                while let Some(ev) = conn.next_watch_event() {
                    got.push(ev);
                }
                if got.len() < EVENTS {
                    match conn.wait_watch_event(WAIT).unwrap() {
                        Some(ev) => got.push(ev),
                        None => panic!("event {} never came", got.len()),
                    }
                }
            }
            assert_eq!(got, (0..EVENTS).map(event).collect::<Vec<_>>());
            drop(writer.join().unwrap());
        });
        assert_eq!(conn.next_watch_event(), None);
    }

    #[test]
    fn a_restart_after_the_connection_ended_leaves_it_closed() {
        let (conn, xenstored) = connection();
        drop(xenstored);
        assert!(matches!(conn.wait_watch_event(WAIT), Err(XsError::Closed)));
        conn.restart_reader().unwrap();
        assert!(conn.is_closed());
        assert!(matches!(
            conn.request(MsgType::Read, None, b"/a\0"),
            Err(XsError::Closed)
        ));
    }

    /// A listening socket at a fresh path, standing in for xenstored.
    fn xenstored_socket(tag: &str) -> (PathBuf, UnixListener) {
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "xs-conn-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        (path, listener)
    }

    fn redialling(path: &Path, within: Duration) -> Connection {
        let (fd, transport) = dial(path).unwrap();
        let redial = Redial {
            dial: Box::new(path.to_path_buf()),
            within,
        };
        Connection::new(fd, transport, Some(redial)).unwrap()
    }

    /// The next message the client sent.
    fn receive(xenstored: &mut UnixStream) -> Message {
        let mut header = [0u8; wire::HEADER_LEN];
        xenstored.read_exact(&mut header).unwrap();
        let field = |i: usize| u32::from_ne_bytes(header[i * 4..i * 4 + 4].try_into().unwrap());
        let mut payload = vec![0u8; field(3) as usize];
        xenstored.read_exact(&mut payload).unwrap();
        Message {
            ty: field(0),
            req_id: field(1),
            tx_id: field(2),
            payload,
        }
    }

    fn answer(xenstored: &mut UnixStream, request: &Message, payload: &[u8]) {
        let reply = wire::encode(request.ty, request.req_id, request.tx_id, payload);
        xenstored.write_all(&reply).unwrap();
    }

    #[test]
    fn after_xenstored_restarts_watches_come_back_first_then_requests_in_flight() {
        let (path, listener) = xenstored_socket("restart");
        let conn = redialling(&path, Duration::from_secs(10));
        let (mut first, _) = listener.accept().unwrap();
        std::thread::scope(|s| {
            let watch = s.spawn(|| conn.watch("/w", "tok", b"/w\0tok\0"));
            let request = receive(&mut first);
            assert_eq!(request.msg_type(), Some(MsgType::Watch));
            answer(&mut first, &request, b"OK\0");
            watch.join().unwrap().unwrap();

            // A plain read and a write in a transaction are in flight when xenstored goes.
            let read = s.spawn(|| conn.request(MsgType::Read, None, b"/a\0"));
            let in_tx = s.spawn(|| conn.request(MsgType::Write, Some((5, 0)), b"/b\0x"));
            let sent = [receive(&mut first), receive(&mut first)];
            let read_sent = sent.iter().find(|m| m.tx_id == 0).unwrap().clone();
            drop(first);
            assert!(matches!(in_tx.join().unwrap(), Err(XsError::Again)));

            let (mut second, _) = listener.accept().unwrap();
            let rewatch = receive(&mut second);
            assert_eq!(rewatch.msg_type(), Some(MsgType::Watch));
            assert_eq!(rewatch.payload, b"/w\0tok\0");
            answer(&mut second, &rewatch, b"OK\0");
            assert_eq!(
                receive(&mut second),
                read_sent,
                "the read was not sent again"
            );
            answer(&mut second, &read_sent, b"value");
            assert_eq!(read.join().unwrap().unwrap(), (b"value".to_vec(), 1));
        });
        // The transaction began on the lost connection: refused here, never sent.
        assert!(matches!(
            conn.request(MsgType::Read, Some((5, 0)), b"/b\0"),
            Err(XsError::Again)
        ));
        assert!(!conn.is_closed());
        drop(conn);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn xenstored_staying_away_past_the_bound_closes_the_connection() {
        let bound = Duration::from_millis(300);
        let (path, listener) = xenstored_socket("away");
        let conn = redialling(&path, bound);
        let (xenstored, _) = listener.accept().unwrap();
        drop(listener);
        std::fs::remove_file(&path).unwrap();
        let lost = Instant::now();
        drop(xenstored);
        assert!(matches!(
            conn.request(MsgType::Read, None, b"/a\0"),
            Err(XsError::Closed)
        ));
        let waited = lost.elapsed();
        assert!(
            waited >= bound && waited < Duration::from_secs(5),
            "gave up after {waited:?}"
        );
        assert!(conn.is_closed());
        assert!(matches!(conn.wait_watch_event(WAIT), Err(XsError::Closed)));
    }

    #[test]
    fn an_unwatch_in_flight_when_xenstored_restarts_is_not_undone() {
        let (path, listener) = xenstored_socket("unwatch");
        let conn = redialling(&path, Duration::from_secs(10));
        let (mut first, _) = listener.accept().unwrap();
        std::thread::scope(|s| {
            let watch = s.spawn(|| conn.watch("/w", "tok", b"/w\0tok\0"));
            let request = receive(&mut first);
            answer(&mut first, &request, b"OK\0");
            watch.join().unwrap().unwrap();

            let unwatch = s.spawn(|| conn.unwatch("/w", "tok", b"/w\0tok\0"));
            let sent = receive(&mut first);
            assert_eq!(sent.msg_type(), Some(MsgType::Unwatch));
            drop(first);
            // The watch is not registered again: the unwatch, sent again, comes first.
            let (mut second, _) = listener.accept().unwrap();
            assert_eq!(receive(&mut second), sent);
            // The new xenstored never had the watch.
            let enoent = wire::encode(MsgType::Error as u32, sent.req_id, 0, b"ENOENT\0");
            second.write_all(&enoent).unwrap();
            unwatch.join().unwrap().unwrap();
        });
        assert!(lock(&conn.shared.link).watches.is_empty());
        drop(conn);
        let _ = std::fs::remove_file(&path);
    }
}
