//! What the `blkbackd` binary adds to the backend library: the commands that run on the
//! simulated platform.
//!
//! - [`demo`]: `blkbackd demo`, the whole backend at work with no Xen;
//! - [`replay`]: `blkbackd replay TRACE`, a recorded ring session played against the real
//!   data plane.
#![deny(missing_docs)]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod demo;
pub mod replay;
