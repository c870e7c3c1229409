//! The repeats of a full run, as rounds: each round runs every case once (direct, fio,
//! blkbackd A[, B]), with a fresh blkbackd per configuration and round. A case's repeats are
//! thus spread over the whole run, minutes apart, not packed into one stretch of seconds: a
//! machine whose speed drifts over minutes, or a process whose threads settle on unlucky
//! cores for its lifetime, shows that in the spread of every case, not as a shift between
//! two runs.

use super::*;

/// What a run's cases serve: a file (the baseline io_uring and fio straight at it), or an
/// NBD export (the baseline an NBD client straight at it, no fio).
#[derive(Clone, Copy)]
pub(crate) enum Target<'a> {
    File(&'a Path),
    Nbd(&'a str),
}

impl Target<'_> {
    /// The disk's `params`.
    pub(crate) fn params(&self) -> anyhow::Result<&str> {
        match self {
            Self::File(p) => p.to_str().context("utf-8 path"),
            Self::Nbd(uri) => Ok(uri),
        }
    }
}

/// The progress of a run, for the lines it prints.
pub(crate) struct Progress {
    pub(crate) done: usize,
    pub(crate) total: usize,
    pub(crate) started: Instant,
}

/// Every case of `configs` × `workloads` on one target, `opts.pairs` rounds.
#[allow(clippy::too_many_arguments)]
pub(crate) fn run_rounds(
    opts: &Opts,
    tname: &'static str,
    tdir: &Path,
    target: Target<'_>,
    size: u64,
    workloads: &[Workload],
    configs: &[Config],
    progress: &mut Progress,
) -> anyhow::Result<Vec<Case>> {
    let plan: Vec<(usize, usize)> = configs
        .iter()
        .enumerate()
        .flat_map(|(ci, c)| {
            (workloads.iter().enumerate())
                .filter(|(_, w)| runs(c, w))
                .map(move |(wi, _)| (ci, wi))
        })
        .collect();
    // fio once per workload and target: beside the first configuration that runs it.
    let mut fio_with = vec![None; workloads.len()];
    for &(ci, wi) in plan.iter().filter(|_| matches!(target, Target::File(_))) {
        fio_with[wi].get_or_insert(ci);
    }
    let params = target.params()?;
    let mut cases: Vec<Case> = (plan.iter())
        .map(|&(ci, wi)| Case::new(tname, workloads[wi], configs[ci]))
        .collect();
    for rep in 0..opts.pairs {
        let last = rep + 1 == opts.pairs;
        for (ci, c) in configs.iter().enumerate() {
            let mut sa = Session::start(&opts.blkbackd, tdir, params, *c, "")?;
            let mut sb = match &opts.compare {
                Some(p) => Some(Session::start(p, tdir, params, *c, "-B")?),
                None => None,
            };
            for (k, &(_, wi)) in plan.iter().enumerate().filter(|(_, p)| p.0 == ci) {
                let w = workloads[wi];
                let case = &mut cases[k];
                let fio = opts.fio.as_ref().filter(|_| fio_with[wi] == Some(ci));
                let direct = match target {
                    Target::File(image) => {
                        run_direct(image, w, opts.seconds, size, Direct::Tuned, false)
                    }
                    Target::Nbd(uri) => run_nbd_direct(uri, w, opts.seconds, size),
                };
                case.d.push(
                    direct
                        .with_context(|| format!("{} direct", w.name))?
                        .figures(),
                );
                if let (Some((fio, _)), Target::File(image)) = (fio, target) {
                    case.f.push(
                        fio::run(fio, image, w, opts.seconds, size)
                            .with_context(|| format!("{} fio", w.name))?
                            .figures(),
                    );
                }
                let run = |s: &mut Session, which: &str| {
                    anyhow::Ok(
                        (s.run(w, opts.seconds, size, false))
                            .with_context(|| format!("{} via blkbackd{which}", w.name))?
                            .figures(),
                    )
                };
                // A and B swap places every other round.
                let b_first = rep % 2 == 1;
                if let Some(sb) = sb.as_mut().filter(|_| b_first) {
                    case.b.push(run(sb, " B")?);
                }
                case.a.push(run(&mut sa, "")?);
                if let Some(sb) = sb.as_mut().filter(|_| !b_first) {
                    case.b.push(run(sb, " B")?);
                }
                progress.done += 2 + usize::from(fio.is_some()) + usize::from(sb.is_some());
                if last {
                    count_syscalls(case, &mut sa, sb.as_mut(), opts, size, progress)?;
                }
            }
            sa.stop()?;
            if let Some(sb) = sb {
                sb.stop()?;
            }
        }
    }
    Ok(cases)
}

/// System calls: a short run of their own with `perf stat` attached, after the last round;
/// then the case's line.
fn count_syscalls(
    case: &mut Case,
    sa: &mut Session,
    sb: Option<&mut Session>,
    opts: &Opts,
    size: u64,
    progress: &mut Progress,
) -> anyhow::Result<()> {
    let (w, secs) = (case.workload, opts.seconds.min(COUNT_SECONDS));
    case.sys_a = sa.run(w, secs, size, true)?.figures().sys;
    progress.done += 1;
    if let Some(sb) = sb {
        case.sys_b = sb.run(w, secs, size, true)?.figures().sys;
        progress.done += 1;
    }
    let mut line = format!(
        "{:12} {:18} {:26} direct {:>8.0}  blkbackd {:>8.0} IOPS  b/d {}",
        case.target,
        w.name,
        case.config.name,
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
        "  [{}/{} runs, {:.0} s]",
        progress.done,
        progress.total,
        progress.started.elapsed().as_secs_f64()
    );
    eprintln!("{line}");
    Ok(())
}
