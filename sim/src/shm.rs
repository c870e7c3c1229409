//! The simulation's memory mappings: its shared files mapped whole (`shmem::MappedFile`), and
//! grant mappings placed page by page into a reserved range.

use std::io;
use std::os::fd::BorrowedFd;
use std::ptr::NonNull;

use rustix::mm::{MapFlags, ProtFlags};
use shmem::PAGE_SIZE;

pub(crate) use shmem::MappedFile;

/// A contiguous range of address space reserved (`PROT_NONE`) for a batch of grant mappings;
/// each page is then replaced by a `MAP_FIXED` mapping of the granting domain's memory file.
/// Dropping it unmaps the whole range, unless it was handed over with [`Reservation::into_raw`].
#[derive(Debug)]
pub(crate) struct Reservation {
    ptr: NonNull<u8>,
    pages: usize,
}

impl Reservation {
    /// Reserves `pages` pages of address space.
    pub(crate) fn new(pages: usize) -> io::Result<Self> {
        let len = pages
            .checked_mul(PAGE_SIZE)
            .filter(|&l| l > 0)
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: a fresh anonymous PROT_NONE mapping chosen by the kernel aliases nothing.
        let ptr = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                len,
                ProtFlags::empty(),
                MapFlags::PRIVATE | MapFlags::NORESERVE,
            )
        }?;
        let ptr =
            NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::from(io::ErrorKind::Other))?;
        Ok(Self { ptr, pages })
    }

    /// Maps page `file_page` of `fd` over page `index` of the reservation, writable or not.
    pub(crate) fn map_page(
        &self,
        index: usize,
        fd: BorrowedFd<'_>,
        file_page: u64,
        writable: bool,
    ) -> io::Result<()> {
        if index >= self.pages {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        let prot = if writable {
            ProtFlags::READ | ProtFlags::WRITE
        } else {
            ProtFlags::READ
        };
        let offset = file_page
            .checked_mul(PAGE_SIZE as u64)
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        let target = self.ptr.as_ptr().wrapping_add(index * PAGE_SIZE);
        // SAFETY: the target page lies inside our own reservation (index < pages was checked),
        // which no Rust object references, so MAP_FIXED replaces nothing but reserved space.
        unsafe {
            rustix::mm::mmap(
                target.cast(),
                PAGE_SIZE,
                prot,
                MapFlags::SHARED | MapFlags::FIXED,
                fd,
                offset,
            )
        }?;
        Ok(())
    }

    /// Hands the range over to a [`xen::GrantMapping`]; release it with [`unmap_raw`].
    pub(crate) fn into_raw(self) -> (NonNull<u8>, usize) {
        let this = std::mem::ManuallyDrop::new(self);
        (this.ptr, this.pages)
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        // SAFETY: the range is ours (reserved in `new`, never handed over since into_raw skips
        // this drop) and nothing references it.
        unsafe { unmap_raw(self.ptr, self.pages) };
    }
}

/// Unmaps a range that came from [`Reservation::into_raw`].
///
/// # Safety
/// `ptr`/`pages` must be exactly a range returned by `into_raw`, not yet unmapped, and no view
/// of it may be used afterwards.
pub(crate) unsafe fn unmap_raw(ptr: NonNull<u8>, pages: usize) {
    // SAFETY: guaranteed by the caller.
    if let Err(e) = unsafe { rustix::mm::munmap(ptr.as_ptr().cast(), pages * PAGE_SIZE) } {
        tracing::error!("sim: munmap of a grant mapping failed: {e}");
    }
}
