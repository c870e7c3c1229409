//! The loop of one queue: event → consume and validate → reach guest memory → SQEs →
//! completions → responses → notify → re-arm the event.
//!
//! In-flight requests live in a table indexed by our own slot number (never by the guest's
//! id, which may repeat); the table has one slot per ring entry, so a frontend can never have
//! more requests outstanding than there are slots, and nothing is allocated per request in
//! the steady state (a request's segments are stored inline, bounce regions and iovec arrays
//! are preallocated per slot).

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ring::{
    BackRing, DeviceLimits, FlushKind, IndirectPage, Op, Parsed, Request, RingError, Status,
};
use rustix::io::Errno;
use shmem::{SharedMem, PAGE_SIZE};
use xen::{
    Access, CopyOp, EventChannel, GrantAddr, GrantMapping, GrantRef, GrantStatus, Platform, Port,
};

use super::observer::QueueObserver;
use super::persistent::{map_counted, PersistentGrants, LRU_INTERVAL};
use super::retire::{Retired, MAX_RETIRED};
use super::stats::{Stats, StatsSnapshot};
use super::uring::{Completion, Control, Data, Reaped, Region, Uring};
use super::{DataplaneError, Features, GrantMode, QueueExit, QueueParams};
use crate::device::{Device, DeviceKind};

/// Large bounce regions for indirect requests in copy mode (each `max_indirect_segments`
/// pages); an indirect request that finds none free waits (counted in `oo_req`).
const LARGE_REGIONS: usize = 8;
/// The longest late-EOI delay (Linux: `HZ` jiffies).
const MAX_EOI_DELAY: Duration = Duration::from_secs(1);
/// A pause this long between two wake-ups ends a burst of activity, whose counters are then
/// logged (target [`ACTIVITY_TARGET`], debug level).
const ACTIVITY_GAP: Duration = Duration::from_secs(1);
/// The tracing target of the per-burst counters: `RUST_LOG=info,blkbackd::activity=debug`
/// shows what each burst of requests cost (tests/e2e's perf workload pauses between figures).
const ACTIVITY_TARGET: &str = "blkbackd::activity";

/// Where a slot is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Unused.
    Free,
    /// Taken off the ring, waiting for a barrier's drain or a bounce region.
    Deferred,
    /// A write whose data must be grant-copied into its bounce region before submission.
    CopyIn,
    /// Submitted to the io_uring.
    InFlight,
    /// A read whose data must be grant-copied from its bounce region to the guest.
    CopyOut,
}

#[derive(Debug)]
struct Slot {
    stage: Stage,
    req: Request,
    start: Instant,
    region: Option<Region>,
    /// Bytes of data (reads and writes).
    len: usize,
    /// Already counted in `oo_req`.
    waited: bool,
}

/// What the queue's thread owns.
pub(super) struct Queue {
    // Field order matters for Drop: the io_uring (which waits for I/O in flight and releases
    // the mappings it holds) goes first, before anything its operations name (the device fd,
    // the event channel, grant mappings); then persistent grants, then the ring mapping.
    uring: Uring,
    pgrants: Option<PersistentGrants>,
    /// Mappings whose I/O completed, waiting for the kernel to let go (empty in copy mode).
    retired: Retired,
    ring_map: Arc<GrantMapping>,
    back: BackRing,
    evtchn: Box<dyn EventChannel>,
    local_port: Port,
    stop_fd: Arc<OwnedFd>,
    device: Arc<Device>,
    platform: Arc<dyn Platform>,
    frontend: xen::DomId,
    grant_mode: GrantMode,
    features: Features,
    max_indirect_segments: u16,
    stats: Arc<Stats>,
    on_exit: Option<Box<dyn FnOnce() + Send>>,
    name: String,

    slots: Vec<Slot>,
    free: Vec<usize>,
    deferred: Option<usize>,
    uring_discard: bool,

    // Scratch, reused every pass.
    reaped: Vec<Reaped>,
    ports: Vec<Port>,
    batch: Vec<usize>,
    failed: Vec<bool>,
    seg_maps: Vec<Option<Arc<GrantMapping>>>,
    np_grefs: Vec<GrantRef>,
    ind_pages: Vec<IndirectPage>,

    // Late EOI (XSA-332).
    eoi_due: bool,
    /// A slot was freed since the flag was last cleared.
    freed: bool,
    /// This queue's share of the shared gauges, as last added.
    gauge_in_flight: u64,
    gauge_pgrants: u64,
    /// Requests consumed since the port was last unmasked: an event is spurious only if
    /// none were (requests consumed by a pass that a completion woke count too, or a busy
    /// queue would see its own events as spurious).
    consumed_since_unmask: usize,
    spurious: u32,
    stopping: bool,
    broken: Option<ring::ProtocolViolation>,
    /// `--record`: `None` costs one branch per request.
    observer: Option<Box<dyn QueueObserver>>,
    /// The counters when the current burst of activity began, and when it was last active
    /// (the shared counters: with several queues a burst line covers all of them).
    burst_start: StatsSnapshot,
    last_active: Instant,
    /// When the current burst's first wake-up came, and this thread's CPU time then.
    burst_began: Option<Instant>,
    burst_cpu: Duration,
    /// `--poll-us`: zero, or how long to busy-poll before sleeping.
    poll: Duration,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Queue {
    pub(super) fn new(p: QueueParams, stop_fd: Arc<OwnedFd>) -> Result<Self, DataplaneError> {
        let pages = p.ring_refs.len();
        let observer = p.observer.clone().map(|o| o.queue(&p));
        if !(pages.is_power_of_two() && pages <= ring::MAX_RING_PAGES) {
            return Err(DataplaneError::RingPages(pages));
        }
        let ring_map = p
            .platform
            .grant_mapper()
            .map(p.frontend, &p.ring_refs, Access::ReadWrite)
            .map_err(DataplaneError::MapRing)?;
        let ring_mem =
            ring_map
                .writable()
                .ok_or(DataplaneError::MapRing(xen::GrantError::Invalid(
                    "the ring was mapped read-only",
                )))?;
        let back = BackRing::attach(&ring_mem, p.abi, pages).map_err(DataplaneError::Ring)?;
        let size = back.size() as usize;
        let max_indirect = p
            .max_indirect_segments
            .min(ring::MAX_INDIRECT_SEGMENTS as u16);
        let max_segs = usize::from(max_indirect).max(ring::MAX_SEGMENTS_PER_REQUEST);
        // Only persistent grants are mapped: a frontend without them (FreeBSD's, or Linux's
        // with feature_persistent=0) ends each grant as soon as its response arrives, which
        // with mappings would mean unmapping right after every completion, while the kernel
        // may still hold the pages (issue 21). Its data is grant-copied, as QEMU's qdisk does.
        let copy = p.grant_mode == GrantMode::Copy || !p.persistent_grants;
        let grant_mode = if copy {
            GrantMode::Copy
        } else {
            GrantMode::Map
        };
        let nr_large = if max_indirect > 0 { LARGE_REGIONS } else { 0 };
        let mut evtchn = p
            .platform
            .open_event_channel()
            .map_err(DataplaneError::EventChannel)?;
        // The handle can bind the frontend's ports only (Linux refuses to restrict to dom0).
        if p.frontend != 0 {
            evtchn
                .restrict(p.frontend)
                .map_err(DataplaneError::EventChannel)?;
        }
        let local_port = evtchn
            .bind_interdomain(p.frontend, p.port)
            .map_err(DataplaneError::EventChannel)?;
        let files = [p.device.fd(), evtchn.as_fd(), stop_fd.as_fd()];
        let uring = Uring::new(size, copy, max_segs, nr_large, max_segs, &files)
            .map_err(DataplaneError::Uring)?;
        let pgrants = (!copy).then(|| {
            PersistentGrants::new(
                p.frontend,
                p.max_persistent_grants,
                p.persistent_grant_timeout,
                Arc::clone(&p.stats),
            )
        });
        let slots = (0..size)
            .map(|_| Slot {
                stage: Stage::Free,
                req: Request {
                    id: 0,
                    operation: 0,
                    op: Op::Flush(FlushKind::Cache),
                },
                start: Instant::now(),
                region: None,
                len: 0,
                waited: false,
            })
            .collect();
        Ok(Self {
            platform: p.platform,
            frontend: p.frontend,
            device: p.device,
            grant_mode,
            features: p.features,
            max_indirect_segments: max_indirect,
            stats: p.stats,
            on_exit: p.on_exit,
            name: p.name,
            uring,
            pgrants,
            retired: Retired::new(p.unmap_grace),
            ring_map: Arc::new(ring_map),
            back,
            evtchn,
            local_port,
            stop_fd,
            slots,
            free: (0..size).rev().collect(),
            deferred: None,
            uring_discard: true,
            reaped: Vec::with_capacity(size * 2 + 8),
            ports: Vec::with_capacity(16),
            batch: Vec::with_capacity(size),
            failed: Vec::with_capacity(size),
            seg_maps: Vec::with_capacity(max_segs),
            np_grefs: Vec::with_capacity(max_segs),
            ind_pages: (0..ring::MAX_INDIRECT_PAGES)
                .map(|_| IndirectPage::new())
                .collect(),
            eoi_due: false,
            freed: false,
            gauge_in_flight: 0,
            gauge_pgrants: 0,
            consumed_since_unmask: 0,
            spurious: 0,
            stopping: false,
            broken: None,
            observer,
            burst_start: StatsSnapshot::default(),
            last_active: Instant::now(),
            burst_began: None,
            burst_cpu: Duration::ZERO,
            poll: p.poll,
        })
    }

    /// Runs the queue until stopped, then tears it down.
    pub(super) fn run(mut self, finished: &AtomicBool) -> QueueExit {
        let exit = match self.serve() {
            Ok(()) => match self.broken {
                Some(v) => QueueExit::Protocol(v),
                None => QueueExit::Stopped,
            },
            Err(e) => QueueExit::Failed(e),
        };
        if let Some(r) = self.observer.as_mut() {
            r.exit(&exit);
        }
        if let QueueExit::Protocol(v) = &exit {
            tracing::warn!(queue = %self.name, "frontend broke the ring protocol, ring halted: {v}");
        }
        self.teardown();
        let on_exit = self.on_exit.take();
        // Everything is released (I/O drained, grants unmapped, port unbound) before anyone
        // is told the queue has ended.
        drop(self);
        finished.store(true, Ordering::Release);
        if let Some(f) = on_exit {
            f();
        }
        exit
    }

    fn teardown(&mut self) {
        // Drain whatever is still in flight (only after a local failure), retiring its
        // mappings; then every mapping waits out its grace before the fields drop in order:
        // io_uring, persistent grants, ring mapping.
        let mut reaped = Vec::new();
        if let Err(e) = self.uring.drain(&mut reaped) {
            // The io_uring's own drop leaks what it cannot wait for.
            tracing::error!(queue = %self.name, "io_uring wait failed while draining: {e}");
        }
        let now = Instant::now();
        for r in reaped {
            if let Reaped::Slot(c) = r {
                self.retired.retire_all(c.guards, now);
            }
        }
        if let Some(pg) = self.pgrants.as_mut() {
            pg.clear(&mut self.retired);
        }
        self.retired.release_all();
        self.sync_gauges();
        self.log_burst();
        if let Err(e) = self.evtchn.unbind(self.local_port) {
            tracing::debug!(queue = %self.name, "unbinding the event channel: {e}");
        }
    }

    fn serve(&mut self) -> Result<(), String> {
        let ring_map = Arc::clone(&self.ring_map);
        let mem = ring_map
            .writable()
            .ok_or("the shared ring is mapped read-only")?;
        self.uring
            .poll(Control::Event, self.evtchn.as_fd())
            .map_err(|e| format!("arming the event poll: {e}"))?;
        let stop = Arc::clone(&self.stop_fd);
        self.uring
            .poll(Control::Stop, stop.as_fd())
            .map_err(|e| format!("arming the stop poll: {e}"))?;
        if self.pgrants.is_some() {
            self.uring
                .timer(Control::Tick, LRU_INTERVAL)
                .map_err(|e| e.to_string())?;
        }
        loop {
            let mut reaped = std::mem::take(&mut self.reaped);
            self.uring.reap(&mut reaped);
            let mut event = false;
            // Timers (purge ticks, EOI delays) are not activity: only events and completions.
            let active = reaped
                .iter()
                .any(|r| matches!(r, Reaped::Control(Control::Event) | Reaped::Slot(_)));
            for r in reaped.drain(..) {
                match r {
                    Reaped::Control(Control::Event) => event = true,
                    Reaped::Control(Control::Stop) => self.stopping = true,
                    Reaped::Control(Control::EoiTimer) => self.unmask()?,
                    Reaped::Control(Control::Tick) => self.tick()?,
                    Reaped::Slot(c) => self.complete(&mem, c),
                }
            }
            self.reaped = reaped;
            if active {
                let now = Instant::now();
                if now.saturating_duration_since(self.last_active) >= ACTIVITY_GAP {
                    self.log_burst();
                }
                self.burst_began.get_or_insert(now);
                self.last_active = now;
            }
            if event {
                Stats::add(&self.stats.events, 1);
                if let Some(r) = self.observer.as_mut() {
                    r.event();
                }
                self.ports.clear();
                self.evtchn
                    .pending(&mut self.ports)
                    .map_err(|e| format!("event channel: {e}"))?;
                self.eoi_due = true;
            }
            self.copy_out(&mem);
            loop {
                self.freed = false;
                self.start_deferred(&mem);
                self.consumed_since_unmask += if self.stopping || self.broken.is_some() {
                    0
                } else {
                    self.consume(&mem)
                };
                self.copy_in(&mem);
                // A request that waits (for a barrier's drain or a bounce region) may have
                // become startable by a slot freed after it was tried, with no completion
                // left to wake us: try again (the loop ends once nothing more is freed).
                if !(self.deferred.is_some() && self.freed) {
                    break;
                }
            }
            if self.eoi_due {
                self.eoi_due = false;
                self.late_eoi(self.consumed_since_unmask > 0 || self.free.is_empty())?;
            }
            self.sync_gauges();
            self.push(&mem)?;
            let busy = self.slots.len() - self.free.len();
            if (self.stopping || self.broken.is_some()) && busy == 0 {
                return Ok(());
            }
            let want = usize::from(!self.uring.has_completions());
            if want == 1 && !self.poll.is_zero() && !self.stopping && self.poll_for_work(&mem)? {
                continue;
            }
            Stats::add(&self.stats.uring_enters, 1);
            self.uring
                .submit_and_wait(want)
                .map_err(|e| format!("io_uring_enter: {e}"))?;
        }
    }

    /// Publishes the responses written and notifies the frontend if it asked.
    fn push(&mut self, mem: &SharedMem<'_>) -> Result<(), String> {
        match self.back.push_responses(mem) {
            Ok(true) => {
                Stats::add(&self.stats.notifies, 1);
                // The frontend may have closed its end (a reboot in progress): as Linux's
                // notify_remote_via_irq, carry on; the control plane sees the state change.
                if let Err(e) = self.evtchn.notify(self.local_port) {
                    tracing::debug!(queue = %self.name, "notify: {e}");
                }
                Ok(())
            }
            Ok(false) => Ok(()),
            Err(e) => Err(format!("pushing responses: {e}")),
        }
    }

    /// Logs what the burst of activity that just ended cost (when it served any request) and
    /// starts the next one: the counters' changes, how long the burst lasted (`wall_us`, first
    /// to last wake-up) and how much of it this thread ran (`cpu_us`, user and system).
    fn log_burst(&mut self) {
        let now = self.stats.snapshot();
        let d = now.since(&self.burst_start);
        self.burst_start = now;
        let began = self.burst_began.take();
        if !tracing::enabled!(target: ACTIVITY_TARGET, tracing::Level::DEBUG) {
            return;
        }
        let cpu_now = thread_cpu_time();
        let cpu = cpu_now.saturating_sub(std::mem::replace(&mut self.burst_cpu, cpu_now));
        if d.completed == 0 {
            return;
        }
        let wall = began.map_or(Duration::ZERO, |b| {
            self.last_active.saturating_duration_since(b)
        });
        let mut line = format!(" wall_us={} cpu_us={}", wall.as_micros(), cpu.as_micros());
        for (name, v) in d.fields() {
            if v != 0 {
                line.push_str(&format!(" {name}={v}"));
            }
        }
        tracing::debug!(target: ACTIVITY_TARGET, queue = %self.name, "burst:{line}");
    }

    /// Linux's late EOI: unmask now if the wake-up found work, else count it as spurious and,
    /// from the second in a row, unmask only after a doubling delay.
    fn late_eoi(&mut self, found_work: bool) -> Result<(), String> {
        if found_work {
            self.spurious = 0;
            return self.unmask();
        }
        Stats::add(&self.stats.spurious_events, 1);
        self.spurious = self.spurious.saturating_add(1);
        if self.spurious < 2 {
            return self.unmask();
        }
        let shift = (self.spurious - 2).min(20);
        let delay = Duration::from_millis(1u64 << shift).min(MAX_EOI_DELAY);
        self.uring
            .timer(Control::EoiTimer, delay)
            .map_err(|e| format!("arming the EOI timer: {e}"))
    }

    fn unmask(&mut self) -> Result<(), String> {
        self.consumed_since_unmask = 0;
        self.evtchn
            .unmask(self.local_port)
            .map_err(|e| format!("unmask: {e}"))?;
        self.uring
            .poll(Control::Event, self.evtchn.as_fd())
            .map_err(|e| format!("arming the event poll: {e}"))
    }

    /// Moves the shared gauges by this queue's change since the last call, so that queues
    /// sharing one [`Stats`] add up instead of overwriting each other.
    fn sync_gauges(&mut self) {
        let busy = (self.slots.len() - self.free.len()) as u64;
        let pg = self.pgrants.as_ref().map_or(0, |p| p.len() as u64);
        for (gauge, last, now) in [
            (&self.stats.in_flight, &mut self.gauge_in_flight, busy),
            (&self.stats.persistent_grants, &mut self.gauge_pgrants, pg),
        ] {
            if now > *last {
                gauge.fetch_add(now - *last, Ordering::Relaxed);
            } else {
                gauge.fetch_sub(*last - now, Ordering::Relaxed);
            }
            *last = now;
        }
    }

    fn tick(&mut self) -> Result<(), String> {
        let now = Instant::now();
        self.retired.release_due(now);
        if let Some(pg) = self.pgrants.as_mut() {
            pg.purge(now, &mut self.retired);
        }
        self.sync_gauges();
        self.uring
            .timer(Control::Tick, LRU_INTERVAL)
            .map_err(|e| e.to_string())
    }

    fn limits(&self) -> DeviceLimits {
        DeviceLimits {
            sectors: self.device.sectors(),
            logical_block_size: self.device.logical_block_size(),
            read_only: self.features.read_only || self.device.read_only(),
            max_indirect_segments: self.max_indirect_segments,
            discard: self.features.discard && self.device.discard(),
            secure_discard: self.features.secure_discard && self.device.secure_discard(),
        }
    }

    /// Takes requests off the ring while slots are free. Returns how many were consumed.
    fn consume(&mut self, mem: &SharedMem<'_>) -> usize {
        let limits = self.limits();
        let mut n = 0;
        loop {
            while self.deferred.is_none() && !self.free.is_empty() {
                match self.back.next_request(mem) {
                    Ok(Some(raw)) => {
                        n += 1;
                        self.accept(mem, &raw, &limits);
                    }
                    Ok(None) => break,
                    Err(e) => {
                        self.ring_error(e);
                        return n;
                    }
                }
            }
            // A polling queue asks for an event only before it sleeps (`poll_for_work`).
            if self.deferred.is_some() || self.free.is_empty() || !self.poll.is_zero() {
                return n;
            }
            match self.back.final_check_for_requests(mem) {
                Ok(true) => {}
                Ok(false) => return n,
                Err(e) => {
                    self.ring_error(e);
                    return n;
                }
            }
        }
    }

    /// Busy-polls (`--poll-us`) for completions and new requests before the queue sleeps,
    /// with the frontend's events left off; when nothing came, asks for an event at the next
    /// request (`RING_FINAL_CHECK_FOR_REQUESTS`) so that sleeping misses nothing. `true`:
    /// there is work, go round again.
    fn poll_for_work(&mut self, mem: &SharedMem<'_>) -> Result<bool, String> {
        if self
            .uring
            .submit_queued()
            .map_err(|e| format!("io_uring_enter: {e}"))?
        {
            Stats::add(&self.stats.uring_enters, 1);
        }
        let takes_requests =
            self.broken.is_none() && self.deferred.is_none() && !self.free.is_empty();
        let deadline = Instant::now() + self.poll;
        loop {
            if self.uring.has_completions() {
                return Ok(true);
            }
            if takes_requests {
                match self.back.has_unconsumed_requests(mem) {
                    Ok(false) => {}
                    Ok(true) => return Ok(true),
                    Err(e) => {
                        self.ring_error(e);
                        return Ok(true);
                    }
                }
            }
            if Instant::now() >= deadline {
                break;
            }
            std::hint::spin_loop();
        }
        if !takes_requests {
            // Only a completion can make progress now, and it wakes the sleeper.
            return Ok(false);
        }
        match self.back.final_check_for_requests(mem) {
            Ok(more) => Ok(more),
            Err(e) => {
                self.ring_error(e);
                Ok(true)
            }
        }
    }

    fn ring_error(&mut self, e: RingError) {
        match e {
            RingError::Protocol(v) => self.broken = Some(v),
            other => {
                tracing::error!(queue = %self.name, "ring access failed: {other}");
                self.stopping = true;
            }
        }
    }

    /// Validates one request and starts it (or answers it at once).
    fn accept(&mut self, mem: &SharedMem<'_>, raw: &ring::RawRequest, limits: &DeviceLimits) {
        if let Some(r) = self.observer.as_mut() {
            r.slot(raw, limits);
        }
        let req = match ring::parse(raw, limits) {
            Ok(Parsed::Ready(req)) => req,
            Ok(Parsed::Indirect(h)) => match self.fetch_indirect(&h) {
                Ok(()) => match ring::parse_indirect(
                    &h,
                    self.ind_pages.get(..h.pages()).unwrap_or(&[]),
                    limits,
                ) {
                    Ok(req) => req,
                    Err(rej) => return self.reject(mem, &rej),
                },
                Err(status) => {
                    tracing::debug!(queue = %self.name, id = h.id, "indirect pages unreachable: {status:?}");
                    return self.put(mem, &h.response(Status::Error));
                }
            },
            Err(rej) => return self.reject(mem, &rej),
        };
        let Some(slot) = self.free.pop() else {
            // Cannot happen: the ring hands out no more requests than there are slots.
            return self.put(mem, &req.response(Status::Error));
        };
        let s = &mut self.slots[slot];
        s.req = req;
        s.start = Instant::now();
        s.stage = Stage::Deferred;
        s.waited = false;
        self.start(mem, slot);
    }

    fn reject(&mut self, mem: &SharedMem<'_>, rej: &ring::Rejection) {
        tracing::debug!(queue = %self.name, "{rej}");
        self.put(mem, &rej.response());
    }

    fn put(&mut self, mem: &SharedMem<'_>, rsp: &ring::Response) {
        if let Some(r) = self.observer.as_mut() {
            r.response(rsp);
        }
        if rsp.status != Status::Okay {
            Stats::add(&self.stats.errors, 1);
        }
        if let Err(e) = self.back.put_response(mem, rsp) {
            tracing::error!(queue = %self.name, "writing a response: {e}");
        }
    }

    /// Copies the indirect pages of `h` once into the first pages of `self.ind_pages`
    /// (preallocated, reused).
    fn fetch_indirect(&mut self, h: &ring::IndirectHeader) -> Result<(), GrantStatus> {
        let r = self.fetch_indirect_inner(h);
        // The scratch list must not keep mappings alive past this request.
        self.seg_maps.clear();
        r
    }

    fn fetch_indirect_inner(&mut self, h: &ring::IndirectHeader) -> Result<(), GrantStatus> {
        let grefs = h.page_grefs();
        let pages = self
            .ind_pages
            .get_mut(..grefs.len())
            .ok_or(GrantStatus::GeneralError)?;
        match self.grant_mode {
            GrantMode::Copy => {
                let domid = self.frontend;
                let mut ops: Vec<CopyOp<'_>> = pages
                    .iter_mut()
                    .zip(grefs)
                    .map(|(page, &gref)| CopyOp::FromGuest {
                        src: GrantAddr {
                            domid,
                            gref,
                            offset: 0,
                        },
                        dst: &mut page.as_bytes_mut()[..],
                        status: GrantStatus::GeneralError,
                    })
                    .collect();
                Stats::add(&self.stats.copy_calls, 1);
                Stats::add(&self.stats.copy_segs, ops.len() as u64);
                self.platform
                    .grant_copier()
                    .copy(&mut ops)
                    .map_err(|_| GrantStatus::GeneralError)?;
                if let Some(bad) = ops
                    .iter()
                    .map(CopyOp::status)
                    .find(|s| *s != GrantStatus::Okay)
                {
                    return Err(bad);
                }
            }
            GrantMode::Map => {
                let status = |e: xen::GrantError| match e {
                    xen::GrantError::Status(s) => s,
                    _ => GrantStatus::GeneralError,
                };
                // As Linux (xen_blkbk_parse_indirect): indirect pages come from the
                // persistent cache when there is one; the rest are mapped read-only for this
                // request only. Either way each page is read once, into private memory.
                let now = Instant::now();
                let mapper = self.platform.grant_mapper();
                self.seg_maps.clear();
                self.np_grefs.clear();
                for &gref in grefs {
                    let cached = match self.pgrants.as_mut() {
                        Some(pg) => pg.get_readable(mapper, gref, now).map_err(status)?,
                        None => None,
                    };
                    if cached.is_none() {
                        self.np_grefs.push(gref);
                    }
                    self.seg_maps.push(cached);
                }
                let once = if self.np_grefs.is_empty() {
                    None
                } else {
                    Some(
                        map_counted(
                            &self.stats,
                            mapper,
                            self.frontend,
                            &self.np_grefs,
                            Access::ReadOnly,
                        )
                        .map_err(status)?,
                    )
                };
                let mut k = 0;
                for (page, cached) in pages.iter_mut().zip(&self.seg_maps) {
                    let (mem, offset) = match (cached, &once) {
                        (Some(m), _) => (m.mem(), 0),
                        (None, Some(m)) => {
                            k += 1;
                            (m.mem(), (k - 1) * PAGE_SIZE)
                        }
                        (None, None) => return Err(GrantStatus::GeneralError),
                    };
                    let sub = mem
                        .subregion(offset, PAGE_SIZE)
                        .map_err(|_| GrantStatus::GeneralError)?;
                    sub.read_into(0, &mut page.as_bytes_mut()[..])
                        .map_err(|_| GrantStatus::GeneralError)?;
                }
            }
        }
        Ok(())
    }

    /// Issues a validated request in slot `slot` (stage `Deferred`), or leaves it deferred
    /// when it must wait.
    fn start(&mut self, mem: &SharedMem<'_>, slot: usize) {
        let (barrier, flush_kind) = match &self.slots[slot].req.op {
            Op::Write { flush, .. } => (*flush == Some(FlushKind::Barrier), *flush),
            Op::Flush(k) => (*k == FlushKind::Barrier, Some(*k)),
            _ => (false, None),
        };
        let unsupported = match flush_kind {
            Some(FlushKind::Cache) => !self.features.flush,
            Some(FlushKind::Barrier) => !self.features.barrier,
            None => false,
        };
        if unsupported {
            return self.finish(mem, slot, Status::NotSupported);
        }
        // A barrier waits until every other request has completed (xen_blk_drain_io).
        let others_busy = self.slots.len() - self.free.len() - 1;
        if barrier && others_busy > 0 {
            self.defer(slot, false);
            return;
        }
        let device = Arc::clone(&self.device);
        let fd = device.fd();
        let op = self.slots[slot].req.op.clone();
        match op {
            Op::Flush(_) => {
                Stats::add(&self.stats.f_req, 1);
                self.slots[slot].stage = Stage::InFlight;
                if let Err(e) = self.uring.submit_fsync(slot, fd) {
                    tracing::error!(queue = %self.name, "submitting a flush: {e}");
                    self.finish(mem, slot, Status::Error);
                }
            }
            Op::Discard {
                sector,
                nr_sectors,
                secure,
            } => {
                Stats::add(&self.stats.ds_req, 1);
                let (Some(offset), Some(len)) = (sector.bytes(), ring::Sector(nr_sectors).bytes())
                else {
                    return self.finish(mem, slot, Status::Error);
                };
                if len == 0 {
                    return self.finish(mem, slot, Status::Okay);
                }
                let block = matches!(device.kind(), DeviceKind::Block { .. });
                if secure || (block && !self.uring_discard) {
                    let status = match device.discard_sync(offset, len, secure) {
                        Ok(()) => Status::Okay,
                        Err(e) => {
                            tracing::debug!(queue = %self.name, "discard failed: {e}");
                            Status::Error
                        }
                    };
                    return self.finish(mem, slot, status);
                }
                self.slots[slot].stage = Stage::InFlight;
                if let Err(e) = self.uring.submit_discard(slot, fd, block, offset, len) {
                    tracing::error!(queue = %self.name, "submitting a discard: {e}");
                    self.finish(mem, slot, Status::Error);
                }
            }
            Op::Read(t) => self.start_rw(mem, slot, &t, false, false),
            Op::Write { transfer, flush } => {
                if flush.is_some() {
                    Stats::add(&self.stats.f_req, 1);
                }
                self.start_rw(mem, slot, &transfer, true, flush.is_some());
            }
        }
    }

    fn defer(&mut self, slot: usize, out_of_resources: bool) {
        let s = &mut self.slots[slot];
        if out_of_resources && !s.waited {
            s.waited = true;
            Stats::add(&self.stats.oo_req, 1);
        }
        s.stage = Stage::Deferred;
        self.deferred = Some(slot);
    }

    fn start_deferred(&mut self, mem: &SharedMem<'_>) {
        if let Some(slot) = self.deferred.take() {
            self.start(mem, slot);
        }
    }

    fn start_rw(
        &mut self,
        mem: &SharedMem<'_>,
        slot: usize,
        t: &ring::Transfer,
        write: bool,
        fsync: bool,
    ) {
        let Some(offset) = t.sector.bytes() else {
            return self.finish(mem, slot, Status::Error);
        };
        let len = usize::try_from(t.nr_sectors)
            .unwrap_or(usize::MAX)
            .saturating_mul(512);
        match self.grant_mode {
            GrantMode::Copy => {
                let region = if len <= super::uring::SMALL_REGION {
                    self.uring.pool_ref().small(slot)
                } else {
                    self.uring.pool().take_large()
                };
                let region = match region {
                    Some(r) if r.capacity() < len => {
                        // Validation bounds a request by the advertised segments, which
                        // size the regions: this cannot happen, but must not lose a region.
                        self.uring.pool().give_back(r);
                        return self.finish(mem, slot, Status::Error);
                    }
                    r => r,
                };
                let Some(region) = region else {
                    // No large region free: wait for one (counted like Linux's "out of
                    // requests"). With no large regions at all this cannot succeed.
                    if self.slots.len() - self.free.len() > 1 {
                        return self.defer(slot, true);
                    }
                    return self.finish(mem, slot, Status::Error);
                };
                self.count_rw(t, write);
                let s = &mut self.slots[slot];
                s.len = len;
                if write {
                    s.region = Some(region);
                    s.stage = Stage::CopyIn;
                    return;
                }
                s.stage = Stage::InFlight;
                let fd = self.device.fd();
                if let Err((e, r)) =
                    self.uring
                        .submit_rw(slot, fd, false, offset, Data::Bounce(region, len), false)
                {
                    tracing::error!(queue = %self.name, "submitting a read: {e}");
                    if let Some(r) = r {
                        self.uring.pool().give_back(r);
                    }
                    self.finish(mem, slot, Status::Error);
                }
            }
            GrantMode::Map => {
                if self.retired.len() >= MAX_RETIRED {
                    // Too many mappings waiting out their grace: wait for the next tick to
                    // release some (counted like Linux's "out of requests").
                    return self.defer(slot, true);
                }
                if let Err(e) = self.map_segments(slot, &t.segs, write) {
                    tracing::debug!(queue = %self.name, id = self.slots[slot].req.id, "mapping the request's grants failed: {e}");
                    self.uring.reset_slot(slot);
                    return self.finish(mem, slot, Status::Error);
                }
                self.count_rw(t, write);
                self.slots[slot].stage = Stage::InFlight;
                self.slots[slot].len = len;
                let fd = self.device.fd();
                if let Err((e, _)) =
                    self.uring
                        .submit_rw(slot, fd, write, offset, Data::Mapped, fsync)
                {
                    tracing::error!(queue = %self.name, "submitting I/O: {e}");
                    self.finish(mem, slot, Status::Error);
                }
            }
        }
    }

    fn count_rw(&self, t: &ring::Transfer, write: bool) {
        if write {
            Stats::add(&self.stats.wr_req, 1);
            Stats::add(&self.stats.wr_sect, t.nr_sectors);
        } else {
            Stats::add(&self.stats.rd_req, 1);
            Stats::add(&self.stats.rd_sect, t.nr_sectors);
        }
    }

    /// Maps a request's pages (persistent ones from the cache, the rest in one map call) and
    /// builds the slot's iovecs in segment order.
    fn map_segments(
        &mut self,
        slot: usize,
        segs: &ring::Segments,
        write: bool,
    ) -> Result<(), String> {
        let r = self.map_segments_inner(slot, segs, write);
        // The scratch list must not keep mappings alive past the request's own guards.
        self.seg_maps.clear();
        r
    }

    fn map_segments_inner(
        &mut self,
        slot: usize,
        segs: &ring::Segments,
        write: bool,
    ) -> Result<(), String> {
        let now = Instant::now();
        let mapper = self.platform.grant_mapper();
        self.seg_maps.clear();
        self.np_grefs.clear();
        for seg in segs.as_slice() {
            // A write only reads its pages: a grant the frontend made read-only serves it.
            let cached = match self.pgrants.as_mut() {
                Some(pg) if write => pg.get_readable(mapper, seg.gref, now),
                Some(pg) => pg.get(mapper, seg.gref, now),
                None => Ok(None),
            }
            .map_err(|e| e.to_string())?;
            if cached.is_none() {
                self.np_grefs.push(seg.gref);
            }
            self.seg_maps.push(cached);
        }
        let once = if self.np_grefs.is_empty() {
            None
        } else {
            // Linux maps a write's pages read-only: the device only reads them.
            let access = if write {
                Access::ReadOnly
            } else {
                Access::ReadWrite
            };
            Some(Arc::new(
                map_counted(&self.stats, mapper, self.frontend, &self.np_grefs, access)
                    .map_err(|e| e.to_string())?,
            ))
        };
        let mut k = 0;
        for (seg, cached) in segs.as_slice().iter().zip(&self.seg_maps) {
            let (m, base) = match (cached, &once) {
                (Some(m), _) => (m, 0),
                (None, Some(m)) => {
                    k += 1;
                    (m, (k - 1) * PAGE_SIZE)
                }
                (None, None) => return Err("segment without a mapping".into()),
            };
            self.uring
                .map_segment(
                    slot,
                    m,
                    base + seg.offset_bytes() as usize,
                    seg.len_bytes() as usize,
                    write,
                )
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Grant-copies the data of every write waiting in `CopyIn` into its bounce region, in one
    /// batch, and submits those whose copy succeeded.
    fn copy_in(&mut self, mem: &SharedMem<'_>) {
        self.batch.clear();
        self.batch.extend(
            self.slots
                .iter()
                .enumerate()
                .filter(|(_, s)| s.stage == Stage::CopyIn)
                .map(|(i, _)| i),
        );
        if self.batch.is_empty() {
            return;
        }
        self.grant_copy(true);
        let device = Arc::clone(&self.device);
        for bi in 0..self.batch.len() {
            let slot = self.batch[bi];
            let failed = self.failed[bi];
            let s = &mut self.slots[slot];
            let Some(region) = s.region.take() else {
                continue;
            };
            if failed {
                self.uring.pool().give_back(region);
                tracing::debug!(queue = %self.name, id = self.slots[slot].req.id, "grant copy of write data failed");
                self.finish(mem, slot, Status::Error);
                continue;
            }
            s.stage = Stage::InFlight;
            let (offset, fsync) = match &s.req.op {
                Op::Write { transfer, flush } => {
                    (transfer.sector.bytes().unwrap_or(0), flush.is_some())
                }
                _ => (0, false),
            };
            let len = s.len;
            if let Err((e, r)) = self.uring.submit_rw(
                slot,
                device.fd(),
                true,
                offset,
                Data::Bounce(region, len),
                fsync,
            ) {
                tracing::error!(queue = %self.name, "submitting a write: {e}");
                if let Some(r) = r {
                    self.uring.pool().give_back(r);
                }
                self.finish(mem, slot, Status::Error);
            }
        }
    }

    /// Grant-copies the data of every read waiting in `CopyOut` to the guest, in one batch,
    /// and answers them.
    fn copy_out(&mut self, mem: &SharedMem<'_>) {
        self.batch.clear();
        self.batch.extend(
            self.slots
                .iter()
                .enumerate()
                .filter(|(_, s)| s.stage == Stage::CopyOut)
                .map(|(i, _)| i),
        );
        if self.batch.is_empty() {
            return;
        }
        self.grant_copy(false);
        for bi in 0..self.batch.len() {
            let slot = self.batch[bi];
            if let Some(r) = self.slots[slot].region.take() {
                self.uring.pool().give_back(r);
            }
            let status = if self.failed[bi] {
                tracing::debug!(queue = %self.name, id = self.slots[slot].req.id, "grant copy of read data failed");
                Status::Error
            } else {
                Status::Okay
            };
            self.finish(mem, slot, status);
        }
    }

    /// One grant-copy batch over the slots in `self.batch`, between their bounce regions and
    /// their segments; sets `self.failed[i]` for each slot with a failed segment.
    fn grant_copy(&mut self, from_guest: bool) {
        self.failed.clear();
        self.failed.resize(self.batch.len(), false);
        let domid = self.frontend;
        let pool = self.uring.pool_ref();
        let mut ops: Vec<CopyOp<'_>> = Vec::new();
        let mut owner: Vec<usize> = Vec::new();
        let mut bi = 0;
        for (i, s) in self.slots.iter_mut().enumerate() {
            if self.batch.get(bi) != Some(&i) {
                continue;
            }
            let segs = match &s.req.op {
                Op::Read(t) | Op::Write { transfer: t, .. } => &t.segs,
                _ => {
                    bi += 1;
                    continue;
                }
            };
            let len = s.len;
            let Some(region) = s.region.as_mut() else {
                self.failed[bi] = true;
                bi += 1;
                continue;
            };
            let mut buf: &mut [u8] = pool.bytes(region, len);
            for seg in segs.as_slice() {
                let n = (seg.len_bytes() as usize).min(buf.len());
                let (chunk, rest) = std::mem::take(&mut buf).split_at_mut(n);
                buf = rest;
                let addr = GrantAddr {
                    domid,
                    gref: seg.gref,
                    offset: seg.offset_bytes() as u16,
                };
                ops.push(if from_guest {
                    CopyOp::FromGuest {
                        src: addr,
                        dst: chunk,
                        status: GrantStatus::GeneralError,
                    }
                } else {
                    CopyOp::ToGuest {
                        src: chunk,
                        dst: addr,
                        status: GrantStatus::GeneralError,
                    }
                });
                owner.push(bi);
            }
            bi += 1;
        }
        Stats::add(&self.stats.copy_calls, 1);
        Stats::add(&self.stats.copy_segs, ops.len() as u64);
        let all_failed = self.platform.grant_copier().copy(&mut ops).is_err();
        for (op, &b) in ops.iter().zip(&owner) {
            if all_failed || op.status() != GrantStatus::Okay {
                self.failed[b] = true;
            }
        }
    }

    /// Handles a slot whose I/O completed.
    fn complete(&mut self, mem: &SharedMem<'_>, c: Completion) {
        let slot = c.slot;
        if !c.guards.is_empty() {
            self.retired.retire_all(c.guards, Instant::now());
        }
        let Some(s) = self.slots.get_mut(slot) else {
            return;
        };
        s.region = c.region;
        match &c.result {
            Ok(()) => {}
            Err(e) => {
                let is_discard = matches!(s.req.op, Op::Discard { .. });
                if is_discard && *e == Errno::OPNOTSUPP && self.uring_discard {
                    // The kernel lacks the io_uring discard command: use the ioctl from now on.
                    self.uring_discard = false;
                    s.stage = Stage::Deferred;
                    self.start(mem, slot);
                    return;
                }
                tracing::debug!(queue = %self.name, id = s.req.id, "I/O failed: {e}");
            }
        }
        let ok = c.result.is_ok();
        let read = matches!(s.req.op, Op::Read(_));
        if ok && read && self.grant_mode == GrantMode::Copy {
            s.stage = Stage::CopyOut;
            return;
        }
        self.finish(mem, slot, if ok { Status::Okay } else { Status::Error });
    }

    /// Answers slot `slot` and frees it.
    fn finish(&mut self, mem: &SharedMem<'_>, slot: usize, status: Status) {
        let s = &mut self.slots[slot];
        let rsp = s.req.response(status);
        if let Some(r) = self.observer.as_mut() {
            r.finishing(&s.req, status);
        }
        if let Some(r) = s.region.take() {
            self.uring.pool().give_back(r);
        }
        let s = &mut self.slots[slot];
        self.stats.record_latency(s.start.elapsed());
        s.stage = Stage::Free;
        if self.deferred == Some(slot) {
            self.deferred = None;
        }
        self.free.push(slot);
        self.freed = true;
        self.put(mem, &rsp);
    }
}

/// CPU time this thread has used (`CLOCK_THREAD_CPUTIME_ID`).
fn thread_cpu_time() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(
        u64::try_from(t.tv_sec).unwrap_or(0),
        u32::try_from(t.tv_nsec).unwrap_or(0),
    )
}
