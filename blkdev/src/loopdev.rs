//! Loop devices (`include/uapi/linux/loop.h`): the control device's `LOOP_CTL_GET_FREE`, and
//! `LOOP_CONFIGURE`, `LOOP_CLR_FD`, `LOOP_GET_STATUS64` on a loop device, with the structures
//! they take.

use std::os::fd::BorrowedFd;

use rustix::io::Errno;
use rustix::ioctl::Opcode;

use ioctl::call;

/// The loop driver's major number.
pub const LOOP_MAJOR: u32 = 7;
/// `LO_FLAGS_READ_ONLY`.
pub const LO_FLAGS_READ_ONLY: u32 = 1;
/// `LO_FLAGS_AUTOCLEAR`: the kernel unbinds the device when its last opener closes it.
pub const LO_FLAGS_AUTOCLEAR: u32 = 4;
/// `LO_FLAGS_PARTSCAN`.
pub const LO_FLAGS_PARTSCAN: u32 = 8;
/// `LO_FLAGS_DIRECT_IO`.
pub const LO_FLAGS_DIRECT_IO: u32 = 16;
/// `LOOP_CTL_GET_FREE` (`/dev/loop-control`): the index of a free loop device (allocating one).
pub const LOOP_CTL_GET_FREE: Opcode = 0x4C82;
/// `LOOP_CONFIGURE`: bind a backing file with all settings in one call (Linux 5.8).
pub const LOOP_CONFIGURE: Opcode = 0x4C0A;
/// `LOOP_CLR_FD`: unbind (or, while others hold the device open, set autoclear).
pub const LOOP_CLR_FD: Opcode = 0x4C01;
/// `LOOP_GET_STATUS64`.
pub const LOOP_GET_STATUS64: Opcode = 0x4C05;

/// `struct loop_info64` from `include/uapi/linux/loop.h`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct LoopInfo64 {
    /// `st_dev` of the backing file (`new_encode_dev`).
    pub lo_device: u64,
    /// Inode number of the backing file.
    pub lo_inode: u64,
    /// `lo_rdevice`.
    pub lo_rdevice: u64,
    /// Offset into the backing file.
    pub lo_offset: u64,
    /// Size limit (0 = whole file).
    pub lo_sizelimit: u64,
    /// The device index.
    pub lo_number: u32,
    /// Obsolete.
    pub lo_encrypt_type: u32,
    /// Obsolete.
    pub lo_encrypt_key_size: u32,
    /// `LO_FLAGS_*`.
    pub lo_flags: u32,
    /// Name of the backing file (informational, truncated).
    pub lo_file_name: [u8; 64],
    /// Obsolete.
    pub lo_crypt_name: [u8; 64],
    /// Obsolete.
    pub lo_encrypt_key: [u8; 32],
    /// Obsolete.
    pub lo_init: [u64; 2],
}

impl Default for LoopInfo64 {
    fn default() -> Self {
        Self {
            lo_device: 0,
            lo_inode: 0,
            lo_rdevice: 0,
            lo_offset: 0,
            lo_sizelimit: 0,
            lo_number: 0,
            lo_encrypt_type: 0,
            lo_encrypt_key_size: 0,
            lo_flags: 0,
            lo_file_name: [0; 64],
            lo_crypt_name: [0; 64],
            lo_encrypt_key: [0; 32],
            lo_init: [0; 2],
        }
    }
}

/// `struct loop_config` from `include/uapi/linux/loop.h` (`LOOP_CONFIGURE`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct LoopConfig {
    /// The backing file's fd.
    pub fd: u32,
    /// Logical block size (0 = kernel default).
    pub block_size: u32,
    /// Settings.
    pub info: LoopInfo64,
    /// Must be zero.
    pub reserved: [u64; 8],
}

/// `LOOP_CTL_GET_FREE` on `/dev/loop-control`.
///
/// # Errors
/// The kernel's error.
pub fn ctl_get_free(ctl: BorrowedFd<'_>) -> Result<u32, Errno> {
    // SAFETY: LOOP_CTL_GET_FREE takes no argument.
    let n = unsafe {
        call(
            ctl,
            LOOP_CTL_GET_FREE,
            core::ptr::null_mut::<core::ffi::c_void>(),
        )
    }?;
    u32::try_from(n).map_err(|_| Errno::INVAL)
}

/// `LOOP_CONFIGURE` on an open loop device.
///
/// # Errors
/// The kernel's error (`EBUSY` when another process bound it first).
pub fn configure(dev: BorrowedFd<'_>, config: &LoopConfig) -> Result<(), Errno> {
    let mut config = *config;
    // SAFETY: LOOP_CONFIGURE reads a `struct loop_config`; `LoopConfig` is its #[repr(C)] twin
    // (layout test below) and lives across the call.
    unsafe { call(dev, LOOP_CONFIGURE, &raw mut config) }.map(drop)
}

/// `LOOP_CLR_FD` on an open loop device.
///
/// # Errors
/// The kernel's error (`ENXIO` when it is not bound).
pub fn clr_fd(dev: BorrowedFd<'_>) -> Result<(), Errno> {
    // SAFETY: LOOP_CLR_FD takes no argument.
    unsafe { call(dev, LOOP_CLR_FD, core::ptr::null_mut::<core::ffi::c_void>()) }.map(drop)
}

/// `LOOP_GET_STATUS64` on an open loop device.
///
/// # Errors
/// The kernel's error (`ENXIO` when it is not bound).
pub fn get_status(dev: BorrowedFd<'_>) -> Result<LoopInfo64, Errno> {
    let mut info = LoopInfo64::default();
    // SAFETY: LOOP_GET_STATUS64 writes a `struct loop_info64`; `LoopInfo64` is its #[repr(C)]
    // twin (layout test below) and lives across the call.
    unsafe { call(dev, LOOP_GET_STATUS64, &raw mut info) }?;
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{offset_of, size_of};

    #[test]
    fn layouts_match_the_kernel() {
        assert_eq!(size_of::<LoopInfo64>(), 232);
        assert_eq!(offset_of!(LoopInfo64, lo_number), 40);
        assert_eq!(offset_of!(LoopInfo64, lo_flags), 52);
        assert_eq!(offset_of!(LoopInfo64, lo_file_name), 56);
        assert_eq!(offset_of!(LoopInfo64, lo_crypt_name), 120);
        assert_eq!(offset_of!(LoopInfo64, lo_encrypt_key), 184);
        assert_eq!(offset_of!(LoopInfo64, lo_init), 216);
        assert_eq!(size_of::<LoopConfig>(), 304);
        assert_eq!(offset_of!(LoopConfig, block_size), 4);
        assert_eq!(offset_of!(LoopConfig, info), 8);
        assert_eq!(offset_of!(LoopConfig, reserved), 240);
    }

    /// The values of the kernel headers' macros (`include/uapi/linux/loop.h`).
    #[test]
    fn request_numbers_match_the_headers() {
        assert_eq!(
            [
                LOOP_CTL_GET_FREE,
                LOOP_CONFIGURE,
                LOOP_CLR_FD,
                LOOP_GET_STATUS64
            ],
            [0x4C82, 0x4C0A, 0x4C01, 0x4C05]
        );
    }
}
