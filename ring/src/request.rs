//! The typed, validated request the backend acts on, and the response it writes back.

/// `BLKIF_OP_READ`.
pub const OP_READ: u8 = 0;
/// `BLKIF_OP_WRITE`.
pub const OP_WRITE: u8 = 1;
/// `BLKIF_OP_WRITE_BARRIER`.
pub const OP_WRITE_BARRIER: u8 = 2;
/// `BLKIF_OP_FLUSH_DISKCACHE`.
pub const OP_FLUSH_DISKCACHE: u8 = 3;
/// `BLKIF_OP_RESERVED_1` (was used by blktap; never valid here).
pub const OP_RESERVED_1: u8 = 4;
/// `BLKIF_OP_DISCARD`.
pub const OP_DISCARD: u8 = 5;
/// `BLKIF_OP_INDIRECT`.
pub const OP_INDIRECT: u8 = 6;

/// `BLKIF_DISCARD_SECURE`: the discard flag asking for a secure erase.
pub const DISCARD_SECURE: u8 = 1;

/// `BLKIF_MAX_SEGMENTS_PER_REQUEST`: segments of a direct request.
pub const MAX_SEGMENTS_PER_REQUEST: usize = 11;
/// `BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST`: grant references in an indirect request.
pub const MAX_INDIRECT_PAGES: usize = 8;
/// Segments one 4 KiB indirect page holds (`SEGS_PER_INDIRECT_FRAME`).
pub const SEGS_PER_INDIRECT_FRAME: usize = 512;
/// The most segments an indirect request may carry here, and so the capacity of
/// [`Segments`]: Linux's `MAX_INDIRECT_SEGMENTS`, which it advertises as
/// `feature-max-indirect-segments`. A [`crate::DeviceLimits`] asking for more is clamped to it.
pub const MAX_INDIRECT_SEGMENTS: usize = 256;

/// Sector size of the protocol: offsets and lengths are always in 512-byte units, whatever
/// the device's logical block size.
pub const SECTOR_SIZE: u64 = 512;
/// Sectors per 4 KiB page: `last_sect` must be below this.
pub const SECTORS_PER_PAGE: u8 = 8;

/// A 512-byte sector number or count on the virtual disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Sector(pub u64);

impl Sector {
    /// The byte offset, or `None` where it does not fit in a `u64` (a huge sector must not
    /// wrap onto a small offset, which `checked_shl` would let through).
    pub fn bytes(self) -> Option<u64> {
        self.0.checked_mul(SECTOR_SIZE)
    }
}

/// One segment of a transfer: sectors `first_sect..=last_sect` of one granted 4 KiB page.
/// Only validated segments exist: `first_sect <= last_sect < 8`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Segment {
    /// Grant reference of the frontend's page.
    pub gref: u32,
    /// First sector of the page used.
    pub first_sect: u8,
    /// Last sector of the page used (inclusive).
    pub last_sect: u8,
}

impl Segment {
    /// Number of sectors, `last_sect - first_sect + 1` (1 to 8).
    pub fn sectors(&self) -> u32 {
        u32::from(self.last_sect.saturating_sub(self.first_sect)) + 1
    }

    /// Offset of the data in the page, in bytes.
    pub fn offset_bytes(&self) -> u32 {
        u32::from(self.first_sect) * SECTOR_SIZE as u32
    }

    /// Length of the data in bytes.
    pub fn len_bytes(&self) -> u32 {
        self.sectors() * SECTOR_SIZE as u32
    }
}

/// The segments of a transfer: a direct request's (at most [`MAX_SEGMENTS_PER_REQUEST`])
/// inline, an indirect request's on the heap (one allocation for up to
/// [`MAX_INDIRECT_SEGMENTS`]), so that a request stays small to move and to keep in the
/// in-flight table: room for 256 segments inline made every request 2 KiB.
#[derive(Clone)]
pub struct Segments(Store);

#[derive(Clone)]
enum Store {
    Inline {
        len: u8,
        segs: [Segment; MAX_SEGMENTS_PER_REQUEST],
    },
    Heap(Vec<Segment>),
}

impl Segments {
    /// No segments.
    pub fn new() -> Self {
        Self(Store::Inline {
            len: 0,
            segs: [Segment::default(); MAX_SEGMENTS_PER_REQUEST],
        })
    }

    /// No segments yet, with room for `n` (at most [`MAX_INDIRECT_SEGMENTS`] are kept).
    pub fn with_capacity(n: usize) -> Self {
        if n <= MAX_SEGMENTS_PER_REQUEST {
            Self::new()
        } else {
            Self(Store::Heap(Vec::with_capacity(
                n.min(MAX_INDIRECT_SEGMENTS),
            )))
        }
    }

    /// Segments holding a copy of `segs`, or `None` if there are more than
    /// [`MAX_INDIRECT_SEGMENTS`]. Nothing about them is validated.
    pub fn from_slice(segs: &[Segment]) -> Option<Self> {
        let mut s = Self::with_capacity(segs.len());
        segs.iter().all(|&seg| s.push(seg)).then_some(s)
    }

    /// Appends `seg`; returns false (and drops it) when [`MAX_INDIRECT_SEGMENTS`] are held.
    pub(crate) fn push(&mut self, seg: Segment) -> bool {
        match &mut self.0 {
            Store::Inline { len, segs } => match segs.get_mut(usize::from(*len)) {
                Some(slot) => {
                    *slot = seg;
                    *len += 1;
                }
                None => {
                    let mut v = Vec::with_capacity(MAX_INDIRECT_SEGMENTS);
                    v.extend_from_slice(segs);
                    v.push(seg);
                    self.0 = Store::Heap(v);
                }
            },
            Store::Heap(v) if v.len() < MAX_INDIRECT_SEGMENTS => v.push(seg),
            Store::Heap(_) => return false,
        }
        true
    }

    /// The segments, in request order.
    pub fn as_slice(&self) -> &[Segment] {
        match &self.0 {
            Store::Inline { len, segs } => segs.get(..usize::from(*len)).unwrap_or(&[]),
            Store::Heap(v) => v,
        }
    }

    /// Number of segments.
    pub fn len(&self) -> usize {
        self.as_slice().len()
    }

    /// Whether there are no segments.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl PartialEq for Segments {
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl Eq for Segments {}

impl Default for Segments {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Segments {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.as_slice()).finish()
    }
}

/// A validated data transfer: `nr_sectors` sectors from `sector` on, gathered from (or
/// scattered to) `segs` in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transfer {
    /// First sector on the device.
    pub sector: Sector,
    /// Sum of the segments' sectors; `sector + nr_sectors` lies within the device.
    pub nr_sectors: u64,
    /// The pages, at least one.
    pub segs: Segments,
}

/// What a flush-type request asks for besides (or instead of) data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FlushKind {
    /// `BLKIF_OP_FLUSH_DISKCACHE`: make earlier completed writes durable before this
    /// request's data (Linux: `REQ_OP_WRITE | REQ_PREFLUSH`).
    Cache,
    /// `BLKIF_OP_WRITE_BARRIER`: the same, after first waiting for every request in flight
    /// to complete (Linux: `xen_blk_drain_io`, then `REQ_PREFLUSH`).
    Barrier,
}

/// The operation of a validated request.
///
/// Flush and barrier follow Linux's `dispatch_rw_block_io`: they are writes with a preflush.
/// With zero segments they are [`Op::Flush`]; with segments, [`Op::Write`] with `flush` set,
/// whose data is written after the flush (and validated like any write: range, read-only,
/// alignment). A read-only device refuses both, as Linux's `xen_vbd_translate` does for any
/// non-read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// `BLKIF_OP_READ`, direct or indirect.
    Read(Transfer),
    /// `BLKIF_OP_WRITE` (direct or indirect, `flush: None`), or a flush/barrier carrying data.
    Write {
        /// The data to write.
        transfer: Transfer,
        /// Flush (and for a barrier, drain) before writing.
        flush: Option<FlushKind>,
    },
    /// A flush or barrier with no data.
    Flush(FlushKind),
    /// `BLKIF_OP_DISCARD` of `nr_sectors` from `sector` on. `nr_sectors` may be 0, which Linux
    /// answers with success and no I/O.
    Discard {
        /// First sector.
        sector: Sector,
        /// Number of sectors; `sector + nr_sectors` lies within the device.
        nr_sectors: u64,
        /// Secure erase: the frontend set `BLKIF_DISCARD_SECURE` and the device supports it
        /// (`discard_secure && flag`, as Linux decides); otherwise a plain discard.
        secure: bool,
    },
}

/// A validated request, built only from the private copy of its slot (and of its indirect
/// pages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The frontend's id, echoed in the response. Hostile: it may repeat an id in flight.
    pub id: u64,
    /// The operation code the response carries: the slot's `operation`, or for an indirect
    /// request its `indirect_op` (Linux answers with `req_operation`, which blkfront accepts).
    pub operation: u8,
    /// What to do.
    pub op: Op,
}

impl Request {
    /// The response to this request with `status`.
    pub fn response(&self, status: Status) -> Response {
        Response {
            id: self.id,
            operation: self.operation,
            status,
        }
    }
}

/// The status of a response (`BLKIF_RSP_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    /// `BLKIF_RSP_OKAY` (0).
    Okay,
    /// `BLKIF_RSP_ERROR` (-1).
    Error,
    /// `BLKIF_RSP_EOPNOTSUPP` (-2).
    NotSupported,
}

impl Status {
    /// The value written in the response's `status` field.
    pub fn code(self) -> i16 {
        match self {
            Status::Okay => 0,
            Status::Error => -1,
            Status::NotSupported => -2,
        }
    }

    /// The status for a `status` field value; `None` for values the protocol does not define
    /// (`BLKIF_RSP_*` are 0, -1, -2).
    pub fn from_code(code: i16) -> Option<Status> {
        match code {
            0 => Some(Status::Okay),
            -1 => Some(Status::Error),
            -2 => Some(Status::NotSupported),
            _ => None,
        }
    }
}

/// A response as the backend writes it: only these three fields reach the ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Response {
    /// The request's id.
    pub id: u64,
    /// The request's operation code (see [`Request::operation`]).
    pub operation: u8,
    /// The outcome.
    pub status: Status,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sector_bytes_never_wrap() {
        assert_eq!(Sector(8).bytes(), Some(4096));
        let last = u64::MAX / SECTOR_SIZE;
        assert_eq!(Sector(last).bytes(), Some(last * 512));
        assert_eq!(Sector(last + 1).bytes(), None);
        // The value crosvm's checked_shl(9) would have let through as 0.
        assert_eq!(Sector(1 << 55).bytes(), None);
    }

    #[test]
    fn status_codes() {
        for s in [Status::Okay, Status::Error, Status::NotSupported] {
            assert_eq!(Status::from_code(s.code()), Some(s));
        }
        assert_eq!(
            (Status::Error.code(), Status::NotSupported.code()),
            (-1, -2)
        );
        assert_eq!(Status::from_code(-3), None);
        assert_eq!(Status::from_code(1), None);
    }

    #[test]
    fn segment_geometry() {
        let s = Segment {
            gref: 1,
            first_sect: 2,
            last_sect: 5,
        };
        assert_eq!(
            (s.sectors(), s.offset_bytes(), s.len_bytes()),
            (4, 1024, 2048)
        );
        let whole = Segment {
            gref: 1,
            first_sect: 0,
            last_sect: 7,
        };
        assert_eq!((whole.sectors(), whole.len_bytes()), (8, 4096));
    }

    #[test]
    fn segments_hold_at_most_the_indirect_maximum() {
        let many = vec![Segment::default(); MAX_INDIRECT_SEGMENTS];
        assert_eq!(
            Segments::from_slice(&many).map(|s| s.len()),
            Some(MAX_INDIRECT_SEGMENTS)
        );
        let too_many = vec![Segment::default(); MAX_INDIRECT_SEGMENTS + 1];
        assert!(Segments::from_slice(&too_many).is_none());
        assert!(Segments::new().is_empty());
    }

    #[test]
    fn segments_spill_from_inline_to_the_heap_in_order_and_compare_by_content() {
        let segs: Vec<Segment> = (0..40u32)
            .map(|gref| Segment {
                gref,
                first_sect: 0,
                last_sect: 7,
            })
            .collect();
        let mut pushed = Segments::new();
        for &s in &segs {
            assert!(pushed.push(s));
        }
        assert_eq!(pushed.as_slice(), &segs[..]);
        // Built inline then spilled, or on the heap from the start: the same segments.
        assert_eq!(Some(pushed), Segments::from_slice(&segs));
        let direct = Segments::from_slice(&segs[..MAX_SEGMENTS_PER_REQUEST]).unwrap();
        let mut spilled = Segments::with_capacity(MAX_SEGMENTS_PER_REQUEST + 1);
        for &s in &segs[..MAX_SEGMENTS_PER_REQUEST] {
            spilled.push(s);
        }
        assert_eq!(direct, spilled);
        // A request stays small to move: the inline room is a direct request's, not 2 KiB.
        assert!(std::mem::size_of::<Segments>() <= 128);
    }
}
