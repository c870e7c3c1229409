//! What a queue tells whoever watches it (the `--record` trace recorder), through one narrow
//! interface passed in with [`QueueParams::observer`]: the data plane knows nothing of traces.
//!
//! [`QueueParams::observer`]: super::QueueParams::observer

use std::sync::Arc;

use ring::{DeviceLimits, RawRequest, Request, Response, Status};

use super::{QueueExit, QueueParams};

/// Watches the queues of a backend; asked once per queue, when it starts.
pub trait Observer: Send + Sync + std::fmt::Debug {
    /// The watcher of the queue about to run with `params`.
    fn queue(self: Arc<Self>, params: &QueueParams) -> Box<dyn QueueObserver>;
}

/// Watches one queue, called on the queue's thread. Every method has an empty default.
pub trait QueueObserver: Send + std::fmt::Debug {
    /// The backend took slot `raw` off the ring (before validating it against `limits`).
    fn slot(&mut self, _raw: &RawRequest, _limits: &DeviceLimits) {}
    /// Request `req` is about to be answered with `status` (its data, for a read, is in the
    /// guest's pages by now).
    fn finishing(&mut self, _req: &Request, _status: Status) {}
    /// The backend wrote response `rsp`.
    fn response(&mut self, _rsp: &Response) {}
    /// The backend woke up for an event.
    fn event(&mut self) {}
    /// The queue ended.
    fn exit(&mut self, _exit: &QueueExit) {}
}
