//! The statistics file: Linux blkback's sysfs counters (`statistics/oo_req`, `rd_req`,
//! `wr_req`, `f_req`, `ds_req`, `rd_sect`, `wr_sect`) plus latency, kept up to date by
//! `blkbackd serve` and read by `blkbackd stats`.
//!
//! One file per device, by default `/run/blkbackd/vbd-<frontend-domid>-<devid>.stats`
//! (`--stats-file` to choose another), rewritten atomically (a temporary file renamed over it)
//! a few times a second while serving, and once more at exit. The format is one
//! `name value` pair per line, so that `cat` is enough to read it and a shell script can
//! `grep` it:
//!
//! ```text
//! backend /local/domain/0/backend/vbd/5/51712
//! state 4
//! oo_req 0
//! rd_req 1024
//! ...
//! ```
//!
//! A disk on an NBD export adds one block per connection (one per queue), each line prefixed
//! `nbd<N>_` (`N` from 0, in queue order): the connection's commands by type, bytes, holes,
//! server errors, commands in flight, connections lost and re-made, commands sent again, and
//! whether it has structured replies ([`crate::dataplane::NbdStats`]):
//!
//! ```text
//! nbd0_rd_req 512
//! nbd0_reconnects 1
//! ...
//! ```

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use xen::xenstore::BackendPath;

use crate::dataplane::{NbdSnapshot, Stats};
use xen::xenbus::XenbusState;

/// The most NBD connections a file is read with (more than any device has queues).
const MAX_NBD_CONNECTIONS: usize = 256;

/// The default directory of statistics files.
pub const DEFAULT_DIR: &str = "/run/blkbackd";

/// How often the file is rewritten at most.
const MIN_INTERVAL: Duration = Duration::from_millis(500);

/// The default statistics file of a device.
pub fn default_path(frontend_domid: u16, devid: u32) -> PathBuf {
    Path::new(DEFAULT_DIR).join(format!("vbd-{frontend_domid}-{devid}.stats"))
}

/// The counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Requests that had to wait for a free request slot (Linux: out of requests).
    pub oo_req: u64,
    /// Read requests.
    pub rd_req: u64,
    /// Write requests.
    pub wr_req: u64,
    /// Flush and barrier requests.
    pub f_req: u64,
    /// Discard requests.
    pub ds_req: u64,
    /// Sectors read.
    pub rd_sect: u64,
    /// Sectors written.
    pub wr_sect: u64,
    /// Requests completed with a latency measurement.
    pub lat_count: u64,
    /// Sum of their latencies in microseconds.
    pub lat_sum_us: u64,
    /// The largest latency in microseconds.
    pub lat_max_us: u64,
}

const FIELDS: [&str; 10] = [
    "oo_req",
    "rd_req",
    "wr_req",
    "f_req",
    "ds_req",
    "rd_sect",
    "wr_sect",
    "lat_count",
    "lat_sum_us",
    "lat_max_us",
];

impl Snapshot {
    fn values(&self) -> [u64; 10] {
        [
            self.oo_req,
            self.rd_req,
            self.wr_req,
            self.f_req,
            self.ds_req,
            self.rd_sect,
            self.wr_sect,
            self.lat_count,
            self.lat_sum_us,
            self.lat_max_us,
        ]
    }

    fn set(&mut self, name: &str, v: u64) -> bool {
        let field = match name {
            "oo_req" => &mut self.oo_req,
            "rd_req" => &mut self.rd_req,
            "wr_req" => &mut self.wr_req,
            "f_req" => &mut self.f_req,
            "ds_req" => &mut self.ds_req,
            "rd_sect" => &mut self.rd_sect,
            "wr_sect" => &mut self.wr_sect,
            "lat_count" => &mut self.lat_count,
            "lat_sum_us" => &mut self.lat_sum_us,
            "lat_max_us" => &mut self.lat_max_us,
            _ => return false,
        };
        *field = v;
        true
    }

    /// Mean latency in microseconds, if anything was measured.
    pub fn mean_latency_us(&self) -> Option<u64> {
        self.lat_sum_us.checked_div(self.lat_count)
    }
}

/// A parsed statistics file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The backend directory served.
    pub backend: String,
    /// The backend's xenbus state then.
    pub state: u32,
    /// The counters.
    pub counters: Snapshot,
    /// Each NBD connection's counters, in queue order (none for a local disk).
    pub nbd: Vec<NbdSnapshot>,
}

impl Report {
    /// The file's text.
    pub fn render(&self) -> String {
        let mut s = format!("backend {}\nstate {}\n", self.backend, self.state);
        for (name, v) in FIELDS.iter().zip(self.counters.values()) {
            let _ = writeln!(s, "{name} {v}");
        }
        for (i, c) in self.nbd.iter().enumerate() {
            for (name, v) in c.fields() {
                let _ = writeln!(s, "nbd{i}_{name} {v}");
            }
        }
        s
    }

    /// Parses the file's text; unknown lines are skipped (newer writers may add some).
    ///
    /// # Errors
    /// A message naming the first malformed line or a missing counter.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut backend = None;
        let mut state = None;
        let mut counters = Snapshot::default();
        let mut nbd: Vec<NbdSnapshot> = Vec::new();
        let mut seen = 0usize;
        for line in text.lines() {
            let (name, value) = line
                .split_once(' ')
                .ok_or_else(|| format!("malformed line {line:?}"))?;
            match name {
                "backend" => backend = Some(value.to_owned()),
                "state" => {
                    state = Some(
                        value
                            .parse()
                            .map_err(|_| format!("malformed line {line:?}"))?,
                    )
                }
                _ => {
                    let v: u64 = value
                        .parse()
                        .map_err(|_| format!("malformed line {line:?}"))?;
                    if counters.set(name, v) {
                        seen += 1;
                    } else if let Some((i, field)) = nbd_field(name) {
                        if nbd.len() <= i {
                            nbd.resize(i + 1, NbdSnapshot::default());
                        }
                        if let Some(c) = nbd.get_mut(i) {
                            c.set(field, v);
                        }
                    }
                }
            }
        }
        if seen < FIELDS.len() {
            return Err("counters missing".into());
        }
        Ok(Self {
            backend: backend.ok_or("backend line missing")?,
            state: state.ok_or("state line missing")?,
            counters,
            nbd,
        })
    }

    /// A human-readable table for `blkbackd stats`.
    pub fn display(&self) -> String {
        let c = &self.counters;
        let mut s = format!("{}  (state {})\n", self.backend, self.state);
        for (name, v) in FIELDS[..7].iter().zip(c.values()) {
            let _ = writeln!(s, "  {name:<8} {v}");
        }
        match c.mean_latency_us() {
            Some(mean) => {
                let _ = writeln!(
                    s,
                    "  latency  mean {mean} us, max {} us over {} requests",
                    c.lat_max_us, c.lat_count
                );
            }
            None => s.push_str("  latency  (no completed requests)\n"),
        }
        for (i, c) in self.nbd.iter().enumerate() {
            let _ = writeln!(
                s,
                "  nbd{i}     {} reads ({} bytes, {} in holes), {} writes ({} bytes), {} flushes, \
                 {} discards, {} errors, {} in flight; {} lost, {} reconnects, {} re-sent; \
                 structured replies: {}",
                c.rd_req,
                c.rd_bytes,
                c.hole_bytes,
                c.wr_req,
                c.wr_bytes,
                c.f_req,
                c.ds_req,
                c.errors,
                c.in_flight,
                c.lost,
                c.reconnects,
                c.resent,
                if c.structured == 1 { "yes" } else { "no" },
            );
        }
        s
    }
}

/// `nbd<N>_<field>` as `(N, field)`, for `N` under [`MAX_NBD_CONNECTIONS`].
fn nbd_field(name: &str) -> Option<(usize, &str)> {
    let (conn, field) = name.strip_prefix("nbd")?.split_once('_')?;
    if conn.is_empty() || !conn.bytes().all(|b| b.is_ascii_digit()) || conn.len() > 3 {
        return None;
    }
    let i: usize = conn.parse().ok()?;
    (i < MAX_NBD_CONNECTIONS).then_some((i, field))
}

/// Keeps one device's statistics file up to date.
#[derive(Debug)]
pub struct StatsFile {
    path: PathBuf,
    backend: BackendPath,
    last: Option<Instant>,
    warned: bool,
}

impl StatsFile {
    /// A file at `path` for the device at `backend`.
    pub fn new(path: PathBuf, backend: BackendPath) -> Self {
        Self {
            path,
            backend,
            last: None,
            warned: false,
        }
    }

    /// Rewrites the file if it was not rewritten recently. Failures are logged once and do
    /// not stop serving.
    pub fn update(&mut self, stats: &Stats, state: XenbusState) {
        if self.last.is_some_and(|t| t.elapsed() < MIN_INTERVAL) {
            return;
        }
        self.last = Some(Instant::now());
        let report = Report {
            backend: self.backend.to_string(),
            state: state.as_u32(),
            counters: snapshot(stats),
            nbd: stats.nbd.snapshots(),
        };
        if let Err(e) = write_atomically(&self.path, report.render().as_bytes()) {
            if !self.warned {
                tracing::warn!(path = %self.path.display(), "cannot write the statistics file: {e}");
                self.warned = true;
            }
        }
    }

    /// Writes the file now, whatever the interval.
    pub fn flush(&mut self, stats: &Stats, state: XenbusState) {
        self.last = None;
        self.update(stats, state);
    }
}

fn write_atomically(path: &Path, data: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, data)?;
    std::fs::rename(&tmp, path)
}

/// Reads the data plane's counters.
pub fn snapshot(stats: &Stats) -> Snapshot {
    let s = stats.snapshot();
    Snapshot {
        oo_req: s.oo_req,
        rd_req: s.rd_req,
        wr_req: s.wr_req,
        f_req: s.f_req,
        ds_req: s.ds_req,
        rd_sect: s.rd_sect,
        wr_sect: s.wr_sect,
        lat_count: s.completed,
        lat_sum_us: s.latency_ns_sum / 1000,
        lat_max_us: s.latency_ns_max / 1000,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let r = Report {
            backend: "/local/domain/0/backend/vbd/5/51712".into(),
            state: 4,
            counters: Snapshot {
                oo_req: 1,
                rd_req: 2,
                wr_req: 3,
                f_req: 4,
                ds_req: 5,
                rd_sect: 6,
                wr_sect: 7,
                lat_count: 8,
                lat_sum_us: 80,
                lat_max_us: 30,
            },
            nbd: Vec::new(),
        };
        let text = r.render();
        assert!(text.contains("\nrd_sect 6\n"));
        assert_eq!(Report::parse(&text).unwrap(), r);
        let mut nbd = r.clone();
        nbd.nbd = vec![
            NbdSnapshot {
                rd_req: 5,
                structured: 1,
                ..NbdSnapshot::default()
            },
            NbdSnapshot {
                reconnects: 2,
                resent: 16,
                ..NbdSnapshot::default()
            },
        ];
        let text = nbd.render();
        assert!(text.contains("\nnbd1_resent 16\n"), "{text}");
        assert_eq!(Report::parse(&text).unwrap(), nbd);
        assert!(nbd.display().contains("2 reconnects, 16 re-sent"));
        // Lines naming no connection this reader takes are skipped.
        let odd = format!("{text}nbd999_rd_req 1\nnbdx_rd_req 1\nnbd0_future 3\n");
        assert_eq!(Report::parse(&odd).unwrap(), nbd);
        assert_eq!(r.counters.mean_latency_us(), Some(10));
        assert!(r
            .display()
            .contains("mean 10 us, max 30 us over 8 requests"));
    }

    #[test]
    fn refuses_malformed_files() {
        assert!(Report::parse("").is_err());
        assert!(Report::parse("backend x\nstate 4\noo_req 1\n").is_err());
        assert!(Report::parse("garbage").is_err());
        assert!(Report::parse("backend x\nstate four\n").is_err());
    }

    #[test]
    fn default_path_names_the_device() {
        assert_eq!(
            default_path(5, 51712),
            PathBuf::from("/run/blkbackd/vbd-5-51712.stats")
        );
    }
}
