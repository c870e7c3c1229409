//! [`MappedFile`]: a file mapped `MAP_SHARED`, viewed through [`SharedMem`].

use std::io;
use std::os::fd::BorrowedFd;
use std::ptr::NonNull;

use rustix::mm::{MapFlags, ProtFlags};

use crate::SharedMem;

/// A whole file mapped `MAP_SHARED`, read-write, so that every process that maps it sees the
/// same bytes (the simulation's tables and guest memory, the backend's in-flight log).
#[derive(Debug)]
pub struct MappedFile {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is owned by this value and only accessed through SharedMem, whose
// accesses are volatile or atomic.
unsafe impl Send for MappedFile {}
// SAFETY: &MappedFile only hands out SharedMem views.
unsafe impl Sync for MappedFile {}

impl MappedFile {
    /// Maps the first `len` bytes of `fd`.
    ///
    /// # Errors
    /// `InvalidInput` for a zero length; the kernel's error when the mapping fails. A file
    /// shorter than `len` maps, but touching the bytes beyond its end raises `SIGBUS`: size
    /// the file first.
    pub fn map(fd: BorrowedFd<'_>, len: usize) -> io::Result<Self> {
        if len == 0 {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        // SAFETY: a fresh mapping chosen by the kernel (null hint, no MAP_FIXED) cannot alias
        // any existing Rust object; the caller sized the file.
        let ptr = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                fd,
                0,
            )
        }?;
        let ptr =
            NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::from(io::ErrorKind::Other))?;
        Ok(Self { ptr, len })
    }

    /// The mapped bytes.
    pub fn mem(&self) -> SharedMem<'_> {
        // SAFETY: the mapping lives until self is dropped, which the view's lifetime forbids
        // while the view exists; no Rust reference to the bytes is ever created.
        unsafe { SharedMem::from_raw(self.ptr, self.len) }
    }
}

impl Drop for MappedFile {
    fn drop(&mut self) {
        // SAFETY: ptr/len is exactly the mapping made in `map`, unmapped once, and no view of
        // it outlives self. munmap of a whole mapping of ours cannot fail.
        let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}
