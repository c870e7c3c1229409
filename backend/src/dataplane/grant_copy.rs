//! Grant copy ([`GrantMode::Copy`](super::GrantMode::Copy), and every frontend without
//! persistent grants): a request's data passes through a bounce region registered with the
//! io_uring; grant copies move it, batched over all the requests of one pass.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ring::{IndirectPage, Op, Segments};
use xen::{CopyOp, GrantAddr, GrantMapping, GrantRef, GrantStatus};

use super::bounce::{BouncePool, Region};
use super::grant_access::{Frontend, GrantAccess, Reach};
use super::slot::{Slot, State};
use super::stats::Count;
use super::uring::{Data, Uring};

/// Grant copy through bounce regions.
#[derive(Debug)]
pub(super) struct GrantCopy {
    fe: Frontend,
    pool: BouncePool,
}

impl GrantCopy {
    pub(super) fn new(fe: Frontend, pool: BouncePool) -> Self {
        Self { fe, pool }
    }

    /// One batched copy; a failing batch (as opposed to failing segments) is logged here,
    /// at debug level: a guest can cause it.
    fn run(&self, ops: &mut [CopyOp<'_>]) -> bool {
        self.fe.meter.count(Count::CopyBatch(ops.len()));
        match self.fe.platform.grant_copier().copy(ops) {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(queue = %self.fe.name, segments = ops.len(), "grant copy batch failed: {e}");
                false
            }
        }
    }
}

impl GrantAccess for GrantCopy {
    fn fetch_indirect(
        &mut self,
        reqs: &[&[GrantRef]],
        pages: &mut [IndirectPage],
        ok: &mut Vec<bool>,
    ) {
        ok.clear();
        ok.resize(reqs.len(), false);
        let domid = self.fe.domid;
        let grefs = reqs.iter().flat_map(|r| r.iter());
        let mut ops: Vec<CopyOp<'_>> = pages
            .iter_mut()
            .zip(grefs)
            .map(|(page, &gref)| CopyOp::FromGuest {
                src: GrantAddr {
                    domid,
                    gref,
                    offset: 0,
                },
                dst: &mut page.as_bytes_mut()[..],
                status: GrantStatus::GeneralError,
            })
            .collect();
        let all: usize = reqs.iter().map(|r| r.len()).sum();
        if ops.len() != all || !self.run(&mut ops) {
            return;
        }
        let mut at = 0;
        for (r, grefs) in ok.iter_mut().zip(reqs) {
            *r = ops
                .get(at..at + grefs.len())
                .is_some_and(|o| o.iter().all(|op| op.status() == GrantStatus::Okay));
            at += grefs.len();
        }
    }

    fn reach(
        &mut self,
        _uring: &mut Uring,
        slot: usize,
        _segs: &Segments,
        len: usize,
        write: bool,
        alone: bool,
    ) -> Reach {
        match self.pool.take(slot, len) {
            Some(r) if r.capacity() < len => {
                // Validation bounds a request by the advertised segments, which size the
                // regions: this cannot happen, but must not lose a region.
                self.pool.give_back(r);
                Reach::Fail
            }
            Some(r) if write => Reach::CopyIn(r),
            Some(r) => Reach::Submit(Data::Bounce(r, len)),
            // No large region free: wait for one (counted like Linux's "out of requests").
            // With no other request busy (no large regions at all) this cannot succeed.
            None if alone => Reach::Fail,
            None => Reach::Wait,
        }
    }

    fn copy(&mut self, slots: &mut [Slot], batch: &[usize], failed: &mut Vec<bool>) {
        failed.clear();
        failed.resize(batch.len(), false);
        let domid = self.fe.domid;
        let pool = &self.pool;
        let mut ops: Vec<CopyOp<'_>> = Vec::new();
        let mut owner: Vec<usize> = Vec::new();
        let mut bi = 0;
        for (i, s) in slots.iter_mut().enumerate() {
            if batch.get(bi) != Some(&i) {
                continue;
            }
            let b = bi;
            bi += 1;
            let segs = match &s.req.op {
                Op::Read(t) | Op::Write { transfer: t, .. } => &t.segs,
                _ => {
                    failed[b] = true;
                    continue;
                }
            };
            let (region, len, from_guest) = match &mut s.state {
                State::CopyIn { region, len, .. } => (region, *len, true),
                State::CopyOut { region, len } => (region, *len, false),
                _ => {
                    failed[b] = true;
                    continue;
                }
            };
            let mut buf: &mut [u8] = pool.bytes(region, len);
            for seg in segs.as_slice() {
                let n = (seg.len_bytes() as usize).min(buf.len());
                let (chunk, rest) = std::mem::take(&mut buf).split_at_mut(n);
                buf = rest;
                let addr = GrantAddr {
                    domid,
                    gref: seg.gref,
                    offset: seg.offset_bytes() as u16,
                };
                ops.push(if from_guest {
                    CopyOp::FromGuest {
                        src: addr,
                        dst: chunk,
                        status: GrantStatus::GeneralError,
                    }
                } else {
                    CopyOp::ToGuest {
                        src: chunk,
                        dst: addr,
                        status: GrantStatus::GeneralError,
                    }
                });
                owner.push(b);
            }
        }
        if ops.is_empty() {
            return;
        }
        let all_failed = !self.run(&mut ops);
        for (op, &b) in ops.iter().zip(&owner) {
            if all_failed || op.status() != GrantStatus::Okay {
                failed[b] = true;
            }
        }
    }

    fn give_back(&mut self, region: Region) {
        self.pool.give_back(region);
    }

    fn completed(&mut self, _mappings: Vec<Arc<GrantMapping>>, _now: Instant) {}

    fn tick_interval(&self) -> Option<Duration> {
        None
    }

    fn tick(&mut self, _now: Instant) {}

    fn cached(&self) -> usize {
        0
    }

    fn close(&mut self) {}
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use ring::{Request, Sector, Segment, Transfer, OP_READ, OP_WRITE};
    use sim::SimDomain;
    use xen::Access;

    use super::*;
    use crate::dataplane::bounce::SMALL_REGION;
    use crate::dataplane::slot::Slots;
    use crate::dataplane::stats::{Meter, Stats};
    use crate::dataplane::tests::{sim_guest, TempDir, FRONT};

    /// A never-granted ref.
    const BAD_REF: GrantRef = 4000;

    fn whole_page(gref: GrantRef) -> Segment {
        Segment {
            gref,
            first_sect: 0,
            last_sect: 7,
        }
    }

    fn transfer(segs: &[Segment]) -> Transfer {
        Transfer {
            sector: Sector(0),
            nr_sectors: segs.iter().map(|s| u64::from(s.sectors())).sum(),
            segs: Segments::from_slice(segs).unwrap(),
        }
    }

    fn request(id: u64, write: bool, segs: &[Segment]) -> Request {
        let t = transfer(segs);
        let (operation, op) = if write {
            (
                OP_WRITE,
                Op::Write {
                    transfer: t,
                    flush: None,
                },
            )
        } else {
            (OP_READ, Op::Read(t))
        };
        Request { id, operation, op }
    }

    fn setup(dir: &TempDir, nr_large: usize) -> (SimDomain, GrantCopy, Arc<Stats>) {
        let (dom, platform) = sim_guest(&dir.0, 8);
        let stats = Arc::new(Stats::new());
        let pool = BouncePool::new(4, 16, nr_large).unwrap();
        let meter = Arc::clone(&stats) as Arc<dyn Meter>;
        let fe = Frontend {
            platform,
            domid: FRONT,
            meter,
            name: "t".into(),
        };
        let copy = GrantCopy::new(fe, pool);
        (dom, copy, stats)
    }

    fn uring() -> (std::fs::File, Uring) {
        let null = std::fs::File::open("/dev/null").unwrap();
        let u = Uring::new(4, 16, None, &[null.as_fd()], false, false).unwrap();
        (null, u)
    }

    #[test]
    fn reach_takes_the_slots_region_or_waits_for_a_large_one() {
        let dir = TempDir::new("gc-reach");
        let (_dom, mut copy, _) = setup(&dir, 0);
        let (_null, mut u) = uring();
        let segs = transfer(&[whole_page(1)]).segs;
        match copy.reach(&mut u, 0, &segs, 4096, true, true) {
            Reach::CopyIn(r) => assert_eq!(r.capacity(), SMALL_REGION),
            other => panic!("a write waits for its copy: {other:?}"),
        }
        assert!(matches!(
            copy.reach(&mut u, 1, &segs, 4096, false, true),
            Reach::Submit(Data::Bounce(_, 4096))
        ));
        assert!(
            matches!(copy.reach(&mut u, 0, &segs, 512, false, true), Reach::Fail),
            "slot 0's region is out: never handed out twice"
        );
        let big = SMALL_REGION + 4096;
        assert!(matches!(
            copy.reach(&mut u, 2, &segs, big, false, false),
            Reach::Wait
        ));
        assert!(
            matches!(copy.reach(&mut u, 2, &segs, big, false, true), Reach::Fail),
            "alone, a wait for a large region would never end"
        );
    }

    #[test]
    fn a_write_is_copied_in_and_a_read_copied_out_in_one_batch() {
        let dir = TempDir::new("gc-copy");
        let (dom, mut copy, stats) = setup(&dir, 0);
        let (a, b) = (
            dom.grant(0, 1, Access::ReadWrite).unwrap(),
            dom.grant(0, 2, Access::ReadWrite).unwrap(),
        );
        dom.page(1).unwrap().fill(0, 4096, 0x11).unwrap();
        let mut slots = Slots::new(4);
        let now = Instant::now();
        let w = slots
            .take(request(1, true, &[whole_page(a)]), now, None)
            .unwrap();
        let r = slots
            .take(request(2, false, &[whole_page(b)]), now, None)
            .unwrap();
        let mut out = copy.pool.small(r).unwrap();
        copy.pool.bytes(&mut out, 4096).fill(0x22);
        slots.get_mut(w).unwrap().state = State::CopyIn {
            region: copy.pool.small(w).unwrap(),
            len: 4096,
            offset: 0,
            fsync: false,
        };
        slots.get_mut(r).unwrap().state = State::CopyOut {
            region: out,
            len: 4096,
        };
        let mut failed = Vec::new();
        copy.copy(slots.as_mut_slice(), &[w, r], &mut failed);
        assert_eq!(failed, [false, false]);
        match &mut slots.get_mut(w).unwrap().state {
            State::CopyIn { region, .. } => {
                assert!(copy.pool.bytes(region, 4096).iter().all(|&x| x == 0x11));
            }
            other => panic!("{other:?}"),
        }
        let mut page = vec![0; 4096];
        dom.page(2).unwrap().read_into(0, &mut page).unwrap();
        assert!(
            page.iter().all(|&x| x == 0x22),
            "read data reached the guest"
        );
        let s = stats.snapshot();
        assert_eq!((s.copy_calls, s.copy_segs), (1, 2), "one call for both");
    }

    #[test]
    fn a_bad_grant_fails_its_own_request_only() {
        let dir = TempDir::new("gc-bad");
        let (dom, mut copy, _) = setup(&dir, 0);
        let good = dom.grant(0, 1, Access::ReadWrite).unwrap();
        let mut slots = Slots::new(4);
        let now = Instant::now();
        let mut batch = Vec::new();
        for (id, gref) in [(1, good), (2, BAD_REF), (3, good)] {
            let i = slots
                .take(request(id, true, &[whole_page(gref)]), now, None)
                .unwrap();
            slots.get_mut(i).unwrap().state = State::CopyIn {
                region: copy.pool.small(i).unwrap(),
                len: 4096,
                offset: 0,
                fsync: false,
            };
            batch.push(i);
        }
        batch.sort_unstable();
        let mut failed = Vec::new();
        copy.copy(slots.as_mut_slice(), &batch, &mut failed);
        let bad: Vec<u64> = batch
            .iter()
            .zip(&failed)
            .filter(|(_, &f)| f)
            .map(|(&i, _)| slots.get(i).unwrap().req.id)
            .collect();
        assert_eq!(bad, [2]);
    }

    #[test]
    fn indirect_pages_of_several_requests_are_copied_in_one_call() {
        let dir = TempDir::new("gc-ind");
        let (dom, mut copy, stats) = setup(&dir, 8);
        let g = dom.grant(0, 3, Access::ReadOnly).unwrap();
        dom.page(3).unwrap().write_from(8, b"indirect").unwrap();
        let mut pages = vec![
            IndirectPage::new(),
            IndirectPage::new(),
            IndirectPage::new(),
        ];
        let mut ok = Vec::new();
        copy.fetch_indirect(&[&[g], &[g, BAD_REF]], &mut pages, &mut ok);
        assert_eq!(ok, [true, false], "the bad page fails its own request only");
        assert_eq!(&pages[0].as_bytes_mut()[8..16], b"indirect");
        assert_eq!(&pages[1].as_bytes_mut()[8..16], b"indirect");
        assert_eq!(stats.snapshot().copy_calls, 1, "both requests in one call");
        copy.fetch_indirect(&[&[g], &[g, g, g]], &mut pages, &mut ok);
        assert_eq!(ok, [false, false], "no room: nothing read");
    }
}
