//! Multi-queue scaling (`perf --scaling 1,2,4,8`): one disk served by blkbackd with N queues,
//! each queue driven by a load-generator thread of its own (as blkfront drives each queue
//! from its own CPU), beside N threads with an io_uring each straight at the same target.
//! Needs about 2N + 2 cores to mean anything; writes `perf-scaling.{md,csv,png}`.

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use crate::{
    cpu_ticks, direct_loop, fmt_opt, make_image, Config, Gen, Measured, Opts, Pattern, Session,
    SyscallCounter, Workload,
};

/// Per queue (and per direct thread): the QD32 random workloads of the single-queue table.
const WORKLOADS: &[Workload] = &[
    Workload {
        name: "4K randread QD32/queue",
        pattern: Pattern::RandRead,
        bs: 4096,
        qd: 32,
    },
    Workload {
        name: "4K randwrite QD32/queue",
        pattern: Pattern::RandWrite,
        bs: 4096,
        qd: 32,
    },
];

const MODES: &[(&str, &str, bool)] = &[("copy", "copy", false), ("map+persistent", "map", true)];

impl Measured {
    /// Adds the figures of a thread that ran beside this one.
    fn merge(&mut self, other: Measured) {
        self.requests += other.requests;
        self.bytes += other.bytes;
        self.elapsed = self.elapsed.max(other.elapsed);
        self.lat_us.extend(other.lat_us);
    }
}

impl Session {
    /// Runs `w` on every queue at once, one thread per queue.
    fn run_parallel(&mut self, w: Workload, secs: f64, image: u64) -> anyhow::Result<Measured> {
        let pid = self.backend.id();
        let stat = format!("/proc/{pid}/stat");
        let counter = SyscallCounter::start("-p", pid);
        let cpu0 = cpu_ticks(&stat);
        let front = self.front.as_mut().context("closed")?;
        let (dom, queues) = front.split();
        let results: Vec<anyhow::Result<(Measured, u64)>> = std::thread::scope(|s| {
            let threads: Vec<_> = queues
                .iter_mut()
                .enumerate()
                .map(|(i, q)| {
                    s.spawn(move || -> anyhow::Result<(Measured, u64)> {
                        let mut gen = Gen::seeded(w, image, i as u64);
                        let mut m = Measured::default();
                        let mut failed = 0u64;
                        let mut in_flight = 0;
                        let t0 = Instant::now();
                        let end = t0 + Duration::from_secs_f64(secs);
                        loop {
                            let mut queued = false;
                            while in_flight < w.qd && Instant::now() < end && q.can_submit(w.bs) {
                                let (off, write) = gen.next();
                                q.submit(dom, off, w.bs, write)?;
                                in_flight += 1;
                                queued = true;
                            }
                            if queued {
                                q.push(dom)?;
                            }
                            if in_flight == 0 {
                                break;
                            }
                            q.complete(dom, |lat, ok| {
                                in_flight -= 1;
                                failed += u64::from(!ok);
                                m.record(lat, w.bs);
                            })?;
                        }
                        m.elapsed = t0.elapsed();
                        Ok((m, failed))
                    })
                })
                .collect();
            threads
                .into_iter()
                .map(|t| {
                    t.join()
                        .unwrap_or_else(|_| bail!("a queue thread panicked"))
                })
                .collect()
        });
        let mut total = Measured::default();
        let mut failed = 0;
        for r in results {
            let (m, f) = r?;
            total.merge(m);
            failed += f;
        }
        total.cpu_ticks = cpu_ticks(&stat).zip(cpu0).map(|(a, b)| a - b);
        total.syscalls = counter.stop();
        if failed > 0 {
            bail!("{failed} requests failed");
        }
        Ok(total)
    }
}

/// `threads` io_uring threads at once on `path`, each `w.qd` deep.
fn direct_parallel(
    path: &Path,
    w: Workload,
    secs: f64,
    image: u64,
    threads: u32,
) -> anyhow::Result<Measured> {
    let counter = SyscallCounter::start("-p", std::process::id());
    let cpu0 = cpu_ticks("/proc/self/stat");
    let results: Vec<anyhow::Result<Measured>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|i| s.spawn(move || direct_loop(path, w, secs, Gen::seeded(w, image, i.into()))))
            .collect();
        handles
            .into_iter()
            .map(|t| {
                t.join()
                    .unwrap_or_else(|_| bail!("a direct thread panicked"))
            })
            .collect()
    });
    let mut total = Measured::default();
    for r in results {
        total.merge(r?);
    }
    total.cpu_ticks = cpu_ticks("/proc/self/stat").zip(cpu0).map(|(a, b)| a - b);
    total.syscalls = counter.stop();
    Ok(total)
}

struct Point {
    mode: &'static str,
    workload: &'static str,
    queues: u32,
    b: Measured,
    d: Measured,
}

/// The scaling run over `queue_counts`, on the first target of `--targets`.
pub fn run(opts: &Opts, queue_counts: &[u32]) -> anyhow::Result<()> {
    let (tname, tdir) = opts.targets.first().context("no target")?;
    if *tname == crate::nbd_target::NBD_TARGET {
        bail!("--scaling has no NBD target (its baseline is io_uring on a file)");
    }
    let image =
        make_image(tdir, opts.image_mib).with_context(|| format!("image in {}", tdir.display()))?;
    let size = opts.image_mib << 20;
    let mut points = Vec::new();
    let result = (|| -> anyhow::Result<()> {
        for &(mode, grant_mode, persistent) in MODES {
            for &queues in queue_counts {
                let c = Config {
                    name: mode,
                    grant_mode,
                    persistent,
                    queues,
                    poll_us: None,
                    sqpoll: false,
                };
                let params = image.to_str().context("utf-8 path")?;
                let mut s = Session::start(&opts.blkbackd, tdir, params, c, "")?;
                for w in WORKLOADS {
                    let b = s
                        .run_parallel(*w, opts.seconds, size)
                        .with_context(|| format!("{} via blkbackd, {queues} queues", w.name))?;
                    let d = direct_parallel(&image, *w, opts.seconds, size, queues)
                        .with_context(|| format!("{} direct, {queues} threads", w.name))?;
                    eprintln!(
                        "{tname:12} {:24} {mode:15} {queues} queues: blkbackd {:>9.0} IOPS  direct {:>9.0} IOPS  ratio {:.2}",
                        w.name,
                        b.iops(),
                        d.iops(),
                        b.iops() / d.iops()
                    );
                    points.push(Point {
                        mode,
                        workload: w.name,
                        queues,
                        b,
                        d,
                    });
                }
                s.stop()?;
            }
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(tdir);
    result?;
    write(opts, tname, &mut points)
}

fn write(opts: &Opts, target: &str, points: &mut [Point]) -> anyhow::Result<()> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let host = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut md = String::new();
    writeln!(
        md,
        "# blkbackd multi-queue scaling\n\n{target}, {} s per case, {cpus} CPUs, Linux {}, image {} MiB. N queues of one disk, each driven by its own load-generator thread (`b`), against N threads with an io_uring each straight at the same file (`d`). Speed-up: IOPS over the same mode's 1-queue IOPS. CPU: utime+stime of the whole blkbackd process per request, 10 ms ticks. Syscalls: `perf stat -e raw_syscalls:sys_enter` on the blkbackd process, n/a where perf is missing.\n",
        opts.seconds,
        host.trim(),
        opts.image_mib
    )?;
    writeln!(md, "| mode | workload | queues | IOPS b | IOPS d | b/d | speed-up b | speed-up d | p50 b | p99 b | p50 d | p99 d | CPU µs/req b | syscalls/req b |")?;
    writeln!(
        md,
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )?;
    let mut csv = String::from(
        "mode,workload,queues,iops_b,iops_d,ratio,speedup_b,speedup_d,p50_b,p99_b,p50_d,p99_d,cpu_b,sys_b\n",
    );
    let base: Vec<(&str, &str, f64, f64)> = points
        .iter()
        .filter(|p| p.queues == 1)
        .map(|p| (p.mode, p.workload, p.b.iops(), p.d.iops()))
        .collect();
    let mut bars = Vec::new();
    for p in points.iter_mut() {
        let (b1, d1) = base
            .iter()
            .find(|(m, w, _, _)| *m == p.mode && *w == p.workload)
            .map_or((f64::NAN, f64::NAN), |&(_, _, b, d)| (b, d));
        let ratio = p.b.iops() / p.d.iops();
        let (sb, sd) = (p.b.iops() / b1, p.d.iops() / d1);
        let (p50b, p99b, p50d, p99d) = (p.b.pct(0.5), p.b.pct(0.99), p.d.pct(0.5), p.d.pct(0.99));
        let cpu = fmt_opt(p.b.cpu_us_per_req(), 1);
        let sys = fmt_opt(p.b.sys_per_req(), 2);
        writeln!(
            md,
            "| {} | {} | {} | {:.0} | {:.0} | {ratio:.2} | {sb:.2} | {sd:.2} | {p50b:.1} | {p99b:.1} | {p50d:.1} | {p99d:.1} | {cpu} | {sys} |",
            p.mode, p.workload, p.queues, p.b.iops(), p.d.iops()
        )?;
        writeln!(
            csv,
            "{},{},{},{:.0},{:.0},{ratio:.3},{sb:.3},{sd:.3},{p50b:.1},{p99b:.1},{p50d:.1},{p99d:.1},{cpu},{sys}",
            p.mode, p.workload, p.queues, p.b.iops(), p.d.iops()
        )?;
        bars.push((format!("{} {} {}q", p.mode, p.workload, p.queues), ratio));
    }
    std::fs::create_dir_all(&opts.out)?;
    std::fs::write(opts.out.join("perf-scaling.md"), &md)?;
    std::fs::write(opts.out.join("perf-scaling.csv"), &csv)?;
    crate::plot::bars(
        &opts.out.join("perf-scaling.png"),
        "blkbackd IOPS / direct io_uring IOPS, N queues vs N threads",
        &bars,
    )?;
    print!("{md}");
    Ok(())
}
