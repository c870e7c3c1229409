//! Data-plane tests: a simulated frontend (ring::FrontRing over the sim crate's guest memory,
//! grants and event channels) drives a real queue against real files.
//!
//! - `round_trip`: data in and out in both grant modes, indirect requests, flush, discard.
//! - `map_mode`: persistent grants, retirement, read-only grants.
//! - `device`: device errors, read-only and 4 KiB-sector devices, loop devices, ENOSPC,
//!   resize, queues sharing a device.
//! - `hostile`: broken rings, event storms, hostile slots, a dying frontend, stopping.
//! - `resume`: taking a ring over from a dead backend's in-flight log.
//! - `wake`: one trip to the kernel per pass: the event channel through the io_uring, one
//!   grant copy call and one notification at most.
//!
//! The harness here is shared with the unit tests of the pieces (`sim_guest`, `TempDir`).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ring::{Abi, FrontRequest, FrontRing, RawResponse, Segment, Status, OP_READ, OP_WRITE};
use shmem::PAGE_SIZE;
use sim::front::GuestRing;
use sim::{SimDomain, SimEventChannel, SimPlatform};
use xen::{Access, EventChannel, GrantRef};

use super::*;
use crate::device::{Device, DeviceOptions};

mod device;
mod hostile;
mod map_mode;
mod resume;
mod round_trip;
mod wake;

pub(super) const FRONT: xen::DomId = 7;
/// Guest pages: up to 16 ring pages, then data pages.
const GUEST_PAGES: usize = 16 + 600;
const DATA0: u32 = 16;

/// A scratch directory removed on drop.
pub(super) struct TempDir(pub(super) PathBuf);

impl TempDir {
    pub(super) fn new(tag: &str) -> Self {
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

/// Where most tests start: a scratch directory, an image of `sectors` sectors in it, a
/// frontend with a one-page x86_64 ring, and queue parameters for the image in `mode` (map
/// mode with persistent grants, as Linux's blkfront negotiates it).
fn setup(tag: &str, sectors: u64, mode: GrantMode) -> (TempDir, PathBuf, Front, QueueParams) {
    setup_ring(tag, sectors, mode, Abi::X86_64, 1)
}

/// [`setup`] with another ring ABI and size.
fn setup_ring(
    tag: &str,
    sectors: u64,
    mode: GrantMode,
    abi: Abi,
    ring_pages: usize,
) -> (TempDir, PathBuf, Front, QueueParams) {
    let (dir, img, f, mut p) =
        setup_device(tag, sectors, DeviceOptions::default(), abi, ring_pages);
    p.grant_mode = mode;
    p.persistent_grants = mode == GrantMode::Map;
    (dir, img, f, p)
}

/// The scratch directory, image and frontend of [`setup_ring`], the image opened with
/// `options`, and default (grant copy) queue parameters.
fn setup_device(
    tag: &str,
    sectors: u64,
    options: DeviceOptions,
    abi: Abi,
    ring_pages: usize,
) -> (TempDir, PathBuf, Front, QueueParams) {
    let dir = TempDir::new(tag);
    let img = image(&dir.0, sectors);
    let f = Front::new(&dir.0, abi, ring_pages);
    let p = f.params(&dir.0, open_with(&img, options));
    (dir, img, f, p)
}

/// The frontend side of one queue.
struct Front {
    dom: SimDomain,
    evt: SimEventChannel,
    /// The ring at frame 0, its grants and port.
    shared: GuestRing,
    /// Data frame -> grant ref (granted read-write to dom0).
    data_refs: Vec<GrantRef>,
}

impl Front {
    fn new(dir: &Path, abi: Abi, ring_pages: usize) -> Self {
        let dom = SimDomain::create(&dir.join("sim"), FRONT, GUEST_PAGES).unwrap();
        let mut evt = dom.open_event_channel().unwrap();
        let shared = GuestRing::create(&dom, &mut evt, 0, abi, 0, ring_pages).unwrap();
        let data_refs = (DATA0..GUEST_PAGES as u32)
            .map(|f| dom.grant(0, f, Access::ReadWrite).unwrap())
            .collect();
        Self {
            dom,
            evt,
            shared,
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
            self.shared.ring.abi(),
            self.shared.grefs.clone(),
            self.shared.port,
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
        let mem = ring_mem(&self.dom, &self.shared);
        self.shared.ring.queue_request(&mem, req).unwrap();
    }

    fn push(&mut self) {
        let mem = ring_mem(&self.dom, &self.shared);
        if self.shared.ring.push_requests(&mem).unwrap() {
            self.evt.notify(self.shared.port).unwrap();
        }
    }

    /// Waits for `n` responses.
    fn responses(&mut self, n: usize) -> Vec<RawResponse> {
        let mem = ring_mem(&self.dom, &self.shared);
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut out = Vec::new();
        while out.len() < n {
            while let Some(r) = self.shared.ring.next_response(&mem).unwrap() {
                out.push(r);
            }
            if out.len() >= n {
                break;
            }
            if !self.shared.ring.final_check_for_responses(&mem).unwrap() {
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

    fn discard(&mut self, id: u64, sector: u64, nr_sectors: u64, secure: bool) -> Option<Status> {
        self.one(&FrontRequest::Discard {
            id,
            sector,
            nr_sectors,
            secure,
        })
    }

    /// One direct request (`op`: read, write, ...) of `segs` at `sector`.
    fn direct(&mut self, op: u8, id: u64, sector: u64, segs: &[Segment]) -> Option<Status> {
        self.one(&FrontRequest::Direct {
            operation: op,
            id,
            sector,
            handle: 0,
            segs,
        })
    }

    /// Reads `nsect` sectors at `sector` into data pages from `first` on (8 sectors a page).
    fn rw(&mut self, op: u8, id: u64, sector: u64, first: usize, nsect: usize) -> Option<Status> {
        let segs = segs_for(self, first, nsect);
        self.direct(op, id, sector, &segs)
    }
}

/// The pages of `dom` that hold `ring`.
fn ring_mem<'a>(dom: &'a SimDomain, ring: &GuestRing) -> shmem::SharedMem<'a> {
    dom.mem()
        .subregion(0, ring.frames.len() * PAGE_SIZE)
        .unwrap()
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

/// Writes entry `i` of an indirect segment list in `page`: `gref`, sectors `first..=last`.
fn indirect_entry(page: &shmem::SharedMem<'_>, i: usize, gref: GrantRef, first: u8, last: u8) {
    let mut e = [0u8; 8];
    e[..4].copy_from_slice(&gref.to_le_bytes());
    e[4] = first;
    e[5] = last;
    page.write_from(i * 8, &e).unwrap();
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

/// Stops `q` and checks that it ended only because it was asked to.
fn assert_stopped(q: QueueHandle) {
    let exit = q.stop();
    assert!(matches!(exit, QueueExit::Stopped), "{exit:?}");
}

fn open(path: &Path) -> Arc<Device> {
    open_with(path, DeviceOptions::default())
}

fn open_with(path: &Path, options: DeviceOptions) -> Arc<Device> {
    Arc::new(Device::open(path, &options).unwrap())
}

/// A loop device over a file, detached on drop (set up with losetup: tests need root).
struct LoopDev(PathBuf);

impl LoopDev {
    /// `None` (the test is skipped, and says so) only when not root: as root, a loop device
    /// that cannot be set up fails the test.
    fn attach(file: &Path, sector_size: u32) -> Option<Self> {
        if !sim::skip::root_or_skip("loop devices") {
            return None;
        }
        let size = sector_size.to_string();
        let options = ["--direct-io=on", "--sector-size", &size];
        Some(Self(sim::losetup::attach(file, &options)))
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        sim::losetup::detach(&self.0);
    }
}

/// A simulated guest of `pages` pages (domain [`FRONT`]) under `dir`, and dom0's platform.
pub(super) fn sim_guest(dir: &Path, pages: usize) -> (SimDomain, Arc<dyn xen::Platform>) {
    let dom = SimDomain::create(&dir.join("sim"), FRONT, pages).unwrap();
    (dom, Front::platform(dir))
}
