//! blkbackd: a per-guest userspace Xen block backend.
//!
//! - [`serve`]: one virtual disk from probe to removal (the xenbus state machine of
//!   [`xenbus_state`] carried out against XenStore), with the device held race-free
//!   ([`acquire`]) and served by the [`dataplane`];
//! - [`supervise`]: one `serve` process per disk, started as devices appear;
//! - [`connector`]: new connections for a backend already confined, from a helper process:
//!   to an NBD server ([`nbd_connector`]) and to xenstored ([`xenstore_connector`]);
//!
//! The `blkbackd` binary (its own crate) puts these together; the simulated platform and
//! guest that tests, benches, the demo and replay use are the `sim` crate.
#![deny(missing_docs)]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod acquire;
pub mod advertise;
pub mod connector;
pub mod dataplane;
pub mod dev_error;
pub mod device;
pub mod fault;
pub mod frontend_config;
pub mod inflight;
pub mod nbd_connector;
pub mod replay;
pub mod sandbox;
pub mod serve;
pub mod stats_file;
pub mod supervise;
pub mod xenbus_state;
pub mod xenstore_connector;
