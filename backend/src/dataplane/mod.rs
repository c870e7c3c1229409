//! The data plane: one thread and one io_uring per queue, serving a frontend's shared ring.
//!
//! # API for the control plane
//! - [`spawn_queue`] takes a [`QueueParams`] (who the frontend is, the ring's grant refs and
//!   event channel as the frontend published them, the [`Device`], the negotiated features and
//!   a shared [`Stats`]), maps the ring, binds the event channel and starts the queue's
//!   thread. It returns a [`QueueHandle`].
//! - [`QueueHandle::stop`] stops taking requests, waits for the requests in flight to complete
//!   and answers them, unmaps every grant (ring, persistent and per-request mappings), unbinds
//!   the event channel and joins the thread. It returns the [`QueueExit`]. Its time is
//!   bounded by the device's: I/O already submitted must complete (or fail) before the memory
//!   it points at may be released, so a hung device hangs `stop` rather than letting the
//!   kernel write into freed memory. Dropping a [`QueueHandle`] stops the queue the same way.
//! - A queue also stops by itself when the frontend breaks the ring protocol (a bogus
//!   `req_prod`, [`QueueExit::Protocol`]) or on an unrecoverable local failure
//!   ([`QueueExit::Failed`]): [`QueueHandle::is_finished`] then turns true and
//!   [`QueueParams::on_exit`] is called from the queue's thread, so the control plane can
//!   react (write the error to XenStore, go to Closing) and collect the reason with
//!   [`QueueHandle::stop`] (or [`QueueHandle::wait`]).
//! - Resize: validation reads [`Device::sectors`] on every pass; the control plane calls
//!   [`Device::refresh_size`] on the shared [`Device`] and every queue sees the new size.
//! - Statistics: [`Stats`] (Linux's `oo_req`, `rd_req`, `wr_req`, `f_req`, `ds_req`, `rd_sect`,
//!   `wr_sect`, plus errors, events and latency), readable at any time. One [`Stats`] may be
//!   shared by all queues of a device.
//! - Multi-queue: one [`spawn_queue`] per queue (`queue-%u/`), each with its own ring refs
//!   and port; they share the [`Device`].
//!
//! # One request's way
//! The event channel's fd is polled by an SQE in the queue's own io_uring. When it fires,
//! the queue copies each request slot once and validates the copy (`ring::parse`), reaches
//! guest memory in the selected [`GrantMode`], and queues SQEs on the device fd. Indirect
//! requests are parked as they are consumed and their pages read together (one grant copy
//! in copy mode) before they start, in ring order; the data of every write consumed and
//! every read completed in the pass is then grant-copied in one `GNTTABOP_copy`. At the end
//! of the pass it queues the event channel's unmask, the read of the delivery that woke it
//! and the next poll (see `wake`), so that one `io_uring_enter` per pass submits all of it
//! and waits for the next completion or event: the event channel costs no system call of
//! its own. Completions are answered field by field, pushed once per pass, with one
//! notification if `rsp_event` asks for it. See `queue` for the loop and `uring` for buffer
//! ownership.
//!
//! # Pieces
//! - `queue`: the loop, driving the pieces below; it alone knows them all.
//! - `slot`: the in-flight table, one state machine per ring slot (what the request waits
//!   for, owning its bounce region while no I/O is in flight).
//! - `grant_access`: one trait, one implementation per [`GrantMode`]: `grant_copy` (bounce
//!   regions from `bounce`, batched grant copies) and `grant_map` (the `persistent` cache,
//!   mappings `retire`d after their grace).
//! - `uring`: the io_uring executor (submit, reap), owner of whatever the kernel points at.
//! - `wake`: the wake-up policy: events, late EOI, polling, notify suppression.
//! - `stats`: the counters, which the pieces feed through a narrow `Meter`; `observer`: the
//!   narrow interface to whoever watches a queue ([`Observer`], the `--record` trace).
//! - `error`: why a running queue fails.
//!
//! # Semantics
//! - Reads and writes use `O_DIRECT` (see [`crate::device`]); flush is an `fdatasync` of the
//!   device, so it completes once the data is durable; a flush or barrier carrying data is the
//!   write followed by a linked `fdatasync` (stronger than Linux's preflush: this request's
//!   data is durable too); a barrier first waits until nothing else is in flight.
//! - Discard: the block layer's io_uring discard command on block devices (`BLKDISCARD` where
//!   the kernel lacks it), a punched hole in files; secure discard (`BLKSECDISCARD`, only where
//!   the device supports it) is issued synchronously from the queue's thread, as it has no
//!   asynchronous form.
//! - A device error (`EIO`, `ENOSPC`, a short transfer) answers that request with
//!   `BLKIF_RSP_ERROR`; the queue carries on. A grant that cannot be mapped or copied does the
//!   same, as in Linux.
//! - Event storms (XSA-332): a wake-up that finds no request is spurious; after the second in
//!   a row, the port is unmasked only after a delay that doubles from 1 ms up to 1 s, as
//!   Linux's late-EOI handling does, so a guest hammering the event channel costs at most a
//!   few wake-ups per second.
//! - An NBD export ([`crate::device::DeviceKind::Nbd`]): the same requests become NBD commands
//!   on the export's socket, sent and received on the queue's io_uring (`uring`'s NBD
//!   connection: one send in flight, one receive state machine, cookies naming ring slots); a
//!   flushing write is `NBD_CMD_FLUSH` then the write with FUA where the server offers FUA (else
//!   the write then the flush), a discard is `NBD_CMD_TRIM` (`NBD_CMD_WRITE_ZEROES` where the
//!   server has no trim); a server error answers that request with `BLKIF_RSP_ERROR`. A lost
//!   connection (closed, broken protocol, or requests waiting [`QueueParams::nbd_timeout`]
//!   without a reply) is replaced through [`QueueParams::nbd_connector`] and what had no
//!   reply is sent again, the guest waiting meanwhile; without a connector, or with none
//!   connected within the timeout, every request fails from then on. One queue per export
//!   (one connection), or, where the server allows several (`NBD_FLAG_CAN_MULTI_CONN`), one
//!   connection per queue ([`QueueParams::nbd_socket`]).
//! - Flush and barrier are served only where [`Features`] says they were advertised (else
//!   `BLKIF_RSP_EOPNOTSUPP`, as a backend without them answers).
//! - CD-ROM and other read-only vbds: set [`Features::read_only`]; every non-read is refused
//!   as Linux refuses it.
//! - Copy mode keeps, per queue, one 44 KiB bounce region per ring slot and 8 regions of
//!   `max_indirect_segments` pages for indirect requests (an indirect request finding none
//!   free waits, counted in `oo_req`), all registered with the io_uring (pinned: about 30 MiB
//!   for a 16-page ring with 256 indirect segments).

mod bounce;
mod busy_poll;
mod error;
mod grant_access;
mod grant_copy;
mod grant_map;
mod nbd_stats;
mod observer;
mod persistent;
mod queue;
mod retire;
mod slot;
mod stats;
mod uring;
mod wake;

#[cfg(test)]
mod tests;

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use ring::{Abi, ProtocolViolation};
use xen::{DomId, GrantRef, Platform, Port};

use crate::device::Device;
use crate::inflight::{Log, LogError};

pub use error::QueueError;
pub use nbd_stats::{NbdConnections, NbdSnapshot, NbdStats};
pub use observer::{Observer, QueueObserver};
pub use persistent::{DEFAULT_MAX_PERSISTENT_GRANTS, DEFAULT_PERSISTENT_GRANT_TIMEOUT};
pub use stats::{Stats, StatsSnapshot};

/// How the backend reaches the guest pages a request names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GrantMode {
    /// Grant copy into private bounce buffers registered with the io_uring (what QEMU and
    /// tapdisk do): no guest page is ever mapped into the backend for data.
    #[default]
    Copy,
    /// Grant map: I/O goes straight to and from the guest's pages (zero copy), for frontends
    /// with persistent grants ([`QueueParams::persistent_grants`]); without them the queue
    /// grant-copies. A mapping that carried I/O is unmapped only after the platform's
    /// [`xen::GrantMapper::unmap_grace`] (see `retire`).
    Map,
}

/// What was advertised to the frontend, beyond what the device itself supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Features {
    /// `feature-flush-cache` was written: serve `BLKIF_OP_FLUSH_DISKCACHE`.
    pub flush: bool,
    /// `feature-barrier` was written: serve `BLKIF_OP_WRITE_BARRIER`.
    pub barrier: bool,
    /// `feature-discard` was written (and the device supports it).
    pub discard: bool,
    /// `discard-secure` was written (and the device supports it).
    pub secure_discard: bool,
    /// The vbd is read-only (`mode` = `r`, or a CD-ROM).
    pub read_only: bool,
}

impl Features {
    /// Everything the device supports, read-write unless the device is read-only.
    pub fn from_device(device: &Device) -> Self {
        Self {
            flush: device.flush(),
            barrier: device.flush(),
            discard: device.discard(),
            secure_discard: device.secure_discard(),
            read_only: device.read_only(),
        }
    }
}

/// Everything a queue needs. Build it with [`QueueParams::new`] and adjust the public fields.
pub struct QueueParams {
    /// The platform (real Xen or the simulation).
    pub platform: Arc<dyn Platform>,
    /// The frontend's domain.
    pub frontend: DomId,
    /// The ring ABI (`protocol`).
    pub abi: Abi,
    /// The ring's grant refs, 1 to 16 (a power of two), in order (`ring-ref`, `ring-ref%u`).
    pub ring_refs: Vec<GrantRef>,
    /// The frontend's event-channel port (`event-channel`), bound interdomain here.
    pub port: Port,
    /// The device.
    pub device: Arc<Device>,
    /// Grant copy or grant map.
    pub grant_mode: GrantMode,
    /// The frontend offered `feature-persistent` and the backend accepted. Map mode maps
    /// only persistent grants: without them the queue grant-copies, whatever `grant_mode`.
    pub persistent_grants: bool,
    /// Cap on persistent grants per queue (Linux's `max_persistent_grants`, 1056).
    pub max_persistent_grants: usize,
    /// Persistent grants unused this long are unmapped (Linux's 60 s).
    pub persistent_grant_timeout: Duration,
    /// How long a mapping that carried I/O stays mapped after its last completion (default:
    /// the platform's [`xen::GrantMapper::unmap_grace`]).
    pub unmap_grace: Duration,
    /// `feature-max-indirect-segments` as advertised; 0 disables indirect requests. At most
    /// [`ring::MAX_INDIRECT_SEGMENTS`].
    pub max_indirect_segments: u16,
    /// What was advertised.
    pub features: Features,
    /// The queue's counters.
    pub stats: Arc<Stats>,
    /// A name for the thread and the logs (e.g. `vbd-5-51712-q0`).
    pub name: String,
    /// Called on the queue's thread when it exits for any reason.
    pub on_exit: Option<Box<dyn FnOnce() + Send>>,
    /// Who watches this queue (`--record`'s trace recorder); default: nobody.
    pub observer: Option<Arc<dyn Observer>>,
    /// Busy-poll this long for new requests and completions before sleeping (`--poll-us`;
    /// zero: never). While the queue polls, the frontend is not asked for events, so a busy
    /// guest stops notifying and the queue stops waking: latency and system calls for CPU.
    pub poll: Duration,
    /// `--sqpoll`: a kernel thread (`IORING_SETUP_SQPOLL`) submits the queue's SQEs, so the
    /// queue's thread enters the kernel only to sleep (with [`QueueParams::poll`], not at
    /// all while busy), for a kernel thread per queue that spins a millisecond after each
    /// submission.
    pub sqpoll: bool,
    /// For an NBD export: when requests have waited this long with no reply arriving, the
    /// connection is given up and every request fails ([`DEFAULT_NBD_TIMEOUT`]).
    pub nbd_timeout: Duration,
    /// For an NBD export: who makes a new connection when the server goes away (requests
    /// then wait up to [`QueueParams::nbd_timeout`] for it); `None`: a lost connection fails
    /// every request.
    pub nbd_connector: Option<Arc<crate::nbd_connector::Connector>>,
    /// For an NBD export whose server allows several connections: this queue's own (else the
    /// queue uses the device's).
    pub nbd_socket: Option<OwnedFd>,
    /// The disk's in-flight log (`serve` under `supervise`), so that another process can
    /// take the ring over if this one dies; default: none.
    pub inflight: Option<InflightParams>,
}

/// A queue's place in the disk's in-flight log ([`crate::inflight`]).
#[derive(Debug, Clone)]
pub struct InflightParams {
    /// The log.
    pub log: Arc<Log>,
    /// The queue's number (`queue-%u`).
    pub queue: usize,
    /// Take the ring over from a backend that died, as its log says, instead of starting
    /// afresh at the ring's indexes.
    pub resume: bool,
}

/// The default [`QueueParams::nbd_timeout`].
pub const DEFAULT_NBD_TIMEOUT: Duration = Duration::from_secs(60);

impl std::fmt::Debug for QueueParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueParams")
            .field("frontend", &self.frontend)
            .field("abi", &self.abi)
            .field("ring_refs", &self.ring_refs)
            .field("port", &self.port)
            .field("grant_mode", &self.grant_mode)
            .field("persistent_grants", &self.persistent_grants)
            .field("max_indirect_segments", &self.max_indirect_segments)
            .field("features", &self.features)
            .field("name", &self.name)
            .field("poll", &self.poll)
            .field("sqpoll", &self.sqpoll)
            .field("inflight", &self.inflight)
            .finish_non_exhaustive()
    }
}

impl QueueParams {
    /// Parameters with the defaults: grant copy, no persistent grants, 256 indirect segments,
    /// the device's own features, fresh counters.
    pub fn new(
        platform: Arc<dyn Platform>,
        frontend: DomId,
        abi: Abi,
        ring_refs: Vec<GrantRef>,
        port: Port,
        device: Arc<Device>,
    ) -> Self {
        let features = Features::from_device(&device);
        let unmap_grace = platform.grant_mapper().unmap_grace();
        Self {
            platform,
            frontend,
            abi,
            ring_refs,
            port,
            device,
            grant_mode: GrantMode::Copy,
            persistent_grants: false,
            max_persistent_grants: DEFAULT_MAX_PERSISTENT_GRANTS,
            persistent_grant_timeout: DEFAULT_PERSISTENT_GRANT_TIMEOUT,
            unmap_grace,
            max_indirect_segments: ring::MAX_INDIRECT_SEGMENTS as u16,
            features,
            stats: Arc::new(Stats::new()),
            name: format!("blkback-d{frontend}"),
            on_exit: None,
            observer: None,
            poll: Duration::ZERO,
            sqpoll: false,
            nbd_timeout: DEFAULT_NBD_TIMEOUT,
            nbd_connector: None,
            nbd_socket: None,
            inflight: None,
        }
    }
}

/// Why a queue could not be started.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    /// Not 1, 2, 4, 8 or 16 ring refs.
    #[error("{0} ring pages (must be 1, 2, 4, 8 or 16)")]
    RingPages(usize),
    /// The ring could not be mapped.
    #[error("cannot map the shared ring: {0}")]
    MapRing(#[source] xen::GrantError),
    /// The ring's indices are bad from the start (`req_prod - rsp_prod > size`).
    #[error("shared ring: {0}")]
    Ring(#[source] ring::RingError),
    /// The event channel could not be opened or bound.
    #[error("event channel: {0}")]
    EventChannel(#[source] xen::EvtchnError),
    /// The io_uring (or its buffers, or the stop eventfd) could not be set up.
    #[error("io_uring setup: {0}")]
    Uring(#[source] std::io::Error),
    /// The in-flight log has no room for the queue, or cannot be resumed from.
    #[error("{0}")]
    Inflight(#[source] LogError),
    /// The thread could not be started.
    #[error("cannot start the queue thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// Why a queue's thread ended.
#[derive(Debug)]
pub enum QueueExit {
    /// [`QueueHandle::stop`] asked it to.
    Stopped,
    /// The frontend broke the ring protocol; the ring was halted (Linux: "Halting ring
    /// processing"). Requests in flight were still answered.
    Protocol(ProtocolViolation),
    /// A local failure (io_uring, event channel device) the queue cannot continue after.
    Failed(QueueError),
    /// The thread panicked (a bug).
    Panicked,
}

/// A running queue.
#[derive(Debug)]
pub struct QueueHandle {
    thread: Option<JoinHandle<QueueExit>>,
    stop: Arc<OwnedFd>,
    stats: Arc<Stats>,
    finished: Arc<AtomicBool>,
}

impl QueueHandle {
    /// Stops the queue (see the module documentation) and returns why it ended: `Stopped`,
    /// or the earlier reason if it had already stopped by itself.
    pub fn stop(mut self) -> QueueExit {
        // A failed write can only mean the eventfd counter is saturated: a stop is pending.
        let _ = rustix::io::write(&*self.stop, &1u64.to_ne_bytes());
        self.join()
    }

    /// Waits for the queue to end by itself, without asking it to.
    pub fn wait(mut self) -> QueueExit {
        self.join()
    }

    fn join(&mut self) -> QueueExit {
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(exit)) => exit,
            Some(Err(_)) => QueueExit::Panicked,
            None => QueueExit::Stopped,
        }
    }

    /// Whether the queue's thread has ended.
    pub fn is_finished(&self) -> bool {
        self.finished.load(Ordering::Acquire)
    }

    /// The queue's counters.
    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }
}

impl Drop for QueueHandle {
    fn drop(&mut self) {
        if self.thread.is_some() {
            let _ = rustix::io::write(&*self.stop, &1u64.to_ne_bytes());
            let _ = self.join();
        }
    }
}

/// Maps the ring, binds the event channel, sets up the io_uring and starts the queue's
/// thread.
///
/// # Errors
/// [`DataplaneError`] when any of that fails; nothing is left mapped or bound then.
pub fn spawn_queue(params: QueueParams) -> Result<QueueHandle, DataplaneError> {
    let stop = rustix::event::eventfd(
        0,
        rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
    )
    .map_err(|e| DataplaneError::Uring(e.into()))?;
    let stop = Arc::new(stop);
    let stats = Arc::clone(&params.stats);
    let finished = Arc::new(AtomicBool::new(false));
    let name = params.name.clone();
    let fin = Arc::clone(&finished);
    let stop2 = Arc::clone(&stop);
    // The queue is set up on its own thread: the io_uring is single-issuer, bound to the
    // thread that creates it. Setup errors come back through the channel.
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let thread = std::thread::Builder::new()
        .name(name)
        .spawn(move || match queue::Queue::new(params, stop2) {
            Ok(queue) => {
                let _ = tx.send(Ok(()));
                queue.run(&fin)
            }
            Err(e) => {
                let _ = tx.send(Err(e));
                fin.store(true, Ordering::Release);
                // Never seen: spawn_queue joins this thread and returns the setup error.
                QueueExit::Stopped
            }
        })
        .map_err(DataplaneError::Thread)?;
    match rx.recv() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            let _ = thread.join();
            return Err(e);
        }
        Err(_) => {
            let _ = thread.join();
            return Err(DataplaneError::Thread(std::io::Error::other(
                "queue thread died during setup",
            )));
        }
    }
    Ok(QueueHandle {
        thread: Some(thread),
        stop,
        stats,
        finished,
    })
}
