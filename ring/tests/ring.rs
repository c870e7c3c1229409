//! The shared ring from both ends: round trips in every ABI and size, notification
//! decisions, hostile indices, index wrap-around, and the bytes a response may touch.

mod common;

use std::collections::VecDeque;

use common::{limits, page};
use proptest::prelude::*;
use ring::*;
use shmem::{OwnedMem, SharedMem};
use std::sync::atomic::Ordering;

const ABIS: [Abi; 3] = [Abi::Native, Abi::X86_32, Abi::X86_64];

fn read(id: u64, sector: u64, segs: &[Segment]) -> FrontRequest<'_> {
    FrontRequest::Direct {
        operation: OP_READ,
        id,
        sector,
        handle: 0,
        segs,
    }
}

/// Backend side: consume everything, answer each request (Okay, or its rejection's status).
fn serve(back: &mut BackRing, mem: &SharedMem<'_>, l: &DeviceLimits) -> Vec<Request> {
    let mut served = Vec::new();
    while let Some(raw) = back.next_request(mem).unwrap() {
        let rsp = match parse(&raw, l) {
            Ok(Parsed::Ready(r)) => {
                let rsp = r.response(Status::Okay);
                served.push(r);
                rsp
            }
            Ok(Parsed::Indirect(h)) => panic!("no indirect pages here: {h:?}"),
            Err(rej) => rej.response(),
        };
        back.put_response(mem, &rsp).unwrap();
    }
    back.push_responses(mem).unwrap();
    served
}

#[test]
fn round_trip_every_abi_and_ring_size() {
    for abi in ABIS {
        for order in 0..=MAX_RING_PAGE_ORDER {
            let pages = ring_pages(order).unwrap();
            let m = OwnedMem::new(pages).unwrap();
            let mem = m.mem();
            let mut front = FrontRing::init(&mem, abi, pages).unwrap();
            let mut back = BackRing::attach(&mem, abi, pages).unwrap();
            let size = ring_size(abi, pages);
            assert_eq!(
                (front.size(), back.size(), front.free_slots()),
                (size, size, size)
            );
            assert_eq!(back.abi(), abi);

            // Two full rounds so that slots are reused.
            for round in 0..2u64 {
                for i in 0..u64::from(size) {
                    let id = round << 32 | i;
                    let segs = [page(i as u32)];
                    let req = match i % 4 {
                        0 => read(id, i * 8, &segs),
                        1 => FrontRequest::Direct {
                            operation: OP_WRITE,
                            id,
                            sector: 0,
                            handle: 3,
                            segs: &[],
                        },
                        2 => FrontRequest::Discard {
                            id,
                            sector: 8,
                            nr_sectors: 8,
                            secure: true,
                        },
                        _ => FrontRequest::Direct {
                            operation: 9,
                            id,
                            sector: 0,
                            handle: 0,
                            segs: &[],
                        },
                    };
                    front.queue_request(&mem, &req).unwrap();
                }
                assert_eq!(front.free_slots(), 0);
                assert_eq!(
                    front.queue_request(&mem, &read(0, 0, &[page(0)])),
                    Err(RingError::Full)
                );
                front.push_requests(&mem).unwrap();

                let served = serve(&mut back, &mem, &limits());
                assert_eq!(served.len(), size as usize / 2, "reads and discards pass");
                assert_eq!(back.in_flight(), 0);
                for (k, r) in served.iter().enumerate() {
                    let i = 2 * k as u64;
                    assert_eq!(r.id, round << 32 | i);
                    match &r.op {
                        Op::Read(t) => assert_eq!(
                            (t.sector, t.segs.as_slice()),
                            (Sector(i * 8), &[page(i as u32)][..])
                        ),
                        Op::Discard { secure: true, .. } => assert_eq!(i % 4, 2),
                        other => panic!("{other:?}"),
                    }
                }
                for i in 0..u64::from(size) {
                    let rsp = front.next_response(&mem).unwrap().unwrap();
                    let (op, status) = match i % 4 {
                        0 => (OP_READ, Status::Okay),
                        1 => (OP_WRITE, Status::Error),
                        2 => (OP_DISCARD, Status::Okay),
                        _ => (9, Status::NotSupported),
                    };
                    assert_eq!(
                        rsp,
                        RawResponse {
                            id: round << 32 | i,
                            operation: op,
                            status: status.code()
                        }
                    );
                    assert_eq!(rsp.status(), Some(status));
                }
                assert_eq!(front.next_response(&mem).unwrap(), None);
                assert_eq!(front.outstanding(), 0);
            }
        }
    }
}

#[test]
fn responses_touch_only_id_operation_and_status() {
    for abi in ABIS {
        let m = OwnedMem::new(1).unwrap();
        let mem = m.mem();
        let mut front = FrontRing::init(&mem, abi, 1).unwrap();
        let mut back = BackRing::attach(&mem, abi, 1).unwrap();
        let filler = vec![0xA5u8; abi.request_size()];
        front.queue_raw(&mem, &filler).unwrap();
        front.push_requests(&mem).unwrap();
        let _ = back.next_request(&mem).unwrap().unwrap();
        let mut before = vec![0u8; 4096];
        mem.read_into(0, &mut before).unwrap();
        back.put_response(
            &mem,
            &Response {
                id: 0x0102_0304_0506_0708,
                operation: 1,
                status: Status::NotSupported,
            },
        )
        .unwrap();
        let mut after = vec![0u8; 4096];
        mem.read_into(0, &mut after).unwrap();
        let changed: Vec<usize> = (0..4096).filter(|&i| before[i] != after[i]).collect();
        let mut expected: Vec<usize> = (64..72).collect();
        expected.extend([72, 74, 75]);
        assert_eq!(changed, expected, "{abi:?}");
        assert_eq!(
            after[73], 0xA5,
            "padding between operation and status untouched"
        );
        assert_eq!(
            &after[76..64 + abi.slot_size()],
            &before[76..64 + abi.slot_size()]
        );
        assert_eq!(&after[74..76], &(-2i16).to_le_bytes());
    }
}

#[test]
fn polling_for_requests_leaves_the_frontend_quiet() {
    let m = OwnedMem::new(1).unwrap();
    let mem = m.mem();
    let mut front = FrontRing::init(&mem, Abi::X86_64, 1).unwrap();
    let mut back = BackRing::attach(&mem, Abi::X86_64, 1).unwrap();
    let s = [page(1)];

    front.queue_request(&mem, &read(1, 0, &s)).unwrap();
    assert!(front.push_requests(&mem).unwrap(), "req_event starts at 1");
    assert!(back.has_unconsumed_requests(&mem).unwrap());
    assert!(back.next_request(&mem).unwrap().is_some());
    assert!(!back.has_unconsumed_requests(&mem).unwrap());
    assert_eq!(
        mem.load_u32(REQ_EVENT, Ordering::Relaxed).unwrap(),
        1,
        "polling asks for no event"
    );

    front.queue_request(&mem, &read(2, 0, &s)).unwrap();
    assert!(
        !front.push_requests(&mem).unwrap(),
        "no notification while the backend polls"
    );
    assert!(back.has_unconsumed_requests(&mem).unwrap());
    assert!(back.next_request(&mem).unwrap().is_some());

    // Going to sleep: the final check asks for the next request's event.
    assert!(!back.final_check_for_requests(&mem).unwrap());
    front.queue_request(&mem, &read(3, 0, &s)).unwrap();
    assert!(front.push_requests(&mem).unwrap(), "the sleeper is woken");
}

#[test]
fn notify_decisions_follow_the_event_indices() {
    let m = OwnedMem::new(1).unwrap();
    let mem = m.mem();
    let mut front = FrontRing::init(&mem, Abi::X86_64, 1).unwrap();
    let mut back = BackRing::attach(&mem, Abi::X86_64, 1).unwrap();
    let s = [page(1)];

    front.queue_request(&mem, &read(1, 0, &s)).unwrap();
    assert!(front.push_requests(&mem).unwrap(), "req_event starts at 1");
    front.queue_request(&mem, &read(2, 0, &s)).unwrap();
    assert!(
        !front.push_requests(&mem).unwrap(),
        "backend has not asked again"
    );
    assert!(!front.push_requests(&mem).unwrap(), "nothing new pushed");

    assert!(back.next_request(&mem).unwrap().is_some());
    assert!(
        back.final_check_for_requests(&mem).unwrap(),
        "one request still waiting"
    );
    assert!(back.next_request(&mem).unwrap().is_some());
    assert!(back.next_request(&mem).unwrap().is_none());
    assert!(!back.final_check_for_requests(&mem).unwrap());
    assert_eq!(mem.load_u32(REQ_EVENT, Ordering::Relaxed).unwrap(), 3);

    front.queue_request(&mem, &read(3, 0, &s)).unwrap();
    front.queue_request(&mem, &read(4, 0, &s)).unwrap();
    assert!(
        front.push_requests(&mem).unwrap(),
        "req_event 3 is among 3 and 4"
    );
    assert!(back.final_check_for_requests(&mem).unwrap());

    // Responses: rsp_event starts at 1.
    back.put_response(
        &mem,
        &Response {
            id: 1,
            operation: 0,
            status: Status::Okay,
        },
    )
    .unwrap();
    assert!(back.push_responses(&mem).unwrap());
    back.put_response(
        &mem,
        &Response {
            id: 2,
            operation: 0,
            status: Status::Okay,
        },
    )
    .unwrap();
    assert!(
        !back.push_responses(&mem).unwrap(),
        "frontend has not asked again"
    );
    assert_eq!(front.next_response(&mem).unwrap().unwrap().id, 1);
    assert!(front.final_check_for_responses(&mem).unwrap());
    assert_eq!(front.next_response(&mem).unwrap().unwrap().id, 2);
    assert!(!front.final_check_for_responses(&mem).unwrap());
    assert_eq!(mem.load_u32(RSP_EVENT, Ordering::Relaxed).unwrap(), 3);
    for _ in 0..2 {
        back.next_request(&mem).unwrap().unwrap();
    }
    back.put_response(
        &mem,
        &Response {
            id: 3,
            operation: 0,
            status: Status::Okay,
        },
    )
    .unwrap();
    assert!(back.push_responses(&mem).unwrap());
    assert_eq!(
        back.put_response(
            &mem,
            &Response {
                id: 9,
                operation: 0,
                status: Status::Okay
            }
        ),
        Ok(())
    );
    assert_eq!(
        back.put_response(
            &mem,
            &Response {
                id: 9,
                operation: 0,
                status: Status::Okay
            }
        ),
        Err(RingError::NothingToAnswer)
    );
}

fn bogus(back: &mut BackRing, mem: &SharedMem<'_>) {
    let e = back.next_request(mem).unwrap_err();
    assert!(
        matches!(
            e,
            RingError::Protocol(ProtocolViolation::BogusRequestProducer { .. })
        ),
        "{e:?}"
    );
    // Halted: the same violation every time, whatever the frontend does next.
    mem.store_u32(REQ_PROD, 0, Ordering::Relaxed).unwrap();
    assert_eq!(back.next_request(mem).unwrap_err(), e);
    assert_eq!(back.final_check_for_requests(mem).unwrap_err(), e);
    assert_eq!(back.broken().map(RingError::from), Some(e));
}

#[test]
fn bogus_request_producer_halts_the_ring() {
    for abi in ABIS {
        let m = OwnedMem::new(1).unwrap();
        let mem = m.mem();
        // Exactly one ring's worth is fine; the backend then waits for its own responses.
        FrontRing::init(&mem, abi, 1).unwrap();
        mem.store_u32(REQ_PROD, 32, Ordering::Relaxed).unwrap();
        let mut back = BackRing::attach(&mem, abi, 1).unwrap();
        for _ in 0..32 {
            assert!(back.next_request(&mem).unwrap().is_some());
        }
        assert!(
            back.next_request(&mem).unwrap().is_none(),
            "RING_REQUEST_CONS_OVERFLOW"
        );
        assert!(!back.final_check_for_requests(&mem).unwrap());
        back.put_response(
            &mem,
            &Response {
                id: 0,
                operation: 0,
                status: Status::Okay,
            },
        )
        .unwrap();
        mem.store_u32(REQ_PROD, 33, Ordering::Relaxed).unwrap();
        assert!(back.next_request(&mem).unwrap().is_some());
        // One past the ring: halted.
        mem.store_u32(REQ_PROD, 34, Ordering::Relaxed).unwrap();
        bogus(&mut back, &mem);

        // A huge producer right away (CVE-2010-4247's infinite loop).
        FrontRing::init(&mem, abi, 1).unwrap();
        let mut back = BackRing::attach(&mem, abi, 1).unwrap();
        mem.store_u32(REQ_PROD, u32::MAX, Ordering::Relaxed)
            .unwrap();
        bogus(&mut back, &mem);

        // A producer moved back behind what was consumed.
        let mut front = FrontRing::init(&mem, abi, 1).unwrap();
        let mut back = BackRing::attach(&mem, abi, 1).unwrap();
        for i in 0..4 {
            front.queue_request(&mem, &read(i, 0, &[page(1)])).unwrap();
        }
        front.push_requests(&mem).unwrap();
        for _ in 0..4 {
            back.next_request(&mem).unwrap().unwrap();
        }
        mem.store_u32(REQ_PROD, 2, Ordering::Relaxed).unwrap();
        bogus(&mut back, &mem);
        // Responses to requests in flight can still be written.
        back.put_response(
            &mem,
            &Response {
                id: 0,
                operation: 0,
                status: Status::Error,
            },
        )
        .unwrap();

        // At attach: more requests than slots beyond the responses.
        FrontRing::init_at(&mem, abi, 1, 100).unwrap();
        mem.store_u32(REQ_PROD, 133, Ordering::Relaxed).unwrap();
        assert!(matches!(
            BackRing::attach(&mem, abi, 1),
            Err(RingError::Protocol(_))
        ));
        mem.store_u32(REQ_PROD, 132, Ordering::Relaxed).unwrap();
        assert!(BackRing::attach(&mem, abi, 1).is_ok());
    }
}

#[test]
fn bogus_response_producer_is_caught_by_the_frontend() {
    let m = OwnedMem::new(1).unwrap();
    let mem = m.mem();
    let mut front = FrontRing::init(&mem, Abi::X86_32, 1).unwrap();
    front.queue_request(&mem, &read(1, 0, &[page(1)])).unwrap();
    front.push_requests(&mem).unwrap();
    mem.store_u32(RSP_PROD, 2, Ordering::Relaxed).unwrap();
    assert!(matches!(
        front.next_response(&mem),
        Err(RingError::Protocol(
            ProtocolViolation::BogusResponseProducer { rsp_prod: 2, .. }
        ))
    ));
    assert!(front.final_check_for_responses(&mem).is_err());
}

#[test]
fn geometry_is_checked() {
    let m = OwnedMem::new(4).unwrap();
    let mem = m.mem();
    for pages in [0, 3, 5, 32] {
        assert_eq!(
            FrontRing::init(&mem, Abi::Native, pages).unwrap_err(),
            RingError::Pages(pages)
        );
        assert_eq!(
            BackRing::attach(&mem, Abi::Native, pages).unwrap_err(),
            RingError::Pages(pages)
        );
    }
    assert!(matches!(
        BackRing::attach(&mem, Abi::Native, 8),
        Err(RingError::Memory(_))
    ));
    assert!(BackRing::attach(&mem, Abi::Native, 4).is_ok());
    let small = mem.subregion(0, 4096).unwrap();
    let mut back = BackRing::attach(&mem, Abi::Native, 4).unwrap();
    let mut front = FrontRing::init(&mem, Abi::Native, 4).unwrap();
    for i in 0..64 {
        front.queue_request(&mem, &read(i, 0, &[page(1)])).unwrap();
    }
    front.push_requests(&mem).unwrap();
    // A view smaller than the ring is refused, not read out of bounds.
    // Slots of 112 bytes from offset 64: 36 fit in the first page.
    for _ in 0..36 {
        back.next_request(&small).unwrap().unwrap();
    }
    assert!(matches!(
        back.next_request(&small),
        Err(RingError::Memory(_))
    ));
    assert_eq!(
        back.in_flight(),
        36,
        "the slot that could not be read is not consumed"
    );
    assert!(back.next_request(&mem).unwrap().is_some());
    assert!(matches!(
        front.queue_raw(&mem, &[0; 3]),
        Err(RingError::WrongLength(_))
    ));
}

#[derive(Debug, Clone)]
enum Step {
    Push(u8),
    Consume(u8),
    Answer(u8),
    Collect(u8),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (0u8..40).prop_map(Step::Push),
        (0u8..40).prop_map(Step::Consume),
        (0u8..40).prop_map(Step::Answer),
        (0u8..40).prop_map(Step::Collect),
    ]
}

proptest! {
    /// Indices starting anywhere (mostly just before 2^32) wrap without losing, reordering or
    /// duplicating a request or a response.
    #[test]
    fn indices_wrap_at_u32_max(
        start in prop_oneof![(0u32..600).prop_map(|d| u32::MAX - d), any::<u32>()],
        abi in prop::sample::select(ABIS.to_vec()),
        order in 0u32..=2,
        steps in prop::collection::vec(step(), 1..60),
    ) {
        let pages = ring_pages(order).unwrap();
        let m = OwnedMem::new(pages).unwrap();
        let mem = m.mem();
        let mut front = FrontRing::init_at(&mem, abi, pages, start).unwrap();
        let mut back = BackRing::attach(&mem, abi, pages).unwrap();
        let l = limits();
        let mut next_id = 0u64;
        let mut pushed = VecDeque::new();
        let mut consumed = VecDeque::new();
        let mut answered = VecDeque::new();
        for s in steps {
            match s {
                Step::Push(n) => {
                    for _ in 0..n {
                        let id = next_id.wrapping_mul(0x9E37_79B9_7F4A_7C15);
                        let segs = [page(next_id as u32)];
                        match front.queue_request(&mem, &read(id, next_id % 1000, &segs)) {
                            Ok(()) => { pushed.push_back(id); next_id += 1; }
                            Err(RingError::Full) => {
                                prop_assert_eq!(front.free_slots(), 0);
                                break;
                            }
                            Err(e) => prop_assert!(false, "{e}"),
                        }
                    }
                    front.push_requests(&mem).unwrap();
                }
                Step::Consume(n) => {
                    for _ in 0..n {
                        match back.next_request(&mem).unwrap() {
                            Some(raw) => {
                                let Ok(Parsed::Ready(r)) = parse(&raw, &l) else { panic!() };
                                prop_assert_eq!(Some(r.id), pushed.pop_front());
                                consumed.push_back(r);
                            }
                            None => { prop_assert!(pushed.is_empty()); break; }
                        }
                    }
                }
                Step::Answer(n) => {
                    for _ in 0..n {
                        let Some(r) = consumed.pop_front() else {
                            prop_assert_eq!(back.put_response(&mem, &Response { id: 0, operation: 0, status: Status::Okay }), Err(RingError::NothingToAnswer));
                            break;
                        };
                        let status = if r.id % 3 == 0 { Status::Error } else { Status::Okay };
                        back.put_response(&mem, &r.response(status)).unwrap();
                        answered.push_back((r.id, status));
                    }
                    back.push_responses(&mem).unwrap();
                }
                Step::Collect(n) => {
                    for _ in 0..n {
                        match front.next_response(&mem).unwrap() {
                            Some(rsp) => {
                                let (id, status) = answered.pop_front().unwrap();
                                prop_assert_eq!((rsp.id, rsp.operation, rsp.status()), (id, OP_READ, Some(status)));
                            }
                            None => { prop_assert!(answered.is_empty()); break; }
                        }
                    }
                }
            }
            prop_assert_eq!(back.in_flight() as usize, consumed.len());
            prop_assert_eq!(front.outstanding() as usize, pushed.len() + consumed.len() + answered.len());
        }
    }
}

/// An event channel stand-in: a counter bumped on notify, waited on with a deadline so that a
/// lost wakeup fails the test instead of hanging it.
struct Event(std::sync::atomic::AtomicU64);

impl Event {
    fn seen(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
    fn notify(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
    fn wait(&self, seen: u64, what: &str) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while self.seen() == seen {
            assert!(
                std::time::Instant::now() < deadline,
                "lost wakeup waiting for {what}"
            );
            std::thread::yield_now();
        }
    }
}

/// Frontend and backend on two threads, sleeping only when the final checks say so and woken
/// only when the push decisions say so: every request is served in order, and no wakeup is
/// lost (the req_event/rsp_event protocol and its fences).
#[test]
fn two_threads_sleep_and_wake_by_the_event_indices() {
    const N: u64 = 50_000;
    for abi in [Abi::X86_32, Abi::X86_64] {
        let m = OwnedMem::new(1).unwrap();
        let mem = m.mem();
        let mut front = FrontRing::init(&mem, abi, 1).unwrap();
        let mut back = BackRing::attach(&mem, abi, 1).unwrap();
        let (to_back, to_front) = (Event(0.into()), Event(0.into()));
        std::thread::scope(|s| {
            s.spawn(|| {
                let l = limits();
                let mut answered = 0;
                while answered < N {
                    while let Some(raw) = back.next_request(&mem).unwrap() {
                        let Ok(Parsed::Ready(r)) = parse(&raw, &l) else {
                            panic!()
                        };
                        back.put_response(&mem, &r.response(Status::Okay)).unwrap();
                        answered += 1;
                    }
                    if back.push_responses(&mem).unwrap() {
                        to_front.notify();
                    }
                    let seen = to_back.seen();
                    if answered < N && !back.final_check_for_requests(&mem).unwrap() {
                        to_back.wait(seen, "requests");
                    }
                }
            });
            let (mut sent, mut received) = (0u64, 0u64);
            let segs = [page(1)];
            while received < N {
                while sent < N && front.free_slots() > 0 {
                    front
                        .queue_request(&mem, &read(sent, sent % 1024, &segs))
                        .unwrap();
                    sent += 1;
                }
                if front.push_requests(&mem).unwrap() {
                    to_back.notify();
                }
                let mut got_any = false;
                while let Some(rsp) = front.next_response(&mem).unwrap() {
                    assert_eq!((rsp.id, rsp.status()), (received, Some(Status::Okay)));
                    received += 1;
                    got_any = true;
                }
                let seen = to_front.seen();
                if !got_any && received < N && !front.final_check_for_responses(&mem).unwrap() {
                    to_front.wait(seen, "responses");
                }
            }
        });
    }
}
