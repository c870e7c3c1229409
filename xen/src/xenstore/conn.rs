//! One connection to xenstored: requests from any thread, replies matched by request id, watch
//! events queued behind an eventfd. A reader thread owns the receiving side.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
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

type Reply = Result<Message, XsError>;

/// State shared with the reader thread.
#[derive(Debug)]
struct Shared {
    /// Waiting requests by id; `None` once the connection is closed (no new waiters).
    pending: Mutex<Option<HashMap<u32, SyncSender<Reply>>>>,
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
            for (_, tx) in pending {
                let _ = tx.try_send(Err(XsError::Closed));
            }
        }
    }

    fn dispatch(&self, msg: Message) {
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
            Some(tx) => {
                let _ = tx.try_send(Ok(msg));
            }
            None => tracing::warn!(
                req_id = msg.req_id,
                ty = msg.ty,
                "xenstore: reply to no request ignored"
            ),
        }
    }
}

/// A live connection. Dropping it stops and joins the reader thread.
#[derive(Debug)]
pub(super) struct Connection {
    fd: Arc<OwnedFd>,
    write_lock: Mutex<()>,
    shared: Arc<Shared>,
    next_req: AtomicU32,
    transport: Transport,
    stop_efd: Arc<OwnedFd>,
    reader: Option<JoinHandle<()>>,
}

impl Connection {
    pub(super) fn new(fd: OwnedFd, transport: Transport) -> Result<Self, XsError> {
        let flags = EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK;
        let shared = Arc::new(Shared {
            pending: Mutex::new(Some(HashMap::new())),
            watch: Mutex::new(WatchQueue::default()),
            watch_cv: Condvar::new(),
            watch_efd: eventfd(0, flags).map_err(std::io::Error::from)?,
        });
        let stop_efd = Arc::new(eventfd(0, flags).map_err(std::io::Error::from)?);
        let fd = Arc::new(fd);
        let reader = {
            let (shared, fd, stop) = (Arc::clone(&shared), Arc::clone(&fd), Arc::clone(&stop_efd));
            std::thread::Builder::new()
                .name("xenstore-reader".into())
                .spawn(move || reader_loop(&shared, &fd, &stop))?
        };
        Ok(Self {
            fd,
            write_lock: Mutex::new(()),
            shared,
            next_req: AtomicU32::new(1),
            transport,
            stop_efd,
            reader: Some(reader),
        })
    }

    pub(super) fn transport(&self) -> Transport {
        self.transport
    }

    /// Sends one request and waits for its reply; an `XS_ERROR` reply becomes its typed error.
    pub(super) fn request(
        &self,
        ty: MsgType,
        tx_id: u32,
        payload: &[u8],
    ) -> Result<Vec<u8>, XsError> {
        let max = self.transport.payload_max();
        if payload.len() > max {
            return Err(XsError::PayloadTooLarge {
                len: payload.len(),
                max,
            });
        }
        let req_id = self.next_req.fetch_add(1, Ordering::Relaxed);
        let rx = self.register(req_id)?;
        let frame = wire::encode(ty as u32, req_id, tx_id, payload);
        if let Err(e) = self.write_frame(&frame) {
            if let Some(p) = lock(&self.shared.pending).as_mut() {
                p.remove(&req_id);
            }
            return Err(e);
        }
        let reply = rx.recv().map_err(|_| XsError::Closed)??;
        match reply.msg_type() {
            Some(t) if t == ty => Ok(reply.payload),
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

    fn register(&self, req_id: u32) -> Result<Receiver<Reply>, XsError> {
        let (tx, rx) = sync_channel(1);
        match lock(&self.shared.pending).as_mut() {
            Some(p) => {
                p.insert(req_id, tx);
                Ok(rx)
            }
            None => Err(XsError::Closed),
        }
    }

    fn write_frame(&self, frame: &[u8]) -> Result<(), XsError> {
        let _guard = lock(&self.write_lock);
        let mut rest = frame;
        while !rest.is_empty() {
            // On the socket, MSG_NOSIGNAL: a closed xenstored must be an error, not a SIGPIPE.
            let sent = match self.transport {
                Transport::Socket => rustix::net::send(&*self.fd, rest, SendFlags::NOSIGNAL),
                Transport::XenbusDevice => rustix::io::write(&*self.fd, rest),
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
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

/// Reads messages until EOF, an I/O error, a protocol error or the stop signal, then closes
/// the shared state so every waiter learns of it.
fn reader_loop(shared: &Shared, fd: &OwnedFd, stop: &OwnedFd) {
    let mut frames = FrameReader::new(wire::PAYLOAD_MAX);
    let mut buf = vec![0u8; wire::HEADER_LEN + wire::PAYLOAD_MAX];
    loop {
        let mut fds = [
            PollFd::new(fd, PollFlags::IN),
            PollFd::new(stop, PollFlags::IN),
        ];
        match poll(&mut fds, None) {
            Ok(_) => {}
            Err(Errno::INTR) => continue,
            Err(e) => {
                tracing::warn!("xenstore: poll failed: {e}");
                break;
            }
        }
        if !fds[1].revents().is_empty() {
            break;
        }
        if fds[0].revents().is_empty() {
            continue;
        }
        match rustix::io::read(fd, &mut buf) {
            Ok(0) => {
                if frames.has_partial() {
                    tracing::warn!("xenstore: connection closed in the middle of a message");
                }
                break;
            }
            Ok(n) => frames.push(&buf[..n]),
            Err(Errno::INTR | Errno::AGAIN) => continue,
            Err(e) => {
                tracing::warn!("xenstore: read failed: {e}");
                break;
            }
        }
        loop {
            match frames.next_message() {
                Ok(Some(msg)) => shared.dispatch(msg),
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!("xenstore: {e}; dropping the connection");
                    shared.close();
                    return;
                }
            }
        }
    }
    shared.close();
}
