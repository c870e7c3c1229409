//! Counters of each NBD connection (issue 16): what [`Stats`](super::Stats) counts for the
//! disk, counted again per connection to the server, with what only a network disk has
//! (connections lost and re-made, commands sent again, holes read). A queue on an NBD export
//! owns one connection at a time (a replacement keeps counting in the same [`NbdStats`]), so
//! the connection is named by its queue.
//!
//! The counts are of NBD commands, not guest requests: a guest write that flushes is two
//! commands (`NBD_CMD_FLUSH`, then the write with FUA, or the write then a flush), a long
//! discard several. Relaxed atomics, as everywhere in the statistics: the data path never
//! waits for a reader.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Declares [`NbdStats`] and [`NbdSnapshot`] from one list of `name: doc`.
macro_rules! nbd_counters {
    ($($name:ident: $doc:literal,)*) => {
        /// One NBD connection's counters.
        #[derive(Debug, Default)]
        pub struct NbdStats {
            $(#[doc = $doc] pub $name: AtomicU64,)*
        }

        /// A plain copy of [`NbdStats`].
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        pub struct NbdSnapshot {
            $(#[doc = $doc] pub $name: u64,)*
        }

        impl NbdStats {
            /// Reads every counter.
            pub fn snapshot(&self) -> NbdSnapshot {
                NbdSnapshot { $($name: self.$name.load(Ordering::Relaxed),)* }
            }
        }

        impl NbdSnapshot {
            /// `(name, value)` for every counter.
            pub fn fields(&self) -> [(&'static str, u64); nbd_counters!(@count $($name)*)] {
                [$((stringify!($name), self.$name),)*]
            }

            /// Sets the counter `name`; `false` when there is none of that name.
            pub fn set(&mut self, name: &str, v: u64) -> bool {
                match name {
                    $(stringify!($name) => self.$name = v,)*
                    _ => return false,
                }
                true
            }
        }
    };
    (@count) => { 0 };
    (@count $head:ident $($rest:ident)*) => { 1 + nbd_counters!(@count $($rest)*) };
}

nbd_counters! {
    rd_req: "`NBD_CMD_READ` commands issued.",
    wr_req: "`NBD_CMD_WRITE` commands issued.",
    f_req: "`NBD_CMD_FLUSH` commands issued.",
    ds_req: "`NBD_CMD_TRIM` (or `NBD_CMD_WRITE_ZEROES` for a discard) commands issued.",
    rd_bytes: "Bytes read: reads the server answered without an error.",
    wr_bytes: "Bytes written: writes the server answered without an error.",
    hole_bytes: "Bytes of reads that came as holes (`NBD_REPLY_TYPE_OFFSET_HOLE`), written \
        as zeroes.",
    errors: "Commands the server answered with an error.",
    in_flight: "Commands issued and not yet answered (a gauge).",
    lost: "Connections lost (closed, broken protocol, no reply within the timeout).",
    reconnects: "New connections made after a loss.",
    resent: "Commands sent again on a new connection.",
    structured: "1 when the connection has structured replies, else 0.",
}

impl NbdStats {
    /// Adds `n` to `counter`.
    pub(super) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Takes one from the gauge `counter` (never below zero).
    pub(super) fn sub(counter: &AtomicU64) {
        let _ = counter.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1));
    }
}

/// The NBD connections of a device, each named by its queue.
#[derive(Debug, Default)]
pub struct NbdConnections(Mutex<Vec<(String, Arc<NbdStats>)>>);

impl NbdConnections {
    /// New counters for the connection of the queue `name`.
    pub fn register(&self, name: &str) -> Arc<NbdStats> {
        let stats = Arc::new(NbdStats::default());
        let mut all = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        all.push((name.to_owned(), Arc::clone(&stats)));
        stats
    }

    /// Every connection's counters, in queue order (`q2` before `q10`).
    pub fn snapshots(&self) -> Vec<NbdSnapshot> {
        let all = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut v: Vec<(&String, NbdSnapshot)> =
            all.iter().map(|(n, s)| (n, s.snapshot())).collect();
        v.sort_by(|a, b| (a.0.len(), a.0).cmp(&(b.0.len(), b.0)));
        v.into_iter().map(|(_, s)| s).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_in_queue_order_and_gauges_never_below_zero() {
        let all = NbdConnections::default();
        let q10 = all.register("vbd-1-51712-q10");
        let q2 = all.register("vbd-1-51712-q2");
        NbdStats::add(&q2.rd_req, 3);
        NbdStats::add(&q10.in_flight, 1);
        NbdStats::sub(&q10.in_flight);
        NbdStats::sub(&q10.in_flight);
        let s = all.snapshots();
        assert_eq!((s[0].rd_req, s[1].rd_req, s[1].in_flight), (3, 0, 0));
        let mut copy = NbdSnapshot::default();
        for (name, v) in s[0].fields() {
            assert!(copy.set(name, v));
        }
        assert_eq!(copy, s[0]);
        assert!(!copy.set("nope", 1));
    }
}
