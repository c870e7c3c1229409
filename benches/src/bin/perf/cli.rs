//! The command line.

use super::*;

pub(crate) struct Opts {
    pub(crate) tiny: bool,
    pub(crate) seconds: f64,
    /// Interleaved repeats of each case (direct, blkbackd, ...), at least 1.
    pub(crate) pairs: usize,
    pub(crate) out: PathBuf,
    pub(crate) targets: Vec<(&'static str, PathBuf)>,
    pub(crate) image_mib: u64,
    pub(crate) blkbackd: PathBuf,
    /// `--compare PATH`: a second blkbackd (B), run in every case beside the first (A).
    pub(crate) compare: Option<PathBuf>,
    /// `--scaling 1,2,4,8`: the multi-queue scaling run instead of the table.
    pub(crate) scaling: Option<Vec<u32>>,
    /// `--configs NAME,...`: only these backend configurations.
    pub(crate) configs: Option<Vec<String>>,
    /// `--workloads NAME,...`: only these workloads.
    pub(crate) workloads: Option<Vec<String>>,
    /// fio and its version, unless missing or `--no-fio`.
    pub(crate) fio: Option<(PathBuf, String)>,
    /// `--baseline`: only direct against fio, no blkbackd.
    pub(crate) baseline_only: bool,
}

pub(crate) const HELP: &str = "\
perf [--tiny] [--seconds S] [--pairs N] [--targets ram,disk,nbd] [--configs NAME,...]
     [--workloads NAME,...] [--out DIR] [--blkbackd PATH] [--compare PATH] [--no-fio]
perf --baseline [--seconds S] [--pairs N] [--workloads NAME,...]   direct vs fio only
perf --scaling 1,2,4,8 [--targets ram] [--seconds S]
perf --check-agree DIR1 DIR2    do two runs' medians agree within their spreads?
perf --replot CSV

Every case runs as N interleaved repeats (direct, fio, blkbackd A[, blkbackd B]; A and B
swap places every other repeat); the tables give the medians and the min-max spread of the
per-repeat ratios. Default: RAM target, configurations copy and map+persistent (the polling
variants and `copy 2-queue` with --configs), all workloads, 5 repeats of 2 s (about 7
minutes). Target nbd:
the image on tmpfs served by qemu-storage-daemon over a Unix socket, blkbackd given its URI,
the baseline an NBD client on one connection at the same queue depth (no fio).";

/// The comma-separated names in `list`, each one of `known` (the option's error names a
/// `what` it does not know, and lists them).
fn known_names(
    option: &str,
    what: &str,
    list: &str,
    known: &[&str],
) -> anyhow::Result<Vec<String>> {
    let names: Vec<String> = list.split(',').map(str::to_owned).collect();
    if let Some(n) = names.iter().find(|n| !known.contains(&n.as_str())) {
        bail!("{option}: no {what} {n:?} (known: {})", known.join(", "));
    }
    Ok(names)
}

pub(crate) fn parse_args() -> anyhow::Result<Opts> {
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
                let known: Vec<&str> = CONFIGS.iter().map(|c| c.name).collect();
                configs = Some(known_names("--configs", "configuration", &list, &known)?);
            }
            "--workloads" => {
                let list = args.next().context("--workloads NAME,...")?;
                let known: Vec<&str> = WORKLOADS.iter().map(|w| w.name).collect();
                workloads = Some(known_names("--workloads", "workload", &list, &known)?);
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
            "nbd" => targets.push((
                NBD_TARGET,
                PathBuf::from(format!("/dev/shm/blkbackd-perf-nbd-{pid}")),
            )),
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
        pairs: pairs.unwrap_or(DEFAULT_PAIRS),
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

/// Interleaved repeats of each case in the default (full) run.
pub(crate) const DEFAULT_PAIRS: usize = 5;
/// Seconds per run of the default (full) run: 5 repeats of 14 cases and 7 fio runs, 189 runs
/// in all with the counting ones (about 7 minutes).
pub(crate) const DEFAULT_SECONDS: f64 = 2.0;
