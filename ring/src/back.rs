//! [`BackRing`]: the backend's end of the shared ring. Plain bookkeeping; every method that
//! touches the ring takes the memory as a parameter.
//!
//! Each fence stands for the barrier of the `io/ring.h` macro named beside it. Indices are
//! `u32` and all arithmetic on them wraps at 2^32, as `RING_IDX` does.

use std::sync::atomic::{fence, Ordering};

use shmem::SharedMem;

use crate::abi::{Abi, RESPONSE_ID_OFFSET, RESPONSE_OPERATION_OFFSET, RESPONSE_STATUS_OFFSET};
use crate::error::{ProtocolViolation, RingError};
use crate::raw::RawRequest;
use crate::request::Response;
use crate::sring::{
    check_geometry, push_and_check_notify, slot_offset, REQ_EVENT, REQ_PROD, RSP_EVENT, RSP_PROD,
};

/// The backend's view of a shared ring (`struct *_back_ring`).
#[derive(Debug, Clone)]
pub struct BackRing {
    abi: Abi,
    size: u32,
    /// Next request slot to copy (`req_cons`).
    req_cons: u32,
    /// Next response slot to write (`rsp_prod_pvt`).
    rsp_prod_pvt: u32,
    /// `rsp_prod` as last published by us (the shared copy is writable by the frontend, so
    /// the notify decision does not read it back).
    rsp_prod_pushed: u32,
    /// The last `req_prod` read and found sane.
    req_prod_seen: u32,
    broken: Option<ProtocolViolation>,
}

impl BackRing {
    /// Attaches to a ring of `pages` pages the frontend has initialised, continuing from its
    /// current indices (`BACK_RING_ATTACH` with `rsp_prod`, as Linux's `xen_blkif_map` does,
    /// so a reconnecting frontend's ring is picked up where it is).
    ///
    /// # Errors
    /// [`RingError::Pages`] or [`RingError::Memory`] for a bad geometry;
    /// [`RingError::Protocol`] if `req_prod - rsp_prod > size` (Linux: `-EIO`).
    pub fn attach(mem: &SharedMem<'_>, abi: Abi, pages: usize) -> Result<BackRing, RingError> {
        let size = check_geometry(mem, abi, pages)?;
        // READ_ONCE of both producers in xen_blkif_map; ordering against the slots comes
        // later, from the fence after each req_prod read.
        let rsp_prod = mem.load_u32(RSP_PROD, Ordering::Relaxed)?;
        let req_prod = mem.load_u32(REQ_PROD, Ordering::Relaxed)?;
        if req_prod.wrapping_sub(rsp_prod) > size {
            return Err(ProtocolViolation::BogusRequestProducer {
                req_prod,
                req_cons: rsp_prod,
                rsp_prod,
                size,
            }
            .into());
        }
        Ok(BackRing {
            abi,
            size,
            req_cons: rsp_prod,
            rsp_prod_pvt: rsp_prod,
            rsp_prod_pushed: rsp_prod,
            req_prod_seen: rsp_prod,
            broken: None,
        })
    }

    /// Attaches to a ring a backend that died was serving, at the indexes its in-flight log
    /// recorded rather than at the ring's (which the frontend can write): `req_cons`
    /// requests consumed, `rsp_pushed` responses published, `rsp_written` responses written
    /// (the next [`BackRing::push_responses`] publishes those beyond `rsp_pushed`).
    ///
    /// # Errors
    /// As [`BackRing::attach`]; [`RingError::Resume`] when the indexes contradict each other
    /// (more written than consumed, more owed or unpublished than the ring holds).
    pub fn resume(
        mem: &SharedMem<'_>,
        abi: Abi,
        pages: usize,
        req_cons: u32,
        rsp_pushed: u32,
        rsp_written: u32,
    ) -> Result<BackRing, RingError> {
        let size = check_geometry(mem, abi, pages)?;
        if req_cons.wrapping_sub(rsp_written) > size || rsp_written.wrapping_sub(rsp_pushed) > size
        {
            return Err(RingError::Resume {
                req_cons,
                rsp_pushed,
                rsp_written,
                size,
            });
        }
        Ok(BackRing {
            abi,
            size,
            req_cons,
            rsp_prod_pvt: rsp_written,
            rsp_prod_pushed: rsp_pushed,
            req_prod_seen: req_cons,
            broken: None,
        })
    }

    /// The number of slots of a ring of `pages` pages in `abi` mapped at `mem`, reading
    /// nothing the frontend writes.
    ///
    /// # Errors
    /// [`RingError::Pages`] or [`RingError::Memory`] for a bad geometry.
    pub fn slots(mem: &SharedMem<'_>, abi: Abi, pages: usize) -> Result<u32, RingError> {
        check_geometry(mem, abi, pages)
    }

    /// Requests consumed (`req_cons`): the ring index of the next request.
    pub fn req_cons(&self) -> u32 {
        self.req_cons
    }

    /// Responses written (`rsp_prod_pvt`): the ring index the next response takes.
    pub fn rsp_written(&self) -> u32 {
        self.rsp_prod_pvt
    }

    /// The ABI of the slots.
    pub fn abi(&self) -> Abi {
        self.abi
    }

    /// Number of slots.
    pub fn size(&self) -> u32 {
        self.size
    }

    /// Requests consumed and not yet answered.
    pub fn in_flight(&self) -> u32 {
        self.req_cons.wrapping_sub(self.rsp_prod_pvt)
    }

    /// The violation that halted the ring, if any.
    pub fn broken(&self) -> Option<ProtocolViolation> {
        self.broken
    }

    /// Reads `req_prod` and checks it: it must lie between our consumer index and the
    /// responses plus one ring's worth (`RING_REQUEST_PROD_OVERFLOW`, and, stricter than
    /// Linux, not behind what we consumed). A bad value halts the ring.
    fn refresh(&mut self, mem: &SharedMem<'_>) -> Result<(), RingError> {
        if let Some(v) = self.broken {
            return Err(v.into());
        }
        let rp = mem.load_u32(REQ_PROD, Ordering::Relaxed)?;
        // xen_rmb() after reading req_prod in __do_block_io_op / RING_HAS_UNCONSUMED_REQUESTS:
        // "Ensure we see queued requests up to 'rp'" (slot reads must not pass this load).
        fence(Ordering::Acquire);
        let produced = rp.wrapping_sub(self.rsp_prod_pvt);
        if produced > self.size || produced < self.in_flight() {
            let v = ProtocolViolation::BogusRequestProducer {
                req_prod: rp,
                req_cons: self.req_cons,
                rsp_prod: self.rsp_prod_pvt,
                size: self.size,
            };
            self.broken = Some(v);
            return Err(v.into());
        }
        self.req_prod_seen = rp;
        Ok(())
    }

    /// `RING_HAS_UNCONSUMED_REQUESTS` on the last `req_prod` read: requests produced and not
    /// consumed, bounded by the slots not awaiting a response.
    fn unconsumed(&self) -> u32 {
        let req = self.req_prod_seen.wrapping_sub(self.req_cons);
        let rsp = self.size.saturating_sub(self.in_flight());
        req.min(rsp)
    }

    /// Copies the next request slot, once, into a private [`RawRequest`] and consumes it.
    /// `None` when the frontend has produced nothing more (or every slot awaits a response:
    /// `RING_REQUEST_CONS_OVERFLOW`).
    ///
    /// # Errors
    /// [`RingError::Protocol`] for a bogus `req_prod` (the ring is halted from then on);
    /// [`RingError::Memory`] if `mem` is smaller than the ring.
    pub fn next_request(&mut self, mem: &SharedMem<'_>) -> Result<Option<RawRequest>, RingError> {
        if let Some(v) = self.broken {
            return Err(v.into());
        }
        if self.req_cons == self.req_prod_seen {
            self.refresh(mem)?;
        }
        if self.unconsumed() == 0 {
            return Ok(None);
        }
        let mut raw = RawRequest::zeroed(self.abi);
        mem.read_into(
            slot_offset(self.abi, self.size, self.req_cons),
            raw.bytes_mut(),
        )?;
        // Linux: `req_cons = ++rc` then barrier() before any check: everything from here on
        // works on the private copy; nothing reads the slot again.
        self.req_cons = self.req_cons.wrapping_add(1);
        Ok(Some(raw))
    }

    /// `RING_HAS_UNCONSUMED_REQUESTS` on a fresh `req_prod`, without asking for an event: what
    /// a busy-polling backend checks, leaving `req_event` behind so that the frontend does not
    /// notify while it is watched. Call [`BackRing::final_check_for_requests`] before sleeping.
    ///
    /// # Errors
    /// As [`BackRing::next_request`].
    pub fn has_unconsumed_requests(&mut self, mem: &SharedMem<'_>) -> Result<bool, RingError> {
        self.refresh(mem)?;
        Ok(self.unconsumed() > 0)
    }

    /// `RING_FINAL_CHECK_FOR_REQUESTS`: before sleeping, asks for an event at the next
    /// request and checks once more. `true` means more requests arrived: keep consuming.
    ///
    /// # Errors
    /// As [`BackRing::next_request`].
    pub fn final_check_for_requests(&mut self, mem: &SharedMem<'_>) -> Result<bool, RingError> {
        self.refresh(mem)?;
        if self.unconsumed() > 0 {
            return Ok(true);
        }
        mem.store_u32(REQ_EVENT, self.req_cons.wrapping_add(1), Ordering::Relaxed)?;
        // xen_mb() in RING_FINAL_CHECK_FOR_REQUESTS: req_event must be visible before req_prod
        // is read again, or a request pushed in between is missed with no event sent.
        fence(Ordering::SeqCst);
        self.refresh(mem)?;
        Ok(self.unconsumed() > 0)
    }

    /// Writes a response into the next response slot, field by field (id, operation, status):
    /// no other byte of the slot is written, so no backend memory reaches padding (XSA-216).
    /// Not visible to the frontend until [`BackRing::push_responses`].
    ///
    /// Responses may be written after the ring is halted (to answer requests in flight).
    ///
    /// # Errors
    /// [`RingError::NothingToAnswer`] if every consumed request has a response already;
    /// [`RingError::Memory`] if `mem` is smaller than the ring.
    pub fn put_response(&mut self, mem: &SharedMem<'_>, rsp: &Response) -> Result<(), RingError> {
        if self.in_flight() == 0 {
            return Err(RingError::NothingToAnswer);
        }
        let slot = slot_offset(self.abi, self.size, self.rsp_prod_pvt);
        mem.write_from(slot + RESPONSE_ID_OFFSET, &rsp.id.to_le_bytes())?;
        mem.write_from(slot + RESPONSE_OPERATION_OFFSET, &[rsp.operation])?;
        mem.write_from(
            slot + RESPONSE_STATUS_OFFSET,
            &rsp.status.code().to_le_bytes(),
        )?;
        self.rsp_prod_pvt = self.rsp_prod_pvt.wrapping_add(1);
        Ok(())
    }

    /// `RING_PUSH_RESPONSES_AND_CHECK_NOTIFY`: publishes the responses written so far and
    /// says whether the frontend asked for an event (`rsp_event`) among them.
    ///
    /// # Errors
    /// [`RingError::Memory`] if `mem` is smaller than the ring.
    pub fn push_responses(&mut self, mem: &SharedMem<'_>) -> Result<bool, RingError> {
        let (old, new) = (self.rsp_prod_pushed, self.rsp_prod_pvt);
        let notify = push_and_check_notify(mem, RSP_PROD, RSP_EVENT, old, new)?;
        self.rsp_prod_pushed = new;
        Ok(notify)
    }
}
