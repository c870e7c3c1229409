//! The device's life through the real blkbackd: a frontend that reconnects with requests in
//! flight, Closing with requests in flight (nothing leaks), the toolstack's removal, the
//! backend directory vanishing, and SIGTERM.

use std::time::Duration;

use sim::front::{FrontOptions, IoOp};
use sim::toolstack;
use sim::workload::{self, DiskModel};
use tests::{backend_node, connected, exercise, remove, Sim};
use xen::xenbus::XenbusState;
use xen::xenstore::XsOps;

fn count(dir: &str) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

/// The entries of `dir`, ignoring transient ones (the statistics file is briefly open while
/// it is rewritten): the least of several samples.
fn settled(dir: &str) -> usize {
    (0..10)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(10));
            count(dir)
        })
        .min()
        .unwrap_or(0)
}

/// Fills both queues with writes and reads that are not waited for.
fn fill_queues(front: &mut sim::front::SimFront, n: usize) -> usize {
    let data = vec![0x11u8; 65536];
    let mut submitted = 0;
    for i in 0..n {
        let q = i % 2;
        let op = if i % 3 == 0 {
            IoOp::Read {
                sector: (i as u64) * 128,
                sectors: 128,
            }
        } else {
            IoOp::Write {
                sector: (i as u64) * 128,
                data: &data,
            }
        };
        if front.submit(q, op).is_ok() {
            submitted += 1;
        }
    }
    submitted
}

#[test]
fn frontend_reconnects_with_requests_in_flight() {
    let sim = Sim::new("reconnect");
    let (spec, mut backend, mut front) = connected(&sim, 32, &[], FrontOptions::default());
    let mut model = DiskModel::zeroed(front.info().unwrap().sectors / 8, true);
    // Blocks 2048.. are written and checked across the reboot; fill_queues stays below 1024.
    let before: Vec<workload::Planned> = (2048..2304)
        .step_by(16)
        .map(|block| workload::Planned::Write { block, count: 16 })
        .collect();
    workload::run(&mut front, &mut model, &before, 8).unwrap();
    // The guest reboots (kexec) with requests in flight: Closing, Closed, Initialising.
    let submitted = fill_queues(&mut front, 64);
    assert!(submitted > 0);
    let done = front
        .close()
        .expect("close with requests in flight: nothing may leak");
    // Every request was answered or the ring was torn down; none answered twice.
    let answered = done.iter().filter(|c| c.status.is_some()).count();
    assert!(answered <= submitted);
    assert!(
        done.iter()
            .filter(|c| c.status.is_some())
            .all(|c| c.is_ok()),
        "{done:?}"
    );
    assert_eq!(backend_node(&sim, &spec, "state").as_deref(), Some("6"));
    assert!(
        backend.running(),
        "online = 1: the backend stays for a reconnect"
    );
    let info = front.reconnect().expect("reconnect");
    assert_eq!(info.queues, 2);
    // What was written before the reboot is still there.
    let after: Vec<workload::Planned> = (2048..2304)
        .step_by(16)
        .map(|block| workload::Planned::Read { block, count: 16 })
        .collect();
    workload::run(&mut front, &mut model, &after, 8).unwrap();
    let mut model = DiskModel::zeroed(info.sectors / 8, true);
    exercise(&mut front, &mut model);
    remove(&sim, &spec, &mut backend, &mut front);
}

#[test]
fn closing_with_requests_in_flight_leaks_nothing() {
    let sim = Sim::new("closing");
    let (spec, mut backend, mut front) =
        connected(&sim, 32, &["--grant-mode", "map"], FrontOptions::default());
    let pid = backend.pid();
    let fds = format!("/proc/{pid}/fd");
    let tasks = format!("/proc/{pid}/task");
    let (fds_connected, tasks_connected) = (settled(&fds), settled(&tasks));
    let mut model = DiskModel::zeroed(front.info().unwrap().sectors / 8, true);
    exercise(&mut front, &mut model);
    for round in 0..3 {
        let submitted = fill_queues(&mut front, 96);
        assert!(submitted > 0);
        // close() ends every grant and fails if the backend still maps any.
        let done = front
            .close()
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert!(done
            .iter()
            .filter(|c| c.status.is_some())
            .all(|c| c.is_ok()));
        // Disconnected: the queue threads are gone and their fds closed.
        assert!(
            settled(&tasks) < tasks_connected,
            "queue threads still running"
        );
        assert!(settled(&fds) < fds_connected, "queue fds still open");
        front.reconnect().unwrap();
        assert_eq!(
            settled(&tasks),
            tasks_connected,
            "round {round}: threads leaked"
        );
        assert_eq!(settled(&fds), fds_connected, "round {round}: fds leaked");
    }
    remove(&sim, &spec, &mut backend, &mut front);
}

#[test]
fn toolstack_removal_ends_the_backend() {
    let sim = Sim::new("removal");
    let (spec, mut backend, mut front) = connected(&sim, 8, &[], FrontOptions::default());
    toolstack::request_removal(&sim.dom0, &spec).unwrap();
    // The frontend sees the toolstack's Closing and closes; the backend follows and ends.
    front.close().unwrap();
    assert!(backend.wait_exit(Duration::from_secs(10)).success());
    assert_eq!(backend_node(&sim, &spec, "state").as_deref(), Some("6"));
}

#[test]
fn removed_backend_directory_ends_the_backend() {
    let sim = Sim::new("rmdir");
    let (spec, mut backend, _front) = connected(&sim, 8, &[], FrontOptions::default());
    toolstack::destroy_vbd(&sim.dom0, &spec).unwrap();
    assert!(backend.wait_exit(Duration::from_secs(10)).success());
    // The late state write did not recreate the directory.
    assert_eq!(sim.read(&format!("{}/state", spec.backend_path())), None);
}

#[test]
fn sigterm_closes_a_connected_device() {
    let sim = Sim::new("sigterm");
    let (spec, mut backend, mut front) = connected(&sim, 8, &[], FrontOptions::default());
    fill_queues(&mut front, 16);
    backend.terminate();
    assert!(backend.wait_exit(Duration::from_secs(10)).success());
    assert_eq!(backend_node(&sim, &spec, "state").as_deref(), Some("6"));
    // The guest sees Closed, and after its own close every grant can be ended.
    front.wait_backend_state(&[XenbusState::Closed]).unwrap();
    front
        .close()
        .expect("no grant left mapped by the dead backend");
}

#[test]
fn bogus_req_prod_halts_that_ring_only() {
    let sim = Sim::new("bogus");
    let (spec, mut backend, mut front) = connected(&sim, 8, &[], FrontOptions::default());
    assert_eq!(front.info().unwrap().queues, 2);
    let mut model = DiskModel::zeroed(front.info().unwrap().sectors / 8, true);
    exercise(&mut front, &mut model);
    // Queue 0's frontend claims 100000 requests it never wrote.
    front.corrupt_req_prod(0, 100_000).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    // The device stays connected and queue 1 keeps serving.
    assert!(backend.running());
    assert_eq!(backend_node(&sim, &spec, "state").as_deref(), Some("4"));
    let c = front.read(1, 0, 8).unwrap();
    assert!(c.is_ok());
    // The halted ring was unmapped: closing ends every grant.
    remove(&sim, &spec, &mut backend, &mut front);
}

#[test]
fn a_vanished_frontend_ends_the_backend() {
    let sim = Sim::new("fegone");
    let (spec, mut backend, _front) = connected(&sim, 8, &[], FrontOptions::default());
    // The guest is destroyed: its frontend directory goes (state reads as Unknown).
    sim.dom0.rm(&spec.frontend_path()).unwrap();
    assert!(backend.wait_exit(Duration::from_secs(10)).success());
}
