//! A backend that survives its own death (issue 15): under `blkbackd supervise`, a guest runs
//! a verified random read/write workload at depth 32 on 2 queues while its `serve` process
//! is killed (SIGKILL) at random moments. Each time the supervisor starts a new `serve`, which
//! takes the rings over from the in-flight log without the guest noticing: afterwards every
//! write the guest had acknowledged reads back as written, no request failed or was lost,
//! XenStore shows no change, the supervisor is still there and holds no more fds than before,
//! and closing the frontend ends every grant it made (the pins of the killed backends, taken
//! in the middle of grant copies or by their mappings, were released as Xen releases them).
//! Both grant modes.
//! The image is renamed once the first backend holds it: the backends that take over serve
//! the device the supervisor kept. A backend that keeps dying is given up on.
//!
//! `RESTART_KILLS=100 cargo test --release -p tests --test restart -- --nocapture` kills more
//! often (the default, 20, keeps CI short).

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sim::front::FrontOptions;
use sim::front::IoOp;
use sim::workload::{self, DiskModel, Planned, Rng};
use tests::{backend_node, blkbackd, children, signal, Sim, Supervisor};

const MIB: u64 = 64;

fn kills() -> usize {
    std::env::var("RESTART_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20)
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// The one backend process of the supervisor, once there is one other than `not`.
fn backend_pid(sup: u32, not: Option<u32>) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(&p) = children(sup).iter().find(|&&p| Some(p) != not) {
            return p;
        }
        assert!(Instant::now() < deadline, "no new backend within 10 s");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Reads and writes at distinct random blocks, half each, in random order.
fn mixed(rng: &mut Rng, blocks: u64, n: usize) -> Vec<Planned> {
    rng.permutation(blocks)
        .into_iter()
        .take(n)
        .map(|block| {
            if rng.next_u64() % 2 == 0 {
                Planned::Write { block, count: 1 }
            } else {
                Planned::Read { block, count: 1 }
            }
        })
        .collect()
}

fn survive_kills(tag: &str, extra: &[&str], options: FrontOptions) {
    let (sim, spec) = Sim::with_disk(tag, MIB);
    let sup = Supervisor(
        Command::new(blkbackd())
            .args(["supervise", "--open-params", "--max-queues", "2"])
            .args(extra)
            .arg("--platform")
            .arg(sim.platform_arg())
            .stdin(Stdio::null())
            .spawn()
            .expect("starting the supervisor"),
    );
    let sup_pid = sup.0.id();
    sim.wait_for(&format!("{}/state", spec.backend_path()), "2");
    let mut front = sim.front(options);
    let info = front.connect().expect("handshake");
    assert_eq!(info.queues, 2);
    // The supervisor takes the device the backend sends within a tick (200 ms).
    std::thread::sleep(Duration::from_millis(500));
    let fds_before = fds(sup_pid);
    let first = backend_pid(sup_pid, None);
    // Only the fd the first backend opened (kept by the supervisor) leads to the disk now.
    std::fs::rename(&spec.params, format!("{}.moved", spec.params)).expect("renaming the image");

    let done = Arc::new(AtomicBool::new(false));
    let n = kills();
    let killer = {
        let done = Arc::clone(&done);
        std::thread::spawn(move || {
            let mut rng = Rng::new(0x5eed_0015);
            let mut pid = first;
            for _ in 0..n {
                std::thread::sleep(Duration::from_millis(30 + rng.next_u64() % 170));
                signal(pid, rustix::process::Signal::KILL);
                pid = backend_pid(sup_pid, Some(pid));
            }
            done.store(true, Ordering::Release);
        })
    };

    let start = Instant::now();
    let mut model = DiskModel::zeroed(info.sectors / 8, true);
    let mut rng = Rng::new(15);
    let mut requests = 0;
    while !done.load(Ordering::Acquire) {
        let plan = mixed(&mut rng, model.blocks(), 512);
        let r = workload::run(&mut front, &mut model, &plan, 32)
            .expect("the guest saw an error or a lost request");
        requests += r.requests;
    }
    killer.join().expect("the killer thread");
    // Every acknowledged write reads back as written, through the last backend.
    let all = workload::sequential(model.blocks(), 16, false);
    let r = workload::run(&mut front, &mut model, &all, 32).expect("reading everything back");
    eprintln!(
        "{tag}: {n} kills survived in {:.1} s: {requests} requests, then {} verified reads of the whole disk",
        start.elapsed().as_secs_f64(),
        r.verified_reads
    );

    let mut sup = sup;
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        sup.0.try_wait().expect("the supervisor").is_none(),
        "the supervisor died"
    );
    assert_eq!(fds(sup_pid), fds_before, "the supervisor leaked fds");
    assert_eq!(children(sup_pid).len(), 1, "one backend");
    assert_eq!(
        backend_node(&sim, &spec, "state").as_deref(),
        Some("4"),
        "still connected"
    );
    assert_eq!(sim.error_node(&spec), None, "no error in XenStore");
    // Closing ends every grant the guest made: none is left pinned by a dead backend.
    let lost = front.close().expect("closing without a leaked grant");
    assert!(lost.is_empty(), "requests lost at close: {}", lost.len());
}

#[test]
fn serve_killed_at_random_moments_under_load_copy_mode() {
    survive_kills(
        "restart-copy",
        &[],
        FrontOptions {
            queues: 2,
            persistent: true,
            ..FrontOptions::default()
        },
    );
}

#[test]
fn serve_killed_at_random_moments_under_load_map_mode() {
    survive_kills(
        "restart-map",
        &["--grant-mode", "map"],
        FrontOptions {
            queues: 2,
            persistent: true,
            ..FrontOptions::default()
        },
    );
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
    };
    let stop = Arc::new(AtomicBool::new(false));
    let runner = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || supervise(&config, &stop))
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
