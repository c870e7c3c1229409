//! Structure-aware: a frontend doing anything (raw slots, rewrites, bogus indices) against
//! the real backend loop. The backend must never panic, never hold more requests than slots,
//! and once it reports a protocol violation it must keep reporting it.
#![no_main]

use std::sync::atomic::Ordering;

use arbitrary::Arbitrary;
use ring::{
    parse, parse_indirect, Abi, BackRing, DeviceLimits, FrontRing, IndirectPage, Parsed,
    RingError, Status, REQ_EVENT, REQ_PROD, RSP_EVENT,
};
use shmem::OwnedMem;

#[derive(Arbitrary, Debug)]
enum Action {
    QueueRaw(Vec<u8>),
    Push,
    Rewrite(u8, Vec<u8>),
    SetReqProd(u32),
    SetEvents(u32, u32),
    Consume(u8),
    FinalCheck,
    Answer(u8),
    Collect(u8),
}

#[derive(Arbitrary, Debug)]
struct Input {
    abi: u8,
    order: u8,
    start: u32,
    limits: (u64, u8, bool, u16, bool, bool),
    page: Vec<u8>,
    actions: Vec<Action>,
}

libfuzzer_sys::fuzz_target!(|input: Input| {
    let abi = [Abi::Native, Abi::X86_32, Abi::X86_64][usize::from(input.abi % 3)];
    let pages = 1usize << (input.order % 5);
    let Some(m) = OwnedMem::new(pages) else { return };
    let mem = m.mem();
    let Ok(mut front) = FrontRing::init_at(&mem, abi, pages, input.start) else { return };
    let Ok(mut back) = BackRing::attach(&mem, abi, pages) else { return };
    let (sectors, lbs, read_only, max_indirect_segments, discard, secure_discard) = input.limits;
    let limits = DeviceLimits {
        sectors,
        logical_block_size: 512 << (lbs % 4),
        read_only,
        max_indirect_segments,
        discard,
        secure_discard,
    };
    let mut bytes = [0u8; 4096];
    let n = input.page.len().min(4096);
    bytes[..n].copy_from_slice(&input.page[..n]);
    let indirect = [IndirectPage::from_bytes(bytes)];
    let mut pending = Vec::new();
    let mut violation = None;
    let slot = |b: &[u8]| {
        let mut v = b.to_vec();
        v.resize(abi.request_size(), 0);
        v
    };

    for action in input.actions {
        match action {
            Action::QueueRaw(b) => {
                let _ = front.queue_raw(&mem, &slot(&b));
            }
            Action::Push => {
                let _ = front.push_requests(&mem);
            }
            Action::Rewrite(back_n, b) => {
                let _ = front.rewrite_raw(&mem, u32::from(back_n), &slot(&b));
            }
            Action::SetReqProd(v) => mem.store_u32(REQ_PROD, v, Ordering::Relaxed).unwrap(),
            Action::SetEvents(req, rsp) => {
                mem.store_u32(REQ_EVENT, req, Ordering::Relaxed).unwrap();
                mem.store_u32(RSP_EVENT, rsp, Ordering::Relaxed).unwrap();
            }
            Action::Consume(k) => {
                for _ in 0..k {
                    match back.next_request(&mem) {
                        Ok(Some(raw)) => {
                            let rsp = match parse(&raw, &limits) {
                                Ok(Parsed::Ready(r)) => r.response(Status::Okay),
                                Ok(Parsed::Indirect(h)) => match parse_indirect(&h, &indirect, &limits) {
                                    Ok(r) => r.response(Status::Okay),
                                    Err(rej) => rej.response(),
                                },
                                Err(rej) => rej.response(),
                            };
                            pending.push(rsp);
                            assert!(back.in_flight() <= back.size());
                            assert_eq!(back.in_flight() as usize, pending.len());
                        }
                        Ok(None) => break,
                        Err(e) => {
                            assert!(matches!(e, RingError::Protocol(_)), "{e}");
                            if let Some(v) = violation {
                                assert_eq!(e, v);
                            }
                            violation = Some(e);
                            break;
                        }
                    }
                }
            }
            Action::FinalCheck => match back.final_check_for_requests(&mem) {
                Ok(_) => assert!(violation.is_none()),
                Err(e) => {
                    assert!(violation.is_none() || violation == Some(e));
                    violation = Some(e);
                }
            },
            Action::Answer(k) => {
                for _ in 0..k {
                    let Some(rsp) = pending.pop() else {
                        break;
                    };
                    back.put_response(&mem, &rsp).unwrap();
                }
                let _ = back.push_responses(&mem).unwrap();
            }
            Action::Collect(k) => {
                for _ in 0..k {
                    if !matches!(front.next_response(&mem), Ok(Some(_))) {
                        break;
                    }
                }
            }
        }
    }
});
