//! Xen interfaces for a userspace backend, in pure Rust over the kernel's device nodes.
//!
//! Three interfaces, each real (Linux dom0 device nodes) and simulated (the `sim` crate, a
//! hypervisor stand-in that works across processes, for tests, benches, the demo and replay,
//! built on the same traits and checks):
//! - grant tables: [`GrantMapper`] and [`GrantCopier`];
//! - event channels: [`EventChannel`];
//! - XenStore: one client, [`xenstore`], speaking the wire protocol to the real xenstored or to
//!   the simulated one, so production code is the code under test.
//!
//! [`Platform`] bundles them; [`PlatformConfig`] names the real or simulated one by
//! configuration, never by code changes: `xen` is [`XenPlatform`] ([`Gntdev`] and
//! [`XenEventChannel`] over `/dev/xen`), `sim:DIR[:DOMID]` the `sim` crate's `SimPlatform`.
//!
//! What the traits promise, on both implementations: a map is all or nothing and is undone
//! by dropping its [`GrantMapping`]; a copy batch fails as a whole only for malformed
//! segments, and otherwise reports every segment's own status; an event-channel port, once
//! reported by `pending`, stays masked until `unmask`, so notifications coalesce; the event
//! fd polls readable exactly while something is pending.
//!
//! The ioctl and mmap `unsafe` is confined to one module per device (`gntdev`, `evtchn`), the
//! ioctl call itself from the `ioctl` crate, which `blkdev` shares.
#![deny(missing_docs)]

mod platform;
mod types;

pub use platform::{EventChannel, GrantCopier, GrantMapper, Platform};
pub use types::{
    check_copy_batch, check_map_refs, Access, CopyOp, DomId, EvtchnError, GrantAddr, GrantError,
    GrantMapping, GrantRef, GrantStatus, Port, Unmap, UnmapNotify, DOMID_FIRST_RESERVED,
};

pub mod abspath;
pub mod handoff;
pub mod xenbus;
pub mod xenstore;

mod config;
mod evtchn;
mod gntdev;
pub mod ioctl;

pub use config::{ParsePlatformError, PlatformConfig, PlatformError, XenPlatform, PLATFORM_ENV};
pub use evtchn::{XenEventChannel, EVTCHN_PATH};
pub use gntdev::{Gntdev, GNTDEV_PATH};
