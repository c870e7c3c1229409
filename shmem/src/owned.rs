//! [`OwnedMem`]: page-aligned private memory that is accessed like shared memory.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;

use crate::{SharedMem, PAGE_SIZE};

/// Zeroed, page-aligned memory owned by this process, viewed through [`SharedMem`].
///
/// It stands in for shared pages where the other side is a thread of this process: the
/// frontend's pages in tests, a ring backed by a `Vec`-like buffer, bounce buffers.
#[derive(Debug)]
pub struct OwnedMem {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: OwnedMem owns its allocation outright; it is only accessed through SharedMem,
// whose accesses are volatile or atomic.
unsafe impl Send for OwnedMem {}
// SAFETY: &OwnedMem only hands out SharedMem views, which are Sync.
unsafe impl Sync for OwnedMem {}

impl OwnedMem {
    /// Allocates `pages` zeroed pages. Returns `None` for zero pages or when allocation fails.
    pub fn new(pages: usize) -> Option<Self> {
        let size = pages.checked_mul(PAGE_SIZE)?;
        if size == 0 {
            return None;
        }
        let layout = Layout::from_size_align(size, PAGE_SIZE).ok()?;
        // SAFETY: layout has non-zero size.
        let ptr = NonNull::new(unsafe { alloc_zeroed(layout) })?;
        Some(Self { ptr, layout })
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.layout.size()
    }

    /// Always false: an `OwnedMem` has at least one page.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The memory as a [`SharedMem`] view that borrows `self`.
    pub fn mem(&self) -> SharedMem<'_> {
        // SAFETY: the allocation lives as long as self, which the returned view borrows; no
        // Rust reference to its bytes is ever created (all access goes through SharedMem).
        unsafe { SharedMem::from_raw(self.ptr, self.layout.size()) }
    }
}

impl Drop for OwnedMem {
    fn drop(&mut self) {
        // SAFETY: ptr was allocated by alloc_zeroed with this layout and is freed once.
        unsafe { dealloc(self.ptr.as_ptr(), self.layout) };
    }
}
