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
    /// Per grant copy call: the pass, whether it copied from the guest, and to it.
    copy_calls: std::sync::Mutex<Vec<(u64, bool, bool)>>,
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
        self.copy_calls.lock().unwrap().push((pass, from, to));
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
        for id in 0..N {
            let op = if id % 2 == 0 { OP_WRITE } else { OP_READ };
            assert_eq!(
                f.rw(op, id, id % 64 * 8, 0, 8),
                Some(Status::Okay),
                "{mode:?}"
            );
        }
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
    let both = calls.iter().filter(|&&(_, from, to)| from && to).count();
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
