//! Grant mappings on their way out: unmapped only once the kernel has let go of them.
//!
//! The kernel posts an `O_DIRECT` request's completion before it releases the request's pages
//! (block/fops.c: `ki_complete`, then `bio_release_pages`), and gntdev on a PV dom0 unmaps a
//! page that is still referenced later, asynchronously, while munmap clears its PTE at once:
//! "BUG: Bad page map ... file:gntdev" in dom0 and, in the guest, "backed has not unmapped
//! grant" (issue 21). So a mapping that carried I/O is never dropped at its completion: the
//! last holder hands it here, and it is unmapped [`GrantMapper::unmap_grace`] later.
//!
//! "Last holder": a mapping is an `Arc` shared by the persistent cache and every request in
//! flight using it; whichever lets go last (a completion, a purge, a disconnect) retires it.
//! The queue is one thread, so the count it sees cannot change under it.
//!
//! [`GrantMapper::unmap_grace`]: xen::GrantMapper::unmap_grace

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use xen::GrantMapping;

/// Retired mappings a queue holds at most before it stops taking requests that need a new
/// mapping (each is a VMA: a frontend that never reuses its grants must not exhaust
/// `vm.max_map_count` within one grace period).
pub(super) const MAX_RETIRED: usize = 1024;

/// Mappings waiting out their grace period, oldest first.
#[derive(Debug)]
pub(super) struct Retired {
    grace: Duration,
    queue: VecDeque<(Instant, Arc<GrantMapping>)>,
}

impl Retired {
    pub(super) fn new(grace: Duration) -> Self {
        Self {
            grace,
            queue: VecDeque::new(),
        }
    }

    /// Lets go of `mapping`, whose I/O (if any) completed by `now`: kept for the grace period
    /// when this was the last reference, else simply dropped (its last holder retires it).
    fn retire(&mut self, mapping: Arc<GrantMapping>, now: Instant) {
        if Arc::strong_count(&mapping) == 1 {
            self.queue.push_back((now + self.grace, mapping));
        }
    }

    /// [`retire`](Self::retire) for each of `mappings`.
    pub(super) fn retire_all(
        &mut self,
        mappings: impl IntoIterator<Item = Arc<GrantMapping>>,
        now: Instant,
    ) {
        for m in mappings {
            self.retire(m, now);
        }
    }

    /// Unmaps every mapping whose grace period has ended by `now`.
    pub(super) fn release_due(&mut self, now: Instant) {
        let n = self.queue.iter().take_while(|(due, _)| *due <= now).count();
        self.queue.drain(..n);
    }

    /// Mappings still waiting.
    pub(super) fn len(&self) -> usize {
        self.queue.len()
    }

    /// Waits out the longest grace period still running, then unmaps everything (when the
    /// queue ends: every request has completed by then).
    pub(super) fn release_all(&mut self) {
        if let Some((due, _)) = self.queue.back() {
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
        }
        self.queue.clear();
    }
}
