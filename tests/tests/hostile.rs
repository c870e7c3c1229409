//! A hostile guest against the real, confined `blkbackd serve` on the simulated platform.
//!
//! Each step is one hostile action, chosen at random (seeded, so a failure repeats with its
//! seed):
//! - random slot bytes, and structured requests with random operations, segment counts,
//!   sectors, sector ranges and grant refs (the guest's own read-write and read-only grants,
//!   refs never granted, refs of pages granted to nobody, ref 0, huge refs);
//! - indirect requests whose indirect pages hold random or structured segments, rewritten by
//!   a second thread while the backend reads them;
//! - grants revoked right after the request is pushed (mid-request);
//! - event storms (many one-slot pushes, each with a notification);
//! - a bogus `req_prod` (the ring must halt, the device stay usable after a reconnect);
//! - reconnects with hostile XenStore values (`ring-ref`, `event-channel`, `protocol`,
//!   `ring-page-order`, `multi-queue-num-queues`: out of range, non-numeric, huge) and
//!   frontend states out of order.
//!
//! After each step: the backend is alive (no panic, no seccomp kill), every request is
//! answered within a bounded time unless the step broke the ring on purpose. Every few steps
//! and at the end, after a disconnect: no grant held, the backend's fds and running threads
//! back to their count before (threads the backend joined may still be finishing their exit
//! in the kernel; they must be gone within a bound), its anonymous memory under the
//! documented bound, and the guest pages granted to nobody or read-only still hold exactly
//! what the guest wrote (no access outside granted pages). A clean write and read-back must
//! still work after everything.
//!
//! Not here: rewriting ring slots while the backend copies them (the ring crate's copy-once
//! tests run a concurrent rewriter against the parser), and response padding (the ring crate
//! writes responses field by field and its tests check that no padding byte is written,
//! XSA-216). A frontend state of 0 or a non-number reads as Unknown and removes the device, as
//! in Linux; the guest only ends its own disk, so the fuzzer does not count it as a finding.
//!
//! The bounded run is part of `cargo test`. A longer run:
//! `HOSTILE_STEPS=20000 HOSTILE_SEED=$RANDOM cargo test --release -p tests --test hostile -- --nocapture`
//! (it prints the steps and requests executed).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sim::front::{FrontOptions, SimFront, SimFrontError};
use sim::toolstack::VbdSpec;
use sim::workload::Rng;
use sim::SimDomain;
use tests::{Backend, Sim, DEVID, GUEST};
use xen::xenbus::XenbusState;
use xen::{Access, GrantRef};

/// Guest pages: SimFront takes data frames from 1 upwards and ring frames from the top; the
/// fuzzer uses frames in between.
const GUEST_PAGES: u32 = 8192;
/// Frames the fuzzer grants read-write (data and indirect pages).
const RW_FRAMES: std::ops::Range<u32> = 6144..6272;
/// Frames granted read-only, holding a known pattern the backend must never change.
const RO_FRAMES: std::ops::Range<u32> = 6272..6400;
/// Frames granted to nobody, holding a known pattern.
const CANARY_FRAMES: std::ops::Range<u32> = 6400..6656;
/// x86_64 request slot size.
const SLOT: usize = 112;
/// How long one step's requests may take to be answered.
const STEP_BOUND: Duration = Duration::from_secs(10);
/// How long after a disconnect the backend's fds and running threads may take to be back to
/// their count before.
const SETTLE_BOUND: Duration = Duration::from_secs(5);
/// How long a joined thread may take to finish its exit in the kernel and leave /proc: it
/// waits for a kworker there (see `check_disconnected`), which on a loaded machine was seen
/// to take more than 5 s.
const EXIT_BOUND: Duration = Duration::from_secs(60);

fn pattern(frame: u32) -> Vec<u8> {
    (0..shmem::PAGE_SIZE)
        .map(|i| (frame as usize * 31 + i * 7) as u8)
        .collect()
}

/// Counts of what ran.
#[derive(Debug, Default)]
struct Tally {
    steps: u64,
    requests: u64,
    answered: u64,
    ring_breaks: u64,
    xenstore_cases: u64,
    revocations: u64,
    max_rss_kib: u64,
    /// Random grant refs that were the frontend's own rings, replaced by ref 0.
    ring_refs_avoided: u64,
    /// Disconnects after which a joined thread was still finishing its exit.
    exiting_seen: u64,
    /// The longest such a thread was still listed, and the threads seen exiting then.
    longest_exit: (Duration, Vec<Thread>),
}

struct Fuzz {
    rng: Rng,
    sim: Sim,
    spec: VbdSpec,
    backend: Backend,
    front: SimFront,
    rw: Vec<(u32, GrantRef)>,
    /// The grant refs of the frontend's own ring pages, which hostile requests do not name
    /// (see [`ring_refs`]).
    ring_refs: Vec<GrantRef>,
    ro: Vec<(u32, GrantRef)>,
    next_id: u64,
    tally: Tally,
    baseline: Option<(usize, usize)>,
    baseline_fds: Vec<String>,
    memory_bound_kib: u64,
    rewriting: Arc<AtomicBool>,
    stop_rewriter: Arc<AtomicBool>,
    rewriter: Option<std::thread::JoinHandle<()>>,
}

fn options() -> FrontOptions {
    FrontOptions {
        guest_pages: GUEST_PAGES as usize,
        ..FrontOptions::default()
    }
}

impl Fuzz {
    fn new(tag: &str, seed: u64, args: &[&str]) -> Self {
        let sim = Sim::new(tag);
        let image = sim.image("disk.img", 16);
        let spec = VbdSpec::disk(0, GUEST, DEVID, image.to_str().unwrap());
        sim.create_vbd(&spec);
        let mut all = vec!["--open-params", "--max-queues", "2"];
        all.extend_from_slice(args);
        let backend = Backend::serve(&sim, &spec, &all);
        let mut front = sim.front(options());
        front.set_timeout(STEP_BOUND);
        front.connect().expect("handshake");
        let dom = front.domain();
        for f in CANARY_FRAMES.chain(RO_FRAMES) {
            dom.page(f).unwrap().write_from(0, &pattern(f)).unwrap();
        }
        let rw = RW_FRAMES
            .map(|f| (f, dom.grant(0, f, Access::ReadWrite).unwrap()))
            .collect();
        let ro = RO_FRAMES
            .map(|f| (f, dom.grant(0, f, Access::ReadOnly).unwrap()))
            .collect();
        // Copy mode: per queue, 11 pages per slot (a 4-page ring: 128 slots) and 8 indirect
        // regions of 256 pages; map mode needs far less. Plus 24 MiB for code, stacks, heap.
        let copy = args.windows(2).any(|w| w == ["--grant-mode", "copy"]);
        let per_queue_kib = if copy { 128 * 44 + 8 * 1024 } else { 2048 };
        let rewriting = Arc::new(AtomicBool::new(false));
        let stop_rewriter = Arc::new(AtomicBool::new(false));
        let rewriter = {
            let dir = sim.dir().to_owned();
            let (on, stop) = (Arc::clone(&rewriting), Arc::clone(&stop_rewriter));
            let seed2 = seed ^ 0x5555;
            Some(std::thread::spawn(move || {
                rewrite_pages(&dir, &on, &stop, seed2)
            }))
        };
        Self {
            rng: Rng::new(seed),
            sim,
            spec,
            backend,
            front,
            rw,
            ring_refs: Vec::new(),
            ro,
            next_id: 1 << 40,
            tally: Tally::default(),
            baseline: None,
            baseline_fds: Vec::new(),
            memory_bound_kib: 2 * per_queue_kib + 24 * 1024,
            rewriting,
            stop_rewriter,
            rewriter,
        }
    }

    fn below(&mut self, n: u64) -> u64 {
        self.rng.next_u64() % n.max(1)
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    /// A grant ref, mostly plausible, sometimes not; never one of the frontend's rings.
    fn gref(&mut self) -> u32 {
        let g = self.any_gref();
        if self.ring_refs.contains(&g) {
            self.tally.ring_refs_avoided += 1;
            0
        } else {
            g
        }
    }

    fn any_gref(&mut self) -> u32 {
        match self.below(10) {
            0..=4 => {
                let i = self.below(self.rw.len() as u64) as usize;
                self.rw[i].1
            }
            5 | 6 => {
                let i = self.below(self.ro.len() as u64) as usize;
                self.ro[i].1
            }
            7 => 0,
            8 => self.rng.next_u64() as u32,
            _ => (self.below(u64::from(sim::DEFAULT_GRANT_ENTRIES) + 64)) as u32,
        }
    }

    fn segment(&mut self, out: &mut [u8]) {
        let gref = self.gref();
        out[..4].copy_from_slice(&gref.to_le_bytes());
        let (first, last) = if self.chance(85) {
            let f = self.below(8) as u8;
            (f, f + self.below(u64::from(8 - f)) as u8)
        } else {
            (self.rng.next_u64() as u8, self.rng.next_u64() as u8)
        };
        out[4] = first;
        out[5] = last;
        out[6..8].copy_from_slice(&(self.rng.next_u64() as u16).to_le_bytes());
    }

    fn sector(&mut self) -> u64 {
        match self.below(6) {
            0 => u64::MAX - self.below(1024),
            1 => 32768 - self.below(64),
            2 => 1u64 << (40 + self.below(24)),
            _ => self.below(32768),
        }
    }

    /// One hostile request's slot bytes, with its id.
    fn request(&mut self) -> (u64, u8, [u8; SLOT]) {
        let mut b = [0u8; SLOT];
        for chunk in b.chunks_mut(8) {
            let r = self.rng.next_u64().to_le_bytes();
            chunk.copy_from_slice(&r[..chunk.len()]);
        }
        let id = self.next_id;
        self.next_id += 1;
        let op = match self.below(10) {
            0 => self.rng.next_u64() as u8,
            1 | 2 => 0,
            3 | 4 => 1,
            5 => 2,
            6 => 3,
            7 => 5,
            _ => 6,
        };
        b[0] = op;
        if self.chance(90) {
            match op {
                0..=3 => {
                    b[1] = if self.chance(90) {
                        self.below(12) as u8
                    } else {
                        self.rng.next_u64() as u8
                    };
                    let sector = self.sector();
                    b[16..24].copy_from_slice(&sector.to_le_bytes());
                    for s in 0..11 {
                        let mut seg = [0u8; 8];
                        self.segment(&mut seg);
                        b[24 + s * 8..32 + s * 8].copy_from_slice(&seg);
                    }
                }
                5 => {
                    let sector = self.sector();
                    b[16..24].copy_from_slice(&sector.to_le_bytes());
                    let n = if self.chance(80) {
                        self.below(4096)
                    } else {
                        self.rng.next_u64()
                    };
                    b[24..32].copy_from_slice(&n.to_le_bytes());
                }
                6 => {
                    b[1] = if self.chance(80) {
                        self.below(2) as u8
                    } else {
                        self.rng.next_u64() as u8
                    };
                    let n = if self.chance(85) {
                        self.below(300)
                    } else {
                        self.rng.next_u64() & 0xffff
                    };
                    b[2..4].copy_from_slice(&(n as u16).to_le_bytes());
                    let sector = self.sector();
                    b[16..24].copy_from_slice(&sector.to_le_bytes());
                    for i in 0..8 {
                        let gref = self.indirect_page();
                        b[28 + i * 4..32 + i * 4].copy_from_slice(&gref.to_le_bytes());
                    }
                }
                _ => {}
            }
        }
        b[8..16].copy_from_slice(&id.to_le_bytes());
        (id, op, b)
    }

    /// A read-write page filled with structured or random segments, as an indirect page.
    fn indirect_page(&mut self) -> u32 {
        if self.chance(10) {
            return self.gref();
        }
        let i = self.below(self.rw.len() as u64) as usize;
        let (frame, gref) = self.rw[i];
        let mut page = vec![0u8; shmem::PAGE_SIZE];
        let structured = self.chance(80);
        for seg in page.chunks_mut(8) {
            if structured {
                self.segment(seg);
            } else {
                seg.copy_from_slice(&self.rng.next_u64().to_le_bytes());
            }
        }
        let _ = self
            .front
            .domain()
            .page(frame)
            .unwrap()
            .write_from(0, &page);
        gref
    }

    fn alive(&mut self, what: &str) {
        assert!(
            self.backend.running(),
            "the backend died after {what} (seed step {})",
            self.tally.steps
        );
    }

    /// Waits until every submitted request is answered.
    fn drain(&mut self, what: &str) {
        let deadline = Instant::now() + STEP_BOUND;
        while self.front.in_flight() > 0 {
            match self.front.wait() {
                Ok(_) => self.tally.answered += 1,
                Err(e) => panic!("{what}: {e} (step {})", self.tally.steps),
            }
            assert!(
                Instant::now() < deadline,
                "{what}: requests not answered in time"
            );
        }
    }

    fn submit_raw(&mut self, queue: usize) -> Result<(), SimFrontError> {
        let (id, op, bytes) = self.request();
        self.front.submit_raw(queue, id, op, &bytes)?;
        self.tally.requests += 1;
        Ok(())
    }

    fn step(&mut self) {
        if self.ring_refs.is_empty() {
            self.ring_refs = ring_refs(&self.front);
        }
        self.tally.steps += 1;
        let queues = self.front.info().map_or(1, |i| i.queues as usize);
        match self.below(100) {
            0..=59 => {
                // A batch of hostile requests, with the indirect pages sometimes rewritten
                // while the backend reads them.
                let rewrite = self.chance(30);
                self.rewriting.store(rewrite, Ordering::Relaxed);
                let n = 1 + self.below(24);
                for _ in 0..n {
                    let q = self.below(queues as u64) as usize;
                    if self.front.free_slots(q) == 0 {
                        break;
                    }
                    self.submit_raw(q).expect("pushing a request");
                }
                self.drain("hostile requests");
                self.rewriting.store(false, Ordering::Relaxed);
            }
            60..=69 => {
                // Revocation right after the push: end access, grant the page again.
                let q = self.below(queues as u64) as usize;
                for _ in 0..4 {
                    if self.front.free_slots(q) > 0 {
                        self.submit_raw(q).expect("pushing a request");
                    }
                }
                let k = self.below(self.rw.len() as u64) as usize;
                let (frame, gref) = self.rw[k];
                if self.front.domain().end_access(gref).is_ok() {
                    let g = self
                        .front
                        .domain()
                        .grant(0, frame, Access::ReadWrite)
                        .unwrap();
                    self.rw[k] = (frame, g);
                    self.tally.revocations += 1;
                }
                self.drain("requests with revoked grants");
            }
            70..=79 => {
                // An event storm: one-slot pushes, each notifying.
                for _ in 0..64 {
                    let q = self.below(queues as u64) as usize;
                    if self.front.free_slots(q) == 0 {
                        break;
                    }
                    self.submit_raw(q).expect("pushing a request");
                }
                self.drain("an event storm");
            }
            80..=84 => {
                // A bogus producer index: that ring halts; a reconnect must work.
                let q = self.below(queues as u64) as usize;
                let v = self.rng.next_u64() as u32;
                self.front
                    .corrupt_req_prod(q, v)
                    .expect("corrupting req_prod");
                self.tally.ring_breaks += 1;
                std::thread::sleep(Duration::from_millis(20));
                self.alive("a bogus req_prod");
                self.cycle(false);
            }
            _ => {
                self.tally.xenstore_cases += 1;
                self.cycle(true);
            }
        }
        self.alive("a step");
        // Whatever the guest did, the backend's private memory stays under the bound.
        let rss = rss_anon_kib(self.backend.pid());
        assert!(
            rss < self.memory_bound_kib,
            "anonymous RSS {rss} KiB above the bound {} KiB at step {}",
            self.memory_bound_kib,
            self.tally.steps
        );
        self.tally.max_rss_kib = self.tally.max_rss_kib.max(rss);
    }

    /// Disconnects (checking for leaks), optionally tries hostile XenStore values and states,
    /// and connects again cleanly.
    fn cycle(&mut self, hostile: bool) {
        let _lost = self.front.close().expect("closing");
        self.check_disconnected();
        if hostile {
            self.hostile_handshake();
        }
        self.front
            .reconnect()
            .expect("reconnecting after hostile steps");
        self.ring_refs = ring_refs(&self.front);
    }

    /// Writes hostile frontend nodes, says Initialised (or a random state), and checks the
    /// backend survives and answers in bounded time; then closes.
    fn hostile_handshake(&mut self) {
        let fe = self.front.frontend_path().to_owned();
        let values: [&[&str]; 5] = [
            &[
                "0",
                "1",
                "4294967295",
                "4294967296",
                "-1",
                "x",
                "",
                "18446744073709551617",
                "7 ",
                "0x10",
            ],
            &[
                "0",
                "1",
                "65535",
                "65536",
                "-3",
                "port",
                "",
                "99999999999999999999",
            ],
            &[
                "x86_64-abi",
                "x86_32-abi",
                "native",
                "",
                "arm-abi",
                "x86_64-abi\0",
                "x86_32",
            ],
            &["0", "1", "4", "5", "31", "32", "4294967295", "-1", "two"],
            &["0", "1", "2", "3", "4294967295", "65", "many", ""],
        ];
        let nodes = [
            "ring-ref",
            "event-channel",
            "protocol",
            "ring-page-order",
            "multi-queue-num-queues",
        ];
        let xs = self.front.xenstore();
        for (i, name) in nodes.iter().enumerate() {
            if self.rng.next_u64() % 3 == 0 {
                continue;
            }
            let v = values[i][(self.rng.next_u64() % values[i].len() as u64) as usize];
            let _ = xen::xenstore::XsOps::write(xs, &format!("{fe}/{name}"), v);
            if i == 0 && self.rng.next_u64() % 2 == 0 {
                let _ = xen::xenstore::XsOps::write(xs, &format!("{fe}/queue-0/ring-ref"), v);
                let _ = xen::xenstore::XsOps::write(xs, &format!("{fe}/queue-1/event-channel"), v);
            }
        }
        // Initialised or Connected both make a Closed backend read the keys (Linux
        // `frontend_changed`); it must react in bounded time: Connected with what it could
        // map, or Closing with an error.
        let state = if self.chance(70) {
            XenbusState::Initialised
        } else {
            XenbusState::Connected
        };
        self.front.set_state(state).expect("setting a state");
        let reacted = self
            .front
            .wait_backend_state(&[XenbusState::Closing, XenbusState::Connected]);
        assert!(reacted.is_ok(), "no reaction to hostile keys: {reacted:?}");
        self.alive("hostile XenStore values");
        // Then a state out of order or out of range. Not "0" nor a non-number: those read as
        // Unknown, which removes the device, as Linux's `frontend_changed` unregisters it (the
        // guest only ends its own disk; `lifecycle` tests it).
        if self.chance(50) {
            let junk = ["1", "2", "3", "7", "8", "9", "255", "4294967295"];
            let v = junk[self.below(junk.len() as u64) as usize];
            let _ = xen::xenstore::XsOps::write(self.front.xenstore(), &format!("{fe}/state"), v);
            std::thread::sleep(Duration::from_millis(20));
            self.alive("a frontend state out of range");
        }
        self.front.set_state(XenbusState::Closing).expect("Closing");
        let _ = self
            .front
            .wait_backend_state(&[XenbusState::Closing, XenbusState::Closed]);
        self.front.set_state(XenbusState::Closed).expect("Closed");
        self.front
            .wait_backend_state(&[XenbusState::Closed])
            .expect("the backend follows the frontend to Closed");
        self.alive("closing after hostile XenStore values");
    }

    /// After a disconnect: no grant in use, fds and threads as before, memory bounded, and
    /// no page outside the guest's writable grants changed.
    fn check_disconnected(&mut self) {
        let dom = self.front.domain();
        for &(_, g) in self.rw.iter().chain(&self.ro) {
            assert!(
                !dom.grant_in_use(g),
                "grant {g} still in use after disconnect"
            );
        }
        for f in CANARY_FRAMES.chain(RO_FRAMES) {
            let mut now = vec![0u8; shmem::PAGE_SIZE];
            dom.page(f).unwrap().read_into(0, &mut now).unwrap();
            assert!(
                now == pattern(f),
                "frame {f} (not writable by the backend) changed"
            );
        }
        let pid = self.backend.pid();
        let started = Instant::now();
        let mut counts = settled_counts(pid);
        let Some(b) = self.baseline else {
            self.baseline = Some(counts);
            self.baseline_fds = fd_targets(pid);
            return;
        };
        // The backend writes Closed only after joining every queue thread, but pthread_join
        // returns when the kernel clears the thread's tid (exit_mm), before the thread leaves
        // /proc. After that, a queue thread still runs, in do_exit, io_uring's task work for
        // the polls and timeouts cancelled when its ring was closed, and waits for a kworker
        // to run it (task_work_run → __io_fallback_tw → flush_work, seen in /proc/TID/stack):
        // on a loaded machine that took over 5 s. An io_uring worker (iou-wrk-*) is let go by
        // its queue thread just before its own exit. Such threads (PF_EXITING) hold nothing of
        // the backend's and count as gone, but must leave /proc within EXIT_BOUND; a thread
        // still running after SETTLE_BOUND is a leak.
        while counts != b && started.elapsed() < SETTLE_BOUND {
            std::thread::sleep(Duration::from_millis(50));
            counts = settled_counts(pid);
        }
        assert_eq!(
            counts,
            b,
            "fds and running threads (before {b:?}) after disconnect: threads {:#?}, fds {:?} \
             (at the first disconnect: {:?})",
            threads(pid),
            fd_targets(pid),
            self.baseline_fds
        );
        let exiting: Vec<Thread> = threads(pid).into_iter().filter(Thread::exiting).collect();
        if !exiting.is_empty() {
            self.tally.exiting_seen += 1;
            let seen = Instant::now();
            while threads(pid).iter().any(Thread::exiting) && seen.elapsed() < EXIT_BOUND {
                std::thread::sleep(Duration::from_millis(20));
            }
            let still: Vec<Thread> = threads(pid).into_iter().filter(Thread::exiting).collect();
            assert!(
                still.is_empty(),
                "threads stuck in their exit for {EXIT_BOUND:?} after disconnect: {still:#?}"
            );
            if seen.elapsed() > self.tally.longest_exit.0 {
                self.tally.longest_exit = (seen.elapsed(), exiting);
            }
        }
        let rss = rss_anon_kib(pid);
        assert!(
            rss < self.memory_bound_kib,
            "anonymous RSS {rss} KiB above the bound {} KiB",
            self.memory_bound_kib
        );
    }

    fn finish(mut self) -> Tally {
        // A clean write and read-back still work.
        let data = vec![0xa5u8; 8192];
        let w = self.front.write(0, 64, &data).expect("a clean write");
        assert!(w.is_ok());
        let r = self.front.read(0, 64, 16).expect("a clean read");
        assert_eq!(r.data.as_deref(), Some(&data[..]));
        // The last disconnect's checks, then removal: the backend exits 0.
        self.cycle(false);
        tests::remove(&self.sim, &self.spec, &mut self.backend, &mut self.front);
        self.stop_rewriter.store(true, Ordering::Relaxed);
        if let Some(t) = self.rewriter.take() {
            let _ = t.join();
        }
        std::mem::take(&mut self.tally)
    }
}

/// The grant refs of the frontend's ring pages, as it published them (`ring-ref`,
/// `ring-ref%u`, per queue or not). A request naming one of them as a data buffer makes the
/// backend write device data into the guest's own ring (Linux's blkback does the same: the
/// guest granted the page and named it); that only hurts the guest, but the simulated
/// frontend then reads garbage as responses (`response for unknown request id 0`, seed 777
/// at step 16987 in copy mode) or waits forever for a zeroed index. The fuzzer attacks the
/// backend, so it leaves its own rings alone (the ring crate's tests and the bogus `req_prod`
/// step cover a ring changing under the backend).
fn ring_refs(front: &SimFront) -> Vec<GrantRef> {
    let Some(info) = front.info() else {
        return Vec::new();
    };
    let fe = front.frontend_path();
    let dirs: Vec<String> = match info.queues {
        1 => vec![fe.to_owned()],
        n => (0..n).map(|q| format!("{fe}/queue-{q}")).collect(),
    };
    // One page: `ring-ref`, or `ring-ref0` when the order was written.
    let names: Vec<String> = match info.ring_page_order {
        0 => vec!["ring-ref".to_owned(), "ring-ref0".to_owned()],
        order => (0..1u32 << order).map(|i| format!("ring-ref{i}")).collect(),
    };
    let refs: Vec<GrantRef> = dirs
        .iter()
        .flat_map(|dir| names.iter().map(move |name| format!("{dir}/{name}")))
        .filter_map(|path| xen::xenstore::XsOps::read(front.xenstore(), &path).ok())
        .filter_map(|v| std::str::from_utf8(&v).ok()?.parse().ok())
        .collect();
    assert!(!refs.is_empty(), "the frontend published no ring-ref");
    refs
}

/// Rewrites the fuzzer's read-write pages with random bytes while `on` is set: indirect
/// pages and data pages change under the backend's feet.
fn rewrite_pages(dir: &std::path::Path, on: &AtomicBool, stop: &AtomicBool, seed: u64) {
    let Ok(dom) = SimDomain::open(dir, GUEST) else {
        return;
    };
    let mut rng = Rng::new(seed);
    let mut buf = vec![0u8; 64];
    while !stop.load(Ordering::Relaxed) {
        if !on.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        let frame =
            RW_FRAMES.start + (rng.next_u64() % u64::from(RW_FRAMES.end - RW_FRAMES.start)) as u32;
        let off = (rng.next_u64() as usize % (shmem::PAGE_SIZE / 64)) * 64;
        for c in buf.chunks_mut(8) {
            c.copy_from_slice(&rng.next_u64().to_le_bytes());
        }
        if let Ok(p) = dom.page(frame) {
            let _ = p.write_from(off, &buf);
        }
    }
}

/// The backend's open fds and running threads (not exiting), the least of several samples
/// (the statistics file is briefly open while it is rewritten).
fn settled_counts(pid: u32) -> (usize, usize) {
    let fds = || {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| d.count())
            .unwrap_or(0)
    };
    let mut best = (usize::MAX, usize::MAX);
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(10));
        best.0 = best.0.min(fds());
        best.1 = best
            .1
            .min(threads(pid).iter().filter(|t| !t.exiting()).count());
    }
    best
}

/// `PF_EXITING` (include/linux/sched.h): the task is in `do_exit`.
const PF_EXITING: u32 = 0x4;

/// One thread of a process as /proc shows it; the kernel stack (readable by root) tells a
/// thread blocked in the kernel from one at work.
struct Thread {
    tid: String,
    name: String,
    state: String,
    flags: u32,
    wchan: String,
    stack: Vec<String>,
}

impl Thread {
    fn exiting(&self) -> bool {
        self.flags & PF_EXITING != 0
    }
}

impl std::fmt::Debug for Thread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} state {} flags {:#x} wchan {} stack [{}]",
            self.tid,
            self.name,
            self.state,
            self.flags,
            self.wchan,
            self.stack.join(" < ")
        )
    }
}

/// The threads of a process.
fn threads(pid: u32) -> Vec<Thread> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|t| {
            let read = |f: &str| std::fs::read_to_string(t.path().join(f)).ok();
            // After the parenthesised name: state, ppid, pgrp, session, tty, tpgid, flags.
            let stat = read("stat")?;
            let fields: Vec<&str> = stat.rsplit_once(") ")?.1.split(' ').collect();
            Some(Thread {
                tid: t.file_name().to_string_lossy().into_owned(),
                name: read("comm").unwrap_or_default().trim().to_owned(),
                state: (*fields.first()?).to_owned(),
                flags: fields.get(6)?.parse().ok()?,
                wchan: read("wchan").unwrap_or_default(),
                stack: read("stack")
                    .unwrap_or_default()
                    .lines()
                    .map(|l| l.split(' ').nth(1).unwrap_or(l).to_owned())
                    .collect(),
            })
        })
        .collect()
}

/// What a process's fds are.
fn fd_targets(pid: u32) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .map(|p| p.display().to_string())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// `RssAnon` of a process, KiB.
fn rss_anon_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn run(tag: &str, args: &[&str], default_steps: u64) {
    let steps = std::env::var("HOSTILE_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default_steps);
    let seed = std::env::var("HOSTILE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x6b6c_6b62);
    let started = Instant::now();
    let mut fuzz = Fuzz::new(tag, seed, args);
    for _ in 0..steps {
        fuzz.step();
        if fuzz.tally.steps % 50 == 0 {
            fuzz.cycle(false);
        }
        if fuzz.tally.steps % 1000 == 0 {
            eprintln!(
                "hostile guest ({tag}): step {}, {} requests, {:.0} s",
                fuzz.tally.steps,
                fuzz.tally.requests,
                started.elapsed().as_secs_f64()
            );
        }
    }
    let bound = fuzz.memory_bound_kib;
    let tally = fuzz.finish();
    eprintln!(
        "hostile guest ({tag}, seed {seed}): {} steps, {} hostile requests ({} answered), {} ring breaks, {} hostile handshakes, {} revocations, {} ring refs avoided, largest anonymous RSS {} KiB (bound {} KiB), {} disconnects with a joined thread still exiting (longest {:?} more: {:?}) in {:.1} s: no finding",
        tally.steps,
        tally.requests,
        tally.answered,
        tally.ring_breaks,
        tally.xenstore_cases,
        tally.revocations,
        tally.ring_refs_avoided,
        tally.max_rss_kib,
        bound,
        tally.exiting_seen,
        tally.longest_exit.0,
        tally.longest_exit.1,
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn a_hostile_guest_cannot_hurt_the_backend_map_mode() {
    run("hostile-map", &["--grant-mode", "map"], 100);
}

#[test]
fn a_hostile_guest_cannot_hurt_the_backend_copy_mode() {
    run("hostile-copy", &["--grant-mode", "copy"], 100);
}
