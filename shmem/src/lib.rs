//! Volatile, bounds-checked access to memory shared with another domain.
//!
//! A guest can change the pages it shares with the backend at any moment, so no Rust reference
//! (`&[u8]`, `&mut T`) to them may ever exist: the compiler would be entitled to assume the
//! bytes do not change. [`SharedMem`] is the one type through which every crate in this
//! workspace touches shared memory. Only its constructor is `unsafe`; every accessor is safe,
//! bounds-checked, and uses volatile or atomic operations (the pattern of rust-vmm's
//! `vm-memory` `VolatileSlice`).
//!
//! This crate holds the workspace's only `unsafe` code for shared memory; `ring` (the blkif
//! protocol) and `xen` (grant mappings) both build on it, which is why it is a crate of its
//! own rather than a module of either.
#![deny(missing_docs)]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

mod file;
mod owned;
mod read_only;
mod region;

pub use file::MappedFile;
pub use owned::OwnedMem;
pub use read_only::ReadOnlyMem;
pub use region::{OutOfBounds, SharedMem, PAGE_SIZE};
