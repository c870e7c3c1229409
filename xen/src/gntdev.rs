//! Grant mapping and copying over `/dev/xen/gntdev`.
//!
//! The request encoding follows the kernel's `include/uapi/xen/gntdev.h`, and the sequences
//! follow libxengnttab (`tools/libs/gnttab/linux.c`): map = `IOCTL_GNTDEV_MAP_GRANT_REF`
//! then `mmap` at the returned index (retrying `EAGAIN`, which Xen returns while a granted
//! page is paged out); unmap = `IOCTL_GNTDEV_GET_OFFSET_FOR_VADDR`, `munmap`,
//! `IOCTL_GNTDEV_UNMAP_GRANT_REF`, in that order. `IOCTL_GNTDEV_GRANT_COPY` returns 0 even
//! when segments fail, so every segment's status is read back.
//!
//! This host has no Xen: the unit tests below check the request numbers and layouts against
//! the header's values, and `tests/grants.rs` runs its shared suite on this implementation
//! only where `/dev/xen/gntdev` exists. All the gntdev `unsafe` (ioctl, mmap, munmap) is in
//! this module.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::Arc;
use std::time::Duration;

use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;
use rustix::ioctl::Opcode;
use rustix::mm::{MapFlags, ProtFlags};
use shmem::PAGE_SIZE;

use crate::ioctl::{call, none_op};
use crate::types::{check_copy_batch, check_map_refs};
use crate::{
    Access, CopyOp, DomId, GrantCopier, GrantError, GrantMapper, GrantMapping, GrantRef,
    GrantStatus, Unmap, UnmapNotify,
};

/// The device node.
pub const GNTDEV_PATH: &str = "/dev/xen/gntdev";

/// `struct ioctl_gntdev_grant_ref`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
#[allow(dead_code)] // Fields are read by the kernel.
struct GrantRefArg {
    domid: u32,
    gref: u32,
}

/// `struct ioctl_gntdev_map_grant_ref` as declared (one ref; the real argument carries
/// `count`). Only its size is used: it is part of the request number.
#[repr(C)]
#[allow(dead_code)] // Fields are read by the kernel.
struct MapGrantRef {
    count: u32,
    pad: u32,
    index: u64,
    refs: [GrantRefArg; 1],
}

/// Words of `struct ioctl_gntdev_map_grant_ref` before `refs`: count, pad, index (2 words).
const MAP_HEADER_WORDS: usize = 4;

/// `struct ioctl_gntdev_unmap_grant_ref`.
#[repr(C)]
#[allow(dead_code)] // Fields are read by the kernel.
struct UnmapGrantRef {
    index: u64,
    count: u32,
    pad: u32,
}

/// `struct ioctl_gntdev_get_offset_for_vaddr`.
#[repr(C)]
#[allow(dead_code)] // Fields are read by the kernel.
struct GetOffsetForVaddr {
    vaddr: u64,
    offset: u64,
    count: u32,
    pad: u32,
}

/// `struct ioctl_gntdev_set_max_grants`.
#[repr(C)]
#[allow(dead_code)] // Fields are read by the kernel.
struct SetMaxGrants {
    count: u32,
}

/// `struct ioctl_gntdev_unmap_notify`.
#[repr(C)]
#[allow(dead_code)] // Fields are read by the kernel.
struct UnmapNotifyArg {
    index: u64,
    action: u32,
    event_channel_port: u32,
}

/// `UNMAP_NOTIFY_CLEAR_BYTE`.
const UNMAP_NOTIFY_CLEAR_BYTE: u32 = 0x1;
/// `UNMAP_NOTIFY_SEND_EVENT`.
const UNMAP_NOTIFY_SEND_EVENT: u32 = 0x2;

/// `struct gntdev_grant_copy_segment`: `source` and `dest` are each the union
/// `{ void *virt; struct { grant_ref_t ref; u16 offset; domid_t domid; } foreign; }`, kept
/// here as their 8 bytes.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
#[allow(dead_code)] // Fields are read by the kernel.
struct CopySegment {
    source: [u8; 8],
    dest: [u8; 8],
    len: u16,
    flags: u16,
    status: i16,
    pad: u16,
}

/// `GNTCOPY_source_gref`: the source is a grant.
const GNTCOPY_SOURCE_GREF: u16 = 1;
/// `GNTCOPY_dest_gref`: the destination is a grant.
const GNTCOPY_DEST_GREF: u16 = 2;

impl CopySegment {
    const ZERO: Self = Self {
        source: [0; 8],
        dest: [0; 8],
        len: 0,
        flags: 0,
        status: 0,
        pad: 0,
    };

    /// The segment for `op`, whose length was checked to be 1..=PAGE_SIZE (so it fits u16).
    /// A `FromGuest` local buffer is written by the kernel: it is taken `&mut`.
    fn for_op(op: &mut CopyOp<'_>) -> Self {
        match op {
            CopyOp::FromGuest { src, dst, .. } => Self {
                source: Self::foreign(src.gref, src.offset, src.domid),
                dest: Self::virt(dst.as_mut_ptr()),
                len: dst.len() as u16,
                flags: GNTCOPY_SOURCE_GREF,
                ..Self::ZERO
            },
            CopyOp::ToGuest { src, dst, .. } => Self {
                source: Self::virt(src.as_ptr()),
                dest: Self::foreign(dst.gref, dst.offset, dst.domid),
                len: src.len() as u16,
                flags: GNTCOPY_DEST_GREF,
                ..Self::ZERO
            },
        }
    }

    /// The union's `foreign` member.
    fn foreign(gref: GrantRef, offset: u16, domid: DomId) -> [u8; 8] {
        let mut b = [0u8; 8];
        b[..4].copy_from_slice(&gref.to_ne_bytes());
        b[4..6].copy_from_slice(&offset.to_ne_bytes());
        b[6..].copy_from_slice(&domid.to_ne_bytes());
        b
    }

    /// The union's `virt` member.
    fn virt(ptr: *const u8) -> [u8; 8] {
        let mut b = [0u8; 8];
        let p = (ptr as usize).to_ne_bytes();
        b[..p.len()].copy_from_slice(&p);
        b
    }
}

/// `struct ioctl_gntdev_grant_copy`.
#[repr(C)]
#[allow(dead_code)] // Fields are read by the kernel.
struct GrantCopy {
    count: u32,
    segments: *mut CopySegment,
}

const IOCTL_GNTDEV_MAP_GRANT_REF: Opcode = none_op(b'G', 0, size_of::<MapGrantRef>());
const IOCTL_GNTDEV_UNMAP_GRANT_REF: Opcode = none_op(b'G', 1, size_of::<UnmapGrantRef>());
const IOCTL_GNTDEV_GET_OFFSET_FOR_VADDR: Opcode = none_op(b'G', 2, size_of::<GetOffsetForVaddr>());
const IOCTL_GNTDEV_SET_MAX_GRANTS: Opcode = none_op(b'G', 3, size_of::<SetMaxGrants>());
const IOCTL_GNTDEV_SET_UNMAP_NOTIFY: Opcode = none_op(b'G', 7, size_of::<UnmapNotifyArg>());
const IOCTL_GNTDEV_GRANT_COPY: Opcode = none_op(b'G', 8, size_of::<GrantCopy>());

/// How long a map keeps retrying `EAGAIN` (paged-out grants) before giving up; libxengnttab
/// retries every millisecond forever, which would hang a backend on a broken pager.
const MAP_EAGAIN_RETRIES: u32 = 5000;

/// Most refs in one mapping: `count` is a u32 in the ABI, and the argument is allocated.
const MAX_MAP_REFS: usize = 1 << 20;

/// Segments per `IOCTL_GNTDEV_GRANT_COPY` call: a stack buffer, so that copying allocates
/// nothing.
const COPY_CHUNK: usize = 32;

fn io_err(e: Errno) -> io::Error {
    io::Error::from_raw_os_error(e.raw_os_error())
}

/// `SET_MAX_GRANTS`'s answer: `ENOTTY` (no such limit in this kernel) is success.
fn max_grants_result(r: rustix::io::Result<rustix::ioctl::IoctlOutput>) -> io::Result<()> {
    match r {
        Ok(_) | Err(Errno::NOTTY) => Ok(()),
        Err(e) => Err(io_err(e)),
    }
}

/// The open device, shared by the mapper and its mappings (which unmap through it).
#[derive(Debug)]
struct Device {
    fd: OwnedFd,
}

impl Device {
    fn unmap_grant_ref(&self, index: u64, count: u32) -> rustix::io::Result<()> {
        let mut arg = UnmapGrantRef {
            index,
            count,
            pad: 0,
        };
        // SAFETY: UNMAP_GRANT_REF takes a struct ioctl_gntdev_unmap_grant_ref, which `arg` is.
        unsafe { call(self.fd.as_fd(), IOCTL_GNTDEV_UNMAP_GRANT_REF, &mut arg) }.map(drop)
    }
}

impl Unmap for Device {
    fn unmap(&self, addr: NonNull<u8>, pages: usize, token: u64) {
        let mut arg = GetOffsetForVaddr {
            vaddr: addr.as_ptr() as u64,
            offset: 0,
            count: 0,
            pad: 0,
        };
        // SAFETY: GET_OFFSET_FOR_VADDR takes a struct ioctl_gntdev_get_offset_for_vaddr.
        match unsafe { call(self.fd.as_fd(), IOCTL_GNTDEV_GET_OFFSET_FOR_VADDR, &mut arg) } {
            Ok(_) if arg.offset == token && arg.count as usize == pages => {}
            Ok(_) => tracing::error!(
                "gntdev: mapping at {addr:p} is index {:#x} x{}, expected {token:#x} x{pages}",
                arg.offset,
                arg.count
            ),
            Err(e) => tracing::error!("gntdev: GET_OFFSET_FOR_VADDR {addr:p}: {e}"),
        }
        // SAFETY: addr/pages is the mapping made by `map` under this token; GrantMapping
        // unmaps it exactly once, after its last view is gone.
        if let Err(e) = unsafe { rustix::mm::munmap(addr.as_ptr().cast(), pages * PAGE_SIZE) } {
            tracing::error!("gntdev: munmap {addr:p}: {e}");
            return;
        }
        if let Err(e) = self.unmap_grant_ref(token, pages as u32) {
            tracing::error!("gntdev: UNMAP_GRANT_REF {token:#x}: {e}");
        }
    }
}

/// Grant operations through `/dev/xen/gntdev`: the real [`GrantMapper`] and
/// [`GrantCopier`].
#[derive(Debug, Clone)]
pub struct Gntdev {
    dev: Arc<Device>,
}

impl Gntdev {
    /// Opens [`GNTDEV_PATH`].
    ///
    /// # Errors
    /// When the device cannot be opened (not a Xen domain, no permission).
    pub fn open() -> io::Result<Self> {
        let fd = rustix::fs::open(GNTDEV_PATH, OFlags::RDWR | OFlags::CLOEXEC, Mode::empty())?;
        Ok(Self {
            dev: Arc::new(Device { fd }),
        })
    }

    /// Raises the number of grants this handle may map (`IOCTL_GNTDEV_SET_MAX_GRANTS`).
    /// Kernels since 4.x have no such limit and answer `ENOTTY`, which is success here, as in
    /// libxengnttab.
    ///
    /// # Errors
    /// Any other refusal.
    pub fn set_max_grants(&self, count: u32) -> io::Result<()> {
        let mut arg = SetMaxGrants { count };
        // SAFETY: SET_MAX_GRANTS takes a struct ioctl_gntdev_set_max_grants.
        max_grants_result(unsafe {
            call(self.dev.fd.as_fd(), IOCTL_GNTDEV_SET_MAX_GRANTS, &mut arg)
        })
    }

    /// `mmap` of `pages` pages at `index`, retrying `EAGAIN` as libxengnttab does.
    fn mmap(&self, index: u64, pages: usize, access: Access) -> Result<NonNull<u8>, GrantError> {
        let prot = match access {
            Access::ReadOnly => ProtFlags::READ,
            Access::ReadWrite => ProtFlags::READ | ProtFlags::WRITE,
        };
        let mut tries = 0;
        loop {
            // SAFETY: a fresh mapping chosen by the kernel (null hint, no MAP_FIXED) of the
            // grants just registered at `index`; it aliases no Rust object.
            let r = unsafe {
                rustix::mm::mmap(
                    std::ptr::null_mut(),
                    pages * PAGE_SIZE,
                    prot,
                    MapFlags::SHARED,
                    self.dev.fd.as_fd(),
                    index,
                )
            };
            match r {
                Ok(p) => {
                    return NonNull::new(p.cast::<u8>())
                        .ok_or(GrantError::Invalid("mmap returned null"))
                }
                Err(Errno::AGAIN) if tries < MAP_EAGAIN_RETRIES => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(Errno::AGAIN) => return Err(GrantError::Status(GrantStatus::Eagain)),
                Err(e) => return Err(GrantError::Io(io_err(e))),
            }
        }
    }
}

/// See [`GrantMapper::unmap_grace`]: the window is a completing CPU's few instructions
/// between posting the completion and releasing the pages (or a workqueue item for reads
/// whose pages lost their dirty bit), stretched only by the hypervisor descheduling that
/// vCPU; a second covers many of Xen's time slices.
const UNMAP_GRACE: Duration = Duration::from_secs(1);

impl GrantMapper for Gntdev {
    fn map(
        &self,
        domid: DomId,
        refs: &[GrantRef],
        access: Access,
    ) -> Result<GrantMapping, GrantError> {
        check_map_refs(refs, MAX_MAP_REFS)?;
        let count = refs.len() as u32;
        // struct ioctl_gntdev_map_grant_ref with `count` refs, as u32 words.
        let mut arg = vec![0u32; MAP_HEADER_WORDS + 2 * refs.len()];
        arg[0] = count;
        for (i, &gref) in refs.iter().enumerate() {
            arg[MAP_HEADER_WORDS + 2 * i] = u32::from(domid);
            arg[MAP_HEADER_WORDS + 2 * i + 1] = gref;
        }
        // SAFETY: MAP_GRANT_REF takes a struct ioctl_gntdev_map_grant_ref whose refs array
        // holds `count` entries; `arg` has exactly that layout and size, and the kernel writes
        // only `index` inside it.
        unsafe {
            call(
                self.dev.fd.as_fd(),
                IOCTL_GNTDEV_MAP_GRANT_REF,
                arg.as_mut_ptr(),
            )
        }
        .map_err(|e| GrantError::Io(io_err(e)))?;
        let mut idx = [0u8; 8];
        idx[..4].copy_from_slice(&arg[2].to_ne_bytes());
        idx[4..].copy_from_slice(&arg[3].to_ne_bytes());
        let index = u64::from_ne_bytes(idx);
        let addr = match self.mmap(index, refs.len(), access) {
            Ok(a) => a,
            Err(e) => {
                // Free the driver's slots, as libxengnttab does when mmap fails.
                if let Err(u) = self.dev.unmap_grant_ref(index, count) {
                    tracing::error!("gntdev: UNMAP_GRANT_REF {index:#x} after failed map: {u}");
                }
                return Err(e);
            }
        };
        let unmapper: Arc<dyn Unmap> = self.dev.clone();
        // SAFETY: addr is the fresh mapping of refs.len() pages at `index`; only
        // Device::unmap, called once by GrantMapping's drop with this token, unmaps it.
        Ok(unsafe { GrantMapping::new(addr, refs.len(), index, access, unmapper) })
    }

    fn set_unmap_notify(
        &self,
        mapping: &GrantMapping,
        notify: UnmapNotify,
    ) -> Result<(), GrantError> {
        let mut arg = UnmapNotifyArg {
            index: mapping.token(),
            action: 0,
            event_channel_port: 0,
        };
        if let Some(offset) = notify.clear_byte {
            if offset >= mapping.pages() * PAGE_SIZE || mapping.access() != Access::ReadWrite {
                return Err(GrantError::Invalid(
                    "unmap notify byte outside a writable mapping",
                ));
            }
            arg.index += offset as u64;
            arg.action |= UNMAP_NOTIFY_CLEAR_BYTE;
        }
        if let Some(port) = notify.send_event {
            arg.event_channel_port = port;
            arg.action |= UNMAP_NOTIFY_SEND_EVENT;
        }
        // SAFETY: SET_UNMAP_NOTIFY takes a struct ioctl_gntdev_unmap_notify.
        unsafe { call(self.dev.fd.as_fd(), IOCTL_GNTDEV_SET_UNMAP_NOTIFY, &mut arg) }
            .map(drop)
            .map_err(|e| GrantError::Io(io_err(e)))
    }

    fn unmap_grace(&self) -> Duration {
        UNMAP_GRACE
    }
}

impl GrantCopier for Gntdev {
    fn copy(&self, ops: &mut [CopyOp<'_>]) -> Result<(), GrantError> {
        check_copy_batch(ops)?;
        let mut segs = [CopySegment::ZERO; COPY_CHUNK];
        for chunk in ops.chunks_mut(COPY_CHUNK) {
            for (seg, op) in segs.iter_mut().zip(chunk.iter_mut()) {
                *seg = CopySegment::for_op(op);
            }
            let mut arg = GrantCopy {
                count: chunk.len() as u32,
                segments: segs.as_mut_ptr(),
            };
            // SAFETY: GRANT_COPY takes a struct ioctl_gntdev_grant_copy pointing at `count`
            // segments; `segs` holds them, and each local `virt` points into a buffer of
            // `len` bytes that `chunk` borrows (mutably for FromGuest) for this whole call.
            unsafe { call(self.dev.fd.as_fd(), IOCTL_GNTDEV_GRANT_COPY, &mut arg) }
                .map_err(|e| GrantError::Io(io_err(e)))?;
            for (seg, op) in segs.iter().zip(chunk.iter_mut()) {
                match op {
                    CopyOp::FromGuest { status, .. } | CopyOp::ToGuest { status, .. } => {
                        *status = GrantStatus::from_raw(seg.status);
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! The request encoding, checked against `include/uapi/xen/gntdev.h` (values as listed
    //! in the project's blkback-facts, x86_64). This host has no Xen, so these tests check
    //! encoding only; the behaviour is tested on the simulation and, where
    //! `/dev/xen/gntdev` exists, by `tests/grants.rs`.
    use std::mem::{offset_of, size_of};

    use super::*;

    #[test]
    fn request_numbers_match_the_header() {
        assert_eq!(IOCTL_GNTDEV_MAP_GRANT_REF as u64, 0x0018_4700);
        assert_eq!(IOCTL_GNTDEV_UNMAP_GRANT_REF as u64, 0x0010_4701);
        assert_eq!(IOCTL_GNTDEV_GET_OFFSET_FOR_VADDR as u64, 0x0018_4702);
        assert_eq!(IOCTL_GNTDEV_SET_MAX_GRANTS as u64, 0x0004_4703);
        assert_eq!(IOCTL_GNTDEV_SET_UNMAP_NOTIFY as u64, 0x0010_4707);
        #[cfg(target_pointer_width = "64")]
        assert_eq!(IOCTL_GNTDEV_GRANT_COPY as u64, 0x0010_4708);
    }

    #[test]
    fn layouts_match_the_header() {
        assert_eq!(size_of::<GrantRefArg>(), 8);
        assert_eq!(offset_of!(MapGrantRef, count), 0);
        assert_eq!(offset_of!(MapGrantRef, index), 8);
        assert_eq!(offset_of!(MapGrantRef, refs), MAP_HEADER_WORDS * 4);
        assert_eq!(size_of::<MapGrantRef>(), 24);
        assert_eq!(offset_of!(UnmapGrantRef, count), 8);
        assert_eq!(offset_of!(GetOffsetForVaddr, offset), 8);
        assert_eq!(offset_of!(GetOffsetForVaddr, count), 16);
        assert_eq!(offset_of!(UnmapNotifyArg, action), 8);
        assert_eq!(offset_of!(UnmapNotifyArg, event_channel_port), 12);
        assert_eq!(size_of::<CopySegment>(), 24);
        assert_eq!(offset_of!(CopySegment, dest), 8);
        assert_eq!(offset_of!(CopySegment, len), 16);
        assert_eq!(offset_of!(CopySegment, flags), 18);
        assert_eq!(offset_of!(CopySegment, status), 20);
        #[cfg(target_pointer_width = "64")]
        assert_eq!(offset_of!(GrantCopy, segments), 8);
    }

    #[test]
    fn copy_segment_foreign_is_ref_offset_domid() {
        let b = CopySegment::foreign(0x0102_0304, 0x0506, 0x0708);
        assert_eq!(u32::from_ne_bytes([b[0], b[1], b[2], b[3]]), 0x0102_0304);
        assert_eq!(u16::from_ne_bytes([b[4], b[5]]), 0x0506);
        assert_eq!(u16::from_ne_bytes([b[6], b[7]]), 0x0708);
        let v = CopySegment::virt(0x1234_5678 as *const u8);
        assert_eq!(
            usize::from_ne_bytes(v[..size_of::<usize>()].try_into().unwrap()),
            0x1234_5678
        );
    }

    #[test]
    fn copy_segments_name_the_grant_side_and_length() {
        let mut local = [0u8; 100];
        let src = crate::GrantAddr {
            domid: 7,
            gref: 42,
            offset: 300,
        };
        let mut op = CopyOp::FromGuest {
            src,
            dst: &mut local,
            status: GrantStatus::Okay,
        };
        let seg = CopySegment::for_op(&mut op);
        assert_eq!(seg.flags, GNTCOPY_SOURCE_GREF);
        assert_eq!(seg.len, 100);
        assert_eq!(seg.source, CopySegment::foreign(42, 300, 7));
        assert_eq!(seg.dest, CopySegment::virt(local.as_ptr()));
        let data = [1u8; 4096];
        let mut op = CopyOp::ToGuest {
            src: &data,
            dst: src,
            status: GrantStatus::Okay,
        };
        let seg = CopySegment::for_op(&mut op);
        assert_eq!(seg.flags, GNTCOPY_DEST_GREF);
        assert_eq!(seg.len, 4096);
        assert_eq!(seg.source, CopySegment::virt(data.as_ptr()));
        assert_eq!(seg.dest, CopySegment::foreign(42, 300, 7));
        assert_eq!(seg.status, 0);
    }

    #[test]
    fn set_max_grants_enotty_is_success() {
        assert!(max_grants_result(Err(Errno::NOTTY)).is_ok());
        assert!(max_grants_result(Ok(0)).is_ok());
        assert_eq!(
            max_grants_result(Err(Errno::INVAL))
                .unwrap_err()
                .raw_os_error(),
            Some(Errno::INVAL.raw_os_error())
        );
    }

    #[test]
    fn map_argument_words_follow_the_header_layout() {
        // The map argument is built as u32 words: count, pad, index (2 words), then
        // {domid, ref} pairs; index is read back from words 2 and 3.
        assert_eq!(offset_of!(MapGrantRef, pad), 4);
        assert_eq!(
            offset_of!(MapGrantRef, refs) + offset_of!(GrantRefArg, gref),
            20
        );
    }
}
