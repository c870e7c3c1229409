//! One connection to xenstored: requests from any thread, replies matched by request id, watch
//! events queued behind an eventfd. A reader thread owns the receiving side.
//!
//! The reader can be replaced by a new one started from another thread
//! ([`Connection::restart_reader`]): on Linux, credentials, capabilities and the Landlock
//! domain belong to each thread and are inherited only by the threads it starts later, so a
//! process that confines itself after connecting restarts the reader from its confined
//! thread. The old reader stops between two reads: every byte it took from the connection is
//! either dispatched already or, for a message received in part, handed to its successor.

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

/// How a reader thread ended: asked to stop, with the bytes of a message received in part, or
/// because the connection ended (the shared state is closed).
type ReaderEnd = Option<FrameReader>;

/// A live connection. Dropping it stops and joins the reader thread.
#[derive(Debug)]
pub(super) struct Connection {
    fd: Arc<OwnedFd>,
    write_lock: Mutex<()>,
    shared: Arc<Shared>,
    next_req: AtomicU32,
    transport: Transport,
    /// Signalled to stop the reader (by a restart or the drop).
    stop_efd: Arc<OwnedFd>,
    /// The reader thread; `None` once it could not be restarted (the connection is closed).
    reader: Mutex<Option<JoinHandle<ReaderEnd>>>,
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
        let reader = spawn_reader(&shared, &fd, &stop_efd, FrameReader::new(wire::PAYLOAD_MAX))?;
        Ok(Self {
            fd,
            write_lock: Mutex::new(()),
            shared,
            next_req: AtomicU32::new(1),
            transport,
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
        match spawn_reader(&self.shared, &self.fd, &self.stop_efd, frames) {
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

/// Starts a reader thread that continues from `frames` (what its predecessor had received of
/// a message).
fn spawn_reader(
    shared: &Arc<Shared>,
    fd: &Arc<OwnedFd>,
    stop: &Arc<OwnedFd>,
    frames: FrameReader,
) -> Result<JoinHandle<ReaderEnd>, XsError> {
    let (shared, fd, stop) = (Arc::clone(shared), Arc::clone(fd), Arc::clone(stop));
    Ok(std::thread::Builder::new()
        .name("xenstore-reader".into())
        .spawn(move || reader_loop(&shared, &fd, &stop, frames))?)
}

/// Reads messages until EOF, an I/O error, a protocol error or the stop signal. On the stop
/// signal returns what it had received of the next message (nothing of it is dispatched);
/// otherwise closes the shared state so every waiter learns of it, and returns `None`.
/// The stop signal is only looked at between two reads, after every complete message read
/// so far has been dispatched.
fn reader_loop(
    shared: &Shared,
    fd: &OwnedFd,
    stop: &OwnedFd,
    mut frames: FrameReader,
) -> ReaderEnd {
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
            return Some(frames);
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
                    return None;
                }
            }
        }
    }
    shared.close();
    None
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    use super::*;

    fn connection() -> (Connection, UnixStream) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        (
            Connection::new(ours.into(), Transport::Socket).unwrap(),
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
            let request = s.spawn(|| conn.request(MsgType::Read, 0, b"/a\0"));
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
            assert_eq!(request.join().unwrap().unwrap(), b"value");
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
            conn.request(MsgType::Read, 0, b"/a\0"),
            Err(XsError::Closed)
        ));
    }
}
