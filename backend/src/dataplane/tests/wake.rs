//! The event channel's way through the queue's io_uring: every wake-up consumed and unmasked
//! once, nothing lost between the ring's final check and the re-armed read.

use std::os::fd::BorrowedFd;
use std::sync::atomic::AtomicUsize;

use xen::{DomId, EvtchnError, GrantCopier, GrantMapper, Port};

use super::*;

/// The platform, with event channels that count their unmasks.
#[derive(Debug)]
struct CountUnmasks {
    inner: Arc<dyn xen::Platform>,
    unmasks: Arc<AtomicUsize>,
}

#[derive(Debug)]
struct Counted {
    inner: Box<dyn EventChannel>,
    unmasks: Arc<AtomicUsize>,
}

impl xen::Platform for CountUnmasks {
    fn domid(&self) -> DomId {
        self.inner.domid()
    }
    fn grant_mapper(&self) -> &dyn GrantMapper {
        self.inner.grant_mapper()
    }
    fn grant_copier(&self) -> &dyn GrantCopier {
        self.inner.grant_copier()
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
        let unmasks = Arc::new(AtomicUsize::new(0));
        p.platform = Arc::new(CountUnmasks {
            inner: Arc::clone(&p.platform),
            unmasks: Arc::clone(&unmasks),
        });
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
