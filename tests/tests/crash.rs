//! Crash consistency: a workload of writes and flushes against the real, confined backend,
//! which is killed (SIGKILL) at a random point, many times. After each kill, every write the
//! backend acknowledged (and so every write acknowledged before an acknowledged flush) is on
//! the device; and every flush was acknowledged only after the device had completed a cache
//! flush.
//!
//! What this proves, and what it cannot:
//! - Killing the process loses nothing the kernel has: an acknowledged write missing after
//!   the kill would mean the backend answered before the data reached the device (an ack from
//!   a buffer, or before the write completed). The device is read back with the backend gone.
//! - Power loss cannot be simulated here (no device-mapper `log-writes`/`flakey`, and dropping
//!   the host's page cache drops no dirty page anyway). What makes a flush durable is the
//!   device's cache flush, so the test checks that one happened: as root the disk is a loop
//!   device, whose block-layer statistics count completed flush requests
//!   (`/sys/block/loopN/stat`, field 16). After each flush acknowledgement the count must have
//!   grown by at least the number of flushes acknowledged: a flush answered without an
//!   `fdatasync` reaching the device (or before it completed, at the moment the count is read)
//!   fails. The data plane maps `BLKIF_OP_FLUSH_DISKCACHE` to an io_uring `FSYNC` with
//!   `DATASYNC`, invisible to strace, hence the device-side count.
//!
//! `CRASH_RUNS=200 cargo test -p tests --test crash -- --nocapture` runs longer.

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use sim::front::{FrontOptions, IoOp};
use sim::toolstack::VbdSpec;
use sim::workload::Rng;
use tests::{is_root, Backend, Loop, Sim, TempDir, DEVID, GUEST};

const BLOCK: usize = 4096;
const BLOCKS: u64 = 4096;

fn pattern(block: u64, run: u64) -> Vec<u8> {
    let mut v = vec![0u8; BLOCK];
    for (i, c) in v.chunks_mut(8).enumerate() {
        c.copy_from_slice(&(block << 32 ^ run << 16 ^ i as u64).to_le_bytes());
    }
    v
}

/// Completed flush requests of a block device (`/sys/block/<dev>/stat`, field 16).
fn flushes(dev: &Path) -> Option<u64> {
    let name = dev.file_name()?.to_string_lossy().into_owned();
    let stat = std::fs::read_to_string(format!("/sys/block/{name}/stat")).ok()?;
    stat.split_whitespace().nth(15)?.parse().ok()
}

/// What one run saw.
struct Run {
    acked: Vec<u64>,
    durable: usize,
    flushes_acked: u64,
}

/// Writes each block of a random order once, with a flush after every few writes, until the
/// backend is killed.
fn workload(sim: &Sim, spec: &VbdSpec, disk: &Path, run: u64, seed: u64) -> Run {
    let mut backend = Backend::serve(sim, spec, &["--open-params"]);
    let mut front = sim.front(FrontOptions::default());
    front.connect().expect("handshake");
    front.set_timeout(Duration::from_millis(700));
    let mut rng = Rng::new(seed);
    let kill_after = Duration::from_millis(50 + rng.next_u64() % 400);
    let pid = rustix::process::Pid::from_raw(backend.pid() as i32).unwrap();
    let killer = std::thread::spawn(move || {
        std::thread::sleep(kill_after);
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
    });
    let flush_base = flushes(disk);
    let order = rng.permutation(BLOCKS);
    let mut in_flight: HashMap<u64, u64> = HashMap::new();
    let mut acked = Vec::new();
    let mut durable = 0;
    let mut flushes_acked = 0;
    let mut next = 0;
    'run: loop {
        // Up to 16 writes in flight, then a flush of everything acknowledged so far.
        while in_flight.len() < 16 && next < order.len() {
            let block = order[next];
            let data = pattern(block, run);
            let q = next % 2;
            if front.free_slots(q) == 0 {
                break;
            }
            match front.submit(
                q,
                IoOp::Write {
                    sector: block * 8,
                    data: &data,
                },
            ) {
                Ok(id) => {
                    in_flight.insert(id, block);
                    next += 1;
                }
                Err(_) => break 'run,
            }
        }
        while !in_flight.is_empty() {
            match front.wait() {
                Ok(c) => {
                    if let Some(block) = in_flight.remove(&c.id) {
                        if c.is_ok() {
                            acked.push(block);
                        }
                    }
                }
                Err(_) => break 'run,
            }
        }
        if next % 64 == 0 || next == order.len() {
            let before = acked.len();
            match front.execute(0, IoOp::Flush) {
                Ok(c) if c.is_ok() => {
                    flushes_acked += 1;
                    durable = before;
                    if let (Some(base), Some(now)) = (flush_base, flushes(disk)) {
                        assert!(
                            now - base >= flushes_acked,
                            "flush {flushes_acked} acknowledged, but the device completed only {} flushes",
                            now - base
                        );
                    }
                }
                Ok(c) => panic!("flush failed: {c:?}"),
                Err(_) => break 'run,
            }
        }
        if next == order.len() {
            break;
        }
    }
    killer.join().unwrap();
    let _ = backend.wait_exit(Duration::from_secs(10));
    Run {
        acked,
        durable,
        flushes_acked,
    }
}

#[test]
fn acknowledged_writes_and_flushes_survive_a_killed_backend() {
    let runs: u64 = std::env::var("CRASH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    let tmp = TempDir::new("crash");
    let image = tmp.path().join("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(BLOCKS * BLOCK as u64)
        .unwrap();
    // As root, a loop device (flushes counted by the block layer); else the file itself.
    let lo = is_root().then(|| Loop::attach(&image));
    if lo.is_none() {
        sim::skip::report_skip(
            "in part: the device-flush count needs root (a loop device); serving the image file",
        );
    }
    let disk = lo.as_ref().map_or(image.clone(), |l| l.device.clone());
    let (mut writes, mut durable, mut flushed) = (0, 0, 0);
    let started = Instant::now();
    for run in 1..=runs {
        let sim = Sim::new("crash-run");
        let spec = VbdSpec::disk(0, GUEST, DEVID, disk.to_str().unwrap());
        sim.create_vbd(&spec);
        let r = workload(&sim, &spec, &disk, run, run * 7919);
        // The backend is gone: read the device directly.
        let dev = std::fs::File::open(&disk).unwrap();
        for &block in &r.acked {
            let mut got = vec![0u8; BLOCK];
            dev.read_exact_at(&mut got, block * BLOCK as u64).unwrap();
            assert!(
                got == pattern(block, run),
                "run {run}: block {block}, acknowledged{}, is not on the device",
                if r.acked.iter().position(|&b| b == block) < Some(r.durable) {
                    " and flushed"
                } else {
                    ""
                }
            );
        }
        writes += r.acked.len();
        durable += r.durable;
        flushed += r.flushes_acked;
    }
    eprintln!(
        "crash consistency: {runs} runs killed at random points, {writes} acknowledged writes \
         ({durable} of them before an acknowledged flush), {flushed} flushes, {:.1} s: nothing lost",
        started.elapsed().as_secs_f64()
    );
    assert!(
        flushed > 0 && durable > 0,
        "the workload never got to a flush"
    );
}
