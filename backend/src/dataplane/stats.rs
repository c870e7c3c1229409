//! Per-queue counters, shared with the control plane and readable while the queue runs.
//!
//! The names and meanings follow Linux blkback's sysfs `statistics/` directory
//! (drivers/block/xen-blkback/xenbus.c, `VBD_SHOW_ALL`), counted where Linux counts them
//! (`dispatch_rw_block_io`, `dispatch_discard_io`): a request is counted once it passed
//! validation and is about to be issued, so rejected requests show only in `errors`.
//! Latency is measured from the moment a request was taken off the ring to the moment its
//! response was written.
//!
//! Every counter is a relaxed atomic: reading them costs the data path nothing and never
//! blocks it. One [`Stats`] may be shared by all queues of a device: counters are added to,
//! and each queue moves the gauges (`in_flight`, `persistent_grants`) only by its own change.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The counters of one queue.
#[derive(Debug, Default)]
pub struct Stats {
    /// `oo_req`: times a request had to wait for backend resources (a free bounce region
    /// for a large indirect request) before it could be issued.
    pub oo_req: AtomicU64,
    /// `rd_req`: read requests issued (direct and indirect).
    pub rd_req: AtomicU64,
    /// `wr_req`: write requests issued (including flushes and barriers that carry data).
    pub wr_req: AtomicU64,
    /// `f_req`: flush and barrier requests (with or without data).
    pub f_req: AtomicU64,
    /// `ds_req`: discard requests.
    pub ds_req: AtomicU64,
    /// `rd_sect`: 512-byte sectors read.
    pub rd_sect: AtomicU64,
    /// `wr_sect`: 512-byte sectors written.
    pub wr_sect: AtomicU64,
    /// Responses other than `BLKIF_RSP_OKAY` (rejected requests and device errors).
    pub errors: AtomicU64,
    /// Event-channel wake-ups handled.
    pub events: AtomicU64,
    /// Wake-ups that found no request (spurious; these delay the next unmask, XSA-332).
    pub spurious_events: AtomicU64,
    /// Requests completed (answered after being issued), the divisor of the latency sum.
    pub completed: AtomicU64,
    /// Sum of completion latencies in nanoseconds.
    pub latency_ns_sum: AtomicU64,
    /// Largest completion latency in nanoseconds.
    pub latency_ns_max: AtomicU64,
    /// Persistent grants currently mapped (a gauge).
    pub persistent_grants: AtomicU64,
    /// Requests issued and not yet answered (a gauge).
    pub in_flight: AtomicU64,
}

/// A plain copy of [`Stats`] at one moment. `Display` prints one `name value` line per
/// counter, Linux's sysfs names first.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// See [`Stats::oo_req`].
    pub oo_req: u64,
    /// See [`Stats::rd_req`].
    pub rd_req: u64,
    /// See [`Stats::wr_req`].
    pub wr_req: u64,
    /// See [`Stats::f_req`].
    pub f_req: u64,
    /// See [`Stats::ds_req`].
    pub ds_req: u64,
    /// See [`Stats::rd_sect`].
    pub rd_sect: u64,
    /// See [`Stats::wr_sect`].
    pub wr_sect: u64,
    /// See [`Stats::errors`].
    pub errors: u64,
    /// See [`Stats::events`].
    pub events: u64,
    /// See [`Stats::spurious_events`].
    pub spurious_events: u64,
    /// See [`Stats::completed`].
    pub completed: u64,
    /// See [`Stats::latency_ns_sum`].
    pub latency_ns_sum: u64,
    /// See [`Stats::latency_ns_max`].
    pub latency_ns_max: u64,
    /// See [`Stats::persistent_grants`].
    pub persistent_grants: u64,
    /// See [`Stats::in_flight`].
    pub in_flight: u64,
}

impl Stats {
    /// New zeroed counters.
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads every counter (each atomically; the set is not one atomic snapshot).
    pub fn snapshot(&self) -> StatsSnapshot {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            oo_req: r(&self.oo_req),
            rd_req: r(&self.rd_req),
            wr_req: r(&self.wr_req),
            f_req: r(&self.f_req),
            ds_req: r(&self.ds_req),
            rd_sect: r(&self.rd_sect),
            wr_sect: r(&self.wr_sect),
            errors: r(&self.errors),
            events: r(&self.events),
            spurious_events: r(&self.spurious_events),
            completed: r(&self.completed),
            latency_ns_sum: r(&self.latency_ns_sum),
            latency_ns_max: r(&self.latency_ns_max),
            persistent_grants: r(&self.persistent_grants),
            in_flight: r(&self.in_flight),
        }
    }

    pub(super) fn add(counter: &AtomicU64, n: u64) {
        // Queues of one device may share the counters.
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub(super) fn record_latency(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        Self::add(&self.completed, 1);
        Self::add(&self.latency_ns_sum, ns);
        self.latency_ns_max.fetch_max(ns, Ordering::Relaxed);
    }
}

impl StatsSnapshot {
    /// Mean completion latency, if any request completed.
    pub fn mean_latency(&self) -> Option<Duration> {
        (self.completed > 0).then(|| Duration::from_nanos(self.latency_ns_sum / self.completed))
    }

    /// The sum of two snapshots (for a device's queues together); the maximum stays a maximum.
    #[must_use]
    pub fn merge(&self, o: &StatsSnapshot) -> StatsSnapshot {
        StatsSnapshot {
            oo_req: self.oo_req + o.oo_req,
            rd_req: self.rd_req + o.rd_req,
            wr_req: self.wr_req + o.wr_req,
            f_req: self.f_req + o.f_req,
            ds_req: self.ds_req + o.ds_req,
            rd_sect: self.rd_sect + o.rd_sect,
            wr_sect: self.wr_sect + o.wr_sect,
            errors: self.errors + o.errors,
            events: self.events + o.events,
            spurious_events: self.spurious_events + o.spurious_events,
            completed: self.completed + o.completed,
            latency_ns_sum: self.latency_ns_sum + o.latency_ns_sum,
            latency_ns_max: self.latency_ns_max.max(o.latency_ns_max),
            persistent_grants: self.persistent_grants + o.persistent_grants,
            in_flight: self.in_flight + o.in_flight,
        }
    }
}

impl fmt::Display for StatsSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mean = self.mean_latency().map_or(0, |d| d.as_nanos());
        writeln!(f, "oo_req {}", self.oo_req)?;
        writeln!(f, "rd_req {}", self.rd_req)?;
        writeln!(f, "wr_req {}", self.wr_req)?;
        writeln!(f, "f_req {}", self.f_req)?;
        writeln!(f, "ds_req {}", self.ds_req)?;
        writeln!(f, "rd_sect {}", self.rd_sect)?;
        writeln!(f, "wr_sect {}", self.wr_sect)?;
        writeln!(f, "errors {}", self.errors)?;
        writeln!(f, "events {}", self.events)?;
        writeln!(f, "spurious_events {}", self.spurious_events)?;
        writeln!(f, "completed {}", self.completed)?;
        writeln!(f, "latency_mean_ns {mean}")?;
        writeln!(f, "latency_max_ns {}", self.latency_ns_max)?;
        writeln!(f, "persistent_grants {}", self.persistent_grants)?;
        write!(f, "in_flight {}", self.in_flight)
    }
}
