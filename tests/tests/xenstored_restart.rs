//! xenstored restarting does not take the backends with it (issue 15): under `blkbackd
//! supervise`, a guest runs a verified random read/write workload at depth 32 on 2 queues
//! while the simulated xenstored is restarted several times (every connection ends, the
//! sockets are gone for a while, the tree stays: what a socket client sees of a restart).
//! Every XenStore client reconnects and registers its watches again: afterwards the guest saw
//! no error and every acknowledged write reads back, the backend wrote no error node and is
//! still connected, the supervisor (through its watch) serves a disk added afterwards, and
//! the backend (through its watch on the frontend) follows the guest closing the disk. The
//! backend is confined, so its new connections come through its XenStore connector
//! (`blkbackd xenstore-connect`), tested on its own below.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use backend::xenstore_connector::XenStoreConnector;
use sim::toolstack::VbdSpec;
use sim::workload::{self, DiskModel, Rng};
use tests::{backend_node, blkbackd, children, mixed, two_queue_front, Sim, Supervisor, GUEST};
use xen::xenstore::{Dial, Transport, XenStore, XsOps};

const RESTARTS: usize = 5;

#[test]
fn backends_survive_xenstored_restarts_under_load() {
    let (sim, spec) = Sim::with_disk("xenstored-restart", 64);
    let mut sup = Supervisor::start(&sim);
    let sup_pid = sup.0.id();
    sim.wait_for(&format!("{}/state", spec.backend_path()), "2");
    let mut front = two_queue_front(&sim);
    let sectors = front.info().expect("connected").sectors;
    let serve = children(sup_pid);
    assert_eq!(serve.len(), 1, "one backend");
    // Confined (seccomp: no `connect`), it reconnects through its connector.
    let status = std::fs::read_to_string(format!("/proc/{}/status", serve[0])).expect("status");
    assert!(
        status.contains("\nSeccomp:\t2\n"),
        "the backend is not confined"
    );
    let connector = xenstore_connector_of(serve[0]);

    let done = Arc::new(AtomicBool::new(false));
    let restarter = std::thread::scope(|s| {
        let restarter = s.spawn(|| {
            let mut rng = Rng::new(0x5eed_0515);
            for _ in 0..RESTARTS {
                std::thread::sleep(Duration::from_millis(100 + rng.next_u64() % 200));
                sim.restart_xenstored(Duration::from_millis(50 + rng.next_u64() % 250));
            }
            done.store(true, Ordering::Release);
        });
        let mut model = DiskModel::zeroed(sectors / 8, true);
        let mut rng = Rng::new(515);
        let mut requests = 0;
        while !done.load(Ordering::Acquire) {
            let plan = mixed(&mut rng, model.blocks(), 512);
            let r = workload::run(&mut front, &mut model, &plan, 32)
                .expect("the guest saw an error or a lost request");
            requests += r.requests;
        }
        let all = workload::sequential(model.blocks(), 16, false);
        let r = workload::run(&mut front, &mut model, &all, 32).expect("reading everything back");
        eprintln!(
            "{RESTARTS} xenstored restarts survived: {requests} requests, then {} verified reads",
            r.verified_reads
        );
        restarter.join()
    });
    restarter.expect("the restarting thread");

    assert!(
        sup.0.try_wait().expect("the supervisor").is_none(),
        "the supervisor died"
    );
    assert_eq!(children(sup_pid), serve, "the backend was not replaced");
    assert_eq!(
        xenstore_connector_of(serve[0]),
        connector,
        "the same connector"
    );
    assert_eq!(sim.error_node(&spec), None, "no error in XenStore");
    assert_eq!(
        backend_node(&sim, &spec, "state").as_deref(),
        Some("4"),
        "still connected"
    );

    // The supervisor's watch is back: a disk added now gets a backend.
    let image = sim.image("second.img", 8);
    let second = VbdSpec::disk(0, GUEST, 51728, image.to_str().expect("a UTF-8 temp dir"));
    sim.create_vbd(&second);
    sim.wait_for(&format!("{}/state", second.backend_path()), "2");
    let deadline = Instant::now() + Duration::from_secs(10);
    while children(sup_pid).len() < 2 {
        assert!(Instant::now() < deadline, "no backend for the second disk");
        std::thread::sleep(Duration::from_millis(10));
    }

    // The backend's watch on the frontend is back: it follows the guest closing the disk.
    let lost = front.close().expect("the backend closed with the guest");
    assert!(lost.is_empty(), "requests lost at close: {}", lost.len());
    assert_eq!(sim.error_node(&spec), None, "no error in XenStore");
}

/// The backend's XenStore connector: its one child that runs `xenstore-connect`.
fn xenstore_connector_of(serve: u32) -> u32 {
    let found: Vec<u32> = children(serve)
        .into_iter()
        .filter(|p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| c.split(|&b| b == 0).any(|a| a == b"xenstore-connect"))
        })
        .collect();
    assert_eq!(found.len(), 1, "one XenStore connector: {found:?}");
    found[0]
}

/// The connector hands over a new connection for each request, across xenstored restarts, as
/// long as it is what the path was when the connector started: another kind of file there
/// later is refused, as is a path that is gone, each with a clear error. A character device
/// (`/dev/null` standing in for `/dev/xen/xenbus`) is reopened and passed as the device.
#[test]
fn the_xenstore_connector_passes_new_connections_and_refuses_another_kind() {
    let sim = Sim::new("xenstore-connector");
    let link = sim.tmp().join("xenstored");
    std::os::unix::fs::symlink(sim::xenstore_socket(sim.dir(), 0), &link).expect("a symlink");
    let dial = XenStoreConnector::start(blkbackd(), &link).expect("starting the connector");
    let xs = XenStore::open_reconnecting(dial, Duration::from_secs(10)).expect("connecting");
    xs.write("/local/domain/0/connector", "1").expect("a write");
    sim.restart_xenstored(Duration::from_millis(100));
    assert_eq!(
        xs.read_string("/local/domain/0/connector")
            .expect("a read after the restart"),
        "1"
    );
    drop(xs);

    let dial = XenStoreConnector::start(blkbackd(), &link).expect("starting the connector");
    std::fs::remove_file(&link).expect("removing the symlink");
    std::os::unix::fs::symlink("/dev/null", &link).expect("a symlink");
    let e = dial
        .dial()
        .expect_err("a device where a socket was")
        .to_string();
    assert!(e.contains("the fd is not a socket"), "{e}");
    std::fs::remove_file(&link).expect("removing the symlink");
    let e = dial.dial().expect_err("nothing there").to_string();
    assert!(
        e.contains("could not connect") && e.contains(link.to_str().expect("UTF-8")),
        "{e}"
    );

    let dial = XenStoreConnector::start(blkbackd(), Path::new("/dev/null")).expect("starting");
    let (fd, transport) = dial.dial().expect("the device, reopened");
    assert_eq!(transport, Transport::XenbusDevice);
    let null = std::fs::metadata("/dev/null").expect("/dev/null").rdev();
    assert_eq!(rustix::fs::fstat(&fd).expect("fstat").st_rdev, null);
}
