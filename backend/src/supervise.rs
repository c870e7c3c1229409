//! `blkbackd supervise`: starts one backend process per virtual disk, as the kernel's xenbus
//! driver probes blkback for each new device, and cleans up after them.
//!
//! Why a process per disk: a backend process maps one guest's memory only, so a bug exploited
//! by one guest cannot reach another guest's disks (the isolation the design is for), and
//! with one disk per process a crash or a confinement profile concerns exactly one disk.
//! The supervisor itself touches no guest memory; it only reads XenStore and starts, reaps and
//! stops children.
//!
//! It watches `/local/domain/<own domid>/backend/vbd`. A device directory whose `state` is
//! Initialising (1, as the toolstack writes it) and which has `frontend` and `frontend-id`
//! (what Linux's xenbus reads before probing) gets `blkbackd serve --backend-path <dir>`. A
//! child that exits 0 removed its device.
//!
//! Each disk has an in-flight log ([`crate::inflight`], a memfd the supervisor creates and
//! keeps, inherited by each backend of the disk), and each backend sends the supervisor the
//! device once it holds it (`xen::handoff::send_held`). A backend that fails or is killed
//! while its log says it was connected is replaced by a new one, given the log and the
//! device (`--device-fd`), which takes over without the guest noticing. A backend that dies before it connected, or the
//! [`MAX_FAILED_RESTARTS`]th replacement in a row that dies before it resumed (a crash
//! loop), leaves its device with an error written where `xenbus_dev_fatal` writes it and
//! `state` Closed, and is not restarted. The toolstack recreating the device (state 1 again)
//! starts a new backend. SIGTERM or SIGINT stops every child with SIGTERM (each closes its
//! device cleanly), waits for them, and exits.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use xen::handoff;
use xen::xenstore::{BackendPath, XenStore, XsError, XsOps, RECONNECT_WITHIN};
use xen::DomId;

use crate::dev_error::{errno, DevError};
use crate::inflight::{self, Log};
use xen::xenbus::{error_node_path, parse_decimal, ReadState, XenbusState};

/// How long children get to close their devices after SIGTERM before they are killed.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How often children are reaped without a XenStore event.
const TICK: Duration = Duration::from_millis(200);
/// Replacements in a row that die before they resume, after which a disk is given up on.
pub const MAX_FAILED_RESTARTS: u32 = 3;

/// Everything `blkbackd supervise` is told.
#[derive(Debug, Clone)]
pub struct SuperviseConfig {
    /// The program to run for each device (normally this very executable).
    pub program: PathBuf,
    /// Arguments put before `--backend-path <dir>` (`serve`, `--platform ...`, options).
    pub serve_args: Vec<String>,
    /// The most queues a backend offers (sizes the in-flight logs).
    pub max_queues: u32,
    /// The largest ring a backend offers, as `max-ring-page-order` (sizes the logs).
    pub max_ring_page_order: u32,
    /// Where XenStore is (`Platform::xenstore_path`).
    pub xenstore_path: PathBuf,
    /// This (the backend) domain's id.
    pub domid: DomId,
    /// Each backend opens `params` itself (`serve --open-params`).
    pub open_params: bool,
    /// When set, each backend listens for its device from blkhotplug on
    /// `<dir>/vbd-<frontend-domid>-<devid>.sock` (`serve --handoff-socket`).
    pub handoff_dir: Option<PathBuf>,
    /// When set, each backend records a ring trace to
    /// `<dir>/vbd-<frontend-domid>-<devid>.trace` (`serve --record`).
    pub record_dir: Option<PathBuf>,
}

/// Why supervising failed.
#[derive(Debug, thiserror::Error)]
pub enum SuperviseError {
    /// XenStore failed.
    #[error("xenstore: {what}: {source}")]
    XenStore {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: XsError,
    },
}

fn xs_err(what: impl Into<String>) -> impl FnOnce(XsError) -> SuperviseError {
    let what = what.into();
    move |source| SuperviseError::XenStore { what, source }
}

/// One device directory's backend.
#[derive(Debug)]
struct Served {
    child: Child,
    started: Instant,
    /// The socket the backend sends the device on once it holds it ([`handoff::send_held`]).
    channel: Option<OwnedFd>,
    /// The device, once the backend (this one or one before it) sent it.
    device: Option<OwnedFd>,
    /// The disk's in-flight log, if one could be made.
    log: Option<KeptLog>,
    /// The log's count of connections and resumptions when this backend started.
    starts: u32,
    /// Replacements in a row that died before they resumed, this one excluded.
    failures: u32,
}

/// A disk's in-flight log, kept across its backends.
#[derive(Debug)]
struct KeptLog {
    fd: OwnedFd,
    log: Arc<Log>,
}

impl KeptLog {
    fn create(config: &SuperviseConfig) -> Result<Self, inflight::LogError> {
        // The largest ring of any ABI (their slot counts are the same).
        let pages = 1usize << config.max_ring_page_order.min(ring::MAX_RING_PAGE_ORDER);
        let ring_size = [ring::Abi::X86_32, ring::Abi::X86_64]
            .into_iter()
            .map(|abi| ring::ring_size(abi, pages))
            .max()
            .unwrap_or(0);
        let fd = inflight::create(config.max_queues.min(inflight::MAX_QUEUES), ring_size)?;
        let log = Log::open(fd.try_clone()?)?;
        Ok(Self { fd, log })
    }
}

/// Runs the supervisor until `stop` is set.
///
/// # Errors
/// [`SuperviseError`] when XenStore is unusable.
pub fn supervise(config: &SuperviseConfig, stop: &AtomicBool) -> Result<(), SuperviseError> {
    let xs = XenStore::open_reconnecting(config.xenstore_path.clone(), RECONNECT_WITHIN)
        .map_err(xs_err("connecting"))?;
    let home = xs
        .get_domain_path(config.domid)
        .map_err(xs_err("reading our domain path"))?;
    let root = format!("{home}/backend/vbd");
    xs.watch(&root, "vbd")
        .map_err(xs_err(format!("watching {root}")))?;
    tracing::info!(%root, "supervising");
    let mut children: HashMap<BackendPath, Served> = HashMap::new();
    let mut rescan = true;
    while !stop.load(Ordering::Relaxed) {
        match xs.wait_watch_event(Some(TICK)) {
            Ok(Some(_)) => {
                rescan = true;
                // Drain what else is queued: one scan covers them all.
                while xs.next_watch_event().is_some() {}
            }
            Ok(None) => {}
            Err(e) => return Err(xs_err("waiting for events")(e)),
        }
        reap(&xs, &home, Some(config), &mut children);
        if rescan {
            rescan = false;
            for path in new_devices(&xs, config.domid, &root, &children)? {
                let log = KeptLog::create(config)
                    .inspect_err(|e| {
                        tracing::warn!(backend = %path, "no restart after a crash: {e}");
                    })
                    .ok();
                match spawn(config, &path, log.as_ref(), None) {
                    Ok((child, channel)) => {
                        tracing::info!(backend = %path, pid = child.id(), "started backend");
                        let starts = log.as_ref().map_or(0, |l| l.log.starts());
                        children.insert(
                            path,
                            Served {
                                child,
                                started: Instant::now(),
                                channel: Some(channel),
                                device: None,
                                log,
                                starts,
                                failures: 0,
                            },
                        );
                    }
                    Err(e) => {
                        let err = DevError::new(errno::ENOENT, format!("starting blkbackd: {e}"));
                        tracing::error!(backend = %path, "{err}");
                        report_dead(&xs, &home, &path, &err);
                    }
                }
            }
        }
    }
    stop_all(&xs, &home, children);
    Ok(())
}

/// The device directories that want a backend and have none.
fn new_devices(
    xs: &XenStore,
    own: DomId,
    root: &str,
    children: &HashMap<BackendPath, Served>,
) -> Result<Vec<BackendPath>, SuperviseError> {
    let mut found = Vec::new();
    let frontends = match xs.directory(root) {
        Ok(d) => d,
        Err(XsError::NotFound) => return Ok(found),
        Err(e) => return Err(xs_err(format!("listing {root}"))(e)),
    };
    for fe in frontends {
        let Some(fe_id) = parse_decimal(&fe).and_then(|n| DomId::try_from(n).ok()) else {
            continue;
        };
        let fe_dir = format!("{root}/{fe}");
        let devices = match xs.directory(&fe_dir) {
            Ok(d) => d,
            Err(XsError::NotFound) => continue,
            Err(e) => return Err(xs_err(format!("listing {fe_dir}"))(e)),
        };
        for dev in devices {
            let Some(devid) = parse_decimal(&dev) else {
                continue;
            };
            let path = BackendPath::new(own, fe_id, devid);
            if children.contains_key(&path) {
                continue;
            }
            let read = |n: &str| xs.read_string(&path.node(n)).ok();
            let state = ReadState::parse(read("state").as_deref());
            if state == ReadState::Known(XenbusState::Initialising)
                && read("frontend").is_some()
                && read("frontend-id").is_some()
            {
                found.push(path);
            }
        }
    }
    Ok(found)
}

/// Starts a backend for `path` with the disk's log and, for one that takes over, the device
/// its predecessor held. Returns the child and our end of its [`Served::channel`].
fn spawn(
    config: &SuperviseConfig,
    path: &BackendPath,
    log: Option<&KeptLog>,
    device: Option<&OwnedFd>,
) -> std::io::Result<(Child, OwnedFd)> {
    let mut cmd = Command::new(&config.program);
    cmd.args(&config.serve_args)
        .arg("--backend-path")
        .arg(path.as_str());
    let (ours, theirs) = rustix::net::socketpair(
        rustix::net::AddressFamily::UNIX,
        rustix::net::SocketType::SEQPACKET,
        rustix::net::SocketFlags::CLOEXEC,
        None,
    )?;
    // These fds go to this child only: duplicates without close-on-exec, closed again once
    // the child has them (the supervisor is single-threaded: no other child can inherit them).
    let mut inherited = Vec::new();
    for (option, fd) in [
        ("--inflight-fd", log.map(|l| &l.fd)),
        ("--supervisor-fd", Some(&theirs)),
        ("--device-fd", device),
    ] {
        if let Some(fd) = fd {
            let dup = rustix::io::dup(fd)?;
            cmd.arg(option).arg(dup.as_raw_fd().to_string());
            inherited.push(dup);
        }
    }
    // A backend that takes over gets the device its predecessor held, from no other source.
    if device.is_none() {
        if config.open_params {
            cmd.arg("--open-params");
        } else if let Some(dir) = &config.handoff_dir {
            std::fs::create_dir_all(dir)?;
            cmd.arg("--handoff-socket")
                .arg(dir.join(format!("{}.sock", path.file_stem())));
        }
    }
    if let Some(dir) = &config.record_dir {
        std::fs::create_dir_all(dir)?;
        cmd.arg("--record")
            .arg(dir.join(format!("{}.trace", path.file_stem())));
    }
    let child = cmd.spawn();
    drop(inherited);
    Ok((child?, ours))
}

/// Reaps exited children: replaces those that died while connected (with `config`; not
/// while stopping), cleans up after the others that failed.
fn reap(
    xs: &XenStore,
    home: &str,
    config: Option<&SuperviseConfig>,
    children: &mut HashMap<BackendPath, Served>,
) {
    let mut done = Vec::new();
    for (path, served) in children.iter_mut() {
        take_device(path, served);
        match served.child.try_wait() {
            Ok(Some(status)) => done.push((path.clone(), status)),
            Ok(None) => {}
            Err(e) => tracing::warn!(backend = %path, "waiting for the backend: {e}"),
        }
    }
    for (path, status) in done {
        let Some(served) = children.remove(&path) else {
            continue;
        };
        let lived = served.started.elapsed();
        if status.success() {
            tracing::info!(backend = %path, ?lived, "backend finished");
            continue;
        }
        let mut err = DevError::new(errno::EIO, format!("blkbackd {}", describe(status)));
        if let (Some(config), Some(log)) = (config, served.log) {
            let resumable = log.log.connected_queues().is_some();
            let failures = if log.log.starts() == served.starts {
                served.failures + 1
            } else {
                0
            };
            if resumable && failures < MAX_FAILED_RESTARTS {
                tracing::warn!(backend = %path, ?lived, failures, "{err}; starting a backend that takes over");
                match spawn(config, &path, Some(&log), served.device.as_ref()) {
                    Ok((child, channel)) => {
                        let starts = log.log.starts();
                        children.insert(
                            path,
                            Served {
                                child,
                                started: Instant::now(),
                                channel: Some(channel),
                                device: served.device,
                                log: Some(log),
                                starts,
                                failures,
                            },
                        );
                        continue;
                    }
                    Err(e) => err = DevError::new(errno::ENOENT, format!("starting blkbackd: {e}")),
                }
            } else if resumable {
                err = DevError::new(
                    errno::EIO,
                    format!(
                        "blkbackd {}; given up after {failures} restarts in a row",
                        describe(status)
                    ),
                );
            }
        }
        tracing::error!(backend = %path, ?lived, "{err}");
        report_dead(xs, home, &path, &err);
    }
}

/// Keeps the device the backend sent, if it did.
fn take_device(path: &BackendPath, served: &mut Served) {
    let Some(channel) = &served.channel else {
        return;
    };
    match handoff::recv_held(channel) {
        Ok(None) => {}
        Ok(Some(fd)) => {
            served.device = Some(fd);
            served.channel = None;
        }
        Err(handoff::HandoffError::Closed) => served.channel = None,
        Err(e) => {
            tracing::warn!(backend = %path, "the backend's device message: {e}");
            served.channel = None;
        }
    }
}

fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(sig)) => format!("was killed by signal {sig}"),
        (None, None) => "ended".to_owned(),
    }
}

/// A dead backend's device: the error where `xenbus_dev_fatal` writes it, state Closed
/// (nothing serves it any more), unless the toolstack already removed the directory.
fn report_dead(xs: &XenStore, home: &str, path: &BackendPath, err: &DevError) {
    let state = path.node("state");
    let result = xs.transaction(|tx| match tx.read(&state) {
        Ok(_) => {
            tx.write(&error_node_path(home, path.as_str()), err.node_value())?;
            tx.write(&state, XenbusState::Closed.as_u32().to_string())
        }
        Err(XsError::NotFound) => Ok(()),
        Err(e) => Err(e),
    });
    if let Err(e) = result {
        tracing::warn!(backend = %path, "cannot report the dead backend: {e}");
    }
}

/// Stops every child: SIGTERM, a grace period, then SIGKILL.
fn stop_all(xs: &XenStore, home: &str, mut children: HashMap<BackendPath, Served>) {
    for (path, served) in &children {
        if let Some(pid) = i32::try_from(served.child.id())
            .ok()
            .and_then(rustix::process::Pid::from_raw)
        {
            if let Err(e) = rustix::process::kill_process(pid, rustix::process::Signal::TERM) {
                tracing::warn!(backend = %path, "SIGTERM: {e}");
            }
        }
    }
    let deadline = Instant::now() + STOP_GRACE;
    while !children.is_empty() && Instant::now() < deadline {
        reap(xs, home, None, &mut children);
        std::thread::sleep(Duration::from_millis(20));
    }
    for (path, mut served) in children {
        tracing::error!(backend = %path, "backend did not stop in time; killing it");
        let _ = served.child.kill();
        let _ = served.child.wait();
        report_dead(
            xs,
            home,
            &path,
            &DevError::new(errno::EIO, "blkbackd did not stop in time"),
        );
    }
}
