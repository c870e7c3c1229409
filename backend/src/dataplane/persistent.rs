//! Persistent grants (`feature-persistent`): pages the frontend keeps granted for the whole
//! connection, mapped once and reused, so a request costs no map/unmap.
//!
//! Linux's rules (drivers/block/xen-blkback/blkback.c): at most `max_persistent_grants` per
//! ring (module parameter, default 1056); grants beyond the cap are mapped for one request
//! only; every 100 ms (`LRU_INTERVAL`) grants unused for longer than the timeout (60 s,
//! `persistent_grant_unused_seconds`) are unmapped, and when the cache is full a further 5 %
//! (`LRU_PERCENT_CLEAN`) of the least recently used are purged to make room.
//!
//! Ownership instead of Linux's flags: each mapping is an `Arc`, and a request in flight holds
//! a clone (inside the io_uring's owned entry) until its completion. Purging only hands the
//! cache's clone to [`Retired`], so a mapping is unmapped after the last user is done and the
//! kernel has let go of it, never under the kernel (XSA-365/371: a map error or a purge
//! cannot leak or free a grant still in use; issue 21: nor can a completion). A
//! frontend reusing a page in two requests at once shares the mapping (Linux would map the
//! second use separately); its data is then as racy as it made it, our memory is not.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use xen::{Access, DomId, GrantError, GrantMapper, GrantMapping, GrantRef};

use super::retire::Retired;
use super::stats::{Count, Meter};

/// Linux's `xen_blkif_max_pgrants` default.
pub const DEFAULT_MAX_PERSISTENT_GRANTS: usize = 1056;
/// Linux's `xen_blkif_pgrant_timeout` default.
pub const DEFAULT_PERSISTENT_GRANT_TIMEOUT: Duration = Duration::from_secs(60);
/// Linux's `LRU_INTERVAL`.
pub(super) const LRU_INTERVAL: Duration = Duration::from_millis(100);
/// Linux's `LRU_PERCENT_CLEAN`.
const LRU_PERCENT_CLEAN: usize = 5;

#[derive(Debug)]
struct Entry {
    mapping: Arc<GrantMapping>,
    last_used: Instant,
    /// Mapped writable (else read-only: an indirect page the frontend granted read-only).
    writable: bool,
}

/// The persistent grants of one queue.
#[derive(Debug)]
pub(super) struct PersistentGrants {
    frontend: DomId,
    max: usize,
    timeout: Duration,
    map: HashMap<GrantRef, Entry>,
    next_purge: Instant,
    /// A grant was wanted while the cache was full since the last purge (Linux's
    /// `overflow_max_grants`): only then does a full cache give up its least recently used.
    overflowed: bool,
    meter: Arc<dyn Meter>,
}

impl PersistentGrants {
    pub(super) fn new(
        frontend: DomId,
        max: usize,
        timeout: Duration,
        meter: Arc<dyn Meter>,
    ) -> Self {
        Self {
            frontend,
            max,
            timeout,
            map: HashMap::with_capacity(max.min(4096)),
            next_purge: Instant::now() + LRU_INTERVAL,
            overflowed: false,
            meter,
        }
    }

    /// Number of grants mapped.
    pub(super) fn len(&self) -> usize {
        self.map.len()
    }

    /// The writable mapping of `gref` (for data pages): the cached one, or a fresh one that
    /// is cached while there is room. `None` when the cache is full and `gref` is not in it,
    /// or when it is cached read-only (the caller maps it for this request only).
    ///
    /// # Errors
    /// The mapper's error; nothing is cached then.
    pub(super) fn get(
        &mut self,
        mapper: &dyn GrantMapper,
        gref: GrantRef,
        now: Instant,
    ) -> Result<Option<Arc<GrantMapping>>, GrantError> {
        self.lookup_or_map(mapper, gref, now, false)
    }

    /// A mapping of `gref` to read from (for indirect pages, which Linux's blkback also maps
    /// through the persistent cache, and the pages of writes): as [`get`](Self::get), but a
    /// grant the frontend made read-only is mapped and cached read-only rather than failing.
    ///
    /// # Errors
    /// The mapper's error for the read-only map; nothing is cached then.
    pub(super) fn get_readable(
        &mut self,
        mapper: &dyn GrantMapper,
        gref: GrantRef,
        now: Instant,
    ) -> Result<Option<Arc<GrantMapping>>, GrantError> {
        self.lookup_or_map(mapper, gref, now, true)
    }

    fn lookup_or_map(
        &mut self,
        mapper: &dyn GrantMapper,
        gref: GrantRef,
        now: Instant,
        read_only_ok: bool,
    ) -> Result<Option<Arc<GrantMapping>>, GrantError> {
        if let Some(e) = self.map.get_mut(&gref) {
            if !(e.writable || read_only_ok) {
                return Ok(None);
            }
            e.last_used = now;
            self.meter.count(Count::PgrantHit);
            return Ok(Some(Arc::clone(&e.mapping)));
        }
        if self.map.len() >= self.max {
            self.overflowed = true;
            return Ok(None);
        }
        // Persistent grants are mapped writable, as Linux does: the same page serves reads
        // and writes over its lifetime.
        let (mapping, writable) = match map_counted(
            &*self.meter,
            mapper,
            self.frontend,
            &[gref],
            Access::ReadWrite,
        ) {
            Ok(m) => (m, true),
            Err(_) if read_only_ok => (
                map_counted(
                    &*self.meter,
                    mapper,
                    self.frontend,
                    &[gref],
                    Access::ReadOnly,
                )?,
                false,
            ),
            Err(e) => return Err(e),
        };
        let mapping = Arc::new(mapping);
        self.map.insert(
            gref,
            Entry {
                mapping: Arc::clone(&mapping),
                last_used: now,
                writable,
            },
        );
        Ok(Some(mapping))
    }

    /// Linux's `purge_persistent_gnt`, run at most every [`LRU_INTERVAL`]: drops grants idle
    /// past the timeout and, when the cache is full and a grant found no room in it since the
    /// last purge, the least recently used 5 % besides. A cache that is merely full (the
    /// frontend's whole grant pool fits, the usual steady state) is left alone: purging it
    /// would unmap grants the frontend is about to reuse, only to map them again.
    /// What is dropped goes to `retired`. Returns how many were dropped from the cache.
    pub(super) fn purge(&mut self, now: Instant, retired: &mut Retired) -> usize {
        if now < self.next_purge {
            return 0;
        }
        self.next_purge = now + LRU_INTERVAL;
        let timeout = self.timeout;
        let idle = |e: &Entry| now.saturating_duration_since(e.last_used) >= timeout;
        let mut gone: Vec<GrantRef> = self
            .map
            .iter()
            .filter(|(_, e)| idle(e))
            .map(|(g, _)| *g)
            .collect();
        let overflowed = std::mem::take(&mut self.overflowed);
        let left = self.map.len() - gone.len();
        if left >= self.max && self.max > 0 && overflowed {
            let n = (self.max * LRU_PERCENT_CLEAN / 100).max(1);
            let mut by_age: Vec<(Instant, GrantRef)> = self
                .map
                .iter()
                .filter(|(_, e)| !idle(e))
                .map(|(g, e)| (e.last_used, *g))
                .collect();
            by_age.sort_unstable();
            gone.extend(by_age.into_iter().take(n).map(|(_, g)| g));
        }
        let dropped = gone.len();
        let mappings = gone.iter().filter_map(|g| self.map.remove(g));
        retired.retire_all(mappings.map(|e| e.mapping), now);
        self.meter.count(Count::PgrantPurged(dropped));
        dropped
    }

    /// Hands every cached mapping to `retired` (on disconnect); mappings still used by
    /// requests in flight are retired when those complete.
    pub(super) fn clear(&mut self, retired: &mut Retired) {
        let now = Instant::now();
        retired.retire_all(self.map.drain().map(|(_, e)| e.mapping), now);
    }
}

/// `mapper.map`, counted by `meter`.
pub(super) fn map_counted(
    meter: &dyn Meter,
    mapper: &dyn GrantMapper,
    domid: DomId,
    refs: &[GrantRef],
    access: Access,
) -> Result<GrantMapping, GrantError> {
    let r = mapper.map(domid, refs, access);
    meter.count(Count::Map {
        pages: refs.len(),
        ok: r.is_ok(),
    });
    r
}
