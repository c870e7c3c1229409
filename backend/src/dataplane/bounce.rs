//! Bounce buffers for copy mode: private memory registered with the io_uring, cut into
//! regions that a request owns while its data passes through.
//!
//! One region per ring slot for direct requests (11 pages) and a few large ones for indirect
//! requests (`max_indirect_segments` pages each). A request's data is packed contiguously in
//! its region, so one `READ_FIXED`/`WRITE_FIXED` moves it all. The pool hands out each region
//! once until it comes back, so a [`Region`] (not `Clone`) is exclusive use of its bytes.

use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use shmem::PAGE_SIZE;

/// Bytes of a direct request's bounce region: 11 pages.
pub(super) const SMALL_REGION: usize = ring::MAX_SEGMENTS_PER_REQUEST * PAGE_SIZE;

/// The pool's memory: an anonymous private mapping, unmapped when the last holder lets go
/// (the pool, and the io_uring it is registered with).
#[derive(Debug)]
pub(super) struct BounceMem {
    base: NonNull<u8>,
    len: usize,
    /// Tells this pool's regions from any other's.
    id: u64,
}

// SAFETY: plain private memory; its bytes are reached only through `BouncePool::bytes`
// (with `&mut Region`) or by the kernel for an SQE that owns the region.
unsafe impl Send for BounceMem {}
// SAFETY: as for Send: `&BounceMem` gives out no access to the bytes by itself.
unsafe impl Sync for BounceMem {}

impl BounceMem {
    fn map(len: usize) -> io::Result<Self> {
        static NEXT_ID: AtomicU64 = AtomicU64::new(0);
        // SAFETY: a fresh anonymous private mapping; no existing memory is affected.
        let ptr = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                len,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::PRIVATE,
            )
        }
        .map_err(io::Error::from)?;
        let base =
            NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned NULL"))?;
        Ok(Self {
            base,
            len,
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        })
    }

    /// The whole mapping, for registering it with the io_uring.
    pub(super) fn span(&self) -> (*mut u8, usize) {
        (self.base.as_ptr(), self.len)
    }

    /// Where the first `len` bytes of `r` lie, for an SQE; `None` when `r` is not one of this
    /// memory's regions or `len` exceeds it.
    pub(super) fn ptr(&self, r: &Region, len: usize) -> Option<*mut u8> {
        (r.pool == self.id && len <= r.cap).then(|| self.base.as_ptr().wrapping_add(r.offset))
    }

    /// The first `len` bytes of a region (at most its capacity): for grant copies, and
    /// for an NBD read's holes, which are zeroes. Holding
    /// `&mut Region` proves no I/O is in flight on it (a region in flight is owned by the
    /// io_uring's entry); another pool's region gets an empty slice.
    pub(super) fn bytes<'a>(&'a self, r: &'a mut Region, len: usize) -> &'a mut [u8] {
        if r.pool != self.id {
            return &mut [];
        }
        let len = len.min(r.cap);
        // SAFETY: offset..offset+cap lies inside the mapping (constructor arithmetic, and the
        // region is this pool's), which lives as long as self; regions never overlap, the pool
        // hands each out once until it is given back, and a Region is not Clone, so this is
        // the only live slice of these bytes; the kernel touches them only through an operation
        // in flight on them, and the caller's `&mut Region` is held where none is (copy mode:
        // the Region is out of the io_uring's Flight; NBD: a read's one receive into it has
        // completed, see `uring/nbd.rs`).
        unsafe { std::slice::from_raw_parts_mut(self.base.as_ptr().wrapping_add(r.offset), len) }
    }
}

impl Drop for BounceMem {
    fn drop(&mut self) {
        // SAFETY: base/len is exactly the mapping made in `map`, unmapped once here. This runs
        // when the last `Arc` goes: the pool's and the io_uring's, which drops its own only
        // after every operation completed (`Uring::drop` leaks it when it cannot wait).
        let _ = unsafe { rustix::mm::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

/// Exclusive use of one bounce region. Not `Clone`: whoever holds it may write the bytes.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Region {
    pool: u64,
    offset: usize,
    cap: usize,
    /// `Some(slot)`: the direct region of that slot; `None`: a large region.
    small: Option<usize>,
}

impl Region {
    /// Capacity in bytes.
    pub(super) fn capacity(&self) -> usize {
        self.cap
    }
}

/// The regions of one queue.
#[derive(Debug)]
pub(super) struct BouncePool {
    mem: Arc<BounceMem>,
    small: usize,
    /// Per slot: its direct region is out.
    small_out: Vec<bool>,
    large: usize,
    free_large: Vec<usize>,
}

impl BouncePool {
    /// `nr_small` direct regions and `nr_large` regions of `large_pages` pages.
    ///
    /// # Errors
    /// When the memory cannot be mapped.
    pub(super) fn new(nr_small: usize, large_pages: usize, nr_large: usize) -> io::Result<Self> {
        let small = SMALL_REGION;
        let large = large_pages * PAGE_SIZE;
        let len = (nr_small * small + nr_large * large).max(PAGE_SIZE);
        let large_base = nr_small * small;
        Ok(Self {
            mem: Arc::new(BounceMem::map(len)?),
            small,
            small_out: vec![false; nr_small],
            large,
            free_large: (0..nr_large)
                .rev()
                .map(|i| large_base + i * large)
                .collect(),
        })
    }

    /// The memory, to register with the io_uring.
    pub(super) fn mem(&self) -> &Arc<BounceMem> {
        &self.mem
    }

    /// The direct region of slot `slot`, unless it is already out.
    pub(super) fn small(&mut self, slot: usize) -> Option<Region> {
        let out = self.small_out.get_mut(slot)?;
        if *out {
            return None;
        }
        *out = true;
        Some(Region {
            pool: self.mem.id,
            offset: slot * self.small,
            cap: self.small,
            small: Some(slot),
        })
    }

    /// A large region, if one is free.
    pub(super) fn take_large(&mut self) -> Option<Region> {
        self.free_large.pop().map(|offset| Region {
            pool: self.mem.id,
            offset,
            cap: self.large,
            small: None,
        })
    }

    /// A region for `len` bytes of slot `slot`: its direct region when that is enough, else a
    /// large one if one is free.
    pub(super) fn take(&mut self, slot: usize, len: usize) -> Option<Region> {
        if len <= self.small {
            self.small(slot)
        } else {
            self.take_large()
        }
    }

    /// Takes a region back (another pool's region is ignored).
    pub(super) fn give_back(&mut self, r: Region) {
        if r.pool != self.mem.id {
            return;
        }
        match r.small {
            Some(slot) => {
                if let Some(out) = self.small_out.get_mut(slot) {
                    *out = false;
                }
            }
            None => self.free_large.push(r.offset),
        }
    }

    /// The first `len` bytes of a region (at most its capacity), for grant copies
    /// ([`BounceMem::bytes`]).
    pub(super) fn bytes<'a>(&'a self, r: &'a mut Region, len: usize) -> &'a mut [u8] {
        self.mem.bytes(r, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_direct_region_is_handed_out_once_until_given_back() {
        let mut pool = BouncePool::new(2, 0, 0).unwrap();
        let a = pool.small(0).unwrap();
        assert!(pool.small(0).is_none(), "slot 0's region is already out");
        let b = pool.small(1).unwrap();
        assert_ne!(a, b);
        assert!(pool.small(2).is_none(), "no such slot");
        pool.give_back(a);
        assert!(pool.small(0).is_some());
    }

    #[test]
    fn large_regions_run_out_and_come_back() {
        let mut pool = BouncePool::new(1, 4, 2).unwrap();
        let a = pool.take(0, SMALL_REGION + 1).unwrap();
        let b = pool.take(0, SMALL_REGION + 1).unwrap();
        assert_eq!(a.capacity(), 4 * PAGE_SIZE);
        assert!(pool.take(0, SMALL_REGION + 1).is_none());
        pool.give_back(b);
        assert!(pool.take_large().is_some());
        pool.give_back(a);
        assert!(pool.take_large().is_some());
    }

    #[test]
    fn regions_do_not_overlap_and_other_pools_regions_are_refused() {
        let mut pool = BouncePool::new(2, 4, 1).unwrap();
        let mut other = BouncePool::new(2, 0, 0).unwrap();
        let mut a = pool.small(0).unwrap();
        let mut b = pool.small(1).unwrap();
        let mut l = pool.take_large().unwrap();
        pool.bytes(&mut a, SMALL_REGION).fill(1);
        pool.bytes(&mut b, SMALL_REGION).fill(2);
        pool.bytes(&mut l, 4 * PAGE_SIZE).fill(3);
        assert!(pool.bytes(&mut a, usize::MAX).iter().all(|&x| x == 1));
        assert_eq!(pool.bytes(&mut a, usize::MAX).len(), SMALL_REGION);
        assert!(pool.bytes(&mut b, SMALL_REGION).iter().all(|&x| x == 2));
        let mut foreign = other.small(0).unwrap();
        assert!(pool.bytes(&mut foreign, 10).is_empty());
        assert!(pool.mem().ptr(&foreign, 10).is_none());
        assert!(pool.mem().ptr(&a, SMALL_REGION + 1).is_none());
        pool.give_back(foreign);
        assert!(
            other.small(0).is_none(),
            "given to the wrong pool: still out"
        );
    }
}
