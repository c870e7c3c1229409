//! Every `ioctl` blkhotplug makes, in one place: loop control and loop devices, block devices,
//! device-mapper. The only module with `unsafe`; each call goes through [`xen::ioctl::call`]
//! with a buffer whose layout is the kernel's (checked by the layout tests in
//! [`crate::loopdev`] and [`crate::dm`]).
use std::os::fd::BorrowedFd;

use core::ffi::c_void;
use rustix::io::Errno;
use rustix::ioctl::{opcode, Opcode};
use xen::ioctl::call;

use crate::loopdev::{LoopConfig, LoopInfo64};

/// `LOOP_CTL_GET_FREE` (`/dev/loop-control`): the index of a free loop device (allocating one).
pub const LOOP_CTL_GET_FREE: Opcode = 0x4C82;
/// `LOOP_CONFIGURE`: bind a backing file with all settings in one call (Linux 5.8).
pub const LOOP_CONFIGURE: Opcode = 0x4C0A;
/// `LOOP_CLR_FD`: unbind (or, while others hold the device open, set autoclear).
pub const LOOP_CLR_FD: Opcode = 0x4C01;
/// `LOOP_GET_STATUS64`.
pub const LOOP_GET_STATUS64: Opcode = 0x4C05;
/// `BLKGETDISKSEQ` = `_IOR(0x12, 128, __u64)`.
pub const BLKGETDISKSEQ: Opcode = opcode::read::<u64>(0x12, 128);
/// `BLKSSZGET` = `_IO(0x12, 104)` (writes an `int`).
pub const BLKSSZGET: Opcode = opcode::none(0x12, 104);
/// `BLKGETSIZE64` = `_IOR(0x12, 114, size_t)`.
pub const BLKGETSIZE64: Opcode = opcode::read::<usize>(0x12, 114);

/// `LOOP_CTL_GET_FREE` on `/dev/loop-control`.
pub fn loop_ctl_get_free(ctl: BorrowedFd<'_>) -> Result<u32, Errno> {
    // SAFETY: LOOP_CTL_GET_FREE takes no argument.
    let n = unsafe { call(ctl, LOOP_CTL_GET_FREE, core::ptr::null_mut::<c_void>()) }?;
    u32::try_from(n).map_err(|_| Errno::INVAL)
}

/// `LOOP_CONFIGURE` on an open loop device.
pub fn loop_configure(dev: BorrowedFd<'_>, config: &LoopConfig) -> Result<(), Errno> {
    let mut config = *config;
    let arg = &raw mut config;
    // SAFETY: LOOP_CONFIGURE reads a `struct loop_config`; `LoopConfig` is its #[repr(C)] twin
    // (layout test in loopdev) and lives across the call.
    unsafe { call(dev, LOOP_CONFIGURE, arg) }.map(drop)
}

/// `LOOP_CLR_FD` on an open loop device.
pub fn loop_clr_fd(dev: BorrowedFd<'_>) -> Result<(), Errno> {
    // SAFETY: LOOP_CLR_FD takes no argument.
    unsafe { call(dev, LOOP_CLR_FD, core::ptr::null_mut::<c_void>()) }.map(drop)
}

/// `LOOP_GET_STATUS64` on an open loop device (`ENXIO` when it is not bound).
pub fn loop_get_status(dev: BorrowedFd<'_>) -> Result<LoopInfo64, Errno> {
    let mut info = LoopInfo64::default();
    let arg = &raw mut info;
    // SAFETY: LOOP_GET_STATUS64 writes a `struct loop_info64`; `LoopInfo64` is its #[repr(C)]
    // twin (layout test in loopdev) and lives across the call.
    unsafe { call(dev, LOOP_GET_STATUS64, arg) }?;
    Ok(info)
}

/// `BLKGETDISKSEQ`: the disk sequence number (Linux 5.15).
pub fn blk_get_diskseq(dev: BorrowedFd<'_>) -> Result<u64, Errno> {
    let mut seq = 0u64;
    let arg = &raw mut seq;
    // SAFETY: BLKGETDISKSEQ writes one __u64 to its argument.
    unsafe { call(dev, BLKGETDISKSEQ, arg) }?;
    Ok(seq)
}

/// `BLKSSZGET`: the logical block size.
pub fn blk_logical_block_size(dev: BorrowedFd<'_>) -> Result<u32, Errno> {
    let mut size: core::ffi::c_int = 0;
    let arg = &raw mut size;
    // SAFETY: BLKSSZGET writes one int to its argument.
    unsafe { call(dev, BLKSSZGET, arg) }?;
    u32::try_from(size).map_err(|_| Errno::INVAL)
}

/// `BLKGETSIZE64`: the size in bytes.
pub fn blk_size_bytes(dev: BorrowedFd<'_>) -> Result<u64, Errno> {
    let mut size = 0u64;
    let arg = &raw mut size;
    // SAFETY: BLKGETSIZE64 writes one u64 (size_t on 64-bit Linux) to its argument.
    unsafe { call(dev, BLKGETSIZE64, arg) }?;
    Ok(size)
}

/// A device-mapper ioctl on `/dev/mapper/control`. `buf` holds a `struct dm_ioctl` followed by
/// its data, `data_size` (its first field after `version`) set to at most `buf`'s length in
/// bytes, which [`crate::dm::DmBuffer`] guarantees.
pub fn dm(ctl: BorrowedFd<'_>, op: Opcode, buf: &mut [u64]) -> Result<(), Errno> {
    let arg = buf.as_mut_ptr();
    // SAFETY: DM ioctls read and write `data_size` bytes at the argument, and `data_size` is
    // at most the length of `buf` (DmBuffer's invariant), which lives across the call.
    unsafe { call(ctl, op, arg) }.map(drop)
}

/// Takes ownership of an fd the kernel returned in a successful ioctl's output (the series'
/// `DM_FILE_DESCRIPTOR_FLAG`). Negative values are no fd.
pub fn take_returned_fd(raw: i32) -> Option<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: only called with the `fd` field of a DM ioctl that succeeded with
    // DM_FILE_DESCRIPTOR_FLAG: the kernel installed a new fd in our table for us, which nothing
    // else in this process knows or owns, so owning (and eventually closing) it is sound.
    (raw >= 0).then(|| unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_ioctl_numbers() {
        assert_eq!(BLKGETDISKSEQ, 0x8008_1280);
        assert_eq!(BLKSSZGET, 0x1268);
        assert_eq!(BLKGETSIZE64, 0x8008_1272);
    }
}
