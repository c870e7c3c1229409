//! Copy-once (XSA-155): a frontend rewriting a slot or an indirect page after the backend
//! copied it changes nothing, and under a concurrent writer every result is the one the
//! private copy, a single snapshot, dictates.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use common::model::{model, run_parse};
use common::{limits, page};
use ring::*;
use shmem::OwnedMem;

const ABIS: [Abi; 3] = [Abi::Native, Abi::X86_32, Abi::X86_64];

#[test]
fn rewriting_a_slot_after_the_copy_changes_nothing() {
    for abi in ABIS {
        let m = OwnedMem::new(1).unwrap();
        let mem = m.mem();
        let mut front = FrontRing::init(&mem, abi, 1).unwrap();
        let mut back = BackRing::attach(&mem, abi, 1).unwrap();
        let good = FrontRequest::Direct {
            operation: OP_READ,
            id: 1,
            sector: 0,
            handle: 0,
            segs: &[page(5)],
        };
        front.queue_request(&mem, &good).unwrap();
        front.push_requests(&mem).unwrap();

        let raw = back.next_request(&mem).unwrap().unwrap();
        let evil_segs = [Segment {
            gref: 6,
            first_sect: 0,
            last_sect: 200,
        }; 11];
        let evil = FrontRequest::Direct {
            operation: OP_WRITE,
            id: 2,
            sector: u64::MAX,
            handle: 0,
            segs: &evil_segs,
        };
        front
            .rewrite_raw(&mem, 0, evil.encode(abi).unwrap().as_bytes())
            .unwrap();

        assert_eq!(raw.as_bytes(), good.encode(abi).unwrap().as_bytes());
        let Ok(Parsed::Ready(r)) = parse(&raw, &limits()) else {
            panic!()
        };
        let Op::Read(t) = r.op else { panic!() };
        assert_eq!(
            (r.id, t.sector, t.nr_sectors, t.segs.as_slice()),
            (1, Sector(0), 8, &[page(5)][..])
        );
    }
}

#[test]
fn rewriting_an_indirect_page_after_the_copy_changes_nothing() {
    let m = OwnedMem::new(2).unwrap();
    let mem = m.mem();
    let ring_mem = mem.subregion(0, 4096).unwrap();
    let page_mem = mem.subregion(4096, 4096).unwrap();
    let segs: Vec<Segment> = (0..100).map(page).collect();
    for (i, s) in segs.iter().enumerate() {
        page_mem.write_from(i * 8, &s.gref.to_le_bytes()).unwrap();
        page_mem
            .write_from(i * 8 + 4, &[s.first_sect, s.last_sect])
            .unwrap();
    }
    let mut front = FrontRing::init(&ring_mem, Abi::X86_64, 1).unwrap();
    let mut back = BackRing::attach(&ring_mem, Abi::X86_64, 1).unwrap();
    let req = FrontRequest::Indirect {
        indirect_op: OP_READ,
        id: 3,
        sector: 0,
        handle: 0,
        nr_segments: 100,
        page_grefs: &[1],
    };
    front.queue_request(&ring_mem, &req).unwrap();
    front.push_requests(&ring_mem).unwrap();
    let raw = back.next_request(&ring_mem).unwrap().unwrap();
    let Ok(Parsed::Indirect(h)) = parse(&raw, &limits()) else {
        panic!()
    };

    let mut copy = IndirectPage::new();
    copy.read_from(&page_mem).unwrap();
    // The frontend now breaks every segment in its page.
    page_mem.fill(0, 4096, 0xFF).unwrap();

    let r = parse_indirect(&h, std::slice::from_ref(&copy), &limits()).unwrap();
    let Op::Read(t) = r.op else { panic!() };
    assert_eq!(t.segs.as_slice(), &segs[..]);
    assert_eq!(t.nr_sectors, 800);
    // The same copy read again now would be refused: the check above was on the copy.
    copy.read_from(&page_mem).unwrap();
    assert!(parse_indirect(&h, std::slice::from_ref(&copy), &limits()).is_err());
}

/// Slot images the hostile thread cycles through: valid and invalid, each a different shape.
fn images(abi: Abi) -> Vec<Vec<u8>> {
    let bad = [Segment {
        gref: 0xBAD,
        first_sect: 3,
        last_sect: 9,
    }; 11];
    let many: Vec<Segment> = (0..11).map(page).collect();
    let reqs = [
        FrontRequest::Direct {
            operation: OP_READ,
            id: 0xA,
            sector: 0,
            handle: 0,
            segs: &[page(1)],
        },
        FrontRequest::Direct {
            operation: OP_WRITE,
            id: 0xB,
            sector: u64::MAX - 4,
            handle: 0xFFFF,
            segs: &bad,
        },
        FrontRequest::Direct {
            operation: OP_WRITE,
            id: 0xC,
            sector: 8,
            handle: 0,
            segs: &many,
        },
        FrontRequest::Direct {
            operation: OP_FLUSH_DISKCACHE,
            id: 0xD,
            sector: 0,
            handle: 0,
            segs: &[],
        },
        FrontRequest::Indirect {
            indirect_op: OP_READ,
            id: 0xE,
            sector: 16,
            handle: 0,
            nr_segments: 200,
            page_grefs: &[9],
        },
        FrontRequest::Indirect {
            indirect_op: OP_WRITE,
            id: 0xF,
            sector: 16,
            handle: 0,
            nr_segments: 60000,
            page_grefs: &[9; 8],
        },
        FrontRequest::Discard {
            id: 0x10,
            sector: 1 << 20,
            nr_sectors: u64::MAX,
            secure: true,
        },
        FrontRequest::Direct {
            operation: 0xEE,
            id: u64::MAX,
            sector: 0,
            handle: 0,
            segs: &many,
        },
    ];
    let mut v: Vec<Vec<u8>> = reqs
        .iter()
        .map(|r| r.encode(abi).unwrap().as_bytes().to_vec())
        .collect();
    v.push(vec![0xFF; abi.request_size()]);
    v
}

#[test]
fn concurrent_rewrites_give_results_consistent_with_one_snapshot() {
    for abi in ABIS {
        let m = OwnedMem::new(1).unwrap();
        let mem = m.mem();
        let mut front = FrontRing::init(&mem, abi, 1).unwrap();
        let mut back = BackRing::attach(&mem, abi, 1).unwrap();
        let size = front.size();
        let imgs = images(abi);
        let segs: Vec<Segment> = (0..512).map(page).collect();
        let pages = vec![{
            let mut p = [0u8; 4096];
            for (i, s) in segs.iter().enumerate() {
                p[i * 8..i * 8 + 4].copy_from_slice(&s.gref.to_le_bytes());
                p[i * 8 + 5] = 7;
            }
            IndirectPage::from_bytes(p)
        }];
        let l = limits();
        let stop = AtomicBool::new(false);
        let rewrites = AtomicU64::new(0);
        let mut outcomes = std::collections::HashSet::new();

        std::thread::scope(|s| {
            s.spawn(|| {
                let mut k = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    for slot in 0..size as usize {
                        let img = &imgs[(k + slot) % imgs.len()];
                        mem.write_from(RING_HEADER_SIZE + slot * abi.slot_size(), img)
                            .unwrap();
                    }
                    k += 1;
                    rewrites.fetch_add(1, Ordering::Relaxed);
                }
            });
            // Start consuming once the rewriter runs, and go on until it has rewritten the
            // ring many times, however the two threads happen to be scheduled.
            while rewrites.load(Ordering::Relaxed) == 0 {
                std::thread::yield_now();
            }
            let mut round = 0u64;
            while round < 300 || rewrites.load(Ordering::Relaxed) < 100 {
                round += 1;
                for i in 0..size {
                    let img = &imgs[(round as usize + i as usize) % imgs.len()];
                    front.queue_raw(&mem, img).unwrap();
                }
                front.push_requests(&mem).unwrap();
                while let Some(raw) = back.next_request(&mem).unwrap() {
                    let got = run_parse(&raw, &l, &pages);
                    let want = model(abi, raw.as_bytes(), &l, &pages);
                    assert_eq!(got, want, "{raw:?}");
                    let rsp = match &got {
                        Ok(r) => r.response(Status::Okay),
                        Err(rej) => rej.response(),
                    };
                    outcomes.insert(format!("{:?}", got.map(|r| r.id).map_err(|e| e.reason)));
                    back.put_response(&mem, &rsp).unwrap();
                }
                back.push_responses(&mem).unwrap();
                while front.next_response(&mem).unwrap().is_some() {}
            }
            stop.store(true, Ordering::Relaxed);
        });
        assert!(rewrites.load(Ordering::Relaxed) >= 100);
        assert!(outcomes.len() > 1, "{outcomes:?}");
    }
}
