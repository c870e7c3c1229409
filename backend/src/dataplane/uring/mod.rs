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
//! - the event channel's read buffer and unmask bytes live in a box here, used by one linked
//!   chain at a time whose end is seen even when its read and write post no CQE ([`EvtchnIo`]);
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

/// Tag of the event channel's poll armed on its own.
const EVTCHN_POLL: u64 = CONTROL | 1;
/// Tag of the event channel's read (of the delivery that woke the queue).
const EVTCHN_READ: u64 = CONTROL | 9;
/// Tag of the event channel's unmask (a write of the port).
const EVTCHN_UNMASK: u64 = CONTROL | 10;
/// Tag of the event channel's poll linked after its read: its CQE ends the chain.
const EVTCHN_CHAIN_POLL: u64 = CONTROL | 11;
/// Tag of the removal of that poll, when the ring is drained.
const EVTCHN_REMOVE: u64 = CONTROL | 12;

/// An operation on the event channel's fd (see `wake`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum EvtchnOp {
    /// The poll completed: readable (a port was delivered); or, with `ECANCELED`, the poll
    /// linked after a read is gone because the read or the unmask failed: arm another.
    Poll,
    /// The read of one delivery completed (where the kernel skips successful CQEs, only a
    /// failed one is reported); its bytes come with it.
    Read([u8; EVTCHN_READ_BYTES]),
    /// The unmask write completed (with skipped CQEs, only a failed one is reported).
    Unmask,
}

/// Bytes of one event channel read: one port, so that each wake-up consumes exactly the one
/// delivery that caused it (a second one keeps the fd readable).
const EVTCHN_READ_BYTES: usize = 4;

/// The memory of the event channel's read and unmask write, boxed so that it does not move
/// while the kernel uses it.
///
/// The unmask, the read and the next poll go in one linked chain: the read starts once the
/// unmask is done, the poll once the read is. A successful read or unmask may post no CQE
/// (`IOSQE_CQE_SKIP_SUCCESS`), so their end is proven by the chain's end: the poll's CQE, or
/// the CQE of the unmask or read that failed (the kernel then cancels what follows, posting
/// nothing for it when the failed one skipped its success). Until then the chain is open: no
/// other is queued (it would reuse this memory), and [`Uring::drain`] removes the poll and
/// waits for the chain to end.
#[derive(Debug)]
struct EvtchnIo {
    read: [u8; EVTCHN_READ_BYTES],
    unmask: [u8; 4],
    read_iov: Iovec,
    unmask_iov: Iovec,
    /// A chain was queued and has not ended.
    chain: bool,
    /// [`Uring::drain`] queued the removal of the chain's poll and has not seen its CQE.
    removing: bool,
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
            chain: false,
            removing: false,
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
    /// The kernel skips the CQEs of successful event channel reads and unmasks
    /// (`IORING_FEAT_CQE_SKIP`, Linux 5.17): the wait then ends only for what the queue
    /// waits for, not at once for the read that re-arms the event channel.
    skip_success: bool,
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
        let skip_success = ring.params().is_feature_skip_cqe_on_success();
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
            skip_success,
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
                    EVTCHN_POLL | EVTCHN_CHAIN_POLL | EVTCHN_READ | EVTCHN_UNMASK => {
                        self.evtchn_reaped(tag, res, out);
                    }
                    // Its outcome shows as the poll's CQE, or not at all (already ended).
                    EVTCHN_REMOVE => self.evtchn_io.removing = false,
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

    /// Reports an event channel CQE, and ends the chain if the CQE does (see [`EvtchnIo`]).
    fn evtchn_reaped(&mut self, tag: u64, res: i32, out: &mut Vec<Reaped>) {
        let result =
            usize::try_from(res).map_err(|_| Errno::from_raw_os_error(res.saturating_neg()));
        let io = &mut self.evtchn_io;
        match tag {
            EVTCHN_POLL => out.push(Reaped::Evtchn(EvtchnOp::Poll, result)),
            EVTCHN_CHAIN_POLL => {
                // Already ended by a failed read or unmask: a kernel that also posts the
                // cancellation of the poll linked after it.
                if std::mem::take(&mut io.chain) {
                    out.push(Reaped::Evtchn(EvtchnOp::Poll, result));
                }
            }
            _ => {
                let op = if tag == EVTCHN_READ {
                    EvtchnOp::Read(io.read)
                } else {
                    EvtchnOp::Unmask
                };
                out.push(Reaped::Evtchn(op, result));
                // A skipping read or unmask posts a CQE only when it failed, and then the
                // kernel cancels the poll linked after it without a CQE: the chain ends here.
                if self.skip_success && std::mem::take(&mut io.chain) {
                    out.push(Reaped::Evtchn(EvtchnOp::Poll, Err(Errno::CANCELED)));
                }
            }
        }
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
        while self.slots_in_flight() > 0 || self.nbd_busy() || self.evtchn_io.chain {
            if self.evtchn_io.chain && !self.evtchn_io.removing {
                // The chain's poll would wait for a delivery that may never come.
                self.evtchn_remove_poll()?;
            }
            if let Err(e) = self.ring.submit_and_wait(1) {
                if e.raw_os_error() != Some(Errno::INTR.raw_os_error()) {
                    return Err(e);
                }
            }
            self.reap(out);
            if self.evtchn_io.chain && !self.evtchn_io.removing {
                // The removal found no poll: the read or unmask before it is still running.
                // Rare (and only when the queue ends): let it finish before trying again.
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
        Ok(())
    }
}

impl Drop for Uring {
    fn drop(&mut self) {
        // Wait for every request operation and the event channel's chain (its read and
        // write): the kernel may still write into bounce regions, grant mappings or
        // `evtchn_io`. Polls and timers point at nothing that dies here but the timespecs,
        // which the kernel copied at submission.
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

    /// Whether no completion comes within 50 ms (the kernel's task work, which issues a
    /// linked operation, runs meanwhile).
    fn quiet(u: &mut Uring) -> bool {
        let ts = types::Timespec::new().nsec(50_000_000);
        let args = types::SubmitArgs::new().timespec(&ts);
        match u.ring.submitter().submit_with_args(1, &args) {
            Ok(_) => {}
            Err(e) => assert_eq!(e.raw_os_error(), Some(Errno::TIME.raw_os_error()), "{e}"),
        }
        !u.has_completions()
    }

    /// A ring for `fd` in each mode the kernel has: with successful event channel reads and
    /// unmasks posting no CQE (where it can), and posting one (older kernels).
    fn rings(fd: BorrowedFd<'_>) -> Vec<Uring> {
        let skipping = Uring::new(1, 1, None, &[fd], false, false).unwrap();
        let mut posting = Uring::new(1, 1, None, &[fd], false, false).unwrap();
        posting.skip_success = false;
        if skipping.skip_success {
            vec![skipping, posting]
        } else {
            vec![posting]
        }
    }

    /// A stream socket standing in for the evtchn device: what the peer writes are
    /// deliveries (ports), what the ring writes are unmasks.
    fn device() -> (std::os::fd::OwnedFd, std::os::fd::OwnedFd) {
        rustix::net::socketpair(
            rustix::net::AddressFamily::UNIX,
            rustix::net::SocketType::STREAM,
            rustix::net::SocketFlags::CLOEXEC | rustix::net::SocketFlags::NONBLOCK,
            None,
        )
        .unwrap()
    }

    /// A non-blocking eventfd: it refuses reads and writes of 4 bytes.
    fn eventfd() -> std::os::fd::OwnedFd {
        let flags = rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK;
        rustix::event::eventfd(1, flags).unwrap()
    }

    #[test]
    fn the_chain_unmasks_reads_one_delivery_then_polls_and_only_the_poll_posts_a_cqe() {
        let (ours, peer) = device();
        for mut u in rings(ours.as_fd()) {
            let skip = u.skip_success;
            // The delivery that woke the queue, and one that came while the port was masked
            // (a request pushed after the ring's final check).
            let deliveries = [5u32.to_ne_bytes(), 6u32.to_ne_bytes()].concat();
            rustix::io::write(&peer, &deliveries).unwrap();
            u.evtchn_rearm(ours.as_fd(), Some(5)).unwrap();
            let mut got = evtchn_cqes(&mut u, if skip { 1 } else { 3 });
            got.sort_by_key(|(op, _)| format!("{op:?}"));
            let all = [
                (EvtchnOp::Poll, Ok(1)),
                (EvtchnOp::Read(5u32.to_ne_bytes()), Ok(4)),
                (EvtchnOp::Unmask, Ok(4)),
            ];
            assert_eq!(
                got,
                if skip { &all[..1] } else { &all[..] },
                "skip {skip}: one delivery read; the poll fires for the second"
            );
            assert!(!u.evtchn_io.chain, "the poll's CQE ends the chain");
            let mut unmasked = [0u8; 8];
            assert_eq!(rustix::io::read(&peer, &mut unmasked), Ok(4));
            assert_eq!(unmasked[..4], 5u32.to_ne_bytes(), "the port, once");
            // The second delivery is read by the next chain, whose poll then waits.
            u.evtchn_rearm(ours.as_fd(), None).unwrap();
            if !skip {
                assert_eq!(
                    evtchn_cqes(&mut u, 1),
                    [(EvtchnOp::Read(6u32.to_ne_bytes()), Ok(4))]
                );
            }
            assert!(
                quiet(&mut u),
                "skip {skip}: nothing delivered: the poll waits"
            );
            assert_eq!(
                rustix::io::read(&ours, &mut unmasked),
                Err(Errno::AGAIN),
                "skip {skip}: the second delivery was read"
            );
            assert!(u.evtchn_io.chain);
            assert!(
                u.evtchn_rearm(ours.as_fd(), None).is_err(),
                "no chain while one may still use the read's buffer"
            );
            // Draining removes the waiting poll, which ends the chain.
            let mut out = Vec::new();
            u.drain(&mut out).unwrap();
            assert!(!u.evtchn_io.chain && !u.evtchn_io.removing);
            assert!(
                matches!(
                    out[..],
                    [Reaped::Evtchn(EvtchnOp::Poll, Err(Errno::CANCELED))]
                ),
                "skip {skip}: {out:?}"
            );
        }
    }

    #[test]
    fn a_failed_read_ends_the_chain_with_its_cqe_and_asks_for_another_poll() {
        // An eventfd refuses a 4-byte read.
        let efd = eventfd();
        for mut u in rings(efd.as_fd()) {
            let skip = u.skip_success;
            u.evtchn_rearm(efd.as_fd(), None).unwrap();
            let got = evtchn_cqes(&mut u, 2);
            assert!(
                matches!(
                    got[..],
                    [
                        (EvtchnOp::Read(_), Err(Errno::INVAL)),
                        (EvtchnOp::Poll, Err(Errno::CANCELED))
                    ]
                ),
                "skip {skip}: {got:?}"
            );
            assert!(!u.evtchn_io.chain);
            assert!(
                quiet(&mut u),
                "skip {skip}: no other CQE (the poll is gone)"
            );
        }
    }

    #[test]
    fn a_failed_unmask_cancels_the_read_and_poll_linked_after_it() {
        // An eventfd refuses a 4-byte write (and a 4-byte read, which must not even start).
        let efd = eventfd();
        for mut u in rings(efd.as_fd()) {
            let skip = u.skip_success;
            u.evtchn_rearm(efd.as_fd(), Some(5)).unwrap();
            let got = evtchn_cqes(&mut u, if skip { 2 } else { 3 });
            let cancelled = Err(Errno::CANCELED);
            let expected = if skip {
                vec![
                    (EvtchnOp::Unmask, Err(Errno::INVAL)),
                    (EvtchnOp::Poll, cancelled),
                ]
            } else {
                vec![
                    (EvtchnOp::Unmask, Err(Errno::INVAL)),
                    (EvtchnOp::Read([0; EVTCHN_READ_BYTES]), cancelled),
                    (EvtchnOp::Poll, cancelled),
                ]
            };
            assert_eq!(got, expected, "skip {skip}");
            assert!(!u.evtchn_io.chain);
            assert!(quiet(&mut u), "skip {skip}: nothing else");
        }
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
