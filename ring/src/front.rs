//! [`FrontRing`]: the frontend's end of the shared ring, for simulated frontends, tests and
//! benches, so that both sides run the real code. It follows Xen's `io/ring.h` front-ring
//! macros and treats the backend's indices as untrusted.

use std::sync::atomic::{fence, Ordering};

use shmem::SharedMem;
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromZeros, Immutable, IntoBytes};

use crate::abi::{
    Abi, Layout, RawSegment, X86_32Discard, X86_32Indirect, X86_32Request, X86_32Response,
    X86_64Discard, X86_64Indirect, X86_64Request, MAX_REQUEST_SIZE,
};
use crate::error::{ProtocolViolation, RingError};
use crate::raw::RawRequest;
use crate::request::{
    Segment, Status, DISCARD_SECURE, MAX_INDIRECT_PAGES, MAX_SEGMENTS_PER_REQUEST, OP_DISCARD,
    OP_INDIRECT,
};
use crate::sring::{
    check_geometry, push_and_check_notify, slot_offset, REQ_EVENT, REQ_PROD, RSP_EVENT, RSP_PROD,
};

/// A request as a frontend builds it. Nothing is validated beyond what fits in a slot, so
/// hostile frontends can send any field values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrontRequest<'a> {
    /// Read, write, barrier, flush (or any other operation code) with up to 11 segments.
    Direct {
        /// `BLKIF_OP_*`.
        operation: u8,
        /// Request id.
        id: u64,
        /// Start sector.
        sector: u64,
        /// Virtual device handle.
        handle: u16,
        /// The segments; `nr_segments` is their count.
        segs: &'a [Segment],
    },
    /// `BLKIF_OP_DISCARD`.
    Discard {
        /// Request id.
        id: u64,
        /// First sector.
        sector: u64,
        /// Sector count.
        nr_sectors: u64,
        /// Ask for a secure erase.
        secure: bool,
    },
    /// `BLKIF_OP_INDIRECT`: the segments live in the pages `page_grefs` name.
    Indirect {
        /// The inner operation.
        indirect_op: u8,
        /// Request id.
        id: u64,
        /// Start sector.
        sector: u64,
        /// Virtual device handle.
        handle: u16,
        /// Number of segments.
        nr_segments: u16,
        /// Grant references of the indirect pages, up to 8.
        page_grefs: &'a [u32],
    },
}

/// A typed request that does not fit in a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// More than 11 segments in a direct request.
    #[error("{0} segments in a direct request (at most 11)")]
    TooManySegments(usize),
    /// More than 8 indirect page references.
    #[error("{0} indirect pages (at most 8)")]
    TooManyPages(usize),
}

/// Writes `v` at the start of the slot copy.
fn put<T: IntoBytes + Immutable>(dst: &mut [u8; MAX_REQUEST_SIZE], v: &T) {
    const { assert!(size_of::<T>() <= MAX_REQUEST_SIZE) };
    dst[..size_of::<T>()].copy_from_slice(v.as_bytes());
}

fn raw_segments(segs: &[Segment]) -> Result<[RawSegment; MAX_SEGMENTS_PER_REQUEST], EncodeError> {
    if segs.len() > MAX_SEGMENTS_PER_REQUEST {
        return Err(EncodeError::TooManySegments(segs.len()));
    }
    let mut out = [RawSegment::new_zeroed(); MAX_SEGMENTS_PER_REQUEST];
    for (o, s) in out.iter_mut().zip(segs) {
        o.gref = U32::new(s.gref);
        o.first_sect = s.first_sect;
        o.last_sect = s.last_sect;
    }
    Ok(out)
}

fn grefs(page_grefs: &[u32]) -> Result<[U32; MAX_INDIRECT_PAGES], EncodeError> {
    if page_grefs.len() > MAX_INDIRECT_PAGES {
        return Err(EncodeError::TooManyPages(page_grefs.len()));
    }
    let mut out = [U32::ZERO; MAX_INDIRECT_PAGES];
    for (o, g) in out.iter_mut().zip(page_grefs) {
        *o = U32::new(*g);
    }
    Ok(out)
}

impl FrontRequest<'_> {
    /// The slot bytes of this request in `abi` (padding zeroed).
    ///
    /// # Errors
    /// [`EncodeError`] if it does not fit.
    pub fn encode(&self, abi: Abi) -> Result<RawRequest, EncodeError> {
        let mut raw = RawRequest::zeroed(abi);
        let dst = raw.slot_mut();
        let layout = abi.layout();
        match *self {
            FrontRequest::Direct {
                operation,
                id,
                sector,
                handle,
                segs,
            } => {
                let seg = raw_segments(segs)?;
                let nr_segments = segs.len() as u8;
                match layout {
                    Layout::X86_64 => put(
                        dst,
                        &X86_64Request {
                            operation,
                            nr_segments,
                            handle: U16::new(handle),
                            _pad1: [0; 4],
                            id: U64::new(id),
                            sector_number: U64::new(sector),
                            seg,
                        },
                    ),
                    Layout::X86_32 => put(
                        dst,
                        &X86_32Request {
                            operation,
                            nr_segments,
                            handle: U16::new(handle),
                            id: U64::new(id),
                            sector_number: U64::new(sector),
                            seg,
                        },
                    ),
                }
            }
            FrontRequest::Discard {
                id,
                sector,
                nr_sectors,
                secure,
            } => {
                let flag = if secure { DISCARD_SECURE } else { 0 };
                match layout {
                    Layout::X86_64 => put(
                        dst,
                        &X86_64Discard {
                            operation: OP_DISCARD,
                            flag,
                            handle: U16::ZERO,
                            _pad1: [0; 4],
                            id: U64::new(id),
                            sector_number: U64::new(sector),
                            nr_sectors: U64::new(nr_sectors),
                        },
                    ),
                    Layout::X86_32 => put(
                        dst,
                        &X86_32Discard {
                            operation: OP_DISCARD,
                            flag,
                            handle: U16::ZERO,
                            id: U64::new(id),
                            sector_number: U64::new(sector),
                            nr_sectors: U64::new(nr_sectors),
                        },
                    ),
                }
            }
            FrontRequest::Indirect {
                indirect_op,
                id,
                sector,
                handle,
                nr_segments,
                page_grefs,
            } => {
                let indirect_grefs = grefs(page_grefs)?;
                match layout {
                    Layout::X86_64 => put(
                        dst,
                        &X86_64Indirect {
                            operation: OP_INDIRECT,
                            indirect_op,
                            nr_segments: U16::new(nr_segments),
                            _pad1: [0; 4],
                            id: U64::new(id),
                            sector_number: U64::new(sector),
                            handle: U16::new(handle),
                            _pad2: [0; 2],
                            indirect_grefs,
                            _pad3: [0; 4],
                        },
                    ),
                    Layout::X86_32 => put(
                        dst,
                        &X86_32Indirect {
                            operation: OP_INDIRECT,
                            indirect_op,
                            nr_segments: U16::new(nr_segments),
                            id: U64::new(id),
                            sector_number: U64::new(sector),
                            handle: U16::new(handle),
                            _pad1: [0; 2],
                            indirect_grefs,
                            _pad2: [0; 8],
                        },
                    ),
                }
            }
        }
        Ok(raw)
    }
}

/// A response as the frontend reads it: the status is whatever the backend wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RawResponse {
    /// The request id echoed.
    pub id: u64,
    /// The operation echoed.
    pub operation: u8,
    /// The `status` field.
    pub status: i16,
}

impl RawResponse {
    /// The status, if it is one the protocol defines.
    pub fn status(&self) -> Option<Status> {
        Status::from_code(self.status)
    }
}

/// The frontend's view of a shared ring (`struct *_front_ring`).
#[derive(Debug, Clone)]
pub struct FrontRing {
    abi: Abi,
    size: u32,
    req_prod_pvt: u32,
    req_prod_pushed: u32,
    rsp_cons: u32,
    rsp_prod_seen: u32,
    broken: Option<ProtocolViolation>,
}

impl FrontRing {
    /// Initialises a ring of `pages` pages in `mem` (`SHARED_RING_INIT` and
    /// `FRONT_RING_INIT`): zeroes it, indices at 0, events at 1.
    ///
    /// # Errors
    /// [`RingError::Pages`] or [`RingError::Memory`] for a bad geometry.
    pub fn init(mem: &SharedMem<'_>, abi: Abi, pages: usize) -> Result<FrontRing, RingError> {
        Self::init_at(mem, abi, pages, 0)
    }

    /// As [`FrontRing::init`], with every index starting at `start` instead of 0: a frontend
    /// may hand over a ring at any index, and tests use this to cross the 2^32 wrap.
    ///
    /// # Errors
    /// As [`FrontRing::init`].
    pub fn init_at(
        mem: &SharedMem<'_>,
        abi: Abi,
        pages: usize,
        start: u32,
    ) -> Result<FrontRing, RingError> {
        let size = check_geometry(mem, abi, pages)?;
        mem.fill(0, pages * shmem::PAGE_SIZE, 0)?;
        mem.store_u32(REQ_PROD, start, Ordering::Relaxed)?;
        mem.store_u32(RSP_PROD, start, Ordering::Relaxed)?;
        mem.store_u32(REQ_EVENT, start.wrapping_add(1), Ordering::Relaxed)?;
        mem.store_u32(RSP_EVENT, start.wrapping_add(1), Ordering::Relaxed)?;
        // No ring.h macro has a barrier here (Linux relies on the grant and XenStore writes
        // that publish the ring); a release fence makes the initialised header visible before
        // anything this thread does next, such as handing the ring to a backend thread.
        fence(Ordering::Release);
        Ok(FrontRing {
            abi,
            size,
            req_prod_pvt: start,
            req_prod_pushed: start,
            rsp_cons: start,
            rsp_prod_seen: start,
            broken: None,
        })
    }

    /// The ABI of the slots.
    pub fn abi(&self) -> Abi {
        self.abi
    }

    /// Number of slots.
    pub fn size(&self) -> u32 {
        self.size
    }

    /// `RING_FREE_REQUESTS`: slots free for new requests.
    pub fn free_slots(&self) -> u32 {
        self.size
            .saturating_sub(self.req_prod_pvt.wrapping_sub(self.rsp_cons))
    }

    /// Requests pushed or queued whose response has not been collected.
    pub fn outstanding(&self) -> u32 {
        self.req_prod_pvt.wrapping_sub(self.rsp_cons)
    }

    /// Queues a typed request (visible after [`FrontRing::push_requests`]).
    ///
    /// # Errors
    /// [`RingError::Full`], [`RingError::Encode`], [`RingError::Memory`].
    pub fn queue_request(
        &mut self,
        mem: &SharedMem<'_>,
        req: &FrontRequest<'_>,
    ) -> Result<(), RingError> {
        let raw = req.encode(self.abi)?;
        self.queue_raw(mem, raw.as_bytes())
    }

    /// Queues arbitrary slot bytes (hostile tests, trace replay).
    ///
    /// # Errors
    /// [`RingError::WrongLength`] unless `bytes` is one request long; [`RingError::Full`];
    /// [`RingError::Memory`].
    pub fn queue_raw(&mut self, mem: &SharedMem<'_>, bytes: &[u8]) -> Result<(), RingError> {
        RawRequest::from_bytes(self.abi, bytes)?;
        if self.free_slots() == 0 {
            return Err(RingError::Full);
        }
        mem.write_from(slot_offset(self.abi, self.size, self.req_prod_pvt), bytes)?;
        self.req_prod_pvt = self.req_prod_pvt.wrapping_add(1);
        Ok(())
    }

    /// Overwrites the slot of the request queued `back` requests ago (0 = the latest), even
    /// after it was pushed: a hostile frontend rewriting a slot the backend may be reading.
    ///
    /// # Errors
    /// [`RingError::WrongLength`]; [`RingError::Memory`].
    pub fn rewrite_raw(
        &self,
        mem: &SharedMem<'_>,
        back: u32,
        bytes: &[u8],
    ) -> Result<(), RingError> {
        RawRequest::from_bytes(self.abi, bytes)?;
        let idx = self.req_prod_pvt.wrapping_sub(1).wrapping_sub(back);
        mem.write_from(slot_offset(self.abi, self.size, idx), bytes)?;
        Ok(())
    }

    /// `RING_PUSH_REQUESTS_AND_CHECK_NOTIFY`: publishes queued requests; `true` when the
    /// backend asked for an event (`req_event`) among them.
    ///
    /// # Errors
    /// [`RingError::Memory`].
    pub fn push_requests(&mut self, mem: &SharedMem<'_>) -> Result<bool, RingError> {
        let (old, new) = (self.req_prod_pushed, self.req_prod_pvt);
        let notify = push_and_check_notify(mem, REQ_PROD, REQ_EVENT, old, new)?;
        self.req_prod_pushed = new;
        Ok(notify)
    }

    fn refresh(&mut self, mem: &SharedMem<'_>) -> Result<(), RingError> {
        if let Some(v) = self.broken {
            return Err(v.into());
        }
        let rp = mem.load_u32(RSP_PROD, Ordering::Relaxed)?;
        // rmb() after reading rsp_prod (blkif_interrupt): "Ensure we see queued responses up
        // to 'rp'".
        fence(Ordering::Acquire);
        // RING_RESPONSE_PROD_OVERFLOW, as blkfront checks it: no more responses than requests.
        let produced = rp.wrapping_sub(self.rsp_cons);
        if produced > self.req_prod_pushed.wrapping_sub(self.rsp_cons) {
            let v = ProtocolViolation::BogusResponseProducer {
                rsp_prod: rp,
                rsp_cons: self.rsp_cons,
                req_prod: self.req_prod_pushed,
            };
            self.broken = Some(v);
            return Err(v.into());
        }
        self.rsp_prod_seen = rp;
        Ok(())
    }

    /// Collects the next response, read once from its slot; `None` when there is none yet.
    ///
    /// # Errors
    /// [`RingError::Protocol`] if the backend's `rsp_prod` is bogus; [`RingError::Memory`].
    pub fn next_response(&mut self, mem: &SharedMem<'_>) -> Result<Option<RawResponse>, RingError> {
        if self.rsp_cons == self.rsp_prod_seen {
            self.refresh(mem)?;
            if self.rsp_cons == self.rsp_prod_seen {
                return Ok(None);
            }
        }
        let slot = slot_offset(self.abi, self.size, self.rsp_cons);
        // The fields lie at the same offsets in both layouts; the x86_32 struct is the shorter.
        let mut b = [0u8; size_of::<X86_32Response>()];
        mem.read_into(slot, &mut b)?;
        self.rsp_cons = self.rsp_cons.wrapping_add(1);
        let r: X86_32Response = zerocopy::transmute!(b);
        Ok(Some(RawResponse {
            id: r.id.get(),
            operation: r.operation,
            status: r.status.get(),
        }))
    }

    /// `RING_FINAL_CHECK_FOR_RESPONSES`: asks for an event at the next response and checks
    /// once more; `true` means more responses are waiting.
    ///
    /// # Errors
    /// As [`FrontRing::next_response`].
    pub fn final_check_for_responses(&mut self, mem: &SharedMem<'_>) -> Result<bool, RingError> {
        self.refresh(mem)?;
        if self.rsp_cons != self.rsp_prod_seen {
            return Ok(true);
        }
        mem.store_u32(RSP_EVENT, self.rsp_cons.wrapping_add(1), Ordering::Relaxed)?;
        // xen_mb() in RING_FINAL_CHECK_FOR_RESPONSES: rsp_event visible before rsp_prod is
        // read again.
        fence(Ordering::SeqCst);
        self.refresh(mem)?;
        Ok(self.rsp_cons != self.rsp_prod_seen)
    }
}
