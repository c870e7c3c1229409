//! Requests consumed, validated and answered per second on one thread, per ABI: a `FrontRing`
//! fills a 16-page ring, a `BackRing` copies each slot once, parses it, writes the response
//! and pushes; the frontend collects the responses. Throughput counts requests.
//!
//! `cargo bench -p benches --bench ring`

use divan::counter::ItemsCount;
use divan::Bencher;
use ring::{
    parse, parse_indirect, Abi, BackRing, DeviceLimits, FrontRequest, FrontRing, IndirectPage,
    Parsed, Segment, Status, MAX_RING_PAGES, OP_READ, OP_WRITE,
};
use shmem::OwnedMem;

fn main() {
    divan::main();
}

const ABIS: [&str; 3] = ["native", "x86_32-abi", "x86_64-abi"];

fn abi(name: &str) -> Abi {
    match name {
        "native" => Abi::Native,
        "x86_32-abi" => Abi::X86_32,
        _ => Abi::X86_64,
    }
}

const LIMITS: DeviceLimits = DeviceLimits {
    sectors: 1 << 30,
    logical_block_size: 512,
    read_only: false,
    max_indirect_segments: 256,
    discard: true,
    secure_discard: false,
};

fn page(gref: u32) -> Segment {
    Segment {
        gref,
        first_sect: 0,
        last_sect: 7,
    }
}

/// One fill-serve-collect round trip of a full ring with copies of `req`; returns requests.
fn round(
    mem: &shmem::SharedMem<'_>,
    front: &mut FrontRing,
    back: &mut BackRing,
    slot: &[u8],
    indirect: &OwnedMem,
    copy: &mut [IndirectPage; 1],
) -> u32 {
    for _ in 0..front.size() {
        front.queue_raw(mem, slot).unwrap();
    }
    front.push_requests(mem).unwrap();
    let mut n = 0;
    while let Some(raw) = back.next_request(mem).unwrap() {
        let rsp = match parse(&raw, &LIMITS) {
            Ok(Parsed::Ready(r)) => r.response(Status::Okay),
            Ok(Parsed::Indirect(h)) => {
                copy[0].read_from(&indirect.mem()).unwrap();
                match parse_indirect(&h, copy, &LIMITS) {
                    Ok(r) => r.response(Status::Okay),
                    Err(rej) => rej.response(),
                }
            }
            Err(rej) => rej.response(),
        };
        divan::black_box(&rsp);
        back.put_response(mem, &rsp).unwrap();
        n += 1;
    }
    back.push_responses(mem).unwrap();
    while front.next_response(mem).unwrap().is_some() {}
    n
}

fn run(bencher: Bencher, abi_name: &str, req: FrontRequest<'_>) {
    let abi = abi(abi_name);
    let m = OwnedMem::new(MAX_RING_PAGES).unwrap();
    let mem = m.mem();
    let mut front = FrontRing::init(&mem, abi, MAX_RING_PAGES).unwrap();
    let mut back = BackRing::attach(&mem, abi, MAX_RING_PAGES).unwrap();
    let slot = req.encode(abi).unwrap();
    let indirect = OwnedMem::new(1).unwrap();
    for i in 0..256u32 {
        let o = i as usize * 8;
        indirect.mem().write_from(o, &i.to_le_bytes()).unwrap();
        indirect.mem().write_from(o + 4, &[0, 7]).unwrap();
    }
    let mut copy = [IndirectPage::new()];
    bencher
        .counter(ItemsCount::new(front.size()))
        .bench_local(|| {
            round(
                &mem,
                &mut front,
                &mut back,
                slot.as_bytes(),
                &indirect,
                &mut copy,
            )
        });
}

/// Direct reads of 11 whole pages (44 KiB), the largest direct request.
#[divan::bench(args = ABIS)]
fn read_11_segments(bencher: Bencher, abi: &str) {
    let segs: Vec<Segment> = (0..11).map(page).collect();
    run(
        bencher,
        abi,
        FrontRequest::Direct {
            operation: OP_READ,
            id: 1,
            sector: 4096,
            handle: 0,
            segs: &segs,
        },
    );
}

/// Direct 4 KiB writes, the common small request.
#[divan::bench(args = ABIS)]
fn write_1_segment(bencher: Bencher, abi: &str) {
    run(
        bencher,
        abi,
        FrontRequest::Direct {
            operation: OP_WRITE,
            id: 1,
            sector: 4096,
            handle: 0,
            segs: &[page(1)],
        },
    )
}

/// Indirect writes of 256 pages (1 MiB), including the copy of the indirect page.
#[divan::bench(args = ABIS)]
fn indirect_256_segments(bencher: Bencher, abi: &str) {
    run(
        bencher,
        abi,
        FrontRequest::Indirect {
            indirect_op: OP_WRITE,
            id: 1,
            sector: 4096,
            handle: 0,
            nr_segments: 256,
            page_grefs: &[9],
        },
    )
}
