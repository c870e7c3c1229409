//! Plain types shared by the real and simulated platforms.

use std::ptr::NonNull;

use shmem::{ReadOnlyMem, SharedMem, PAGE_SIZE};

/// A Xen domain id.
pub type DomId = u16;
/// A grant reference, an index into the granting domain's grant table.
pub type GrantRef = u32;
/// An event channel port number, local to one domain.
pub type Port = u32;

/// The first domid reserved for special purposes (`DOMID_FIRST_RESERVED`): no domain has it.
pub const DOMID_FIRST_RESERVED: DomId = 0x7ff0;

/// Whether a mapping may be written to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read-only: the grant may be a read-only grant.
    ReadOnly,
    /// Read-write: a read-only grant fails to map.
    ReadWrite,
}

/// A grant status code, with Xen's values (`GNTST_*` in `xen/include/public/grant_table.h`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i16)]
pub enum GrantStatus {
    /// GNTST_okay.
    Okay = 0,
    /// GNTST_general_error.
    GeneralError = -1,
    /// GNTST_bad_domain.
    BadDomain = -2,
    /// GNTST_bad_gntref.
    BadGntref = -3,
    /// GNTST_bad_handle.
    BadHandle = -4,
    /// GNTST_bad_virt_addr.
    BadVirtAddr = -5,
    /// GNTST_bad_dev_addr.
    BadDevAddr = -6,
    /// GNTST_no_device_space.
    NoDeviceSpace = -7,
    /// GNTST_permission_denied.
    PermissionDenied = -8,
    /// GNTST_bad_page.
    BadPage = -9,
    /// GNTST_bad_copy_arg.
    BadCopyArg = -10,
    /// GNTST_address_too_big.
    AddressTooBig = -11,
    /// GNTST_eagain.
    Eagain = -12,
    /// GNTST_no_space.
    NoSpace = -13,
}

impl GrantStatus {
    /// The status for a raw `GNTST_*` value; unknown values are `GeneralError`.
    pub fn from_raw(v: i16) -> Self {
        match v {
            0 => Self::Okay,
            -2 => Self::BadDomain,
            -3 => Self::BadGntref,
            -4 => Self::BadHandle,
            -5 => Self::BadVirtAddr,
            -6 => Self::BadDevAddr,
            -7 => Self::NoDeviceSpace,
            -8 => Self::PermissionDenied,
            -9 => Self::BadPage,
            -10 => Self::BadCopyArg,
            -11 => Self::AddressTooBig,
            -12 => Self::Eagain,
            -13 => Self::NoSpace,
            _ => Self::GeneralError,
        }
    }
}

/// A grant-table failure.
#[derive(Debug, thiserror::Error)]
pub enum GrantError {
    /// The hypervisor refused the operation with this status.
    #[error("grant operation failed: {0:?}")]
    Status(GrantStatus),
    /// An argument was refused before reaching the hypervisor (empty batch, segment crossing
    /// a page, too many refs).
    #[error("invalid grant operation: {0}")]
    Invalid(&'static str),
    /// The device node failed.
    #[error("grant device: {0}")]
    Io(#[from] std::io::Error),
}

/// Releases a mapping; implemented by each platform's mapper. Called exactly once, from
/// [`GrantMapping`]'s `Drop`.
pub trait Unmap: Send + Sync {
    /// Unmaps `pages` pages at `addr`, mapped under `token` (the gntdev index).
    fn unmap(&self, addr: NonNull<u8>, pages: usize, token: u64);
}

/// Grant references of one domain mapped contiguously into this process; unmapped on drop.
pub struct GrantMapping {
    addr: NonNull<u8>,
    pages: usize,
    token: u64,
    access: Access,
    unmapper: std::sync::Arc<dyn Unmap>,
}

// SAFETY: the mapping is plain memory owned by this value; it is only accessed through
// SharedMem (volatile/atomic), and the unmapper is Send + Sync.
unsafe impl Send for GrantMapping {}
// SAFETY: &GrantMapping only hands out SharedMem and ReadOnlyMem views.
unsafe impl Sync for GrantMapping {}

impl std::fmt::Debug for GrantMapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrantMapping")
            .field("addr", &self.addr)
            .field("pages", &self.pages)
            .field("access", &self.access)
            .finish()
    }
}

impl GrantMapping {
    /// Wraps a fresh mapping.
    ///
    /// # Safety
    /// `addr..addr + pages * 4096` must be a mapping that stays valid until `unmapper.unmap`
    /// is called with these arguments, and nothing else may unmap it.
    pub unsafe fn new(
        addr: NonNull<u8>,
        pages: usize,
        token: u64,
        access: Access,
        unmapper: std::sync::Arc<dyn Unmap>,
    ) -> Self {
        Self {
            addr,
            pages,
            token,
            access,
            unmapper,
        }
    }

    /// The mapped pages, to read. Every mapping can be read.
    pub fn mem(&self) -> ReadOnlyMem<'_> {
        // SAFETY: the mapping lives until self is dropped, which the view's lifetime forbids
        // before the view is gone; no Rust reference to the pages exists; the view is made
        // read-only before it leaves, so a read-only mapping is only ever read.
        ReadOnlyMem::from(unsafe { SharedMem::from_raw(self.addr, self.pages * PAGE_SIZE) })
    }

    /// The mapped pages, to read and write; `None` for a read-only mapping (writing to it
    /// would fault), so that safe code cannot write where the page tables forbid it.
    pub fn writable(&self) -> Option<SharedMem<'_>> {
        if self.access != Access::ReadWrite {
            return None;
        }
        // SAFETY: as in `mem`; the mapping was made read-write (checked above).
        Some(unsafe { SharedMem::from_raw(self.addr, self.pages * PAGE_SIZE) })
    }

    /// Number of pages mapped.
    pub fn pages(&self) -> usize {
        self.pages
    }

    /// The access the mapping was made with.
    pub fn access(&self) -> Access {
        self.access
    }

    /// The mapper's handle for this mapping (the gntdev index).
    pub fn token(&self) -> u64 {
        self.token
    }
}

impl Drop for GrantMapping {
    fn drop(&mut self) {
        self.unmapper.unmap(self.addr, self.pages, self.token);
    }
}

/// What happens when a mapping is finally unmapped, even by the death of this process
/// (`IOCTL_GNTDEV_SET_UNMAP_NOTIFY`): how a granting domain learns that its peer is gone.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UnmapNotify {
    /// Byte offset in the mapping set to 0 before unmapping (`UNMAP_NOTIFY_CLEAR_BYTE`); the
    /// mapping must be writable.
    pub clear_byte: Option<usize>,
    /// Local event-channel port notified after unmapping (`UNMAP_NOTIFY_SEND_EVENT`).
    pub send_event: Option<Port>,
}

/// Where one side of a grant copy lies in the other domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrantAddr {
    /// The granting domain.
    pub domid: DomId,
    /// The grant reference.
    pub gref: GrantRef,
    /// Byte offset in the granted page; `offset + len` must not cross the page.
    pub offset: u16,
}

/// One segment of a batched grant copy. After [`crate::GrantCopier::copy`] each op's `status` says
/// whether that segment was done: the batch as a whole succeeds even when segments fail.
#[derive(Debug)]
pub enum CopyOp<'a> {
    /// Copy from the guest's granted page into local memory.
    FromGuest {
        /// The guest side.
        src: GrantAddr,
        /// Local destination; its length is the copy length (at most a page).
        dst: &'a mut [u8],
        /// Result for this segment.
        status: GrantStatus,
    },
    /// Copy from local memory to the guest's granted page (which must be writable).
    ToGuest {
        /// Local source; its length is the copy length (at most a page).
        src: &'a [u8],
        /// The guest side.
        dst: GrantAddr,
        /// Result for this segment.
        status: GrantStatus,
    },
}

impl CopyOp<'_> {
    /// The segment's result after a copy.
    pub fn status(&self) -> GrantStatus {
        match self {
            Self::FromGuest { status, .. } | Self::ToGuest { status, .. } => *status,
        }
    }
}

/// Checks a batch as the kernel's gntdev does before copying anything: a zero or over-page
/// length, or a grant side crossing its page, fails the whole batch.
pub fn check_copy_batch(ops: &[CopyOp<'_>]) -> Result<(), GrantError> {
    for op in ops {
        let (len, addr) = match op {
            CopyOp::FromGuest { src, dst, .. } => (dst.len(), src),
            CopyOp::ToGuest { src, dst, .. } => (src.len(), dst),
        };
        if len == 0 || len > PAGE_SIZE {
            return Err(GrantError::Invalid(
                "grant copy segment length is 0 or over a page",
            ));
        }
        if usize::from(addr.offset) + len > PAGE_SIZE {
            return Err(GrantError::Invalid("grant copy segment crosses its page"));
        }
    }
    Ok(())
}

/// Checks the refs of one map call against the [`GrantMapper::map`](crate::GrantMapper::map)
/// contract: at least one ref and at most `max` (the implementation's own limit).
pub fn check_map_refs(refs: &[GrantRef], max: usize) -> Result<(), GrantError> {
    if refs.is_empty() {
        return Err(GrantError::Invalid("no grant refs to map"));
    }
    if refs.len() > max {
        return Err(GrantError::Invalid("too many grant refs in one mapping"));
    }
    Ok(())
}

/// An event-channel failure.
#[derive(Debug, thiserror::Error)]
pub enum EvtchnError {
    /// The port is not bound through this handle.
    #[error("event channel port {0} is not bound here")]
    NotBound(Port),
    /// The device or simulation failed.
    #[error("event channel: {0}")]
    Io(#[from] std::io::Error),
}
