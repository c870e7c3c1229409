//! Ring traces: record what a frontend did to a backend and what the backend answered, so that
//! `blkbackd replay` (the `blkbackd` crate's `replay`) can play it against the real data plane
//! on the simulated platform.
//!
//! - [`format`]: the trace, JSON lines (documented for people in `docs/trace-format.md`).
//! - [`Recorder`]: written by the data plane itself while it serves a frontend
//!   (`blkbackd serve --record FILE`, `blkbackd demo --record FILE`), on real Xen as on the
//!   simulation.
//! - `blkbackd replay TRACE`: a simulated guest replays the trace against real queues
//!   ([`crate::dataplane::spawn_queue`]) and the first response that differs from the
//!   recording is reported with its line.
//!
//! The XenStore handshake is not replayed: a trace starts from what it negotiated (ABI,
//! ring pages, features), which is what the data plane is given.

pub mod format;
mod recorder;

pub use recorder::{QueueRecorder, Recorder};
