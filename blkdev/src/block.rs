//! Block-device ioctls (`include/uapi/linux/fs.h`): size, block sizes, read-only flag, disk
//! sequence number, and discard.

use std::os::fd::BorrowedFd;

use rustix::io::Errno;
use rustix::ioctl::{opcode, Opcode};

use ioctl::call;

/// `BLKROGET` = `_IO(0x12, 94)`: writes an `int`, non-zero when the device is read-only.
pub const BLKROGET: Opcode = opcode::none(0x12, 94);
/// `BLKSSZGET` = `_IO(0x12, 104)`: writes an `int`, the logical block size.
pub const BLKSSZGET: Opcode = opcode::none(0x12, 104);
/// `BLKGETSIZE64` = `_IOR(0x12, 114, size_t)`: writes the size in bytes.
pub const BLKGETSIZE64: Opcode = opcode::read::<usize>(0x12, 114);
/// `BLKDISCARD` = `_IO(0x12, 119)`: reads `u64[2]` {start, len} in bytes.
pub const BLKDISCARD: Opcode = opcode::none(0x12, 119);
/// `BLKPBSZGET` = `_IO(0x12, 123)`: writes an `unsigned int`, the physical block size.
pub const BLKPBSZGET: Opcode = opcode::none(0x12, 123);
/// `BLKSECDISCARD` = `_IO(0x12, 125)`: reads `u64[2]` {start, len} in bytes.
pub const BLKSECDISCARD: Opcode = opcode::none(0x12, 125);
/// `BLKGETDISKSEQ` = `_IOR(0x12, 128, __u64)`: writes the disk sequence number (Linux 5.15).
pub const BLKGETDISKSEQ: Opcode = opcode::read::<u64>(0x12, 128);

/// `BLKGETSIZE64`: the size in bytes.
///
/// # Errors
/// The kernel's error (`ENOTTY` for something that is not a block device).
pub fn size_bytes(dev: BorrowedFd<'_>) -> Result<u64, Errno> {
    let mut size: usize = 0;
    // SAFETY: BLKGETSIZE64 writes one size_t to its argument, which lives across the call.
    unsafe { call(dev, BLKGETSIZE64, &raw mut size) }?;
    Ok(size as u64)
}

/// `BLKSSZGET`: the logical block size in bytes.
///
/// # Errors
/// The kernel's error; `EINVAL` for a negative answer.
pub fn logical_block_size(dev: BorrowedFd<'_>) -> Result<u32, Errno> {
    let mut size: core::ffi::c_int = 0;
    // SAFETY: BLKSSZGET writes one int to its argument, which lives across the call.
    unsafe { call(dev, BLKSSZGET, &raw mut size) }?;
    u32::try_from(size).map_err(|_| Errno::INVAL)
}

/// `BLKPBSZGET`: the physical block size in bytes.
///
/// # Errors
/// The kernel's error.
pub fn physical_block_size(dev: BorrowedFd<'_>) -> Result<u32, Errno> {
    let mut size: core::ffi::c_uint = 0;
    // SAFETY: BLKPBSZGET writes one unsigned int to its argument, which lives across the call.
    unsafe { call(dev, BLKPBSZGET, &raw mut size) }?;
    Ok(size)
}

/// `BLKROGET`: whether the device is read-only.
///
/// # Errors
/// The kernel's error.
pub fn read_only(dev: BorrowedFd<'_>) -> Result<bool, Errno> {
    let mut ro: core::ffi::c_int = 0;
    // SAFETY: BLKROGET writes one int to its argument, which lives across the call.
    unsafe { call(dev, BLKROGET, &raw mut ro) }?;
    Ok(ro != 0)
}

/// `BLKGETDISKSEQ`: the disk sequence number (Linux 5.15; 0 or `ENOTTY` before).
///
/// # Errors
/// The kernel's error.
pub fn diskseq(dev: BorrowedFd<'_>) -> Result<u64, Errno> {
    let mut seq = 0u64;
    // SAFETY: BLKGETDISKSEQ writes one __u64 to its argument, which lives across the call.
    unsafe { call(dev, BLKGETDISKSEQ, &raw mut seq) }?;
    Ok(seq)
}

/// `BLKDISCARD` (or `BLKSECDISCARD` when `secure`) of `len` bytes at `offset`, synchronously.
///
/// # Errors
/// The kernel's error (`EOPNOTSUPP` where the device cannot).
pub fn discard(dev: BorrowedFd<'_>, offset: u64, len: u64, secure: bool) -> Result<(), Errno> {
    let mut range = [offset, len];
    let op = if secure { BLKSECDISCARD } else { BLKDISCARD };
    // SAFETY: BLKDISCARD and BLKSECDISCARD read two u64 {start, len} from their argument,
    // which lives across the call.
    unsafe { call(dev, op, &raw mut range) }.map(drop)
}

/// Whether `BLKSECDISCARD` is implemented for this device, found without side effects: the
/// kernel (block/ioctl.c `blk_ioctl_secure_erase`) returns `EOPNOTSUPP` when the device has no
/// secure erase before it reads its argument, so a NULL argument gets `EFAULT` exactly when the
/// device supports it. (`EBADF` on a read-only fd: then it is not usable either.)
#[must_use]
pub fn probe_secure_discard(dev: BorrowedFd<'_>) -> bool {
    // SAFETY: the NULL pointer is passed as is; the kernel validates it (copy_from_user fails
    // with EFAULT), nobody dereferences it in this process.
    let res = unsafe { call(dev, BLKSECDISCARD, core::ptr::null_mut::<[u64; 2]>()) };
    matches!(res, Err(Errno::FAULT))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The values of the kernel headers' macros (`include/uapi/linux/fs.h`).
    #[test]
    fn request_numbers_match_the_headers() {
        assert_eq!(BLKROGET, 0x125e);
        assert_eq!(BLKSSZGET, 0x1268);
        assert_eq!(BLKGETSIZE64, 0x8008_1272);
        assert_eq!(BLKDISCARD, 0x1277);
        assert_eq!(BLKPBSZGET, 0x127b);
        assert_eq!(BLKSECDISCARD, 0x127d);
        assert_eq!(BLKGETDISKSEQ, 0x8008_1280);
    }

    #[test]
    fn a_regular_file_is_not_a_block_device() {
        let f = std::fs::File::open("/proc/self/exe").expect("open");
        let fd = std::os::fd::AsFd::as_fd(&f);
        assert!(size_bytes(fd).is_err());
        assert!(logical_block_size(fd).is_err());
        assert!(diskseq(fd).is_err());
        assert!(!probe_secure_discard(fd));
    }
}
