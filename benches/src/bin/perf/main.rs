//! The performance harness: the real `blkbackd serve` process, driven by a load generator
//! playing the frontend on the simulated platform (`front`: blkfront's handshake, then
//! `ring::FrontRing` with data pages granted once), against the same
//! workload issued with io_uring straight at the same target in the same run (the physical
//! limit of this machine), and fio on the same file when it is installed (`fio`). With
//! `--targets nbd` the disk is an NBD export (qemu-storage-daemon on tmpfs) and the baseline
//! an NBD client straight at it (`nbd_target`). Writes
//! `perf.md` (Markdown tables), `perf.csv` and `perf.png` to `benches/results/` (or `--out`).
//!
//! `cargo run --release -p benches --bin perf` (full), `... -- --tiny` (what CI runs),
//! `... -- --help` for the rest (`--compare`, `--baseline`, `--check-agree`).
//!
//! Every case runs as interleaved repeats (direct, fio, blkbackd A[, blkbackd B], direct,
//! ...; 3 by default), so that a machine's drift hits both sides of a ratio, and its repeats
//! lie in rounds spread over the whole run (`rounds`), so that slow drift shows in the
//! spread rather than between runs; the tables give
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

mod cases;
mod cli;
mod direct;
mod fio;
mod front;
mod measure;
mod nbd_target;
mod plot;
mod report;
mod rounds;
mod scaling;
mod session;
mod spread;

use cases::*;
use cli::*;
use direct::*;
use measure::*;
use nbd_target::*;
use report::*;
use rounds::*;
use session::*;
use spread::*;

const GUEST: u16 = 1;
const DEVID: u32 = 51712;

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
        // The default configurations: one queue, blkbackd's default polling; `copy 2-queue`
        // and the variants without polling or with `--sqpoll` on request (and `--scaling`). Fewer cases leave time for more repeats,
        // which is what makes two runs agree (issue 19).
        None => CONFIGS
            .iter()
            .filter(|c| c.queues == 1 && c.poll_us.is_none() && !c.sqpoll)
            .copied()
            .collect(),
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
    let sessions = opts.targets.len() * configs.len() * blk * opts.pairs;
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
    let mut progress = Progress {
        done: 0,
        total: total_runs,
        started: Instant::now(),
    };
    let mut cases = Vec::new();
    for (tname, tdir) in &opts.targets {
        let image = make_image(tdir, opts.image_mib)
            .with_context(|| format!("image in {}", tdir.display()))?;
        let size = opts.image_mib << 20;
        let result = (|| -> anyhow::Result<()> {
            if *tname == NBD_TARGET {
                if opts.baseline_only {
                    bail!("--baseline compares with fio, which has no NBD target here");
                }
                let server = NbdServer::start(&image, tdir)?;
                let target = Target::Nbd(&server.uri);
                cases.extend(run_rounds(
                    &opts,
                    tname,
                    tdir,
                    target,
                    size,
                    &workloads,
                    &configs,
                    &mut progress,
                )?);
                return Ok(());
            }
            if opts.baseline_only {
                for w in &workloads {
                    let mut case = Case::new(tname, *w, NO_CONFIG);
                    let (mut legacy, mut batched, mut counted) = (vec![], vec![], vec![]);
                    for _ in 0..opts.pairs {
                        let run = |kind, perf_stat| {
                            run_direct(&image, *w, opts.seconds, size, kind, perf_stat)
                                .map(Measured::figures)
                        };
                        case.d.push(run(Direct::Tuned, false)?);
                        legacy.push(run(Direct::Legacy, false)?);
                        batched.push(run(Direct::Batched, false)?);
                        counted.push(run(Direct::Tuned, true)?);
                        if let Some((fio, _)) = &opts.fio {
                            case.f
                                .push(fio::run(fio, &image, *w, opts.seconds, size)?.figures());
                        }
                        progress.done += 4 + usize::from(opts.fio.is_some());
                    }
                    case.more = vec![
                        ("direct as before issue 19 (plain ring)", legacy),
                        (
                            "direct, one system call per batch (before fio's pattern)",
                            batched,
                        ),
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
            cases.extend(run_rounds(
                &opts,
                tname,
                tdir,
                Target::File(&image),
                size,
                &workloads,
                &configs,
                &mut progress,
            )?);
            Ok(())
        })();
        let _ = std::fs::remove_dir_all(tdir);
        result?;
    }
    let took = progress.started.elapsed().as_secs_f64();
    eprintln!(
        "perf: took {:.1} minutes (estimated {:.1})",
        took / 60.0,
        estimate / 60.0
    );
    write_results(&opts, &cases, took)
}
