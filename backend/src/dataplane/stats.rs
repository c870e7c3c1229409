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
use std::time::Duration;

/// Declares [`Stats`] and [`StatsSnapshot`] from one list, so that a counter is named once.
/// Each entry is `kind name: doc`; `sum` counters and gauges add up when snapshots merge,
/// `max` ones take the larger value.
macro_rules! counters {
    ($($kind:ident $name:ident: $doc:literal,)*) => {
        /// The counters of one queue (or of a device's queues together).
        #[derive(Debug, Default)]
        pub struct Stats {
            $(#[doc = $doc] pub $name: AtomicU64,)*
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
    sum oo_req: "`oo_req`: times a request had to wait for backend resources (a free bounce \
        region for a large indirect request) before it could be issued.",
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
        Stats::add(&s.rd_req, 3);
        Stats::add(&s.persistent_grants, 5);
        let a = s.snapshot();
        Stats::add(&s.rd_req, 4);
        Stats::add(&s.copy_segs, 9);
        s.latency_ns_max.fetch_max(7, Ordering::Relaxed);
        let d = s.snapshot().since(&a);
        assert_eq!(d.rd_req, 4);
        assert_eq!(d.copy_segs, 9);
        assert_eq!(d.persistent_grants, 5);
        assert_eq!(d.latency_ns_max, 7);
        let m = d.merge(&a);
        assert_eq!(m.rd_req, 7);
        assert_eq!(m.persistent_grants, 10);
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
