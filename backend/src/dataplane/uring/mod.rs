//! The io_uring of one queue (a thin executor: submit, reap), and the lifetimes of everything
//! the kernel points at.
//!
//! This is the backend's one module with `unsafe` for I/O. The rule it enforces: an operation
//! in flight owns every piece of memory its SQE names until its last CQE has been reaped:
//! - a bounce [`Region`] moves into the slot's [`Flight`] on submission and comes back only in
//!   the [`Completion`]; the bounce memory itself is held here by an `Arc` as long as the ring;
//! - grant mappings (persistent or per request) are held by `Arc` clones in the same entry, and
//!   the iovecs pointing into them are built from those clones by [`Uring::map_segment`], so a
//!   pointer into a mapping never outlives the guard that keeps the mapping alive;
//! - the iovec array itself lives in the entry and is not touched while the entry is busy;
//! - timer timespecs live in this struct (the kernel copies them at submission);
//! - for an NBD export, the request and reply headers, `msghdr`s and iovec arrays of the
//!   socket's sends and receives live in the connection (`nbd`), which completes a slot only
//!   when no operation on the socket points at its data.
//!
//! All SQEs go through [`Uring::push`], the one `unsafe { sq.push() }` call site. Dropping a
//! [`Uring`] with operations in flight first waits for them, so no memory is freed under the
//! kernel's feet (XSA-350's lesson for a userspace backend).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::Arc;

use io_uring::{squeue, types, IoUring};
use rustix::io::Errno;
use xen::GrantMapping;

use super::bounce::{BounceMem, Region};

mod nbd;
mod ops;

pub(super) use nbd::{NbdRequest, NbdSubmitError};

/// How long the kernel's submission thread (`--sqpoll`) polls for new SQEs after the last
/// before it sleeps, in milliseconds (a submission then wakes it with one system call).
const SQPOLL_IDLE_MS: u32 = 1;

/// Tag bit of operations that belong to no request slot.
const CONTROL: u64 = 1 << 63;
/// Tag bit of a slot's secondary operation (the fsync linked after a write).
const AUX: u64 = 1 << 32;

/// What a control (non-request) completion was for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Control {
    /// The stop eventfd polled readable.
    Stop,
    /// The late-EOI delay expired.
    EoiTimer,
    /// The housekeeping tick (persistent grant aging).
    Tick,
}

impl Control {
    fn tag(self) -> u64 {
        CONTROL
            | match self {
                Control::Stop => 2,
                Control::EoiTimer => 3,
                Control::Tick => 4,
            }
    }

    fn from_tag(tag: u64) -> Option<Self> {
        match tag {
            t if t == Control::Stop.tag() => Some(Control::Stop),
            t if t == Control::EoiTimer.tag() => Some(Control::EoiTimer),
            t if t == Control::Tick.tag() => Some(Control::Tick),
            _ => None,
        }
    }
}

/// Tag of the event channel's poll.
const EVTCHN_POLL: u64 = CONTROL | 1;
/// Tag of the event channel's read (of the delivery that woke the queue).
const EVTCHN_READ: u64 = CONTROL | 9;
/// Tag of the event channel's unmask (a write of the port).
const EVTCHN_UNMASK: u64 = CONTROL | 10;

/// An operation on the event channel's fd (see `wake`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum EvtchnOp {
    /// The poll completed: readable (a port was delivered), or cancelled.
    Poll,
    /// The read of one delivery completed; its bytes come with it.
    Read([u8; EVTCHN_READ_BYTES]),
    /// The unmask write completed.
    Unmask,
}

/// Bytes of one event channel read: one port, so that each wake-up consumes exactly the one
/// delivery that caused it (a second one keeps the fd readable).
const EVTCHN_READ_BYTES: usize = 4;

/// The memory of the event channel's read and unmask write, boxed so that it does not move
/// while the kernel uses it (until their CQEs: [`Uring::drain`] waits for them).
#[derive(Debug)]
struct EvtchnIo {
    read: [u8; EVTCHN_READ_BYTES],
    unmask: [u8; 4],
    read_iov: Iovec,
    unmask_iov: Iovec,
    /// Reads and writes submitted and not completed.
    in_flight: u32,
}

impl EvtchnIo {
    fn new() -> Box<Self> {
        let none = Iovec {
            base: std::ptr::null_mut(),
            len: 0,
        };
        let mut io = Box::new(Self {
            read: [0; EVTCHN_READ_BYTES],
            unmask: [0; 4],
            read_iov: none,
            unmask_iov: none,
            in_flight: 0,
        });
        io.read_iov = Iovec {
            base: io.read.as_mut_ptr(),
            len: EVTCHN_READ_BYTES,
        };
        io.unmask_iov = Iovec {
            base: io.unmask.as_mut_ptr(),
            len: io.unmask.len(),
        };
        io
    }
}

// SAFETY: the iovecs point into the same box, which moves with it; only the kernel
// dereferences them.
unsafe impl Send for EvtchnIo {}

/// One `struct iovec`, laid out as the kernel reads it.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct Iovec {
    base: *mut u8,
    len: usize,
}

/// What the kernel may be pointing at for one request slot.
#[derive(Debug, Default)]
struct Flight {
    /// SQEs submitted and not completed.
    pending: u32,
    /// Bytes the data operation must move (a short transfer is an error).
    expect: usize,
    /// The first error seen among the slot's CQEs.
    error: Option<Errno>,
    region: Option<Region>,
    guards: Vec<Arc<GrantMapping>>,
    iov: Vec<Iovec>,
}

// SAFETY: the raw pointers in iov point into memory owned by `guards` (or nothing), which is
// Send + Sync; they are only dereferenced by the kernel.
unsafe impl Send for Flight {}

// SAFETY: the raw pointers in the NBD connection's iovecs and msghdrs point into memory the
// connection itself (request and reply headers, the iovec arrays) or a slot's `Flight` owns;
// they are only dereferenced by the kernel.
unsafe impl Send for nbd::NbdConn {}

/// A slot whose operations have all completed.
#[derive(Debug)]
pub(super) struct Completion {
    /// The slot.
    pub(super) slot: usize,
    /// The outcome: the first failing CQE's errno, or `EIO` for a short transfer.
    pub(super) result: Result<(), Errno>,
    /// The bounce region, back from the kernel (copy mode).
    pub(super) region: Option<Region>,
    /// The grant mappings the request's I/O used (map mode): the kernel has reported the I/O
    /// complete, which is not yet the same as having let go of the pages (see `retire`).
    pub(super) guards: Vec<Arc<GrantMapping>>,
}

/// A completion reaped from the ring.
#[derive(Debug)]
pub(super) enum Reaped {
    /// A control operation finished.
    Control(Control),
    /// An operation on the event channel's fd finished, with its result.
    Evtchn(EvtchnOp, Result<usize, Errno>),
    /// All of a slot's operations finished.
    Slot(Completion),
}

/// The io_uring of one queue.
pub(super) struct Uring {
    // Field order matters for Drop: the ring (and so its buffer registration) goes before the
    // bounce memory and the flights' guards.
    ring: IoUring,
    flights: Vec<Flight>,
    /// The registered bounce memory (copy mode), kept mapped as long as the ring.
    bounce: Option<Arc<BounceMem>>,
    eoi_ts: Box<types::Timespec>,
    tick_ts: Box<types::Timespec>,
    evtchn_io: Box<EvtchnIo>,
    cqes: Vec<(u64, i32)>,
    /// The registered files (the ring is restricted to them: `crate::sandbox::uring`).
    files: Vec<RawFd>,
    /// The NBD connection, when the device is an NBD export.
    nbd: Option<nbd::NbdConn>,
}

impl std::fmt::Debug for Uring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uring")
            .field("slots", &self.flights.len())
            .finish_non_exhaustive()
    }
}

/// How the data of a read or write reaches the device.
#[derive(Debug)]
pub(super) enum Data {
    /// Through a bounce region (registered buffer), `len` bytes.
    Bounce(Region, usize),
    /// Through the iovecs built with [`Uring::map_segment`].
    Mapped,
}

impl Uring {
    /// A ring for `slots` request slots of up to `max_segs` segments, with `bounce` registered
    /// as its fixed buffer (copy mode), restricted to the operations the queue submits on
    /// `files` (see `crate::sandbox::uring`); `replace_files` allows replacing a registered
    /// file (an NBD connection re-established); `sqpoll`: submitted by a kernel thread
    /// ([`SQPOLL_IDLE_MS`]).
    pub(super) fn new(
        slots: usize,
        max_segs: usize,
        bounce: Option<Arc<BounceMem>>,
        files: &[BorrowedFd<'_>],
        replace_files: bool,
        sqpoll: bool,
    ) -> io::Result<Self> {
        let entries = u32::try_from((slots * 2 + 8).next_power_of_two())
            .unwrap_or(4096)
            .min(4096);
        let builder = || {
            let mut b = crate::sandbox::uring::builder();
            if sqpoll {
                b.setup_sqpoll(SQPOLL_IDLE_MS);
            }
            b
        };
        let mut first = builder();
        first.setup_single_issuer();
        if !sqpoll {
            // The kernel refuses COOP_TASKRUN with SQPOLL: task work runs in its thread.
            first.setup_coop_taskrun();
        }
        let ring = first.build(entries).or_else(|_| builder().build(entries))?;
        if let Some(mem) = &bounce {
            let (base, len) = mem.span();
            let iov = [Iovec { base, len }];
            // SAFETY: Iovec is #[repr(C)] {pointer, usize}, the layout of struct iovec; the
            // slice borrows `iov` for this statement only.
            let iovs = unsafe { std::slice::from_raw_parts(iov.as_ptr().cast(), 1) };
            // SAFETY: the registered memory is the bounce mapping, which this Uring keeps
            // mapped (its `Arc`) until after the ring is gone (field order; Drop waits for
            // in-flight I/O first, or leaks the `Arc`).
            unsafe { ring.submitter().register_buffers(iovs) }?;
        }
        let files: Vec<RawFd> = files.iter().map(AsRawFd::as_raw_fd).collect();
        crate::sandbox::uring::restrict(&ring, &files, replace_files)?;
        let owned = (0..slots)
            .map(|_| Flight {
                guards: Vec::with_capacity(max_segs + 1),
                iov: Vec::with_capacity(max_segs),
                ..Flight::default()
            })
            .collect();
        Ok(Self {
            ring,
            flights: owned,
            bounce,
            eoi_ts: Box::new(types::Timespec::new()),
            tick_ts: Box::new(types::Timespec::new()),
            evtchn_io: EvtchnIo::new(),
            cqes: Vec::with_capacity(entries as usize * 2),
            files,
            nbd: None,
        })
    }

    /// Pushes entries, submitting first when the queue has no room (with `--sqpoll`, waiting
    /// for the kernel's thread to take what is queued).
    fn push(&mut self, entries: &[squeue::Entry]) -> io::Result<()> {
        let room = |ring: &mut IoUring| {
            let sq = ring.submission();
            sq.capacity() - sq.len()
        };
        if room(&mut self.ring) < entries.len() {
            self.ring.submit()?;
            if self.ring.params().is_setup_sqpoll() && room(&mut self.ring) < entries.len() {
                self.ring.submitter().squeue_wait()?;
            }
        }
        let mut sq = self.ring.submission();
        // SAFETY: every pointer in these entries refers to memory this Uring keeps alive until
        // the entry's completion is reaped: a bounce region (exclusive use of its bytes) and
        // iovec arrays and grant mapping guards are owned by the slot's `Flight` entry (its
        // `pending` count keeps them there), the bounce memory itself by `self.bounce`;
        // timespecs are fields of self (the kernel copies them when it reads the SQE); the
        // fds are owned by the queue, which drops this Uring (waiting for all completions, or
        // leaking what they point at) before closing them, and the kernel holds its own
        // reference to a registered file.
        unsafe { sq.push_multiple(entries) }.map_err(|_| io::Error::from(io::ErrorKind::WouldBlock))
    }

    /// Submits everything queued and waits for at least `want` completions, the event
    /// channel's reads and unmasks among them. (Not counting those, as they usually complete
    /// at once, would save an `io_uring_enter` per wake-up, but a queue waiting for one that
    /// does not complete at once would sleep through the completions it waits for. With that
    /// in place a benchmark run once saw 32 requests unanswered for 15 s, cause not found; the
    /// plain wait cannot sleep through a completion.)
    ///
    /// # Errors
    /// A failed `io_uring_enter` other than `EINTR`/`EBUSY` (those count as success).
    pub(super) fn submit_and_wait(&mut self, want: usize) -> io::Result<()> {
        match self.ring.submit_and_wait(want) {
            Ok(_) => Ok(()),
            // Interrupted, or the completion queue is full: reaping comes next either way.
            Err(e)
                if e.raw_os_error() == Some(Errno::INTR.raw_os_error())
                    || e.raw_os_error() == Some(Errno::BUSY.raw_os_error()) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Hands the queued entries to the kernel without waiting; `false` when none were queued
    /// (no system call then).
    ///
    /// # Errors
    /// As [`Uring::submit_and_wait`].
    pub(super) fn submit_queued(&mut self) -> io::Result<bool> {
        if self.ring.submission().is_empty() {
            return Ok(false);
        }
        self.submit_and_wait(0).map(|()| true)
    }

    /// Whether completions are waiting to be reaped.
    pub(super) fn has_completions(&mut self) -> bool {
        !self.ring.completion().is_empty()
    }

    /// Reaps every queued completion into `out`.
    pub(super) fn reap(&mut self, out: &mut Vec<Reaped>) {
        self.cqes.clear();
        self.cqes
            .extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
        for i in 0..self.cqes.len() {
            let (tag, res) = self.cqes[i];
            if tag & CONTROL != 0 {
                match tag {
                    nbd::SEND => self.nbd_sent(res, out),
                    nbd::RECV => self.nbd_received(res, out),
                    // Its outcome shows on the socket's other operations.
                    nbd::SHUTDOWN => self.nbd_shutdown_done(),
                    nbd::WATCHDOG => self.nbd_watchdog(out),
                    EVTCHN_POLL | EVTCHN_READ | EVTCHN_UNMASK => {
                        let op = match tag {
                            EVTCHN_POLL => EvtchnOp::Poll,
                            EVTCHN_READ => EvtchnOp::Read(self.evtchn_io.read),
                            _ => EvtchnOp::Unmask,
                        };
                        if op != EvtchnOp::Poll {
                            self.evtchn_io.in_flight = self.evtchn_io.in_flight.saturating_sub(1);
                        }
                        let result = usize::try_from(res)
                            .map_err(|_| Errno::from_raw_os_error(res.saturating_neg()));
                        out.push(Reaped::Evtchn(op, result));
                    }
                    _ => {
                        if let Some(c) = Control::from_tag(tag) {
                            out.push(Reaped::Control(c));
                        }
                    }
                }
                continue;
            }
            let slot = (tag & 0xffff_ffff) as usize;
            let aux = tag & AUX != 0;
            let Some(o) = self.flights.get_mut(slot) else {
                continue;
            };
            if res < 0 {
                o.error.get_or_insert(Errno::from_raw_os_error(-res));
            } else if !aux && res as usize != o.expect {
                o.error.get_or_insert(Errno::IO);
            }
            o.pending = o.pending.saturating_sub(1);
            if o.pending == 0 {
                // The kernel has completed everything this slot pointed at.
                o.iov.clear();
                out.push(Reaped::Slot(Completion {
                    slot,
                    result: o.error.take().map_or(Ok(()), Err),
                    region: o.region.take(),
                    guards: std::mem::take(&mut o.guards),
                }));
            }
        }
        self.nbd_settle(out);
    }

    /// Operations of request slots still in flight.
    pub(super) fn slots_in_flight(&self) -> usize {
        self.flights.iter().filter(|o| o.pending > 0).count()
    }

    /// Waits until no request operation is in flight, reaping into `out`.
    ///
    /// # Errors
    /// When waiting fails (other than `EINTR`); what is still in flight stays owned.
    pub(super) fn drain(&mut self, out: &mut Vec<Reaped>) -> io::Result<()> {
        // An NBD socket always has a receive in flight: shut it down so that it ends.
        self.nbd_close();
        // Requests waiting for a reconnection fail now.
        self.nbd_settle(out);
        while self.slots_in_flight() > 0 || self.nbd_busy() || self.evtchn_io.in_flight > 0 {
            if let Err(e) = self.ring.submit_and_wait(1) {
                if e.raw_os_error() != Some(Errno::INTR.raw_os_error()) {
                    return Err(e);
                }
            }
            self.reap(out);
        }
        Ok(())
    }
}

impl Drop for Uring {
    fn drop(&mut self) {
        // Wait for every request operation and event channel read or write: the kernel may
        // still write into bounce regions, grant mappings or `evtchn_io`. Polls and timers
        // point at nothing that dies here but the timespecs, which the kernel copied at
        // submission.
        let mut sink = Vec::new();
        if let Err(e) = self.drain(&mut sink) {
            // Cannot wait: leak what the kernel may still point at rather than free it under
            // it: the flights (grant mapping guards, iovec arrays, regions) and this ring's
            // hold on the bounce memory, so that the mapping outlives the pool's own `Arc`.
            tracing::error!("io_uring wait failed while draining: {e}; leaking buffers");
            std::mem::forget(std::mem::take(&mut self.flights));
            std::mem::forget(self.bounce.take());
            std::mem::forget(std::mem::replace(&mut self.evtchn_io, EvtchnIo::new()));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;
    use crate::dataplane::bounce::BouncePool;

    #[test]
    fn a_region_of_another_pool_is_refused_and_returned() {
        let pool = BouncePool::new(1, 0, 0).unwrap();
        let mut other = BouncePool::new(1, 0, 0).unwrap();
        let file = std::fs::File::open("/dev/null").unwrap();
        let files = [file.as_fd()];
        let mut u = Uring::new(1, 11, Some(Arc::clone(pool.mem())), &files, false, false).unwrap();
        let r = other.small(0).unwrap();
        let (_, back) = u
            .submit_rw(0, file.as_fd(), false, 0, Data::Bounce(r, 512), false)
            .unwrap_err();
        assert!(back.is_some(), "the region comes back");
        assert_eq!(u.slots_in_flight(), 0);
    }

    /// Reaps until `n` event channel completions came (each waits at most 5 s).
    fn evtchn_cqes(u: &mut Uring, n: usize) -> Vec<(EvtchnOp, Result<usize, Errno>)> {
        let mut got = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while got.len() < n {
            assert!(std::time::Instant::now() < deadline, "only {got:?}");
            u.ring.submit_and_wait(1).unwrap();
            let mut out = Vec::new();
            u.reap(&mut out);
            got.extend(out.into_iter().filter_map(|r| match r {
                Reaped::Evtchn(op, res) => Some((op, res)),
                _ => None,
            }));
        }
        got
    }

    #[test]
    fn the_unmask_writes_the_port_and_the_rearm_reads_one_delivery_before_polling() {
        // A stream socket stands in for the evtchn device: what the peer writes are
        // deliveries (ports), what the ring writes are unmasks.
        let (ours, peer) = rustix::net::socketpair(
            rustix::net::AddressFamily::UNIX,
            rustix::net::SocketType::STREAM,
            rustix::net::SocketFlags::CLOEXEC | rustix::net::SocketFlags::NONBLOCK,
            None,
        )
        .unwrap();
        let mut u = Uring::new(1, 1, None, &[ours.as_fd()], false, false).unwrap();
        // The delivery that woke the queue, and one that came while the port was masked
        // (a request pushed after the ring's final check).
        let deliveries = [5u32.to_ne_bytes(), 6u32.to_ne_bytes()].concat();
        rustix::io::write(&peer, &deliveries).unwrap();
        u.evtchn_unmask(ours.as_fd(), 5).unwrap();
        u.evtchn_arm(ours.as_fd(), true).unwrap();
        let mut got = evtchn_cqes(&mut u, 3);
        got.sort_by_key(|(op, _)| format!("{op:?}"));
        assert_eq!(
            got,
            [
                (EvtchnOp::Poll, Ok(1)),
                (EvtchnOp::Read(5u32.to_ne_bytes()), Ok(4)),
                (EvtchnOp::Unmask, Ok(4)),
            ],
            "one delivery read; the poll fires for the second"
        );
        let mut unmasked = [0u8; 8];
        assert_eq!(rustix::io::read(&peer, &mut unmasked), Ok(4));
        assert_eq!(unmasked[..4], 5u32.to_ne_bytes(), "the port, once");
        // The second delivery is read by the next re-arm; the poll then waits.
        u.evtchn_arm(ours.as_fd(), true).unwrap();
        assert_eq!(
            evtchn_cqes(&mut u, 1),
            [(EvtchnOp::Read(6u32.to_ne_bytes()), Ok(4))]
        );
        u.submit_and_wait(0).unwrap();
        assert!(!u.has_completions(), "nothing delivered: the poll waits");
        assert_eq!(u.evtchn_io.in_flight, 0);
    }

    #[test]
    fn dropping_the_ring_waits_for_in_flight_reads_into_the_pool() {
        let mut pool = BouncePool::new(1, 0, 0).unwrap();
        let file = std::fs::File::open("/dev/zero").unwrap();
        let files = [file.as_fd()];
        let mut u = Uring::new(1, 11, Some(Arc::clone(pool.mem())), &files, false, false).unwrap();
        let r = pool.small(0).unwrap();
        u.submit_rw(0, file.as_fd(), false, 0, Data::Bounce(r, 4096), false)
            .unwrap();
        assert_eq!(u.slots_in_flight(), 1);
        drop(u);
        // The pool's memory is still the pool's: the ring let go of it after the read.
        assert_eq!(Arc::strong_count(pool.mem()), 1);
    }
}
