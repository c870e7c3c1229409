//! What the device does: errors, read-only, 4 KiB sectors, loop devices, ENOSPC, resize, sharing.

use super::*;

#[test]
fn device_error_fails_one_request_only() {
    let (_dir, img, mut f, p) = setup("eio", 2048, GrantMode::Copy);
    let q = spawn_queue(p).unwrap();
    // Shrink the file under the backend (which still believes in 2048 sectors): a read past
    // the new end is short, which is a device error for that request only.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(1024 * 512)
        .unwrap();
    assert_eq!(f.rw(OP_READ, 1, 1536, 0, 8), Some(Status::Error));
    assert_eq!(f.rw(OP_READ, 2, 0, 0, 8), Some(Status::Okay));
    assert_stopped(q);
}

#[test]
fn read_only_refuses_writes() {
    let options = DeviceOptions {
        read_only: true,
        ..DeviceOptions::default()
    };
    let (_dir, _, mut f, p) = setup_device("ro", 1024, options, Abi::X86_64, 1);
    let q = spawn_queue(p).unwrap();
    assert_eq!(f.rw(OP_WRITE, 1, 0, 0, 8), Some(Status::Error));
    assert_eq!(f.rw(OP_READ, 2, 0, 0, 8), Some(Status::Okay));
    q.stop();
}

#[test]
fn logical_block_size_4096() {
    let options = DeviceOptions {
        logical_block_size: Some(4096),
        ..DeviceOptions::default()
    };
    let (_dir, _, mut f, p) = setup_device("4k", 1024, options, Abi::X86_64, 1);
    assert_eq!(p.device.logical_block_size(), 4096);
    let q = spawn_queue(p).unwrap();
    fill(&f, 0, 2, 7);
    assert_eq!(f.rw(OP_WRITE, 1, 8, 0, 16), Some(Status::Okay));
    assert_eq!(f.rw(OP_READ, 2, 8, 5, 16), Some(Status::Okay));
    assert_eq!(page_bytes(&f, 5), page_bytes(&f, 0));
    // Misaligned start, length or in-page offset.
    assert_eq!(f.rw(OP_READ, 3, 4, 5, 8), Some(Status::Error));
    assert_eq!(f.rw(OP_READ, 4, 8, 5, 4), Some(Status::Error));
    let seg = [Segment {
        gref: f.page(5).1,
        first_sect: 1,
        last_sect: 7,
    }];
    assert_eq!(f.direct(OP_READ, 5, 8, &seg), Some(Status::Error));
    q.stop();
}

#[test]
fn block_device_with_4096_byte_sectors() {
    let dir = TempDir::new("loop");
    let backing = dir.0.join("backing.img");
    std::fs::write(&backing, vec![0x5au8; 4 << 20]).unwrap();
    let Some(lo) = LoopDev::attach(&backing, 4096) else {
        return;
    };
    let dev = open(&lo.0);
    assert!(matches!(
        dev.kind(),
        crate::device::DeviceKind::Block { .. }
    ));
    assert_eq!(dev.logical_block_size(), 4096);
    assert_eq!(dev.sectors(), 8192);
    assert!(
        dev.diskseq().is_some(),
        "loop devices have a diskseq on 6.x"
    );
    assert!(dev.discard());
    assert!(!dev.secure_discard(), "loop devices have no secure erase");
    let mut f = Front::new(&dir.0, Abi::X86_64, 1);
    let p = f.params(&dir.0, Arc::clone(&dev));
    let q = spawn_queue(p).unwrap();
    fill(&f, 0, 4, 2);
    assert_eq!(f.rw(OP_WRITE, 1, 64, 0, 32), Some(Status::Okay));
    assert_eq!(f.rw(OP_READ, 2, 64, 10, 32), Some(Status::Okay));
    for i in 0..4 {
        assert_eq!(page_bytes(&f, 10 + i), page_bytes(&f, i));
    }
    assert_eq!(
        f.rw(OP_READ, 3, 60, 10, 8),
        Some(Status::Error),
        "misaligned for 4096"
    );
    assert_eq!(
        f.direct(ring::OP_FLUSH_DISKCACHE, 4, 0, &[]),
        Some(Status::Okay)
    );
    let on_disk = std::fs::read(&backing).unwrap();
    assert_eq!(&on_disk[64 * 512..][..PAGE_SIZE], &page_bytes(&f, 0)[..]);
    // Discard through the block layer: the loop driver punches the backing file.
    let blocks = || std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&backing).unwrap());
    let before = blocks();
    assert_eq!(f.discard(5, 0, 8192, false), Some(Status::Okay));
    assert!(
        blocks() < before / 2,
        "discard reached the backing file: {before} -> {}",
        blocks()
    );
    assert_stopped(q);
}

#[test]
fn enospc_fails_one_request_only() {
    if !sim::skip::root_or_skip("mounting a small tmpfs") {
        return;
    }
    let dir = TempDir::new("enospc");
    let mnt = dir.0.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let ok = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
        .arg(&mnt)
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "mounting a small tmpfs failed (as root)");
    /// Unmounts on drop. The io_uring lets go of its registered files asynchronously after
    /// the queue ends, so the file system may be busy for a moment: retry, then detach it
    /// lazily rather than leave it mounted.
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let umount = |lazy: bool| {
                let mut c = std::process::Command::new("umount");
                if lazy {
                    c.arg("-l");
                }
                c.arg(&self.0)
                    .stderr(std::process::Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            };
            for _ in 0..50 {
                if umount(false) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            umount(true);
        }
    }
    let _um = Unmount(mnt.clone());
    // A sparse 1 MiB image on a 64 KiB file system: writing it all cannot succeed.
    let img = image(&mnt, 2048);
    let mut f = Front::new(&dir.0, Abi::X86_64, 1);
    let q = spawn_queue(f.params(&dir.0, open(&img))).unwrap();
    fill(&f, 0, 11, 4);
    let mut statuses = Vec::new();
    for k in 0..23u64 {
        statuses.push(f.rw(OP_WRITE, k, k * 88, 0, 88));
    }
    assert!(
        statuses.contains(&Some(Status::Error)),
        "the file system filled up: {statuses:?}"
    );
    assert_eq!(statuses[0], Some(Status::Okay));
    // The queue still serves requests.
    assert_eq!(f.rw(OP_READ, 100, 0, 20, 88), Some(Status::Okay));
    assert_eq!(page_bytes(&f, 20), page_bytes(&f, 0));
    assert_stopped(q);
}

#[test]
fn two_queues_share_a_device() {
    let dir = TempDir::new("mq");
    let img = image(&dir.0, 4096);
    let dev = open(&img);
    let mut f0 = Front::new(&dir.0, Abi::X86_64, 1);
    // A second queue of the same frontend: its own ring pages and port, same domain.
    let mut evt1 = f0.dom.open_event_channel().unwrap();
    let port1 = evt1.alloc_unbound(0).unwrap();
    let ring1_frame = 15u32;
    let ring1_ref = f0.dom.grant(0, ring1_frame, Access::ReadWrite).unwrap();
    let dom1 = SimDomain::open(&dir.0.join("sim"), FRONT).unwrap();
    let ring1_mem = dom1.page(ring1_frame).unwrap();
    let mut ring1 = FrontRing::init(&ring1_mem, Abi::X86_64, 1).unwrap();
    let stats = Arc::new(Stats::new());
    let mut p0 = f0.params(&dir.0, Arc::clone(&dev));
    p0.stats = Arc::clone(&stats);
    let q0 = spawn_queue(p0).unwrap();
    let mut p1 = f0.params(&dir.0, Arc::clone(&dev));
    p1.stats = Arc::clone(&stats);
    p1.ring_refs = vec![ring1_ref];
    p1.port = port1;
    let q1 = spawn_queue(p1).unwrap();
    fill(&f0, 0, 1, 8);
    assert_eq!(f0.rw(OP_WRITE, 1, 0, 0, 8), Some(Status::Okay));
    let seg = [Segment {
        gref: f0.page(3).1,
        first_sect: 0,
        last_sect: 7,
    }];
    ring1
        .queue_request(
            &ring1_mem,
            &FrontRequest::Direct {
                operation: OP_READ,
                id: 9,
                sector: 0,
                handle: 0,
                segs: &seg,
            },
        )
        .unwrap();
    if ring1.push_requests(&ring1_mem).unwrap() {
        evt1.notify(port1).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let r = loop {
        if let Some(r) = ring1.next_response(&ring1_mem).unwrap() {
            break r;
        }
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(1));
    };
    assert_eq!((r.id, r.status()), (9, Some(Status::Okay)));
    assert_eq!(page_bytes(&f0, 3), page_bytes(&f0, 0));
    assert_stopped(q0);
    assert_stopped(q1);
    // One set of counters for the device: both queues added to it.
    let s = stats.snapshot();
    assert_eq!((s.rd_req, s.wr_req, s.in_flight), (1, 1, 0));
}

#[test]
fn resize_is_seen_by_running_queues() {
    let (_dir, img, mut f, p) = setup("resize", 1024, GrantMode::Copy);
    let dev = Arc::clone(&p.device);
    let q = spawn_queue(p).unwrap();
    assert_eq!(
        f.rw(OP_READ, 1, 1024, 0, 8),
        Some(Status::Error),
        "beyond the end"
    );
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(2048 * 512)
        .unwrap();
    assert_eq!(
        f.rw(OP_READ, 2, 1024, 0, 8),
        Some(Status::Error),
        "not refreshed yet"
    );
    assert_eq!(dev.refresh_size().unwrap(), 2048);
    assert_eq!(f.rw(OP_READ, 3, 1024, 0, 8), Some(Status::Okay));
    assert_eq!(
        f.rw(OP_READ, 4, 2047, 0, 2),
        Some(Status::Error),
        "still checked against the new end"
    );
    q.stop();
}
