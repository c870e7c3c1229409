//! The performance harness: the real `blkbackd serve` process, driven by a load generator
//! playing the frontend on the simulated platform (`front`: blkfront's handshake, then
//! `ring::FrontRing` with data pages granted once), against the same
//! workload issued with io_uring straight at the same target in the same run (the physical
//! limit of this machine). Writes `perf.md` (Markdown table), `perf.csv` and `perf.png` to
//! `benches/results/` (or `--out`).
//!
//! `cargo run --release -p benches --bin perf` (full), `... -- --tiny` (what CI runs).
//!
//! Metrics per case: IOPS, bandwidth, p50/p99/p99.9 latency (from submission by the
//! frontend to its seeing the completion), CPU time per request (utime + stime of the whole
//! backend process from `/proc/<pid>/stat`, or of this process during the direct run, which
//! counts the io_uring's kernel workers too), and system calls per request, counted with
//! `perf stat -e raw_syscalls:sys_enter` attached to the backend process (all its threads) or
//! to the direct thread; "n/a" where perf is missing.

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

#[derive(Debug, Clone, Default)]
struct Measured {
    requests: u64,
    bytes: u64,
    elapsed: Duration,
    lat_us: Vec<f64>,
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
            return f64::NAN;
        }
        self.lat_us.sort_by(f64::total_cmp);
        let i = ((self.lat_us.len() as f64 - 1.0) * p).round() as usize;
        self.lat_us[i]
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
}

struct Opts {
    tiny: bool,
    seconds: f64,
    out: PathBuf,
    targets: Vec<(&'static str, PathBuf)>,
    image_mib: u64,
    blkbackd: PathBuf,
    /// `--scaling 1,2,4,8`: the multi-queue scaling run instead of the table.
    scaling: Option<Vec<u32>>,
    /// `--configs NAME,...`: only these backend configurations (default: all).
    configs: Option<Vec<String>>,
}

fn parse_args() -> anyhow::Result<Opts> {
    let mut tiny = false;
    let mut seconds = None;
    let mut out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("results");
    let mut blkbackd = None;
    let mut which = "ram,disk".to_owned();
    let mut scaling = None;
    let mut configs = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--tiny" => tiny = true,
            "--seconds" => seconds = Some(args.next().context("--seconds N")?.parse()?),
            "--out" => out = args.next().context("--out DIR")?.into(),
            "--blkbackd" => blkbackd = Some(PathBuf::from(args.next().context("--blkbackd PATH")?)),
            "--targets" => which = args.next().context("--targets ram,disk")?,
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
                println!("perf [--tiny] [--seconds S] [--targets ram,disk] [--out DIR] [--blkbackd PATH] [--configs NAME,...] [--scaling 1,2,4,8] | perf --replot CSV");
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
    let blkbackd = match blkbackd {
        Some(b) => b,
        None => build_blkbackd()?,
    };
    Ok(Opts {
        tiny,
        seconds: seconds.unwrap_or(if tiny { 0.3 } else { 3.0 }),
        out,
        targets,
        image_mib: if tiny { 16 } else { 512 },
        blkbackd,
        scaling,
        configs,
    })
}

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

fn run_direct(path: &Path, w: Workload, secs: f64, image: u64) -> anyhow::Result<Measured> {
    let tid = rustix::thread::gettid().as_raw_nonzero().get() as u32;
    let counter = SyscallCounter::start("-t", tid);
    let cpu0 = cpu_ticks("/proc/self/stat");
    let mut m = direct_loop(path, w, secs, Gen::new(w, image))?;
    m.cpu_ticks = cpu_ticks("/proc/self/stat").zip(cpu0).map(|(a, b)| a - b);
    m.syscalls = counter.stop();
    Ok(m)
}

/// One io_uring kept `w.qd` deep on `path` for `secs`.
fn direct_loop(path: &Path, w: Workload, secs: f64, mut gen: Gen) -> anyhow::Result<Measured> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc_o_direct())
        .open(path)?;
    let mut ring = io_uring::IoUring::new(64)?;
    let buf = Aligned::new(w.bs * w.qd);
    let mut started: Vec<Option<Instant>> = vec![None; w.qd];
    let mut free: Vec<usize> = (0..w.qd).collect();
    let mut m = Measured::default();
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs_f64(secs);
    loop {
        let now = Instant::now();
        while let Some(i) = (now < end).then(|| free.pop()).flatten() {
            let (off, write) = gen.next();
            // SAFETY: slot i's part of `buf` belongs to this one operation until its CQE.
            let p = unsafe { buf.ptr.add(i * w.bs) };
            let fd = io_uring::types::Fd(f.as_raw_fd());
            let e = if write {
                io_uring::opcode::Write::new(fd, p, w.bs as u32)
                    .offset(off)
                    .build()
            } else {
                io_uring::opcode::Read::new(fd, p, w.bs as u32)
                    .offset(off)
                    .build()
            };
            started[i] = Some(Instant::now());
            // SAFETY: the buffer outlives the operation (we wait for every CQE below).
            unsafe { ring.submission().push(&e.user_data(i as u64))? };
        }
        if free.len() == w.qd {
            break;
        }
        ring.submit_and_wait(1)?;
        let done: Vec<(u64, i32)> = ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        let now = Instant::now();
        for (i, res) in done {
            let i = i as usize;
            if res != w.bs as i32 {
                bail!("direct I/O failed: {res}");
            }
            if let Some(s) = started[i].take() {
                m.lat_us.push((now - s).as_secs_f64() * 1e6);
            }
            m.requests += 1;
            m.bytes += w.bs as u64;
            free.push(i);
        }
    }
    m.elapsed = t0.elapsed();
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
    fn start(opts: &Opts, work: &Path, image: &Path, c: Config) -> anyhow::Result<Self> {
        let dir = work.join(format!("sim-{}", c.name.replace([' ', ',', '+'], "_")));
        let _ = std::fs::remove_dir_all(&dir);
        let xenstored = sim::xenstored::SimXenstored::start(sim::xenstored_dir(&dir))?;
        xenstored.introduce_domain(GUEST)?;
        let dom0 = xen::xenstore::XenStore::open_at(sim::xenstore_socket(&dir, 0))?;
        let spec = VbdSpec::disk(0, GUEST, DEVID, image.to_str().context("utf-8 path")?);
        toolstack::create_vbd(&dom0, &spec)?;
        let mut cmd = Command::new(&opts.blkbackd);
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

    fn run(&mut self, w: Workload, secs: f64, image: u64) -> anyhow::Result<Measured> {
        let pid = self.backend.id();
        let front = self.front.as_mut().context("closed")?;
        let queues = front.queues();
        let mut gen = Gen::new(w, image);
        let counter = SyscallCounter::start("-p", pid);
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
        m.syscalls = counter.stop();
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

struct Row {
    target: &'static str,
    workload: Workload,
    config: Config,
    b: Measured,
    d: Measured,
}

fn fmt_opt(v: Option<f64>, prec: usize) -> String {
    v.map_or("n/a".into(), |v| format!("{v:.prec$}"))
}

/// `perf --replot CSV`: redraws the plot of an earlier run.
fn replot(csv: &Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(csv)?;
    let bars: Vec<(String, f64)> = text
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            Some((
                format!("{} {} {}", f.first()?, f.get(1)?, f.get(2)?),
                f.get(5)?.parse().ok()?,
            ))
        })
        .collect();
    plot::bars(
        &csv.with_extension("png"),
        "blkbackd IOPS / direct io_uring IOPS",
        &bars,
    )?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    if args.next().as_deref() == Some("--replot") {
        return replot(Path::new(&args.next().context("--replot CSV")?));
    }
    let opts = parse_args()?;
    if let Some(queues) = &opts.scaling {
        return scaling::run(&opts, queues);
    }
    let workloads: Vec<Workload> = if opts.tiny {
        vec![WORKLOADS[1], WORKLOADS[4]]
    } else {
        WORKLOADS.to_vec()
    };
    let configs: Vec<Config> = match &opts.configs {
        Some(names) => CONFIGS
            .iter()
            .filter(|c| names.iter().any(|n| n == c.name))
            .copied()
            .collect(),
        None if opts.tiny => vec![CONFIGS[0]],
        None => CONFIGS.to_vec(),
    };
    let mut rows = Vec::new();
    for (tname, tdir) in &opts.targets {
        let image = make_image(tdir, opts.image_mib)
            .with_context(|| format!("image in {}", tdir.display()))?;
        let size = opts.image_mib << 20;
        let result = (|| -> anyhow::Result<()> {
            for c in &configs {
                let mut s = Session::start(&opts, tdir, &image, *c)?;
                for w in &workloads {
                    if c.queues > 1 && w.qd == 1 {
                        continue;
                    }
                    let b = s
                        .run(*w, opts.seconds, size)
                        .with_context(|| format!("{} via blkbackd", w.name))?;
                    let d = run_direct(&image, *w, opts.seconds, size)
                        .with_context(|| format!("{} direct", w.name))?;
                    eprintln!(
                        "{tname:12} {:18} {:15} blkbackd {:>9.0} IOPS  direct {:>9.0} IOPS  ratio {:.2}",
                        w.name,
                        c.name,
                        b.iops(),
                        d.iops(),
                        b.iops() / d.iops()
                    );
                    rows.push(Row {
                        target: tname,
                        workload: *w,
                        config: *c,
                        b,
                        d,
                    });
                }
                s.stop()?;
            }
            Ok(())
        })();
        let _ = std::fs::remove_dir_all(tdir);
        result?;
    }
    write_results(&opts, &mut rows)
}

/// The goals (RAM-backed target, one queue), case by case.
fn goals(md: &mut String, rows: &mut [Row]) -> anyhow::Result<()> {
    writeln!(md, "\n## Goals (RAM-backed target, one queue)\n")?;
    writeln!(md, "| goal | backend | measured | met |")?;
    writeln!(md, "|---|---|---:|---|")?;
    for r in rows
        .iter_mut()
        .filter(|r| r.target.starts_with("RAM") && r.config.queues == 1)
    {
        let (name, value, met) = match (r.workload.pattern, r.workload.qd) {
            (Pattern::RandRead, 32) => {
                let ratio = r.b.iops() / r.d.iops();
                writeln!(
                    md,
                    "| 4K randread QD32 IOPS ≥ 0.9 × direct | {} | {:.2} | {} |",
                    r.config.name,
                    ratio,
                    yes(ratio >= 0.9)
                )?;
                let s = r.b.sys_per_req();
                (
                    "syscalls/request at QD32 ≤ 0.25",
                    fmt_opt(s, 2),
                    s.is_some_and(|s| s <= 0.25),
                )
            }
            (Pattern::RandRead, 1) => {
                let d = r.b.pct(0.5) - r.d.pct(0.5);
                (
                    "4K randread QD1 p50 within 10 µs of direct",
                    format!("{d:+.1} µs"),
                    d <= 10.0,
                )
            }
            (Pattern::SeqRead | Pattern::SeqWrite, _) => {
                let ratio = r.b.mib_s() / r.d.mib_s();
                let name = if matches!(r.workload.pattern, Pattern::SeqRead) {
                    "1M seqread bandwidth ≥ 0.97 × direct"
                } else {
                    "1M seqwrite bandwidth ≥ 0.97 × direct"
                };
                (name, format!("{ratio:.2}"), ratio >= 0.97)
            }
            _ => continue,
        };
        writeln!(
            md,
            "| {name} | {} | {value} | {} |",
            r.config.name,
            yes(met)
        )?;
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

fn write_results(opts: &Opts, rows: &mut [Row]) -> anyhow::Result<()> {
    std::fs::create_dir_all(&opts.out)?;
    let mut md = String::new();
    let host = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    writeln!(
        md,
        "# blkbackd vs direct io_uring\n\n{} s per case, {} CPUs, Linux {}, image {} MiB. `b` = through blkbackd (simulated platform; the load generator in this process plays blkfront on ring::FrontRing with data pages granted once), `d` = io_uring straight at the same file (O_DIRECT), `b/d` = ratio. Latency from submission to completion seen by the submitter, in µs. CPU: utime+stime of the whole blkbackd process (of this process during the direct run), io_uring kernel workers included, 10 ms ticks. Syscalls: `perf stat -e raw_syscalls:sys_enter` on the blkbackd process (the direct thread).\n",
        opts.seconds,
        cpus,
        host.trim(),
        opts.image_mib
    )?;
    writeln!(md, "| target | workload | backend | IOPS b | IOPS d | b/d | MiB/s b | MiB/s d | p50 b | p50 d | p50 b−d | p99 b | p99 d | p99.9 b | p99.9 d | CPU µs/req b | CPU µs/req d | syscalls/req b | syscalls/req d |")?;
    writeln!(md, "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")?;
    let mut csv = String::from("target,workload,backend,iops_b,iops_d,ratio,mibs_b,mibs_d,p50_b,p50_d,p99_b,p99_d,p999_b,p999_d,cpu_b,cpu_d,sys_b,sys_d\n");
    for r in rows.iter_mut() {
        let (p50b, p50d) = (r.b.pct(0.5), r.d.pct(0.5));
        let (p99b, p99d) = (r.b.pct(0.99), r.d.pct(0.99));
        let (p999b, p999d) = (r.b.pct(0.999), r.d.pct(0.999));
        let ratio = r.b.iops() / r.d.iops();
        writeln!(
            md,
            "| {} | {} | {} | {:.0} | {:.0} | {:.2} | {:.1} | {:.1} | {:.1} | {:.1} | {:+.1} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {} | {} | {} |",
            r.target, r.workload.name, r.config.name, r.b.iops(), r.d.iops(), ratio, r.b.mib_s(), r.d.mib_s(),
            p50b, p50d, p50b - p50d, p99b, p99d, p999b, p999d,
            fmt_opt(r.b.cpu_us_per_req(), 1), fmt_opt(r.d.cpu_us_per_req(), 1),
            fmt_opt(r.b.sys_per_req(), 2), fmt_opt(r.d.sys_per_req(), 2),
        )?;
        writeln!(
            csv,
            "{},{},{},{:.0},{:.0},{:.3},{:.1},{:.1},{:.1},{:.1},{:.1},{:.1},{:.1},{:.1},{},{},{},{}",
            r.target, r.workload.name, r.config.name, r.b.iops(), r.d.iops(), ratio, r.b.mib_s(), r.d.mib_s(),
            p50b, p50d, p99b, p99d, p999b, p999d,
            fmt_opt(r.b.cpu_us_per_req(), 2), fmt_opt(r.d.cpu_us_per_req(), 2),
            fmt_opt(r.b.sys_per_req(), 3), fmt_opt(r.d.sys_per_req(), 3),
        )?;
    }
    goals(&mut md, rows)?;
    writeln!(
        md,
        "\nMulti-queue scaling: `perf --scaling 1,2,4,8` (`perf-scaling.md`)."
    )?;
    let name = if opts.tiny { "perf-tiny" } else { "perf" };
    std::fs::write(opts.out.join(format!("{name}.md")), &md)?;
    std::fs::write(opts.out.join(format!("{name}.csv")), &csv)?;
    let bars: Vec<(String, f64)> = rows
        .iter()
        .map(|r| {
            (
                format!("{} {} {}", r.target, r.workload.name, r.config.name),
                r.b.iops() / r.d.iops(),
            )
        })
        .collect();
    plot::bars(
        &opts.out.join(format!("{name}.png")),
        "blkbackd IOPS / direct io_uring IOPS",
        &bars,
    )?;
    print!("{md}");
    Ok(())
}

mod front;
mod plot;
mod scaling;
