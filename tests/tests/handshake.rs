//! The XenStore handshake through the real blkbackd, for each ABI a frontend may choose.

use std::time::Duration;

use sim::front::FrontOptions;
use sim::workload::DiskModel;
use tests::{backend_node, connected, exercise, remove, Backend, Sim};

#[test]
fn probe_advertises_features_and_waits_for_the_device() {
    let (sim, spec) = Sim::with_disk("probe", 8);
    // No device source: the backend waits for the hotplug script's physical-device.
    let mut backend = Backend::serve(&sim, &spec, &["--max-queues", "3"]);
    sim.wait_for(&format!("{}/state", spec.backend_path()), "2");
    assert_eq!(
        backend_node(&sim, &spec, "feature-max-indirect-segments").as_deref(),
        Some("256")
    );
    assert_eq!(
        backend_node(&sim, &spec, "multi-queue-max-queues").as_deref(),
        Some("3")
    );
    assert_eq!(
        backend_node(&sim, &spec, "max-ring-page-order").as_deref(),
        Some("4")
    );
    // The RFC series: opened = 0 until the device is held.
    assert_eq!(backend_node(&sim, &spec, "opened").as_deref(), Some("0"));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(backend_node(&sim, &spec, "opened").as_deref(), Some("0"));
    assert!(backend.running());
    // SIGTERM closes the device and ends the process cleanly.
    backend.terminate();
    assert!(backend.wait_exit(Duration::from_secs(10)).success());
    assert_eq!(backend_node(&sim, &spec, "state").as_deref(), Some("6"));
}

#[test]
fn opened_is_published_once_the_device_is_held() {
    let (sim, spec) = Sim::with_disk("opened", 8);
    let _backend = Backend::serve(&sim, &spec, &["--open-params"]);
    sim.wait_for(&format!("{}/opened", spec.backend_path()), "1");
    assert_eq!(backend_node(&sim, &spec, "state").as_deref(), Some("2"));
}

fn handshake(protocol: Option<&str>, tag: &str) {
    let sim = Sim::new(tag);
    let options = FrontOptions {
        protocol: protocol.map(str::to_owned),
        ..FrontOptions::default()
    };
    let (spec, mut backend, mut front) = connected(&sim, 16, &[], options);
    let info = *front.info().unwrap();
    let expected_abi = ring::Abi::from_protocol(protocol).unwrap();
    assert_eq!(info.abi, expected_abi);
    assert_eq!(info.sectors, 16 * 2048);
    assert_eq!(info.sector_size, 512);
    assert!(info.flush && info.barrier && info.persistent);
    assert_eq!(backend_node(&sim, &spec, "state").as_deref(), Some("4"));
    assert_eq!(backend_node(&sim, &spec, "info").as_deref(), Some("0"));
    assert_eq!(backend_node(&sim, &spec, "opened").as_deref(), Some("1"));
    let mut model = DiskModel::zeroed(info.sectors / 8, true);
    exercise(&mut front, &mut model);
    remove(&sim, &spec, &mut backend, &mut front);
}

#[test]
fn handshake_x86_64_abi() {
    handshake(Some("x86_64-abi"), "abi64");
}

#[test]
fn handshake_x86_32_abi() {
    handshake(Some("x86_32-abi"), "abi32");
}

#[test]
fn handshake_default_abi_without_protocol_node() {
    handshake(None, "abidefault");
}
