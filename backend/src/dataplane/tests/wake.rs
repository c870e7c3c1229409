//! One trip to the kernel per pass: the event channel through the queue's io_uring (every
//! wake-up read and unmasked once, nothing lost between the ring's final check and the
//! re-armed read), one grant copy call and one notification at most per pass.

use std::os::fd::BorrowedFd;
use std::sync::atomic::AtomicUsize;

use xen::{DomId, EvtchnError, GrantCopier, GrantMapper, Port};

use super::*;

/// The platform, with event channels that count their unmasks, and a grant copier that
/// notes in which pass (the queue's `uring_enters` then) each call comes.
#[derive(Debug)]
struct Watched {
    inner: Arc<dyn xen::Platform>,
    unmasks: Arc<AtomicUsize>,
    stats: Arc<Stats>,
    /// Per grant copy call: the pass, whether it copied from the guest, and to it, and how
    /// many pages.
    copy_calls: std::sync::Mutex<Vec<(u64, bool, bool, usize)>>,
}

impl Watched {
    fn new(p: &mut QueueParams) -> Arc<Self> {
        let w = Arc::new(Self {
            inner: Arc::clone(&p.platform),
            unmasks: Arc::new(AtomicUsize::new(0)),
            stats: Arc::clone(&p.stats),
            copy_calls: std::sync::Mutex::new(Vec::new()),
        });
        p.platform = Arc::clone(&w) as Arc<dyn xen::Platform>;
        w
    }
}

impl GrantCopier for Watched {
    fn copy(&self, ops: &mut [xen::CopyOp<'_>]) -> Result<(), xen::GrantError> {
        let pass = self.stats.snapshot().uring_enters;
        let from = ops
            .iter()
            .any(|o| matches!(o, xen::CopyOp::FromGuest { .. }));
        let to = ops.iter().any(|o| matches!(o, xen::CopyOp::ToGuest { .. }));
        self.copy_calls
            .lock()
            .unwrap()
            .push((pass, from, to, ops.len()));
        self.inner.grant_copier().copy(ops)
    }
}

#[derive(Debug)]
struct Counted {
    inner: Box<dyn EventChannel>,
    unmasks: Arc<AtomicUsize>,
}

impl xen::Platform for Watched {
    fn domid(&self) -> DomId {
        self.inner.domid()
    }
    fn grant_mapper(&self) -> &dyn GrantMapper {
        self.inner.grant_mapper()
    }
    fn grant_copier(&self) -> &dyn GrantCopier {
        self
    }
    fn open_event_channel(&self) -> Result<Box<dyn EventChannel>, EvtchnError> {
        Ok(Box::new(Counted {
            inner: self.inner.open_event_channel()?,
            unmasks: Arc::clone(&self.unmasks),
        }))
    }
    fn xenstore_path(&self) -> PathBuf {
        self.inner.xenstore_path()
    }
}

impl EventChannel for Counted {
    fn bind_interdomain(&mut self, remote: DomId, port: Port) -> Result<Port, EvtchnError> {
        self.inner.bind_interdomain(remote, port)
    }
    fn unbind(&mut self, port: Port) -> Result<(), EvtchnError> {
        self.inner.unbind(port)
    }
    fn notify(&self, port: Port) -> Result<(), EvtchnError> {
        self.inner.notify(port)
    }
    fn pending(&mut self, out: &mut Vec<Port>) -> Result<(), EvtchnError> {
        self.inner.pending(out)
    }
    fn read_done(
        &mut self,
        read: Result<&[u8], rustix::io::Errno>,
        out: &mut Vec<Port>,
    ) -> Result<(), EvtchnError> {
        self.inner.read_done(read, out)
    }
    fn unmask(&self, port: Port) -> Result<(), EvtchnError> {
        self.unmasks.fetch_add(1, Ordering::SeqCst);
        self.inner.unmask(port)
    }
    fn unmask_is_write(&self) -> bool {
        self.inner.unmask_is_write()
    }
    fn restrict(&mut self, domid: DomId) -> Result<(), EvtchnError> {
        self.inner.restrict(domid)
    }
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inner.as_fd()
    }
}

#[test]
fn each_wake_up_is_read_and_unmasked_once_and_none_is_lost() {
    for mode in [GrantMode::Copy, GrantMode::Map] {
        let (_dir, _, mut f, mut p) = setup("wake", 1024, mode);
        p.persistent_grants = true;
        let unmasks = Arc::clone(&Watched::new(&mut p).unmasks);
        let stats = Arc::clone(&p.stats);
        let q = spawn_queue(p).unwrap();
        // One request at a time: each is pushed after the previous response, so each
        // notification races the end of the queue's pass (its final check, unmask and
        // re-armed read); one lost would time out here.
        const N: u64 = 300;
        one_at_a_time(&mut f, 0..N, mode);
        let s = stats.snapshot();
        // The pass that answers a request has unmasked before it publishes: by now every
        // wake-up was unmasked, once. The binding's conservative event may add one.
        assert_eq!(
            unmasks.load(Ordering::SeqCst) as u64,
            s.events,
            "{mode:?}: one unmask per wake-up"
        );
        assert!(
            (N..=N + 1).contains(&s.events),
            "{mode:?}: {} wake-ups for {N} notified requests (a delivery left unread keeps \
             the queue waking)",
            s.events
        );
        q.stop();
    }
}

#[test]
fn a_pass_makes_one_grant_copy_call_and_one_notification_at_most() {
    let (_dir, _, mut f, mut p) = setup("pass", 1024, GrantMode::Copy);
    let watched = Watched::new(&mut p);
    let stats = Arc::clone(&p.stats);
    let q = spawn_queue(p).unwrap();
    let (rsegs, wsegs) = (segs_for(&f, 0, 8), segs_for(&f, 1, 8));
    let direct = |operation, id, segs| FrontRequest::Direct {
        operation,
        id,
        sector: id % 64 * 8,
        handle: 0,
        segs,
    };
    for k in 0..200u64 {
        // A read; once the queue has taken it (its final check moved req_event), a write
        // pushed without an event: the pass that copies the read out, woken by its
        // completion, finds the write to copy in.
        f.queue(&direct(OP_READ, 2 * k, &rsegs));
        f.push();
        let taken = 2 * k as u32 + 2;
        let t = Instant::now();
        while ring_mem(&f.dom, &f.shared)
            .load_u32(ring::REQ_EVENT, Ordering::Acquire)
            .unwrap()
            != taken
        {
            assert!(t.elapsed() < Duration::from_secs(5), "read not taken");
        }
        f.queue(&direct(OP_WRITE, 2 * k + 1, &wsegs));
        let mem = ring_mem(&f.dom, &f.shared);
        f.shared.ring.push_requests(&mem).unwrap();
        // If the read had completed already, nothing would wake the queue: notify late.
        let t = Instant::now();
        let mut got = 0;
        while got < 2 {
            while let Some(r) = f.shared.ring.next_response(&mem).unwrap() {
                assert_eq!(r.status(), Some(Status::Okay));
                got += 1;
            }
            if t.elapsed() > Duration::from_millis(20) {
                f.evt.notify(f.shared.port).unwrap();
            }
            assert!(t.elapsed() < Duration::from_secs(5), "{got} of 2 answered");
        }
    }
    let calls = watched.copy_calls.lock().unwrap().clone();
    let both = calls.iter().filter(|&&(_, from, to, _)| from && to).count();
    assert!(both > 0, "no pass copied both ways: {} calls", calls.len());
    let twice = calls.windows(2).filter(|w| w[0].0 == w[1].0).count();
    assert_eq!(
        twice,
        0,
        "passes with two grant copy calls, of {}",
        calls.len()
    );
    let s = stats.snapshot();
    // Every pass ends in one io_uring_enter (the queue does not poll here).
    assert!(
        s.notifies <= s.uring_enters,
        "{} notifications in {} passes",
        s.notifies,
        s.uring_enters
    );
    q.stop();
}

#[test]
fn the_indirect_pages_of_a_pass_are_read_in_one_grant_copy() {
    let (_dir, img, mut f, mut p) = setup("ind-batch", 1024, GrantMode::Copy);
    let watched = Watched::new(&mut p);
    let q = spawn_queue(p).unwrap();
    // Five indirect writes of 16 one-sector segments, each list in its own indirect page
    // (data pages 0..5), but the third names an indirect page never granted; then a direct
    // read behind them. All pushed at once: one pass takes them all.
    fill(&f, 10, 16, 4);
    for r in 0..5 {
        for i in 0..16 {
            indirect_entry(&f.page(r).0, i, f.page(10 + i).1, 0, 0);
        }
    }
    let rsegs = segs_for(&f, 40, 8);
    for r in 0..5u64 {
        let page = if r == 2 { 4000 } else { f.page(r as usize).1 };
        f.queue(&FrontRequest::Indirect {
            indirect_op: OP_WRITE,
            id: r,
            sector: r * 16,
            handle: 0,
            nr_segments: 16,
            page_grefs: &[page],
        });
    }
    f.queue(&FrontRequest::Direct {
        operation: OP_READ,
        id: 5,
        sector: 0,
        handle: 0,
        segs: &rsegs,
    });
    f.push();
    let mut status: Vec<(u64, Option<Status>)> =
        f.responses(6).iter().map(|r| (r.id, r.status())).collect();
    status.sort_unstable_by_key(|&(id, _)| id);
    let ok = Some(Status::Okay);
    assert_eq!(
        status,
        [
            (0, ok),
            (1, ok),
            (2, Some(Status::Error)),
            (3, ok),
            (4, ok),
            (5, ok)
        ],
        "the bad indirect page fails its own request only"
    );
    let file = std::fs::read(&img).unwrap();
    assert_eq!(&file[4 * 16 * 512..][..512], &page_bytes(&f, 10)[..512]);
    let calls = watched.copy_calls.lock().unwrap().clone();
    assert_eq!(
        calls.first().map(|c| (c.1, c.2, c.3)),
        Some((true, false, 5)),
        "the five indirect pages first, in one call: {calls:?}"
    );
    q.stop();
}

#[test]
fn a_queue_submitting_through_a_kernel_thread_serves_requests() {
    for mode in [GrantMode::Copy, GrantMode::Map] {
        let (_dir, img, mut f, mut p) = setup("sqpoll", 1024, mode);
        p.persistent_grants = true;
        p.sqpoll = true;
        let q = spawn_queue(p).unwrap();
        for id in 0..100u64 {
            fill(&f, 0, 1, id as u8);
            let sector = id % 64 * 8;
            assert_eq!(
                f.rw(OP_WRITE, id, sector, 0, 8),
                Some(Status::Okay),
                "{mode:?}"
            );
            assert_eq!(
                f.rw(OP_READ, id, sector, 1, 8),
                Some(Status::Okay),
                "{mode:?}"
            );
            assert_eq!(page_bytes(&f, 1), page_bytes(&f, 0), "{mode:?}: read back");
        }
        let file = std::fs::read(&img).unwrap();
        assert_eq!(
            &file[99 % 64 * 8 * 512..][..PAGE_SIZE],
            &page_bytes(&f, 0)[..]
        );
        q.stop();
    }
}

#[test]
fn at_depth_one_a_request_costs_two_io_uring_enters_at_most() {
    // One to submit its I/O and wait for it, one to wait for the next request's event: the
    // event channel's read (and, on Linux, unmask) at the end of the pass post no CQE that
    // would end the first wait before the disk's completion.
    for mode in [GrantMode::Copy, GrantMode::Map] {
        let (_dir, _, mut f, p) = setup("enters", 1024, mode);
        let stats = Arc::clone(&p.stats);
        let q = spawn_queue(p).unwrap();
        // The first request also meets the binding's conservative event.
        assert_eq!(f.rw(OP_WRITE, 0, 0, 0, 8), Some(Status::Okay));
        let before = stats.snapshot();
        let t = Instant::now();
        const N: u64 = 200;
        one_at_a_time(&mut f, 1..=N, mode);
        let s = stats.snapshot();
        let enters = s.uring_enters - before.uring_enters;
        // Map mode's housekeeping tick wakes the queue too, with no request.
        let ticks = match mode {
            GrantMode::Map => {
                (t.elapsed().as_millis() / crate::dataplane::persistent::LRU_INTERVAL.as_millis())
                    as u64
                    + 1
            }
            GrantMode::Copy => 0,
        };
        assert!(
            enters <= 2 * N + ticks,
            "{mode:?}: {enters} io_uring_enter for {N} requests at depth 1 ({ticks} ticks)"
        );
        q.stop();
    }
}

/// Requests `ids`, writes and reads in turn, each pushed after the previous one's response,
/// each answered `Okay`.
fn one_at_a_time(f: &mut Front, ids: impl Iterator<Item = u64>, mode: GrantMode) {
    for id in ids {
        let op = if id % 2 == 0 { OP_WRITE } else { OP_READ };
        assert_eq!(
            f.rw(op, id, id % 64 * 8, 0, 8),
            Some(Status::Okay),
            "{mode:?}"
        );
    }
}
