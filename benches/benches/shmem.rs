//! Bytes moved per second between private memory and shared memory, per access: a 4 KiB
//! page written into shared memory (what a grant copy to the guest, or the simulated
//! hypervisor's copy, does for every page read) and read out of it (every page written), and
//! a 16-byte record (a response slot).
//!
//! `cargo bench -p benches --bench shmem`

use divan::counter::BytesCount;
use divan::Bencher;
use shmem::{OwnedMem, PAGE_SIZE};

fn main() {
    divan::main();
}

/// Sizes copied: a response slot and a page.
const SIZES: [usize; 2] = [16, PAGE_SIZE];

#[divan::bench(args = SIZES)]
fn write_from(bencher: Bencher, len: usize) {
    let m = OwnedMem::new(1).unwrap();
    let src = vec![0x5a_u8; len];
    bencher
        .counter(BytesCount::new(len))
        .bench_local(|| m.mem().write_from(0, divan::black_box(&src)).unwrap());
}

#[divan::bench(args = SIZES)]
fn read_into(bencher: Bencher, len: usize) {
    let m = OwnedMem::new(1).unwrap();
    let mut dst = vec![0_u8; len];
    bencher
        .counter(BytesCount::new(len))
        .bench_local(|| m.mem().read_into(0, divan::black_box(&mut dst)).unwrap());
}
