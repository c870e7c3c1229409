//! NBD on the queue's io_uring: requests go to the server with `SENDMSG` SQEs and replies come
//! back with `RECV`/`RECVMSG` SQEs on the queue's connection to the export (each queue has its
//! own; no thread per request, nothing blocking but a reconnection).
//!
//! # Cookies and slots
//! A request slot sends one NBD command at a time; its cookie is the slot's index in the low
//! 32 bits and a per-slot sequence number in the high 32, so a reply names its slot and a
//! stale or repeated reply for an earlier command of the same slot is recognised. Most blkif
//! requests are one command; two need more, sent one after the other, each after the previous
//! one's reply:
//! - a write that flushes (`BLKIF_OP_FLUSH_DISKCACHE` or `BLKIF_OP_WRITE_BARRIER` with data):
//!   `NBD_CMD_FLUSH` then the write with `NBD_FLAG_FUA` where the server offers FUA, else the
//!   write then `NBD_CMD_FLUSH`; either way the data acknowledged before the request and the
//!   request's own data are stable when the guest hears of it, as the local path's write and
//!   `fdatasync`;
//! - a discard longer than one command can carry (`NBD_CMD_TRIM`, or `NBD_CMD_WRITE_ZEROES`
//!   where the server has no trim), in pieces.
//!
//! # The socket
//! Sends: one `SENDMSG` in flight at a time (two sends in flight on one stream could
//! interleave their bytes); the others wait in order. A short send is continued from where it
//! stopped. Receives: one state machine for the connection: the reply header (a simple
//! reply's 16 bytes; where structured replies were negotiated, a chunk's 20), then its cookie
//! looked up; for a simple reply to a successful read, the payload straight into that slot's
//! buffer (its bounce region, or the guest's mapped pages). A structured chunk's fixed part is
//! read into the connection's own buffer (at most [`MAX_FIXED`] bytes) and checked against the
//! command ([`Reassembly`]: inside the request, overlapping no earlier chunk); its data goes
//! straight into the slot's buffer where its offset says, a hole is written there as zeroes
//! (in map mode into the guest's pages), an error chunk fails the request, and the chunk
//! flagged done completes the command, a read only if every byte of it came (or an error).
//! A header that is neither reply the connection allows, a chunk that breaks those rules, a
//! simple reply to a read after structured replies were agreed, a cookie that names no
//! command awaiting its reply, end of file or a socket error
//! loses the connection: it is shut down. With a [`Connector`] (`blkbackd serve` always has
//! one) a new connection is asked for, at once and then with a back-off doubling from 1 s to
//! 5 s; requests wait (the guest sees delay); on the new connection every command without its
//! reply is sent again, in slot order (a write sent twice writes the same data; nothing was
//! acknowledged to the guest before its reply). If no connection comes within the
//! connection's timeout, or the server now offers another export, or there is no connector,
//! the connection is given up: every command without a reply fails with `EIO`, and so does
//! every later request. Nothing from the server is trusted for a length: the only data it
//! sends into a slot's buffer is a read's payload, of the length the request asked for, or
//! chunks of it, each checked to lie inside the request before a byte is received.
//!
//! # Ownership
//! What the kernel points at stays put while it may: the request headers live in the
//! per-slot table, the reply header, the `msghdr`s and the iovec arrays in [`NbdConn`] (a
//! fixed-size table and boxes that never move or grow while an operation is in flight), the
//! data in the slot's [`Flight`](super::Flight) (region or mapping guards). A slot's
//! completion is reported only once no operation touching its memory is in flight.
//! [`Uring::drain`] shuts the socket down first, so the receive always in flight ends.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::{opcode, squeue, types};
use nbd::structured::{Chunk, ChunkHeader, Reassembly, CHUNK_HEADER_LEN, MAX_FIXED};
use nbd::wire::{
    Command, Request, SimpleReply, FLAG_FUA, REQUEST_LEN, SIMPLE_REPLY_LEN, STRUCTURED_REPLY_MAGIC,
};
use nbd::{Export, NbdError, RequestError, WireError};
use rustix::io::Errno;

use super::{Completion, Data, Iovec, Reaped, Uring, CONTROL};
use crate::dataplane::bounce::Region;
use crate::dataplane::nbd_stats::NbdStats;
use crate::nbd_connector::{same_export, Connector};

/// Tag of the connection's send.
pub(super) const SEND: u64 = CONTROL | 5;
/// Tag of the connection's receive.
pub(super) const RECV: u64 = CONTROL | 6;
/// Tag of the shutdown of a broken connection.
pub(super) const SHUTDOWN: u64 = CONTROL | 7;
/// Tag of the watchdog's timer.
pub(super) const WATCHDOG: u64 = CONTROL | 8;

/// How often the watchdog looks for requests waiting too long (and, while reconnecting,
/// whether to try again).
const WATCHDOG_PERIOD: Duration = Duration::from_secs(1);
/// The longest wait between two reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// A lost connection being replaced.
#[derive(Debug, Clone, Copy)]
struct Reconnect {
    /// When it was lost.
    since: Instant,
    /// No attempt before then.
    next: Instant,
    /// The wait after the last failed attempt (doubling up to [`MAX_BACKOFF`]).
    delay: Duration,
}

/// The longest piece of a discard: 4 GiB less 1 MiB (a whole number of any block size).
const MAX_DISCARD_PIECE: u64 = (u32::MAX as u64 + 1) - (1 << 20);

/// What a request slot asks of the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::dataplane) enum NbdRequest {
    /// A read of the slot's data length at byte `offset`.
    Read {
        /// Byte offset in the export.
        offset: u64,
    },
    /// A write of the slot's data at byte `offset`, made stable with what came before when
    /// `flush` (see the module documentation).
    Write {
        /// Byte offset in the export.
        offset: u64,
        /// The request flushes.
        flush: bool,
    },
    /// `NBD_CMD_FLUSH`.
    Flush,
    /// A discard of `len` bytes at `offset`.
    Discard {
        /// Byte offset in the export.
        offset: u64,
        /// Bytes.
        len: u64,
    },
}

/// Why a request was not sent.
#[derive(Debug, thiserror::Error)]
pub(in crate::dataplane) enum NbdSubmitError {
    /// The export does not allow it (too long for the server, unaligned, a command the
    /// server does not take): the guest's request fails; nothing to log above debug level.
    #[error("{0}")]
    Refused(#[from] RequestError),
    /// The connection is broken (already logged once).
    #[error("the NBD connection is broken")]
    Broken,
    /// The slot is busy or the submission queue is full (a bug, or the kernel's refusal).
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// One command of a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Read,
    Write { fua: bool },
    Flush,
    Discard,
}

/// A slot's NBD state.
#[derive(Debug)]
struct NbdSlot {
    /// The header of the command being sent (the kernel reads it during the send).
    header: [u8; REQUEST_LEN],
    /// The command sent or queued, awaiting its reply.
    current: Option<Step>,
    /// The command to send after the current one's reply.
    next: Option<Step>,
    /// Byte offset of the data (for a discard, of what is left to discard).
    offset: u64,
    /// Bytes of data (for a discard, what is left, the current piece included).
    len: u64,
    /// The current command's cookie.
    cookie: u64,
    /// The current command's send has begun (a reply before that is a protocol error).
    send_started: bool,
    /// The current command's send has ended.
    sent: bool,
    /// The current command's reply has arrived in full (its payload too).
    replied: bool,
    /// The first error of the request.
    error: Option<Errno>,
    /// The current command's structured reply so far.
    chunks: Reassembly,
}

impl NbdSlot {
    fn new() -> Self {
        Self {
            header: [0; REQUEST_LEN],
            current: None,
            next: None,
            offset: 0,
            len: 0,
            cookie: 0,
            send_started: false,
            sent: false,
            replied: false,
            error: None,
            chunks: Reassembly::default(),
        }
    }
}

/// Where the receive state machine is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rx {
    /// Reading a reply header (a simple reply's 16 bytes, a structured chunk's 20); `got`
    /// bytes of it are in.
    Header { got: usize },
    /// Reading the fixed part of a chunk for `slot` (`len` bytes, at most [`MAX_FIXED`]) into
    /// the connection's buffer; `got` are in.
    Fixed {
        slot: usize,
        header: ChunkHeader,
        got: usize,
        len: usize,
    },
    /// Reading a read's data into `slot`'s buffer at byte `at` of it; `got` of `len` bytes
    /// are in; `done`: the last chunk of its reply.
    Payload {
        slot: usize,
        at: usize,
        got: usize,
        len: usize,
        done: bool,
    },
}

/// The connection of one queue to its NBD export.
pub(super) struct NbdConn {
    fd: types::Fixed,
    export: Export,
    slots: Vec<NbdSlot>,
    /// Slots whose command waits for the socket, in order.
    send_queue: VecDeque<usize>,
    /// The slot whose command is being sent, and how many bytes of it went out.
    sending: Option<(usize, usize)>,
    send_iov: Vec<Iovec>,
    send_msg: Box<libc::msghdr>,
    rx: Rx,
    /// A receive is in flight.
    receiving: bool,
    reply: Box<[u8; CHUNK_HEADER_LEN]>,
    /// A chunk's fixed part (offset, hole length, error and message).
    fixed: Box<[u8; MAX_FIXED]>,
    recv_iov: Vec<Iovec>,
    recv_msg: Box<libc::msghdr>,
    /// Why the connection broke, once it has.
    broken: Option<String>,
    /// The shutdown of the socket was submitted.
    shut_down: bool,
    /// That shutdown has not completed yet.
    shutdown_pending: bool,
    /// Asks for a new connection when this one is lost; `None`: a loss is for good.
    connector: Option<Arc<Connector>>,
    /// The connection's socket when it is a reconnection (the first is the device's fd).
    socket: Option<OwnedFd>,
    /// Set while a lost connection is being replaced.
    reconnecting: Option<Reconnect>,
    /// Requests waiting this long with nothing arriving break the connection.
    timeout: Duration,
    /// When the socket last moved bytes, or last had no command waiting.
    progress: Instant,
    /// The watchdog's timer is armed.
    watching: bool,
    watchdog_ts: Box<types::Timespec>,
    /// The connection's counters.
    stats: Arc<NbdStats>,
}

impl std::fmt::Debug for NbdConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdConn")
            .field("rx", &self.rx)
            .field("sending", &self.sending)
            .field("broken", &self.broken)
            .finish_non_exhaustive()
    }
}

/// A `msghdr` with no name and no control data; its iovecs are set before each use.
fn empty_msghdr() -> Box<libc::msghdr> {
    Box::new(libc::msghdr {
        msg_name: std::ptr::null_mut(),
        msg_namelen: 0,
        msg_iov: std::ptr::null_mut(),
        msg_iovlen: 0,
        msg_control: std::ptr::null_mut(),
        msg_controllen: 0,
        msg_flags: 0,
    })
}

/// Fills `out` with the iovecs of `parts` less their first `skip` bytes.
fn iov_after(parts: impl Iterator<Item = Iovec>, skip: usize, out: &mut Vec<Iovec>) {
    iov_range(parts, skip, usize::MAX, out);
}

/// Fills `out` with the iovecs of at most `take` bytes of `parts` after their first `skip`.
fn iov_range(
    parts: impl Iterator<Item = Iovec>,
    mut skip: usize,
    mut take: usize,
    out: &mut Vec<Iovec>,
) {
    out.clear();
    for v in parts {
        if take == 0 {
            break;
        }
        if skip >= v.len {
            skip -= v.len;
            continue;
        }
        let len = (v.len - skip).min(take);
        out.push(Iovec {
            base: v.base.wrapping_add(skip),
            len,
        });
        take -= len;
        skip = 0;
    }
}

/// How many bytes of a reply header to read, once `got` are in `reply`: a structured
/// chunk's header is longer (and possible only once negotiated).
fn header_len(reply: &[u8; CHUNK_HEADER_LEN], got: usize, structured: bool) -> usize {
    if structured && got >= 4 && reply[..4] == STRUCTURED_REPLY_MAGIC.to_be_bytes() {
        CHUNK_HEADER_LEN
    } else {
        SIMPLE_REPLY_LEN
    }
}

/// The errno a failed NBD command answers with.
fn errno_of(e: NbdError) -> Errno {
    match e {
        NbdError::Perm => Errno::PERM,
        NbdError::Io => Errno::IO,
        NbdError::NoMem => Errno::NOMEM,
        NbdError::Inval | NbdError::Other(_) => Errno::INVAL,
        NbdError::NoSpc => Errno::NOSPC,
        NbdError::Overflow => Errno::OVERFLOW,
        NbdError::NotSup => Errno::OPNOTSUPP,
        NbdError::Shutdown => Errno::SHUTDOWN,
    }
}

impl Uring {
    /// Makes `fd` (a registered file: the export's connected socket, its handshake done) this
    /// queue's NBD connection to `export`.
    ///
    /// # Errors
    /// When `fd` is not registered.
    pub(in crate::dataplane) fn attach_nbd(
        &mut self,
        fd: BorrowedFd<'_>,
        export: Export,
        timeout: Duration,
        connector: Option<Arc<Connector>>,
        stats: Arc<NbdStats>,
    ) -> io::Result<()> {
        let fd = self.fixed(fd)?;
        stats
            .structured
            .store(u64::from(export.structured_replies), Ordering::Relaxed);
        let slots = self.flights.len();
        let max_iov = self.flights.first().map_or(0, |f| f.iov.capacity()) + 1;
        self.nbd = Some(NbdConn {
            fd,
            export,
            slots: (0..slots).map(|_| NbdSlot::new()).collect(),
            send_queue: VecDeque::with_capacity(slots),
            sending: None,
            send_iov: Vec::with_capacity(max_iov),
            send_msg: empty_msghdr(),
            rx: Rx::Header { got: 0 },
            receiving: false,
            reply: Box::new([0; CHUNK_HEADER_LEN]),
            fixed: Box::new([0; MAX_FIXED]),
            recv_iov: Vec::with_capacity(max_iov),
            recv_msg: empty_msghdr(),
            broken: None,
            shut_down: false,
            shutdown_pending: false,
            connector,
            socket: None,
            reconnecting: None,
            timeout,
            progress: Instant::now(),
            watching: false,
            watchdog_ts: Box::new(
                types::Timespec::new()
                    .sec(WATCHDOG_PERIOD.as_secs())
                    .nsec(WATCHDOG_PERIOD.subsec_nanos()),
            ),
            stats,
        });
        Ok(())
    }

    /// Sends `req` for `slot`, whose data (reads and writes) is `data`. The slot completes
    /// like any other ([`Reaped::Slot`]) once the server answered everything it needed.
    ///
    /// # Errors
    /// [`NbdSubmitError`]; the data's region comes back through the second field.
    pub(in crate::dataplane) fn submit_nbd(
        &mut self,
        slot: usize,
        req: NbdRequest,
        data: Option<Data>,
    ) -> Result<(), (NbdSubmitError, Option<Region>)> {
        let region_of = |d: Option<Data>| match d {
            Some(Data::Bounce(r, _)) => Some(r),
            _ => None,
        };
        let Some(conn) = self.nbd.as_ref() else {
            return Err((
                io::Error::other("no NBD connection").into(),
                region_of(data),
            ));
        };
        if conn.broken.is_some() {
            self.reset_slot(slot);
            return Err((NbdSubmitError::Broken, region_of(data)));
        }
        let flags = conn.export.flags;
        match self.flights.get(slot) {
            Some(o) if o.pending == 0 => {}
            _ => return Err((io::Error::other("slot busy").into(), region_of(data))),
        }
        // The data's iovecs: a bounce region is one; mapped segments are already there.
        let mut len = 0usize;
        match data {
            Some(Data::Bounce(region, n)) => {
                let n = n.min(region.capacity());
                let Some(ptr) = self.bounce.as_ref().and_then(|m| m.ptr(&region, n)) else {
                    return Err((
                        io::Error::other("not a registered region").into(),
                        Some(region),
                    ));
                };
                if let Some(o) = self.flights.get_mut(slot) {
                    o.iov.clear();
                    o.iov.push(Iovec { base: ptr, len: n });
                    o.region = Some(region);
                }
                len = n;
            }
            Some(Data::Mapped) => {
                len = self
                    .flights
                    .get(slot)
                    .map_or(0, |o| o.iov.iter().map(|v| v.len).sum());
            }
            None => {}
        }
        let (first, next, offset, total) = match req {
            NbdRequest::Read { offset } => (Step::Read, None, offset, len as u64),
            NbdRequest::Write { offset, flush } => match (flush, flags.send_fua()) {
                (false, _) => (Step::Write { fua: false }, None, offset, len as u64),
                (true, true) => (
                    Step::Flush,
                    Some(Step::Write { fua: true }),
                    offset,
                    len as u64,
                ),
                (true, false) => (
                    Step::Write { fua: false },
                    Some(Step::Flush),
                    offset,
                    len as u64,
                ),
            },
            NbdRequest::Flush => (Step::Flush, None, 0, 0),
            NbdRequest::Discard { offset, len } => (Step::Discard, None, offset, len),
        };
        if let Some(s) = self.nbd.as_mut().and_then(|c| c.slots.get_mut(slot)) {
            s.offset = offset;
            s.len = total;
            s.next = next;
            s.error = None;
        }
        if let Err(e) = self.nbd_check(slot, first).and_then(|()| match next {
            Some(n) => self.nbd_check(slot, n),
            None => Ok(()),
        }) {
            let region = self.flights.get_mut(slot).and_then(|o| {
                o.iov.clear();
                o.guards.clear();
                o.region.take()
            });
            return Err((e.into(), region));
        }
        if let Some(o) = self.flights.get_mut(slot) {
            o.pending = 1;
            o.error = None;
        }
        self.nbd_issue(slot, first);
        Ok(())
    }

    /// The request `step` of `slot` would be, as the protocol sees it.
    fn nbd_request(&self, slot: usize, step: Step) -> Option<Request> {
        let conn = self.nbd.as_ref()?;
        let s = conn.slots.get(slot)?;
        let (command, flags, offset, length) = match step {
            Step::Read => (Command::Read, 0, s.offset, s.len),
            Step::Write { fua } => (
                Command::Write,
                if fua { FLAG_FUA } else { 0 },
                s.offset,
                s.len,
            ),
            Step::Flush => (Command::Flush, 0, 0, 0),
            Step::Discard => {
                let command = if conn.export.flags.send_trim() {
                    Command::Trim
                } else {
                    Command::WriteZeroes
                };
                (command, 0, s.offset, s.len.min(MAX_DISCARD_PIECE))
            }
        };
        Some(Request {
            flags,
            command,
            cookie: s.cookie,
            offset,
            length: u32::try_from(length).unwrap_or(u32::MAX),
        })
    }

    /// Checks `step` of `slot` against the export before anything is sent.
    fn nbd_check(&self, slot: usize, step: Step) -> Result<(), RequestError> {
        let (Some(conn), Some(req)) = (self.nbd.as_ref(), self.nbd_request(slot, step)) else {
            return Ok(());
        };
        conn.export.check(&req)
    }

    /// Queues `step` of `slot` for sending, with a new cookie.
    fn nbd_issue(&mut self, slot: usize, step: Step) {
        let Some(conn) = self.nbd.as_mut() else {
            return;
        };
        let Some(s) = conn.slots.get_mut(slot) else {
            return;
        };
        let seq = (s.cookie >> 32).wrapping_add(1) & 0xffff_ffff;
        s.cookie = (seq << 32) | slot as u64;
        s.current = Some(step);
        let counter = match step {
            Step::Read => &conn.stats.rd_req,
            Step::Write { .. } => &conn.stats.wr_req,
            Step::Flush => &conn.stats.f_req,
            Step::Discard => &conn.stats.ds_req,
        };
        NbdStats::add(counter, 1);
        NbdStats::add(&conn.stats.in_flight, 1);
        s.send_started = false;
        s.sent = false;
        s.replied = false;
        if let Some(req) = self.nbd_request(slot, step) {
            if let Some(s) = self.nbd.as_mut().and_then(|c| c.slots.get_mut(slot)) {
                s.header = req.encode();
                s.chunks = Reassembly::new(req.command, req.offset, req.length);
            }
        }
        if let Some(conn) = self.nbd.as_mut() {
            conn.send_queue.push_back(slot);
        }
        self.nbd_kick();
    }

    /// Starts the next send if none is in flight, and makes sure a receive is.
    fn nbd_kick(&mut self) {
        let Some(conn) = self.nbd.as_mut() else {
            return;
        };
        if conn.broken.is_some() || conn.reconnecting.is_some() {
            return;
        }
        if conn.sending.is_none() {
            if let Some(slot) = conn.send_queue.pop_front() {
                conn.sending = Some((slot, 0));
                if let Some(s) = conn.slots.get_mut(slot) {
                    s.send_started = true;
                }
                self.nbd_send();
            }
        }
        if self.nbd.as_ref().is_some_and(|c| !c.receiving) {
            self.nbd_recv();
        }
        if self.nbd.as_ref().is_some_and(|c| !c.watching) {
            self.nbd_watch();
        }
    }

    /// Arms the watchdog's timer.
    fn nbd_watch(&mut self) {
        let Some(conn) = self.nbd.as_mut() else {
            return;
        };
        // The restriction requires IOSQE_FIXED_FILE on every SQE; a timeout has no file and
        // the kernel ignores the flag there.
        let e = opcode::Timeout::new(&*conn.watchdog_ts)
            .build()
            .flags(squeue::Flags::FIXED_FILE)
            .user_data(WATCHDOG);
        conn.watching = true;
        if let Err(e) = self.push(&[e]) {
            if let Some(conn) = self.nbd.as_mut() {
                conn.watching = false;
            }
            tracing::error!("cannot arm the NBD watchdog: {e}");
        }
    }

    /// The watchdog's timer expired: gives the connection up when commands have waited
    /// [`NbdConn::timeout`] with nothing arriving; re-arms while the connection lives.
    pub(super) fn nbd_watchdog(&mut self, out: &mut Vec<Reaped>) {
        let Some(conn) = self.nbd.as_mut() else {
            return;
        };
        conn.watching = false;
        if conn.broken.is_some() {
            return;
        }
        let now = Instant::now();
        if let Some(r) = conn.reconnecting {
            if now.duration_since(r.since) >= conn.timeout {
                let waited = conn.timeout;
                return self.nbd_give_up(format!("not reconnected within {waited:?}"));
            }
            let idle = !conn.receiving && conn.sending.is_none() && !conn.shutdown_pending;
            if now >= r.next && idle {
                self.nbd_reconnect(now, out);
            }
        } else if conn.slots.iter().all(|s| s.current.is_none()) {
            conn.progress = now;
        } else if now.duration_since(conn.progress) >= conn.timeout {
            let waited = conn.timeout;
            self.nbd_break(format!("no reply from the server for {waited:?}"));
        }
        if self.nbd.as_ref().is_some_and(|c| c.broken.is_none()) {
            self.nbd_watch();
        }
    }

    /// Keeps `socket`, the connection's own (the registered file it was attached with), open
    /// as long as the ring.
    pub(in crate::dataplane) fn own_nbd_socket(&mut self, socket: OwnedFd) {
        if let Some(conn) = self.nbd.as_mut() {
            conn.socket = Some(socket);
        }
    }

    /// Asks the connector for a new connection (blocking, bounded by the connector's
    /// timeout); on success re-sends every command without its reply, else waits longer
    /// before the next attempt.
    fn nbd_reconnect(&mut self, now: Instant, out: &mut Vec<Reaped>) {
        let Some(conn) = self.nbd.as_mut() else {
            return;
        };
        let (Some(connector), Some(r)) = (conn.connector.clone(), conn.reconnecting) else {
            return;
        };
        let (socket, export) = match connector.connect() {
            Ok(c) => c,
            Err(e) => {
                let delay = (r.delay * 2).clamp(WATCHDOG_PERIOD, MAX_BACKOFF);
                tracing::debug!("NBD reconnection failed, next attempt in {delay:?}: {e}");
                conn.reconnecting = Some(Reconnect {
                    next: now + delay,
                    delay,
                    ..r
                });
                return;
            }
        };
        if !same_export(&conn.export, &export) {
            let why = format!(
                "the server now offers another export ({export:?}, was {:?})",
                conn.export
            );
            return self.nbd_give_up(why);
        }
        let index = conn.fd.0;
        if let Err(e) = self
            .ring
            .submitter()
            .register_files_update(index, &[socket.as_raw_fd()])
        {
            return self.nbd_give_up(format!("cannot use the new connection: {e}"));
        }
        let Some(conn) = self.nbd.as_mut() else {
            return;
        };
        // The previous reconnection's socket, if any, is no longer registered: it closes here.
        conn.socket = Some(socket);
        // What this connection negotiated decides how its replies are read.
        conn.export.structured_replies = export.structured_replies;
        conn.reconnecting = None;
        conn.shut_down = false;
        conn.rx = Rx::Header { got: 0 };
        conn.sending = None;
        conn.progress = Instant::now();
        // Every command without its reply goes again; one whose reply came while its send
        // was cut short is done.
        let mut answered = Vec::new();
        conn.send_queue.clear();
        for (slot, s) in conn.slots.iter_mut().enumerate() {
            if s.current.is_none() {
                continue;
            }
            if s.replied {
                s.sent = true;
                answered.push(slot);
            } else {
                s.send_started = false;
                s.sent = false;
                // Chunks of the lost connection's reply do not count.
                if let Ok(r) = Request::decode(&s.header) {
                    s.chunks = Reassembly::new(r.command, r.offset, r.length);
                }
                conn.send_queue.push_back(slot);
            }
        }
        tracing::info!(
            "NBD connection re-established after {:?}; re-sending {} requests",
            r.since.elapsed(),
            conn.send_queue.len()
        );
        NbdStats::add(&conn.stats.reconnects, 1);
        NbdStats::add(&conn.stats.resent, conn.send_queue.len() as u64);
        conn.stats
            .structured
            .store(u64::from(export.structured_replies), Ordering::Relaxed);
        for slot in answered {
            self.nbd_advance(slot, out);
        }
        self.nbd_kick();
    }

    /// Submits the send of what is left of the current send.
    fn nbd_send(&mut self) {
        let Some(conn) = self.nbd.as_mut() else {
            return;
        };
        let Some((slot, done)) = conn.sending else {
            return;
        };
        let (Some(s), Some(o)) = (conn.slots.get(slot), self.flights.get(slot)) else {
            return;
        };
        let header = Iovec {
            base: s.header.as_ptr().cast_mut(),
            len: REQUEST_LEN,
        };
        let with_data = matches!(s.current, Some(Step::Write { .. }));
        let data = o.iov.iter().copied().filter(|_| with_data);
        iov_after(
            std::iter::once(header).chain(data),
            done,
            &mut conn.send_iov,
        );
        conn.send_msg.msg_iov = conn.send_iov.as_mut_ptr().cast();
        conn.send_msg.msg_iovlen = conn.send_iov.len() as _;
        let e = opcode::SendMsg::new(conn.fd, &*conn.send_msg)
            .flags(libc::MSG_NOSIGNAL as u32)
            .build()
            .user_data(SEND);
        if let Err(e) = self.push(&[e]) {
            self.nbd_break(format!("cannot queue a send: {e}"));
        }
    }

    /// Submits the receive the state machine is waiting for.
    fn nbd_recv(&mut self) {
        let Some(conn) = self.nbd.as_mut() else {
            return;
        };
        let structured = conn.export.structured_replies;
        let e = match conn.rx {
            Rx::Header { got } => {
                let need = header_len(&conn.reply, got, structured);
                let rest = conn.reply.get_mut(got..need).unwrap_or(&mut []);
                opcode::Recv::new(conn.fd, rest.as_mut_ptr(), rest.len() as u32)
                    .flags(libc::MSG_WAITALL)
                    .build()
            }
            Rx::Fixed { got, len, .. } => {
                let rest = conn.fixed.get_mut(got..len).unwrap_or(&mut []);
                opcode::Recv::new(conn.fd, rest.as_mut_ptr(), rest.len() as u32)
                    .flags(libc::MSG_WAITALL)
                    .build()
            }
            Rx::Payload {
                slot, at, got, len, ..
            } => {
                let Some(o) = self.flights.get(slot) else {
                    return;
                };
                iov_range(
                    o.iov.iter().copied(),
                    at + got,
                    len - got,
                    &mut conn.recv_iov,
                );
                conn.recv_msg.msg_iov = conn.recv_iov.as_mut_ptr().cast();
                conn.recv_msg.msg_iovlen = conn.recv_iov.len() as _;
                opcode::RecvMsg::new(conn.fd, &mut *conn.recv_msg)
                    .flags(libc::MSG_WAITALL as u32)
                    .build()
            }
        };
        conn.receiving = true;
        if let Err(err) = self.push(&[e.user_data(RECV)]) {
            if let Some(conn) = self.nbd.as_mut() {
                conn.receiving = false;
            }
            self.nbd_break(format!("cannot queue a receive: {err}"));
        }
    }

    /// A send completed with `res`.
    pub(super) fn nbd_sent(&mut self, res: i32, out: &mut Vec<Reaped>) {
        let Some(conn) = self.nbd.as_mut() else {
            return;
        };
        let Some((slot, done)) = conn.sending else {
            return;
        };
        let total = REQUEST_LEN
            + match conn.slots.get(slot).and_then(|s| s.current) {
                Some(Step::Write { .. }) => self
                    .flights
                    .get(slot)
                    .map_or(0, |o| o.iov.iter().map(|v| v.len).sum()),
                _ => 0,
            };
        if conn.reconnecting.is_some() {
            // The command goes again on the next connection.
            conn.sending = None;
            return;
        }
        let done = done + usize::try_from(res).unwrap_or(0);
        if res > 0 {
            conn.progress = Instant::now();
        }
        if res > 0 && done < total && conn.broken.is_none() {
            conn.sending = Some((slot, done));
            self.nbd_send();
            return;
        }
        conn.sending = None;
        if let Some(s) = conn.slots.get_mut(slot) {
            s.sent = true;
        }
        if res < 0 {
            let e = Errno::from_raw_os_error(-res);
            self.nbd_break(format!("sending a request: {e}"));
        } else if done < total {
            self.nbd_break("sending a request: the server closed the connection".into());
        }
        self.nbd_advance(slot, out);
        self.nbd_kick();
    }

    /// A receive completed with `res`.
    pub(super) fn nbd_received(&mut self, res: i32, out: &mut Vec<Reaped>) {
        let Some(conn) = self.nbd.as_mut() else {
            return;
        };
        conn.receiving = false;
        let rx = conn.rx;
        if conn.reconnecting.is_some() {
            // Whatever was half received is asked for again on the next connection.
            return;
        }
        if conn.broken.is_some() {
            // Only the receive's own end is awaited: the slot it was reading into completes.
            if let Rx::Payload { slot, .. } = rx {
                conn.rx = Rx::Header { got: 0 };
                self.nbd_fail_reply(slot, out);
            }
            return;
        }
        let n = match usize::try_from(res) {
            Ok(0) => {
                return self.nbd_break_during(rx, "the server closed the connection".into(), out)
            }
            Ok(n) => {
                conn.progress = Instant::now();
                n
            }
            Err(_) => {
                let e = Errno::from_raw_os_error(-res);
                return self.nbd_break_during(rx, format!("receiving a reply: {e}"), out);
            }
        };
        let structured = conn.export.structured_replies;
        match rx {
            Rx::Header { got } => {
                let got = got + n;
                let need = header_len(&conn.reply, got, structured);
                if got < need {
                    conn.rx = Rx::Header { got };
                    return self.nbd_recv();
                }
                conn.rx = Rx::Header { got: 0 };
                if need == CHUNK_HEADER_LEN {
                    match ChunkHeader::decode(&conn.reply) {
                        Ok(header) => self.nbd_chunk_header(header, out),
                        Err(e) => return self.nbd_break(format!("reply: {e}")),
                    }
                } else {
                    let Some(simple) = conn.reply.first_chunk::<SIMPLE_REPLY_LEN>() else {
                        return;
                    };
                    let reply = match SimpleReply::decode(simple) {
                        Ok(r) => r,
                        Err(e) => return self.nbd_break(format!("reply: {e}")),
                    };
                    self.nbd_reply(reply, out);
                }
            }
            Rx::Fixed {
                slot,
                header,
                got,
                len,
            } => {
                let got = got + n;
                if got < len {
                    conn.rx = Rx::Fixed {
                        slot,
                        header,
                        got,
                        len,
                    };
                    return self.nbd_recv();
                }
                conn.rx = Rx::Header { got: 0 };
                let chunk = header.parse(conn.fixed.get(..len).unwrap_or(&[]));
                match chunk {
                    Ok(chunk) => self.nbd_chunk(slot, header, chunk, out),
                    Err(e) => return self.nbd_break(format!("reply: {e}")),
                }
            }
            Rx::Payload {
                slot,
                at,
                got,
                len,
                done,
            } => {
                let got = got + n;
                if got < len {
                    conn.rx = Rx::Payload {
                        slot,
                        at,
                        got,
                        len,
                        done,
                    };
                    return self.nbd_recv();
                }
                conn.rx = Rx::Header { got: 0 };
                if !structured {
                    if let Some(s) = conn.slots.get_mut(slot) {
                        s.replied = true;
                    }
                    self.nbd_advance(slot, out);
                } else if done {
                    self.nbd_reply_done(slot, out);
                }
            }
        }
        self.nbd_kick();
    }

    /// The slot whose current command awaits the reply with `cookie`.
    fn nbd_awaiting(&self, cookie: u64) -> Option<(usize, Step)> {
        let conn = self.nbd.as_ref()?;
        let slot = (cookie & 0xffff_ffff) as usize;
        let s = conn.slots.get(slot)?;
        (s.cookie == cookie && s.send_started && !s.replied)
            .then_some(s.current)
            .flatten()
            .map(|step| (slot, step))
    }

    /// A structured reply chunk's header arrived: reads its fixed part, or takes it in.
    fn nbd_chunk_header(&mut self, header: ChunkHeader, out: &mut Vec<Reaped>) {
        let Some((slot, _)) = self.nbd_awaiting(header.cookie) else {
            return self.nbd_break(format!(
                "a reply chunk with cookie {:#x}, which names no request awaiting a reply",
                header.cookie
            ));
        };
        let len = match header.fixed_len() {
            Ok(len) => len,
            Err(e) => return self.nbd_break(format!("reply: {e}")),
        };
        if len > 0 {
            if let Some(conn) = self.nbd.as_mut() {
                conn.rx = Rx::Fixed {
                    slot,
                    header,
                    got: 0,
                    len,
                };
            }
            return;
        }
        match header.parse(&[]) {
            Ok(chunk) => self.nbd_chunk(slot, header, chunk, out),
            Err(e) => self.nbd_break(format!("reply: {e}")),
        }
    }

    /// A chunk for `slot`'s current command, checked against the command
    /// ([`Reassembly::accept`]): data is read into the slot's buffer next, a hole is zeroes
    /// there now, an error fails the request; the last chunk completes the command.
    fn nbd_chunk(&mut self, slot: usize, header: ChunkHeader, chunk: Chunk, out: &mut Vec<Reaped>) {
        let Some(s) = self.nbd.as_mut().and_then(|c| c.slots.get_mut(slot)) else {
            return;
        };
        let range = match s.chunks.accept(&chunk) {
            Ok(range) => range,
            Err(e) => return self.nbd_break(format!("reply: {e}")),
        };
        match (chunk, range) {
            (Chunk::Data { .. }, Some(range)) => {
                if let Some(conn) = self.nbd.as_mut() {
                    conn.rx = Rx::Payload {
                        slot,
                        at: range.start,
                        got: 0,
                        len: range.len(),
                        done: header.done(),
                    };
                }
                return;
            }
            (Chunk::Hole { .. }, Some(range)) => {
                if let Some(conn) = self.nbd.as_ref() {
                    NbdStats::add(&conn.stats.hole_bytes, range.len() as u64);
                }
                let want = range.len();
                if self.zero(slot, range) != want {
                    tracing::error!(slot, "a hole of a read could not be written as zeroes");
                    if let Some(s) = self.nbd.as_mut().and_then(|c| c.slots.get_mut(slot)) {
                        s.error.get_or_insert(Errno::IO);
                    }
                }
            }
            (Chunk::Error { error, message, .. }, _) => {
                tracing::debug!(
                    slot,
                    "the NBD server failed a request: {error}: {message:?}"
                );
            }
            _ => {}
        }
        if header.done() {
            self.nbd_reply_done(slot, out);
        }
    }

    /// The last chunk of `slot`'s reply is in: the command is answered, unless its chunks
    /// broke the rules ([`Reassembly::finish`]).
    fn nbd_reply_done(&mut self, slot: usize, out: &mut Vec<Reaped>) {
        let Some(conn) = self.nbd.as_mut() else {
            return;
        };
        let stats = &conn.stats;
        let Some(s) = conn.slots.get_mut(slot) else {
            return;
        };
        match s.chunks.finish() {
            Err(e) => return self.nbd_break(format!("reply: {e}")),
            Ok(Some(e)) => {
                NbdStats::add(&stats.errors, 1);
                s.error.get_or_insert(errno_of(e));
                s.next = None;
            }
            Ok(None) => {}
        }
        s.replied = true;
        self.nbd_advance(slot, out);
    }

    /// Writes zeroes over `range` of `slot`'s data buffer (a hole in a read): its bounce
    /// region, or the guest's mapped pages. Nothing is in flight on that buffer: the
    /// connection has one receive at a time, and the one that read the hole's chunk is over.
    /// Returns how many bytes were zeroed (all of `range`, unless the buffer is not the
    /// slot's: a bug, for which the caller fails the request rather than answer stale data).
    fn zero(&mut self, slot: usize, range: std::ops::Range<usize>) -> usize {
        let Some(o) = self.flights.get_mut(slot) else {
            return 0;
        };
        if let (Some(region), Some(mem)) = (o.region.as_mut(), self.bounce.as_ref()) {
            let bytes = mem.bytes(region, range.end);
            return bytes.get_mut(range).map_or(0, |b| {
                b.fill(0);
                b.len()
            });
        }
        // Mapped: each piece of the range, in the mapping that holds its iovec.
        let (mut start, mut zeroed) = (0usize, 0usize);
        for v in &o.iov {
            let end = start + v.len;
            let (from, to) = (range.start.max(start), range.end.min(end));
            if from < to {
                let at = v.base as usize + (from - start);
                let mapping = o.guards.iter().find_map(|g| {
                    let mem = g.writable()?;
                    let base = mem.as_ptr() as usize;
                    (base..base + mem.len())
                        .contains(&at)
                        .then_some((mem, at - base))
                });
                if let Some((mem, offset)) = mapping {
                    if mem.fill(offset, to - from, 0).is_ok() {
                        zeroed += to - from;
                    }
                }
            }
            start = end;
        }
        zeroed
    }

    /// A reply header arrived: finds its command, and reads its payload or completes it.
    fn nbd_reply(&mut self, reply: SimpleReply, out: &mut Vec<Reaped>) {
        let Some((slot, step)) = self.nbd_awaiting(reply.cookie) else {
            return self.nbd_break(format!(
                "a reply with cookie {:#x}, which names no request awaiting a reply",
                reply.cookie
            ));
        };
        let structured = self
            .nbd
            .as_ref()
            .is_some_and(|c| c.export.structured_replies);
        if structured && step == Step::Read {
            return self.nbd_break(format!("reply: {}", WireError::SimpleReadReply));
        }
        match (reply.error, step) {
            (None, Step::Read) => {
                let len = self
                    .flights
                    .get(slot)
                    .map_or(0, |o| o.iov.iter().map(|v| v.len).sum());
                if let Some(conn) = self.nbd.as_mut() {
                    conn.rx = Rx::Payload {
                        slot,
                        at: 0,
                        got: 0,
                        len,
                        done: true,
                    };
                }
            }
            (error, _) => {
                if let Some(conn) = self.nbd.as_ref().filter(|_| error.is_some()) {
                    NbdStats::add(&conn.stats.errors, 1);
                }
                if let Some(s) = self.nbd.as_mut().and_then(|c| c.slots.get_mut(slot)) {
                    s.replied = true;
                    if let Some(e) = error {
                        tracing::debug!(slot, "the NBD server failed a request: {e}");
                        s.error.get_or_insert(errno_of(e));
                        s.next = None;
                    }
                }
                self.nbd_advance(slot, out);
            }
        }
    }

    /// Once the current command of `slot` was sent and answered: issues the next one, or
    /// completes the slot.
    fn nbd_advance(&mut self, slot: usize, out: &mut Vec<Reaped>) {
        let Some(conn) = self.nbd.as_mut() else {
            return;
        };
        let broken = conn.broken.is_some();
        let Some(s) = conn.slots.get_mut(slot) else {
            return;
        };
        if !(s.sent && s.replied) || s.current.is_none() {
            return;
        }
        let step = s.current.take();
        NbdStats::sub(&conn.stats.in_flight);
        match step {
            Some(Step::Read) if s.error.is_none() && !broken => {
                NbdStats::add(&conn.stats.rd_bytes, s.len);
            }
            Some(Step::Write { .. }) if s.error.is_none() && !broken => {
                NbdStats::add(&conn.stats.wr_bytes, s.len);
            }
            _ => {}
        }
        if step == Some(Step::Discard) && s.error.is_none() {
            let piece = s.len.min(MAX_DISCARD_PIECE);
            s.offset += piece;
            s.len -= piece;
            if s.len > 0 {
                s.next = Some(Step::Discard);
            }
        }
        let next = if broken || s.error.is_some() {
            None
        } else {
            s.next.take()
        };
        if broken {
            s.error.get_or_insert(Errno::IO);
        }
        if let Some(step) = next {
            if let Err(e) = self.nbd_check(slot, step) {
                tracing::debug!(slot, "NBD request refused: {e}");
                if let Some(s) = self.nbd.as_mut().and_then(|c| c.slots.get_mut(slot)) {
                    s.error = Some(Errno::INVAL);
                }
            } else {
                return self.nbd_issue(slot, step);
            }
        }
        let error = self
            .nbd
            .as_mut()
            .and_then(|c| c.slots.get_mut(slot))
            .and_then(|s| {
                s.next = None;
                s.error.take()
            });
        let Some(o) = self.flights.get_mut(slot) else {
            return;
        };
        o.pending = 0;
        o.iov.clear();
        out.push(Reaped::Slot(Completion {
            slot,
            result: error.map_or(Ok(()), Err),
            region: o.region.take(),
            guards: std::mem::take(&mut o.guards),
        }));
    }

    /// The receive broke the connection while `rx`; a payload's slot completes too (the
    /// others, once the caller settles them: [`Uring::nbd_settle`]).
    fn nbd_break_during(&mut self, rx: Rx, why: String, out: &mut Vec<Reaped>) {
        self.nbd_break(why);
        if self.nbd.as_ref().is_some_and(|c| c.reconnecting.is_some()) {
            return;
        }
        if let Rx::Payload { slot, .. } = rx {
            if let Some(conn) = self.nbd.as_mut() {
                conn.rx = Rx::Header { got: 0 };
            }
            self.nbd_fail_reply(slot, out);
        }
    }

    /// Marks `slot`'s reply as never coming (the connection broke) and completes it once its
    /// send is over.
    fn nbd_fail_reply(&mut self, slot: usize, out: &mut Vec<Reaped>) {
        let Some(conn) = self.nbd.as_mut() else {
            return;
        };
        let payload_in_flight =
            conn.receiving && matches!(conn.rx, Rx::Payload { slot: p, .. } if p == slot);
        let Some(s) = conn.slots.get_mut(slot) else {
            return;
        };
        if s.current.is_none() || payload_in_flight {
            return;
        }
        s.replied = true;
        s.error.get_or_insert(Errno::IO);
        self.nbd_advance(slot, out);
    }

    /// The connection is lost: with a connector, replaces it (requests wait; see
    /// [`Uring::nbd_watchdog`]), else gives it up ([`Uring::nbd_give_up`]). Either way the
    /// socket is shut down so that whatever is in flight on it ends.
    fn nbd_break(&mut self, why: String) {
        let Some(conn) = self.nbd.as_mut() else {
            return;
        };
        if conn.broken.is_some() || conn.reconnecting.is_some() {
            return;
        }
        NbdStats::add(&conn.stats.lost, 1);
        if conn.connector.is_none() {
            return self.nbd_give_up(why);
        }
        tracing::warn!(
            "NBD connection lost: {why}; reconnecting, requests wait up to {:?}",
            conn.timeout
        );
        let now = Instant::now();
        conn.reconnecting = Some(Reconnect {
            since: now,
            next: now,
            delay: Duration::ZERO,
        });
        self.nbd_shutdown();
    }

    /// Gives the connection up for good (once, logged once): shuts the socket down so that
    /// whatever is in flight on it ends, and fails every command (those waiting for a reply
    /// through [`Uring::nbd_settle`]).
    fn nbd_give_up(&mut self, why: String) {
        let Some(conn) = self.nbd.as_mut() else {
            return;
        };
        if conn.broken.is_some() {
            return;
        }
        tracing::error!("NBD connection broken: {why}; every request fails from now on");
        conn.broken = Some(why);
        conn.reconnecting = None;
        // Commands never sent: their send is over before it began.
        for slot in std::mem::take(&mut conn.send_queue) {
            if let Some(s) = conn.slots.get_mut(slot) {
                s.send_started = true;
                s.sent = true;
            }
        }
        self.nbd_shutdown();
    }

    /// Submits the shutdown of the socket (once).
    fn nbd_shutdown(&mut self) {
        let Some(conn) = self.nbd.as_mut() else {
            return;
        };
        if conn.shut_down {
            return;
        }
        conn.shut_down = true;
        conn.shutdown_pending = true;
        let e = opcode::Shutdown::new(conn.fd, libc::SHUT_RDWR)
            .build()
            .user_data(SHUTDOWN);
        if let Err(e) = self.push(&[e]) {
            if let Some(conn) = self.nbd.as_mut() {
                conn.shutdown_pending = false;
            }
            tracing::error!("cannot queue the NBD socket's shutdown: {e}");
        }
    }

    /// The socket's shutdown completed.
    pub(super) fn nbd_shutdown_done(&mut self) {
        if let Some(conn) = self.nbd.as_mut() {
            conn.shutdown_pending = false;
        }
    }

    /// The queue is stopping: requests waiting for a reconnection fail now.
    pub(in crate::dataplane) fn nbd_stop_waiting(&mut self) {
        if self.nbd.as_ref().is_some_and(|c| c.reconnecting.is_some()) {
            self.nbd_give_up("the queue is stopping while reconnecting".into());
        }
    }

    /// After the connection broke: fails every command whose reply can no longer come, each
    /// once no operation on the socket points at its memory.
    pub(super) fn nbd_settle(&mut self, out: &mut Vec<Reaped>) {
        if self.nbd.as_ref().is_none_or(|c| c.broken.is_none()) {
            return;
        }
        let n = self.nbd.as_ref().map_or(0, |c| c.slots.len());
        for slot in 0..n {
            self.nbd_fail_reply(slot, out);
        }
    }

    /// Whether an operation on the socket is in flight.
    pub(super) fn nbd_busy(&self) -> bool {
        self.nbd
            .as_ref()
            .is_some_and(|c| c.receiving || c.sending.is_some())
    }

    /// For teardown: shuts the socket down so the receive in flight ends (quietly: the
    /// connection is not broken, the queue is done with it).
    pub(super) fn nbd_close(&mut self) {
        if let Some(conn) = self.nbd.as_mut() {
            conn.reconnecting = None;
            conn.broken
                .get_or_insert_with(|| "the queue stopped".into());
        }
        if self.nbd_busy() {
            self.nbd_shutdown();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iovecs_skip_what_was_moved() {
        let mut a = [0u8; 8];
        let mut b = [0u8; 4];
        let parts = [
            Iovec {
                base: a.as_mut_ptr(),
                len: 8,
            },
            Iovec {
                base: b.as_mut_ptr(),
                len: 4,
            },
        ];
        let mut out = Vec::new();
        iov_after(parts.iter().copied(), 0, &mut out);
        assert_eq!(out.len(), 2);
        iov_after(parts.iter().copied(), 3, &mut out);
        assert_eq!((out.len(), out[0].len), (2, 5));
        assert_eq!(out[0].base, a.as_mut_ptr().wrapping_add(3));
        iov_after(parts.iter().copied(), 8, &mut out);
        assert_eq!((out.len(), out[0].base, out[0].len), (1, b.as_mut_ptr(), 4));
        iov_after(parts.iter().copied(), 12, &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn iovecs_of_a_chunk_and_header_lengths() {
        let mut a = [0u8; 8];
        let mut b = [0u8; 4];
        let parts = [
            Iovec {
                base: a.as_mut_ptr(),
                len: 8,
            },
            Iovec {
                base: b.as_mut_ptr(),
                len: 4,
            },
        ];
        let mut out = Vec::new();
        iov_range(parts.iter().copied(), 6, 4, &mut out);
        assert_eq!((out.len(), out[0].len, out[1].len), (2, 2, 2));
        assert_eq!(out[0].base, a.as_mut_ptr().wrapping_add(6));
        iov_range(parts.iter().copied(), 9, 100, &mut out);
        assert_eq!((out.len(), out[0].len), (1, 3));
        iov_range(parts.iter().copied(), 0, 0, &mut out);
        assert!(out.is_empty());

        let mut reply = [0u8; CHUNK_HEADER_LEN];
        reply[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(header_len(&reply, 16, true), CHUNK_HEADER_LEN);
        assert_eq!(header_len(&reply, 16, false), SIMPLE_REPLY_LEN);
        assert_eq!(header_len(&reply, 2, true), SIMPLE_REPLY_LEN);
        reply[0] = 0x67;
        assert_eq!(header_len(&reply, 16, true), SIMPLE_REPLY_LEN);
    }

    #[test]
    fn nbd_errors_map_to_errnos() {
        assert_eq!(errno_of(NbdError::Perm), Errno::PERM);
        assert_eq!(errno_of(NbdError::NotSup), Errno::OPNOTSUPP);
        assert_eq!(errno_of(NbdError::Other(1234)), Errno::INVAL);
    }
}
