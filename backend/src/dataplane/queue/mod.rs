//! The loop of one queue: event → consume and validate → reach guest memory → SQEs →
//! completions → responses → notify → re-arm the event.
//!
//! The pieces it drives, each in its own module: the in-flight table (`slot`), the grant
//! mode's way to guest memory (`grant_access`: `grant_copy` or `grant_map`), the io_uring
//! executor (`uring`, with the `bounce` memory of copy mode), the wake-up policy (`wake`), and
//! what it reports: counters through `stats`' narrow [`Meter`](super::stats::Meter), the
//! observer (`observer`) for `--record`.

use std::collections::VecDeque;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use ring::{
    BackRing, DeviceLimits, IndirectHeader, IndirectPage, Parsed, ProtocolViolation, RawRequest,
    Request, RingError, Status,
};
use shmem::SharedMem;
use xen::{Access, GrantError, GrantMapping, GrantRef};

use super::bounce::{BounceMem, BouncePool};
use super::error::QueueError;
use super::grant_access::{Frontend, GrantAccess};
use super::grant_copy::GrantCopy;
use super::grant_map::GrantMap;
use super::observer::QueueObserver;
use super::persistent::PersistentGrants;
use super::slot::Slots;
use super::stats::{Bursts, Count, GaugeShare, Meter, Stats};
use super::uring::{Control, EvtchnOp, Reaped, Uring};
use super::wake::{Polled, Wake};
use super::{DataplaneError, Features, GrantMode, QueueExit, QueueParams};
use crate::device::Device;
use crate::inflight::QueueLog;

mod request;

/// Indirect requests are parked as the ring is consumed and started together, the pages of
/// all of them read in one grant operation: up to this many pages at a time.
const PARKED_PAGES: usize = 32;

/// Large bounce regions for indirect requests in copy mode (each `max_indirect_segments`
/// pages); an indirect request that finds none free waits (counted in `oo_req`).
const LARGE_REGIONS: usize = 8;

/// What the queue's thread owns.
pub(super) struct Queue {
    // Field order matters for Drop: the io_uring (which waits for I/O in flight and releases
    // what it holds) goes first, before anything its operations name (the device fd, the
    // event channel, grant mappings, bounce memory); then the grant access (persistent
    // grants, retired mappings), then the ring mapping.
    uring: Uring,
    grants: Box<dyn GrantAccess>,
    ring_map: Arc<GrantMapping>,
    back: BackRing,
    wake: Wake,
    stop_fd: Arc<OwnedFd>,
    device: Arc<Device>,
    features: Features,
    max_indirect_segments: u16,
    stats: Arc<Stats>,
    gauges: GaugeShare,
    bursts: Bursts,
    /// `--record`: `None` costs one branch per request.
    observer: Option<Box<dyn QueueObserver>>,
    on_exit: Option<Box<dyn FnOnce() + Send>>,
    name: String,

    slots: Slots,
    /// The kernel has the io_uring discard command (else `BLKDISCARD` from now on).
    uring_discard: bool,
    stopping: bool,
    broken: Option<ProtocolViolation>,
    /// The queue's part of the disk's in-flight log, if the control plane gave one.
    log: Option<QueueLog>,
    /// Requests a dead backend had consumed and not answered, to start again (oldest first)
    /// before the ring is read further: their log entries and slots as copied.
    backlog: VecDeque<(u32, RawRequest)>,
    /// The queue took over from a backend that died: the frontend is notified once.
    resumed: bool,

    /// Indirect requests consumed and waiting for their pages (see [`PARKED_PAGES`]).
    parked: Vec<(IndirectHeader, Option<u32>)>,
    /// Requests validated and waiting, in ring order, behind one that waits to start.
    ready: VecDeque<(Request, Option<u32>)>,

    // Scratch, reused every pass.
    reaped: Vec<Reaped>,
    /// The time at the start of this pass: one clock read per pass, not per request (in a
    /// PV dom0 the vDSO has no clock and each read is a system call through Xen).
    now: Instant,
    /// When the last wait that could block began (its pass's start), for [`Wake::waited`].
    blocked_since: Option<Instant>,
    parked_ok: Vec<bool>,
    batch: Vec<usize>,
    failed: Vec<bool>,
    ind_pages: Vec<IndirectPage>,
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
        let ring_mem = ring_map
            .writable()
            .ok_or(DataplaneError::MapRing(GrantError::Invalid(
                "the ring was mapped read-only",
            )))?;
        let mut log = None;
        let mut backlog = VecDeque::new();
        let back = match &p.inflight {
            Some(inflight) => {
                let size =
                    BackRing::slots(&ring_mem, p.abi, pages).map_err(DataplaneError::Ring)?;
                let mut qlog = inflight
                    .log
                    .queue(inflight.queue, size)
                    .map_err(DataplaneError::Inflight)?;
                let back = if inflight.resume {
                    let r = qlog.resume(p.abi, size).map_err(DataplaneError::Inflight)?;
                    backlog = r.pending;
                    BackRing::resume(
                        &ring_mem,
                        p.abi,
                        pages,
                        r.req_cons,
                        r.rsp_pushed,
                        r.rsp_written,
                    )
                    .map_err(DataplaneError::Ring)?
                } else {
                    let back =
                        BackRing::attach(&ring_mem, p.abi, pages).map_err(DataplaneError::Ring)?;
                    qlog.fresh(back.req_cons());
                    back
                };
                log = Some(qlog);
                back
            }
            None => BackRing::attach(&ring_mem, p.abi, pages).map_err(DataplaneError::Ring)?,
        };
        let size = back.size() as usize;
        let max_indirect = p
            .max_indirect_segments
            .min(ring::MAX_INDIRECT_SEGMENTS as u16);
        let max_segs = usize::from(max_indirect).max(ring::MAX_SEGMENTS_PER_REQUEST);
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
        let resuming = p.inflight.as_ref().is_some_and(|i| i.resume);
        let local_port = bind(&mut *evtchn, &p, resuming).map_err(DataplaneError::EventChannel)?;
        let wake = Wake::new(evtchn, local_port, p.poll);
        let (grants, bounce) = grant_access(&p, size, max_segs, max_indirect)?;
        // An NBD queue with a connection of its own submits on that socket.
        let io_fd = p.nbd_socket.as_ref().map_or(p.device.fd(), AsFd::as_fd);
        let files = [io_fd, wake.evtchn().as_fd(), stop_fd.as_fd()];
        let export = p.device.nbd_export().copied();
        let replace_files = export.is_some() && p.nbd_connector.is_some();
        let mut uring = Uring::new(size, max_segs, bounce, &files, replace_files, p.sqpoll)
            .map_err(DataplaneError::Uring)?;
        let mut bursts = Bursts::new();
        if let Some(export) = export {
            let connector = p.nbd_connector.clone();
            let stats = p.stats.nbd.register(&p.name);
            bursts.watch_nbd(Arc::clone(&stats));
            uring
                .attach_nbd(io_fd, export, p.nbd_timeout, connector, stats)
                .map_err(DataplaneError::Uring)?;
        }
        if let Some(socket) = p.nbd_socket {
            uring.own_nbd_socket(socket);
        }
        Ok(Self {
            uring,
            grants,
            ring_map: Arc::new(ring_map),
            back,
            wake,
            stop_fd,
            device: p.device,
            features: p.features,
            max_indirect_segments: max_indirect,
            stats: p.stats,
            gauges: GaugeShare::default(),
            bursts,
            observer,
            on_exit: p.on_exit,
            name: p.name,
            slots: Slots::new(size),
            uring_discard: true,
            stopping: false,
            broken: None,
            log,
            backlog,
            resumed: resuming,
            now: Instant::now(),
            blocked_since: None,
            reaped: Vec::with_capacity(size * 2 + 8),
            batch: Vec::with_capacity(size),
            failed: Vec::with_capacity(size),
            ind_pages: (0..PARKED_PAGES).map(|_| IndirectPage::new()).collect(),
            parked: Vec::new(),
            ready: VecDeque::new(),
            parked_ok: Vec::new(),
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
        if let Some(o) = self.observer.as_mut() {
            o.exit(&exit);
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
        // io_uring, grant access, ring mapping.
        let mut reaped = Vec::new();
        if let Err(e) = self.uring.drain(&mut reaped) {
            // The io_uring's own drop leaks what it cannot wait for.
            tracing::error!(queue = %self.name, "io_uring wait failed while draining: {e}");
        }
        let now = Instant::now();
        for r in reaped {
            if let Reaped::Slot(c) = r {
                self.grants.completed(c.guards, now);
            }
        }
        self.grants.close();
        self.sync_gauges();
        self.bursts.log(&self.stats, &self.name);
        self.wake.unbind(&self.name);
    }

    fn serve(&mut self) -> Result<(), QueueError> {
        let ring_map = Arc::clone(&self.ring_map);
        let mem = ring_map.writable().ok_or(QueueError::ReadOnlyRing)?;
        self.wake.arm(&mut self.uring)?;
        let stop = Arc::clone(&self.stop_fd);
        self.uring
            .poll(Control::Stop, stop.as_fd())
            .map_err(|source| QueueError::Arm {
                what: "stop poll",
                source,
            })?;
        self.arm_tick()?;
        if self.resumed {
            self.wake.notify_frontend(&self.name);
        }
        loop {
            let mut reaped = std::mem::take(&mut self.reaped);
            self.uring.reap(&mut reaped);
            self.now = Instant::now();
            if let Some(since) = self.blocked_since.take() {
                self.wake.waited(self.now.saturating_duration_since(since));
            }
            let mut event = false;
            // Timers (purge ticks, EOI delays) are not activity: only events and completions.
            let active = reaped
                .iter()
                .any(|r| matches!(r, Reaped::Evtchn(EvtchnOp::Poll, Ok(_)) | Reaped::Slot(_)));
            for r in reaped.drain(..) {
                match r {
                    Reaped::Evtchn(op, result) => {
                        event |= self.wake.completed(&mut self.uring, op, result)?;
                    }
                    Reaped::Control(Control::Stop) => {
                        self.stopping = true;
                        self.uring.nbd_stop_waiting();
                    }
                    Reaped::Control(Control::EoiTimer) => self.wake.unmask(&mut self.uring)?,
                    Reaped::Control(Control::Tick) => self.tick()?,
                    Reaped::Slot(c) => self.complete(&mem, c),
                }
            }
            self.reaped = reaped;
            if active {
                self.bursts.active(&self.stats, &self.name, self.now);
            }
            if event {
                if let Some(o) = self.observer.as_mut() {
                    o.event();
                }
                self.wake.event(&*self.stats);
            }
            loop {
                self.slots.take_freed();
                if let Some(slot) = self.slots.take_deferred() {
                    self.start(&mem, slot);
                }
                self.start_ready(&mem);
                let mut full = false;
                if !(self.stopping || self.broken.is_some()) {
                    let n = self.consume(&mem)?;
                    self.wake.consumed(n);
                    full = self.slots.is_full();
                }
                // The pass's copies, in and out, in one batch: after consuming, so that the
                // writes just taken join the reads completed.
                self.copy(&mem);
                // A slot freed after it was needed, with no completion left to wake us: by a
                // request that waits (for a barrier's drain or a bounce region), or by the
                // ring, whose consumption stopped on a full table without asking for an event.
                // Go round again (the loop ends once nothing more is freed).
                if !((self.slots.has_deferred() || full) && self.slots.take_freed()) {
                    break;
                }
            }
            self.wake
                .after_pass(&mut self.uring, self.slots.is_full(), &*self.stats)?;
            self.sync_gauges();
            self.publish(&mem)?;
            if (self.stopping || self.broken.is_some()) && self.slots.busy() == 0 {
                return Ok(());
            }
            let want = usize::from(!self.uring.has_completions());
            // A wait that may block is timed from this pass's start (its poll included) to
            // the next pass's, for `BusyPoll`.
            self.blocked_since = (want == 1 && self.wake.adapts()).then_some(self.now);
            if want == 1 && self.wake.polls() && !self.stopping {
                let takes_requests =
                    self.broken.is_none() && !self.slots.has_deferred() && !self.slots.is_full();
                let polled = self.wake.poll_for_work(
                    self.now,
                    &mut self.uring,
                    &mut self.back,
                    &mem,
                    takes_requests,
                    &*self.stats,
                )?;
                match polled {
                    Polled::Work => continue,
                    Polled::Broken(e) => {
                        self.ring_error(e);
                        continue;
                    }
                    Polled::Idle => {}
                }
            }
            self.stats.count(Count::UringEnter);
            self.uring
                .submit_and_wait(want)
                .map_err(QueueError::Enter)?;
            crate::fault::point(crate::fault::Step::Submitted);
        }
    }

    fn arm_tick(&mut self) -> Result<(), QueueError> {
        let Some(every) = self.grants.tick_interval() else {
            return Ok(());
        };
        self.uring
            .timer(Control::Tick, every)
            .map_err(|source| QueueError::Arm {
                what: "housekeeping tick",
                source,
            })
    }

    fn tick(&mut self) -> Result<(), QueueError> {
        self.grants.tick(Instant::now());
        self.sync_gauges();
        self.arm_tick()
    }

    /// Moves the shared gauges by this queue's change since the last call.
    fn sync_gauges(&mut self) {
        let busy = self.slots.busy() as u64;
        let cached = self.grants.cached() as u64;
        self.gauges.sync(&self.stats, busy, cached);
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

    /// Publishes the responses written (notifying the frontend if it asked), then records
    /// them as published in the in-flight log.
    fn publish(&mut self, mem: &SharedMem<'_>) -> Result<(), QueueError> {
        self.wake
            .push(&mut self.back, mem, &*self.stats, &self.name)?;
        if let Some(log) = self.log.as_mut() {
            log.pushed(self.back.rsp_written());
        }
        Ok(())
    }

    /// Takes requests off the ring while slots are free and no request waits, after those a
    /// dead backend left (`backlog`). Returns how many were consumed.
    ///
    /// # Errors
    /// When publishing responses to make room in the in-flight log fails.
    fn consume(&mut self, mem: &SharedMem<'_>) -> Result<usize, QueueError> {
        let limits = self.limits();
        let mut n = 0;
        loop {
            while !self.slots.has_deferred() && self.ready.is_empty() && !self.slots.is_full() {
                if let Some((entry, raw)) = self.backlog.pop_front() {
                    n += 1;
                    self.accept(mem, &raw, &limits, Some(entry));
                    continue;
                }
                if self.log.as_ref().is_some_and(|l| !l.has_room()) {
                    self.publish(mem)?;
                }
                match self.back.next_request(mem) {
                    Ok(Some(raw)) => {
                        n += 1;
                        let index = self.back.req_cons().wrapping_sub(1);
                        let entry = self.log.as_mut().and_then(|l| l.consumed(&raw, index));
                        self.accept(mem, &raw, &limits, entry);
                    }
                    Ok(None) => break,
                    Err(e) => {
                        self.ring_error(e);
                        self.start_parked(mem, &limits);
                        return Ok(n);
                    }
                }
            }
            self.start_parked(mem, &limits);
            // A polling queue asks for an event only before it sleeps (`Wake::poll_for_work`).
            if self.slots.has_deferred()
                || !self.ready.is_empty()
                || self.slots.is_full()
                || self.wake.polls()
            {
                return Ok(n);
            }
            match self.back.final_check_for_requests(mem) {
                Ok(true) => {}
                Ok(false) => return Ok(n),
                Err(e) => {
                    self.ring_error(e);
                    return Ok(n);
                }
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

    /// Validates one request and starts it (or answers it at once), or parks it if it is
    /// indirect.
    fn accept(
        &mut self,
        mem: &SharedMem<'_>,
        raw: &RawRequest,
        limits: &DeviceLimits,
        entry: Option<u32>,
    ) {
        if let Some(o) = self.observer.as_mut() {
            o.slot(raw, limits);
        }
        let parsed = match ring::parse(raw, limits) {
            Ok(Parsed::Indirect(h)) => {
                let parked: usize = self.parked.iter().map(|(p, _)| p.pages()).sum();
                if parked + h.pages() > self.ind_pages.len() {
                    self.start_parked(mem, limits);
                }
                return self.parked.push((h, entry));
            }
            Ok(Parsed::Ready(req)) => Ok(req),
            Err(rej) => Err(rej),
        };
        // In ring order: the indirect requests before this one go first.
        self.start_parked(mem, limits);
        match parsed {
            Ok(req) => self.enqueue(mem, req, entry),
            Err(rej) => self.reject(mem, &rej, entry),
        }
    }

    /// Reads the pages of the parked indirect requests in one grant operation, validates
    /// them and starts them (or answers them at once).
    fn start_parked(&mut self, mem: &SharedMem<'_>, limits: &DeviceLimits) {
        if self.parked.is_empty() {
            return;
        }
        let mut parked = std::mem::take(&mut self.parked);
        let grefs: Vec<&[GrantRef]> = parked.iter().map(|(h, _)| h.page_grefs()).collect();
        self.grants
            .fetch_indirect(&grefs, &mut self.ind_pages, &mut self.parked_ok);
        let mut at = 0;
        for (i, (h, entry)) in parked.iter().enumerate() {
            let req = match self.parked_ok.get(i) {
                Some(true) => self
                    .ind_pages
                    .get(at..at + h.pages())
                    .map(|pages| ring::parse_indirect(h, pages, limits)),
                _ => None,
            };
            at += h.pages();
            match req {
                Some(Ok(req)) => self.enqueue(mem, req, *entry),
                Some(Err(rej)) => self.reject(mem, &rej, *entry),
                None => {
                    tracing::debug!(queue = %self.name, id = h.id, "indirect pages unreachable");
                    self.put(mem, &h.response(Status::Error), *entry);
                }
            }
        }
        drop(grefs);
        parked.clear();
        self.parked = parked;
    }

    /// Starts a validated request, or queues it in `ready` behind one that waits (requests
    /// start in ring order).
    fn enqueue(&mut self, mem: &SharedMem<'_>, req: Request, entry: Option<u32>) {
        if self.slots.has_deferred() || !self.ready.is_empty() {
            return self.ready.push_back((req, entry));
        }
        self.take_and_start(mem, req, entry);
    }

    /// Starts the requests in `ready` until one waits.
    fn start_ready(&mut self, mem: &SharedMem<'_>) {
        while !self.slots.has_deferred() {
            let Some((req, entry)) = self.ready.pop_front() else {
                return;
            };
            self.take_and_start(mem, req, entry);
        }
    }

    fn take_and_start(&mut self, mem: &SharedMem<'_>, req: Request, entry: Option<u32>) {
        if self.slots.is_full() {
            // Cannot happen: the ring hands out no more requests than there are slots.
            return self.put(mem, &req.response(Status::Error), entry);
        }
        if let Some(slot) = self.slots.take(req, self.now, entry) {
            self.start(mem, slot);
        }
    }

    fn reject(&mut self, mem: &SharedMem<'_>, rej: &ring::Rejection, entry: Option<u32>) {
        tracing::debug!(queue = %self.name, "{rej}");
        self.put(mem, &rej.response(), entry);
    }

    /// Writes a response (not yet published) and marks its request's log `entry` answered.
    fn put(&mut self, mem: &SharedMem<'_>, rsp: &ring::Response, entry: Option<u32>) {
        if let Some(o) = self.observer.as_mut() {
            o.response(rsp);
        }
        if rsp.status != Status::Okay {
            self.stats.count(Count::Error);
        }
        let index = self.back.rsp_written();
        match self.back.put_response(mem, rsp) {
            Ok(()) => {
                if let (Some(log), Some(entry)) = (self.log.as_mut(), entry) {
                    log.answered(entry, index);
                }
            }
            Err(e) => tracing::error!(queue = %self.name, "writing a response: {e}"),
        }
    }
}

/// How long a queue taking over from a dead backend tries to bind the frontend's port: the
/// dead process's end is closed only when the kernel releases its evtchn fd, which its
/// io_uring's asynchronous teardown may still hold for a moment after the process was reaped.
const REBIND_FOR: std::time::Duration = std::time::Duration::from_secs(3);

/// Binds the frontend's port; when `resuming`, again until [`REBIND_FOR`] has passed while the
/// port is still bound to the dead backend.
fn bind(
    evtchn: &mut dyn xen::EventChannel,
    p: &QueueParams,
    resuming: bool,
) -> Result<xen::Port, xen::EvtchnError> {
    let start = Instant::now();
    loop {
        match evtchn.bind_interdomain(p.frontend, p.port) {
            Err(e) if resuming && start.elapsed() < REBIND_FOR => {
                tracing::debug!(queue = %p.name, "port {} not bindable yet: {e}", p.port);
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            other => return other,
        }
    }
}

/// A grant mode's way to guest memory, and the bounce memory its io_uring registers.
type ReachGuest = (Box<dyn GrantAccess>, Option<Arc<BounceMem>>);

/// The grant mode's way to guest memory for a queue of `size` slots, and the bounce memory to
/// register with its io_uring (copy mode).
fn grant_access(
    p: &QueueParams,
    size: usize,
    max_segs: usize,
    max_indirect: u16,
) -> Result<ReachGuest, DataplaneError> {
    let fe = Frontend {
        platform: Arc::clone(&p.platform),
        domid: p.frontend,
        meter: Arc::clone(&p.stats) as Arc<dyn Meter>,
        name: p.name.clone(),
    };
    // Only persistent grants are mapped: a frontend without them (FreeBSD's, or Linux's with
    // feature_persistent=0) ends each grant as soon as its response arrives, which with
    // mappings would mean unmapping right after every completion, while the kernel may still
    // hold the pages (issue 21). Its data is grant-copied, as QEMU's qdisk does.
    let copy = p.grant_mode == GrantMode::Copy || !p.persistent_grants;
    if copy {
        let nr_large = if max_indirect > 0 { LARGE_REGIONS } else { 0 };
        let pool = BouncePool::new(size, max_segs, nr_large).map_err(DataplaneError::Uring)?;
        let mem = Arc::clone(pool.mem());
        let grants = GrantCopy::new(fe, pool);
        return Ok((Box::new(grants), Some(mem)));
    }
    let pgrants = PersistentGrants::new(
        p.frontend,
        p.max_persistent_grants,
        p.persistent_grant_timeout,
        Arc::clone(&fe.meter),
    );
    let grants = GrantMap::new(fe, pgrants, p.unmap_grace);
    Ok((Box::new(grants), None))
}
