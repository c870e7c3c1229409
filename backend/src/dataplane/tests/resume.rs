//! Taking a ring over from a backend that died (issue 15), as its in-flight log says: what
//! was published is not answered again, what was written and not published is published,
//! everything else is started again from the log's copy (the ring slots have been overwritten
//! by responses), and the ring carries on.

use super::*;
use crate::inflight::{self, Log};

#[test]
fn a_queue_resumes_where_the_dead_backend_left_its_log() {
    let (_dir, img, mut f, mut p) = setup("resume", 8192, GrantMode::Copy);
    let log = Log::open(inflight::create(1, 32).unwrap()).unwrap();
    // The guest writes four pages (ids 1..=4) at sectors 0, 8, 16, 24.
    fill(&f, 0, 4, 9);
    for i in 0..4u64 {
        let segs = segs_for(&f, i as usize, 8);
        f.queue(&FrontRequest::Direct {
            operation: OP_WRITE,
            id: i + 1,
            sector: i * 8,
            handle: 0,
            segs: &segs,
        });
    }
    f.push();
    // The dead backend consumed all four, answered id 2 and published that, answered id 3
    // (at ring index 1) without publishing, and died: ids 1 and 4 never reached the disk.
    {
        let mem = ring_mem(&f.dom, &f.shared);
        let mut back = ring::BackRing::attach(&mem, Abi::X86_64, 1).unwrap();
        let mut qlog = log.queue(0, back.size()).unwrap();
        qlog.fresh(back.req_cons());
        let entries: Vec<u32> = (0..4)
            .map(|i| {
                let raw = back.next_request(&mem).unwrap().unwrap();
                qlog.consumed(&raw, i).unwrap()
            })
            .collect();
        for (k, id) in [(0u32, 2u64), (1, 3)] {
            let rsp = ring::Response {
                id,
                operation: OP_WRITE,
                status: Status::Okay,
            };
            back.put_response(&mem, &rsp).unwrap();
            qlog.answered(entries[id as usize - 1], k);
            if k == 0 {
                back.push_responses(&mem).unwrap();
                qlog.pushed(1);
            }
        }
    }
    assert_eq!(f.responses(1)[0].id, 2);

    p.inflight = Some(InflightParams {
        log: Arc::clone(&log),
        queue: 0,
        resume: true,
    });
    let q = spawn_queue(p).unwrap();
    let mut ids: Vec<u64> = f.responses(3).iter().map(|r| r.id).collect();
    ids.sort_unstable();
    assert_eq!(ids, vec![1, 3, 4], "each unpublished request answered once");
    let file = std::fs::read(&img).unwrap();
    for i in [0usize, 3] {
        assert_eq!(
            &file[i * PAGE_SIZE..][..PAGE_SIZE],
            &page_bytes(&f, i)[..],
            "the write of id {} was done again",
            i + 1
        );
    }
    // Nothing more comes, and the ring carries on at the right indexes.
    std::thread::sleep(Duration::from_millis(50));
    let mem = ring_mem(&f.dom, &f.shared);
    assert_eq!(f.shared.ring.next_response(&mem).unwrap(), None);
    assert_eq!(f.rw(OP_READ, 5, 0, 10, 8), Some(Status::Okay));
    assert_eq!(page_bytes(&f, 10), page_bytes(&f, 0));
    assert_stopped(q);
}
