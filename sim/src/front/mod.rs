//! A simulated blkfront: a guest's block frontend on the simulated platform, driving a real
//! `blkbackd` through the whole protocol. The demo, the end-to-end tests and the benches use
//! it; it is written the way Linux's `xen-blkfront` behaves, so that the backend meets what
//! it will meet in a guest.
//!
//! It owns a simulated guest ([`crate::SimDomain`]): rings and data buffers live in the
//! guest's pages and are granted to the backend; events go through the simulated event
//! channels; the handshake goes through XenStore as the guest (its own xenstored socket).
//!
//! - [`SimFront::connect`]: `talk_to_blkback` + `blkfront_connect`: waits for InitWait, sets
//!   up 2^order-page rings on the negotiated number of queues, writes the ring details in one
//!   transaction, switches to Initialised, waits for Connected, reads the disk's details,
//!   switches to Connected.
//! - [`SimFront::submit`] / [`SimFront::wait`]: requests with data in granted guest pages
//!   (direct up to 11 segments, indirect beyond when the backend offers it; persistent grants
//!   reused across requests when negotiated, else granted per request and ended after).
//! - [`SimFront::close`]: Closing, collect or abandon what is in flight, Closed, then end
//!   every grant: ending a grant the backend still maps fails, so leaks show.

mod io;
mod rings;

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::{SimDomain, SimError, SimEventChannel};
use ring::{Abi, RingError};
use xen::xenstore::{XenStore, XsError, XsOps, RECONNECT_WITHIN};
use xen::{DomId, EventChannel, EvtchnError, GrantRef, Port};

pub use io::{Completion, IoOp};
pub use rings::{write_ring_details, GuestRing, RingDetails};

use xen::xenbus::{error_node_path, parse_decimal, ReadState, XenbusState};

/// How long any wait on the backend may take before it is an error.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(15);

/// A frontend failure.
#[derive(Debug, thiserror::Error)]
pub enum SimFrontError {
    /// XenStore failed.
    #[error("xenstore: {what}: {source}")]
    XenStore {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: XsError,
    },
    /// The simulated hypervisor refused.
    #[error("simulated hypervisor: {0}")]
    Sim(#[from] SimError),
    /// Event channel failure.
    #[error("event channel: {0}")]
    Evtchn(#[from] EvtchnError),
    /// The ring failed (a bogus backend, a full ring).
    #[error("ring: {0}")]
    Ring(#[from] RingError),
    /// The backend did not do something in time.
    #[error("timed out waiting for {0}")]
    Timeout(String),
    /// The backend did something a frontend cannot go on with.
    #[error("backend: {0}")]
    Backend(String),
    /// The frontend was asked something it cannot do.
    #[error("{0}")]
    Usage(String),
}

fn xs_err(what: impl Into<String>) -> impl FnOnce(XsError) -> SimFrontError {
    let what = what.into();
    move |source| SimFrontError::XenStore { what, source }
}

/// What the frontend asks for; the backend's limits cap each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrontOptions {
    /// The `protocol` value to write; `None` writes none (the default ABI).
    pub protocol: Option<String>,
    /// log2 of the ring pages wanted; `None` uses one page and the single `ring-ref` node,
    /// as blkfront does for one page.
    pub ring_page_order: Option<u32>,
    /// Queues wanted (1 = no `multi-queue-num-queues` node).
    pub queues: u32,
    /// Offer persistent grants.
    pub persistent: bool,
    /// Use indirect requests for transfers beyond 11 segments when the backend offers them.
    pub indirect: bool,
    /// Pages of guest memory.
    pub guest_pages: usize,
    /// Write the requested ring order and queue count as is, even above the backend's
    /// maximum (for testing the backend's refusal).
    pub ignore_backend_limits: bool,
}

impl Default for FrontOptions {
    fn default() -> Self {
        Self {
            protocol: Some(ring::PROTOCOL_NATIVE.to_owned()),
            ring_page_order: Some(2),
            queues: 2,
            persistent: true,
            indirect: true,
            guest_pages: 4096,
            ignore_backend_limits: false,
        }
    }
}

/// What the backend told the frontend at connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskInfo {
    /// Size in 512-byte sectors.
    pub sectors: u64,
    /// Logical block size.
    pub sector_size: u32,
    /// Physical block size.
    pub physical_sector_size: u32,
    /// `info` bits.
    pub info: u32,
    /// `feature-flush-cache`.
    pub flush: bool,
    /// `feature-barrier`.
    pub barrier: bool,
    /// `feature-discard`.
    pub discard: bool,
    /// `discard-secure`.
    pub discard_secure: bool,
    /// `discard-granularity`.
    pub discard_granularity: u32,
    /// Persistent grants in use (both sides offered them).
    pub persistent: bool,
    /// `feature-max-indirect-segments` (0: none).
    pub max_indirect_segments: u32,
    /// Queues in use.
    pub queues: u32,
    /// log2 of ring pages in use.
    pub ring_page_order: u32,
    /// The ring ABI in use.
    pub abi: Abi,
}

#[derive(Debug)]
struct Queue {
    shared: GuestRing,
    inflight: HashMap<u64, io::Inflight>,
}

/// A simulated guest's block frontend for one virtual disk.
#[derive(Debug)]
pub struct SimFront {
    domain: SimDomain,
    xs: XenStore,
    evtchn: SimEventChannel,
    backend_domid: DomId,
    frontend: String,
    backend: String,
    options: FrontOptions,
    timeout: Duration,
    free_frames: Vec<u32>,
    /// Persistently granted pages, reused across requests (frame, gref).
    persistent_pool: Vec<(u32, GrantRef)>,
    queues: Vec<Queue>,
    info: Option<DiskInfo>,
    next_id: u64,
    completed: VecDeque<Completion>,
}

impl SimFront {
    /// Creates guest `domid` in the simulation at `dir` and attaches to its disk `devid`,
    /// whose frontend directory the toolstack has written. Nothing is negotiated yet.
    ///
    /// # Errors
    /// When the guest cannot be created or XenStore reached.
    pub fn new(
        dir: &Path,
        domid: DomId,
        devid: u32,
        options: FrontOptions,
    ) -> Result<Self, SimFrontError> {
        let domain = SimDomain::create(dir, domid, options.guest_pages)?;
        // A guest's kernel reaches xenstored over a ring that outlives a xenstored restart;
        // on the simulation's socket, reconnecting stands in for that.
        let xs = XenStore::open_reconnecting(crate::xenstore_socket(dir, domid), RECONNECT_WITHIN)
            .map_err(xs_err("connecting as the guest"))?;
        let evtchn = domain.open_event_channel()?;
        let frontend = format!("/local/domain/{domid}/device/vbd/{devid}");
        let backend = xs
            .read_string(&format!("{frontend}/backend"))
            .map_err(xs_err(format!("reading {frontend}/backend")))?;
        let backend_domid = xs
            .read_string(&format!("{frontend}/backend-id"))
            .ok()
            .as_deref()
            .and_then(parse_decimal)
            .and_then(|d| DomId::try_from(d).ok())
            .ok_or_else(|| {
                SimFrontError::Usage(format!("{frontend}/backend-id is missing or malformed"))
            })?;
        let pages = u32::try_from(domain.pages())
            .map_err(|_| SimFrontError::Usage("too many guest pages".into()))?;
        // Frame 0 stays unused, so that a zero grant or frame never means anything.
        let free_frames = (1..pages).rev().collect();
        Ok(Self {
            domain,
            xs,
            evtchn,
            backend_domid,
            frontend,
            backend,
            options,
            timeout: DEFAULT_TIMEOUT,
            free_frames,
            persistent_pool: Vec::new(),
            queues: Vec::new(),
            info: None,
            next_id: 1,
            completed: VecDeque::new(),
        })
    }

    /// The guest domain (for inspecting grants in tests).
    pub fn domain(&self) -> &SimDomain {
        &self.domain
    }

    /// The guest's XenStore connection.
    pub fn xenstore(&self) -> &XenStore {
        &self.xs
    }

    /// The frontend directory.
    pub fn frontend_path(&self) -> &str {
        &self.frontend
    }

    /// The backend directory.
    pub fn backend_path(&self) -> &str {
        &self.backend
    }

    /// What was negotiated, once connected.
    pub fn info(&self) -> Option<&DiskInfo> {
        self.info.as_ref()
    }

    /// The options, to change them between connections.
    pub fn options_mut(&mut self) -> &mut FrontOptions {
        &mut self.options
    }

    /// Changes how long waits on the backend may take.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Reads a backend node (`None` when missing).
    ///
    /// # Errors
    /// XenStore's, other than a missing node.
    pub fn backend_node(&self, name: &str) -> Result<Option<String>, SimFrontError> {
        let path = format!("{}/{name}", self.backend);
        match self.xs.read_string(&path) {
            Ok(v) => Ok(Some(v)),
            Err(XsError::NotFound) => Ok(None),
            Err(e) => Err(xs_err(format!("reading {path}"))(e)),
        }
    }

    /// The backend's state.
    ///
    /// # Errors
    /// XenStore's.
    pub fn backend_state(&self) -> Result<ReadState, SimFrontError> {
        Ok(ReadState::parse(self.backend_node("state")?.as_deref()))
    }

    /// Writes the frontend's state.
    ///
    /// # Errors
    /// XenStore's.
    pub fn set_state(&self, state: XenbusState) -> Result<(), SimFrontError> {
        let path = format!("{}/state", self.frontend);
        self.xs
            .write(&path, state.as_u32().to_string())
            .map_err(xs_err(format!("writing {path}")))
    }

    /// Waits until the backend's state is one of `want`, polling XenStore.
    ///
    /// # Errors
    /// [`SimFrontError::Timeout`]; [`SimFrontError::Backend`] when the backend reports an
    /// error (switches to Closing or Closed while something else was awaited).
    pub fn wait_backend_state(&self, want: &[XenbusState]) -> Result<XenbusState, SimFrontError> {
        let deadline = Instant::now() + self.timeout;
        // Closing or Closed at the start is where the backend was left (a reconnect after a
        // close); only a switch to them during the wait is the backend giving up.
        let initial = self.backend_state()?;
        loop {
            let state = self.backend_state()?;
            if let ReadState::Known(s) = state {
                if want.contains(&s) {
                    return Ok(s);
                }
                if matches!(s, XenbusState::Closing | XenbusState::Closed)
                    && state != initial
                    && !want
                        .iter()
                        .any(|w| matches!(w, XenbusState::Closing | XenbusState::Closed))
                {
                    return Err(SimFrontError::Backend(format!(
                        "backend switched to {s} while waiting for {want:?}{}",
                        self.backend_error()
                            .map(|e| format!(": {e}"))
                            .unwrap_or_default()
                    )));
                }
            }
            if Instant::now() > deadline {
                return Err(SimFrontError::Timeout(format!(
                    "backend state {want:?} (it is {state:?}{})",
                    self.backend_error()
                        .map(|e| format!(", error {e}"))
                        .unwrap_or_default()
                )));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// The error the backend reported (`error/<backend path>/error` under the backend
    /// domain's home), if any.
    pub fn backend_error(&self) -> Option<String> {
        let home = format!("/local/domain/{}", self.backend_domid);
        let path = error_node_path(&home, &self.backend);
        self.xs.read_string(&path).ok()
    }

    fn alloc_frame(&mut self) -> Result<u32, SimFrontError> {
        self.free_frames
            .pop()
            .ok_or_else(|| SimFrontError::Usage("guest memory exhausted".into()))
    }

    /// `n` contiguous frames.
    fn alloc_run(&mut self, n: usize) -> Result<Vec<u32>, SimFrontError> {
        self.free_frames.sort_unstable_by(|a, b| b.cmp(a));
        // Descending order: a run of n consecutive frames is a window whose ends differ by n-1.
        let n32 = u32::try_from(n).map_err(|_| SimFrontError::Usage("ring too large".into()))?;
        let pos = self
            .free_frames
            .windows(n)
            .position(|w| w[0] - w[n - 1] == n32 - 1)
            .ok_or_else(|| SimFrontError::Usage("guest memory too fragmented for a ring".into()))?;
        let mut run: Vec<u32> = self.free_frames.drain(pos..pos + n).collect();
        run.reverse();
        Ok(run)
    }

    fn backend_unsigned(&self, name: &str, default: u32) -> Result<u32, SimFrontError> {
        Ok(self
            .backend_node(name)?
            .as_deref()
            .and_then(parse_decimal)
            .unwrap_or(default))
    }

    /// The handshake, from InitWait to Connected.
    ///
    /// # Errors
    /// Any failure of the backend to follow the protocol in time.
    pub fn connect(&mut self) -> Result<DiskInfo, SimFrontError> {
        if !self.queues.is_empty() {
            return Err(SimFrontError::Usage("already connected".into()));
        }
        self.wait_backend_state(&[XenbusState::InitWait])?;
        let max_order = self.backend_unsigned("max-ring-page-order", 0)?;
        let max_queues = self.backend_unsigned("multi-queue-max-queues", 1)?;
        let limit = !self.options.ignore_backend_limits;
        let order = self
            .options
            .ring_page_order
            .map(|o| if limit { o.min(max_order) } else { o });
        let nqueues = if limit {
            self.options.queues.clamp(1, max_queues.max(1))
        } else {
            self.options.queues
        };
        let abi = Abi::from_protocol(self.options.protocol.as_deref()).unwrap_or(Abi::Native);
        let pages = 1usize << order.unwrap_or(0);

        // Rings first, as blkfront's setup_blkring does: pages, grants, an unbound port each.
        for _ in 0..nqueues {
            // FrontRing needs the ring's pages contiguous in our view of guest memory.
            let frames = self.alloc_run(pages)?;
            let shared = GuestRing::create(
                &self.domain,
                &mut self.evtchn,
                self.backend_domid,
                abi,
                frames[0],
                pages,
            )?;
            self.queues.push(Queue {
                shared,
                inflight: HashMap::new(),
            });
        }
        let rings: Vec<(&[GrantRef], Port)> = self
            .queues
            .iter()
            .map(|q| (q.shared.grefs.as_slice(), q.shared.port))
            .collect();
        let details = RingDetails {
            order,
            protocol: self.options.protocol.as_deref(),
            persistent: self.options.persistent,
        };
        self.xs
            .transaction(|tx| write_ring_details(tx, &self.frontend, &rings, details))
            .map_err(xs_err("writing the ring details"))?;
        self.set_state(XenbusState::Initialised)?;
        self.wait_backend_state(&[XenbusState::Connected])?;

        let info = DiskInfo {
            sectors: self
                .backend_node("sectors")?
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| SimFrontError::Backend("no valid sectors node".into()))?,
            sector_size: self.backend_unsigned("sector-size", 512)?,
            physical_sector_size: self.backend_unsigned("physical-sector-size", 512)?,
            info: self.backend_unsigned("info", 0)?,
            flush: self.backend_unsigned("feature-flush-cache", 0)? != 0,
            barrier: self.backend_unsigned("feature-barrier", 0)? != 0,
            discard: self.backend_unsigned("feature-discard", 0)? != 0,
            discard_secure: self.backend_unsigned("discard-secure", 0)? != 0,
            discard_granularity: self.backend_unsigned("discard-granularity", 0)?,
            persistent: self.options.persistent
                && self.backend_unsigned("feature-persistent", 0)? != 0,
            max_indirect_segments: if self.options.indirect {
                self.backend_unsigned("feature-max-indirect-segments", 0)?
            } else {
                0
            },
            queues: nqueues,
            ring_page_order: order.unwrap_or(0),
            abi,
        };
        self.info = Some(info);
        self.set_state(XenbusState::Connected)?;
        Ok(info)
    }

    /// Re-reads `sectors` (after the backend announced a resize).
    ///
    /// # Errors
    /// XenStore's, or a malformed node.
    pub fn refresh_sectors(&mut self) -> Result<u64, SimFrontError> {
        let sectors: u64 = self
            .backend_node("sectors")?
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| SimFrontError::Backend("no valid sectors node".into()))?;
        if let Some(info) = &mut self.info {
            info.sectors = sectors;
        }
        Ok(sectors)
    }

    /// Requests submitted whose completion has not been returned by [`SimFront::wait`].
    pub fn in_flight(&self) -> usize {
        self.queues.iter().map(|q| q.inflight.len()).sum::<usize>() + self.completed.len()
    }

    /// Closes the device as blkfront does when it is unplugged: Closing, then (after the
    /// backend follows) Closed, waiting for the backend to close too. Requests still in
    /// flight get their responses collected while the backend drains; whatever was never
    /// answered is returned as lost (with the backend gone it never will be). Every grant is
    /// then ended: a grant the backend still maps makes this fail, so a leak is an error.
    ///
    /// # Errors
    /// A backend that does not close in time, or still holds grants.
    pub fn close(&mut self) -> Result<Vec<Completion>, SimFrontError> {
        self.set_state(XenbusState::Closing)?;
        self.wait_backend_state(&[XenbusState::Closing, XenbusState::Closed])?;
        // Collect responses the backend sends while draining.
        let drain_deadline = Instant::now() + Duration::from_millis(200);
        while self.queues.iter().any(|q| !q.inflight.is_empty()) && Instant::now() < drain_deadline
        {
            self.poll_responses(Some(Duration::from_millis(10)))?;
        }
        self.set_state(XenbusState::Closed)?;
        self.wait_backend_state(&[XenbusState::Closed])?;
        self.poll_responses(None)?;
        let mut done: Vec<Completion> = self.completed.drain(..).collect();
        self.teardown_rings(&mut done)?;
        self.info = None;
        Ok(done)
    }

    /// After [`SimFront::close`]: starts over as a rebooted guest would (Initialising, then
    /// the whole handshake).
    ///
    /// # Errors
    /// As [`SimFront::connect`].
    pub fn reconnect(&mut self) -> Result<DiskInfo, SimFrontError> {
        if !self.queues.is_empty() {
            return Err(SimFrontError::Usage("close before reconnecting".into()));
        }
        // Drop what the last connection wrote, as a fresh blkfront would not have it.
        for q in 0..self.options.queues.max(1) {
            let _ = self.xs.rm(&format!("{}/queue-{q}", self.frontend));
        }
        for n in [
            "ring-ref",
            "event-channel",
            "ring-page-order",
            "multi-queue-num-queues",
        ] {
            let _ = self.xs.rm(&format!("{}/{n}", self.frontend));
        }
        self.set_state(XenbusState::Initialising)?;
        self.connect()
    }

    /// Ends every grant and frees every page of the rings and of requests never answered.
    fn teardown_rings(&mut self, lost: &mut Vec<Completion>) -> Result<(), SimFrontError> {
        let queues = std::mem::take(&mut self.queues);
        let mut leaked = Vec::new();
        for (qi, q) in queues.into_iter().enumerate() {
            let _ = self.evtchn.unbind(q.shared.port);
            for (id, inflight) in q.inflight {
                lost.push(Completion::lost(id, qi, &inflight));
                self.release(inflight, &mut leaked);
            }
            for (f, g) in q.shared.frames.into_iter().zip(q.shared.grefs) {
                if self.domain.end_access(g).is_err() {
                    leaked.push(g);
                }
                self.free_frames.push(f);
            }
        }
        for (f, g) in std::mem::take(&mut self.persistent_pool) {
            if self.domain.end_access(g).is_err() {
                leaked.push(g);
            }
            self.free_frames.push(f);
        }
        if leaked.is_empty() {
            Ok(())
        } else {
            Err(SimFrontError::Backend(format!(
                "the backend still holds {} grant(s) after closing: {leaked:?}",
                leaked.len()
            )))
        }
    }

    /// Whether the backend currently maps or copies the guest's grant `gref`.
    pub fn grant_in_use(&self, gref: GrantRef) -> bool {
        self.domain.grant_in_use(gref)
    }
}
