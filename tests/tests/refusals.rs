//! What the backend refuses, and how it says so: where Linux's `xenbus_dev_fatal` writes
//! (`error/backend/vbd/<domid>/<devid>/error`, "<errno> <message>") and by switching to
//! Closing. The device stays usable: the frontend may close and try again.

use std::time::Duration;

use sim::front::FrontOptions;
use sim::toolstack::VbdSpec;
use sim::workload::DiskModel;
use tests::{
    backend_node, exercise, exercise_opened_disk, loop_disk, refused_error, remove, Backend, Loop,
    Sim, DEVID, GUEST,
};
use xen::xenstore::XsOps;

fn disk(sim: &Sim, args: &[&str]) -> (VbdSpec, Backend) {
    let image = sim.image("disk.img", 8);
    let spec = VbdSpec::disk(0, GUEST, DEVID, image.to_str().unwrap());
    sim.create_vbd(&spec);
    let mut all = vec!["--open-params"];
    all.extend_from_slice(args);
    let backend = Backend::serve(sim, &spec, &all);
    sim.wait_for(&format!("{}/state", spec.backend_path()), "2");
    (spec, backend)
}

fn expect_fatal(sim: &Sim, spec: &VbdSpec, message: &str) {
    sim.wait_for(&format!("{}/state", spec.backend_path()), "5");
    assert_eq!(sim.error_node(spec).as_deref(), Some(message));
}

#[test]
fn unknown_protocol_is_fatal() {
    let sim = Sim::new("proto");
    let (spec, _backend) = disk(&sim, &[]);
    let mut front = sim.front(FrontOptions {
        protocol: Some("sparc-abi".into()),
        ..FrontOptions::default()
    });
    assert!(front.connect().is_err());
    expect_fatal(&sim, &spec, "38 unknown fe protocol sparc-abi");
}

#[test]
fn too_many_queues_is_fatal() {
    let sim = Sim::new("queues");
    let (spec, _backend) = disk(&sim, &["--max-queues", "2"]);
    let mut front = sim.front(FrontOptions {
        queues: 3,
        ignore_backend_limits: true,
        ..FrontOptions::default()
    });
    assert!(front.connect().is_err());
    expect_fatal(
        &sim,
        &spec,
        "38 guest requested 3 queues, exceeding the maximum of 2.",
    );
}

/// A hostile guest writes its keys by hand.
fn hostile(sim: &Sim, spec: &VbdSpec, nodes: &[(&str, &str)]) {
    let xs = xen::xenstore::XenStore::open_at(sim::xenstore_socket(sim.dir(), GUEST)).unwrap();
    let fe = spec.frontend_path();
    for (k, v) in nodes {
        xs.write(&format!("{fe}/{k}"), v).unwrap();
    }
    xs.write(&format!("{fe}/state"), "3").unwrap();
}

#[test]
fn ring_page_order_above_the_maximum_is_fatal() {
    let sim = Sim::new("order");
    let (spec, _backend) = disk(&sim, &[]);
    hostile(
        &sim,
        &spec,
        &[
            ("ring-page-order", "5"),
            ("ring-ref0", "8"),
            ("event-channel", "1"),
        ],
    );
    expect_fatal(&sim, &spec, "22 requested ring page order 5 exceed max:4");
}

#[test]
fn zero_queues_is_fatal() {
    let sim = Sim::new("zeroq");
    let (spec, _backend) = disk(&sim, &[]);
    hostile(
        &sim,
        &spec,
        &[
            ("multi-queue-num-queues", "0"),
            ("ring-ref", "8"),
            ("event-channel", "1"),
        ],
    );
    expect_fatal(
        &sim,
        &spec,
        &format!(
            "38 guest requested 0 queues, exceeding the maximum of {}.",
            backend_node(&sim, &spec, "multi-queue-max-queues").unwrap()
        ),
    );
}

#[test]
fn missing_event_channel_is_fatal() {
    let sim = Sim::new("noevt");
    let (spec, _backend) = disk(&sim, &[]);
    hostile(&sim, &spec, &[("ring-ref", "8")]);
    expect_fatal(
        &sim,
        &spec,
        &format!("22 reading {}/event-channel", spec.frontend_path()),
    );
}

#[test]
fn an_unmappable_ring_is_fatal() {
    let sim = Sim::new("badref");
    let (spec, _backend) = disk(&sim, &[]);
    // The guest exists but never granted ref 4000.
    let _guest = sim::SimDomain::create(sim.dir(), GUEST, 16).unwrap();
    hostile(&sim, &spec, &[("ring-ref", "4000"), ("event-channel", "1")]);
    sim.wait_for(&format!("{}/state", spec.backend_path()), "5");
    let err = sim.error_node(&spec).unwrap();
    assert!(err.starts_with("5 mapping ring-ref port 1"), "{err}");
}

#[test]
fn after_a_fatal_error_the_frontend_can_start_over() {
    let sim = Sim::new("retry");
    let (spec, mut backend) = disk(&sim, &[]);
    let mut front = sim.front(FrontOptions {
        protocol: Some("bogus".into()),
        ..FrontOptions::default()
    });
    assert!(front.connect().is_err());
    expect_fatal(&sim, &spec, "38 unknown fe protocol bogus");
    front.close().unwrap();
    assert!(backend.running());
    front.options_mut().protocol = Some(ring::PROTOCOL_X86_64.into());
    let info = front.reconnect().unwrap();
    let mut model = DiskModel::zeroed(info.sectors / 8, true);
    exercise(&mut front, &mut model);
    remove(&sim, &spec, &mut backend, &mut front);
}

fn physical_disk(
    sim: &Sim,
    lo: &Loop,
    physical_device: String,
    diskseq_node: Option<String>,
) -> (VbdSpec, Backend) {
    let mut spec = VbdSpec::disk(0, GUEST, DEVID, lo.device.to_str().unwrap());
    spec.extra_backend_nodes
        .push(("physical-device".into(), physical_device));
    if let Some(d) = diskseq_node {
        spec.extra_backend_nodes.push(("diskseq".into(), d));
    }
    sim.create_vbd(&spec);
    // Default device source: physical-device, opened here race-free.
    let backend = Backend::serve(sim, &spec, &[]);
    (spec, backend)
}

#[test]
fn diskseq_mismatch_is_refused() {
    let Some((sim, lo)) = loop_disk("seqbad", 16) else {
        return;
    };
    let (major, minor) = lo.numbers();
    let seq = lo.diskseq();
    let (spec, _backend) = physical_disk(
        &sim,
        &lo,
        format!("{:x}@{major:x}:{minor:x}", seq + 1),
        None,
    );
    assert_eq!(
        refused_error(&sim, &spec),
        format!("19 creating vbd structure: device {major:x}:{minor:x} has diskseq 0x{seq:x}, expected 0x{:x}", seq + 1)
    );
}

#[test]
fn diskseq_node_mismatch_is_refused() {
    let Some((sim, lo)) = loop_disk("seqnode", 16) else {
        return;
    };
    let (major, minor) = lo.numbers();
    let seq = lo.diskseq();
    let (spec, _backend) = physical_disk(
        &sim,
        &lo,
        format!("{major:x}:{minor:x}"),
        Some(format!("{:x}", seq + 7)),
    );
    assert!(refused_error(&sim, &spec).starts_with("19 creating vbd structure"));
}

#[test]
fn matching_diskseq_serves_the_loop_device() {
    let Some((sim, lo)) = loop_disk("seqok", 16) else {
        return;
    };
    let (major, minor) = lo.numbers();
    let seq = lo.diskseq();
    let (spec, mut backend) =
        physical_disk(&sim, &lo, format!("{seq:x}@{major:x}:{minor:x}"), None);
    let info = exercise_opened_disk(&sim, &spec, &mut backend, false);
    assert_eq!(info.sectors, 16 * 2048);
}

#[test]
fn physical_device_written_after_probe_is_picked_up() {
    let Some((sim, lo)) = loop_disk("late", 16) else {
        return;
    };
    let (major, minor) = lo.numbers();
    let seq = lo.diskseq();
    let spec = VbdSpec::disk(0, GUEST, DEVID, lo.device.to_str().unwrap());
    sim.create_vbd(&spec);
    let _backend = Backend::serve(&sim, &spec, &[]);
    sim.wait_for(&format!("{}/state", spec.backend_path()), "2");
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(backend_node(&sim, &spec, "opened").as_deref(), Some("0"));
    // The hotplug script's transaction, as the Qubes not-script writes it.
    sim.dom0
        .transaction(|tx| {
            tx.write(
                &format!("{}/physical-device", spec.backend_path()),
                format!("{major:x}:{minor:x}"),
            )?;
            tx.write(
                &format!("{}/diskseq", spec.backend_path()),
                format!("{seq:x}"),
            )
        })
        .unwrap();
    sim.wait_for(&format!("{}/opened", spec.backend_path()), "1");
}
