//! The tables (`perf.md`, `perf.csv`, `perf.png`), the goals, and `--check-agree`.

use super::*;

/// The fio figures of a case's workload and target (from whichever case ran fio).
pub(crate) fn fio_case<'a>(cases: &'a [Case], c: &Case) -> Option<&'a Case> {
    cases
        .iter()
        .find(|x| x.target == c.target && x.workload.name == c.workload.name && !x.f.is_empty())
}

/// The goals (RAM-backed target, one queue), judged on the medians.
pub(crate) fn goals(md: &mut String, cases: &[Case]) -> anyhow::Result<()> {
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

pub(crate) fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

/// The date and time now, UTC, as `YYYY-MM-DD HH:MM`.
pub(crate) fn utc_now() -> String {
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
pub(crate) struct CsvRow {
    pub(crate) names: Vec<String>,
    pub(crate) values: Vec<String>,
}

impl CsvRow {
    pub(crate) fn put(&mut self, name: &str, v: impl Into<String>) {
        self.names.push(name.into());
        self.values.push(v.into());
    }
    pub(crate) fn val(&mut self, name: &str, v: f64, prec: usize) {
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
    pub(crate) fn spread(&mut self, name: &str, s: Spread, prec: usize) {
        self.val(name, s.med, prec);
        self.val(&format!("{name}_min"), s.min, prec);
        self.val(&format!("{name}_max"), s.max, prec);
    }
}

pub(crate) fn write_results(opts: &Opts, cases: &[Case], took: f64) -> anyhow::Result<()> {
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
        "# blkbackd vs direct io_uring\n\nMeasured {} UTC, {cpus} CPUs, Linux {}, image {} MiB, {fio}; the run took {:.1} minutes. Each case ran as {} interleaved repeats of {} s: direct, fio (in the first configuration that runs the workload), blkbackd{}; the repeats in rounds that each run every case once, with a fresh blkbackd per configuration and round, so that one case's repeats lie minutes apart across the whole run. Every figure is the median over the repeats; `(min–max)` is the spread of the per-repeat ratio (or difference) between a run and the direct run of the same repeat.\n\n`b` = through blkbackd (simulated platform; the load generator in this process plays blkfront on ring::FrontRing with data pages granted once), `d` = io_uring straight at the same file (`O_DIRECT`, the file registered, `COOP_TASKRUN | SINGLE_ISSUER | DEFER_TASKRUN`, each request submitted as it is queued by an `io_uring_enter` with `GETEVENTS`, completions read without a system call: the pattern `strace` shows for fio's io_uring engine), `fio` = fio's io_uring engine on the same file, block size, depth and pattern (`--direct=1`), `b/d` = ratio of IOPS. Latency from submission to completion seen by the submitter (fio: its total latency), in µs. CPU: utime+stime of the whole blkbackd process (of this process during the direct run; of the whole fio process, its start-up included), io_uring's io-wq workers included, 10 ms ticks. Syscalls: blkbackd's counted by `perf stat -e raw_syscalls:sys_enter` attached to its process in a 0.5 s run of their own after the repeats (perf's hooks slow what they watch, so no measured repeat runs under it); the direct run's are its own `io_uring_enter` calls, counted in its loop; none for fio. On tmpfs every request, fio's too, buffered or `O_DIRECT`, is handed to io_uring's io-wq workers (`perf stat -e io_uring:io_uring_queue_async_work` counts one per request): the direct and fio figures include that hop.\n",
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
    if cases
        .iter()
        .any(|c| c.target == crate::nbd_target::NBD_TARGET)
    {
        writeln!(
            md,
            "For the target `{}`, the disk is the image on tmpfs served by qemu-storage-daemon over a Unix socket, blkbackd is given its `nbd+unix://` URI (one connection per queue, structured replies), and `d` = an NBD client straight at the same export: one connection, one thread, the workload's requests pipelined on the socket at the same depth (one `write` per request, replies read as they come); there is no fio column and `d` counts no system calls.\n",
            crate::nbd_target::NBD_TARGET
        )?;
    }
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
pub(crate) struct Csv {
    pub(crate) header: Vec<String>,
    pub(crate) rows: Vec<Vec<String>>,
}

impl Csv {
    pub(crate) fn parse(text: &str) -> Self {
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
    pub(crate) fn col(&self, name: &str) -> Option<usize> {
        self.header.iter().position(|h| h == name)
    }
    pub(crate) fn get(&self, row: &[String], name: &str) -> Option<f64> {
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
pub(crate) fn check_agree(a: &Path, b: &Path) -> anyhow::Result<()> {
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
    // The fio figures of a workload are one measurement, written in every configuration's
    // row: compared once.
    let mut fio_seen = std::collections::HashSet::new();
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
            if f.contains("fio") && !fio_seen.insert((ra[..2].to_vec(), f)) {
                continue;
            }
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
