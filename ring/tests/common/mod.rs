//! Helpers shared by the integration tests (and, through `#[path]`, the fuzz target).
#![allow(dead_code)]

pub mod fuzz_input;
pub mod model;

use ring::{DeviceLimits, Segment};

/// A 1 GiB, 512-byte-sector, writable device with everything supported.
pub fn limits() -> DeviceLimits {
    DeviceLimits {
        sectors: 1 << 21,
        logical_block_size: 512,
        read_only: false,
        max_indirect_segments: 256,
        discard: true,
        secure_discard: true,
    }
}

/// A whole-page segment.
pub fn page(gref: u32) -> Segment {
    Segment {
        gref,
        first_sect: 0,
        last_sect: 7,
    }
}
