//! Data-plane tests: a simulated frontend (ring::FrontRing over xen::sim's guest memory,
//! grants and event channels) drives a real queue against real files.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ring::{Abi, FrontRequest, FrontRing, RawResponse, Segment, Status, OP_READ, OP_WRITE};
use shmem::PAGE_SIZE;
use xen::sim::{SimDomain, SimEventChannel, SimPlatform};
use xen::{Access, EventChannel, GrantRef, Port};

use super::*;
use crate::device::{Device, DeviceOptions};

const FRONT: xen::DomId = 7;
/// Guest pages: up to 16 ring pages, then data pages.
const GUEST_PAGES: usize = 16 + 600;
const DATA0: u32 = 16;

/// A scratch directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "dp-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn image(dir: &Path, sectors: u64) -> PathBuf {
    let p = dir.join("disk.img");
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(sectors * 512).unwrap();
    p
}

/// The frontend side of one queue.
struct Front {
    dom: SimDomain,
    evt: SimEventChannel,
    port: Port,
    ring: FrontRing,
    ring_pages: usize,
    ring_refs: Vec<GrantRef>,
    /// Data frame -> grant ref (granted read-write to dom0).
    data_refs: Vec<GrantRef>,
}

impl Front {
    fn new(dir: &Path, abi: Abi, ring_pages: usize) -> Self {
        let dom = SimDomain::create(&dir.join("sim"), FRONT, GUEST_PAGES).unwrap();
        let mut evt = dom.open_event_channel().unwrap();
        let port = evt.alloc_unbound(0).unwrap();
        let ring_refs: Vec<GrantRef> = (0..ring_pages as u32)
            .map(|f| dom.grant(0, f, Access::ReadWrite).unwrap())
            .collect();
        let mem = dom.mem().subregion(0, ring_pages * PAGE_SIZE).unwrap();
        let ring = FrontRing::init(&mem, abi, ring_pages).unwrap();
        let data_refs = (DATA0..GUEST_PAGES as u32)
            .map(|f| dom.grant(0, f, Access::ReadWrite).unwrap())
            .collect();
        Self {
            dom,
            evt,
            port,
            ring,
            ring_pages,
            ring_refs,
            data_refs,
        }
    }

    fn platform(dir: &Path) -> Arc<dyn xen::Platform> {
        SimPlatform::open(&dir.join("sim"), 0)
            .unwrap()
            .into_platform()
    }

    fn params(&self, dir: &Path, device: Arc<Device>) -> QueueParams {
        let mut p = QueueParams::new(
            Self::platform(dir),
            FRONT,
            self.ring.abi(),
            self.ring_refs.clone(),
            self.port,
            device,
        );
        p.name = "test-q".into();
        p
    }

    /// Data page `i` (frame DATA0 + i) and its grant.
    fn page(&self, i: usize) -> (shmem::SharedMem<'_>, GrantRef) {
        (self.dom.page(DATA0 + i as u32).unwrap(), self.data_refs[i])
    }

    fn queue(&mut self, req: &FrontRequest<'_>) {
        let mem = self
            .dom
            .mem()
            .subregion(0, self.ring_pages * PAGE_SIZE)
            .unwrap();
        self.ring.queue_request(&mem, req).unwrap();
    }

    fn push(&mut self) {
        let mem = self
            .dom
            .mem()
            .subregion(0, self.ring_pages * PAGE_SIZE)
            .unwrap();
        if self.ring.push_requests(&mem).unwrap() {
            self.evt.notify(self.port).unwrap();
        }
    }

    /// Waits for `n` responses.
    fn responses(&mut self, n: usize) -> Vec<RawResponse> {
        let mem = self
            .dom
            .mem()
            .subregion(0, self.ring_pages * PAGE_SIZE)
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut out = Vec::new();
        while out.len() < n {
            while let Some(r) = self.ring.next_response(&mem).unwrap() {
                out.push(r);
            }
            if out.len() >= n {
                break;
            }
            if !self.ring.final_check_for_responses(&mem).unwrap() {
                assert!(
                    Instant::now() < deadline,
                    "timed out with {} of {n} responses",
                    out.len()
                );
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        out
    }

    fn one(&mut self, req: &FrontRequest<'_>) -> Option<Status> {
        self.queue(req);
        self.push();
        let r = self.responses(1);
        r[0].status()
    }

    /// Reads `nsect` sectors at `sector` into data pages from `first` on (8 sectors a page).
    fn rw(&mut self, op: u8, id: u64, sector: u64, first: usize, nsect: usize) -> Option<Status> {
        let segs = segs_for(self, first, nsect);
        self.one(&FrontRequest::Direct {
            operation: op,
            id,
            sector,
            handle: 0,
            segs: &segs,
        })
    }
}

fn segs_for(f: &Front, first: usize, nsect: usize) -> Vec<Segment> {
    (0..nsect.div_ceil(8))
        .map(|i| {
            let n = (nsect - i * 8).min(8);
            Segment {
                gref: f.page(first + i).1,
                first_sect: 0,
                last_sect: (n - 1) as u8,
            }
        })
        .collect()
}

fn fill(f: &Front, first: usize, pages: usize, seed: u8) {
    for i in 0..pages {
        let (m, _) = f.page(first + i);
        let bytes: Vec<u8> = (0..PAGE_SIZE)
            .map(|b| {
                (b as u8)
                    .wrapping_mul(31)
                    .wrapping_add(seed)
                    .wrapping_add(i as u8)
            })
            .collect();
        m.write_from(0, &bytes).unwrap();
    }
}

fn page_bytes(f: &Front, i: usize) -> Vec<u8> {
    let mut v = vec![0; PAGE_SIZE];
    f.page(i).0.read_into(0, &mut v).unwrap();
    v
}

fn open(path: &Path) -> Arc<Device> {
    Arc::new(Device::open(path, &DeviceOptions::default()).unwrap())
}

fn round_trip(mode: GrantMode, persistent: bool, abi: Abi, ring_pages: usize) {
    let dir = TempDir::new("rt");
    let img = image(&dir.0, 8192);
    let dev = open(&img);
    let mut f = Front::new(&dir.0, abi, ring_pages);
    let mut p = f.params(&dir.0, Arc::clone(&dev));
    p.grant_mode = mode;
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
    let n = f.ring.size() as usize;
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
    assert_eq!(q.stop(), QueueExit::Stopped);
    for g in f.ring_refs.iter().chain(&f.data_refs) {
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
    let dir = TempDir::new("ind");
    let img = image(&dir.0, 8192);
    let mut f = Front::new(&dir.0, Abi::X86_64, 1);
    let mut p = f.params(&dir.0, open(&img));
    p.grant_mode = mode;
    p.persistent_grants = mode == GrantMode::Map;
    let q = spawn_queue(p).unwrap();
    // 256 segments of one sector each, from data pages 1..=256; the segment list lives in
    // data page 0 (an indirect page).
    let ind_ref = f.page(0).1;
    let write_entry = |f: &Front, i: usize, gref: GrantRef, sect: u8| {
        let mut e = [0u8; 8];
        e[..4].copy_from_slice(&gref.to_le_bytes());
        e[4] = sect;
        e[5] = sect;
        f.page(0).0.write_from(i * 8, &e).unwrap();
    };
    for i in 0..256usize {
        write_entry(&f, i, f.page(1 + i).1, (i % 8) as u8);
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
        write_entry(&f, i, f.page(300 + i).1, 0);
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
    assert_eq!(q.stop(), QueueExit::Stopped);
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
fn indirect_pages_are_persistent_grants_in_map_mode() {
    let dir = TempDir::new("indpg");
    let img = image(&dir.0, 4096);
    let mut f = Front::new(&dir.0, Abi::X86_64, 1);
    let mut p = f.params(&dir.0, open(&img));
    p.grant_mode = GrantMode::Map;
    p.persistent_grants = true;
    let stats = Arc::clone(&p.stats);
    let q = spawn_queue(p).unwrap();
    // Two indirect pages listing 16 data pages (1..=16): data page 0 granted writable as
    // Linux's blkfront does with persistent grants, and a page granted read-only.
    let ro_frame = DATA0 + 500;
    let ro_ref = f.dom.grant(0, ro_frame, Access::ReadOnly).unwrap();
    let ind_ref = f.page(0).1;
    for i in 0..16usize {
        let mut e = [0u8; 8];
        e[..4].copy_from_slice(&f.page(1 + i).1.to_le_bytes());
        e[5] = 7;
        f.page(0).0.write_from(i * 8, &e).unwrap();
        f.dom.page(ro_frame).unwrap().write_from(i * 8, &e).unwrap();
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
    assert_eq!(q.stop(), QueueExit::Stopped);
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
fn flush_and_barrier() {
    let dir = TempDir::new("flush");
    let img = image(&dir.0, 1024);
    let mut f = Front::new(&dir.0, Abi::X86_64, 1);
    let p = f.params(&dir.0, open(&img));
    let stats = Arc::clone(&p.stats);
    let q = spawn_queue(p).unwrap();
    let flush = |id| FrontRequest::Direct {
        operation: ring::OP_FLUSH_DISKCACHE,
        id,
        sector: 0,
        handle: 0,
        segs: &[],
    };
    assert_eq!(f.one(&flush(1)), Some(Status::Okay));
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
    assert_eq!(f.one(&flush(3)), Some(Status::NotSupported));
    q.stop();
}

#[test]
fn discard_punches_a_hole() {
    let dir = TempDir::new("discard");
    let img = image(&dir.0, 4096);
    let dev = open(&img);
    assert!(dev.discard(), "this file system punches holes");
    let mut f = Front::new(&dir.0, Abi::X86_64, 1);
    let p = f.params(&dir.0, Arc::clone(&dev));
    let stats = Arc::clone(&p.stats);
    let q = spawn_queue(p).unwrap();
    fill(&f, 0, 11, 5);
    for k in 0..8u64 {
        assert_eq!(f.rw(OP_WRITE, k, k * 88, 0, 88), Some(Status::Okay));
    }
    let blocks = |p: &Path| std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(p).unwrap());
    let before = blocks(&img);
    assert!(before >= 8 * 88, "data written: {before} blocks");
    let st = f.one(&FrontRequest::Discard {
        id: 9,
        sector: 0,
        nr_sectors: 4096,
        secure: false,
    });
    assert_eq!(st, Some(Status::Okay));
    let after = blocks(&img);
    assert!(after < before / 2, "blocks {before} -> {after}");
    assert!(std::fs::read(&img).unwrap().iter().all(|&b| b == 0));
    // Secure discard is not offered for a file: the flag is ignored, as Linux does
    // (`discard_secure && flag`), and a plain discard is done.
    let st = f.one(&FrontRequest::Discard {
        id: 10,
        sector: 0,
        nr_sectors: 8,
        secure: true,
    });
    assert_eq!(st, Some(Status::Okay));
    // Past the end: refused.
    let st = f.one(&FrontRequest::Discard {
        id: 11,
        sector: 4090,
        nr_sectors: 8,
        secure: false,
    });
    assert_eq!(st, Some(Status::Error));
    assert_eq!(stats.snapshot().ds_req, 2);
    q.stop();
}

#[test]
fn device_error_fails_one_request_only() {
    let dir = TempDir::new("eio");
    let img = image(&dir.0, 2048);
    let dev = open(&img);
    let mut f = Front::new(&dir.0, Abi::X86_64, 1);
    let q = spawn_queue(f.params(&dir.0, dev)).unwrap();
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
    assert_eq!(q.stop(), QueueExit::Stopped);
}

#[test]
fn read_only_refuses_writes() {
    let dir = TempDir::new("ro");
    let img = image(&dir.0, 1024);
    let dev = Arc::new(
        Device::open(
            &img,
            &DeviceOptions {
                read_only: true,
                ..DeviceOptions::default()
            },
        )
        .unwrap(),
    );
    let mut f = Front::new(&dir.0, Abi::X86_64, 1);
    let q = spawn_queue(f.params(&dir.0, dev)).unwrap();
    assert_eq!(f.rw(OP_WRITE, 1, 0, 0, 8), Some(Status::Error));
    assert_eq!(f.rw(OP_READ, 2, 0, 0, 8), Some(Status::Okay));
    q.stop();
}

#[test]
fn logical_block_size_4096() {
    let dir = TempDir::new("4k");
    let img = image(&dir.0, 1024);
    let dev = Arc::new(
        Device::open(
            &img,
            &DeviceOptions {
                logical_block_size: Some(4096),
                ..DeviceOptions::default()
            },
        )
        .unwrap(),
    );
    assert_eq!(dev.logical_block_size(), 4096);
    let mut f = Front::new(&dir.0, Abi::X86_64, 1);
    let q = spawn_queue(f.params(&dir.0, dev)).unwrap();
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
    let st = f.one(&FrontRequest::Direct {
        operation: OP_READ,
        id: 5,
        sector: 8,
        handle: 0,
        segs: &seg,
    });
    assert_eq!(st, Some(Status::Error));
    q.stop();
}

#[test]
fn persistent_grants_are_capped_and_released() {
    let dir = TempDir::new("pgnt");
    let img = image(&dir.0, 4096);
    let mut f = Front::new(&dir.0, Abi::X86_64, 1);
    let mut p = f.params(&dir.0, open(&img));
    p.grant_mode = GrantMode::Map;
    p.persistent_grants = true;
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
    let st = f.one(&FrontRequest::Direct {
        operation: OP_READ,
        id: 3,
        sector: 0,
        handle: 0,
        segs: &bad,
    });
    assert_eq!(st, Some(Status::Error));
    assert_eq!(
        stats.snapshot().persistent_grants,
        in_use(&f) as u64,
        "what stays mapped is exactly the cache"
    );
    assert_eq!(q.stop(), QueueExit::Stopped);
    assert_eq!(in_use(&f), 0, "no grant leaked after stop");
    assert!(
        f.ring_refs.iter().all(|g| !f.dom.grant_in_use(*g)),
        "ring unmapped"
    );
}

/// A frontend that never lets a grant into the cache fills the retired list: past
/// `MAX_RETIRED` mappings waiting out their grace, a request that needs a new mapping waits
/// (counted in `oo_req`) until the oldest are unmapped.
#[test]
fn retired_mappings_are_bounded() {
    const GRACE: Duration = Duration::from_secs(4);
    let dir = TempDir::new("retired");
    let img = image(&dir.0, 4096);
    let mut f = Front::new(&dir.0, Abi::X86_64, 1);
    let mut p = f.params(&dir.0, open(&img));
    p.grant_mode = GrantMode::Map;
    p.persistent_grants = true;
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
    assert_eq!(q.stop(), QueueExit::Stopped);
    assert!(!f.dom.grant_in_use(f.page(0).1), "leaked after stop");
}

#[test]
fn a_full_persistent_cache_is_purged_only_after_an_overflow() {
    let dir = TempDir::new("pgfull");
    let img = image(&dir.0, 4096);
    let mut f = Front::new(&dir.0, Abi::X86_64, 1);
    let mut p = f.params(&dir.0, open(&img));
    p.grant_mode = GrantMode::Map;
    p.persistent_grants = true;
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
    assert_eq!(q.stop(), QueueExit::Stopped);
}

#[test]
fn grant_failure_fails_the_request_in_copy_mode() {
    let dir = TempDir::new("gfail");
    let img = image(&dir.0, 1024);
    let mut f = Front::new(&dir.0, Abi::X86_64, 1);
    let q = spawn_queue(f.params(&dir.0, open(&img))).unwrap();
    let bad = [Segment {
        gref: 0xdead,
        first_sect: 0,
        last_sect: 7,
    }];
    for op in [OP_READ, OP_WRITE] {
        let st = f.one(&FrontRequest::Direct {
            operation: op,
            id: 3,
            sector: 0,
            handle: 0,
            segs: &bad,
        });
        assert_eq!(st, Some(Status::Error));
    }
    assert_eq!(f.rw(OP_READ, 4, 0, 0, 8), Some(Status::Okay));
    q.stop();
}

#[test]
fn bogus_producer_halts_the_queue() {
    let dir = TempDir::new("bogus");
    let img = image(&dir.0, 1024);
    let mut f = Front::new(&dir.0, Abi::X86_64, 1);
    let exited = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut p = f.params(&dir.0, open(&img));
    let e2 = Arc::clone(&exited);
    // When told, the ring is already unmapped.
    let dom2 = SimDomain::open(&dir.0.join("sim"), FRONT).unwrap();
    let ring_ref = f.ring_refs[0];
    p.on_exit = Some(Box::new(move || {
        assert!(!dom2.grant_in_use(ring_ref));
        e2.store(true, Ordering::SeqCst);
    }));
    let q = spawn_queue(p).unwrap();
    assert_eq!(f.rw(OP_READ, 1, 0, 0, 8), Some(Status::Okay));
    let mem = f.dom.mem();
    mem.store_u32(ring::REQ_PROD, 1 + 1000, Ordering::SeqCst)
        .unwrap();
    f.evt.notify(f.port).unwrap();
    let exit = q.wait();
    assert!(matches!(exit, QueueExit::Protocol(_)), "{exit:?}");
    assert!(exited.load(Ordering::SeqCst));
    assert!(
        f.ring_refs.iter().all(|g| !f.dom.grant_in_use(*g)),
        "ring unmapped"
    );
}

#[test]
fn event_storm_is_throttled() {
    let dir = TempDir::new("storm");
    let img = image(&dir.0, 1024);
    let mut f = Front::new(&dir.0, Abi::X86_64, 1);
    let p = f.params(&dir.0, open(&img));
    let stats = Arc::clone(&p.stats);
    let q = spawn_queue(p).unwrap();
    assert_eq!(f.rw(OP_READ, 1, 0, 0, 8), Some(Status::Okay));
    let start = stats.snapshot().events;
    let t = Instant::now();
    let mut sent = 0u64;
    while t.elapsed() < Duration::from_millis(600) {
        f.evt.notify(f.port).unwrap();
        sent += 1;
    }
    let s = stats.snapshot();
    let woken = s.events - start;
    // Without throttling every notification after an unmask wakes the queue; with late EOI
    // the delays double (1, 2, 4, ... ms), so 600 ms hold at most about a dozen wake-ups.
    assert!(sent > 1000, "storm too weak: {sent}");
    assert!(woken <= 20, "{woken} wake-ups for {sent} events");
    assert!(s.spurious_events >= woken.saturating_sub(1));
    // Real requests are still served (after at most the current delay).
    assert_eq!(f.rw(OP_READ, 2, 0, 0, 8), Some(Status::Okay));
    q.stop();
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// A loop device over a file, detached on drop (set up with losetup: tests need root).
struct LoopDev(PathBuf);

impl LoopDev {
    /// `None` (the test is skipped, and says so) only when not root: as root, a loop device
    /// that cannot be set up fails the test.
    fn attach(file: &Path, sector_size: u32) -> Option<Self> {
        if !is_root() {
            eprintln!("skipped: loop devices need root");
            return None;
        }
        let out = std::process::Command::new("losetup")
            .args([
                "--find",
                "--show",
                "--direct-io=on",
                "--sector-size",
                &sector_size.to_string(),
            ])
            .arg(file)
            .output()
            .expect("running losetup");
        assert!(
            out.status.success(),
            "losetup failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some(Self(PathBuf::from(
            String::from_utf8_lossy(&out.stdout).trim(),
        )))
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .arg("-d")
            .arg(&self.0)
            .status();
    }
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
    let flush = FrontRequest::Direct {
        operation: ring::OP_FLUSH_DISKCACHE,
        id: 4,
        sector: 0,
        handle: 0,
        segs: &[],
    };
    assert_eq!(f.one(&flush), Some(Status::Okay));
    let on_disk = std::fs::read(&backing).unwrap();
    assert_eq!(&on_disk[64 * 512..][..PAGE_SIZE], &page_bytes(&f, 0)[..]);
    // Discard through the block layer: the loop driver punches the backing file.
    let blocks = || std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&backing).unwrap());
    let before = blocks();
    let st = f.one(&FrontRequest::Discard {
        id: 5,
        sector: 0,
        nr_sectors: 8192,
        secure: false,
    });
    assert_eq!(st, Some(Status::Okay));
    assert!(
        blocks() < before / 2,
        "discard reached the backing file: {before} -> {}",
        blocks()
    );
    assert_eq!(q.stop(), QueueExit::Stopped);
}

#[test]
fn enospc_fails_one_request_only() {
    if !is_root() {
        eprintln!("skipped: mounting a small tmpfs needs root");
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
    assert_eq!(q.stop(), QueueExit::Stopped);
}

#[test]
fn stop_answers_requests_in_flight_and_releases_everything() {
    for mode in [GrantMode::Copy, GrantMode::Map] {
        let dir = TempDir::new("stop");
        let img = image(&dir.0, 65536);
        let mut f = Front::new(&dir.0, Abi::X86_64, 4);
        let mut p = f.params(&dir.0, open(&img));
        p.grant_mode = mode;
        p.persistent_grants = true;
        let q = spawn_queue(p).unwrap();
        let n = f.ring.size() as usize;
        for k in 0..n {
            let segs: Vec<Segment> = (0..11)
                .map(|i| Segment {
                    gref: f.page((k * 11 + i) % 500).1,
                    first_sect: 0,
                    last_sect: 7,
                })
                .collect();
            let op = if k % 2 == 0 { OP_READ } else { OP_WRITE };
            f.queue(&FrontRequest::Direct {
                operation: op,
                id: k as u64,
                sector: (k * 88) as u64,
                handle: 0,
                segs: &segs,
            });
        }
        f.push();
        // Stop while they are being served: whatever was taken off the ring is answered.
        assert_eq!(q.stop(), QueueExit::Stopped);
        let mem = f.dom.mem().subregion(0, f.ring_pages * PAGE_SIZE).unwrap();
        let mut answered = 0;
        while let Some(r) = f.ring.next_response(&mem).unwrap() {
            assert_eq!(r.status(), Some(Status::Okay));
            answered += 1;
        }
        let req_cons_bound = mem.load_u32(ring::RSP_PROD, Ordering::SeqCst).unwrap();
        assert_eq!(
            answered, req_cons_bound as usize,
            "every response published"
        );
        for g in f.ring_refs.iter().chain(&f.data_refs) {
            assert!(
                !f.dom.grant_in_use(*g),
                "{mode:?}: grant {g} still mapped after stop"
            );
        }
    }
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
    assert_eq!(q0.stop(), QueueExit::Stopped);
    assert_eq!(q1.stop(), QueueExit::Stopped);
    // One set of counters for the device: both queues added to it.
    let s = stats.snapshot();
    assert_eq!((s.rd_req, s.wr_req, s.in_flight), (1, 1, 0));
}

#[test]
fn resize_is_seen_by_running_queues() {
    let dir = TempDir::new("resize");
    let img = image(&dir.0, 1024);
    let dev = open(&img);
    let mut f = Front::new(&dir.0, Abi::X86_64, 1);
    let q = spawn_queue(f.params(&dir.0, Arc::clone(&dev))).unwrap();
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

#[test]
fn read_only_grants_serve_writes_and_fail_reads() {
    for mode in [GrantMode::Copy, GrantMode::Map] {
        let dir = TempDir::new("rogrant");
        let img = image(&dir.0, 1024);
        let mut f = Front::new(&dir.0, Abi::X86_64, 1);
        let mut p = f.params(&dir.0, open(&img));
        p.grant_mode = mode;
        p.persistent_grants = mode == GrantMode::Map;
        let q = spawn_queue(p).unwrap();
        let frame = DATA0 + 500;
        let ro = f.dom.grant(0, frame, Access::ReadOnly).unwrap();
        f.dom.page(frame).unwrap().fill(0, PAGE_SIZE, 0x77).unwrap();
        let seg = [Segment {
            gref: ro,
            first_sect: 0,
            last_sect: 7,
        }];
        let w = FrontRequest::Direct {
            operation: OP_WRITE,
            id: 1,
            sector: 0,
            handle: 0,
            segs: &seg,
        };
        assert_eq!(
            f.one(&w),
            Some(Status::Okay),
            "{mode:?}: a write only reads the page"
        );
        assert!(std::fs::read(&img).unwrap()[..PAGE_SIZE]
            .iter()
            .all(|&b| b == 0x77));
        let r = FrontRequest::Direct {
            operation: OP_READ,
            id: 2,
            sector: 0,
            handle: 0,
            segs: &seg,
        };
        assert_eq!(
            f.one(&r),
            Some(Status::Error),
            "{mode:?}: a read must not write a read-only grant"
        );
        assert_eq!(f.rw(OP_READ, 3, 0, 0, 8), Some(Status::Okay));
        assert_eq!(q.stop(), QueueExit::Stopped);
        assert!(!f.dom.grant_in_use(ro));
    }
}

#[test]
fn frontend_domain_dying_under_the_queue() {
    let dir = TempDir::new("die");
    let img = image(&dir.0, 1024);
    let mut f = Front::new(&dir.0, Abi::X86_64, 1);
    let mut p = f.params(&dir.0, open(&img));
    p.grant_mode = GrantMode::Map;
    p.persistent_grants = true;
    let q = spawn_queue(p).unwrap();
    assert_eq!(f.rw(OP_READ, 1, 0, 0, 8), Some(Status::Okay));
    // Requests pushed, then the domain is destroyed (its port closes, grants go bad).
    f.queue(&FrontRequest::Direct {
        operation: OP_READ,
        id: 2,
        sector: 0,
        handle: 0,
        segs: &segs_for(&f, 1, 8),
    });
    f.push();
    let Front { dom, evt, .. } = f;
    drop(evt);
    dom.destroy().unwrap();
    // The queue still stops cleanly, releasing its mappings.
    let exit = q.stop();
    assert!(
        matches!(exit, QueueExit::Stopped | QueueExit::Failed(_)),
        "{exit:?}"
    );
}

/// A frontend sending random slots (operation codes biased towards real ones, grant refs
/// good, bad and read-only, sectors near and past the end): every request gets exactly one
/// response, the queue stays up, and nothing stays mapped after stop.
#[test]
fn hostile_slots_are_all_answered_and_nothing_leaks() {
    for (mode, persistent, abi) in [
        (GrantMode::Copy, false, Abi::X86_64),
        (GrantMode::Map, true, Abi::X86_32),
        (GrantMode::Map, false, Abi::X86_64),
    ] {
        let dir = TempDir::new("hostile");
        let img = image(&dir.0, 4096);
        let mut f = Front::new(&dir.0, abi, 2);
        let mut p = f.params(&dir.0, open(&img));
        p.grant_mode = mode;
        p.persistent_grants = persistent;
        p.max_persistent_grants = 16;
        let q = spawn_queue(p).unwrap();
        let ro = f.dom.grant(0, DATA0 + 599, Access::ReadOnly).unwrap();
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let size = abi.request_size();
        let mut sent = 0usize;
        let mut answered = 0usize;
        let (mut okay, mut refused) = (0usize, 0usize);
        for _round in 0..60 {
            let n = 1 + (rnd() % u64::from(f.ring.free_slots())) as usize;
            for _ in 0..n {
                let mut b: Vec<u8> = (0..size).map(|_| rnd() as u8).collect();
                b[0] = [0u8, 1, 2, 3, 5, 6, 4, 0xff][(rnd() % 8) as usize];
                if rnd() % 2 == 0 {
                    b[1] = (rnd() % 12) as u8; // plausible segment count
                }
                // Segments: mostly real grants, sometimes bad or read-only ones.
                let seg0 = if abi == Abi::X86_64 { 24 } else { 20 };
                for s in 0..11 {
                    let at = seg0 + s * 8;
                    let gref = match rnd() % 6 {
                        0 => 0xdead,
                        1 => ro,
                        _ => f.page((rnd() % 500) as usize).1,
                    };
                    b[at..at + 4].copy_from_slice(&gref.to_le_bytes());
                    let first = (rnd() % 8) as u8;
                    b[at + 4] = first;
                    b[at + 5] = first + (rnd() % u64::from(8 - first)) as u8;
                }
                // Sectors: mostly inside the disk.
                let sector_at = if abi == Abi::X86_64 { 16 } else { 12 };
                if rnd() % 4 != 0 {
                    b[sector_at..sector_at + 8].copy_from_slice(&(rnd() % 4200).to_le_bytes());
                }
                if b[0] == ring::OP_INDIRECT && rnd() % 2 == 0 {
                    // A plausible indirect request: its segment list in page 598, some
                    // entries good, some bad.
                    let (list, list_ref) = f.page(598);
                    for i in 0..300usize {
                        let gref = if rnd() % 10 == 0 {
                            0xbeef
                        } else {
                            f.page((rnd() % 500) as usize).1
                        };
                        let first = (rnd() % 8) as u8;
                        let last = if rnd() % 20 == 0 {
                            9
                        } else {
                            first + (rnd() % u64::from(8 - first)) as u8
                        };
                        let mut e = [0u8; 8];
                        e[..4].copy_from_slice(&gref.to_le_bytes());
                        e[4] = first;
                        e[5] = last;
                        list.write_from(i * 8, &e).unwrap();
                    }
                    let (nseg_at, grefs_at) = if abi == Abi::X86_64 { (2, 28) } else { (2, 24) };
                    b[1] = (rnd() % 2) as u8;
                    let nseg = 1 + (rnd() % 300) as u16;
                    b[nseg_at..nseg_at + 2].copy_from_slice(&nseg.to_le_bytes());
                    b[grefs_at..grefs_at + 4].copy_from_slice(&list_ref.to_le_bytes());
                }
                let mem = f.dom.mem().subregion(0, f.ring_pages * PAGE_SIZE).unwrap();
                f.ring.queue_raw(&mem, &b).unwrap();
                sent += 1;
            }
            f.push();
            for r in f.responses(n) {
                answered += 1;
                match r.status() {
                    Some(Status::Okay) => okay += 1,
                    Some(_) => refused += 1,
                    None => panic!("{mode:?}: undefined status {}", r.status),
                }
            }
            assert!(!q.is_finished(), "{mode:?}: queue died");
        }
        assert_eq!(answered, sent);
        assert!(
            okay > sent / 20 && refused > sent / 20,
            "{mode:?}: {okay} served, {refused} refused of {sent}"
        );
        assert_eq!(
            f.rw(OP_READ, 1, 0, 0, 8),
            Some(Status::Okay),
            "{mode:?}: still serving"
        );
        assert_eq!(q.stop(), QueueExit::Stopped);
        for g in f.ring_refs.iter().chain(&f.data_refs).chain([&ro]) {
            assert!(!f.dom.grant_in_use(*g), "{mode:?}: grant {g} leaked");
        }
    }
}

#[test]
fn large_requests_wait_for_bounce_regions() {
    let dir = TempDir::new("oo");
    let img = image(&dir.0, 65536);
    let mut f = Front::new(&dir.0, Abi::X86_64, 1);
    let p = f.params(&dir.0, open(&img));
    let stats = Arc::clone(&p.stats);
    let q = spawn_queue(p).unwrap();
    // 20 indirect reads of 64 full pages each (256 KiB, more than a direct region), at once:
    // more than the 8 large bounce regions, so some wait for others to finish.
    for k in 0..20usize {
        let (list, list_ref) = f.page(k);
        for i in 0..64usize {
            let mut e = [0u8; 8];
            e[..4].copy_from_slice(&f.page(100 + i).1.to_le_bytes());
            e[5] = 7;
            list.write_from(i * 8, &e).unwrap();
        }
        f.queue(&FrontRequest::Indirect {
            indirect_op: OP_READ,
            id: k as u64,
            sector: (k * 512) as u64,
            handle: 0,
            nr_segments: 64,
            page_grefs: &[list_ref],
        });
    }
    f.push();
    let rs = f.responses(20);
    assert!(
        rs.iter().all(|r| r.status() == Some(Status::Okay)),
        "{rs:?}"
    );
    let s = stats.snapshot();
    assert_eq!(s.rd_req, 20);
    assert!(s.oo_req >= 1, "some request waited: {s:?}");
    q.stop();
}
