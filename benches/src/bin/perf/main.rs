//! The performance harness: the real `blkbackd serve` process, driven by a load generator
//! playing the frontend on the simulated platform (`front`: blkfront's handshake, then
//! `ring::FrontRing` with data pages granted once), against the same
//! workload issued with io_uring straight at the same target in the same run (the physical
//! limit of this machine), and fio on the same file when it is installed (`fio`). Writes
//! `perf.md` (Markdown tables), `perf.csv` and `perf.png` to `benches/results/` (or `--out`).
//!
//! `cargo run --release -p benches --bin perf` (full), `... -- --tiny` (what CI runs),
//! `... -- --help` for the rest (`--compare`, `--baseline`, `--check-agree`).
//!
//! Every case runs as interleaved repeats (direct, fio, blkbackd A[, blkbackd B], direct,
//! ...; 3 by default), so that a machine's drift hits both sides of a ratio; the tables give
//! the medians of the figures and the min-max spread of the per-repeat ratios. A single run
//! swings by up to 2x on a shared machine; the spread says how far a median can be trusted,
//! and `--check-agree` whether two runs tell the same story.
//!
//! Metrics per case: IOPS, bandwidth, p50/p99/p99.9 latency (from submission by the
//! frontend to its seeing the completion), CPU time per request (utime + stime of the whole
//! backend process from `/proc/<pid>/stat`, or of this process during the direct run, which
//! counts the io_uring's kernel workers too), and system calls per request: blkbackd's
//! counted with `perf stat -e raw_syscalls:sys_enter` attached to the backend process (all its
//! threads) in a short run of its own, since perf's hooks slow what they watch ("n/a" where
//! perf is missing); the direct loop's counted by the loop itself.

use std::fmt::Write as _;
use std::io::Write as _;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use sim::toolstack::{self, VbdSpec};

const GUEST: u16 = 1;
const DEVID: u32 = 51712;

#[derive(Debug, Clone, Copy)]
enum Pattern {
    RandRead,
    RandWrite,
    SeqRead,
    SeqWrite,
    /// 70 % reads, 30 % writes, random.
    Mix,
}

#[derive(Debug, Clone, Copy)]
struct Workload {
    name: &'static str,
    pattern: Pattern,
    bs: usize,
    qd: usize,
}

const WORKLOADS: &[Workload] = &[
    Workload {
        name: "4K randread QD1",
        pattern: Pattern::RandRead,
        bs: 4096,
        qd: 1,
    },
    Workload {
        name: "4K randread QD32",
        pattern: Pattern::RandRead,
        bs: 4096,
        qd: 32,
    },
    Workload {
        name: "4K randwrite QD1",
        pattern: Pattern::RandWrite,
        bs: 4096,
        qd: 1,
    },
    Workload {
        name: "4K randwrite QD32",
        pattern: Pattern::RandWrite,
        bs: 4096,
        qd: 32,
    },
    Workload {
        name: "1M seqread QD4",
        pattern: Pattern::SeqRead,
        bs: 1 << 20,
        qd: 4,
    },
    Workload {
        name: "1M seqwrite QD4",
        pattern: Pattern::SeqWrite,
        bs: 1 << 20,
        qd: 4,
    },
    Workload {
        name: "4K 70/30 mix QD32",
        pattern: Pattern::Mix,
        bs: 4096,
        qd: 32,
    },
];

/// One backend configuration.
#[derive(Debug, Clone, Copy)]
struct Config {
    name: &'static str,
    grant_mode: &'static str,
    persistent: bool,
    queues: u32,
    /// `--poll-us`.
    poll_us: u32,
}

const CONFIGS: &[Config] = &[
    Config {
        name: "copy",
        grant_mode: "copy",
        persistent: false,
        queues: 1,
        poll_us: 0,
    },
    Config {
        name: "map+persistent",
        grant_mode: "map",
        persistent: true,
        queues: 1,
        poll_us: 0,
    },
    Config {
        name: "copy 2-queue",
        grant_mode: "copy",
        persistent: false,
        queues: 2,
        poll_us: 0,
    },
    Config {
        name: "copy poll 50 us",
        grant_mode: "copy",
        persistent: false,
        queues: 1,
        poll_us: 50,
    },
    Config {
        name: "map+persistent poll 50 us",
        grant_mode: "map",
        persistent: true,
        queues: 1,
        poll_us: 50,
    },
];

/// Latency figures reported by an outside tool (fio) instead of samples.
#[derive(Debug, Clone, Copy)]
struct Reported {
    mean_us: f64,
    p50: f64,
    p99: f64,
    p999: f64,
}

#[derive(Debug, Clone, Default)]
struct Measured {
    requests: u64,
    bytes: u64,
    elapsed: Duration,
    lat_us: Vec<f64>,
    reported: Option<Reported>,
    cpu_ticks: Option<u64>,
    syscalls: Option<u64>,
}

impl Measured {
    fn iops(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
    fn mib_s(&self) -> f64 {
        self.bytes as f64 / 1048576.0 / self.elapsed.as_secs_f64().max(1e-9)
    }
    fn pct(&mut self, p: f64) -> f64 {
        if self.lat_us.is_empty() {
            return match self.reported {
                Some(r) if p == 0.5 => r.p50,
                Some(r) if p == 0.99 => r.p99,
                Some(r) if p == 0.999 => r.p999,
                _ => f64::NAN,
            };
        }
        self.lat_us.sort_by(f64::total_cmp);
        let i = ((self.lat_us.len() as f64 - 1.0) * p).round() as usize;
        self.lat_us[i]
    }
    fn mean_lat(&self) -> f64 {
        if self.lat_us.is_empty() {
            return self.reported.map_or(f64::NAN, |r| r.mean_us);
        }
        self.lat_us.iter().sum::<f64>() / self.lat_us.len() as f64
    }
    fn cpu_us_per_req(&self) -> Option<f64> {
        let hz = 100.0; // USER_HZ
        self.cpu_ticks
            .map(|t| t as f64 / hz * 1e6 / self.requests.max(1) as f64)
    }
    fn sys_per_req(&self) -> Option<f64> {
        self.syscalls
            .map(|s| s as f64 / self.requests.max(1) as f64)
    }
    /// This run's figures (and its latency samples dropped).
    fn figures(mut self) -> Fig {
        Fig {
            iops: self.iops(),
            mib_s: self.mib_s(),
            p50: self.pct(0.5),
            p99: self.pct(0.99),
            p999: self.pct(0.999),
            mean: self.mean_lat(),
            cpu: self.cpu_us_per_req().unwrap_or(f64::NAN),
            sys: self.sys_per_req().unwrap_or(f64::NAN),
        }
    }
}

/// The figures of one run (one sample of a case); NaN where not measured.
#[derive(Debug, Clone, Copy)]
struct Fig {
    iops: f64,
    mib_s: f64,
    p50: f64,
    p99: f64,
    p999: f64,
    mean: f64,
    cpu: f64,
    sys: f64,
}

struct Opts {
    tiny: bool,
    seconds: f64,
    /// Interleaved repeats of each case (direct, blkbackd, ...), at least 1.
    pairs: usize,
    out: PathBuf,
    targets: Vec<(&'static str, PathBuf)>,
    image_mib: u64,
    blkbackd: PathBuf,
    /// `--compare PATH`: a second blkbackd (B), run in every case beside the first (A).
    compare: Option<PathBuf>,
    /// `--scaling 1,2,4,8`: the multi-queue scaling run instead of the table.
    scaling: Option<Vec<u32>>,
    /// `--configs NAME,...`: only these backend configurations.
    configs: Option<Vec<String>>,
    /// `--workloads NAME,...`: only these workloads.
    workloads: Option<Vec<String>>,
    /// fio and its version, unless missing or `--no-fio`.
    fio: Option<(PathBuf, String)>,
    /// `--baseline`: only direct against fio, no blkbackd.
    baseline_only: bool,
}

const HELP: &str = "\
perf [--tiny] [--seconds S] [--pairs N] [--targets ram,disk] [--configs NAME,...]
     [--workloads NAME,...] [--out DIR] [--blkbackd PATH] [--compare PATH] [--no-fio]
perf --baseline [--seconds S] [--pairs N] [--workloads NAME,...]   direct vs fio only
perf --scaling 1,2,4,8 [--targets ram] [--seconds S]
perf --check-agree DIR1 DIR2    do two runs' medians agree within their spreads?
perf --replot CSV

Every case runs as N interleaved repeats (direct, fio, blkbackd A[, blkbackd B]; A and B
swap places every other repeat); the tables give the medians and the min-max spread of the
per-repeat ratios. Default: RAM target, configurations copy, map+persistent and their
50 us polling variants, all workloads, 3 repeats of 3 s (about 10 minutes).";

fn parse_args() -> anyhow::Result<Opts> {
    let mut tiny = false;
    let mut seconds = None;
    let mut pairs = None;
    let mut out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("results");
    let mut blkbackd = None;
    let mut compare = None;
    let mut which = "ram".to_owned();
    let mut scaling = None;
    let mut configs = None;
    let mut workloads = None;
    let mut no_fio = false;
    let mut baseline_only = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--tiny" => tiny = true,
            "--seconds" => seconds = Some(args.next().context("--seconds S")?.parse()?),
            "--pairs" => {
                let n: usize = args.next().context("--pairs N")?.parse()?;
                if n == 0 {
                    bail!("--pairs: at least 1");
                }
                pairs = Some(n);
            }
            "--out" => out = args.next().context("--out DIR")?.into(),
            "--blkbackd" => blkbackd = Some(PathBuf::from(args.next().context("--blkbackd PATH")?)),
            "--compare" => {
                let p = PathBuf::from(args.next().context("--compare PATH")?);
                if !p.is_file() {
                    bail!("--compare: {} is not a file", p.display());
                }
                compare = Some(p);
            }
            "--targets" => which = args.next().context("--targets ram,disk")?,
            "--no-fio" => no_fio = true,
            "--baseline" => baseline_only = true,
            "--configs" => {
                let list = args.next().context("--configs NAME,...")?;
                let names: Vec<String> = list.split(',').map(str::to_owned).collect();
                if let Some(n) = names.iter().find(|n| !CONFIGS.iter().any(|c| c.name == *n)) {
                    let known: Vec<&str> = CONFIGS.iter().map(|c| c.name).collect();
                    bail!(
                        "--configs: no configuration {n:?} (known: {})",
                        known.join(", ")
                    );
                }
                configs = Some(names);
            }
            "--workloads" => {
                let list = args.next().context("--workloads NAME,...")?;
                let names: Vec<String> = list.split(',').map(str::to_owned).collect();
                if let Some(n) = names
                    .iter()
                    .find(|n| !WORKLOADS.iter().any(|w| w.name == *n))
                {
                    let known: Vec<&str> = WORKLOADS.iter().map(|w| w.name).collect();
                    bail!(
                        "--workloads: no workload {n:?} (known: {})",
                        known.join(", ")
                    );
                }
                workloads = Some(names);
            }
            "--scaling" => {
                let list = args.next().context("--scaling 1,2,4,8")?;
                let queues = list
                    .split(',')
                    .map(|q| match q.parse::<u32>() {
                        Ok(n @ 1..=64) => Ok(n),
                        _ => Err(anyhow::anyhow!(
                            "--scaling: {q:?} is not a queue count 1..64"
                        )),
                    })
                    .collect::<anyhow::Result<Vec<_>>>()?;
                scaling = Some(queues);
            }
            "-h" | "--help" => {
                println!("{HELP}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (see --help)"),
        }
    }
    let pid = std::process::id();
    let mut targets = Vec::new();
    for t in which.split(',') {
        match t {
            "ram" => targets.push((
                "RAM (tmpfs)",
                PathBuf::from(format!("/dev/shm/blkbackd-perf-{pid}")),
            )),
            "disk" if !tiny => targets.push((
                "disk file",
                PathBuf::from(format!("/var/tmp/blkbackd-perf-{pid}")),
            )),
            "disk" => {}
            other => bail!("unknown target {other:?}"),
        }
    }
    let fio = if no_fio { None } else { fio::find() };
    if fio.is_none() && !no_fio {
        eprintln!("perf: no fio (install it, or set $FIO): the fio column will be empty");
    }
    let blkbackd = match (blkbackd, baseline_only) {
        (Some(b), _) => b,
        (None, true) => PathBuf::new(),
        (None, false) => build_blkbackd()?,
    };
    Ok(Opts {
        tiny,
        seconds: seconds.unwrap_or(if tiny { 0.3 } else { DEFAULT_SECONDS }),
        pairs: pairs.unwrap_or(3),
        out,
        targets,
        image_mib: if tiny { 16 } else { 512 },
        blkbackd,
        compare,
        scaling,
        configs,
        workloads,
        fio,
        baseline_only,
    })
}

/// Seconds per run of the default (full) run: 3 repeats of 28 cases, 217 runs in all (about
/// 10 minutes).
const DEFAULT_SECONDS: f64 = 3.0;

/// The `blkbackd` of this build profile (the directory holding this binary).
fn build_blkbackd() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("exe dir")?;
    tests::build_blkbackd(dir).context("building blkbackd")
}

fn make_image(dir: &Path, mib: u64) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let p = dir.join("disk.img");
    let mut f = std::fs::File::create(&p)?;
    let mut chunk = vec![0u8; 1 << 20];
    for i in 0..mib {
        sim::workload::pattern(i, 1, &mut chunk);
        f.write_all(&chunk)?;
    }
    f.sync_all()?;
    Ok(p)
}

/// Counts system calls of a process (`-p`) or thread (`-t`) until stopped.
struct SyscallCounter(Option<Child>);

impl SyscallCounter {
    fn start(flag: &str, id: u32) -> Self {
        let child = Command::new("perf")
            .args([
                "stat",
                "-x,",
                "-e",
                "raw_syscalls:sys_enter",
                flag,
                &id.to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .ok();
        // perf needs a moment to attach.
        std::thread::sleep(Duration::from_millis(150));
        Self(child)
    }

    fn stop(self) -> Option<u64> {
        let child = self.0?;
        let _ = rustix::process::kill_process(
            rustix::process::Pid::from_raw(child.id() as i32)?,
            rustix::process::Signal::INT,
        );
        let out = child.wait_with_output().ok()?;
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .find(|l| l.contains("raw_syscalls:sys_enter"))
            .and_then(|l| l.split(',').next()?.trim().parse().ok())
    }
}

fn cpu_ticks(stat: &str) -> Option<u64> {
    let s = std::fs::read_to_string(stat).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    // Fields 14 and 15 (utime, stime); `rest` starts at field 3.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// utime + stime + cutime + cstime (fields 14 to 17).
fn cpu_ticks_with_children(stat: &str) -> Option<u64> {
    let s = std::fs::read_to_string(stat).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    (11..15).map(|i| f.get(i)?.parse::<u64>().ok()).sum()
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Offsets and kinds of the workload's requests, in order.
struct Gen {
    w: Workload,
    rng: Rng,
    blocks: u64,
    seq: u64,
}

impl Gen {
    fn new(w: Workload, image: u64) -> Self {
        Self::seeded(w, image, 0)
    }
    /// A generator of its own for each of several threads (`stream` 0, 1, ...): random
    /// offsets differ, sequential ones start in different places.
    fn seeded(w: Workload, image: u64, stream: u64) -> Self {
        let blocks = image / w.bs as u64;
        Self {
            w,
            rng: Rng(0x9e37_79b9_7f4a_7c15 ^ stream.wrapping_mul(0x2545_f491_4f6c_dd1d)),
            blocks,
            seq: stream * 7919 % blocks.max(1),
        }
    }
    /// (byte offset, write)
    fn next(&mut self) -> (u64, bool) {
        let bs = self.w.bs as u64;
        match self.w.pattern {
            Pattern::RandRead => (self.rng.next() % self.blocks * bs, false),
            Pattern::RandWrite => (self.rng.next() % self.blocks * bs, true),
            Pattern::Mix => {
                let w = self.rng.next() % 10 < 3;
                (self.rng.next() % self.blocks * bs, w)
            }
            Pattern::SeqRead | Pattern::SeqWrite => {
                let o = self.seq % self.blocks * bs;
                self.seq += 1;
                (o, matches!(self.w.pattern, Pattern::SeqWrite))
            }
        }
    }
}

// ---- direct io_uring ----

struct Aligned {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}
impl Aligned {
    fn new(len: usize) -> Self {
        let layout = std::alloc::Layout::from_size_align(len, 4096).expect("layout");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "out of memory");
        Self { ptr, layout }
    }
}
impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

/// How a direct run sets up its io_uring.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Direct {
    /// As fio's io_uring engine does where the kernel has it: cooperative task running, a
    /// single issuer, task work deferred to the waiting thread; the file registered.
    Tuned,
    /// `Tuned`, but each request submitted by a system call of its own as it is queued, as
    /// fio does at its default `iodepth_batch=1` (`perf --baseline` shows it).
    Each,
    /// The harness's baseline before issue 19: a plain 64-entry ring, the file not
    /// registered (`perf --baseline` shows it beside the tuned one).
    Legacy,
}

/// A direct run. Its system calls are the loop's own `io_uring_enter` calls, counted in
/// the loop (the only ones it makes), unless `perf_stat`: then `perf stat` attaches to the
/// thread as it does to blkbackd (`perf --baseline` shows what that costs).
fn run_direct(
    path: &Path,
    w: Workload,
    secs: f64,
    image: u64,
    kind: Direct,
    perf_stat: bool,
) -> anyhow::Result<Measured> {
    let tid = rustix::thread::gettid().as_raw_nonzero().get() as u32;
    let counter = perf_stat.then(|| SyscallCounter::start("-t", tid));
    let cpu0 = cpu_ticks("/proc/self/stat");
    let mut m = direct_loop_with(path, w, secs, Gen::new(w, image), kind)?;
    m.cpu_ticks = cpu_ticks("/proc/self/stat").zip(cpu0).map(|(a, b)| a - b);
    if let Some(c) = counter {
        m.syscalls = c.stop();
    }
    Ok(m)
}

/// The io_uring of a direct run.
fn direct_ring(entries: u32, kind: Direct) -> std::io::Result<io_uring::IoUring> {
    if kind != Direct::Legacy {
        let tuned = io_uring::IoUring::builder()
            .setup_coop_taskrun()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .build(entries);
        if let Ok(r) = tuned {
            return Ok(r);
        }
    }
    io_uring::IoUring::new(entries)
}

fn direct_loop(path: &Path, w: Workload, secs: f64, gen: Gen) -> anyhow::Result<Measured> {
    direct_loop_with(path, w, secs, gen, Direct::Tuned)
}

/// One io_uring kept `w.qd` deep on `path` for `secs`: the file registered, one clock
/// read per batch of submissions and one per batch of completions, no allocation in the
/// loop but the latency samples.
fn direct_loop_with(
    path: &Path,
    w: Workload,
    secs: f64,
    mut gen: Gen,
    kind: Direct,
) -> anyhow::Result<Measured> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc_o_direct())
        .open(path)?;
    let mut ring = match kind {
        Direct::Tuned | Direct::Each => {
            direct_ring((w.qd as u32).next_power_of_two().max(8), kind)?
        }
        Direct::Legacy => direct_ring(64, kind)?,
    };
    let fixed = kind == Direct::Tuned && ring.submitter().register_files(&[f.as_raw_fd()]).is_ok();
    let mut enters = 0u64;
    let buf = Aligned::new(w.bs * w.qd);
    let mut started: Vec<Instant> = vec![Instant::now(); w.qd];
    let mut free: Vec<usize> = (0..w.qd).collect();
    let mut done: Vec<(u64, i32)> = Vec::with_capacity(w.qd);
    let mut m = Measured {
        lat_us: Vec::with_capacity((secs * 400_000.0).min(4e7) as usize),
        ..Measured::default()
    };
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs_f64(secs);
    let mut now = t0;
    loop {
        if now < end {
            while let Some(i) = free.pop() {
                let (off, write) = gen.next();
                // SAFETY: slot i's part of `buf` belongs to this one operation until its CQE.
                let p = unsafe { buf.ptr.add(i * w.bs) };
                let e = match (fixed, write) {
                    (true, false) => {
                        io_uring::opcode::Read::new(io_uring::types::Fixed(0), p, w.bs as u32)
                            .offset(off)
                            .build()
                    }
                    (true, true) => {
                        io_uring::opcode::Write::new(io_uring::types::Fixed(0), p, w.bs as u32)
                            .offset(off)
                            .build()
                    }
                    (false, false) => io_uring::opcode::Read::new(
                        io_uring::types::Fd(f.as_raw_fd()),
                        p,
                        w.bs as u32,
                    )
                    .offset(off)
                    .build(),
                    (false, true) => io_uring::opcode::Write::new(
                        io_uring::types::Fd(f.as_raw_fd()),
                        p,
                        w.bs as u32,
                    )
                    .offset(off)
                    .build(),
                };
                started[i] = now;
                // SAFETY: the buffer outlives the operation (we wait for every CQE below).
                unsafe { ring.submission().push(&e.user_data(i as u64))? };
                if kind == Direct::Each && !free.is_empty() {
                    ring.submit()?;
                    enters += 1;
                }
            }
        }
        if free.len() == w.qd {
            break;
        }
        ring.submit_and_wait(1)?;
        enters += 1;
        done.clear();
        done.extend(ring.completion().map(|c| (c.user_data(), c.result())));
        now = Instant::now();
        for &(i, res) in &done {
            let i = i as usize;
            if res != w.bs as i32 {
                bail!("direct I/O failed: {res}");
            }
            m.lat_us.push((now - started[i]).as_secs_f64() * 1e6);
            m.requests += 1;
            m.bytes += w.bs as u64;
            free.push(i);
        }
    }
    m.elapsed = t0.elapsed();
    m.syscalls = Some(enters);
    Ok(m)
}

fn libc_o_direct() -> i32 {
    rustix::fs::OFlags::DIRECT.bits() as i32
}

// ---- through blkbackd ----

struct Session {
    _xenstored: sim::xenstored::SimXenstored,
    dom0: xen::xenstore::XenStore,
    spec: VbdSpec,
    backend: Child,
    front: Option<front::Front>,
    dir: PathBuf,
}

impl Session {
    /// `bin` serving `image` in configuration `c`; `tag` tells apart the directories of
    /// sessions that run at once (A and B).
    fn start(bin: &Path, work: &Path, image: &Path, c: Config, tag: &str) -> anyhow::Result<Self> {
        let dir = work.join(format!("sim-{}{tag}", c.name.replace([' ', ',', '+'], "_")));
        let _ = std::fs::remove_dir_all(&dir);
        let xenstored = sim::xenstored::SimXenstored::start(sim::xenstored_dir(&dir))?;
        xenstored.introduce_domain(GUEST)?;
        let dom0 = xen::xenstore::XenStore::open_at(sim::xenstore_socket(&dir, 0))?;
        let spec = VbdSpec::disk(0, GUEST, DEVID, image.to_str().context("utf-8 path")?);
        toolstack::create_vbd(&dom0, &spec)?;
        let mut cmd = Command::new(bin);
        cmd.arg("serve")
            .arg("--platform")
            .arg(format!("sim:{}:0", dir.display()))
            .arg("--backend-path")
            .arg(spec.backend_path())
            .arg("--open-params")
            .arg("--max-queues")
            .arg(c.queues.to_string())
            .arg("--grant-mode")
            .arg(c.grant_mode)
            .arg("--poll-us")
            .arg(c.poll_us.to_string())
            .arg("--stats-file")
            .arg(dir.join("stats"))
            .env_remove("BLKBACKD_RECORD")
            .stdin(Stdio::null());
        if !c.persistent {
            cmd.arg("--no-persistent");
        }
        let backend = cmd.spawn().context("starting blkbackd")?;
        let front = front::Front::connect(
            &dir,
            GUEST,
            &spec.frontend_path(),
            &spec.backend_path(),
            c.queues,
            c.persistent,
            32,
        )
        .context("handshake")?;
        Ok(Self {
            _xenstored: xenstored,
            dom0,
            spec,
            backend,
            front: Some(front),
            dir,
        })
    }

    /// `w` for `secs`; with `perf_stat`, its system calls counted by `perf stat` attached
    /// to the backend (which slows it: a run of its own, see `COUNT_SECONDS`).
    fn run(
        &mut self,
        w: Workload,
        secs: f64,
        image: u64,
        perf_stat: bool,
    ) -> anyhow::Result<Measured> {
        let pid = self.backend.id();
        let front = self.front.as_mut().context("closed")?;
        let queues = front.queues();
        let mut gen = Gen::new(w, image);
        let counter = perf_stat.then(|| SyscallCounter::start("-p", pid));
        let stat = format!("/proc/{pid}/stat");
        let cpu0 = cpu_ticks(&stat);
        let mut m = Measured::default();
        let t0 = Instant::now();
        let end = t0 + Duration::from_secs_f64(secs);
        let mut next_q = 0;
        let mut in_flight = 0;
        let mut failed = 0u64;
        loop {
            let mut queued = false;
            while in_flight < w.qd && Instant::now() < end {
                let q = (0..queues)
                    .map(|k| (next_q + k) % queues)
                    .find(|&q| front.can_submit(q, w.bs))
                    .context("no free slot")?;
                next_q = (q + 1) % queues;
                let (off, write) = gen.next();
                front.submit(q, off, w.bs, write)?;
                in_flight += 1;
                queued = true;
            }
            if queued {
                front.push()?;
            }
            if in_flight == 0 {
                break;
            }
            front.complete(|lat, ok| {
                in_flight -= 1;
                failed += u64::from(!ok);
                m.lat_us.push(lat.as_secs_f64() * 1e6);
                m.requests += 1;
                m.bytes += w.bs as u64;
            })?;
        }
        m.elapsed = t0.elapsed();
        m.cpu_ticks = cpu_ticks(&stat).zip(cpu0).map(|(a, b)| a - b);
        m.syscalls = counter.and_then(SyscallCounter::stop);
        if failed > 0 {
            bail!("{failed} requests failed");
        }
        Ok(m)
    }

    fn stop(mut self) -> anyhow::Result<()> {
        toolstack::request_removal(&self.dom0, &self.spec)?;
        if let Some(f) = self.front.take() {
            f.close()?;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.backend.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = self.backend.kill();
                bail!("blkbackd did not exit");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        Ok(())
    }
}

fn fmt_opt(v: Option<f64>, prec: usize) -> String {
    v.map_or("n/a".into(), |v| format!("{v:.prec$}"))
}

/// The median of a case's repeats and their min-max spread; NaN where nothing was measured.
#[derive(Debug, Clone, Copy)]
struct Spread {
    med: f64,
    min: f64,
    max: f64,
}

fn spread(v: impl IntoIterator<Item = f64>) -> Spread {
    let mut v: Vec<f64> = v.into_iter().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return Spread {
            med: f64::NAN,
            min: f64::NAN,
            max: f64::NAN,
        };
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let med = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Spread {
        med,
        min: v[0],
        max: v[n - 1],
    }
}

impl Spread {
    /// The median alone.
    fn m(&self, prec: usize) -> String {
        num(self.med, prec, false)
    }
    /// The median with its spread: `0.62 (0.58–0.66)`.
    fn ms(&self, prec: usize, sign: bool) -> String {
        if !self.med.is_finite() {
            return "n/a".into();
        }
        format!(
            "{} ({}–{})",
            num(self.med, prec, sign),
            num(self.min, prec, sign),
            num(self.max, prec, sign)
        )
    }
}

fn num(v: f64, prec: usize, sign: bool) -> String {
    match (v.is_finite(), sign) {
        (false, _) => "n/a".into(),
        (true, true) => format!("{v:+.prec$}"),
        (true, false) => format!("{v:.prec$}"),
    }
}

/// One case: a workload on a target through one backend configuration, with the figures of
/// each interleaved repeat.
struct Case {
    target: &'static str,
    workload: Workload,
    config: Config,
    /// Direct io_uring, blkbackd (A), the `--compare` blkbackd (B), fio: one `Fig` per
    /// repeat; `b` and `f` empty where not run.
    d: Vec<Fig>,
    a: Vec<Fig>,
    b: Vec<Fig>,
    f: Vec<Fig>,
    /// System calls per request of A and B, from a counting run of their own.
    sys_a: f64,
    sys_b: f64,
    /// `--baseline`: other direct variants, run in the same repeats.
    more: Vec<(&'static str, Vec<Fig>)>,
}

fn of(v: &[Fig], k: impl Fn(&Fig) -> f64) -> Spread {
    spread(v.iter().map(k))
}
/// The per-repeat ratio `x / y` of a figure.
fn ratio(x: &[Fig], y: &[Fig], k: impl Fn(&Fig) -> f64) -> Spread {
    spread(x.iter().zip(y).map(|(a, b)| k(a) / k(b)))
}
/// The per-repeat difference `x − y` of a figure.
fn diff(x: &[Fig], y: &[Fig], k: impl Fn(&Fig) -> f64) -> Spread {
    spread(x.iter().zip(y).map(|(a, b)| k(a) - k(b)))
}

/// Whether configuration `c` runs workload `w` (multi-queue configurations skip QD1: one
/// request cannot use two queues).
fn runs(c: &Config, w: &Workload) -> bool {
    c.queues == 1 || w.qd > 1
}

/// The configuration of `--baseline` cases (no blkbackd).
const NO_CONFIG: Config = Config {
    name: "-",
    grant_mode: "copy",
    persistent: false,
    queues: 1,
    poll_us: 0,
};

/// What a run costs beyond its measured seconds (fio starting, `perf stat` attaching for
/// 150 ms in the counting runs; 0.08 s on average in a full run on 2 cores), and a blkbackd
/// session its start, handshake and stop.
const RUN_OVERHEAD_S: f64 = 0.1;
const SESSION_OVERHEAD_S: f64 = 1.0;
/// Seconds of the run that counts blkbackd's system calls with `perf stat` attached (kept
/// out of the measured repeats: perf's tracepoint and its per-thread context-switch hooks
/// slow the backend and its io-wq workers).
const COUNT_SECONDS: f64 = 0.5;

fn replot(csv: &Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(csv)?;
    let t = Csv::parse(&text);
    let bars: Vec<plot::Bar> = t
        .rows
        .iter()
        .filter_map(|r| {
            let v = t.get(r, "ratio")?;
            let s = t.get(r, "ratio_min").zip(t.get(r, "ratio_max"));
            Some((format!("{} {} {}", r[0], r[1], r[2]), v, s))
        })
        .collect();
    plot::bars_spread(
        &csv.with_extension("png"),
        "blkbackd IOPS / direct io_uring IOPS (median, min-max)",
        &bars,
    )?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    match args.next().as_deref() {
        Some("--replot") => return replot(Path::new(&args.next().context("--replot CSV")?)),
        Some("--check-agree") => {
            let a = args.next().context("--check-agree DIR1 DIR2")?;
            let b = args.next().context("--check-agree DIR1 DIR2")?;
            return check_agree(Path::new(&a), Path::new(&b));
        }
        _ => {}
    }
    let opts = parse_args()?;
    if let Some(queues) = &opts.scaling {
        return scaling::run(&opts, queues);
    }
    let workloads: Vec<Workload> = match &opts.workloads {
        Some(names) => WORKLOADS
            .iter()
            .filter(|w| names.iter().any(|n| n == w.name))
            .copied()
            .collect(),
        None if opts.tiny => vec![WORKLOADS[1], WORKLOADS[4]],
        None => WORKLOADS.to_vec(),
    };
    let configs: Vec<Config> = match &opts.configs {
        _ if opts.baseline_only => vec![],
        Some(names) => CONFIGS
            .iter()
            .filter(|c| names.iter().any(|n| n == c.name))
            .copied()
            .collect(),
        None if opts.tiny => vec![CONFIGS[0]],
        // The one-queue configurations; `copy 2-queue` on request (and `--scaling`).
        None => CONFIGS.iter().filter(|c| c.queues == 1).copied().collect(),
    };
    // The size of the run, for its estimate.
    let blk = 1 + usize::from(opts.compare.is_some());
    let (mut total_runs, mut count_runs) = (0, 0);
    for w in &workloads {
        let cs = configs.iter().filter(|c| runs(c, w)).count();
        let fio = usize::from(opts.fio.is_some() && (cs > 0 || opts.baseline_only));
        let direct = if opts.baseline_only { 4 } else { cs };
        total_runs += (direct + fio + cs * blk) * opts.pairs;
        count_runs += cs * blk;
    }
    total_runs *= opts.targets.len();
    count_runs *= opts.targets.len();
    let sessions = opts.targets.len() * configs.len() * blk;
    let estimate = total_runs as f64 * (opts.seconds + RUN_OVERHEAD_S)
        + count_runs as f64 * (opts.seconds.min(COUNT_SECONDS) + RUN_OVERHEAD_S)
        + sessions as f64 * SESSION_OVERHEAD_S;
    let total_runs = total_runs + count_runs;
    eprintln!(
        "perf: {total_runs} runs ({} interleaved repeats of {} s per case, {count_runs} short ones counting system calls), {sessions} blkbackd sessions: about {:.1} minutes",
        opts.pairs,
        opts.seconds,
        estimate / 60.0
    );
    let t_start = Instant::now();
    let mut done_runs = 0usize;
    let mut cases = Vec::new();
    for (tname, tdir) in &opts.targets {
        let image = make_image(tdir, opts.image_mib)
            .with_context(|| format!("image in {}", tdir.display()))?;
        let size = opts.image_mib << 20;
        let result = (|| -> anyhow::Result<()> {
            if opts.baseline_only {
                for w in &workloads {
                    let mut case = Case {
                        target: tname,
                        workload: *w,
                        config: NO_CONFIG,
                        d: vec![],
                        a: vec![],
                        b: vec![],
                        f: vec![],
                        sys_a: f64::NAN,
                        sys_b: f64::NAN,
                        more: vec![],
                    };
                    let (mut legacy, mut each, mut counted) = (vec![], vec![], vec![]);
                    for _ in 0..opts.pairs {
                        let run = |kind, perf_stat| {
                            run_direct(&image, *w, opts.seconds, size, kind, perf_stat)
                                .map(Measured::figures)
                        };
                        case.d.push(run(Direct::Tuned, false)?);
                        legacy.push(run(Direct::Legacy, false)?);
                        each.push(run(Direct::Each, false)?);
                        counted.push(run(Direct::Tuned, true)?);
                        if let Some((fio, _)) = &opts.fio {
                            case.f
                                .push(fio::run(fio, &image, *w, opts.seconds, size)?.figures());
                        }
                        done_runs += 4 + usize::from(opts.fio.is_some());
                    }
                    case.more = vec![
                        ("direct as before issue 19 (plain ring)", legacy),
                        ("direct, one submission per request", each),
                        ("direct under `perf stat`", counted),
                    ];
                    let r = ratio(&case.d, &case.f, |f| f.iops);
                    eprintln!(
                        "{tname:12} {:18} direct {:>9.0} IOPS  fio {:>9.0} IOPS  direct/fio {}  p50 {:.1} / {:.1} µs",
                        w.name,
                        of(&case.d, |f| f.iops).med,
                        of(&case.f, |f| f.iops).med,
                        r.ms(2, false),
                        of(&case.d, |f| f.p50).med,
                        of(&case.f, |f| f.p50).med,
                    );
                    cases.push(case);
                }
                return Ok(());
            }
            let mut fio_done = vec![false; workloads.len()];
            for c in &configs {
                let mut sa = Session::start(&opts.blkbackd, tdir, &image, *c, "")?;
                let mut sb = match &opts.compare {
                    Some(p) => Some(Session::start(p, tdir, &image, *c, "-B")?),
                    None => None,
                };
                for (wi, w) in workloads.iter().enumerate() {
                    if !runs(c, w) {
                        continue;
                    }
                    // fio once per workload and target: in the first configuration that runs
                    // it, interleaved with that case's repeats.
                    let fio = opts.fio.as_ref().filter(|_| !fio_done[wi]);
                    fio_done[wi] |= fio.is_some();
                    let mut case = Case {
                        target: tname,
                        workload: *w,
                        config: *c,
                        d: vec![],
                        a: vec![],
                        b: vec![],
                        f: vec![],
                        sys_a: f64::NAN,
                        sys_b: f64::NAN,
                        more: vec![],
                    };
                    for rep in 0..opts.pairs {
                        case.d.push(
                            run_direct(&image, *w, opts.seconds, size, Direct::Tuned, false)
                                .with_context(|| format!("{} direct", w.name))?
                                .figures(),
                        );
                        if let Some((fio, _)) = fio {
                            case.f.push(
                                fio::run(fio, &image, *w, opts.seconds, size)
                                    .with_context(|| format!("{} fio", w.name))?
                                    .figures(),
                            );
                        }
                        // A and B swap places every other repeat.
                        let b_first = rep % 2 == 1;
                        if b_first {
                            if let Some(sb) = sb.as_mut() {
                                case.b.push(
                                    sb.run(*w, opts.seconds, size, false)
                                        .with_context(|| format!("{} via blkbackd B", w.name))?
                                        .figures(),
                                );
                            }
                        }
                        case.a.push(
                            sa.run(*w, opts.seconds, size, false)
                                .with_context(|| format!("{} via blkbackd", w.name))?
                                .figures(),
                        );
                        if !b_first {
                            if let Some(sb) = sb.as_mut() {
                                case.b.push(
                                    sb.run(*w, opts.seconds, size, false)
                                        .with_context(|| format!("{} via blkbackd B", w.name))?
                                        .figures(),
                                );
                            }
                        }
                        done_runs += 2 + usize::from(fio.is_some()) + usize::from(sb.is_some());
                    }
                    // System calls: a short run of their own with `perf stat` attached.
                    let secs = opts.seconds.min(COUNT_SECONDS);
                    case.sys_a = sa.run(*w, secs, size, true)?.figures().sys;
                    if let Some(sb) = sb.as_mut() {
                        case.sys_b = sb.run(*w, secs, size, true)?.figures().sys;
                    }
                    done_runs += 1 + usize::from(sb.is_some());
                    let mut line = format!(
                        "{tname:12} {:18} {:26} direct {:>8.0}  blkbackd {:>8.0} IOPS  b/d {}",
                        w.name,
                        c.name,
                        of(&case.d, |f| f.iops).med,
                        of(&case.a, |f| f.iops).med,
                        ratio(&case.a, &case.d, |f| f.iops).ms(2, false),
                    );
                    if !case.f.is_empty() {
                        let _ = write!(
                            line,
                            "  fio {:.0}  d/fio {}",
                            of(&case.f, |f| f.iops).med,
                            ratio(&case.d, &case.f, |f| f.iops).ms(2, false)
                        );
                    }
                    if !case.b.is_empty() {
                        let _ = write!(
                            line,
                            "  B {:.0}  B/A {}",
                            of(&case.b, |f| f.iops).med,
                            ratio(&case.b, &case.a, |f| f.iops).ms(2, false)
                        );
                    }
                    let _ = write!(
                        line,
                        "  [{done_runs}/{total_runs} runs, {:.0} s]",
                        t_start.elapsed().as_secs_f64()
                    );
                    eprintln!("{line}");
                    cases.push(case);
                }
                sa.stop()?;
                if let Some(sb) = sb {
                    sb.stop()?;
                }
            }
            Ok(())
        })();
        let _ = std::fs::remove_dir_all(tdir);
        result?;
    }
    let took = t_start.elapsed().as_secs_f64();
    eprintln!(
        "perf: took {:.1} minutes (estimated {:.1})",
        took / 60.0,
        estimate / 60.0
    );
    write_results(&opts, &cases, took)
}

/// The fio figures of a case's workload and target (from whichever case ran fio).
fn fio_case<'a>(cases: &'a [Case], c: &Case) -> Option<&'a Case> {
    cases
        .iter()
        .find(|x| x.target == c.target && x.workload.name == c.workload.name && !x.f.is_empty())
}

/// The goals (RAM-backed target, one queue), judged on the medians.
fn goals(md: &mut String, cases: &[Case]) -> anyhow::Result<()> {
    writeln!(
        md,
        "\n## Goals (RAM-backed target, one queue), judged on the medians\n"
    )?;
    writeln!(md, "| goal | backend | median | spread (min–max) | met |")?;
    writeln!(md, "|---|---|---:|---:|---|")?;
    let row =
        |md: &mut String, goal: &str, who: &str, s: Spread, prec: usize, sign: bool, met: bool| {
            writeln!(
                md,
                "| {goal} | {who} | {} | {}–{} | {} |",
                num(s.med, prec, sign),
                num(s.min, prec, sign),
                num(s.max, prec, sign),
                if s.med.is_finite() { yes(met) } else { "n/a" }
            )
        };
    // The baseline first: is direct as strong as fio?
    for c in cases
        .iter()
        .filter(|c| c.target.starts_with("RAM") && !c.f.is_empty())
        .filter(|c| matches!(c.workload.pattern, Pattern::RandRead) && c.workload.bs == 4096)
    {
        let r = ratio(&c.d, &c.f, |f| f.iops);
        row(
            md,
            &format!("direct IOPS ≥ 0.9 × fio, {}", c.workload.name),
            "direct",
            r,
            2,
            false,
            r.med >= 0.9,
        )?;
    }
    for c in cases
        .iter()
        .filter(|c| c.target.starts_with("RAM") && c.config.queues == 1 && !c.a.is_empty())
    {
        let who = c.config.name;
        match (c.workload.pattern, c.workload.qd) {
            (Pattern::RandRead, 32) => {
                let r = ratio(&c.a, &c.d, |f| f.iops);
                row(
                    md,
                    "4K randread QD32 IOPS ≥ 0.9 × direct",
                    who,
                    r,
                    2,
                    false,
                    r.med >= 0.9,
                )?;
                writeln!(
                    md,
                    "| syscalls/request at QD32 ≤ 0.25 | {who} | {} | one counting run | {} |",
                    num(c.sys_a, 2, false),
                    if c.sys_a.is_finite() {
                        yes(c.sys_a <= 0.25)
                    } else {
                        "n/a"
                    }
                )?;
            }
            (Pattern::RandRead, 1) => {
                let d = diff(&c.a, &c.d, |f| f.p50);
                row(
                    md,
                    "4K randread QD1 p50 within 10 µs of direct (µs)",
                    who,
                    d,
                    1,
                    true,
                    d.med <= 10.0,
                )?;
            }
            (Pattern::SeqRead | Pattern::SeqWrite, _) => {
                let r = ratio(&c.a, &c.d, |f| f.mib_s);
                let goal = if matches!(c.workload.pattern, Pattern::SeqRead) {
                    "1M seqread bandwidth ≥ 0.97 × direct"
                } else {
                    "1M seqwrite bandwidth ≥ 0.97 × direct"
                };
                row(md, goal, who, r, 2, false, r.med >= 0.97)?;
            }
            _ => {}
        }
    }
    Ok(())
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

/// The date and time now, UTC, as `YYYY-MM-DD HH:MM`.
fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60
    )
}

/// One CSV row built column by column, so that header and values cannot drift apart.
#[derive(Default)]
struct CsvRow {
    names: Vec<String>,
    values: Vec<String>,
}

impl CsvRow {
    fn put(&mut self, name: &str, v: impl Into<String>) {
        self.names.push(name.into());
        self.values.push(v.into());
    }
    fn val(&mut self, name: &str, v: f64, prec: usize) {
        self.put(
            name,
            if v.is_finite() {
                format!("{v:.prec$}")
            } else {
                String::new()
            },
        );
    }
    /// `name`, `name_min`, `name_max`.
    fn spread(&mut self, name: &str, s: Spread, prec: usize) {
        self.val(name, s.med, prec);
        self.val(&format!("{name}_min"), s.min, prec);
        self.val(&format!("{name}_max"), s.max, prec);
    }
}

fn write_results(opts: &Opts, cases: &[Case], took: f64) -> anyhow::Result<()> {
    std::fs::create_dir_all(&opts.out)?;
    let mut md = String::new();
    let host = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let compare = opts.compare.is_some();
    let fio = opts
        .fio
        .as_ref()
        .map_or("no fio".to_owned(), |(_, v)| format!("fio `{v}`"));
    writeln!(
        md,
        "# blkbackd vs direct io_uring\n\nMeasured {} UTC, {cpus} CPUs, Linux {}, image {} MiB, {fio}; the run took {:.1} minutes. Each case ran as {} interleaved repeats of {} s: direct, fio (in the first configuration that runs the workload), blkbackd{}. Every figure is the median over the repeats; `(min–max)` is the spread of the per-repeat ratio (or difference) between a run and the direct run of the same repeat.\n\n`b` = through blkbackd (simulated platform; the load generator in this process plays blkfront on ring::FrontRing with data pages granted once), `d` = io_uring straight at the same file (`O_DIRECT`, the file registered, `COOP_TASKRUN | SINGLE_ISSUER | DEFER_TASKRUN` as fio sets its ring up), `fio` = fio's io_uring engine on the same file, block size, depth and pattern (`--direct=1`), `b/d` = ratio of IOPS. Latency from submission to completion seen by the submitter (fio: its total latency), in µs. CPU: utime+stime of the whole blkbackd process (of this process during the direct run; of the whole fio process, its start-up included), io_uring's io-wq workers included, 10 ms ticks. Syscalls: blkbackd's counted by `perf stat -e raw_syscalls:sys_enter` attached to its process in a 0.5 s run of their own after the repeats (perf's hooks slow what they watch, so no measured repeat runs under it); the direct run's are its own `io_uring_enter` calls, counted in its loop; none for fio. On tmpfs every request, fio's too, buffered or `O_DIRECT`, is handed to io_uring's io-wq workers (`perf stat -e io_uring:io_uring_queue_async_work` counts one per request): the direct and fio figures include that hop.\n",
        utc_now(),
        host.trim(),
        opts.image_mib,
        took / 60.0,
        opts.pairs,
        opts.seconds,
        if compare {
            format!(
                " A (`{}`), blkbackd B (`{}`), A and B swapping places every other repeat",
                opts.blkbackd.display(),
                opts.compare.as_ref().map_or(String::new(), |p| p.display().to_string())
            )
        } else {
            String::new()
        }
    )?;
    let mut csv = String::new();
    let with_b = cases.iter().any(|c| !c.a.is_empty());
    if with_b {
        write!(md, "| target | workload | backend | IOPS d | IOPS fio | IOPS b | b/d (min–max) | MiB/s b | p50 d | p50 b | p50 b−d (min–max) | p99 d | p99 b | p99.9 d | p99.9 b | CPU µs/req d | CPU µs/req b | syscalls/req d | syscalls/req b |")?;
        if compare {
            write!(md, " IOPS B | B/A (min–max) | p50 B | p50 B−A (min–max) | CPU µs/req B | syscalls/req B |")?;
        }
        writeln!(md)?;
        writeln!(
            md,
            "|---|---|---|{}",
            "---:|".repeat(if compare { 22 } else { 16 })
        )?;
    }
    for (n, c) in cases.iter().enumerate() {
        let f = fio_case(cases, c);
        let fiops = f.map_or(spread([]), |f| of(&f.f, |x| x.iops));
        let g = |v: &[Fig], k: fn(&Fig) -> f64| of(v, k);
        let (d, a, b) = (&c.d, &c.a, &c.b);
        if with_b {
            write!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                c.target,
                c.workload.name,
                c.config.name,
                g(d, |x| x.iops).m(0),
                fiops.m(0),
                g(a, |x| x.iops).m(0),
                ratio(a, d, |x| x.iops).ms(2, false),
                g(a, |x| x.mib_s).m(1),
                g(d, |x| x.p50).m(1),
                g(a, |x| x.p50).m(1),
                diff(a, d, |x| x.p50).ms(1, true),
                g(d, |x| x.p99).m(1),
                g(a, |x| x.p99).m(1),
                g(d, |x| x.p999).m(1),
                g(a, |x| x.p999).m(1),
                g(d, |x| x.cpu).m(1),
                g(a, |x| x.cpu).m(1),
                g(d, |x| x.sys).m(2),
                num(c.sys_a, 2, false),
            )?;
            if compare {
                write!(
                    md,
                    " {} | {} | {} | {} | {} | {} |",
                    g(b, |x| x.iops).m(0),
                    ratio(b, a, |x| x.iops).ms(2, false),
                    g(b, |x| x.p50).m(1),
                    diff(b, a, |x| x.p50).ms(1, true),
                    g(b, |x| x.cpu).m(1),
                    num(c.sys_b, 2, false),
                )?;
            }
            writeln!(md)?;
        }
        let mut r = CsvRow::default();
        r.put("target", c.target);
        r.put("workload", c.workload.name);
        r.put("backend", c.config.name);
        r.put("repeats", c.d.len().to_string());
        r.spread("iops_d", g(d, |x| x.iops), 0);
        r.spread("iops_fio", fiops, 0);
        r.spread("iops_b", g(a, |x| x.iops), 0);
        r.spread("ratio", ratio(a, d, |x| x.iops), 3);
        r.spread(
            "d_fio",
            f.map_or(spread([]), |f| ratio(&f.d, &f.f, |x| x.iops)),
            3,
        );
        r.val("mibs_d", g(d, |x| x.mib_s).med, 1);
        r.val("mibs_b", g(a, |x| x.mib_s).med, 1);
        r.val("p50_d", g(d, |x| x.p50).med, 1);
        r.val("p50_b", g(a, |x| x.p50).med, 1);
        r.spread("p50_diff", diff(a, d, |x| x.p50), 1);
        r.val(
            "p50_fio",
            f.map_or(f64::NAN, |f| of(&f.f, |x| x.p50).med),
            1,
        );
        r.val("mean_d", g(d, |x| x.mean).med, 1);
        r.val(
            "mean_fio",
            f.map_or(f64::NAN, |f| of(&f.f, |x| x.mean).med),
            1,
        );
        r.val("p99_d", g(d, |x| x.p99).med, 1);
        r.val("p99_b", g(a, |x| x.p99).med, 1);
        r.val("p999_d", g(d, |x| x.p999).med, 1);
        r.val("p999_b", g(a, |x| x.p999).med, 1);
        r.val("cpu_d", g(d, |x| x.cpu).med, 2);
        r.val("cpu_b", g(a, |x| x.cpu).med, 2);
        r.val("sys_d", g(d, |x| x.sys).med, 3);
        r.val("sys_b", c.sys_a, 3);
        r.spread("iops_B", g(b, |x| x.iops), 0);
        r.spread("ratio_BA", ratio(b, a, |x| x.iops), 3);
        r.val("p50_B", g(b, |x| x.p50).med, 1);
        r.spread("p50_diff_BA", diff(b, a, |x| x.p50), 1);
        r.val("cpu_B", g(b, |x| x.cpu).med, 2);
        r.val("sys_B", c.sys_b, 3);
        if n == 0 {
            writeln!(csv, "{}", r.names.join(","))?;
        }
        writeln!(csv, "{}", r.values.join(","))?;
    }
    // The baseline against fio.
    let fio_cases: Vec<&Case> = cases.iter().filter(|c| !c.f.is_empty()).collect();
    if !fio_cases.is_empty() {
        writeln!(md, "\n## The direct baseline against fio\n\nThe same file, block size, depth and pattern, in the same repeats (direct, fio, ...): `d/fio` is the median of the per-repeat IOPS ratios.\n")?;
        writeln!(md, "| target | workload | IOPS d | IOPS fio | d/fio (min–max) | p50 d | p50 fio | mean d | mean fio | CPU µs/req d | CPU µs/req fio |")?;
        writeln!(md, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")?;
        for c in fio_cases {
            writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                c.target,
                c.workload.name,
                of(&c.d, |x| x.iops).m(0),
                of(&c.f, |x| x.iops).m(0),
                ratio(&c.d, &c.f, |x| x.iops).ms(2, false),
                of(&c.d, |x| x.p50).m(1),
                of(&c.f, |x| x.p50).m(1),
                of(&c.d, |x| x.mean).m(1),
                of(&c.f, |x| x.mean).m(1),
                of(&c.d, |x| x.cpu).m(1),
                of(&c.f, |x| x.cpu).m(1),
            )?;
        }
    }
    // `--baseline`: the other direct variants against the tuned one and fio.
    let more: Vec<&Case> = cases.iter().filter(|c| !c.more.is_empty()).collect();
    if !more.is_empty() {
        writeln!(md, "\n## Direct variants, in the same repeats\n\n`x/d`: per-repeat IOPS ratio of the variant to the tuned direct run (`d` above); `x/fio`: to fio.\n")?;
        writeln!(md, "| target | workload | variant | IOPS x | x/d (min–max) | x/fio (min–max) | p50 x | mean x | CPU µs/req x | syscalls/req x |")?;
        writeln!(md, "|---|---|---|---:|---:|---:|---:|---:|---:|---:|")?;
        for c in more {
            for (name, x) in &c.more {
                writeln!(
                    md,
                    "| {} | {} | {name} | {} | {} | {} | {} | {} | {} | {} |",
                    c.target,
                    c.workload.name,
                    of(x, |x| x.iops).m(0),
                    ratio(x, &c.d, |x| x.iops).ms(2, false),
                    ratio(x, &c.f, |x| x.iops).ms(2, false),
                    of(x, |x| x.p50).m(1),
                    of(x, |x| x.mean).m(1),
                    of(x, |x| x.cpu).m(1),
                    of(x, |x| x.sys).m(2),
                )?;
            }
        }
    }
    if with_b {
        goals(&mut md, cases)?;
    }
    writeln!(
        md,
        "\nMulti-queue scaling: `perf --scaling 1,2,4,8` (`perf-scaling.md`). Two runs compared: `perf --check-agree DIR1 DIR2`."
    )?;
    let name = match (opts.tiny, opts.baseline_only) {
        (_, true) => "perf-baseline",
        (true, _) => "perf-tiny",
        _ => "perf",
    };
    std::fs::write(opts.out.join(format!("{name}.md")), &md)?;
    std::fs::write(opts.out.join(format!("{name}.csv")), &csv)?;
    if with_b {
        let bars: Vec<plot::Bar> = cases
            .iter()
            .map(|c| {
                let r = ratio(&c.a, &c.d, |x| x.iops);
                (
                    format!("{} {} {}", c.target, c.workload.name, c.config.name),
                    r.med,
                    Some((r.min, r.max)),
                )
            })
            .collect();
        plot::bars_spread(
            &opts.out.join(format!("{name}.png")),
            "blkbackd IOPS / direct io_uring IOPS (median, min-max)",
            &bars,
        )?;
    }
    print!("{md}");
    Ok(())
}

/// A CSV table as this harness writes it (no quoting: no field holds a comma).
struct Csv {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Csv {
    fn parse(text: &str) -> Self {
        let mut lines = text.lines().filter(|l| !l.is_empty());
        let header = lines
            .next()
            .unwrap_or_default()
            .split(',')
            .map(str::to_owned)
            .collect();
        let rows = lines
            .map(|l| l.split(',').map(str::to_owned).collect())
            .collect();
        Self { header, rows }
    }
    fn col(&self, name: &str) -> Option<usize> {
        self.header.iter().position(|h| h == name)
    }
    fn get(&self, row: &[String], name: &str) -> Option<f64> {
        row.get(self.col(name)?)?.parse().ok()
    }
}

/// `perf --check-agree DIR1 DIR2`: whether two runs (each `--out` directory's `perf.csv`,
/// else `perf-tiny.csv` or `perf-baseline.csv`) agree: for every case in both and every
/// figure given with its spread (`X`, `X_min`, `X_max`), at least one run's median lies
/// within the other run's min–max range. The paired figures (ratios to the direct run or to
/// A, p50 differences: what the tables and goals state) decide: each that disagrees is
/// printed and the exit status is 1. Absolute IOPS that disagree are printed as notes (a
/// machine's speed may drift between runs; the interleaving is there so that ratios do not).
fn check_agree(a: &Path, b: &Path) -> anyhow::Result<()> {
    let load = |dir: &Path| -> anyhow::Result<(PathBuf, Csv)> {
        let p = ["perf.csv", "perf-tiny.csv", "perf-baseline.csv"]
            .iter()
            .map(|n| dir.join(n))
            .find(|p| p.is_file())
            .with_context(|| format!("no perf.csv in {}", dir.display()))?;
        let text = std::fs::read_to_string(&p)?;
        Ok((p, Csv::parse(&text)))
    };
    let (pa, ta) = load(a)?;
    let (pb, tb) = load(b)?;
    println!("comparing {} with {}", pa.display(), pb.display());
    let figures: Vec<&str> = ta
        .header
        .iter()
        .filter(|h| ta.col(&format!("{h}_min")).is_some() && ta.col(&format!("{h}_max")).is_some())
        .map(String::as_str)
        .collect();
    let key = |r: &[String]| r.iter().take(3).cloned().collect::<Vec<_>>().join(" / ");
    let (mut checked, mut bad) = (0, 0);
    for ra in &ta.rows {
        let Some(rb) = tb.rows.iter().find(|rb| key(rb) == key(ra)) else {
            println!("only in the first run: {}", key(ra));
            continue;
        };
        for &f in &figures {
            let sa = (
                ta.get(ra, f),
                ta.get(ra, &format!("{f}_min")),
                ta.get(ra, &format!("{f}_max")),
            );
            let sb = (
                tb.get(rb, f),
                tb.get(rb, &format!("{f}_min")),
                tb.get(rb, &format!("{f}_max")),
            );
            let (Some(ma), Some(mina), Some(maxa)) = sa else {
                continue;
            };
            let (Some(mb), Some(minb), Some(maxb)) = sb else {
                continue;
            };
            let paired = ["ratio", "d_fio", "p50_diff"]
                .iter()
                .any(|p| f.starts_with(p));
            let ok = (mina..=maxa).contains(&mb) || (minb..=maxb).contains(&ma);
            if paired {
                checked += 1;
                bad += usize::from(!ok);
            }
            if !ok {
                println!(
                    "{} {} {f}: {ma} ({mina}–{maxa}) vs {mb} ({minb}–{maxb}), {:+.1} %",
                    if paired {
                        "DISAGREE"
                    } else {
                        "note: absolute figure differs:"
                    },
                    key(ra),
                    (mb / ma - 1.0) * 100.0
                );
            }
        }
    }
    println!("{checked} paired figures (ratios, p50 differences) compared, {bad} disagree");
    if bad > 0 {
        std::process::exit(1);
    }
    Ok(())
}

mod fio;
mod front;
mod plot;
mod scaling;
