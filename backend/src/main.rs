//! blkbackd: a per-guest userspace Xen block backend.
fn main() {}
