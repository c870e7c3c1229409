//! The fd handoff between the real binaries, as a toolstack runs them: `blkbackd supervise
//! --handoff-dir` starts a backend for the new disk, which names its socket in
//! `handoff-socket`; `blkhotplug add` (what xl runs as the disk's script) creates the loop
//! device and hands its fd over; the guest's data check passes through it; when the guest
//! and the backend are gone, `blkhotplug remove` leaves no loop device behind.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use sim::front::FrontOptions;
use sim::toolstack::{self, VbdSpec};
use sim::workload::DiskModel;
use tests::{
    backend_node, blkbackd, blkhotplug, exercise, root_or_skip, Sim, Supervisor, DEVID, GUEST,
};
use xen::handoff::PhysicalDevice;

fn hotplug(sim: &Sim, action: &str, backend: &str) -> Output {
    Command::new(blkhotplug())
        .arg(action)
        .env("XENBUS_PATH", backend)
        .env("XENSTORED_PATH", sim::xenstore_socket(sim.dir(), 0))
        .stdin(Stdio::null())
        .output()
        .expect("running blkhotplug")
}

fn backing_file(pd: &PhysicalDevice) -> Option<PathBuf> {
    let sys = format!("/sys/dev/block/{}:{}/loop/backing_file", pd.major, pd.minor);
    std::fs::read_to_string(sys)
        .ok()
        .map(|s| PathBuf::from(s.trim()))
}

/// Whether a process holds an fd open on block device `pd`.
fn holds(pid: u32, pd: &PhysicalDevice) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|e| {
        rustix::fs::stat(e.path()).is_ok_and(|st| {
            rustix::fs::major(st.st_rdev) == pd.major && rustix::fs::minor(st.st_rdev) == pd.minor
        })
    })
}

/// The serve processes the supervisor started.
fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn blkhotplug_hands_its_loop_device_to_a_supervised_blkbackd() {
    if !root_or_skip("loop devices") {
        return;
    }
    let sim = Sim::new("handoff-bins");
    let sockets = sim.tmp().join("handoff");
    let mut sup = Supervisor(
        Command::new(blkbackd())
            .args(["supervise", "--platform"])
            .arg(sim.platform_arg())
            .arg("--handoff-dir")
            .arg(&sockets)
            .stdin(Stdio::null())
            .spawn()
            .expect("starting blkbackd supervise"),
    );
    let image = sim.image("disk.img", 8);
    let spec = VbdSpec::disk(0, GUEST, DEVID, image.to_str().expect("utf-8 path"));
    sim.create_vbd(&spec);
    let be = spec.backend_path();

    // The supervised backend names its socket, in the supervisor's directory.
    wait_until("handoff-socket", Duration::from_secs(10), || {
        backend_node(&sim, &spec, "handoff-socket").is_some()
    });
    let sock = backend_node(&sim, &spec, "handoff-socket").expect("handoff-socket");
    assert!(
        Path::new(&sock).starts_with(&sockets),
        "{sock} not under {}",
        sockets.display()
    );
    let serve = children(sup.0.id());
    assert_eq!(serve.len(), 1, "one serve process for the disk");

    let out = hotplug(&sim, "add", &be);
    assert!(
        out.status.success(),
        "blkhotplug add: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pd = PhysicalDevice::parse(
        backend_node(&sim, &spec, "physical-device")
            .expect("physical-device")
            .as_bytes(),
    )
    .expect("physical-device parses");
    assert!(pd.diskseq.is_some(), "the node carries the diskseq: {pd:?}");
    assert_eq!(backing_file(&pd).as_deref(), Some(image.as_path()));
    sim.wait_for(&format!("{be}/opened"), "1");
    // blkhotplug has exited: the backend's fd is what keeps the loop device.
    assert!(holds(serve[0], &pd), "the serve process holds the device");

    let mut front = sim.front(FrontOptions::default());
    let info = front.connect().expect("handshake");
    assert_eq!(info.sectors, 8 * 2048);
    let mut model = DiskModel::zeroed(info.sectors / 8, true);
    exercise(&mut front, &mut model);

    // Detach as libxl does: removal asked, the frontend closes, the backend exits, then the
    // script's `remove`.
    toolstack::request_removal(&sim.dom0, &spec).expect("removal request");
    let lost = front.close().expect("closing the frontend");
    assert!(lost.is_empty(), "requests never answered: {lost:?}");
    wait_until("the serve process to exit", Duration::from_secs(10), || {
        children(sup.0.id()).is_empty()
    });
    let out = hotplug(&sim, "remove", &be);
    assert!(
        out.status.success(),
        "blkhotplug remove: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_until("the loop device to go", Duration::from_secs(10), || {
        backing_file(&pd).as_deref() != Some(image.as_path())
    });
    assert!(!Path::new(&sock).exists(), "the socket is removed at exit");

    let pid = rustix::process::Pid::from_raw(sup.0.id() as i32).expect("pid");
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("SIGTERM");
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = sup.0.try_wait().expect("wait") {
            break s;
        }
        assert!(Instant::now() < deadline, "supervisor did not stop");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "supervisor: {status}");
}
