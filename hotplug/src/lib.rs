//! blkhotplug: race-free, leak-free block hotplug for Xen toolstacks.
//!
//! It replaces the shell `block` script: no global lock, loop devices attached with
//! `LOOP_CONFIGURE` on the fd `LOOP_CTL_GET_FREE` named, device-mapper through its ioctls, the
//! device's diskseq written with `physical-device` in one XenStore transaction, and the device
//! handed to the backend (fd over a unix socket, or `opened` = `1`) before blkhotplug closes its
//! own fd, so that autoclear or deferred removal cleans up after the backend, even when
//! blkhotplug is killed.
//!
//! Modules: [`params`] (the toolstack's nodes), [`blkdev`] (opening safely), [`loopdev`],
//! [`dm`], [`attach`] (params to an open device, and back for remove), [`script`] (the XenStore
//! side). Every ioctl (loop, block, device-mapper), and with it all `unsafe`, is in the
//! `blkdev` crate, which blkbackd uses too.
#![deny(missing_docs)]

pub mod attach;
pub mod blkdev;
pub mod dm;
mod error;
pub mod loopdev;
pub mod params;
pub mod script;

pub use error::Error;
