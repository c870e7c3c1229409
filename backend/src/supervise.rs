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
//! child that exits 0 removed its device; one that fails or is killed leaves its device with
//! an error written where `xenbus_dev_fatal` writes it and `state` Closed, and is not
//! restarted: nothing is restarted silently. The toolstack recreating the device (state 1
//! again) starts a new backend. SIGTERM or SIGINT stops every child with SIGTERM (each closes
//! its device cleanly), waits for them, and exits.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use xen::xenstore::{BackendPath, XenStore, XsError, XsOps};
use xen::DomId;

use crate::dev_error::{errno, DevError};
use xen::xenbus::{error_node_path, parse_decimal, ReadState, XenbusState};

/// How long children get to close their devices after SIGTERM before they are killed.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How often children are reaped without a XenStore event.
const TICK: Duration = Duration::from_millis(200);

/// Everything `blkbackd supervise` is told.
#[derive(Debug, Clone)]
pub struct SuperviseConfig {
    /// The program to run for each device (normally this very executable).
    pub program: PathBuf,
    /// Arguments put before `--backend-path <dir>` (`serve`, `--platform ...`, options).
    pub serve_args: Vec<String>,
    /// Where XenStore is (`Platform::xenstore_path`).
    pub xenstore_path: PathBuf,
    /// This (the backend) domain's id.
    pub domid: DomId,
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

/// What happened to one device directory's backend, for the log and for tests.
#[derive(Debug)]
struct Served {
    child: Child,
    started: Instant,
}

/// Runs the supervisor until `stop` is set.
///
/// # Errors
/// [`SuperviseError`] when XenStore is unusable.
pub fn supervise(config: &SuperviseConfig, stop: &AtomicBool) -> Result<(), SuperviseError> {
    let xs = XenStore::open_at(&config.xenstore_path).map_err(xs_err("connecting"))?;
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
        reap(&xs, &home, &mut children);
        if rescan {
            rescan = false;
            for path in new_devices(&xs, config.domid, &root, &children)? {
                match spawn(config, &path) {
                    Ok(child) => {
                        tracing::info!(backend = %path, pid = child.id(), "started backend");
                        children.insert(
                            path,
                            Served {
                                child,
                                started: Instant::now(),
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

fn spawn(config: &SuperviseConfig, path: &BackendPath) -> std::io::Result<Child> {
    let mut cmd = Command::new(&config.program);
    cmd.args(&config.serve_args)
        .arg("--backend-path")
        .arg(path.as_str());
    if let Some(dir) = &config.handoff_dir {
        std::fs::create_dir_all(dir)?;
        cmd.arg("--handoff-socket")
            .arg(dir.join(format!("{}.sock", path.file_stem())));
    }
    if let Some(dir) = &config.record_dir {
        std::fs::create_dir_all(dir)?;
        cmd.arg("--record")
            .arg(dir.join(format!("{}.trace", path.file_stem())));
    }
    cmd.spawn()
}

/// Reaps exited children and cleans up after those that failed.
fn reap(xs: &XenStore, home: &str, children: &mut HashMap<BackendPath, Served>) {
    let mut done = Vec::new();
    for (path, served) in children.iter_mut() {
        match served.child.try_wait() {
            Ok(Some(status)) => done.push((path.clone(), status)),
            Ok(None) => {}
            Err(e) => tracing::warn!(backend = %path, "waiting for the backend: {e}"),
        }
    }
    for (path, status) in done {
        let served = children.remove(&path);
        let lived = served.map(|s| s.started.elapsed()).unwrap_or_default();
        if status.success() {
            tracing::info!(backend = %path, ?lived, "backend finished");
        } else {
            let err = DevError::new(errno::EIO, format!("blkbackd {}", describe(status)));
            tracing::error!(backend = %path, ?lived, "{err}");
            report_dead(xs, home, &path, &err);
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
        reap(xs, home, &mut children);
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
