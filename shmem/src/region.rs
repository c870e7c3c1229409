//! [`SharedMem`]: a borrowed view of shared memory, accessed only through volatile and atomic
//! operations, and `memcpy` for bulk data written into it (never for what is read and then
//! validated).

use std::marker::PhantomData;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};

/// The size of a Xen page, the unit of grants and rings.
pub const PAGE_SIZE: usize = 4096;

/// Writes longer than this are bulk data, copied with `memcpy` by [`SharedMem::write_from`];
/// the records of the protocol (a request or response slot, at most 112 bytes) are shorter.
const BULK_WRITE: usize = 256;

/// An access fell outside a [`SharedMem`] region, or was misaligned for an atomic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("shared memory access at offset {offset} length {len} outside region of {size} bytes or misaligned")]
pub struct OutOfBounds {
    /// Offset of the refused access.
    pub offset: usize,
    /// Length of the refused access.
    pub len: usize,
    /// Size of the region.
    pub size: usize,
}

/// A view of memory that another party may read and write concurrently.
///
/// The lifetime ties the view to whatever keeps the memory mapped (an [`crate::OwnedMem`], a
/// grant mapping): the view cannot outlive it.
#[derive(Clone, Copy)]
pub struct SharedMem<'a> {
    ptr: NonNull<u8>,
    len: usize,
    _owner: PhantomData<&'a [std::cell::UnsafeCell<u8>]>,
}

// SAFETY: a SharedMem only ever performs volatile or atomic accesses, or a memcpy of plain
// bytes into it, which other threads (or other domains) accessing the same bytes can only see
// in any order, never invalid; it holds no thread-affine state.
unsafe impl Send for SharedMem<'_> {}
// SAFETY: as for Send: every access through a shared reference is volatile, atomic, or a
// memcpy of plain bytes into the region.
unsafe impl Sync for SharedMem<'_> {}

impl std::fmt::Debug for SharedMem<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedMem")
            .field("ptr", &self.ptr)
            .field("len", &self.len)
            .finish()
    }
}

impl<'a> SharedMem<'a> {
    /// Creates a view of `len` bytes at `ptr`.
    ///
    /// # Safety
    /// For all of `'a`, `ptr..ptr+len` must stay mapped, readable and writable (or, where the
    /// caller only ever reads, readable), and must not be accessed through Rust references by
    /// anyone. Other threads and processes may access it concurrently.
    pub unsafe fn from_raw(ptr: NonNull<u8>, len: usize) -> Self {
        Self {
            ptr,
            len,
            _owner: PhantomData,
        }
    }

    /// Length of the region in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the region is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The start of the region, for handing to the kernel (io_uring, ioctls). The pointer is
    /// valid only as long as `'a`; the caller must keep the owner alive while the kernel uses it.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    fn check(&self, offset: usize, len: usize) -> Result<(), OutOfBounds> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(OutOfBounds {
                offset,
                len,
                size: self.len,
            }),
        }
    }

    /// A sub-view of `len` bytes at `offset`.
    ///
    /// # Errors
    /// [`OutOfBounds`] if the range does not lie inside this region.
    pub fn subregion(&self, offset: usize, len: usize) -> Result<SharedMem<'a>, OutOfBounds> {
        self.check(offset, len)?;
        // SAFETY: offset + len <= self.len was checked, so the pointer stays inside the region.
        let ptr = unsafe { self.ptr.add(offset) };
        // SAFETY: the new range lies inside the one the constructor's contract covers, for the
        // same lifetime.
        Ok(unsafe { Self::from_raw(ptr, len) })
    }

    /// Copies `buf.len()` bytes at `offset` into `buf` with volatile reads: each byte of
    /// shared memory is read exactly once, so that what is validated in `buf` afterwards is
    /// what was read (never a second fetch of the shared bytes).
    ///
    /// # Errors
    /// [`OutOfBounds`] if the range does not lie inside this region; `buf` is then untouched.
    pub fn read_into(&self, offset: usize, buf: &mut [u8]) -> Result<(), OutOfBounds> {
        self.check(offset, buf.len())?;
        let base = self.ptr.as_ptr().wrapping_add(offset);
        // Bytes up to an 8-aligned address, then aligned words, then the tail: the same bytes
        // as byte reads, an eighth of the loads.
        let head = base.align_offset(8).min(buf.len());
        let (head_buf, rest) = buf.split_at_mut(head);
        for (i, b) in head_buf.iter_mut().enumerate() {
            // SAFETY: base+i lies inside the checked range.
            *b = unsafe { std::ptr::read_volatile(base.wrapping_add(i)) };
        }
        let words = base.wrapping_add(head);
        let tail = words.wrapping_add(rest.len() / 8 * 8);
        let mut chunks = rest.chunks_exact_mut(8);
        for (i, chunk) in chunks.by_ref().enumerate() {
            // SAFETY: words+8i..+8 lies inside the checked range and is 8-aligned.
            let w = unsafe { std::ptr::read_volatile(words.wrapping_add(i * 8).cast::<u64>()) };
            chunk.copy_from_slice(&w.to_ne_bytes());
        }
        for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
            // SAFETY: tail+i lies inside the checked range.
            *b = unsafe { std::ptr::read_volatile(tail.wrapping_add(i)) };
        }
        Ok(())
    }

    /// Copies `buf` into the region at `offset`: a record of the protocol (up to 256 bytes)
    /// with volatile writes, bulk data (the pages a grant copy or a read
    /// fills) with one `memcpy`, as rust-vmm's `vm-memory` copies guest memory. Either way the
    /// other party may see the bytes land in any order until a barrier publishes them; and
    /// the source is private, so nothing is fetched twice.
    ///
    /// # Errors
    /// [`OutOfBounds`] if the range does not lie inside this region; nothing is written then.
    pub fn write_from(&self, offset: usize, buf: &[u8]) -> Result<(), OutOfBounds> {
        self.check(offset, buf.len())?;
        let base = self.ptr.as_ptr().wrapping_add(offset);
        if buf.len() > BULK_WRITE {
            // SAFETY: base..base+len lies inside the checked range, which no Rust reference
            // covers (the constructor's contract), so it cannot overlap `buf`; the bytes are
            // plain data, valid whatever the other party writes beside them.
            unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr(), base, buf.len()) };
            return Ok(());
        }
        let mut i = 0;
        while i < buf.len() {
            let p = base.wrapping_add(i);
            if buf.len() - i >= 8 && (p as usize) % 8 == 0 {
                let mut w = [0u8; 8];
                w.copy_from_slice(&buf[i..i + 8]);
                // SAFETY: p..p+8 lies inside the checked range and is 8-aligned.
                unsafe { std::ptr::write_volatile(p.cast::<u64>(), u64::from_ne_bytes(w)) };
                i += 8;
            } else {
                // SAFETY: p lies inside the checked range.
                unsafe { std::ptr::write_volatile(p, buf[i]) };
                i += 1;
            }
        }
        Ok(())
    }

    /// Sets `len` bytes at `offset` to `byte`.
    ///
    /// # Errors
    /// [`OutOfBounds`] if the range does not lie inside this region.
    pub fn fill(&self, offset: usize, len: usize, byte: u8) -> Result<(), OutOfBounds> {
        self.check(offset, len)?;
        let base = self.ptr.as_ptr().wrapping_add(offset);
        for i in 0..len {
            // SAFETY: base+i lies inside the checked range.
            unsafe { std::ptr::write_volatile(base.wrapping_add(i), byte) };
        }
        Ok(())
    }

    /// Reads a little-endian-agnostic native `N`-byte value once.
    fn read_array<const N: usize>(&self, offset: usize) -> Result<[u8; N], OutOfBounds> {
        let mut b = [0u8; N];
        self.read_into(offset, &mut b)?;
        Ok(b)
    }

    /// Volatile read of a `u8`.
    ///
    /// # Errors
    /// [`OutOfBounds`] outside the region.
    pub fn read_u8(&self, offset: usize) -> Result<u8, OutOfBounds> {
        Ok(self.read_array::<1>(offset)?[0])
    }

    /// Volatile read of a native-endian `u16`.
    ///
    /// # Errors
    /// [`OutOfBounds`] outside the region.
    pub fn read_u16(&self, offset: usize) -> Result<u16, OutOfBounds> {
        Ok(u16::from_ne_bytes(self.read_array(offset)?))
    }

    /// Volatile read of a native-endian `u32`.
    ///
    /// # Errors
    /// [`OutOfBounds`] outside the region.
    pub fn read_u32(&self, offset: usize) -> Result<u32, OutOfBounds> {
        Ok(u32::from_ne_bytes(self.read_array(offset)?))
    }

    /// Volatile read of a native-endian `u64`.
    ///
    /// # Errors
    /// [`OutOfBounds`] outside the region.
    pub fn read_u64(&self, offset: usize) -> Result<u64, OutOfBounds> {
        Ok(u64::from_ne_bytes(self.read_array(offset)?))
    }

    /// Volatile write of a `u8`.
    ///
    /// # Errors
    /// [`OutOfBounds`] outside the region.
    pub fn write_u8(&self, offset: usize, v: u8) -> Result<(), OutOfBounds> {
        self.write_from(offset, &[v])
    }

    /// Volatile write of a native-endian `u16`.
    ///
    /// # Errors
    /// [`OutOfBounds`] outside the region.
    pub fn write_u16(&self, offset: usize, v: u16) -> Result<(), OutOfBounds> {
        self.write_from(offset, &v.to_ne_bytes())
    }

    /// Volatile write of a native-endian `u32`.
    ///
    /// # Errors
    /// [`OutOfBounds`] outside the region.
    pub fn write_u32(&self, offset: usize, v: u32) -> Result<(), OutOfBounds> {
        self.write_from(offset, &v.to_ne_bytes())
    }

    /// Volatile write of a native-endian `u64`.
    ///
    /// # Errors
    /// [`OutOfBounds`] outside the region.
    pub fn write_u64(&self, offset: usize, v: u64) -> Result<(), OutOfBounds> {
        self.write_from(offset, &v.to_ne_bytes())
    }

    /// The `u32` at `offset` as an atomic, for ring indices shared with another domain.
    fn atomic_u32(&self, offset: usize) -> Result<&AtomicU32, OutOfBounds> {
        self.check(offset, 4)?;
        let p = self.ptr.as_ptr().wrapping_add(offset);
        if (p as usize) % std::mem::align_of::<AtomicU32>() != 0 {
            return Err(OutOfBounds {
                offset,
                len: 4,
                size: self.len,
            });
        }
        // SAFETY: p..p+4 is inside the region and 4-aligned; the constructor's contract keeps
        // it mapped for 'a (which bounds the returned reference through &self), and all other
        // accesses to it are atomic or volatile, which AtomicU32::from_ptr permits for
        // inter-process shared memory.
        Ok(unsafe { AtomicU32::from_ptr(p.cast::<u32>()) })
    }

    /// Atomic load of the `u32` at `offset` with `ordering`.
    ///
    /// # Errors
    /// [`OutOfBounds`] outside the region or when `offset` is not 4-aligned.
    pub fn load_u32(&self, offset: usize, ordering: Ordering) -> Result<u32, OutOfBounds> {
        Ok(self.atomic_u32(offset)?.load(ordering))
    }

    /// Atomic store of `v` to the `u32` at `offset` with `ordering`.
    ///
    /// # Errors
    /// [`OutOfBounds`] outside the region or when `offset` is not 4-aligned.
    pub fn store_u32(&self, offset: usize, v: u32, ordering: Ordering) -> Result<(), OutOfBounds> {
        self.atomic_u32(offset)?.store(v, ordering);
        Ok(())
    }

    /// Atomic compare-exchange of the `u32` at `offset` (for grant-table flags in the
    /// simulated hypervisor). Returns the previous value, as `AtomicU32::compare_exchange`.
    ///
    /// # Errors
    /// [`OutOfBounds`] outside the region or when `offset` is not 4-aligned.
    pub fn compare_exchange_u32(
        &self,
        offset: usize,
        current: u32,
        new: u32,
    ) -> Result<Result<u32, u32>, OutOfBounds> {
        Ok(self.atomic_u32(offset)?.compare_exchange(
            current,
            new,
            Ordering::AcqRel,
            Ordering::Acquire,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::OwnedMem;
    use proptest::prelude::*;

    #[test]
    fn out_of_bounds_is_an_error_not_a_panic() {
        let m = OwnedMem::new(1).unwrap();
        let mem = m.mem();
        assert!(mem.read_u32(4094).is_err());
        assert!(mem.read_u8(4095).is_ok());
        assert!(mem.write_from(usize::MAX, &[1]).is_err());
        assert!(mem.subregion(4000, 97).is_err());
        assert!(
            mem.load_u32(2, Ordering::Relaxed).is_err(),
            "misaligned atomic refused"
        );
    }

    proptest! {
        #[test]
        // Records (volatile words and bytes) and bulk data (memcpy) alike, at every alignment:
        // exactly the bytes written change, and read back as written.
        fn write_then_read_round_trips(offset in 0usize..4096, data in proptest::collection::vec(any::<u8>(), 0..600)) {
            let m = OwnedMem::new(1).unwrap();
            let mem = m.mem();
            mem.write_from(0, &[0xa5; 4096]).unwrap();
            let fits = offset + data.len() <= 4096;
            prop_assert_eq!(mem.write_from(offset, &data).is_ok(), fits);
            let mut expect = vec![0xa5u8; 4096];
            if fits {
                expect[offset..offset + data.len()].copy_from_slice(&data);
                let mut back = vec![0u8; data.len()];
                mem.read_into(offset, &mut back).unwrap();
                prop_assert_eq!(back, data);
            }
            let mut page = vec![0u8; 4096];
            mem.read_into(0, &mut page).unwrap();
            prop_assert_eq!(page, expect);
        }

        #[test]
        fn subregion_offsets_compose(a in 0usize..4096, b in 0usize..4096, v: u8) {
            let m = OwnedMem::new(1).unwrap();
            let mem = m.mem();
            if let Ok(sub) = mem.subregion(a, 4096 - a) {
                if sub.write_u8(b, v).is_ok() {
                    prop_assert_eq!(mem.read_u8(a + b).unwrap(), v);
                } else {
                    prop_assert!(a + b >= 4096);
                }
            }
        }
    }
}
