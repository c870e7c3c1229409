//! Grant map ([`GrantMode::Map`](super::GrantMode::Map), for frontends with persistent
//! grants): I/O goes straight to and from the guest's pages, mapped through the persistent
//! cache (or for one request when it is full); a mapping that carried I/O is unmapped only
//! after its grace (see `retire`, issue 21).

use std::sync::Arc;
use std::time::{Duration, Instant};

use ring::{IndirectPage, Segments};
use shmem::PAGE_SIZE;
use xen::{Access, GrantError, GrantMapping, GrantRef, GrantStatus};

use super::bounce::Region;
use super::grant_access::{Frontend, GrantAccess, Reach};
use super::persistent::{map_counted, PersistentGrants, LRU_INTERVAL};
use super::retire::{Retired, MAX_RETIRED};
use super::slot::Slot;
use super::uring::{Data, Uring};

/// Why a request's pages could not be mapped (a guest can cause each: logged at debug level).
#[derive(Debug, thiserror::Error)]
enum MapError {
    /// The map call failed.
    #[error("{0}")]
    Grant(#[from] GrantError),
    /// A segment lies outside its mapping, or the device would write into a read-only one.
    #[error("segment: {0}")]
    Segment(rustix::io::Errno),
}

/// Grant map through the persistent cache.
#[derive(Debug)]
pub(super) struct GrantMap {
    fe: Frontend,
    pgrants: PersistentGrants,
    /// Mappings whose I/O completed, waiting for the kernel to let go.
    retired: Retired,
    // Scratch, reused by every request (cleared before it returns, so that it keeps no
    // mapping alive past the request's own guards).
    seg_maps: Vec<Option<Arc<GrantMapping>>>,
    np_grefs: Vec<GrantRef>,
}

impl GrantMap {
    pub(super) fn new(fe: Frontend, pgrants: PersistentGrants, unmap_grace: Duration) -> Self {
        Self {
            fe,
            pgrants,
            retired: Retired::new(unmap_grace),
            seg_maps: Vec::with_capacity(ring::MAX_INDIRECT_SEGMENTS),
            np_grefs: Vec::with_capacity(ring::MAX_INDIRECT_SEGMENTS),
        }
    }

    /// Looks up or maps each of `grefs` (readable for a write's or an indirect page, else
    /// writable) into `seg_maps`, and the rest in one map call for this use only; returns that
    /// one-use mapping.
    fn lookup(
        &mut self,
        grefs: impl Iterator<Item = GrantRef>,
        write: bool,
    ) -> Result<Option<Arc<GrantMapping>>, GrantError> {
        let now = Instant::now();
        let mapper = self.fe.platform.grant_mapper();
        self.seg_maps.clear();
        self.np_grefs.clear();
        for gref in grefs {
            // A write only reads its pages: a grant the frontend made read-only serves it.
            let cached = if write {
                self.pgrants.get_readable(mapper, gref, now)?
            } else {
                self.pgrants.get(mapper, gref, now)?
            };
            if cached.is_none() {
                self.np_grefs.push(gref);
            }
            self.seg_maps.push(cached);
        }
        if self.np_grefs.is_empty() {
            return Ok(None);
        }
        // Linux maps a write's pages read-only: the device only reads them.
        let access = if write {
            Access::ReadOnly
        } else {
            Access::ReadWrite
        };
        let m = map_counted(
            &*self.fe.meter,
            mapper,
            self.fe.domid,
            &self.np_grefs,
            access,
        )?;
        Ok(Some(Arc::new(m)))
    }

    /// The mapping and byte offset of the `i`-th looked-up page, `k` counting the pages of the
    /// one-use mapping handed out so far.
    fn page<'a>(
        &'a self,
        i: usize,
        once: &'a Option<Arc<GrantMapping>>,
        k: &mut usize,
    ) -> Option<(&'a Arc<GrantMapping>, usize)> {
        match (self.seg_maps.get(i)?, once) {
            (Some(m), _) => Some((m, 0)),
            (None, Some(m)) => {
                *k += 1;
                Some((m, (*k - 1) * PAGE_SIZE))
            }
            (None, None) => None,
        }
    }

    fn map_segments(
        &mut self,
        uring: &mut Uring,
        slot: usize,
        segs: &Segments,
        write: bool,
    ) -> Result<(), MapError> {
        let grefs = segs.as_slice().iter().map(|s| s.gref);
        let once = self.lookup(grefs, write)?;
        let mut k = 0;
        for (i, seg) in segs.as_slice().iter().enumerate() {
            let (m, base) = self
                .page(i, &once, &mut k)
                .ok_or(GrantError::Invalid("segment without a mapping"))?;
            let (offset, len) = (seg.offset_bytes() as usize, seg.len_bytes() as usize);
            uring
                .map_segment(slot, m, base + offset, len, write)
                .map_err(MapError::Segment)?;
        }
        Ok(())
    }

    /// Reads one request's indirect pages `grefs` once into `pages`.
    fn fetch_one(
        &mut self,
        grefs: &[GrantRef],
        pages: &mut [IndirectPage],
    ) -> Result<(), GrantStatus> {
        let status = |e: GrantError| match e {
            GrantError::Status(s) => s,
            _ => GrantStatus::GeneralError,
        };
        // As Linux (xen_blkbk_parse_indirect): indirect pages come from the persistent cache;
        // the rest are mapped read-only for this request only. Either way each page is read
        // once, into private memory.
        let r = (|| {
            let once = self.lookup(grefs.iter().copied(), true).map_err(status)?;
            let mut k = 0;
            for (i, page) in pages.iter_mut().take(grefs.len()).enumerate() {
                let (m, offset) = self
                    .page(i, &once, &mut k)
                    .ok_or(GrantStatus::GeneralError)?;
                m.mem()
                    .read_into(offset, &mut page.as_bytes_mut()[..])
                    .map_err(|_| GrantStatus::GeneralError)?;
            }
            Ok(())
        })();
        self.seg_maps.clear();
        r
    }
}

impl GrantAccess for GrantMap {
    fn fetch_indirect(
        &mut self,
        reqs: &[&[GrantRef]],
        pages: &mut [IndirectPage],
        ok: &mut Vec<bool>,
    ) {
        ok.clear();
        let mut at = 0;
        for grefs in reqs {
            let r = pages
                .get_mut(at..at + grefs.len())
                .map(|p| self.fetch_one(grefs, p));
            if let Some(Err(status)) = r {
                tracing::debug!(queue = %self.fe.name, "indirect pages unreachable: {status:?}");
            }
            ok.push(matches!(r, Some(Ok(()))));
            at += grefs.len();
        }
    }

    fn reach(
        &mut self,
        uring: &mut Uring,
        slot: usize,
        segs: &Segments,
        _len: usize,
        write: bool,
        _alone: bool,
    ) -> Reach {
        if self.retired.len() >= MAX_RETIRED {
            // Too many mappings waiting out their grace: wait for the next tick to release
            // some (counted like Linux's "out of requests").
            return Reach::Wait;
        }
        let r = self.map_segments(uring, slot, segs, write);
        self.seg_maps.clear();
        match r {
            Ok(()) => Reach::Submit(Data::Mapped),
            Err(e) => {
                tracing::debug!(queue = %self.fe.name, "mapping the request's grants failed: {e}");
                // The guards drop here, unmapping what was mapped for this request (no I/O).
                uring.reset_slot(slot);
                Reach::Fail
            }
        }
    }

    fn copy(&mut self, _slots: &mut [Slot], batch: &[usize], failed: &mut Vec<bool>) {
        // No request waits for a copy in map mode.
        failed.clear();
        failed.resize(batch.len(), true);
    }

    fn give_back(&mut self, _region: Region) {}

    fn completed(&mut self, mappings: Vec<Arc<GrantMapping>>, now: Instant) {
        if !mappings.is_empty() {
            self.retired.retire_all(mappings, now);
        }
    }

    fn tick_interval(&self) -> Option<Duration> {
        Some(LRU_INTERVAL)
    }

    fn tick(&mut self, now: Instant) {
        self.retired.release_due(now);
        self.pgrants.purge(now, &mut self.retired);
    }

    fn cached(&self) -> usize {
        self.pgrants.len()
    }

    fn close(&mut self) {
        self.pgrants.clear(&mut self.retired);
        self.retired.release_all();
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use ring::Segment;
    use sim::SimDomain;

    use super::*;
    use crate::dataplane::persistent::DEFAULT_PERSISTENT_GRANT_TIMEOUT;
    use crate::dataplane::stats::{Meter, Stats};
    use crate::dataplane::tests::{sim_guest, TempDir, FRONT};

    const GRACE: Duration = Duration::from_millis(20);

    fn setup(dir: &TempDir) -> (SimDomain, GrantMap, Arc<Stats>) {
        let (dom, platform) = sim_guest(&dir.0, 8);
        let stats = Arc::new(Stats::new());
        let meter = Arc::clone(&stats) as Arc<dyn Meter>;
        let pg = PersistentGrants::new(
            FRONT,
            16,
            DEFAULT_PERSISTENT_GRANT_TIMEOUT,
            Arc::clone(&meter),
        );
        let fe = Frontend {
            platform,
            domid: FRONT,
            meter,
            name: "t".into(),
        };
        let map = GrantMap::new(fe, pg, GRACE);
        (dom, map, stats)
    }

    fn segs(gref: GrantRef) -> Segments {
        let s = Segment {
            gref,
            first_sect: 0,
            last_sect: 7,
        };
        Segments::from_slice(&[s]).unwrap()
    }

    #[test]
    fn reads_need_a_writable_grant_and_writes_take_a_read_only_one() {
        let dir = TempDir::new("gm-ro");
        let (dom, mut map, _) = setup(&dir);
        let ro = dom.grant(0, 1, Access::ReadOnly).unwrap();
        let null = std::fs::File::open("/dev/null").unwrap();
        let mut u = Uring::new(2, 16, None, &[null.as_fd()], false, false).unwrap();
        assert!(
            matches!(
                map.reach(&mut u, 0, &segs(ro), 4096, false, true),
                Reach::Fail
            ),
            "the device must not write into a read-only grant"
        );
        assert!(matches!(
            map.reach(&mut u, 1, &segs(ro), 4096, true, true),
            Reach::Submit(Data::Mapped)
        ));
        assert_eq!(
            map.cached(),
            1,
            "cached read-only, for writes and indirect pages"
        );
        // Slot 0 kept nothing: mapping it again works (its iovecs were reset).
        let rw = dom.grant(0, 2, Access::ReadWrite).unwrap();
        assert!(matches!(
            map.reach(&mut u, 0, &segs(rw), 4096, false, true),
            Reach::Submit(Data::Mapped)
        ));
    }

    #[test]
    fn completed_mappings_are_unmapped_only_after_their_grace() {
        let dir = TempDir::new("gm-grace");
        let (dom, mut map, _) = setup(&dir);
        let g = dom.grant(0, 1, Access::ReadWrite).unwrap();
        let m = map
            .fe
            .platform
            .grant_mapper()
            .map(FRONT, &[g], Access::ReadWrite)
            .unwrap();
        let done = Instant::now();
        map.completed(vec![Arc::new(m)], done);
        map.tick(done);
        assert!(dom.grant_in_use(g), "still mapped within the grace");
        map.tick(done + GRACE);
        assert!(!dom.grant_in_use(g), "unmapped once the grace is over");
    }

    #[test]
    fn indirect_pages_come_through_the_persistent_cache() {
        let dir = TempDir::new("gm-ind");
        let (dom, mut map, stats) = setup(&dir);
        let g = dom.grant(0, 3, Access::ReadOnly).unwrap();
        dom.page(3).unwrap().write_from(16, b"segments").unwrap();
        let mut pages = [IndirectPage::new(), IndirectPage::new()];
        let mut ok = Vec::new();
        map.fetch_indirect(&[&[g]], &mut pages, &mut ok);
        assert_eq!(ok, [true]);
        assert_eq!(&pages[0].as_bytes_mut()[16..24], b"segments");
        map.fetch_indirect(&[&[4000], &[g]], &mut pages, &mut ok);
        assert_eq!(ok, [false, true], "the bad page fails its own request only");
        assert_eq!(&pages[1].as_bytes_mut()[16..24], b"segments");
        assert_eq!(stats.snapshot().pgrant_hits, 1);
        map.close();
        assert!(!dom.grant_in_use(g), "closing releases the cache");
    }

    #[test]
    fn nothing_waits_for_a_copy_in_map_mode() {
        let dir = TempDir::new("gm-copy");
        let (_dom, mut map, _) = setup(&dir);
        let mut failed = Vec::new();
        map.copy(&mut [], &[0, 1], &mut failed);
        assert_eq!(failed, [true, true]);
    }
}
