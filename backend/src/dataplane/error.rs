//! Why a running queue fails: local failures it cannot continue after (the frontend's own
//! mistakes are answered or halt the ring, they are not errors here).

use std::io;

use ring::RingError;
use xen::EvtchnError;

/// A local failure of a running queue; it ends as [`super::QueueExit::Failed`] carrying this
/// error.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// An SQE the loop depends on (a poll, a timer) could not be queued.
    #[error("arming the {what}: {source}")]
    Arm {
        /// What was armed.
        what: &'static str,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
    /// `io_uring_enter` failed.
    #[error("io_uring_enter: {0}")]
    Enter(#[source] io::Error),
    /// Reading the pending ports failed.
    #[error("event channel: {0}")]
    Pending(#[source] EvtchnError),
    /// Unmasking the port failed.
    #[error("unmask: {0}")]
    Unmask(#[source] EvtchnError),
    /// The ring's mapping is not writable (it is always mapped read-write).
    #[error("the shared ring is mapped read-only")]
    ReadOnlyRing,
    /// The responses could not be pushed.
    #[error("pushing responses: {0}")]
    Push(#[source] RingError),
}
