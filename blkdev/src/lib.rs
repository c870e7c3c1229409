//! Every block-device ioctl the two binaries make, in one crate that both use: blkbackd for
//! the disk it serves ([`block`]), blkhotplug for what it creates ([`loopdev`], [`dm`]) and
//! the facts it reads ([`block`]). The request numbers are public so that blkbackd's seccomp
//! allow-list names the very numbers its calls use.
//!
//! The only `unsafe` of either binary's block-device handling is here: one ioctl call
//! (through the `ioctl` crate's `call`, shared with `xen`) and one fd ownership transfer (in [`dm::call_with_fd`]), each call site
//! with a `// SAFETY:` comment naming the kernel structure its argument mirrors (layouts
//! checked by tests against `include/uapi/linux/{fs,loop,dm-ioctl}.h`).
//!
//! This crate knows nothing of Xen: it takes and returns fds and plain numbers, and reports
//! the kernel's [`Errno`](rustix::io::Errno) for callers to put in their own errors.
#![deny(missing_docs)]

pub mod block;
pub mod dm;
pub mod loopdev;
