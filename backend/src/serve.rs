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

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags};
use xen::handoff::{self, Reply};
use xen::xenstore::{BackendPath, BadBackendPath, XenStore, XsError, XsOps};
use xen::Platform;

use crate::acquire::{self, DeviceNodes, DeviceSource};
use crate::advertise::{DeviceInfo, Features};
use crate::dataplane::{self, GrantMode, QueueExit, QueueHandle, QueueParams, Stats};
use crate::dev_error::{errno, error_node_path, DevError};
use crate::device::{Device, DeviceOptions};
use crate::frontend_config::{read_frontend_config, FrontendConfig};
use crate::stats_file::StatsFile;
use crate::xenbus_state::{
    on_frontend_state, parse_decimal, FrontendAction, ReadState, XenbusState,
};

/// How often the loop wakes without events: to poll the device size, refresh the statistics
/// file and notice a termination signal.
const TICK: Duration = Duration::from_millis(200);
/// How often the device size is checked while connected.
const RESIZE_POLL: Duration = Duration::from_secs(1);

const TOKEN_BACKEND: &str = "backend";
const TOKEN_FRONTEND: &str = "frontend-state";

/// Everything `blkbackd serve` is told.
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
    /// Where to keep the statistics, if anywhere.
    pub stats_file: Option<PathBuf>,
}

impl std::fmt::Debug for ServeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeConfig")
            .field("backend_path", &self.backend_path)
            .field("source", &self.source)
            .field("device_options", &self.device_options)
            .field("features", &self.features)
            .field("grant_mode", &self.grant_mode)
            .field("poll", &self.poll)
            .field("stats_file", &self.stats_file)
            .finish_non_exhaustive()
    }
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
    let xs = XenStore::open_at(config.platform.xenstore_path()).map_err(xs_err("connecting"))?;
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
        grant_mode: config.grant_mode,
        poll: config.poll,
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
    };
    let outcome = backend.run(stop);
    backend.shutdown();
    outcome
}

impl Backend {
    fn run(&mut self, stop: &AtomicBool) -> Result<Outcome, ServeError> {
        self.probe()?;
        let mut last_resize_check = Instant::now();
        loop {
            if stop.load(Ordering::Relaxed) {
                tracing::info!(backend = %self.be, "stopping on signal");
                self.switch_state(XenbusState::Closing)?;
                self.disconnect();
                self.switch_state(XenbusState::Closed)?;
                return Ok(Outcome::Stopped);
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

    /// Linux `xen_blkbk_probe`, plus the RFC's `opened` = 0 and the handoff socket.
    fn probe(&mut self) -> Result<(), ServeError> {
        for (name, value) in self.features.probe_nodes() {
            self.write_node(name, &value)?;
        }
        self.write_node(handoff::OPENED, "0")?;
        if let DeviceSource::Handoff(path) = &self.source {
            let listener = listen(path).map_err(|source| ServeError::Io {
                what: "creating the handoff socket",
                source,
            })?;
            self.listener = Some(listener);
            let value = path.to_string_lossy().into_owned();
            self.write_node(handoff::HANDOFF_SOCKET, &value)?;
        }
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

    fn device_nodes(&self) -> Result<DeviceNodes, ServeError> {
        Ok(DeviceNodes {
            physical_device: self.read_opt(&self.be.node(handoff::PHYSICAL_DEVICE))?,
            diskseq: self.read_opt(&self.be.node(handoff::DISKSEQ))?,
            params: self.read_opt(&self.be.node(handoff::PARAMS))?,
            mode: self.read_opt(&self.be.node(handoff::MODE))?,
        })
    }

    fn device_options(&self, nodes: &DeviceNodes) -> Result<DeviceOptions, DevError> {
        Ok(DeviceOptions {
            read_only: nodes.read_only()?,
            ..self.device_options
        })
    }

    fn take_inherited_fd(&mut self) -> Result<(), ServeError> {
        let DeviceSource::Fd(fd) =
            std::mem::replace(&mut self.source, DeviceSource::PhysicalDevice)
        else {
            return Ok(());
        };
        let nodes = self.device_nodes()?;
        let result = self.device_options(&nodes).and_then(|options| {
            let device = Device::from_fd(fd, &options).map_err(|e| {
                DevError::new(errno::ENODEV, format!("creating vbd structure: {e}"))
            })?;
            acquire::check_device(&device, nodes.expected()?.as_ref(), None)?;
            Ok(device)
        });
        self.held(result)
    }

    /// Records the outcome of acquiring the device.
    fn held(&mut self, result: Result<Device, DevError>) -> Result<(), ServeError> {
        match result {
            Ok(device) => {
                let device_type = self.read_opt(&format!("{}/device-type", self.frontend))?;
                self.cdrom = device_type.as_deref() == Some("cdrom");
                tracing::info!(
                    backend = %self.be,
                    sectors = device.sectors(),
                    sector_size = device.logical_block_size(),
                    read_only = device.read_only(),
                    direct = device.direct(),
                    "holding the device"
                );
                self.device = Some(Arc::new(device));
                // The handoff socket has done its job: close it (and remove its name) while
                // that is still allowed, so nothing is accepted once confined.
                self.close_listener();
                // Every file the backend needs is open: confine (`blkbackd serve` armed it).
                crate::sandbox::confine_armed(&self.xs).map_err(|source| ServeError::Io {
                    what: "confining the backend",
                    source,
                })?;
                self.write_node(handoff::OPENED, handoff::OPENED_YES)?;
                Ok(())
            }
            Err(e) => self.fatal(&e),
        }
    }

    /// Linux `backend_changed`, plus removal of the directory (`xenbus_dev_changed`).
    fn backend_changed(&mut self) -> Result<Option<Outcome>, ServeError> {
        if self.read_opt(&self.be.node("frontend"))?.is_none() {
            tracing::info!(backend = %self.be, "backend directory removed");
            return Ok(Some(Outcome::Removed));
        }
        if self.device.is_some() {
            return Ok(None);
        }
        let nodes = self.device_nodes()?;
        let result = match self.source {
            DeviceSource::PhysicalDevice => match nodes.expected() {
                Ok(None) => return Ok(None),
                Ok(Some(expected)) => self
                    .device_options(&nodes)
                    .and_then(|o| acquire::open_physical(&expected, &o)),
                Err(e) => Err(e),
            },
            DeviceSource::Params => {
                if nodes.params.is_none() {
                    return Ok(None);
                }
                self.device_options(&nodes)
                    .and_then(|o| acquire::open_params(&nodes, &o))
            }
            DeviceSource::Fd(_) | DeviceSource::Handoff(_) => return Ok(None),
        };
        // A refused device is reported once; a later change of the nodes tries again.
        if result.is_err() && self.state == XenbusState::Closing {
            return Ok(None);
        }
        self.held(result)?;
        self.try_connect()?;
        Ok(None)
    }

    /// Accepts one handoff connection, if one is waiting. Returns whether a device is now held.
    fn accept_handoff(&mut self) -> Result<bool, ServeError> {
        let Some(listener) = &self.listener else {
            return Ok(false);
        };
        // The listener is non-blocking; the accepted socket is not (Linux does not inherit
        // O_NONBLOCK through accept).
        let conn = match rustix::net::accept_with(listener, rustix::net::SocketFlags::CLOEXEC) {
            Ok(c) => c,
            Err(rustix::io::Errno::AGAIN) => return Ok(false),
            Err(e) => {
                tracing::warn!("handoff accept: {e}");
                return Ok(false);
            }
        };
        // The message is sent right after connect; wait for it a bounded time.
        let _ = rustix::net::sockopt::set_socket_timeout(
            &conn,
            rustix::net::sockopt::Timeout::Recv,
            Some(Duration::from_secs(5)),
        );
        let (fd, info) = match handoff::recv_device(&conn) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(backend = %self.be, "handoff refused: {e}");
                let _ = handoff::send_reply(&conn, Reply::Rejected(rustix::io::Errno::INVAL));
                return Ok(false);
            }
        };
        if self.device.is_some() {
            let _ = handoff::send_reply(&conn, Reply::Rejected(rustix::io::Errno::BUSY));
            return Ok(false);
        }
        let nodes = self.device_nodes()?;
        let result = self.device_options(&nodes).and_then(|options| {
            let options = DeviceOptions {
                read_only: options.read_only || info.read_only,
                ..options
            };
            let device = Device::from_fd(fd, &options).map_err(|e| {
                DevError::new(errno::ENODEV, format!("creating vbd structure: {e}"))
            })?;
            acquire::check_device(&device, nodes.expected()?.as_ref(), info.device.diskseq)?;
            Ok(device)
        });
        let reply = match &result {
            Ok(_) => Reply::Accepted,
            Err(e) => Reply::Rejected(rustix::io::Errno::from_raw_os_error(e.errno)),
        };
        let ok = result.is_ok();
        self.held(result)?;
        if let Err(e) = handoff::send_reply(&conn, reply) {
            tracing::warn!("handoff reply: {e}");
        }
        Ok(ok)
    }

    /// Linux `frontend_changed`.
    fn frontend_changed(&mut self) -> Result<Option<Outcome>, ServeError> {
        let fe_state = ReadState::parse(
            self.read_opt(&format!("{}/state", self.frontend))?
                .as_deref(),
        );
        let online = self
            .read_opt(&self.be.node("online"))?
            .as_deref()
            .and_then(parse_decimal)
            .unwrap_or(0)
            != 0;
        let action = on_frontend_state(self.state, fe_state, online);
        tracing::debug!(backend = %self.be, ?fe_state, own = %self.state, ?action, "frontend changed");
        match action {
            FrontendAction::Nothing => {}
            FrontendAction::PrepareReconnect => {
                tracing::info!(backend = %self.be, "prepare for reconnect");
                self.switch_state(XenbusState::InitWait)?;
            }
            FrontendAction::Connect => {
                self.disconnect();
                let xs = &self.xs;
                let mut read = |path: &str| match xs.read(path) {
                    Ok(v) => Ok(Some(String::from_utf8_lossy(&v).into_owned())),
                    Err(XsError::NotFound) => Ok(None),
                    Err(e) => Err(DevError::new(errno::EIO, format!("reading {path}: {e}"))),
                };
                match read_frontend_config(&self.frontend, &self.features, &mut read) {
                    Ok(config) => {
                        tracing::info!(
                            backend = %self.be,
                            queues = config.queues.len(),
                            protocol = %config.protocol,
                            ring_pages = 1u32 << config.ring_page_order,
                            persistent = config.persistent_grants,
                            "frontend ready"
                        );
                        self.pending = Some(config);
                        self.try_connect()?;
                    }
                    Err(e) => self.fatal(&e)?,
                }
            }
            FrontendAction::Closing => self.switch_state(XenbusState::Closing)?,
            FrontendAction::Close { remove } => {
                self.disconnect();
                self.pending = None;
                self.switch_state(XenbusState::Closed)?;
                if remove {
                    return Ok(Some(Outcome::Removed));
                }
            }
            FrontendAction::Remove => {
                tracing::info!(backend = %self.be, "frontend gone");
                return Ok(Some(Outcome::Removed));
            }
            FrontendAction::Fatal(n) => {
                self.fatal(&DevError::new(
                    errno::EINVAL,
                    format!("saw state {n} at frontend"),
                ))?;
            }
        }
        Ok(None)
    }

    /// `xen_update_blkif_status` + `connect`: once the frontend's rings are known and the
    /// device is held, start the queues, write the connect transaction and switch to Connected.
    fn try_connect(&mut self) -> Result<(), ServeError> {
        if self.state == XenbusState::Connected || self.connection.is_some() {
            return Ok(());
        }
        let (Some(config), Some(device)) = (&self.pending, &self.device) else {
            return Ok(());
        };
        let info = DeviceInfo::of(device, self.cdrom, self.discard_enabled()?);
        let mut queues = Vec::with_capacity(config.queues.len());
        for (index, ring) in config.queues.iter().enumerate() {
            let mut params = QueueParams::new(
                Arc::clone(&self.platform),
                self.be.frontend_domid(),
                config.abi,
                ring.ring_refs.clone(),
                ring.port,
                Arc::clone(device),
            );
            params.grant_mode = self.grant_mode;
            params.poll = self.poll;
            params.persistent_grants = config.persistent_grants;
            params.max_indirect_segments = u16::try_from(
                self.features
                    .max_indirect_segments
                    .min(ring::MAX_INDIRECT_SEGMENTS as u32),
            )
            .unwrap_or(0);
            params.features = info.queue_features();
            params.stats = Arc::clone(&self.stats);
            params.name = format!("{}-q{index}", self.be.file_stem());
            match dataplane::spawn_queue(params) {
                Ok(q) => queues.push(q),
                Err(e) => {
                    Connection { queues }.stop();
                    let err = DevError::new(
                        errno::EIO,
                        format!("mapping ring-ref port {}: {e}", ring.port),
                    );
                    return self.fatal(&err);
                }
            }
        }
        self.connection = Some(Connection { queues });
        let nodes = info.connect_nodes(self.features.persistent_grants);
        let be = &self.be;
        self.xs
            .transaction(|tx| {
                for (name, value) in &nodes {
                    tx.write(&be.node(name), value)?;
                }
                Ok(())
            })
            .map_err(xs_err(format!(
                "writing the connect transaction under {be}"
            )))?;
        self.switch_state(XenbusState::Connected)?;
        tracing::info!(backend = %self.be, sectors = info.sectors, "connected");
        Ok(())
    }

    fn discard_enabled(&self) -> Result<bool, ServeError> {
        Ok(self
            .read_opt(&self.be.node("discard-enable"))?
            .as_deref()
            .and_then(parse_decimal)
            .unwrap_or(1)
            != 0)
    }

    /// `xen_blkif_disconnect`: stops every queue (answering or dropping what is in flight).
    fn disconnect(&mut self) {
        if let Some(c) = self.connection.take() {
            c.stop();
            tracing::debug!(backend = %self.be, "disconnected");
        }
    }

    /// Collects queues that ended by themselves. A frontend that broke the ring protocol has
    /// that ring halted, as Linux does ("Halting ring processing"), and the device otherwise
    /// stays as it is; a local failure (io_uring, event channel) is fatal for the device.
    fn check_queues(&mut self) -> Result<(), ServeError> {
        let Some(conn) = &mut self.connection else {
            return Ok(());
        };
        let mut failure = None;
        let mut i = 0;
        while i < conn.queues.len() {
            if !conn.queues[i].is_finished() {
                i += 1;
                continue;
            }
            match conn.queues.swap_remove(i).wait() {
                QueueExit::Stopped => {}
                QueueExit::Protocol(v) => {
                    if self.guest_log.allow() {
                        tracing::warn!(backend = %self.be, "frontend broke the ring protocol ({v}); ring halted");
                    } else {
                        tracing::debug!(backend = %self.be, "frontend broke the ring protocol ({v}); ring halted");
                    }
                }
                QueueExit::Failed(why) => failure = Some(why),
                QueueExit::Panicked => failure = Some("the queue thread panicked".to_owned()),
            }
        }
        match failure {
            Some(why) => self.fatal(&DevError::new(errno::EIO, format!("queue failed: {why}"))),
            None => Ok(()),
        }
    }

    /// `xen_vbd_resize`: publishes a changed size with the current state, in one transaction.
    fn check_resize(&mut self) -> Result<(), ServeError> {
        let Some(device) = &self.device else {
            return Ok(());
        };
        let before = device.sectors();
        let after = match device.refresh_size() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(backend = %self.be, "reading the device size: {e}");
                return Ok(());
            }
        };
        if before == after || self.state != XenbusState::Connected {
            return Ok(());
        }
        tracing::info!(backend = %self.be, before, after, "VBD resize");
        let (sectors, state) = (self.be.node("sectors"), self.be.node("state"));
        let value = self.state.as_u32().to_string();
        self.xs
            .transaction(|tx| {
                tx.write(&sectors, after.to_string())?;
                tx.write(&state, &value)
            })
            .map_err(xs_err("writing the new size"))
    }

    fn shutdown(&mut self) {
        self.disconnect();
        if let Some(f) = &mut self.stats_file {
            f.flush(&self.stats, self.state);
        }
        self.close_listener();
    }

    fn close_listener(&mut self) {
        if let (Some(_), DeviceSource::Handoff(path)) = (self.listener.take(), &self.source) {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Creates the handoff listener ([`handoff::listen`]), non-blocking: the serve loop polls it.
fn listen(path: &std::path::Path) -> std::io::Result<OwnedFd> {
    let sock = handoff::listen(path, 1).map_err(std::io::Error::other)?;
    rustix::io::ioctl_fionbio(&sock, true)?;
    Ok(sock)
}
