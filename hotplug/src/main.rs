//! blkhotplug: race-free, leak-free block hotplug for Xen toolstacks.
fn main() {}
