//! Every negotiated feature and operation through the real blkbackd: multi-queue and
//! multi-page rings, both grant modes with and without persistent grants, indirect requests,
//! flush, barrier, discard, 4096-byte sectors, read-only and CD-ROM disks, online resize, and
//! the statistics file. Every read is checked against what was written.

use std::time::{Duration, Instant};

use ring::Status;
use sim::front::{FrontOptions, IoOp};
use sim::toolstack::VbdSpec;
use sim::workload::{self, DiskModel, Planned};
use tests::{backend_node, connected, exercise, remove, Backend, Sim, DEVID, GUEST};

fn run(tag: &str, args: &[&str], options: FrontOptions, check: impl FnOnce(&sim::front::DiskInfo)) {
    let sim = Sim::new(tag);
    let (spec, mut backend, mut front) = connected(&sim, 16, args, options);
    let info = *front.info().unwrap();
    check(&info);
    let mut model = DiskModel::zeroed(info.sectors / 8, true);
    exercise(&mut front, &mut model);
    remove(&sim, &spec, &mut backend, &mut front);
}

#[test]
fn four_queues_sixteen_page_rings() {
    let options = FrontOptions {
        queues: 4,
        ring_page_order: Some(4),
        ..FrontOptions::default()
    };
    run("mq4", &["--max-queues", "4"], options, |i| {
        assert_eq!((i.queues, i.ring_page_order), (4, 4));
    });
}

#[test]
fn one_queue_single_page_ring_with_plain_ring_ref() {
    let options = FrontOptions {
        queues: 1,
        ring_page_order: None,
        ..FrontOptions::default()
    };
    run("sq", &[], options, |i| {
        assert_eq!((i.queues, i.ring_page_order), (1, 0))
    });
}

#[test]
fn queue_count_and_ring_order_capped_by_the_backend() {
    let options = FrontOptions {
        queues: 8,
        ring_page_order: Some(4),
        ..FrontOptions::default()
    };
    run(
        "caps",
        &["--max-queues", "3", "--max-ring-page-order", "1"],
        options,
        |i| {
            assert_eq!((i.queues, i.ring_page_order), (3, 1));
        },
    );
}

#[test]
fn grant_map_with_persistent_grants() {
    run(
        "map-p",
        &["--grant-mode", "map"],
        FrontOptions::default(),
        |i| assert!(i.persistent),
    );
}

/// Map mode maps only persistent grants: this frontend is served by grant copy (the data
/// plane's `map_mode_grant_copies_for_a_frontend_without_persistent_grants` counts it).
#[test]
fn grant_map_mode_without_persistent_grants() {
    let options = FrontOptions {
        persistent: false,
        ..FrontOptions::default()
    };
    run("map-np", &["--grant-mode", "map"], options, |i| {
        assert!(!i.persistent)
    });
}

#[test]
fn grant_copy_with_persistent_grants_offered() {
    run(
        "copy-p",
        &["--grant-mode", "copy"],
        FrontOptions::default(),
        |i| assert!(i.persistent),
    );
}

#[test]
fn grant_copy_without_persistent_grants() {
    let options = FrontOptions {
        persistent: false,
        ..FrontOptions::default()
    };
    run(
        "copy-np",
        &["--grant-mode", "copy", "--no-persistent"],
        options,
        |i| assert!(!i.persistent),
    );
}

/// utime + stime of process `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let fields: Vec<&str> = stat[stat.rfind(')').expect("comm") + 2..]
        .split(' ')
        .collect();
    fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
}

/// `--poll-us`, given and by default (adaptive, up to 200 µs on 2 CPUs or more): the queues
/// busy-poll between requests, serve every request right in both grant modes, and still go
/// to sleep when the guest goes quiet (a queue that kept spinning would burn a whole CPU:
/// about 100 ticks a second).
#[test]
fn busy_polling_serves_and_sleeps_when_idle() {
    for (mode, poll) in [("copy", Some("500")), ("map", Some("500")), ("copy", None)] {
        let name = format!("poll-{mode}-{}", poll.unwrap_or("default"));
        let sim = Sim::new(&name);
        let mut args = vec!["--grant-mode", mode, "--max-queues", "2"];
        if let Some(us) = poll {
            args.extend(["--poll-us", us]);
        }
        let options = FrontOptions {
            queues: 2,
            ..FrontOptions::default()
        };
        let (spec, mut backend, mut front) = connected(&sim, 16, &args, options);
        let info = *front.info().unwrap();
        let mut model = DiskModel::zeroed(info.sectors / 8, true);
        exercise(&mut front, &mut model);
        std::thread::sleep(Duration::from_millis(200));
        let before = cpu_ticks(backend.pid());
        std::thread::sleep(Duration::from_secs(1));
        let idle = cpu_ticks(backend.pid()) - before;
        assert!(idle <= 20, "{name}: {idle} ticks of CPU in 1 s of idleness");
        exercise(&mut front, &mut model);
        remove(&sim, &spec, &mut backend, &mut front);
    }
}

#[test]
fn no_indirect_requests_when_disabled() {
    run(
        "noind",
        &["--max-indirect-segments", "0"],
        FrontOptions::default(),
        |i| {
            assert_eq!(i.max_indirect_segments, 0);
        },
    );
}

#[test]
fn indirect_requests_of_256_segments() {
    let sim = Sim::new("ind256");
    let (spec, mut backend, mut front) = connected(&sim, 16, &[], FrontOptions::default());
    assert_eq!(front.max_sectors_per_request(), 256 * 8);
    let mut model = DiskModel::zeroed(front.info().unwrap().sectors / 8, true);
    // 1 MiB requests: 256 segments each, in one indirect page.
    tests::write_then_read(&mut front, &mut model, 1024, 256, 4);
    // One segment too many is refused by the backend, and only that request.
    let abi = front.info().unwrap().abi;
    let raw = ring::FrontRequest::Indirect {
        indirect_op: ring::OP_READ,
        id: 999_999,
        sector: 0,
        handle: 0,
        nr_segments: 257,
        page_grefs: &[1],
    }
    .encode(abi)
    .unwrap();
    front
        .submit_raw(0, 999_999, ring::OP_INDIRECT, raw.as_bytes())
        .unwrap();
    let c = front.wait().unwrap();
    assert_eq!((c.id, c.status()), (999_999, Some(Status::Error)));
    workload::run(
        &mut front,
        &mut model,
        &workload::sequential(64, 1, false),
        8,
    )
    .unwrap();
    remove(&sim, &spec, &mut backend, &mut front);
}

#[test]
fn flush_barrier_and_discard() {
    let sim = Sim::new("fbd");
    let (spec, mut backend, mut front) = connected(&sim, 16, &[], FrontOptions::default());
    let info = *front.info().unwrap();
    assert!(info.flush && info.barrier && info.discard);
    assert_eq!(
        backend_node(&sim, &spec, "feature-discard").as_deref(),
        Some("1")
    );
    assert!(backend_node(&sim, &spec, "discard-granularity").is_some());
    let mut model = DiskModel::zeroed(info.sectors / 8, true);
    workload::run(
        &mut front,
        &mut model,
        &workload::sequential(512, 16, true),
        8,
    )
    .unwrap();
    // A flush with no data, and a barrier carrying data.
    assert!(front.execute(0, IoOp::Flush).unwrap().is_ok());
    let data = vec![0xa5u8; 8192];
    assert!(front
        .execute(
            1,
            IoOp::Barrier {
                sector: 4096,
                data: &data
            }
        )
        .unwrap()
        .is_ok());
    let back = front.read(0, 4096, 16).unwrap();
    assert_eq!(back.data.as_deref(), Some(&data[..]));
    // Discard: a file's punched hole reads back as zeros.
    workload::run(
        &mut front,
        &mut model,
        &[Planned::Discard {
            block: 64,
            count: 128,
        }],
        1,
    )
    .unwrap();
    workload::run(
        &mut front,
        &mut model,
        &workload::sequential(512, 16, false),
        8,
    )
    .unwrap();
    let stats_deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let s = backend.stats().map(|r| r.counters);
        if s.is_some_and(|c| c.f_req >= 2 && c.ds_req >= 1 && c.wr_req >= 32 && c.rd_req >= 32) {
            break;
        }
        assert!(
            Instant::now() < stats_deadline,
            "statistics file not updated: {s:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // `blkbackd stats` reads the same file while the backend runs.
    let out = std::process::Command::new(tests::blkbackd())
        .arg("stats")
        .arg("--stats-file")
        .arg(&backend.stats_file)
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for counter in [
        "oo_req", "rd_req", "wr_req", "f_req", "ds_req", "rd_sect", "wr_sect", "latency",
    ] {
        assert!(text.contains(counter), "{counter} missing from:\n{text}");
    }
    remove(&sim, &spec, &mut backend, &mut front);
    let c = backend.stats().unwrap().counters;
    assert!(c.wr_sect >= 512 * 8 && c.rd_sect >= 512 * 8, "{c:?}");
    assert!(c.lat_count > 0 && c.lat_max_us > 0);
}

#[test]
fn sectors_of_4096_bytes() {
    let sim = Sim::new("4k");
    let (spec, mut backend, mut front) = connected(
        &sim,
        16,
        &["--sector-size", "4096"],
        FrontOptions::default(),
    );
    let info = *front.info().unwrap();
    assert_eq!(info.sector_size, 4096);
    assert_eq!(info.sectors, 16 * 2048, "sectors stay in 512-byte units");
    let mut model = DiskModel::zeroed(info.sectors / 8, true);
    exercise(&mut front, &mut model);
    // A request not aligned to the logical block size is refused.
    let c = front.read(0, 1, 8).unwrap();
    assert_eq!(c.status(), Some(Status::Error));
    remove(&sim, &spec, &mut backend, &mut front);
}

fn special_disk(
    tag: &str,
    mode: &str,
    device_type: &str,
) -> (Sim, VbdSpec, Backend, sim::front::SimFront) {
    let sim = Sim::new(tag);
    let image = sim.image("disk.img", 8);
    std::fs::write(&image, vec![0x42u8; 8 << 20]).unwrap();
    let mut spec = VbdSpec::disk(0, GUEST, DEVID, image.to_str().unwrap());
    spec.mode = mode.to_owned();
    spec.device_type = device_type.to_owned();
    sim.create_vbd(&spec);
    let backend = Backend::serve(&sim, &spec, &["--open-params"]);
    let mut front = sim.front(FrontOptions::default());
    front.connect().unwrap();
    (sim, spec, backend, front)
}

#[test]
fn read_only_disk_refuses_writes() {
    let (sim, spec, mut backend, mut front) = special_disk("ro", "r", "disk");
    assert_eq!(front.info().unwrap().info & 4, 4, "VDISK_READONLY");
    let c = front.read(0, 0, 8).unwrap();
    assert_eq!(c.data, Some(vec![0x42; 4096]));
    let data = vec![0u8; 4096];
    let c = front.write(0, 0, &data).unwrap();
    assert_eq!(c.status(), Some(Status::Error));
    let c = front.read(0, 0, 8).unwrap();
    assert_eq!(
        c.data,
        Some(vec![0x42; 4096]),
        "the refused write changed nothing"
    );
    remove(&sim, &spec, &mut backend, &mut front);
}

#[test]
fn cdrom_is_reported_in_info() {
    let (sim, spec, mut backend, mut front) = special_disk("cdrom", "r", "cdrom");
    assert_eq!(
        front.info().unwrap().info,
        1 | 4,
        "VDISK_CDROM | VDISK_READONLY"
    );
    let c = front.read(0, 8, 8).unwrap();
    assert_eq!(c.data, Some(vec![0x42; 4096]));
    remove(&sim, &spec, &mut backend, &mut front);
}

#[test]
fn online_resize_rewrites_sectors_and_state() {
    let sim = Sim::new("resize");
    let (spec, mut backend, mut front) = connected(&sim, 8, &[], FrontOptions::default());
    let old = front.info().unwrap().sectors;
    assert_eq!(old, 8 * 2048);
    // Beyond the end: refused.
    let c = front.read(0, old, 8).unwrap();
    assert_eq!(c.status(), Some(Status::Error));
    // The guest watches the backend's state, as blkfront does.
    let state_path = format!("{}/state", spec.backend_path());
    front.xenstore().watch(&state_path, "be-state").unwrap();
    while front
        .xenstore()
        .wait_watch_event(Some(Duration::from_millis(200)))
        .unwrap()
        .is_some()
    {}
    // Grow the image; the backend notices and publishes the new size.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&spec.params)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    sim.wait_for(
        &format!("{}/sectors", spec.backend_path()),
        &(16 * 2048).to_string(),
    );
    assert_eq!(backend_node(&sim, &spec, "state").as_deref(), Some("4"));
    // state was rewritten (in the same transaction as sectors): the guest's watch fired.
    let ev = front
        .xenstore()
        .wait_watch_event(Some(Duration::from_secs(5)))
        .unwrap();
    assert_eq!(ev.map(|e| e.path), Some(state_path));
    assert_eq!(front.refresh_sectors().unwrap(), 16 * 2048);
    let data = vec![0x77u8; 4096];
    assert!(front.write(0, old, &data).unwrap().is_ok());
    let c = front.read(1, old, 8).unwrap();
    assert_eq!(c.data, Some(data));
    remove(&sim, &spec, &mut backend, &mut front);
}
