//! Per-queue counters, shared with the control plane and readable while the queue runs.
//!
//! The first names and meanings follow Linux blkback's sysfs `statistics/` directory
//! (drivers/block/xen-blkback/xenbus.c, `VBD_SHOW_ALL`), counted where Linux counts them
//! (`dispatch_rw_block_io`, `dispatch_discard_io`): a request is counted once it passed
//! validation and is about to be issued, so rejected requests show only in `errors`.
//! Latency is measured from the moment a request was taken off the ring to the moment its
//! response was written.
//!
//! The cost counters after them (grant copies and maps, persistent-grant hits, notifications,
//! `io_uring_enter` calls) say what serving a request costs in hypervisor and kernel calls:
//! divided by the requests of a workload they give the per-request figures that explain a
//! throughput (tests/e2e's perf table).
//!
//! Every counter is a relaxed atomic: reading them costs the data path nothing and never
//! blocks it. One [`Stats`] may be shared by all queues of a device: counters are added to,
//! and each queue moves the gauges (`in_flight`, `persistent_grants`) only by its own change.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use std::sync::Arc;

use super::nbd_stats::{NbdConnections, NbdSnapshot, NbdStats};

/// Declares [`Stats`] and [`StatsSnapshot`] from one list, so that a counter is named once.
/// Each entry is `kind name: doc`; `sum` counters and gauges add up when snapshots merge,
/// `max` ones take the larger value.
macro_rules! counters {
    ($($kind:ident $name:ident: $doc:literal,)*) => {
        /// The counters of one queue (or of a device's queues together).
        #[derive(Debug, Default)]
        pub struct Stats {
            $(#[doc = $doc] pub $name: AtomicU64,)*
            /// Each NBD connection's own counters.
            pub nbd: NbdConnections,
        }

        /// A plain copy of [`Stats`] at one moment. `Display` prints one `name value` line
        /// per counter, Linux's sysfs names first.
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        pub struct StatsSnapshot {
            $(#[doc = $doc] pub $name: u64,)*
        }

        impl Stats {
            /// Reads every counter (each atomically; the set is not one atomic snapshot).
            pub fn snapshot(&self) -> StatsSnapshot {
                StatsSnapshot { $($name: self.$name.load(Ordering::Relaxed),)* }
            }
        }

        impl StatsSnapshot {
            /// The sum of two snapshots (for a device's queues together); a maximum stays a
            /// maximum.
            #[must_use]
            pub fn merge(&self, o: &StatsSnapshot) -> StatsSnapshot {
                StatsSnapshot { $($name: counters!(@merge $kind, self.$name, o.$name),)* }
            }

            /// What happened between `earlier` and this snapshot: counters as differences,
            /// gauges and maxima as they are now.
            #[must_use]
            pub fn since(&self, earlier: &StatsSnapshot) -> StatsSnapshot {
                StatsSnapshot { $($name: counters!(@since $kind, self.$name, earlier.$name),)* }
            }

            /// `(name, value)` for every counter, in `Display` order.
            pub fn fields(&self) -> [(&'static str, u64); counters!(@count $($name)*)] {
                [$((stringify!($name), self.$name),)*]
            }
        }
    };
    (@merge sum, $a:expr, $b:expr) => { $a + $b };
    (@merge gauge, $a:expr, $b:expr) => { $a + $b };
    (@merge max, $a:expr, $b:expr) => { $a.max($b) };
    (@since sum, $a:expr, $b:expr) => { $a.wrapping_sub($b) };
    (@since gauge, $a:expr, $b:expr) => { $a };
    (@since max, $a:expr, $b:expr) => { $a };
    (@count) => { 0 };
    (@count $head:ident $($rest:ident)*) => { 1 + counters!(@count $($rest)*) };
}

counters! {
    sum oo_req: "`oo_req`: requests that had to wait for backend resources before they could \
        be issued, as Linux counts requests that found no free `pending_req`: in copy mode a \
        free bounce region for a large indirect request, in map mode room for new mappings \
        while too many retired ones wait out their grace.",
    sum rd_req: "`rd_req`: read requests issued (direct and indirect).",
    sum wr_req: "`wr_req`: write requests issued (including flushes and barriers that carry \
        data).",
    sum f_req: "`f_req`: flush and barrier requests (with or without data).",
    sum ds_req: "`ds_req`: discard requests.",
    sum rd_sect: "`rd_sect`: 512-byte sectors read.",
    sum wr_sect: "`wr_sect`: 512-byte sectors written.",
    sum errors: "Responses other than `BLKIF_RSP_OKAY` (rejected requests and device errors).",
    sum events: "Event-channel wake-ups handled.",
    sum spurious_events: "Wake-ups that found no request (spurious; these delay the next \
        unmask, XSA-332).",
    sum completed: "Requests completed (answered after being issued), the divisor of the \
        latency sum.",
    sum latency_ns_sum: "Sum of completion latencies in nanoseconds.",
    max latency_ns_max: "Largest completion latency in nanoseconds.",
    gauge persistent_grants: "Persistent grants currently mapped (a gauge).",
    gauge in_flight: "Requests issued and not yet answered (a gauge).",
    sum notifies: "Event-channel notifications sent to the frontend (one at most per pass \
        that pushed responses, when the frontend asked for one).",
    sum uring_enters: "`io_uring_enter` calls (one per pass of the queue's loop: it submits \
        what the pass queued and waits for the next completion or event).",
    sum copy_calls: "Grant-copy batches (`GrantCopier::copy`; on gntdev one \
        `IOCTL_GNTDEV_GRANT_COPY` per 32 segments, for which the kernel issues one \
        `GNTTABOP_copy` per 16).",
    sum copy_segs: "Grant-copy segments (each at most one page).",
    sum map_calls: "Grant-map calls (`GrantMapper::map`; on gntdev an \
        `IOCTL_GNTDEV_MAP_GRANT_REF` and an `mmap`, and later a `munmap` and an \
        `IOCTL_GNTDEV_UNMAP_GRANT_REF`), failed ones included.",
    sum map_pages: "Pages in successful grant-map calls.",
    sum map_failures: "Grant-map calls that failed (a read-only grant tried writable first \
        counts here).",
    sum pgrant_hits: "Pages found in the persistent-grant cache (no map call).",
    sum pgrant_purged: "Persistent grants dropped from the cache (idle past the timeout, or \
        the least recently used when the cache overflowed).",
}

impl Stats {
    /// New zeroed counters.
    pub fn new() -> Self {
        Self::default()
    }

    fn add(counter: &AtomicU64, n: u64) {
        // Queues of one device may share the counters.
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// One thing the data plane counts: what its pieces report through [`Meter`], never touching
/// the counters themselves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Count {
    /// A request had to wait for a resource before it could be issued (`oo_req`).
    Waited,
    /// A read of this many sectors was issued.
    Read(u64),
    /// A write of this many sectors was issued.
    Write(u64),
    /// A flush or barrier was issued.
    Flush,
    /// A discard was issued.
    Discard,
    /// A response other than `BLKIF_RSP_OKAY` was written.
    Error,
    /// An event-channel wake-up was handled.
    Event,
    /// A wake-up found no request.
    Spurious,
    /// The frontend was notified.
    Notify,
    /// One `io_uring_enter`.
    UringEnter,
    /// One grant-copy batch of this many segments.
    CopyBatch(usize),
    /// One grant-map call of `pages` pages, `ok` or failed.
    Map {
        /// Pages asked for.
        pages: usize,
        /// The call succeeded.
        ok: bool,
    },
    /// A page was found in the persistent-grant cache.
    PgrantHit,
    /// This many persistent grants were dropped from the cache.
    PgrantPurged(usize),
    /// A request issued was answered this long after it was taken off the ring.
    Answered(Duration),
}

/// Where the data plane's pieces report what they did.
pub(super) trait Meter: Send + Sync + std::fmt::Debug {
    /// Counts `c`.
    fn count(&self, c: Count);
}

impl Meter for Stats {
    fn count(&self, c: Count) {
        let one = |counter: &AtomicU64| Self::add(counter, 1);
        match c {
            Count::Waited => one(&self.oo_req),
            Count::Read(sectors) => {
                one(&self.rd_req);
                Self::add(&self.rd_sect, sectors);
            }
            Count::Write(sectors) => {
                one(&self.wr_req);
                Self::add(&self.wr_sect, sectors);
            }
            Count::Flush => one(&self.f_req),
            Count::Discard => one(&self.ds_req),
            Count::Error => one(&self.errors),
            Count::Event => one(&self.events),
            Count::Spurious => one(&self.spurious_events),
            Count::Notify => one(&self.notifies),
            Count::UringEnter => one(&self.uring_enters),
            Count::CopyBatch(segs) => {
                one(&self.copy_calls);
                Self::add(&self.copy_segs, segs as u64);
            }
            Count::Map { pages, ok } => {
                one(&self.map_calls);
                if ok {
                    Self::add(&self.map_pages, pages as u64);
                } else {
                    one(&self.map_failures);
                }
            }
            Count::PgrantHit => one(&self.pgrant_hits),
            Count::PgrantPurged(n) => Self::add(&self.pgrant_purged, n as u64),
            Count::Answered(d) => {
                let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
                one(&self.completed);
                Self::add(&self.latency_ns_sum, ns);
                self.latency_ns_max.fetch_max(ns, Ordering::Relaxed);
            }
        }
    }
}

/// One queue's share of the shared gauges (`in_flight`, `persistent_grants`), moved by its
/// own change so that queues sharing one [`Stats`] add up instead of overwriting each other.
#[derive(Debug, Default)]
pub(super) struct GaugeShare {
    in_flight: u64,
    persistent_grants: u64,
}

impl GaugeShare {
    /// Moves the gauges of `stats` to this queue's `in_flight` and `persistent_grants`.
    pub(super) fn sync(&mut self, stats: &Stats, in_flight: u64, persistent_grants: u64) {
        for (gauge, last, now) in [
            (&stats.in_flight, &mut self.in_flight, in_flight),
            (
                &stats.persistent_grants,
                &mut self.persistent_grants,
                persistent_grants,
            ),
        ] {
            if now > *last {
                gauge.fetch_add(now - *last, Ordering::Relaxed);
            } else {
                gauge.fetch_sub(*last - now, Ordering::Relaxed);
            }
            *last = now;
        }
    }
}

/// A pause this long between two wake-ups ends a burst of activity, whose counters are then
/// logged (target [`ACTIVITY_TARGET`], debug level).
const ACTIVITY_GAP: Duration = Duration::from_secs(1);
/// The tracing target of the per-burst counters: `RUST_LOG=info,blkbackd::activity=debug`
/// shows what each burst of requests cost (tests/e2e's perf workload pauses between figures).
const ACTIVITY_TARGET: &str = "blkbackd::activity";

/// What each burst of activity cost, logged when it ends.
#[derive(Debug)]
pub(super) struct Bursts {
    /// The counters when the current burst began (the shared counters: with several queues a
    /// burst line covers all of them).
    start: StatsSnapshot,
    /// When the queue was last active.
    last_active: Instant,
    /// When the current burst's first wake-up came, and this thread's CPU time then.
    began: Option<Instant>,
    cpu: Duration,
    /// The queue's NBD connection, and its counters when the burst began.
    nbd: Option<(Arc<NbdStats>, NbdSnapshot)>,
}

impl Bursts {
    pub(super) fn new() -> Self {
        Self {
            start: StatsSnapshot::default(),
            last_active: Instant::now(),
            began: None,
            cpu: Duration::ZERO,
            nbd: None,
        }
    }

    /// Logs the changes of the queue's NBD connection's counters too (as `nbd_` fields).
    pub(super) fn watch_nbd(&mut self, stats: Arc<NbdStats>) {
        let start = stats.snapshot();
        self.nbd = Some((stats, start));
    }

    /// The queue woke `now` for an event or a completion (timers are not activity): a wake-up
    /// after a pause ends the burst before.
    pub(super) fn active(&mut self, stats: &Stats, queue: &str, now: Instant) {
        if now.saturating_duration_since(self.last_active) >= ACTIVITY_GAP {
            self.log(stats, queue);
        }
        self.began.get_or_insert(now);
        self.last_active = now;
    }

    /// Logs what the burst that just ended cost (when it served any request) and starts the
    /// next one: the counters' changes, how long the burst lasted (`wall_us`, first to last
    /// wake-up) and how much of it this thread ran (`cpu_us`, user and system).
    pub(super) fn log(&mut self, stats: &Stats, queue: &str) {
        let now = stats.snapshot();
        let d = now.since(&self.start);
        self.start = now;
        let nbd = self.nbd.as_mut().map(|(s, start)| {
            let now = s.snapshot();
            (now, std::mem::replace(start, now))
        });
        let began = self.began.take();
        if !tracing::enabled!(target: ACTIVITY_TARGET, tracing::Level::DEBUG) {
            return;
        }
        let cpu_now = thread_cpu_time();
        let cpu = cpu_now.saturating_sub(std::mem::replace(&mut self.cpu, cpu_now));
        if d.completed == 0 {
            return;
        }
        let wall = began.map_or(Duration::ZERO, |b| {
            self.last_active.saturating_duration_since(b)
        });
        let mut line = format!(" wall_us={} cpu_us={}", wall.as_micros(), cpu.as_micros());
        for (name, v) in d.fields() {
            if v != 0 {
                line.push_str(&format!(" {name}={v}"));
            }
        }
        if let Some((now, start)) = nbd {
            for ((name, v), (_, before)) in now.fields().into_iter().zip(start.fields()) {
                // Gauges as they are, counters as changes.
                let v = match name {
                    "in_flight" | "structured" => v,
                    _ => v.wrapping_sub(before),
                };
                if v != 0 {
                    line.push_str(&format!(" nbd_{name}={v}"));
                }
            }
        }
        tracing::debug!(target: ACTIVITY_TARGET, queue = %queue, "burst:{line}");
    }
}

/// CPU time this thread has used (`CLOCK_THREAD_CPUTIME_ID`).
fn thread_cpu_time() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(
        u64::try_from(t.tv_sec).unwrap_or(0),
        u32::try_from(t.tv_nsec).unwrap_or(0),
    )
}

impl StatsSnapshot {
    /// Mean completion latency, if any request completed.
    pub fn mean_latency(&self) -> Option<Duration> {
        (self.completed > 0).then(|| Duration::from_nanos(self.latency_ns_sum / self.completed))
    }
}

impl fmt::Display for StatsSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for (name, v) in self.fields() {
            if !first {
                writeln!(f)?;
            }
            first = false;
            match name {
                // The mean replaces the raw sum, as before.
                "latency_ns_sum" => {
                    let mean = self.mean_latency().map_or(0, |d| d.as_nanos());
                    write!(f, "latency_mean_ns {mean}")?;
                }
                "latency_ns_max" => write!(f, "latency_max_ns {v}")?,
                _ => write!(f, "{name} {v}")?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_subtracts_counters_and_keeps_gauges() {
        let s = Stats::new();
        s.count(Count::Read(1));
        s.count(Count::Read(1));
        s.count(Count::Read(1));
        GaugeShare::default().sync(&s, 0, 5);
        let a = s.snapshot();
        for _ in 0..4 {
            s.count(Count::Read(2));
        }
        s.count(Count::CopyBatch(9));
        s.latency_ns_max.fetch_max(7, Ordering::Relaxed);
        let d = s.snapshot().since(&a);
        assert_eq!(d.rd_req, 4);
        assert_eq!(d.rd_sect, 8);
        assert_eq!(d.copy_segs, 9);
        assert_eq!(d.copy_calls, 1);
        assert_eq!(d.persistent_grants, 5);
        assert_eq!(d.latency_ns_max, 7);
        let m = d.merge(&a);
        assert_eq!(m.rd_req, 7);
        assert_eq!(m.persistent_grants, 10);
    }

    #[test]
    fn gauge_shares_of_two_queues_add_up() {
        let s = Stats::new();
        let (mut a, mut b) = (GaugeShare::default(), GaugeShare::default());
        a.sync(&s, 3, 10);
        b.sync(&s, 2, 1);
        a.sync(&s, 1, 10);
        assert_eq!(s.snapshot().in_flight, 3);
        assert_eq!(s.snapshot().persistent_grants, 11);
        b.sync(&s, 0, 0);
        assert_eq!(s.snapshot().in_flight, 1);
    }

    #[test]
    fn map_calls_count_pages_only_when_they_succeed() {
        let s = Stats::new();
        s.count(Count::Map { pages: 4, ok: true });
        s.count(Count::Map {
            pages: 4,
            ok: false,
        });
        s.count(Count::Answered(Duration::from_nanos(10)));
        s.count(Count::Answered(Duration::from_nanos(30)));
        let v = s.snapshot();
        assert_eq!((v.map_calls, v.map_pages, v.map_failures), (2, 4, 1));
        assert_eq!(v.mean_latency(), Some(Duration::from_nanos(20)));
        assert_eq!(v.latency_ns_max, 30);
    }

    #[test]
    fn display_names_every_counter_once() {
        let text = StatsSnapshot::default().to_string();
        let names: Vec<&str> = text.lines().filter_map(|l| l.split(' ').next()).collect();
        assert_eq!(names.len(), StatsSnapshot::default().fields().len());
        assert_eq!(names.first(), Some(&"oo_req"));
        assert!(names.contains(&"latency_mean_ns"));
        assert!(names.contains(&"copy_calls"));
    }
}
