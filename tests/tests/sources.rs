//! The ways blkbackd gets its disk: an inherited fd, and an fd handed over by blkhotplug on
//! the handoff socket (`xen::handoff`), checked against the diskseq it is described with.

use std::os::fd::{AsRawFd, OwnedFd};

use sim::toolstack::VbdSpec;
use tests::{
    exercise_opened_disk, hand_over, hotplug_hands_over, loop_disk, refused_error, Backend, Loop,
    Sim, DEVID, GUEST,
};
use xen::handoff::Reply;

#[test]
fn inherited_fd_is_served() {
    let sim = Sim::new("devfd");
    let image = sim.image("disk.img", 8);
    // Not close-on-exec: the child inherits it.
    let fd: OwnedFd =
        rustix::fs::open(&image, rustix::fs::OFlags::RDWR, rustix::fs::Mode::empty()).unwrap();
    let spec = VbdSpec::disk(0, GUEST, DEVID, "/unused");
    sim.create_vbd(&spec);
    let n = fd.as_raw_fd().to_string();
    let mut backend = Backend::serve(&sim, &spec, &["--device-fd", &n]);
    drop(fd);
    let info = exercise_opened_disk(&sim, &spec, &mut backend, true);
    assert_eq!(info.sectors, 8 * 2048);
}

fn handoff_setup(tag: &str) -> Option<(Sim, Loop, VbdSpec, Backend, std::path::PathBuf)> {
    let (sim, lo) = loop_disk(tag, 8)?;
    let spec = VbdSpec::disk(0, GUEST, DEVID, lo.device.to_str().unwrap());
    sim.create_vbd(&spec);
    let sock = sim.tmp().join("handoff.sock");
    let backend = Backend::serve(&sim, &spec, &["--handoff-socket", sock.to_str().unwrap()]);
    sim.wait_for(
        &format!("{}/handoff-socket", spec.backend_path()),
        sock.to_str().unwrap(),
    );
    sim.wait_for(&format!("{}/state", spec.backend_path()), "2");
    Some((sim, lo, spec, backend, sock))
}

#[test]
fn handed_over_fd_is_served() {
    let Some((sim, lo, spec, mut backend, sock)) = handoff_setup("handoff") else {
        return;
    };
    assert_eq!(hotplug_hands_over(&sim, &spec, &lo, &sock), Reply::Accepted);
    exercise_opened_disk(&sim, &spec, &mut backend, false);
    assert!(!sock.exists(), "the socket is removed at exit");
}

#[test]
fn handed_over_fd_with_the_wrong_diskseq_is_refused() {
    let Some((sim, lo, spec, _backend, sock)) = handoff_setup("handoff-bad") else {
        return;
    };
    let seq = lo.diskseq();
    let reply = hand_over(&lo, &sock, seq + 1);
    assert_eq!(reply, Reply::Rejected(rustix::io::Errno::NODEV));
    assert!(refused_error(&sim, &spec).starts_with("19 creating vbd structure"));
}
