//! A backend that survives its own death (issue 15): under `blkbackd supervise`, a guest runs
//! a verified random read/write workload at depth 32 on 2 queues while its `serve` process
//! is killed (SIGKILL) at random moments, or upgraded (SIGHUP to the supervisor). Each time
//! the supervisor starts a new `serve`, which takes the rings over from the in-flight log
//! without the guest noticing: afterwards every write the guest had acknowledged reads back as
//! written, no request failed or was lost, XenStore shows no change, the supervisor is still
//! there and holds no more fds, threads or memory than before, and closing the frontend ends
//! every grant it made (the pins of the killed backends, taken in the middle of grant copies
//! or by their mappings, were released as Xen releases them). Both grant modes.
//! The image is renamed once the first backend holds it: the backends that take over serve
//! the device the supervisor kept. A backend that keeps dying is given up on.
//!
//! `RESTART_KILLS=100 cargo test --release -p tests --test restart -- --nocapture` kills more
//! often (the default, 20, keeps CI short).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use backend::fault::Step;
use sim::front::FrontOptions;
use sim::front::{IoOp, SimFront};
use sim::toolstack::VbdSpec;
use sim::workload::{self, DiskModel, Rng};
use tests::{backend_node, blkbackd, children, mixed, signal, two_queue_front, Sim, Supervisor};
use xen::xenstore::XsOps;

const MIB: u64 = 64;
/// How much the supervisor's resident memory may grow over a run (its allocator may keep a
/// little of what it freed; a leak per backend started would exceed it).
const RSS_SLACK_KIB: u64 = 1024;

fn kills() -> usize {
    std::env::var("RESTART_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20)
}

/// What a process holds: open fds, threads, resident memory in KiB.
#[derive(Debug, Clone, Copy)]
struct Held {
    fds: usize,
    threads: usize,
    rss_kib: u64,
}

fn held(pid: u32) -> Held {
    let count =
        |dir: &str| std::fs::read_dir(format!("/proc/{pid}/{dir}")).map_or(0, |d| d.count());
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status");
    Held {
        fds: count("fd"),
        threads: count("task"),
        rss_kib,
    }
}

/// The supervisor's `serve` process other than `not`, once it has one (a child still between
/// fork and exec runs the supervisor's program and is not one yet).
fn serve_pid(sup: u32, not: Option<u32>) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let serve = children(sup).into_iter().find(|&p| {
            Some(p) != not
                && std::fs::read(format!("/proc/{p}/cmdline"))
                    .is_ok_and(|c| c.split(|&b| b == 0).nth(1) == Some(b"serve"))
        });
        if let Some(p) = serve {
            return p;
        }
        assert!(Instant::now() < deadline, "no new backend within 10 s");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The file `pid` runs, as (device, inode).
fn exe(pid: u32) -> (u64, u64) {
    let m = std::fs::metadata(format!("/proc/{pid}/exe")).expect("the process's program");
    (m.dev(), m.ino())
}

fn file_id(path: &Path) -> (u64, u64) {
    let m = std::fs::metadata(path).expect("a program file");
    (m.dev(), m.ino())
}

/// Sets its flag when dropped: the load stops when the thread driving it ends, even by a
/// failed assertion.
struct Done(Arc<AtomicBool>);

impl Drop for Done {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// A supervisor (running `program`) serving one disk to a connected 2-queue guest.
struct Served {
    sim: Sim,
    spec: VbdSpec,
    sup: Supervisor,
    front: SimFront,
    sectors: u64,
    /// What the supervisor held once settled.
    before: Held,
}

impl Served {
    /// `log`: where the supervisor's (and its backends') standard error goes; `fault`:
    /// [`backend::fault::ENV`] for the supervisor, which its first backend inherits.
    fn start(
        tag: &str,
        program: &Path,
        extra: &[&str],
        log: Option<&Path>,
        fault: Option<&str>,
    ) -> Self {
        let (sim, spec) = Sim::with_disk(tag, MIB);
        let stderr = log.map_or_else(Stdio::inherit, |p| {
            Stdio::from(std::fs::File::create(p).expect("the supervisor's log"))
        });
        let mut cmd = Command::new(program);
        if let Some(fault) = fault {
            cmd.env(backend::fault::ENV, fault);
        }
        let sup = Supervisor(
            cmd.args(["supervise", "--open-params", "--max-queues", "2"])
                .args(extra)
                .arg("--platform")
                .arg(sim.platform_arg())
                .stdin(Stdio::null())
                .stderr(stderr)
                .spawn()
                .expect("starting the supervisor"),
        );
        sim.wait_for(&format!("{}/state", spec.backend_path()), "2");
        let front = two_queue_front(&sim);
        let sectors = front.info().expect("connected").sectors;
        // The supervisor takes the device the backend sends within a tick (200 ms).
        std::thread::sleep(Duration::from_millis(500));
        let before = held(sup.0.id());
        // Only the fd the first backend opened (kept by the supervisor) leads to the disk now.
        std::fs::rename(&spec.params, format!("{}.moved", spec.params))
            .expect("renaming the image");
        Self {
            sim,
            spec,
            sup,
            front,
            sectors,
            before,
        }
    }

    fn pid(&self) -> u32 {
        self.sup.0.id()
    }

    /// Runs the verified load until `done`, then reads the whole disk back. Returns the
    /// requests of the load and the reads verified after it.
    fn load_until(&mut self, done: &AtomicBool) -> (u64, u64) {
        let mut model = DiskModel::zeroed(self.sectors / 8, true);
        let mut rng = Rng::new(15);
        let mut requests = 0;
        while !done.load(Ordering::Acquire) {
            let plan = mixed(&mut rng, model.blocks(), 512);
            let r = workload::run(&mut self.front, &mut model, &plan, 32)
                .expect("the guest saw an error or a lost request");
            requests += r.requests;
        }
        // Every acknowledged write reads back as written, through the last backend.
        let all = workload::sequential(model.blocks(), 16, false);
        let r =
            workload::run(&mut self.front, &mut model, &all, 32).expect("reading everything back");
        (requests, r.verified_reads)
    }

    /// The supervisor is still there and holds what it held before; the disk is connected
    /// with no error; closing ends every grant the guest made (none is left pinned by a
    /// backend that died or handed over).
    fn check_after(mut self) {
        std::thread::sleep(Duration::from_millis(500));
        assert!(
            self.sup.0.try_wait().expect("the supervisor").is_none(),
            "the supervisor died"
        );
        let after = held(self.pid());
        eprintln!("supervisor before {:?}, after {after:?}", self.before);
        assert_eq!(after.fds, self.before.fds, "the supervisor leaked fds");
        assert_eq!(
            after.threads, self.before.threads,
            "the supervisor leaked threads"
        );
        assert!(
            after.rss_kib <= self.before.rss_kib + RSS_SLACK_KIB,
            "the supervisor's memory grew from {} to {} KiB",
            self.before.rss_kib,
            after.rss_kib
        );
        assert_eq!(children(self.pid()).len(), 1, "one backend");
        assert_eq!(
            backend_node(&self.sim, &self.spec, "state").as_deref(),
            Some("4"),
            "still connected"
        );
        assert_eq!(
            self.sim.error_node(&self.spec),
            None,
            "no error in XenStore"
        );
        let lost = self.front.close().expect("closing without a leaked grant");
        assert!(lost.is_empty(), "requests lost at close: {}", lost.len());
    }
}

fn survive_kills(tag: &str, extra: &[&str]) {
    let mut served = Served::start(tag, blkbackd(), extra, None, None);
    let sup_pid = served.pid();
    let first = serve_pid(sup_pid, None);
    let done = Arc::new(AtomicBool::new(false));
    let n = kills();
    let killer = {
        let done = Done(Arc::clone(&done));
        std::thread::spawn(move || {
            let _done = done;
            let mut rng = Rng::new(0x5eed_0015);
            let mut pid = first;
            for _ in 0..n {
                std::thread::sleep(Duration::from_millis(30 + rng.next_u64() % 170));
                signal(pid, rustix::process::Signal::KILL);
                pid = serve_pid(sup_pid, Some(pid));
            }
        })
    };
    let start = Instant::now();
    let (requests, verified) = served.load_until(&done);
    killer.join().expect("the killer thread");
    eprintln!(
        "{tag}: {n} kills survived in {:.1} s: {requests} requests, then {verified} verified reads of the whole disk",
        start.elapsed().as_secs_f64(),
    );
    served.check_after();
}

#[test]
fn serve_killed_at_random_moments_under_load_copy_mode() {
    survive_kills("restart-copy", &[]);
}

#[test]
fn serve_killed_at_random_moments_under_load_map_mode() {
    survive_kills("restart-map", &["--grant-mode", "map"]);
}

/// Upgrades in a row.
const UPGRADES: usize = 20;

/// Every node under `path` with its value, in order.
fn tree(sim: &Sim, path: &str, out: &mut Vec<(String, Option<String>)>) {
    out.push((path.to_owned(), sim.read(path)));
    let mut names = sim.dom0.directory(path).unwrap_or_default();
    names.sort();
    for name in names {
        tree(sim, &format!("{path}/{name}"), out);
    }
}

/// Installs `file` at `path` as a package manager does: a new name renamed over the old.
fn install(file: &Path, path: &Path) {
    let new = path.with_extension("new");
    let _ = std::fs::remove_file(&new);
    std::fs::hard_link(file, &new).expect("linking the new program");
    std::fs::rename(&new, path).expect("installing the new program");
}

/// `blkbackd upgrade` (SIGHUP to the supervisor) [`UPGRADES`] times in a row under the
/// verified load, the program at the supervisor's path swapped between two copies each time:
/// every disk goes to a backend of the file now there (its inode, not the supervisor's own).
/// Then two upgrades that fail: a file that cannot be executed, and a program that exits
/// before it resumes; each time the disk goes to a backend of the supervisor's own image, with
/// the error in its log. The guest sees no error throughout, and nothing in XenStore changes.
fn survive_upgrades(tag: &str, extra: &[&str]) {
    let scratch = tests::TempDir::new(&format!("{tag}-bin"));
    let bin = scratch.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let path = bin.join("blkbackd");
    let copies: Vec<PathBuf> = ["a", "b"]
        .iter()
        .map(|n| {
            let p = scratch.path().join(n);
            std::fs::copy(blkbackd(), &p).expect("copying blkbackd");
            p
        })
        .collect();
    std::fs::copy(blkbackd(), &path).expect("copying blkbackd");
    let own = file_id(&path);
    let log = scratch.path().join("supervisor.log");
    let mut served = Served::start(tag, &path, extra, Some(&log), None);
    let sup_pid = served.pid();
    let nodes = |s: &Served| {
        let mut all = Vec::new();
        tree(&s.sim, &s.spec.backend_path(), &mut all);
        tree(&s.sim, &s.spec.frontend_path(), &mut all);
        all
    };
    let nodes_before = nodes(&served);
    let connected = (
        format!("{}/state", served.spec.backend_path()),
        Some("4".to_owned()),
    );
    assert!(nodes_before.contains(&connected), "{nodes_before:?}");
    let first = serve_pid(sup_pid, None);
    let done = Arc::new(AtomicBool::new(false));
    let upgrader = {
        let done = Done(Arc::clone(&done));
        let path = path.clone();
        let broken = scratch.path().join("broken");
        let exits = scratch.path().join("exits");
        std::thread::spawn(move || {
            let _done = done;
            let mut rng = Rng::new(0x0b9_0015);
            let mut pid = first;
            let mut upgrade = |file: &Path| {
                std::thread::sleep(Duration::from_millis(30 + rng.next_u64() % 170));
                install(file, &path);
                signal(sup_pid, rustix::process::Signal::HUP);
                pid = serve_pid(sup_pid, Some(pid));
                exe(pid)
            };
            let start = Instant::now();
            for i in 0..UPGRADES {
                let file = &copies[i % 2];
                assert_eq!(
                    upgrade(file),
                    file_id(file),
                    "upgrade {i} ran another program"
                );
            }
            let took = start.elapsed();
            std::fs::write(&broken, "not a program").unwrap();
            assert_eq!(
                upgrade(&broken),
                own,
                "no fallback for a file that cannot run"
            );
            std::fs::write(&exits, "#!/bin/sh\nexit 3\n").unwrap();
            std::fs::set_permissions(&exits, std::os::unix::fs::PermissionsExt::from_mode(0o755))
                .unwrap();
            assert_eq!(upgrade(&exits), own, "no fallback for a program that exits");
            took
        })
    };
    let start = Instant::now();
    let (requests, verified) = served.load_until(&done);
    let took = upgrader.join().expect("the upgrader thread");
    eprintln!(
        "{tag}: {UPGRADES} upgrades in {:.1} s, 2 failed ones fell back, {:.1} s in all: {requests} requests, then {verified} verified reads of the whole disk",
        took.as_secs_f64(),
        start.elapsed().as_secs_f64(),
    );
    assert_eq!(nodes(&served), nodes_before, "XenStore changed");
    let text = std::fs::read_to_string(&log).unwrap();
    for want in [
        "cannot start the upgraded blkbackd",
        "exited with status 3 before it resumed; falling back to /proc/self/exe",
    ] {
        assert!(
            text.contains(want),
            "no {want:?} in the supervisor's log:\n{text}"
        );
    }
    // No backend was killed: each handed its disk over and exited.
    assert!(!text.contains("killed by signal"), "{text}");
    served.check_after();
}

#[test]
fn upgraded_under_load_copy_mode() {
    survive_upgrades("upgrade-copy", &[]);
}

#[test]
fn upgraded_under_load_map_mode() {
    survive_upgrades("upgrade-map", &["--grant-mode", "map"]);
}

/// The first backend aborts at a fault point ([`backend::fault`]), once at each step of a
/// request's life, under the verified load: the one that takes over resumes from the log, and
/// every acknowledged write reads back.
fn die_at_every_step(mode: &str, extra: &[&str]) {
    for step in Step::ALL {
        let tag = format!("fault-{mode}-{}", step.name());
        let scratch = tests::TempDir::new(&tag);
        let log = scratch.path().join("supervisor.log");
        // Late enough to fall in the load, whatever the step's rate.
        let fault = format!("{}:200", step.name());
        let mut served = Served::start(&tag, blkbackd(), extra, Some(&log), Some(&fault));
        let sup_pid = served.pid();
        let first = serve_pid(sup_pid, None);
        let done = Arc::new(AtomicBool::new(false));
        let watcher = {
            let done = Done(Arc::clone(&done));
            std::thread::spawn(move || {
                let _done = done;
                serve_pid(sup_pid, Some(first));
                // Some load on the backend that took over.
                std::thread::sleep(Duration::from_millis(300));
            })
        };
        let start = Instant::now();
        let (requests, verified) = served.load_until(&done);
        watcher.join().expect("the watcher thread");
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(
            text.contains("was killed by signal 6"),
            "{fault}: the backend did not abort:\n{text}"
        );
        eprintln!(
            "{mode} {fault}: survived in {:.1} s: {requests} requests, then {verified} verified reads",
            start.elapsed().as_secs_f64()
        );
        served.check_after();
    }
}

#[test]
fn serve_dies_at_every_step_of_a_request_copy_mode() {
    die_at_every_step("copy", &[]);
}

#[test]
fn serve_dies_at_every_step_of_a_request_map_mode() {
    die_at_every_step("map", &["--grant-mode", "map"]);
}

/// A disk whose frontend has not connected when the upgrade comes keeps its backend until it
/// connects (there is nothing to resume before), then is handed over.
#[test]
fn a_disk_is_upgraded_once_it_connects() {
    let (sim, spec) = Sim::with_disk("upgrade-later", 8);
    let sup = Supervisor::start(&sim);
    sim.wait_for(&format!("{}/state", spec.backend_path()), "2");
    let first = serve_pid(sup.0.id(), None);
    signal(sup.0.id(), rustix::process::Signal::HUP);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        children(sup.0.id()),
        [first],
        "handed over before it connected"
    );
    let mut front = sim.front(FrontOptions {
        queues: 2,
        ..FrontOptions::default()
    });
    let info = front.connect().expect("handshake");
    serve_pid(sup.0.id(), Some(first));
    let mut model = DiskModel::zeroed(info.sectors / 8, true);
    tests::exercise(&mut front, &mut model);
    assert_eq!(backend_node(&sim, &spec, "state").as_deref(), Some("4"));
    assert_eq!(sim.error_node(&spec), None);
}

/// A `serve` run without `supervise` has no log to hand over from: asked to (SIGUSR1, which
/// would kill a process that did not handle it), it carries on serving.
#[test]
fn a_serve_without_a_log_is_not_handed_over() {
    let sim = Sim::new("hand-over-no-log");
    let (_spec, mut backend, mut front) = tests::connected(&sim, 8, &[], FrontOptions::default());
    signal(backend.pid(), rustix::process::Signal::USR1);
    std::thread::sleep(Duration::from_millis(300));
    assert!(backend.running(), "serve ended on SIGUSR1");
    let mut model = DiskModel::zeroed(front.info().expect("connected").sectors / 8, true);
    tests::exercise(&mut front, &mut model);
}

/// A backend that dies after connecting, then replacements that die before they resume
/// (`exit 3` instead of `serve`): the supervisor gives up after its bound, with the error in
/// XenStore and the device Closed, as for a backend it does not restart.
#[test]
fn a_crash_loop_is_given_up_on() {
    use backend::supervise::{supervise, SuperviseConfig, MAX_FAILED_RESTARTS};
    let (sim, spec) = Sim::with_disk("crash-loop", 8);
    let mark = sim.tmp().join("started-once");
    let script = sim.tmp().join("serve-once.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nif [ -e '{m}' ]; then exit 3; fi\n: > '{m}'\nexec '{b}' \"$@\"\n",
            m = mark.display(),
            b = blkbackd().display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let config = SuperviseConfig {
        program: script,
        serve_args: vec![
            "serve".into(),
            "--platform".into(),
            sim.platform_arg(),
            "--max-queues".into(),
            "2".into(),
        ],
        max_queues: 2,
        max_ring_page_order: 4,
        open_params: true,
        xenstore_path: sim::xenstore_socket(sim.dir(), 0),
        domid: 0,
        handoff_dir: None,
        record_dir: None,
        fallback: None,
    };
    let stop = Arc::new(AtomicBool::new(false));
    let runner = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || supervise(&config, &stop, &AtomicBool::new(false)))
    };
    sim.wait_for(&format!("{}/state", spec.backend_path()), "2");
    let mut front = sim.front(FrontOptions {
        queues: 2,
        ..FrontOptions::default()
    });
    front.connect().expect("handshake");
    let data = vec![0x5au8; 4096];
    let c = front
        .execute(
            1,
            IoOp::Write {
                sector: 8,
                data: &data,
            },
        )
        .expect("a write");
    assert!(c.is_ok());
    let serve = children(std::process::id())
        .into_iter()
        .find(|p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains("serve"))
        })
        .expect("the backend");
    assert!(Path::new(&mark).exists());
    signal(serve, rustix::process::Signal::KILL);
    sim.wait_for(&format!("{}/state", spec.backend_path()), "6");
    assert_eq!(
        sim.error_node(&spec).as_deref(),
        Some(
            format!(
                "5 blkbackd exited with status 3; given up after {MAX_FAILED_RESTARTS} restarts in a row"
            )
            .as_str()
        )
    );
    stop.store(true, Ordering::Relaxed);
    runner.join().unwrap().unwrap();
}
