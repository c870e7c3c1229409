//! Map mode: persistent grants, their cap and purge, retired mappings, read-only grants.

use super::*;

/// A one-page x86_64 ring on a 4 KiB-sector image, with queue parameters for map mode with
/// persistent grants (what every test here starts from).
fn map_mode(tag: &str) -> (TempDir, PathBuf, Front, QueueParams) {
    setup(tag, 4096, GrantMode::Map)
}

#[test]
fn indirect_pages_are_persistent_grants_in_map_mode() {
    let (_dir, img, mut f, p) = map_mode("indpg");
    let stats = Arc::clone(&p.stats);
    let q = spawn_queue(p).unwrap();
    // Two indirect pages listing 16 data pages (1..=16): data page 0 granted writable as
    // Linux's blkfront does with persistent grants, and a page granted read-only.
    let ro_frame = DATA0 + 500;
    let ro_ref = f.dom.grant(0, ro_frame, Access::ReadOnly).unwrap();
    let ind_ref = f.page(0).1;
    for i in 0..16usize {
        let gref = f.page(1 + i).1;
        indirect_entry(&f.page(0).0, i, gref, 0, 7);
        indirect_entry(&f.dom.page(ro_frame).unwrap(), i, gref, 0, 7);
    }
    fill(&f, 1, 16, 3);
    for (n, page_ref) in (0..20u64).zip([ind_ref, ro_ref].into_iter().cycle()) {
        let st = f.one(&FrontRequest::Indirect {
            indirect_op: if n % 3 == 0 { OP_WRITE } else { OP_READ },
            id: n,
            sector: 0,
            handle: 0,
            nr_segments: 16,
            page_grefs: &[page_ref],
        });
        assert_eq!(st, Some(Status::Okay), "request {n}");
        // The indirect pages stay mapped between requests, in the cache beside the data
        // pages: nothing is mapped anew once both have been seen.
        assert!(
            f.dom.grant_in_use(page_ref),
            "indirect page unmapped after {n}"
        );
        if n > 0 {
            assert_eq!(stats.snapshot().persistent_grants, 18, "request {n}");
        }
    }
    let file = std::fs::read(&img).unwrap();
    for i in 0..16usize {
        assert_eq!(
            &file[i * 4096..][..4096],
            &page_bytes(&f, 1 + i)[..],
            "page {i}"
        );
    }
    assert_stopped(q);
    assert!(
        !f.dom.grant_in_use(ind_ref) && !f.dom.grant_in_use(ro_ref),
        "leaked"
    );
    assert!(
        f.data_refs.iter().all(|g| !f.dom.grant_in_use(*g)),
        "leaked"
    );
}

#[test]
fn persistent_grants_are_capped_and_released() {
    let (_dir, _, mut f, mut p) = map_mode("pgnt");
    p.max_persistent_grants = 4;
    p.persistent_grant_timeout = Duration::from_millis(1500);
    p.unmap_grace = Duration::from_millis(300);
    let stats = Arc::clone(&p.stats);
    let q = spawn_queue(p).unwrap();
    // 11 distinct pages: 4 become persistent, 7 are mapped for the request only.
    fill(&f, 0, 11, 1);
    let answered = Instant::now();
    assert_eq!(f.rw(OP_WRITE, 1, 0, 0, 88), Some(Status::Okay));
    assert_eq!(stats.snapshot().persistent_grants, 4);
    let in_use = |f: &Front| {
        f.data_refs
            .iter()
            .filter(|g| f.dom.grant_in_use(**g))
            .count()
    };
    // The request's own mappings outlive its response by the grace (issue 21: the kernel
    // may still hold the pages when it reports the I/O complete), then go.
    assert_eq!(
        in_use(&f),
        11,
        "a completed request's mappings were unmapped at once"
    );
    // (The overflow also lets the next purge drop the least recently used cached grant.)
    let deadline = Instant::now() + Duration::from_secs(5);
    while in_use(&f) as u64 > stats.snapshot().persistent_grants {
        assert!(
            Instant::now() < deadline,
            "the request's mappings never went"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(answered.elapsed() >= Duration::from_millis(300));
    assert!(
        (3..=4).contains(&in_use(&f)),
        "only the persistent grants stay mapped"
    );
    // Aged out once unused for longer than the timeout.
    let deadline = Instant::now() + Duration::from_secs(5);
    while in_use(&f) > 0 {
        assert!(
            Instant::now() < deadline,
            "persistent grants never aged out"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(stats.snapshot().persistent_grants, 0);
    // A grant the frontend revoked: the request fails, nothing stays mapped.
    assert_eq!(f.rw(OP_READ, 2, 0, 0, 8), Some(Status::Okay));
    // The good page is mapped (and cached) before the bad one fails.
    let bad = [
        Segment {
            gref: f.page(3).1,
            first_sect: 0,
            last_sect: 7,
        },
        Segment {
            gref: 0xdead,
            first_sect: 0,
            last_sect: 7,
        },
    ];
    assert_eq!(f.direct(OP_READ, 3, 0, &bad), Some(Status::Error));
    assert_eq!(
        stats.snapshot().persistent_grants,
        in_use(&f) as u64,
        "what stays mapped is exactly the cache"
    );
    assert_stopped(q);
    assert_eq!(in_use(&f), 0, "no grant leaked after stop");
    assert!(
        f.shared.grefs.iter().all(|g| !f.dom.grant_in_use(*g)),
        "ring unmapped"
    );
}

/// A frontend that never lets a grant into the cache fills the retired list: past
/// `MAX_RETIRED` mappings waiting out their grace, a request that needs a new mapping waits
/// (counted in `oo_req`) until the oldest are unmapped.
#[test]
fn retired_mappings_are_bounded() {
    const GRACE: Duration = Duration::from_secs(4);
    let (_dir, _, mut f, mut p) = map_mode("retired");
    p.max_persistent_grants = 0;
    p.unmap_grace = GRACE;
    let stats = Arc::clone(&p.stats);
    let q = spawn_queue(p).unwrap();
    let t0 = Instant::now();
    for id in 0..super::retire::MAX_RETIRED as u64 {
        assert_eq!(f.rw(OP_READ, id, 0, 0, 8), Some(Status::Okay));
    }
    let filled = t0.elapsed();
    assert!(
        filled < GRACE,
        "1024 requests took {filled:?}: the first were unmapped already"
    );
    assert_eq!(stats.snapshot().oo_req, 0);
    assert!(
        f.dom.grant_in_use(f.page(0).1),
        "retired mappings are still mapped"
    );
    assert_eq!(f.rw(OP_READ, 9999, 0, 0, 8), Some(Status::Okay));
    assert!(
        t0.elapsed() >= GRACE,
        "the request past the bound did not wait"
    );
    assert_eq!(stats.snapshot().oo_req, 1);
    assert_stopped(q);
    assert!(!f.dom.grant_in_use(f.page(0).1), "leaked after stop");
}

#[test]
fn a_full_persistent_cache_is_purged_only_after_an_overflow() {
    let (_dir, _, mut f, mut p) = map_mode("pgfull");
    p.max_persistent_grants = 4;
    let stats = Arc::clone(&p.stats);
    let q = spawn_queue(p).unwrap();
    // The frontend's whole pool (4 pages) fits: mapped once, then only hits, however many
    // purge intervals pass (a full cache that never overflowed is left alone, as Linux's).
    assert_eq!(f.rw(OP_READ, 1, 0, 0, 32), Some(Status::Okay));
    let first = stats.snapshot();
    assert_eq!((first.map_calls, first.map_pages), (4, 4));
    for id in 2..6 {
        std::thread::sleep(super::persistent::LRU_INTERVAL * 2);
        assert_eq!(f.rw(OP_READ, id, 0, 0, 32), Some(Status::Okay));
    }
    let d = stats.snapshot().since(&first);
    assert_eq!(d.map_calls, 0, "the pool was remapped: {d:?}");
    assert_eq!(d.pgrant_hits, 16);
    assert_eq!(d.pgrant_purged, 0);
    // A fifth page finds no room (mapped for its request only): that overflow lets the
    // next purge drop the least recently used to make room.
    assert_eq!(f.rw(OP_READ, 6, 0, 0, 40), Some(Status::Okay));
    let deadline = Instant::now() + Duration::from_secs(5);
    while stats.snapshot().pgrant_purged == 0 {
        assert!(
            Instant::now() < deadline,
            "an overflowing cache was never purged"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_stopped(q);
}

#[test]
fn read_only_grants_serve_writes_and_fail_reads() {
    for mode in [GrantMode::Copy, GrantMode::Map] {
        let (_dir, img, mut f, p) = setup("rogrant", 1024, mode);
        let q = spawn_queue(p).unwrap();
        let frame = DATA0 + 500;
        let ro = f.dom.grant(0, frame, Access::ReadOnly).unwrap();
        f.dom.page(frame).unwrap().fill(0, PAGE_SIZE, 0x77).unwrap();
        let seg = [Segment {
            gref: ro,
            first_sect: 0,
            last_sect: 7,
        }];
        assert_eq!(
            f.direct(OP_WRITE, 1, 0, &seg),
            Some(Status::Okay),
            "{mode:?}: a write only reads the page"
        );
        assert!(std::fs::read(&img).unwrap()[..PAGE_SIZE]
            .iter()
            .all(|&b| b == 0x77));
        assert_eq!(
            f.direct(OP_READ, 2, 0, &seg),
            Some(Status::Error),
            "{mode:?}: a read must not write a read-only grant"
        );
        assert_eq!(f.rw(OP_READ, 3, 0, 0, 8), Some(Status::Okay));
        assert_stopped(q);
        assert!(!f.dom.grant_in_use(ro));
    }
}
