//! One backend device, from probe to removal: the driver loop that carries out the xenbus
//! state machine ([`crate::xenbus_state`]) against XenStore, holds the device
//! ([`crate::acquire`]) and runs its queues ([`crate::dataplane`]).
//!
//! What it does, in Linux's order (`drivers/block/xen-blkback/xenbus.c`):
//! 1. probe: write `feature-max-indirect-segments`, `multi-queue-max-queues`,
//!    `max-ring-page-order`, `opened` = 0 (the RFC series), watch the backend directory and
//!    the frontend's `state`, switch to InitWait;
//! 2. hold the device (inherited fd, handoff socket, `physical-device` or `params`), checking
//!    its diskseq, close the handoff socket, confine the process ([`crate::sandbox`]), then
//!    write `opened` = 1;
//! 3. when the frontend is Initialised (or Connected): read and validate its keys, map its
//!    rings and bind its event channels (one data-plane queue each), write the connect
//!    transaction, switch to Connected;
//! 4. follow the frontend to Closing and Closed; after Closed go back to InitWait when the
//!    frontend starts again (reboot, kexec), or end when the toolstack set `online` = 0, the
//!    frontend vanished, or the backend directory was removed;
//! 5. while connected, poll the device size and publish a change (`sectors` and `state` in one
//!    transaction, as `xen_vbd_resize` does).
//!
//! A fatal error (bad frontend keys, a refused device) is written where `xenbus_dev_fatal`
//! writes it and switches the device to Closing; the process keeps serving the xenbus
//! protocol so that the frontend can close and try again.
//!
//! The driver loop and the xenbus state are here; holding the device is in `hold`, the
//! frontend's side of the connection (connect, queues, resize, disconnect) in `connect`.

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags};
use xen::handoff;
use xen::xenbus::{error_node_path, parse_decimal, XenbusState};
use xen::xenstore::{BackendPath, BadBackendPath, XenStore, XsError, XsOps};
use xen::Platform;

use crate::acquire::DeviceSource;
use crate::advertise::Features;
use crate::dataplane::{GrantMode, Observer, QueueHandle, Stats};
use crate::dev_error::DevError;
use crate::device::{Device, DeviceOptions};
use crate::frontend_config::FrontendConfig;
use crate::inflight::Log;
use crate::nbd_connector::Connector;
use crate::stats_file::StatsFile;
use crate::xenstore_connector::XenStoreConnector;

mod connect;
mod hold;

/// How often the loop wakes without events: to poll the device size, refresh the statistics
/// file and notice a termination signal.
const TICK: Duration = Duration::from_millis(200);
/// How often the device size is checked while connected.
const RESIZE_POLL: Duration = Duration::from_secs(1);

const TOKEN_BACKEND: &str = "backend";
const TOKEN_FRONTEND: &str = "frontend-state";

/// Everything `blkbackd serve` is told.
#[derive(Debug)]
pub struct ServeConfig {
    /// The platform (real Xen or the simulation).
    pub platform: Arc<dyn Platform>,
    /// The backend directory, `/local/domain/<backend-domid>/backend/vbd/<frontend-domid>/<devid>`.
    pub backend_path: String,
    /// Where the device comes from.
    pub source: DeviceSource,
    /// How to open the device (read-only is decided by `mode`).
    pub device_options: DeviceOptions,
    /// What to advertise.
    pub features: Features,
    /// How the data plane reaches guest memory.
    pub grant_mode: GrantMode,
    /// How long each queue busy-polls before sleeping (zero: never).
    pub poll: Duration,
    /// Each queue's SQEs are submitted by a kernel thread
    /// ([`crate::dataplane::QueueParams::sqpoll`]).
    pub sqpoll: bool,
    /// For an NBD export: how long requests may go without any reply before the connection
    /// is given up ([`crate::dataplane::QueueParams::nbd_timeout`]).
    pub nbd_timeout: Duration,
    /// The program to start as connectors ([`crate::connector`]), so that a confined
    /// backend can connect again: `PROGRAM xenstore-connect PATH` to xenstored after it
    /// restarted, and for an NBD export `PROGRAM nbd-connect URI` to replace a lost
    /// connection and give queues connections of their own (multi-conn). `None` (only for a
    /// backend that is not confined): xenstored is dialled again by path, a lost NBD
    /// connection is given up, and the export is served by one queue.
    pub connector: Option<PathBuf>,
    /// How long to try to connect to xenstored again after it went away (a restart) before
    /// the connection counts as lost ([`XenStore::open_reconnecting`]).
    pub xenstore_reconnect: Duration,
    /// Where to keep the statistics, if anywhere.
    pub stats_file: Option<PathBuf>,
    /// Who watches the queues (`--record`), if anyone.
    pub observer: Option<Arc<dyn Observer>>,
    /// The disk's in-flight log (from `supervise`): kept up to date while connected, and
    /// resumed from when it says an earlier backend of this disk was connected and the
    /// frontend still is (see [`crate::inflight`]).
    pub inflight: Option<Arc<Log>>,
    /// A socket to the supervisor, which is sent the device once it is held, to keep for a
    /// backend that takes over should this one die ([`handoff::send_held`]).
    pub supervisor: Option<OwnedFd>,
    /// Set (SIGUSR1, from `supervise` on an upgrade) to hand the disk to the next backend:
    /// once connected, stop taking requests, finish those in flight and end, leaving the
    /// in-flight log marked connected and XenStore as it is.
    pub hand_over: Arc<AtomicBool>,
}

/// Why serving ended with an error (device-level problems are reported in XenStore instead).
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// XenStore failed.
    #[error("xenstore: {what}: {source}")]
    XenStore {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: XsError,
    },
    /// The backend directory's path is malformed.
    #[error(transparent)]
    BadBackendPath(#[from] BadBackendPath),
    /// The backend directory is not usable.
    #[error("{0}")]
    BadBackend(String),
    /// A system call failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

fn xs_err(what: impl Into<String>) -> impl FnOnce(XsError) -> ServeError {
    let what = what.into();
    move |source| ServeError::XenStore { what, source }
}

/// How serving ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The device was removed (online = 0 and the frontend closed, the frontend vanished, or
    /// the backend directory was removed).
    Removed,
    /// A termination signal asked us to stop; the device was closed.
    Stopped,
    /// The disk was handed to the next backend ([`ServeConfig::hand_over`]).
    HandedOver,
}

/// The connected rings: one data-plane queue each.
struct Connection {
    queues: Vec<QueueHandle>,
}

impl Connection {
    fn stop(self) {
        for q in self.queues {
            q.stop();
        }
    }
}

struct Backend {
    xs: XenStore,
    platform: Arc<dyn Platform>,
    be: BackendPath,
    home: String,
    frontend: String,
    features: Features,
    grant_mode: GrantMode,
    poll: Duration,
    sqpoll: bool,
    nbd_timeout: Duration,
    nbd_program: Option<PathBuf>,
    nbd_connector: Option<Arc<Connector>>,
    /// The queues configured (`features.max_queues` says what is offered now).
    max_queues: u32,
    observer: Option<Arc<dyn Observer>>,
    device_options: DeviceOptions,
    source: DeviceSource,
    listener: Option<OwnedFd>,
    state: XenbusState,
    device: Option<Arc<Device>>,
    cdrom: bool,
    pending: Option<FrontendConfig>,
    connection: Option<Connection>,
    stats: Arc<Stats>,
    stats_file: Option<StatsFile>,
    guest_log: RateLimit,
    inflight: Option<Arc<Log>>,
    supervisor: Option<OwnedFd>,
    hand_over: Arc<AtomicBool>,
    /// Taking over from a backend of this disk that died while connected: nothing is written
    /// to XenStore, the rings are resumed from the in-flight log.
    resuming: bool,
}

/// Bounds the warnings a guest can cause (a frontend cycling through bad handshakes): a few
/// per minute at warn level, the rest at debug level.
#[derive(Debug)]
struct RateLimit {
    window: Instant,
    count: u32,
}

impl RateLimit {
    const PER_MINUTE: u32 = 10;

    fn new() -> Self {
        Self {
            window: Instant::now(),
            count: 0,
        }
    }

    fn allow(&mut self) -> bool {
        if self.window.elapsed() >= Duration::from_secs(60) {
            self.window = Instant::now();
            self.count = 0;
        }
        self.count += 1;
        self.count <= Self::PER_MINUTE
    }
}

/// Serves one device until it is removed or `stop` is set.
///
/// # Errors
/// [`ServeError`] when XenStore or the backend directory is unusable; problems with the
/// device or the frontend are reported in XenStore and do not end serving.
pub fn serve(config: ServeConfig, stop: &AtomicBool) -> Result<Outcome, ServeError> {
    let be = BackendPath::parse(&config.backend_path)?;
    let path = config.platform.xenstore_path();
    let xs = match &config.connector {
        Some(program) => XenStoreConnector::start(program, &path)
            .map_err(|e| XsError::Io(std::io::Error::other(e)))
            .and_then(|dial| XenStore::open_reconnecting(dial, config.xenstore_reconnect)),
        None => XenStore::open_reconnecting(path, config.xenstore_reconnect),
    }
    .map_err(xs_err("connecting"))?;
    let home = xs
        .get_domain_path(config.platform.domid())
        .map_err(xs_err("reading our domain path"))?;
    let frontend = xs
        .read_string(&be.node("frontend"))
        .map_err(xs_err(format!("reading {}", be.node("frontend"))))?;
    let frontend_id = xs
        .read_string(&be.node("frontend-id"))
        .map_err(xs_err(format!("reading {}", be.node("frontend-id"))))?;
    if parse_decimal(&frontend_id) != Some(u32::from(be.frontend_domid())) {
        return Err(ServeError::BadBackend(format!(
            "{} is {frontend_id:?}, but the path names frontend domain {}",
            be.node("frontend-id"),
            be.frontend_domid()
        )));
    }
    if !frontend.starts_with('/') {
        return Err(ServeError::BadBackend(format!(
            "{} is not an absolute path: {frontend:?}",
            be.node("frontend")
        )));
    }
    let stats = Arc::new(Stats::new());
    let stats_file = config.stats_file.map(|p| StatsFile::new(p, be.clone()));
    let mut backend = Backend {
        xs,
        platform: config.platform,
        be,
        home,
        frontend,
        features: config.features,
        max_queues: config.features.max_queues,
        grant_mode: config.grant_mode,
        poll: config.poll,
        sqpoll: config.sqpoll,
        nbd_timeout: config.nbd_timeout,
        nbd_program: config.connector,
        nbd_connector: None,
        observer: config.observer,
        device_options: config.device_options,
        source: config.source,
        listener: None,
        state: XenbusState::Unknown,
        device: None,
        cdrom: false,
        pending: None,
        connection: None,
        stats,
        stats_file,
        guest_log: RateLimit::new(),
        inflight: config.inflight,
        supervisor: config.supervisor,
        hand_over: config.hand_over,
        resuming: false,
    };
    let outcome = backend.run(stop);
    backend.shutdown();
    outcome
}

impl Backend {
    fn run(&mut self, stop: &AtomicBool) -> Result<Outcome, ServeError> {
        self.resuming = self.may_resume()?;
        if self.resuming {
            self.take_over()?;
        } else {
            self.probe()?;
        }
        let mut last_resize_check = Instant::now();
        loop {
            if stop.load(Ordering::Relaxed) {
                tracing::info!(backend = %self.be, "stopping on signal");
                self.switch_state(XenbusState::Closing)?;
                self.disconnect();
                self.switch_state(XenbusState::Closed)?;
                return Ok(Outcome::Stopped);
            }
            if self.hand_over.load(Ordering::Relaxed) && self.hand_over() {
                return Ok(Outcome::HandedOver);
            }
            self.wait_for_events()?;
            if self.xs.is_closed() {
                return Err(ServeError::XenStore {
                    what: "connection".into(),
                    source: XsError::Closed,
                });
            }
            if self.accept_handoff()? {
                self.try_connect()?;
            }
            while let Some(event) = self.xs.next_watch_event() {
                let outcome = match event.token.as_str() {
                    TOKEN_BACKEND => self.backend_changed()?,
                    TOKEN_FRONTEND => self.frontend_changed()?,
                    other => {
                        tracing::debug!(token = other, "ignoring unknown watch token");
                        None
                    }
                };
                if let Some(outcome) = outcome {
                    return Ok(outcome);
                }
            }
            self.check_queues()?;
            if last_resize_check.elapsed() >= RESIZE_POLL {
                last_resize_check = Instant::now();
                self.check_resize()?;
            }
            if let Some(f) = &mut self.stats_file {
                f.update(&self.stats, self.state);
            }
        }
    }

    /// Waits for a watch event, a handoff connection, or the tick.
    fn wait_for_events(&self) -> Result<(), ServeError> {
        let timeout = rustix::time::Timespec {
            tv_sec: 0,
            tv_nsec: i64::from(TICK.subsec_nanos()),
        };
        let watch_fd = self.xs.watch_fd();
        let mut fds = vec![PollFd::new(&watch_fd, PollFlags::IN)];
        if let Some(l) = &self.listener {
            fds.push(PollFd::new(l, PollFlags::IN));
        }
        match rustix::event::poll(&mut fds, Some(&timeout)) {
            Ok(_) | Err(rustix::io::Errno::INTR) => Ok(()),
            Err(e) => Err(ServeError::Io {
                what: "poll",
                source: e.into(),
            }),
        }
    }

    /// Whether an earlier backend of this disk died while connected and the frontend still is:
    /// then this one takes over without a handshake.
    fn may_resume(&self) -> Result<bool, ServeError> {
        if self
            .inflight
            .as_ref()
            .and_then(|l| l.connected_queues())
            .is_none()
        {
            return Ok(false);
        }
        let connected = XenbusState::Connected.as_u32().to_string();
        let fe = self.read_opt(&format!("{}/state", self.frontend))?;
        let be = self.read_opt(&self.be.node("state"))?;
        Ok(fe.as_deref() == Some(connected.as_str()) && be.as_deref() == Some(connected.as_str()))
    }

    /// Takes over from a backend that died while connected: reads the frontend's rings as
    /// negotiated and holds the device again, writing nothing to XenStore; `try_connect`
    /// then resumes the queues from the in-flight log.
    fn take_over(&mut self) -> Result<(), ServeError> {
        tracing::info!(backend = %self.be, "resuming after a backend of this disk died");
        if let DeviceSource::Handoff(_) = &self.source {
            return Err(ServeError::BadBackend(
                "cannot resume: the device comes from a handoff socket, which is used once"
                    .to_owned(),
            ));
        }
        self.hold_inherited_and_watch()?;
        self.read_pending()
    }

    /// Takes the device fd inherited from the supervisor, if that is its source, and watches
    /// the backend's directory and the frontend's state.
    fn hold_inherited_and_watch(&mut self) -> Result<(), ServeError> {
        if matches!(self.source, DeviceSource::Fd(_)) {
            self.take_inherited_fd()?;
        }
        self.xs
            .watch(self.be.as_str(), TOKEN_BACKEND)
            .map_err(xs_err(format!("watching {}", self.be)))?;
        let fe_state = format!("{}/state", self.frontend);
        self.xs
            .watch(&fe_state, TOKEN_FRONTEND)
            .map_err(xs_err(format!("watching {fe_state}")))?;
        Ok(())
    }

    /// Hands the disk over if it can be: once connected, the queues stop taking requests and
    /// finish those in flight (what a queue that fails leaves is in the log), and the log stays
    /// marked connected for the backend `supervise` starts next. Without a log there is
    /// nobody to hand over to: the request is dropped.
    fn hand_over(&mut self) -> bool {
        if self.inflight.is_none() {
            tracing::warn!(backend = %self.be, "asked to hand the disk over, but it has no in-flight log (an NBD disk, or not run by supervise): carrying on");
            self.hand_over.store(false, Ordering::Relaxed);
            return false;
        }
        let Some(connection) = self.connection.take() else {
            // Handed over once connected: there is nothing to resume before.
            return false;
        };
        connection.stop();
        tracing::info!(backend = %self.be, "handed the disk over");
        true
    }

    /// Linux `xen_blkbk_probe`, plus the RFC's `opened` = 0 and the handoff socket.
    fn probe(&mut self) -> Result<(), ServeError> {
        // An NBD export is served by one queue over one connection unless the server allows
        // several (known once connected): say so before the frontend reads the probe nodes.
        if matches!(self.source, DeviceSource::Params | DeviceSource::Handoff(_)) {
            let params = self.read_opt(&self.be.node(handoff::PARAMS))?;
            if params.as_deref().is_some_and(crate::acquire::is_nbd_params) {
                self.features.max_queues = 1;
            }
        }
        for (name, value) in self.features.probe_nodes() {
            self.write_node(name, &value)?;
        }
        self.write_node(handoff::OPENED, "0")?;
        if let DeviceSource::Handoff(path) = &self.source {
            let listener = hold::listen(path).map_err(|source| ServeError::Io {
                what: "creating the handoff socket",
                source,
            })?;
            self.listener = Some(listener);
            let value = path.to_string_lossy().into_owned();
            self.write_node(handoff::HANDOFF_SOCKET, &value)?;
        }
        self.hold_inherited_and_watch()?;
        self.switch_state(XenbusState::InitWait)?;
        tracing::info!(backend = %self.be, frontend = %self.frontend, "probed, waiting for the frontend");
        Ok(())
    }

    fn write_node(&self, name: &str, value: &str) -> Result<(), ServeError> {
        let path = self.be.node(name);
        self.xs
            .write(&path, value)
            .map_err(xs_err(format!("writing {path}")))
    }

    fn read_opt(&self, path: &str) -> Result<Option<String>, ServeError> {
        match self.xs.read(path) {
            Ok(v) => Ok(Some(String::from_utf8_lossy(&v).into_owned())),
            Err(XsError::NotFound) => Ok(None),
            Err(e) => Err(ServeError::XenStore {
                what: format!("reading {path}"),
                source: e,
            }),
        }
    }

    /// `xenbus_switch_state`: writes the state unless the directory is gone (a removed device
    /// must not be recreated by a late write).
    fn switch_state(&mut self, state: XenbusState) -> Result<(), ServeError> {
        let path = self.be.node("state");
        let value = state.as_u32().to_string();
        let written = self
            .xs
            .transaction(|tx| match tx.read(&path) {
                Ok(_) => tx.write(&path, &value).map(|()| true),
                Err(XsError::NotFound) => Ok(false),
                Err(e) => Err(e),
            })
            .map_err(xs_err(format!("writing {path}")))?;
        if written {
            tracing::debug!(backend = %self.be, %state, "switched state");
        }
        self.state = state;
        Ok(())
    }

    /// `xenbus_dev_fatal`: reports the error, drops the connection, switches to Closing.
    fn fatal(&mut self, err: &DevError) -> Result<(), ServeError> {
        if self.guest_log.allow() {
            tracing::warn!(backend = %self.be, "{err}");
        } else {
            tracing::debug!(backend = %self.be, "{err}");
        }
        let path = error_node_path(&self.home, self.be.as_str());
        if let Err(e) = self.xs.write(&path, err.node_value()) {
            tracing::warn!("failed to write error node {path}: {e}");
        }
        self.disconnect();
        self.pending = None;
        self.switch_state(XenbusState::Closing)
    }

    fn shutdown(&mut self) {
        self.disconnect();
        if let Some(f) = &mut self.stats_file {
            f.flush(&self.stats, self.state);
        }
        self.close_listener();
    }
}
