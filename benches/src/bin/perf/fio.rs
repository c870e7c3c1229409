//! fio as a third column: the same file, block size, depth and pattern as the direct run,
//! with fio's io_uring engine and `O_DIRECT` (`--direct=1`), so that the harness's own direct
//! baseline can be held against the tool people compare with. Its figures come from fio's
//! JSON report: IOPS, bandwidth, total latency (submission to completion, as the harness
//! measures it: `lat_percentiles=1`), CPU time of the whole fio process (all its threads,
//! io_uring's io-wq workers included, its start-up too); no system-call count (fio's own
//! setup would be in it).

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context as _};

use crate::{Measured, Pattern, Reported, Workload};

/// The fio to run: `$FIO` or `fio` on `PATH`, with its version; `None` when there is none.
pub fn find() -> Option<(PathBuf, String)> {
    let fio = std::env::var_os("FIO").map_or_else(|| PathBuf::from("fio"), PathBuf::from);
    let out = Command::new(&fio).arg("--version").output().ok()?;
    out.status
        .success()
        .then(|| (fio, String::from_utf8_lossy(&out.stdout).trim().to_owned()))
}

/// One fio job of `secs` seconds on `path` (`image` bytes long).
pub fn run(
    fio: &Path,
    path: &Path,
    w: Workload,
    secs: f64,
    image: u64,
) -> anyhow::Result<Measured> {
    let rw = match w.pattern {
        Pattern::RandRead => "randread",
        Pattern::RandWrite => "randwrite",
        Pattern::SeqRead => "read",
        Pattern::SeqWrite => "write",
        Pattern::Mix => "randrw",
    };
    let mut out = Command::new(fio)
        .args([
            "--name=perf",
            "--ioengine=io_uring",
            "--direct=1",
            "--time_based=1",
            "--norandommap=1",
            "--randrepeat=0",
            "--allow_file_create=0",
            "--invalidate=0",
            "--lat_percentiles=1",
            "--percentile_list=50:99:99.9",
            "--output-format=json",
            "--rwmixread=70",
        ])
        .arg(format!("--filename={}", path.display()))
        .arg(format!("--rw={rw}"))
        .arg(format!("--bs={}", w.bs))
        .arg(format!("--iodepth={}", w.qd))
        .arg(format!("--size={image}"))
        // fio takes whole milliseconds.
        .arg(format!("--runtime={}ms", (secs * 1000.0).round().max(1.0)))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running fio")?;
    // fio's CPU time: all its threads (io_uring's io-wq workers among them), read from its
    // /proc entry once it has exited but before it is reaped.
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    out.stdout
        .take()
        .context("stdout")?
        .read_to_end(&mut stdout)?;
    out.stderr
        .take()
        .context("stderr")?
        .read_to_end(&mut stderr)?;
    let pid = rustix::process::Pid::from_child(&out);
    let _ = rustix::process::waitid(
        rustix::process::WaitId::Pid(pid),
        rustix::process::WaitIdOptions::EXITED | rustix::process::WaitIdOptions::NOWAIT,
    );
    // fio runs its job in a child process that it has reaped by now: its times are the
    // children's (cutime, cstime) of fio's entry.
    let ticks = crate::cpu_ticks_with_children(&format!("/proc/{}/stat", pid.as_raw_nonzero()));
    let status = out.wait()?;
    let out = std::process::Output {
        status,
        stdout,
        stderr,
    };
    if !out.status.success() {
        bail!(
            "fio failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    // fio may print notes before the JSON document.
    let json = &text[text.find('{').context("no JSON from fio")?..];
    let v = Json::parse(json).context("fio's JSON")?;
    let job = v.get("jobs").and_then(|j| j.at(0)).context("fio: no job")?;
    if job.get("error").and_then(Json::num).unwrap_or(0.0) != 0.0 {
        bail!(
            "fio ({}): job error {:?}",
            v.get("fio version").and_then(Json::str).unwrap_or("?"),
            job.get("error")
        );
    }
    let mut m = Measured::default();
    let mut runtime_ms: f64 = 0.0;
    // (requests, mean, p50, p99, p99.9) per direction.
    let mut dirs = Vec::new();
    for dir in ["read", "write"] {
        let d = job.get(dir).context("fio: no read/write section")?;
        let n = d.get("total_ios").and_then(Json::num).unwrap_or(0.0);
        m.requests += n as u64;
        m.bytes += d.get("io_bytes").and_then(Json::num).unwrap_or(0.0) as u64;
        runtime_ms = runtime_ms.max(d.get("runtime").and_then(Json::num).unwrap_or(0.0));
        if n > 0.0 {
            let lat = d.get("lat_ns").context("fio: no lat_ns")?;
            let p = |k: &str| {
                lat.get("percentile")
                    .and_then(|p| p.get(k))
                    .and_then(Json::num)
                    .map_or(f64::NAN, |ns| ns / 1000.0)
            };
            let mean = lat.get("mean").and_then(Json::num).unwrap_or(f64::NAN) / 1000.0;
            dirs.push((n, mean, p("50.000000"), p("99.000000"), p("99.900000")));
        }
    }
    if m.requests == 0 || runtime_ms <= 0.0 {
        bail!("fio did no I/O");
    }
    m.elapsed = Duration::from_secs_f64(runtime_ms / 1000.0);
    // A mixed job's percentiles are its larger direction's (the reads of a 70/30 mix); the
    // mean is over both.
    let total: f64 = dirs.iter().map(|d| d.0).sum();
    let big = dirs.iter().copied().fold(
        (0.0, 0.0, 0.0, 0.0, 0.0),
        |a, d| {
            if d.0 > a.0 {
                d
            } else {
                a
            }
        },
    );
    m.reported = Some(Reported {
        mean_us: dirs.iter().map(|d| d.0 * d.1).sum::<f64>() / total,
        p50: big.2,
        p99: big.3,
        p999: big.4,
    });
    m.cpu_ticks = ticks;
    Ok(m)
}

/// Just enough JSON for fio's report.
#[derive(Debug)]
pub enum Json {
    Null,
    Bool,
    Num(f64),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl Json {
    pub fn parse(s: &str) -> anyhow::Result<Json> {
        let mut p = Parser {
            b: s.as_bytes(),
            i: 0,
        };
        p.value()
    }
    pub fn get(&self, k: &str) -> Option<&Json> {
        match self {
            Json::Obj(kv) => kv.iter().find(|(n, _)| n == k).map(|(_, v)| v),
            _ => None,
        }
    }
    pub fn at(&self, i: usize) -> Option<&Json> {
        match self {
            Json::Arr(v) => v.get(i),
            _ => None,
        }
    }
    pub fn str(&self) -> Option<&str> {
        match self {
            Json::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn num(&self) -> Option<f64> {
        match self {
            Json::Num(n) => Some(*n),
            _ => None,
        }
    }
}

struct Parser<'a> {
    b: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn ws(&mut self) {
        while self.b.get(self.i).is_some_and(u8::is_ascii_whitespace) {
            self.i += 1;
        }
    }
    fn eat(&mut self, c: u8) -> anyhow::Result<()> {
        self.ws();
        if self.b.get(self.i) != Some(&c) {
            bail!("JSON: expected {:?} at byte {}", c as char, self.i);
        }
        self.i += 1;
        Ok(())
    }
    fn value(&mut self) -> anyhow::Result<Json> {
        self.ws();
        match self.b.get(self.i).copied() {
            Some(b'{') => {
                self.i += 1;
                let mut kv = Vec::new();
                self.ws();
                if self.b.get(self.i) == Some(&b'}') {
                    self.i += 1;
                    return Ok(Json::Obj(kv));
                }
                loop {
                    self.ws();
                    let k = self.string()?;
                    self.eat(b':')?;
                    kv.push((k, self.value()?));
                    self.ws();
                    match self.b.get(self.i) {
                        Some(b',') => self.i += 1,
                        Some(b'}') => {
                            self.i += 1;
                            return Ok(Json::Obj(kv));
                        }
                        _ => bail!("JSON: bad object at byte {}", self.i),
                    }
                }
            }
            Some(b'[') => {
                self.i += 1;
                let mut v = Vec::new();
                self.ws();
                if self.b.get(self.i) == Some(&b']') {
                    self.i += 1;
                    return Ok(Json::Arr(v));
                }
                loop {
                    v.push(self.value()?);
                    self.ws();
                    match self.b.get(self.i) {
                        Some(b',') => self.i += 1,
                        Some(b']') => {
                            self.i += 1;
                            return Ok(Json::Arr(v));
                        }
                        _ => bail!("JSON: bad array at byte {}", self.i),
                    }
                }
            }
            Some(b'"') => Ok(Json::Str(self.string()?)),
            Some(b't') if self.b[self.i..].starts_with(b"true") => {
                self.i += 4;
                Ok(Json::Bool)
            }
            Some(b'f') if self.b[self.i..].starts_with(b"false") => {
                self.i += 5;
                Ok(Json::Bool)
            }
            Some(b'n') if self.b[self.i..].starts_with(b"null") => {
                self.i += 4;
                Ok(Json::Null)
            }
            Some(_) => {
                let start = self.i;
                while self
                    .b
                    .get(self.i)
                    .is_some_and(|c| c.is_ascii_digit() || b"+-.eE".contains(c))
                {
                    self.i += 1;
                }
                let s = std::str::from_utf8(&self.b[start..self.i])?;
                Ok(Json::Num(s.parse().with_context(|| {
                    format!("JSON: bad number {s:?} at byte {start}")
                })?))
            }
            None => bail!("JSON: unexpected end"),
        }
    }
    fn string(&mut self) -> anyhow::Result<String> {
        self.eat(b'"')?;
        let mut s = Vec::new();
        loop {
            match self.b.get(self.i).copied() {
                Some(b'"') => {
                    self.i += 1;
                    return Ok(String::from_utf8_lossy(&s).into_owned());
                }
                Some(b'\\') => {
                    // fio's strings need no unescaping beyond keeping the next byte.
                    s.extend(self.b.get(self.i + 1));
                    self.i += 2;
                }
                Some(c) => {
                    s.push(c);
                    self.i += 1;
                }
                None => bail!("JSON: unterminated string"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Json;

    #[test]
    fn parses_a_fio_like_report() {
        let j = Json::parse(
            r#"{"fio version" : "fio-3.33", "jobs" : [ { "error" : 0, "read" : { "iops" : 1.5e3, "lat_ns" : { "percentile" : { "50.000000" : 3216 } } }, "x" : [], "y" : {}, "z" : null, "t" : true } ] }"#,
        )
        .unwrap();
        let job = j.get("jobs").and_then(|v| v.at(0)).unwrap();
        assert_eq!(
            job.get("read")
                .and_then(|r| r.get("iops"))
                .and_then(Json::num),
            Some(1500.0)
        );
        let p50 = job
            .get("read")
            .and_then(|r| r.get("lat_ns"))
            .and_then(|l| l.get("percentile"))
            .and_then(|p| p.get("50.000000"))
            .and_then(Json::num);
        assert_eq!(p50, Some(3216.0));
    }
}
