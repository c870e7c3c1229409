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
//!
//! An upgrade (the `upgrade` flag, SIGHUP) hands every disk to a backend of the program now
//! at [`SuperviseConfig::program`] the same way, without a crash: each backend is sent SIGUSR1,
//! and once connected it stops taking requests, finishes those in flight and exits 0 with its
//! log still marked connected ([`crate::serve::ServeConfig::hand_over`]); the new backend
//! resumes from the log. One that cannot be started, or dies before it resumed, is replaced by
//! a backend of [`SuperviseConfig::fallback`] (the supervisor's own image), with an error
//! logged. A disk keeps the program its backend ran across crashes.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
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
/// How often while a backend hands its disk over: the guest waits from its exit until the
/// next backend starts.
const HAND_OVER_TICK: Duration = Duration::from_millis(5);
/// For how long after asking [`HAND_OVER_TICK`] applies: a backend finishes its requests in
/// flight well within that unless its disk hangs (or its frontend closed: it hands over once
/// connected again), and then its exit is noticed at the usual tick.
const HAND_OVER_WAIT: Duration = Duration::from_secs(5);
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
    /// What runs instead of `program` when an upgrade to it fails: a program known to work
    /// (`/proc/self/exe`, this very image, even once another file was installed at `program`).
    pub fallback: Option<PathBuf>,
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
    /// The program it runs, which a backend replacing it after a crash runs too.
    program: PathBuf,
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
    /// Where it is in handing its disk over for an upgrade.
    hand_over: HandOver,
    /// Started by an upgrade: should it die before it resumed, [`SuperviseConfig::fallback`]
    /// takes the disk over.
    upgraded: bool,
}

/// A backend's part in an upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HandOver {
    /// None asked for.
    No,
    /// Wanted: it is asked once it has connected or resumed (its signal handler is set by
    /// then; SIGUSR1 would kill it before).
    Wanted,
    /// Asked (SIGUSR1) then: it exits 0 once it handed the disk over.
    Asked(Instant),
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

/// Runs the supervisor until `stop` is set; each time `upgrade` is set, upgrades every disk
/// (see the module documentation) and clears it.
///
/// # Errors
/// [`SuperviseError`] when XenStore is unusable.
pub fn supervise(
    config: &SuperviseConfig,
    stop: &AtomicBool,
    upgrade: &AtomicBool,
) -> Result<(), SuperviseError> {
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
        let handing_over = children
            .values()
            .any(|s| matches!(s.hand_over, HandOver::Asked(at) if at.elapsed() < HAND_OVER_WAIT));
        let tick = if handing_over { HAND_OVER_TICK } else { TICK };
        match xs.wait_watch_event(Some(tick)) {
            Ok(Some(_)) => {
                rescan = true;
                // Drain what else is queued: one scan covers them all.
                while xs.next_watch_event().is_some() {}
            }
            Ok(None) => {}
            Err(e) => return Err(xs_err("waiting for events")(e)),
        }
        if upgrade.swap(false, Ordering::Relaxed) {
            tracing::info!(disks = children.len(), "upgrading every disk");
            for served in children.values_mut().filter(|s| s.log.is_some()) {
                served.hand_over = HandOver::Wanted;
            }
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
                match spawn(config, &config.program, &path, log.as_ref(), None) {
                    Ok((child, channel)) => {
                        tracing::info!(backend = %path, pid = child.id(), "started backend");
                        let starts = log.as_ref().map_or(0, |l| l.log.starts());
                        children.insert(
                            path,
                            Served {
                                child,
                                program: config.program.clone(),
                                started: Instant::now(),
                                channel: Some(channel),
                                device: None,
                                log,
                                starts,
                                failures: 0,
                                hand_over: HandOver::No,
                                upgraded: false,
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
    program: &Path,
    path: &BackendPath,
    log: Option<&KeptLog>,
    device: Option<&OwnedFd>,
) -> std::io::Result<(Child, OwnedFd)> {
    let mut cmd = Command::new(program);
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
    } else {
        // A fault point fires in a disk's first backend only, or the disk would crash-loop.
        cmd.env_remove(crate::fault::ENV);
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
        ask_hand_over(path, served);
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
        let resumable = served
            .log
            .as_ref()
            .is_some_and(|l| l.log.connected_queues().is_some());
        let asked = matches!(served.hand_over, HandOver::Asked(_));
        let handed_over = status.success() && asked && resumable;
        if status.success() && !handed_over {
            tracing::info!(backend = %path, ?lived, "backend finished");
            continue;
        }
        let err = match config {
            Some(config) if resumable => {
                match replace(config, &path, served, status, handed_over) {
                    Ok(next) => {
                        children.insert(path, next);
                        continue;
                    }
                    Err(err) => err,
                }
            }
            _ => DevError::new(errno::EIO, format!("blkbackd {}", describe(status))),
        };
        tracing::error!(backend = %path, ?lived, "{err}");
        report_dead(xs, home, &path, &err);
    }
}

/// Starts the backend that takes `path` over from `served`, whose log says it was connected and
/// which ended with `status` (`handed_over`: cleanly, for an upgrade): a backend of the upgraded
/// program after a hand-over, of the fallback when an upgraded one could not start or died
/// before it resumed, else of the same program. Returns the error to report when the disk
/// cannot be taken over.
fn replace(
    config: &SuperviseConfig,
    path: &BackendPath,
    served: Served,
    status: ExitStatus,
    handed_over: bool,
) -> Result<Served, DevError> {
    let died = DevError::new(errno::EIO, format!("blkbackd {}", describe(status)));
    let Some(log) = served.log else {
        return Err(died);
    };
    let resumed = log.log.starts() != served.starts;
    let failures = if resumed { 0 } else { served.failures + 1 };
    if failures >= MAX_FAILED_RESTARTS {
        return Err(DevError::new(
            errno::EIO,
            format!(
                "blkbackd {}; given up after {failures} restarts in a row",
                describe(status)
            ),
        ));
    }
    let lived = served.started.elapsed();
    let fallback = config.fallback.as_deref();
    let mut program = served.program.as_path();
    let mut upgraded = false;
    if handed_over {
        tracing::info!(backend = %path, program = %config.program.display(), "the backend handed the disk over; starting the upgraded one");
        program = &config.program;
        upgraded = true;
    } else if let Some(fallback) = fallback.filter(|_| served.upgraded && !resumed) {
        tracing::error!(backend = %path, ?lived, "the upgraded blkbackd ({}) {} before it resumed; falling back to {}", served.program.display(), describe(status), fallback.display());
        program = fallback;
    } else {
        tracing::warn!(backend = %path, ?lived, failures, "{died}; starting a backend that takes over");
    }
    let mut spawned = spawn(config, program, path, Some(&log), served.device.as_ref());
    if let (Err(e), Some(fallback)) = (&spawned, fallback.filter(|_| upgraded)) {
        tracing::error!(backend = %path, "cannot start the upgraded blkbackd ({}): {e}; falling back to {}", program.display(), fallback.display());
        program = fallback;
        upgraded = false;
        spawned = spawn(config, program, path, Some(&log), served.device.as_ref());
    }
    let (child, channel) =
        spawned.map_err(|e| DevError::new(errno::ENOENT, format!("starting blkbackd: {e}")))?;
    Ok(Served {
        child,
        program: program.to_owned(),
        started: Instant::now(),
        channel: Some(channel),
        device: served.device,
        starts: log.log.starts(),
        log: Some(log),
        failures,
        hand_over: HandOver::No,
        upgraded,
    })
}

/// Asks `served` to hand its disk over (SIGUSR1) if an upgrade wants it and it has connected;
/// [`reap`] starts the upgraded backend once it did.
fn ask_hand_over(path: &BackendPath, served: &mut Served) {
    let connected = served
        .log
        .as_ref()
        .is_some_and(|l| l.log.starts() != served.starts);
    if served.hand_over != HandOver::Wanted || !connected {
        return;
    }
    match signal(&served.child, rustix::process::Signal::USR1) {
        Ok(()) => served.hand_over = HandOver::Asked(Instant::now()),
        Err(e) => tracing::warn!(backend = %path, "asking the backend to hand over: {e}"),
    }
}

fn signal(child: &Child, sig: rustix::process::Signal) -> std::io::Result<()> {
    let pid = i32::try_from(child.id())
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .ok_or_else(|| std::io::Error::other("no pid"))?;
    Ok(rustix::process::kill_process(pid, sig)?)
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
        if let Err(e) = signal(&served.child, rustix::process::Signal::TERM) {
            tracing::warn!(backend = %path, "SIGTERM: {e}");
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
