//! What one run of one side measures, and the helpers that measure it (CPU ticks, system calls, the request generator).

use super::*;

/// Latency figures reported by an outside tool (fio) instead of samples.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Reported {
    pub(crate) mean_us: f64,
    pub(crate) p50: f64,
    pub(crate) p99: f64,
    pub(crate) p999: f64,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct Measured {
    pub(crate) requests: u64,
    pub(crate) bytes: u64,
    pub(crate) elapsed: Duration,
    pub(crate) lat_us: Vec<f64>,
    pub(crate) reported: Option<Reported>,
    pub(crate) cpu_ticks: Option<u64>,
    pub(crate) syscalls: Option<u64>,
}

impl Measured {
    /// Counts one completed request of `bytes` that took `lat`.
    pub(crate) fn record(&mut self, lat: std::time::Duration, bytes: usize) {
        self.lat_us.push(lat.as_secs_f64() * 1e6);
        self.requests += 1;
        self.bytes += bytes as u64;
    }

    pub(crate) fn iops(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
    pub(crate) fn mib_s(&self) -> f64 {
        self.bytes as f64 / 1048576.0 / self.elapsed.as_secs_f64().max(1e-9)
    }
    pub(crate) fn pct(&mut self, p: f64) -> f64 {
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
    pub(crate) fn mean_lat(&self) -> f64 {
        if self.lat_us.is_empty() {
            return self.reported.map_or(f64::NAN, |r| r.mean_us);
        }
        self.lat_us.iter().sum::<f64>() / self.lat_us.len() as f64
    }
    pub(crate) fn cpu_us_per_req(&self) -> Option<f64> {
        let hz = 100.0; // USER_HZ
        self.cpu_ticks
            .map(|t| t as f64 / hz * 1e6 / self.requests.max(1) as f64)
    }
    pub(crate) fn sys_per_req(&self) -> Option<f64> {
        self.syscalls
            .map(|s| s as f64 / self.requests.max(1) as f64)
    }
    /// This run's figures (and its latency samples dropped).
    pub(crate) fn figures(mut self) -> Fig {
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
pub(crate) struct Fig {
    pub(crate) iops: f64,
    pub(crate) mib_s: f64,
    pub(crate) p50: f64,
    pub(crate) p99: f64,
    pub(crate) p999: f64,
    pub(crate) mean: f64,
    pub(crate) cpu: f64,
    pub(crate) sys: f64,
}

/// Counts system calls of a process (`-p`) or thread (`-t`) until stopped.
pub(crate) struct SyscallCounter(pub(crate) Option<Child>);

impl SyscallCounter {
    pub(crate) fn start(flag: &str, id: u32) -> Self {
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

    pub(crate) fn stop(self) -> Option<u64> {
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

pub(crate) fn cpu_ticks(stat: &str) -> Option<u64> {
    let s = std::fs::read_to_string(stat).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    // Fields 14 and 15 (utime, stime); `rest` starts at field 3.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// utime + stime + cutime + cstime (fields 14 to 17).
pub(crate) fn cpu_ticks_with_children(stat: &str) -> Option<u64> {
    let s = std::fs::read_to_string(stat).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    (11..15).map(|i| f.get(i)?.parse::<u64>().ok()).sum()
}

pub(crate) struct Rng(pub(crate) u64);
impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Offsets and kinds of the workload's requests, in order.
pub(crate) struct Gen {
    pub(crate) w: Workload,
    pub(crate) rng: Rng,
    pub(crate) blocks: u64,
    pub(crate) seq: u64,
}

impl Gen {
    pub(crate) fn new(w: Workload, image: u64) -> Self {
        Self::seeded(w, image, 0)
    }
    /// A generator of its own for each of several threads (`stream` 0, 1, ...): random
    /// offsets differ, sequential ones start in different places.
    pub(crate) fn seeded(w: Workload, image: u64, stream: u64) -> Self {
        let blocks = image / w.bs as u64;
        Self {
            w,
            rng: Rng(0x9e37_79b9_7f4a_7c15 ^ stream.wrapping_mul(0x2545_f491_4f6c_dd1d)),
            blocks,
            seq: stream * 7919 % blocks.max(1),
        }
    }
    /// (byte offset, write)
    pub(crate) fn next(&mut self) -> (u64, bool) {
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
