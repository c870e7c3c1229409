//! [`ReadOnlyMem`]: a view of shared memory that can only be read (a read-only grant
//! mapping: writing through it would fault).

use crate::{OutOfBounds, SharedMem};

/// A [`SharedMem`] with only its reading half: what a read-only mapping hands out, so that
/// writing to it does not compile rather than faulting at run time.
#[derive(Clone, Copy, Debug)]
pub struct ReadOnlyMem<'a>(SharedMem<'a>);

impl<'a> From<SharedMem<'a>> for ReadOnlyMem<'a> {
    fn from(mem: SharedMem<'a>) -> Self {
        Self(mem)
    }
}

impl<'a> ReadOnlyMem<'a> {
    /// Length of the region in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the region is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The start of the region, for handing to the kernel as a source (a write's iovec);
    /// valid only as long as `'a`.
    pub fn as_ptr(&self) -> *const u8 {
        self.0.as_ptr().cast_const()
    }

    /// A sub-view of `len` bytes at `offset`.
    ///
    /// # Errors
    /// [`OutOfBounds`] if the range does not lie inside this region.
    pub fn subregion(&self, offset: usize, len: usize) -> Result<ReadOnlyMem<'a>, OutOfBounds> {
        self.0.subregion(offset, len).map(Self)
    }

    /// As [`SharedMem::read_into`].
    ///
    /// # Errors
    /// [`OutOfBounds`] if the range does not lie inside this region.
    pub fn read_into(&self, offset: usize, buf: &mut [u8]) -> Result<(), OutOfBounds> {
        self.0.read_into(offset, buf)
    }

    /// Volatile read of a `u8`.
    ///
    /// # Errors
    /// [`OutOfBounds`] outside the region.
    pub fn read_u8(&self, offset: usize) -> Result<u8, OutOfBounds> {
        self.0.read_u8(offset)
    }

    /// Volatile read of a native-endian `u32`.
    ///
    /// # Errors
    /// [`OutOfBounds`] outside the region.
    pub fn read_u32(&self, offset: usize) -> Result<u32, OutOfBounds> {
        self.0.read_u32(offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::OwnedMem;

    #[test]
    fn reads_what_the_writable_view_wrote() {
        let m = OwnedMem::new(1).unwrap();
        m.mem().write_from(10, b"abc").unwrap();
        let ro = ReadOnlyMem::from(m.mem());
        let mut b = [0u8; 3];
        ro.subregion(10, 3).unwrap().read_into(0, &mut b).unwrap();
        assert_eq!(&b, b"abc");
        assert_eq!(ro.read_u8(11), Ok(b'b'));
        assert!(ro.subregion(4000, 200).is_err());
        assert_eq!(ro.len(), 4096);
    }
}
