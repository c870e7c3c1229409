//! The three request/response layouts a frontend can choose with the XenStore `protocol` key,
//! as `#[repr(C)]` byte-exact structs checked at compile time against Xen's public
//! `io/blkif.h` (and the `blkif_x86_32_*`/`blkif_x86_64_*` mirrors in Linux's
//! `drivers/block/xen-blkback/common.h`).
//!
//! Every field is an unaligned little-endian zerocopy type, so the structs have no padding of
//! their own and can be viewed over any private byte buffer. Xen runs only on little-endian
//! architectures.

use zerocopy::little_endian::{I16, U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// `XEN_IO_PROTO_ABI_X86_32`: the i386 layout (64-bit fields aligned to 4 bytes).
pub const PROTOCOL_X86_32: &str = "x86_32-abi";
/// `XEN_IO_PROTO_ABI_X86_64`: the x86_64 layout (64-bit fields aligned to 8 bytes).
pub const PROTOCOL_X86_64: &str = "x86_64-abi";
/// `XEN_IO_PROTO_ABI_ARM`: the Arm layout, identical to x86_64's.
pub const PROTOCOL_ARM: &str = "arm-abi";

/// `XEN_IO_PROTO_ABI_NATIVE` of the architecture this crate is built for.
pub const PROTOCOL_NATIVE: &str = if cfg!(target_arch = "x86") {
    PROTOCOL_X86_32
} else if cfg!(any(target_arch = "arm", target_arch = "aarch64")) {
    PROTOCOL_ARM
} else {
    PROTOCOL_X86_64
};

/// The request/response ABI negotiated through the frontend's `protocol` XenStore node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Abi {
    /// The backend's own layout (`BLKIF_PROTOCOL_NATIVE`): x86_64's on x86_64 and Arm,
    /// x86_32's on i386.
    Native,
    /// `x86_32-abi`: 108-byte requests, 12-byte responses.
    X86_32,
    /// `x86_64-abi`: 112-byte requests, 16-byte responses.
    X86_64,
}

/// The frontend named a `protocol` this backend does not know. Linux's blkback fails the
/// connection (`xenbus_dev_fatal`, `-ENOSYS`) rather than guessing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown frontend protocol {0:?}")]
pub struct UnknownProtocol(pub String);

/// The two byte layouts that exist; [`Abi::Native`] resolves to one of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Layout {
    /// i386: `id` at offset 4.
    X86_32,
    /// x86_64 and Arm: `id` at offset 8.
    X86_64,
}

impl Abi {
    /// The ABI for the frontend's `protocol` node, as Linux's `connect_ring` chooses it.
    ///
    /// Absent (`None`) means `BLKIF_PROTOCOL_DEFAULT` from `xen-blkback/common.h`: x86_32 when
    /// the backend is built for x86 (`CONFIG_X86` covers i386 and x86_64, for the sake of old
    /// 32-bit PV guests that never wrote the node), native elsewhere. The native protocol
    /// string is compared first, so `x86_64-abi` on an x86_64 backend is [`Abi::Native`].
    ///
    /// # Errors
    /// [`UnknownProtocol`] for any other string. Strings are compared exactly: Linux reads
    /// the node with `%63s`, which would also accept leading whitespace or anything after a
    /// space; such a value is refused here.
    pub fn from_protocol(protocol: Option<&str>) -> Result<Abi, UnknownProtocol> {
        match protocol {
            None if cfg!(any(target_arch = "x86", target_arch = "x86_64")) => Ok(Abi::X86_32),
            None => Ok(Abi::Native),
            Some(p) if p == PROTOCOL_NATIVE => Ok(Abi::Native),
            Some(PROTOCOL_X86_32) => Ok(Abi::X86_32),
            Some(PROTOCOL_X86_64) => Ok(Abi::X86_64),
            Some(other) => Err(UnknownProtocol(other.to_owned())),
        }
    }

    /// The protocol string a frontend writes to choose this ABI.
    pub fn protocol(self) -> &'static str {
        match self {
            Abi::Native => PROTOCOL_NATIVE,
            Abi::X86_32 => PROTOCOL_X86_32,
            Abi::X86_64 => PROTOCOL_X86_64,
        }
    }

    /// The byte layout this ABI uses.
    pub fn layout(self) -> Layout {
        match self {
            Abi::Native if cfg!(target_arch = "x86") => Layout::X86_32,
            Abi::Native => Layout::X86_64,
            Abi::X86_32 => Layout::X86_32,
            Abi::X86_64 => Layout::X86_64,
        }
    }

    /// Size of one request (`sizeof(struct blkif_request)`), which is also the ring's slot
    /// stride: the slot union is as large as its larger member, the request.
    pub fn request_size(self) -> usize {
        match self.layout() {
            Layout::X86_32 => size_of::<X86_32Request>(),
            Layout::X86_64 => size_of::<X86_64Request>(),
        }
    }

    /// Size of one response (`sizeof(struct blkif_response)`).
    pub fn response_size(self) -> usize {
        match self.layout() {
            Layout::X86_32 => size_of::<X86_32Response>(),
            Layout::X86_64 => size_of::<X86_64Response>(),
        }
    }

    /// Slot stride in the shared ring (`sizeof(union *_sring_entry)`).
    pub fn slot_size(self) -> usize {
        self.request_size().max(self.response_size())
    }
}

/// The largest request of any layout, the size of a private slot copy.
pub const MAX_REQUEST_SIZE: usize = size_of::<X86_64Request>();

/// `struct blkif_request_segment`: one 4 KiB page of a transfer, sectors `first_sect..=last_sect`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct RawSegment {
    /// Grant reference of the page.
    pub gref: U32,
    /// First 512-byte sector of the page used.
    pub first_sect: u8,
    /// Last 512-byte sector of the page used (inclusive).
    pub last_sect: u8,
    /// Tail padding of the C struct (4-byte alignment).
    pub _pad: [u8; 2],
}

/// `struct blkif_request` for read, write, barrier and flush, x86_64 layout.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct X86_64Request {
    /// `BLKIF_OP_*`.
    pub operation: u8,
    /// Number of segments used in `seg`.
    pub nr_segments: u8,
    /// Virtual device handle (unused by the backend).
    pub handle: U16,
    /// Alignment padding before `id`.
    pub _pad1: [u8; 4],
    /// Frontend's request id, echoed in the response.
    pub id: U64,
    /// Start sector (512-byte units).
    pub sector_number: U64,
    /// `BLKIF_MAX_SEGMENTS_PER_REQUEST` segments.
    pub seg: [RawSegment; 11],
}

/// `struct blkif_request_discard`, x86_64 layout.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct X86_64Discard {
    /// `BLKIF_OP_DISCARD`.
    pub operation: u8,
    /// `BLKIF_DISCARD_SECURE` or 0.
    pub flag: u8,
    /// Was `handle` for read/write requests.
    pub handle: U16,
    /// Alignment padding before `id`.
    pub _pad1: [u8; 4],
    /// Frontend's request id.
    pub id: U64,
    /// First sector to discard.
    pub sector_number: U64,
    /// Number of sectors to discard.
    pub nr_sectors: U64,
}

/// `struct blkif_request_indirect`, x86_64 layout.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct X86_64Indirect {
    /// `BLKIF_OP_INDIRECT`.
    pub operation: u8,
    /// The real operation: must be `BLKIF_OP_READ` or `BLKIF_OP_WRITE`.
    pub indirect_op: u8,
    /// Number of segments, held in the indirect pages.
    pub nr_segments: U16,
    /// Alignment padding before `id`.
    pub _pad1: [u8; 4],
    /// Frontend's request id.
    pub id: U64,
    /// Start sector.
    pub sector_number: U64,
    /// Virtual device handle.
    pub handle: U16,
    /// Padding.
    pub _pad2: [u8; 2],
    /// `BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST` grant references of segment pages.
    pub indirect_grefs: [U32; 8],
    /// Padding to 64 bytes.
    pub _pad3: [u8; 4],
}

/// `struct blkif_response`, x86_64 layout.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct X86_64Response {
    /// Copied from the request.
    pub id: U64,
    /// Copied from the request.
    pub operation: u8,
    /// Padding the backend never writes (XSA-216).
    pub _pad1: u8,
    /// `BLKIF_RSP_*`.
    pub status: I16,
    /// Tail padding the backend never writes (XSA-216).
    pub _pad2: [u8; 4],
}

/// `struct blkif_x86_32_request` for read, write, barrier and flush.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct X86_32Request {
    /// `BLKIF_OP_*`.
    pub operation: u8,
    /// Number of segments used in `seg`.
    pub nr_segments: u8,
    /// Virtual device handle.
    pub handle: U16,
    /// Frontend's request id.
    pub id: U64,
    /// Start sector.
    pub sector_number: U64,
    /// `BLKIF_MAX_SEGMENTS_PER_REQUEST` segments.
    pub seg: [RawSegment; 11],
}

/// `struct blkif_x86_32_request_discard`.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct X86_32Discard {
    /// `BLKIF_OP_DISCARD`.
    pub operation: u8,
    /// `BLKIF_DISCARD_SECURE` or 0.
    pub flag: u8,
    /// Was `handle`.
    pub handle: U16,
    /// Frontend's request id.
    pub id: U64,
    /// First sector to discard.
    pub sector_number: U64,
    /// Number of sectors to discard.
    pub nr_sectors: U64,
}

/// `struct blkif_x86_32_request_indirect`.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct X86_32Indirect {
    /// `BLKIF_OP_INDIRECT`.
    pub operation: u8,
    /// The real operation.
    pub indirect_op: u8,
    /// Number of segments.
    pub nr_segments: U16,
    /// Frontend's request id.
    pub id: U64,
    /// Start sector.
    pub sector_number: U64,
    /// Virtual device handle.
    pub handle: U16,
    /// Padding.
    pub _pad1: [u8; 2],
    /// Grant references of segment pages.
    pub indirect_grefs: [U32; 8],
    /// Padding to 64 bytes.
    pub _pad2: [u8; 8],
}

/// `struct blkif_x86_32_response`.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct X86_32Response {
    /// Copied from the request.
    pub id: U64,
    /// Copied from the request.
    pub operation: u8,
    /// Padding the backend never writes (XSA-216).
    pub _pad1: u8,
    /// `BLKIF_RSP_*`.
    pub status: I16,
}

/// Offsets of the response fields, the same in both layouts; only these bytes are written.
pub(crate) const RESPONSE_ID_OFFSET: usize = std::mem::offset_of!(X86_64Response, id);
pub(crate) const RESPONSE_OPERATION_OFFSET: usize = std::mem::offset_of!(X86_64Response, operation);
pub(crate) const RESPONSE_STATUS_OFFSET: usize = std::mem::offset_of!(X86_64Response, status);

// Compile-time checks against Xen's public io/blkif.h (sizes and offsets as the C compiler
// lays them out for x86_64, and for i386 in the x86_32 structs).
macro_rules! assert_layout {
    ($t:ty, $size:expr, $($field:ident @ $off:expr),* $(,)?) => {
        const _: () = assert!(size_of::<$t>() == $size);
        $(const _: () = assert!(std::mem::offset_of!($t, $field) == $off);)*
    };
}
assert_layout!(RawSegment, 8, gref @ 0, first_sect @ 4, last_sect @ 5);
assert_layout!(X86_64Request, 112, operation @ 0, nr_segments @ 1, handle @ 2, id @ 8,
    sector_number @ 16, seg @ 24);
assert_layout!(X86_64Discard, 32, operation @ 0, flag @ 1, handle @ 2, id @ 8,
    sector_number @ 16, nr_sectors @ 24);
assert_layout!(X86_64Indirect, 64, operation @ 0, indirect_op @ 1, nr_segments @ 2, id @ 8,
    sector_number @ 16, handle @ 24, indirect_grefs @ 28);
assert_layout!(X86_64Response, 16, id @ 0, operation @ 8, status @ 10);
assert_layout!(X86_32Request, 108, operation @ 0, nr_segments @ 1, handle @ 2, id @ 4,
    sector_number @ 12, seg @ 20);
assert_layout!(X86_32Discard, 28, operation @ 0, flag @ 1, handle @ 2, id @ 4,
    sector_number @ 12, nr_sectors @ 20);
assert_layout!(X86_32Indirect, 64, operation @ 0, indirect_op @ 1, nr_segments @ 2, id @ 4,
    sector_number @ 12, handle @ 20, indirect_grefs @ 24);
assert_layout!(X86_32Response, 12, id @ 0, operation @ 8, status @ 10);
const _: () = assert!(RESPONSE_ID_OFFSET == std::mem::offset_of!(X86_32Response, id));
const _: () = assert!(RESPONSE_OPERATION_OFFSET == std::mem::offset_of!(X86_32Response, operation));
const _: () = assert!(RESPONSE_STATUS_OFFSET == std::mem::offset_of!(X86_32Response, status));

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_strings_choose_the_abi_like_linux() {
        assert_eq!(Abi::from_protocol(Some("x86_32-abi")), Ok(Abi::X86_32));
        // On x86_64 the native string matches first.
        #[cfg(target_arch = "x86_64")]
        {
            assert_eq!(Abi::from_protocol(Some("x86_64-abi")), Ok(Abi::Native));
            assert_eq!(Abi::from_protocol(None), Ok(Abi::X86_32));
            assert!(Abi::from_protocol(Some("arm-abi")).is_err());
        }
        assert_eq!(
            Abi::from_protocol(Some("x86_64-abi ")),
            Err(UnknownProtocol("x86_64-abi ".into()))
        );
        assert!(Abi::from_protocol(Some("")).is_err());
        for abi in [Abi::Native, Abi::X86_32, Abi::X86_64] {
            assert_eq!(
                Abi::from_protocol(Some(abi.protocol())).map(Abi::layout),
                Ok(abi.layout())
            );
        }
    }

    #[test]
    fn sizes_per_abi() {
        assert_eq!(Abi::X86_32.request_size(), 108);
        assert_eq!(Abi::X86_32.response_size(), 12);
        assert_eq!(Abi::X86_64.request_size(), 112);
        assert_eq!(Abi::X86_64.response_size(), 16);
        #[cfg(target_arch = "x86_64")]
        assert_eq!(Abi::Native.slot_size(), 112);
    }
}
