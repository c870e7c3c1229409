//! Data in and out in both grant modes, indirect requests, flush and barrier, discard.

use super::*;

fn round_trip(mode: GrantMode, persistent: bool, abi: Abi, ring_pages: usize) {
    let (_dir, img, mut f, mut p) = setup_ring("rt", 8192, mode, abi, ring_pages);
    p.persistent_grants = persistent;
    let stats = Arc::clone(&p.stats);
    let q = spawn_queue(p).unwrap();
    assert!(!q.is_finished());

    // Write 11 pages (88 sectors) at sector 64, then read them back into other pages.
    fill(&f, 0, 11, 3);
    assert_eq!(f.rw(OP_WRITE, 1, 64, 0, 88), Some(Status::Okay));
    let file = std::fs::read(&img).unwrap();
    for i in 0..11 {
        assert_eq!(
            &file[(64 * 512 + i * PAGE_SIZE)..][..PAGE_SIZE],
            &page_bytes(&f, i)[..],
            "page {i} on disk"
        );
    }
    assert_eq!(f.rw(OP_READ, 2, 64, 20, 88), Some(Status::Okay));
    for i in 0..11 {
        assert_eq!(
            page_bytes(&f, 20 + i),
            page_bytes(&f, i),
            "page {i} read back"
        );
    }

    // A batch of many requests at once, with a repeated guest id, all answered with their ids.
    let n = f.shared.ring.size() as usize;
    for k in 0..n {
        let segs = [Segment {
            gref: f.page(40 + k % 64).1,
            first_sect: 1,
            last_sect: 6,
        }];
        f.queue(&FrontRequest::Direct {
            operation: OP_READ,
            id: 1000 + (k as u64 % 7),
            sector: (k * 8) as u64,
            handle: 0,
            segs: &segs,
        });
    }
    f.push();
    let rs = f.responses(n);
    assert!(rs.iter().all(|r| r.status() == Some(Status::Okay)));
    assert!(rs.iter().all(|r| (1000..1007).contains(&r.id)));

    let s = stats.snapshot();
    assert_eq!(s.wr_req, 1);
    assert_eq!(s.wr_sect, 88);
    assert_eq!(s.rd_req, 1 + n as u64);
    assert_eq!(s.rd_sect, 88 + 6 * n as u64);
    assert_eq!(s.errors, 0);
    // Data pages are mapped only when they are persistent grants (issue 21).
    if mode == GrantMode::Map && persistent {
        assert!(s.map_pages > 0 && s.copy_segs == 0, "{s:?}");
    } else {
        assert!(s.map_calls == 0 && s.copy_segs > 0, "{s:?}");
    }
    assert_stopped(q);
    for g in f.shared.grefs.iter().chain(&f.data_refs) {
        assert!(!f.dom.grant_in_use(*g), "grant {g} still mapped after stop");
    }
}

#[test]
fn round_trip_grant_copy() {
    round_trip(GrantMode::Copy, false, Abi::X86_64, 1);
}

#[test]
fn map_mode_grant_copies_for_a_frontend_without_persistent_grants() {
    round_trip(GrantMode::Map, false, Abi::X86_32, 1);
}

#[test]
fn round_trip_persistent_grants_order4_ring() {
    round_trip(GrantMode::Map, true, Abi::X86_64, 16);
}

#[test]
fn round_trip_grant_copy_order4_ring() {
    round_trip(GrantMode::Copy, false, Abi::X86_32, 16);
}

fn indirect(mode: GrantMode) {
    let (_dir, img, mut f, p) = setup("ind", 8192, mode);
    let q = spawn_queue(p).unwrap();
    // 256 segments of one sector each, from data pages 1..=256; the segment list lives in
    // data page 0 (an indirect page).
    let ind_ref = f.page(0).1;
    for i in 0..256usize {
        let sect = (i % 8) as u8;
        indirect_entry(&f.page(0).0, i, f.page(1 + i).1, sect, sect);
    }
    fill(&f, 1, 256, 9);
    let st = f.one(&FrontRequest::Indirect {
        indirect_op: OP_WRITE,
        id: 5,
        sector: 8,
        handle: 0,
        nr_segments: 256,
        page_grefs: &[ind_ref],
    });
    assert_eq!(st, Some(Status::Okay));
    let file = std::fs::read(&img).unwrap();
    for i in 0..256usize {
        let off = (i % 8) * 512;
        let want = &page_bytes(&f, 1 + i)[off..off + 512];
        assert_eq!(&file[(8 + i) * 512..][..512], want, "segment {i}");
    }
    // Read it back into pages 300.. through the same kind of list.
    for i in 0..256usize {
        indirect_entry(&f.page(0).0, i, f.page(300 + i).1, 0, 0);
    }
    let st = f.one(&FrontRequest::Indirect {
        indirect_op: OP_READ,
        id: 6,
        sector: 8,
        handle: 0,
        nr_segments: 256,
        page_grefs: &[ind_ref],
    });
    assert_eq!(st, Some(Status::Okay));
    for i in 0..256usize {
        assert_eq!(
            &page_bytes(&f, 300 + i)[..512],
            &file[(8 + i) * 512..][..512],
            "read segment {i}"
        );
    }
    // An indirect page the frontend never granted: that request fails, nothing else.
    let st = f.one(&FrontRequest::Indirect {
        indirect_op: OP_READ,
        id: 8,
        sector: 8,
        handle: 0,
        nr_segments: 16,
        page_grefs: &[0xdead],
    });
    assert_eq!(st, Some(Status::Error));
    // 257 segments: more than advertised, refused.
    let st = f.one(&FrontRequest::Indirect {
        indirect_op: OP_READ,
        id: 7,
        sector: 8,
        handle: 0,
        nr_segments: 257,
        page_grefs: &[ind_ref],
    });
    assert_eq!(st, Some(Status::Error));
    assert_stopped(q);
}

#[test]
fn indirect_256_segments_grant_copy() {
    indirect(GrantMode::Copy);
}

#[test]
fn indirect_256_segments_grant_map() {
    indirect(GrantMode::Map);
}

#[test]
fn flush_and_barrier() {
    let (dir, img, mut f, p) = setup("flush", 1024, GrantMode::Copy);
    let stats = Arc::clone(&p.stats);
    let q = spawn_queue(p).unwrap();
    let flush = |f: &mut Front, id| f.direct(ring::OP_FLUSH_DISKCACHE, id, 0, &[]);
    assert_eq!(flush(&mut f, 1), Some(Status::Okay));
    // A barrier carrying data, queued behind reads: drained, written, flushed.
    fill(&f, 0, 1, 1);
    let seg = [Segment {
        gref: f.page(0).1,
        first_sect: 0,
        last_sect: 7,
    }];
    for k in 0..8u64 {
        let s = [Segment {
            gref: f.page(10 + k as usize).1,
            first_sect: 0,
            last_sect: 7,
        }];
        f.queue(&FrontRequest::Direct {
            operation: OP_READ,
            id: 100 + k,
            sector: k * 8,
            handle: 0,
            segs: &s,
        });
    }
    f.queue(&FrontRequest::Direct {
        operation: ring::OP_WRITE_BARRIER,
        id: 2,
        sector: 16,
        handle: 0,
        segs: &seg,
    });
    f.push();
    let rs = f.responses(9);
    assert!(
        rs.iter().all(|r| r.status() == Some(Status::Okay)),
        "{rs:?}"
    );
    assert_eq!(
        &std::fs::read(&img).unwrap()[16 * 512..][..PAGE_SIZE],
        &page_bytes(&f, 0)[..]
    );
    assert_eq!(stats.snapshot().f_req, 2);
    q.stop();

    // Without the feature advertised: EOPNOTSUPP.
    let mut p = f.params(&dir.0, open(&img));
    p.features.flush = false;
    let q = spawn_queue(p).unwrap();
    assert_eq!(flush(&mut f, 3), Some(Status::NotSupported));
    q.stop();
}

#[test]
fn discard_punches_a_hole() {
    let (_dir, img, mut f, p) = setup("discard", 4096, GrantMode::Copy);
    assert!(p.device.discard(), "this file system punches holes");
    let stats = Arc::clone(&p.stats);
    let q = spawn_queue(p).unwrap();
    fill(&f, 0, 11, 5);
    for k in 0..8u64 {
        assert_eq!(f.rw(OP_WRITE, k, k * 88, 0, 88), Some(Status::Okay));
    }
    let blocks = |p: &Path| std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(p).unwrap());
    let before = blocks(&img);
    assert!(before >= 8 * 88, "data written: {before} blocks");
    assert_eq!(f.discard(9, 0, 4096, false), Some(Status::Okay));
    let after = blocks(&img);
    assert!(after < before / 2, "blocks {before} -> {after}");
    assert!(std::fs::read(&img).unwrap().iter().all(|&b| b == 0));
    // Secure discard is not offered for a file: the flag is ignored, as Linux does
    // (`discard_secure && flag`), and a plain discard is done.
    assert_eq!(f.discard(10, 0, 8, true), Some(Status::Okay));
    // Past the end: refused.
    assert_eq!(f.discard(11, 4090, 8, false), Some(Status::Error));
    assert_eq!(stats.snapshot().ds_req, 2);
    q.stop();
}
