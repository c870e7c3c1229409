//! `blkbackd supervise`: one backend process per disk, started as disks appear, cleaned up
//! after when they die, all stopped on SIGTERM.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sim::front::{FrontOptions, SimFront};
use sim::toolstack::VbdSpec;
use sim::workload::DiskModel;
use tests::{blkbackd, children, exercise, signal, Sim, Supervisor, GUEST};

#[test]
fn one_backend_per_disk_cleaned_up_after() {
    let sim = Sim::new("supervise");
    sim.introduce(2);
    let sup = Supervisor::start(&sim);
    let img1 = sim.image("one.img", 8);
    let img2 = sim.image("two.img", 8);
    let one = VbdSpec::disk(0, GUEST, 51712, img1.to_str().unwrap());
    let two = VbdSpec::disk(0, 2, 51728, img2.to_str().unwrap());
    sim.create_vbd(&one);
    sim.create_vbd(&two);
    sim.wait_for(&format!("{}/state", one.backend_path()), "2");
    sim.wait_for(&format!("{}/state", two.backend_path()), "2");
    let deadline = Instant::now() + Duration::from_secs(5);
    while children(sup.0.id()).len() < 2 {
        assert!(Instant::now() < deadline, "two backend processes expected");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut front = SimFront::new(sim.dir(), GUEST, 51712, FrontOptions::default()).unwrap();
    let info = front.connect().unwrap();
    let mut model = DiskModel::zeroed(info.sectors / 8, true);
    exercise(&mut front, &mut model);

    // Kill the second disk's backend: the supervisor reports it and does not restart it.
    let before = children(sup.0.id());
    let two_pid = before
        .iter()
        .copied()
        .find(|&p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&two.backend_path()))
        })
        .expect("the second disk's backend");
    signal(two_pid, rustix::process::Signal::KILL);
    sim.wait_for(&format!("{}/state", two.backend_path()), "6");
    assert_eq!(
        sim.error_node(&two).as_deref(),
        Some("5 blkbackd was killed by signal 9")
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(children(sup.0.id()).len(), 1, "nothing restarted silently");

    // SIGTERM: the remaining backend closes its disk and the supervisor exits.
    let mut sup = sup;
    signal(sup.0.id(), rustix::process::Signal::TERM);
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = sup.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "supervisor did not stop");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
    sim.wait_for(&format!("{}/state", one.backend_path()), "6");
    front
        .wait_backend_state(&[xen::xenbus::XenbusState::Closed])
        .unwrap();
    front.close().unwrap();
}

#[test]
fn a_backend_that_cannot_start_is_reported() {
    use backend::supervise::{supervise, SuperviseConfig};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let sim = Sim::new("nostart");
    let config = SuperviseConfig {
        program: sim.tmp().join("no-such-blkbackd"),
        serve_args: vec!["serve".into()],
        max_queues: 1,
        max_ring_page_order: 0,
        open_params: false,
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
    let img = sim.image("disk.img", 8);
    let spec = VbdSpec::disk(0, GUEST, 51712, img.to_str().unwrap());
    sim.create_vbd(&spec);
    sim.wait_for(&format!("{}/state", spec.backend_path()), "6");
    let err = sim.error_node(&spec).unwrap();
    assert!(err.starts_with("2 starting blkbackd: "), "{err}");
    stop.store(true, Ordering::Relaxed);
    runner.join().unwrap().unwrap();
}

/// `supervise --record DIR`: each backend records its own trace, which replays as recorded.
#[test]
fn each_supervised_backend_records_a_trace_that_replays() {
    let sim = Sim::new("supervise-record");
    let traces = sim.tmp().join("traces");
    let mut sup = Supervisor(
        Command::new(blkbackd())
            .args(["supervise", "--open-params", "--platform"])
            .arg(sim.platform_arg())
            .arg("--record")
            .arg(&traces)
            .env("BLKBACKD_RECORD_INITIAL", "zero")
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let img = sim.image("disk.img", 8);
    let spec = VbdSpec::disk(0, GUEST, 51712, img.to_str().unwrap());
    sim.create_vbd(&spec);
    let mut front = SimFront::new(sim.dir(), GUEST, 51712, FrontOptions::default()).unwrap();
    let info = front.connect().unwrap();
    let mut model = DiskModel::zeroed(info.sectors / 8, true);
    exercise(&mut front, &mut model);
    sim::toolstack::request_removal(&sim.dom0, &spec).unwrap();
    assert!(front.close().unwrap().is_empty());
    let deadline = Instant::now() + Duration::from_secs(10);
    while !children(sup.0.id()).is_empty() {
        assert!(Instant::now() < deadline, "the backend did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
    let trace = traces.join(format!("vbd-{GUEST}-51712.trace"));
    let out = Command::new(blkbackd())
        .arg("replay")
        .arg(&trace)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !said.contains("(0 reads compared"),
        "no read was compared: {said}"
    );
    let _ = sup.0.kill();
}
