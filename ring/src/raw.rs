//! [`RawRequest`]: the private copy of one request slot, and its decoding into the fields of
//! the ABI's layout. Decoding is infallible (every byte pattern means something); judging the
//! fields is `validate`'s job.

use zerocopy::FromBytes;

use crate::abi::{
    Abi, Layout, RawSegment, X86_32Discard, X86_32Indirect, X86_32Request, X86_64Discard,
    X86_64Indirect, X86_64Request, MAX_REQUEST_SIZE,
};
use crate::request::{MAX_INDIRECT_PAGES, MAX_SEGMENTS_PER_REQUEST, OP_DISCARD, OP_INDIRECT};

/// The private copy of one request slot, read once from shared memory (or built by a
/// frontend). Nothing in it is trusted until [`crate::parse`] has judged it.
#[derive(Clone, PartialEq, Eq)]
pub struct RawRequest {
    abi: Abi,
    bytes: [u8; MAX_REQUEST_SIZE],
}

/// A byte slice of the wrong length for a request of the ABI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{len} bytes is not a {abi:?} request ({expected} bytes)")]
pub struct WrongLength {
    /// The ABI.
    pub abi: Abi,
    /// Length given.
    pub len: usize,
    /// Request size of the ABI.
    pub expected: usize,
}

impl RawRequest {
    /// An all-zero request (a direct read with no segments).
    pub(crate) fn zeroed(abi: Abi) -> Self {
        Self {
            abi,
            bytes: [0; MAX_REQUEST_SIZE],
        }
    }

    /// A request from its slot bytes (replay of a trace, fuzzing, hostile tests).
    ///
    /// # Errors
    /// [`WrongLength`] unless `bytes` is exactly [`Abi::request_size`] long.
    pub fn from_bytes(abi: Abi, bytes: &[u8]) -> Result<Self, WrongLength> {
        let mut raw = Self::zeroed(abi);
        match raw.bytes.get_mut(..abi.request_size()) {
            Some(dst) if dst.len() == bytes.len() => {
                dst.copy_from_slice(bytes);
                Ok(raw)
            }
            _ => Err(WrongLength {
                abi,
                len: bytes.len(),
                expected: abi.request_size(),
            }),
        }
    }

    /// The ABI whose layout the bytes follow.
    pub fn abi(&self) -> Abi {
        self.abi
    }

    /// The slot bytes exactly as copied ([`Abi::request_size`] of them).
    pub fn as_bytes(&self) -> &[u8] {
        self.bytes
            .get(..self.abi.request_size())
            .unwrap_or(&self.bytes)
    }

    /// The buffer the ring copies a slot into.
    pub(crate) fn bytes_mut(&mut self) -> &mut [u8] {
        let n = self.abi.request_size();
        self.bytes.get_mut(..n).unwrap_or(&mut [])
    }

    /// The whole private buffer, for encoding (bytes past the ABI's request size are ignored).
    pub(crate) fn slot_mut(&mut self) -> &mut [u8; MAX_REQUEST_SIZE] {
        &mut self.bytes
    }

    /// The `operation` byte.
    pub fn operation(&self) -> u8 {
        self.bytes[0]
    }

    /// The request id as the layout places it (offset 8, or 4 in x86_32), whatever the
    /// operation: every request variant keeps `id` in the same place.
    pub fn id(&self) -> u64 {
        self.decode().id()
    }

    /// The fields of the copy as the operation byte says to read them.
    pub(crate) fn decode(&self) -> Fields {
        match self.abi.layout() {
            Layout::X86_64 => decode_x86_64(&self.bytes),
            Layout::X86_32 => decode_x86_32(&self.bytes),
        }
    }
}

impl std::fmt::Debug for RawRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawRequest")
            .field("abi", &self.abi)
            .field("bytes", &self.as_bytes())
            .finish()
    }
}

/// The fields of a request slot, decoded per operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fields {
    /// Read, write, barrier, flush, and (for their id) unknown operations.
    Rw {
        operation: u8,
        nr_segments: u8,
        id: u64,
        sector: u64,
        seg: [RawSegment; MAX_SEGMENTS_PER_REQUEST],
    },
    /// `BLKIF_OP_DISCARD`.
    Discard {
        flag: u8,
        id: u64,
        sector: u64,
        nr_sectors: u64,
    },
    /// `BLKIF_OP_INDIRECT`.
    Indirect {
        indirect_op: u8,
        nr_segments: u16,
        id: u64,
        sector: u64,
        grefs: [u32; MAX_INDIRECT_PAGES],
    },
}

impl Fields {
    pub(crate) fn id(&self) -> u64 {
        match *self {
            Fields::Rw { id, .. } | Fields::Discard { id, .. } | Fields::Indirect { id, .. } => id,
        }
    }
}

fn grefs(g: &[zerocopy::little_endian::U32; MAX_INDIRECT_PAGES]) -> [u32; MAX_INDIRECT_PAGES] {
    g.map(|r| r.get())
}

/// The layout struct `T` at the start of the copy. Every layout struct fits in the copy (checked
/// at compile time) and has alignment 1, so the read cannot fail; the zeroed fallback only
/// keeps the code free of panics.
fn view<T: FromBytes + zerocopy::KnownLayout + zerocopy::Immutable>(
    b: &[u8; MAX_REQUEST_SIZE],
) -> T {
    const { assert!(size_of::<T>() <= MAX_REQUEST_SIZE) };
    T::read_from_prefix(b).map_or_else(|_| T::new_zeroed(), |(t, _)| t)
}

fn decode_x86_64(b: &[u8; MAX_REQUEST_SIZE]) -> Fields {
    match b[0] {
        OP_DISCARD => {
            let d: X86_64Discard = view(b);
            Fields::Discard {
                flag: d.flag,
                id: d.id.get(),
                sector: d.sector_number.get(),
                nr_sectors: d.nr_sectors.get(),
            }
        }
        OP_INDIRECT => {
            let r: X86_64Indirect = view(b);
            Fields::Indirect {
                indirect_op: r.indirect_op,
                nr_segments: r.nr_segments.get(),
                id: r.id.get(),
                sector: r.sector_number.get(),
                grefs: grefs(&r.indirect_grefs),
            }
        }
        _ => {
            let r: X86_64Request = view(b);
            Fields::Rw {
                operation: r.operation,
                nr_segments: r.nr_segments,
                id: r.id.get(),
                sector: r.sector_number.get(),
                seg: r.seg,
            }
        }
    }
}

fn decode_x86_32(b: &[u8; MAX_REQUEST_SIZE]) -> Fields {
    match b[0] {
        OP_DISCARD => {
            let d: X86_32Discard = view(b);
            Fields::Discard {
                flag: d.flag,
                id: d.id.get(),
                sector: d.sector_number.get(),
                nr_sectors: d.nr_sectors.get(),
            }
        }
        OP_INDIRECT => {
            let r: X86_32Indirect = view(b);
            Fields::Indirect {
                indirect_op: r.indirect_op,
                nr_segments: r.nr_segments.get(),
                id: r.id.get(),
                sector: r.sector_number.get(),
                grefs: grefs(&r.indirect_grefs),
            }
        }
        _ => {
            let r: X86_32Request = view(b);
            Fields::Rw {
                operation: r.operation,
                nr_segments: r.nr_segments,
                id: r.id.get(),
                sector: r.sector_number.get(),
                seg: r.seg,
            }
        }
    }
}
