//! Grant copy ([`GrantMode::Copy`](super::GrantMode::Copy), and every frontend without
//! persistent grants): a request's data passes through a bounce region registered with the
//! io_uring; grant copies move it, batched over all the requests of one pass.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ring::{IndirectPage, Op, Segments};
use xen::{CopyOp, DomId, GrantAddr, GrantMapping, GrantRef, GrantStatus, Platform};

use super::bounce::{BouncePool, Region};
use super::grant_access::{GrantAccess, Reach};
use super::slot::{Slot, State};
use super::stats::{Count, Meter};
use super::uring::{Data, Uring};

/// Grant copy through bounce regions.
pub(super) struct GrantCopy {
    platform: Arc<dyn Platform>,
    frontend: DomId,
    pool: BouncePool,
    meter: Arc<dyn Meter>,
    name: String,
}

impl std::fmt::Debug for GrantCopy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrantCopy")
            .field("frontend", &self.frontend)
            .field("pool", &self.pool)
            .finish_non_exhaustive()
    }
}

impl GrantCopy {
    pub(super) fn new(
        platform: Arc<dyn Platform>,
        frontend: DomId,
        pool: BouncePool,
        meter: Arc<dyn Meter>,
        name: String,
    ) -> Self {
        Self {
            platform,
            frontend,
            pool,
            meter,
            name,
        }
    }

    /// One batched copy; a failing batch (as opposed to failing segments) is logged here,
    /// at debug level: a guest can cause it.
    fn run(&self, ops: &mut [CopyOp<'_>]) -> bool {
        self.meter.count(Count::CopyBatch(ops.len()));
        match self.platform.grant_copier().copy(ops) {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(queue = %self.name, segments = ops.len(), "grant copy batch failed: {e}");
                false
            }
        }
    }
}

impl GrantAccess for GrantCopy {
    fn fetch_indirect(
        &mut self,
        grefs: &[GrantRef],
        pages: &mut [IndirectPage],
    ) -> Result<(), GrantStatus> {
        let domid = self.frontend;
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
        if ops.len() != grefs.len() || !self.run(&mut ops) {
            return Err(GrantStatus::GeneralError);
        }
        match ops
            .iter()
            .map(CopyOp::status)
            .find(|s| *s != GrantStatus::Okay)
        {
            Some(bad) => Err(bad),
            None => Ok(()),
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
        let domid = self.frontend;
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
