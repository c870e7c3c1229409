//! Judging the private copy of a request: the rules and their order are Linux blkback's
//! (`__do_block_io_op`, `dispatch_rw_block_io`, `xen_blkbk_parse_indirect`,
//! `xen_vbd_translate`, `dispatch_discard_io`), with RFC patch 6/7 applied (`last_sect` and
//! `first_sect` are checked before a length is computed from them) and one addition: the
//! in-page offset must be aligned to the logical block size too, which Linux skips but
//! `O_DIRECT` needs.
//!
//! Order for read, write, barrier, flush and indirect:
//! 1. an indirect request's inner operation must be READ or WRITE;
//! 2. segment count: 0 only for flush and barrier, at most 11 direct, at most the advertised
//!    maximum indirect (and never more indirect pages than the request can name);
//! 3. each segment: `last_sect <= 7` and `first_sect <= last_sect` (for an indirect request
//!    this happens in [`parse_indirect`], on the private copies of the indirect pages);
//! 4. anything but a read on a read-only device;
//! 5. when there is data: `sector + nr_sectors` must not wrap and must not pass the device end;
//! 6. alignment to the logical block size, segment by segment: the start sector, the
//!    segment's in-page offset, its length (Linux tests sector and length together and skips
//!    the offset; the offset goes before the length so that each of the three can be told
//!    apart on a 4096-byte-sector device, where a misaligned offset implies a misaligned
//!    length).
//!
//! Discard: read-only, range (wrap, end), support (`EOPNOTSUPP`), then alignment of sector
//! and count (which Linux's `blkdev_issue_discard` refuses with `-EINVAL`).
//! Unknown operations (4, 7..=255) earn `BLKIF_RSP_EOPNOTSUPP` (`dispatch_other_io`); every
//! other rejection earns `BLKIF_RSP_ERROR`.

use crate::raw::{Fields, RawRequest};
use crate::request::{
    FlushKind, Op, Request, Response, Sector, Segment, Segments, Status, Transfer, DISCARD_SECURE,
    MAX_INDIRECT_PAGES, MAX_INDIRECT_SEGMENTS, MAX_SEGMENTS_PER_REQUEST, OP_DISCARD,
    OP_FLUSH_DISKCACHE, OP_READ, OP_WRITE, OP_WRITE_BARRIER, SECTORS_PER_PAGE,
    SEGS_PER_INDIRECT_FRAME,
};

use shmem::{OutOfBounds, SharedMem, PAGE_SIZE};

/// What validation needs to know about the device and the negotiated features.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceLimits {
    /// Device size in 512-byte sectors (the `sectors` node), read live for every request.
    pub sectors: u64,
    /// Logical block size in bytes (`sector-size`): 512 or 4096 usually. Requests must be
    /// aligned to it; values below 512 count as 512.
    pub logical_block_size: u32,
    /// The vbd is read-only (`mode` = `r`): everything but reads is refused.
    pub read_only: bool,
    /// `feature-max-indirect-segments` as advertised; 0 when indirect requests are not
    /// offered. Values above [`MAX_INDIRECT_SEGMENTS`] count as that.
    pub max_indirect_segments: u16,
    /// The device supports discard (`feature-discard`).
    pub discard: bool,
    /// The device supports secure erase (`discard-secure`).
    pub secure_discard: bool,
}

impl DeviceLimits {
    /// Sectors per logical block, at least 1.
    fn block_sectors(&self) -> u64 {
        u64::from(self.logical_block_size / 512).max(1)
    }

    /// The indirect segment limit in force.
    fn indirect_limit(&self) -> usize {
        usize::from(self.max_indirect_segments).min(MAX_INDIRECT_SEGMENTS)
    }
}

/// Which quantity was not a multiple of the logical block size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Misalignment {
    /// The start sector.
    Sector,
    /// A segment's length (or a discard's sector count).
    Length,
    /// A segment's offset in its page.
    Offset,
}

/// Why a request is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RejectReason {
    /// An operation code the protocol does not define (or reserves).
    #[error("unknown operation {0}")]
    UnknownOperation(u8),
    /// An indirect request wrapping anything but READ or WRITE.
    #[error("invalid indirect operation {0}")]
    IndirectOperation(u8),
    /// Zero segments for a data operation, or more than allowed.
    #[error("bad number of segments {nr_segments} (at most {max})")]
    SegmentCount {
        /// Segment count in the request.
        nr_segments: u16,
        /// The most allowed for this kind of request.
        max: u16,
    },
    /// More indirect pages needed than a request can name, or than the caller supplied.
    #[error("indirect request needs {needed} pages, {available} available")]
    IndirectPages {
        /// `DIV_ROUND_UP(nr_segments, 512)`.
        needed: usize,
        /// Pages the request can name (8) or the caller supplied, whichever was short.
        available: usize,
    },
    /// A segment with `last_sect > 7` or `first_sect > last_sect`.
    #[error("segment {index}: sectors {first_sect}..={last_sect} not within one page")]
    Segment {
        /// Position of the segment in the request.
        index: u16,
        /// Its `first_sect`.
        first_sect: u8,
        /// Its `last_sect`.
        last_sect: u8,
    },
    /// A write, flush, barrier or discard on a read-only device.
    #[error("write access to a read-only device")]
    ReadOnly,
    /// `sector + nr_sectors` wraps past `u64::MAX`.
    #[error("sector range {sector}+{nr_sectors} wraps")]
    Wraps {
        /// Start sector.
        sector: u64,
        /// Sector count.
        nr_sectors: u64,
    },
    /// The range ends past the device.
    #[error("sector range {sector}+{nr_sectors} beyond device end {device_sectors}")]
    BeyondEnd {
        /// Start sector.
        sector: u64,
        /// Sector count.
        nr_sectors: u64,
        /// Device size in sectors.
        device_sectors: u64,
    },
    /// Not aligned to the logical block size.
    #[error("misaligned {what:?} for logical block size {logical_block_size}")]
    Misaligned {
        /// What was misaligned.
        what: Misalignment,
        /// The device's logical block size.
        logical_block_size: u32,
    },
    /// Discard on a device without discard support (and no secure erase asked and offered).
    #[error("discard not supported")]
    DiscardNotSupported,
}

impl RejectReason {
    /// The response status this rejection earns. Exhaustive, so a new reason must be mapped.
    pub fn status(&self) -> Status {
        match self {
            RejectReason::UnknownOperation(_) | RejectReason::DiscardNotSupported => {
                Status::NotSupported
            }
            RejectReason::IndirectOperation(_)
            | RejectReason::SegmentCount { .. }
            | RejectReason::IndirectPages { .. }
            | RejectReason::Segment { .. }
            | RejectReason::ReadOnly
            | RejectReason::Wraps { .. }
            | RejectReason::BeyondEnd { .. }
            | RejectReason::Misaligned { .. } => Status::Error,
        }
    }
}

/// A refused request: the response it earns, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("request {id:#x} (operation {operation}) rejected: {reason}")]
pub struct Rejection {
    /// The request's id.
    pub id: u64,
    /// The operation code for the response (an indirect request's `indirect_op`).
    pub operation: u8,
    /// `BLKIF_RSP_ERROR` or `BLKIF_RSP_EOPNOTSUPP`.
    pub status: Status,
    /// Why.
    pub reason: RejectReason,
}

impl Rejection {
    fn new(id: u64, operation: u8, reason: RejectReason) -> Self {
        Self {
            id,
            operation,
            status: reason.status(),
            reason,
        }
    }

    /// The response to write for it.
    pub fn response(&self) -> Response {
        Response {
            id: self.id,
            operation: self.operation,
            status: self.status,
        }
    }
}

/// The outcome of [`parse`] for a request that passed the checks possible on the slot alone.
#[derive(Debug, Clone, PartialEq, Eq)]
// `Ready` is the common case and boxing it would allocate per request.
#[allow(clippy::large_enum_variant)]
pub enum Parsed {
    /// Fully validated.
    Ready(Request),
    /// An indirect request: copy [`IndirectHeader::page_grefs`] once into private
    /// [`IndirectPage`]s, then call [`parse_indirect`].
    Indirect(IndirectHeader),
}

/// The validated header of an indirect request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndirectHeader {
    /// The request's id.
    pub id: u64,
    /// `BLKIF_OP_READ` or `BLKIF_OP_WRITE`.
    pub operation: u8,
    /// Start sector.
    pub sector: Sector,
    /// Number of segments, 1 to the advertised maximum.
    pub nr_segments: u16,
    grefs: [u32; MAX_INDIRECT_PAGES],
}

impl IndirectHeader {
    /// Number of indirect pages holding the segments, `DIV_ROUND_UP(nr_segments, 512)`.
    pub fn pages(&self) -> usize {
        indirect_pages(self.nr_segments)
    }

    /// The response to this request with `status` (when its pages cannot be reached).
    pub fn response(&self, status: Status) -> Response {
        Response {
            id: self.id,
            operation: self.operation,
            status,
        }
    }

    /// Grant references of the indirect pages (to be mapped or copied read-only).
    pub fn page_grefs(&self) -> &[u32] {
        self.grefs.get(..self.pages()).unwrap_or(&self.grefs)
    }
}

fn indirect_pages(nr_segments: u16) -> usize {
    usize::from(nr_segments).div_ceil(SEGS_PER_INDIRECT_FRAME)
}

/// A private copy of one indirect page: 512 segments, read once from the frontend's page.
#[derive(Clone, PartialEq, Eq)]
pub struct IndirectPage(Box<[u8; PAGE_SIZE]>);

impl IndirectPage {
    /// A zeroed page (allocate once, reuse with [`IndirectPage::read_from`]).
    pub fn new() -> Self {
        Self(Box::new([0; PAGE_SIZE]))
    }

    /// A page with these contents.
    pub fn from_bytes(bytes: [u8; PAGE_SIZE]) -> Self {
        Self(Box::new(bytes))
    }

    /// Copies the first page of `mem` once, with volatile reads, into this private page.
    ///
    /// # Errors
    /// [`OutOfBounds`] if `mem` is shorter than a page.
    pub fn read_from(&mut self, mem: &SharedMem<'_>) -> Result<(), OutOfBounds> {
        mem.read_into(0, &mut self.0[..])
    }

    /// The page's bytes.
    pub fn as_bytes(&self) -> &[u8; PAGE_SIZE] {
        &self.0
    }

    /// The page's bytes, for filling the private copy in place (a grant copy's destination),
    /// so that pages can be reused without allocating per request.
    pub fn as_bytes_mut(&mut self) -> &mut [u8; PAGE_SIZE] {
        &mut self.0
    }

    /// Segment `i` (below 512) of the page.
    fn segment(&self, i: usize) -> (u32, u8, u8) {
        let b = self.0.get(i * 8..i * 8 + 8).unwrap_or(&[0; 8]);
        (u32::from_le_bytes([b[0], b[1], b[2], b[3]]), b[4], b[5])
    }
}

impl Default for IndirectPage {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for IndirectPage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IndirectPage").finish_non_exhaustive()
    }
}

/// Judges the private copy of a request slot.
///
/// # Errors
/// A [`Rejection`] naming the response status it earns and why.
pub fn parse(raw: &RawRequest, limits: &DeviceLimits) -> Result<Parsed, Rejection> {
    match raw.decode() {
        Fields::Rw {
            operation,
            nr_segments,
            id,
            sector,
            seg,
        } => {
            let reject = |reason| Rejection::new(id, operation, reason);
            let flush = match operation {
                OP_READ | OP_WRITE => None,
                OP_WRITE_BARRIER => Some(FlushKind::Barrier),
                OP_FLUSH_DISKCACHE => Some(FlushKind::Cache),
                other => return Err(reject(RejectReason::UnknownOperation(other))),
            };
            let n = usize::from(nr_segments);
            if (n == 0 && flush.is_none()) || n > MAX_SEGMENTS_PER_REQUEST {
                return Err(reject(RejectReason::SegmentCount {
                    nr_segments: nr_segments.into(),
                    max: MAX_SEGMENTS_PER_REQUEST as u16,
                }));
            }
            let mut segs = Segments::new();
            for (index, s) in seg.iter().take(n).enumerate() {
                let s = check_segment(index, s.gref.get(), s.first_sect, s.last_sect)
                    .map_err(reject)?;
                segs.push(s);
            }
            finish_rw(id, operation, flush, Sector(sector), segs, limits).map(Parsed::Ready)
        }
        Fields::Indirect {
            indirect_op,
            nr_segments,
            id,
            sector,
            grefs,
        } => {
            let reject = |reason| Rejection::new(id, indirect_op, reason);
            if indirect_op != OP_READ && indirect_op != OP_WRITE {
                return Err(reject(RejectReason::IndirectOperation(indirect_op)));
            }
            check_indirect_count(nr_segments, limits).map_err(reject)?;
            Ok(Parsed::Indirect(IndirectHeader {
                id,
                operation: indirect_op,
                sector: Sector(sector),
                nr_segments,
                grefs,
            }))
        }
        Fields::Discard {
            flag,
            id,
            sector,
            nr_sectors,
        } => parse_discard(id, flag, sector, nr_sectors, limits).map(Parsed::Ready),
    }
}

/// Finishes an indirect request from private copies of its indirect pages, in the order of
/// [`IndirectHeader::page_grefs`].
///
/// # Errors
/// A [`Rejection`] (`BLKIF_RSP_ERROR`): too few pages supplied, a bad segment, or a bad range
/// or alignment.
pub fn parse_indirect(
    header: &IndirectHeader,
    pages: &[IndirectPage],
    limits: &DeviceLimits,
) -> Result<Request, Rejection> {
    let reject = |reason| Rejection::new(header.id, header.operation, reason);
    // Again, because the header's fields are public and could have been changed since.
    check_indirect_count(header.nr_segments, limits).map_err(reject)?;
    if pages.len() < header.pages() {
        return Err(reject(RejectReason::IndirectPages {
            needed: header.pages(),
            available: pages.len(),
        }));
    }
    let mut segs = Segments::with_capacity(usize::from(header.nr_segments));
    for index in 0..usize::from(header.nr_segments) {
        let page = pages.get(index / SEGS_PER_INDIRECT_FRAME);
        let (gref, first, last) = page
            .map(|p| p.segment(index % SEGS_PER_INDIRECT_FRAME))
            .unwrap_or_default();
        let s = check_segment(index, gref, first, last).map_err(reject)?;
        segs.push(s);
    }
    finish_rw(
        header.id,
        header.operation,
        None,
        header.sector,
        segs,
        limits,
    )
}

/// Step 2 for an indirect request: 1 to the advertised maximum segments, in at most
/// [`MAX_INDIRECT_PAGES`] pages.
fn check_indirect_count(nr_segments: u16, limits: &DeviceLimits) -> Result<(), RejectReason> {
    let max = limits.indirect_limit();
    if nr_segments == 0 || usize::from(nr_segments) > max {
        return Err(RejectReason::SegmentCount {
            nr_segments,
            max: max as u16,
        });
    }
    let needed = indirect_pages(nr_segments);
    if needed > MAX_INDIRECT_PAGES {
        return Err(RejectReason::IndirectPages {
            needed,
            available: MAX_INDIRECT_PAGES,
        });
    }
    Ok(())
}

/// Step 6 for one quantity in sectors.
fn check_aligned(
    sectors: u64,
    what: Misalignment,
    limits: &DeviceLimits,
) -> Result<(), RejectReason> {
    let bs = limits.block_sectors();
    // Block sizes are powers of two in practice: a mask instead of a division per segment.
    let rem = if bs.is_power_of_two() {
        sectors & (bs - 1)
    } else {
        sectors % bs
    };
    if rem != 0 {
        return Err(RejectReason::Misaligned {
            what,
            logical_block_size: limits.logical_block_size,
        });
    }
    Ok(())
}

fn check_segment(index: usize, gref: u32, first: u8, last: u8) -> Result<Segment, RejectReason> {
    if last >= SECTORS_PER_PAGE || last < first {
        return Err(RejectReason::Segment {
            index: index as u16,
            first_sect: first,
            last_sect: last,
        });
    }
    Ok(Segment {
        gref,
        first_sect: first,
        last_sect: last,
    })
}

/// Steps 4 to 6 for a request whose segments are known to be well-formed.
fn finish_rw(
    id: u64,
    operation: u8,
    flush: Option<FlushKind>,
    sector: Sector,
    segs: Segments,
    limits: &DeviceLimits,
) -> Result<Request, Rejection> {
    let reject = |reason| Rejection::new(id, operation, reason);
    let is_read = operation == OP_READ;
    if !is_read && limits.read_only {
        return Err(reject(RejectReason::ReadOnly));
    }
    let nr_sectors: u64 = segs.as_slice().iter().map(|s| u64::from(s.sectors())).sum();
    if nr_sectors != 0 {
        check_range(sector.0, nr_sectors, limits).map_err(reject)?;
    }
    if !segs.is_empty() {
        check_aligned(sector.0, Misalignment::Sector, limits).map_err(reject)?;
    }
    for s in segs.as_slice() {
        check_aligned(s.first_sect.into(), Misalignment::Offset, limits).map_err(reject)?;
        check_aligned(s.sectors().into(), Misalignment::Length, limits).map_err(reject)?;
    }
    let op = match (segs.is_empty(), flush) {
        (true, Some(kind)) => Op::Flush(kind),
        (_, flush) => {
            let transfer = Transfer {
                sector,
                nr_sectors,
                segs,
            };
            if is_read {
                Op::Read(transfer)
            } else {
                Op::Write { transfer, flush }
            }
        }
    };
    Ok(Request { id, operation, op })
}

fn check_range(sector: u64, nr_sectors: u64, limits: &DeviceLimits) -> Result<(), RejectReason> {
    match sector.checked_add(nr_sectors) {
        None => Err(RejectReason::Wraps { sector, nr_sectors }),
        Some(end) if end > limits.sectors => Err(RejectReason::BeyondEnd {
            sector,
            nr_sectors,
            device_sectors: limits.sectors,
        }),
        Some(_) => Ok(()),
    }
}

fn parse_discard(
    id: u64,
    flag: u8,
    sector: u64,
    nr_sectors: u64,
    limits: &DeviceLimits,
) -> Result<Request, Rejection> {
    let reject = |reason| Rejection::new(id, OP_DISCARD, reason);
    if limits.read_only {
        return Err(reject(RejectReason::ReadOnly));
    }
    if nr_sectors != 0 {
        check_range(sector, nr_sectors, limits).map_err(reject)?;
    }
    let secure = flag & DISCARD_SECURE != 0 && limits.secure_discard;
    if !secure && !limits.discard {
        return Err(reject(RejectReason::DiscardNotSupported));
    }
    check_aligned(sector, Misalignment::Sector, limits).map_err(reject)?;
    check_aligned(nr_sectors, Misalignment::Length, limits).map_err(reject)?;
    Ok(Request {
        id,
        operation: OP_DISCARD,
        op: Op::Discard {
            sector: Sector(sector),
            nr_sectors,
            secure,
        },
    })
}
