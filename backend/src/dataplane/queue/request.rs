//! One request's way through the queue, once validated: start (or wait), reach guest memory,
//! submit, complete, copy out, answer. Each step moves the slot's [`State`].

use std::sync::Arc;

use ring::{FlushKind, Op, Status};
use rustix::io::Errno;
use shmem::SharedMem;

use super::Queue;
use crate::dataplane::grant_access::Reach;
use crate::dataplane::slot::State;
use crate::dataplane::stats::{Count, Meter};
use crate::dataplane::uring::{Completion, Data, NbdRequest, NbdSubmitError};
use crate::device::DeviceKind;

/// What [`Queue::start`] needs of a request's operation, copied out of its slot.
#[derive(Clone, Copy)]
enum Start {
    Rw {
        write: bool,
        flush: Option<FlushKind>,
    },
    Flush(FlushKind),
    Discard {
        sector: ring::Sector,
        nr_sectors: u64,
        secure: bool,
    },
}

/// Bytes of data a read or write moves.
fn data_len(nr_sectors: u64) -> usize {
    usize::try_from(nr_sectors)
        .unwrap_or(usize::MAX)
        .saturating_mul(512)
}

impl Queue {
    /// Issues a validated request in slot `slot` (`Deferred`), or leaves it deferred when it
    /// must wait.
    pub(super) fn start(&mut self, mem: &SharedMem<'_>, slot: usize) {
        // What the request asks for, copied out of the slot; a transfer's segments stay there.
        let Some(op) = self.slots.get(slot).map(|s| match &s.req.op {
            Op::Read(_) => Start::Rw {
                write: false,
                flush: None,
            },
            Op::Write { flush, .. } => Start::Rw {
                write: true,
                flush: *flush,
            },
            Op::Flush(k) => Start::Flush(*k),
            Op::Discard {
                sector,
                nr_sectors,
                secure,
            } => Start::Discard {
                sector: *sector,
                nr_sectors: *nr_sectors,
                secure: *secure,
            },
        }) else {
            return;
        };
        let flush_kind = match op {
            Start::Rw { flush, .. } => flush,
            Start::Flush(k) => Some(k),
            Start::Discard { .. } => None,
        };
        let unsupported = match flush_kind {
            Some(FlushKind::Cache) => !self.features.flush,
            Some(FlushKind::Barrier) => !self.features.barrier,
            None => false,
        };
        if unsupported {
            return self.finish(mem, slot, Status::NotSupported);
        }
        // A barrier waits until every other request has completed (xen_blk_drain_io).
        if flush_kind == Some(FlushKind::Barrier) && self.slots.busy() > 1 {
            self.slots.defer(slot, false);
            return;
        }
        let device = Arc::clone(&self.device);
        let fd = device.fd();
        let nbd = device.kind() == DeviceKind::Nbd;
        match op {
            Start::Flush(_) if nbd => {
                self.stats.count(Count::Flush);
                self.submit_nbd(mem, slot, NbdRequest::Flush, None);
            }
            Start::Flush(_) => {
                self.stats.count(Count::Flush);
                match self.uring.submit_fsync(slot, fd) {
                    Ok(()) => self.slots.set(slot, State::InFlight),
                    Err(e) => {
                        tracing::error!(queue = %self.name, "submitting a flush: {e}");
                        self.finish(mem, slot, Status::Error);
                    }
                }
            }
            Start::Discard {
                sector,
                nr_sectors,
                secure,
            } => {
                self.stats.count(Count::Discard);
                let (Some(offset), Some(len)) = (sector.bytes(), ring::Sector(nr_sectors).bytes())
                else {
                    return self.finish(mem, slot, Status::Error);
                };
                if len == 0 {
                    return self.finish(mem, slot, Status::Okay);
                }
                if nbd {
                    let req = NbdRequest::Discard { offset, len };
                    return self.submit_nbd(mem, slot, req, None);
                }
                let block = matches!(device.kind(), DeviceKind::Block { .. });
                if secure || (block && !self.uring_discard) {
                    let status = match device.discard_sync(offset, len, secure) {
                        Ok(()) => Status::Okay,
                        Err(e) => {
                            tracing::debug!(queue = %self.name, "discard failed: {e}");
                            Status::Error
                        }
                    };
                    return self.finish(mem, slot, status);
                }
                match self.uring.submit_discard(slot, fd, block, offset, len) {
                    Ok(()) => self.slots.set(slot, State::InFlight),
                    Err(e) => {
                        tracing::error!(queue = %self.name, "submitting a discard: {e}");
                        self.finish(mem, slot, Status::Error);
                    }
                }
            }
            Start::Rw { write, flush } => {
                if write && flush.is_some() {
                    self.stats.count(Count::Flush);
                }
                self.start_rw(mem, slot, write, flush.is_some());
            }
        }
    }

    fn start_rw(&mut self, mem: &SharedMem<'_>, slot: usize, write: bool, fsync: bool) {
        let alone = self.slots.busy() <= 1;
        // The segments are read where they lie, in the slot (a field apart from the grants'
        // and the io_uring's).
        let Some(Op::Read(t) | Op::Write { transfer: t, .. }) =
            self.slots.get(slot).map(|s| &s.req.op)
        else {
            return self.finish(mem, slot, Status::Error);
        };
        let nr_sectors = t.nr_sectors;
        let Some(offset) = t.sector.bytes() else {
            return self.finish(mem, slot, Status::Error);
        };
        let len = data_len(nr_sectors);
        let reach = self
            .grants
            .reach(&mut self.uring, slot, &t.segs, len, write, alone);
        let count = if write {
            Count::Write(nr_sectors)
        } else {
            Count::Read(nr_sectors)
        };
        match reach {
            Reach::Fail => self.finish(mem, slot, Status::Error),
            Reach::Wait => {
                if self.slots.defer(slot, true) {
                    self.stats.count(Count::Waited);
                }
            }
            Reach::CopyIn(region) => {
                self.stats.count(count);
                let state = State::CopyIn {
                    region,
                    len,
                    offset,
                    fsync,
                };
                self.slots.set(slot, state);
            }
            Reach::Submit(data) => {
                self.stats.count(count);
                self.submit_rw(mem, slot, write, offset, data, fsync);
            }
        }
    }

    fn submit_rw(
        &mut self,
        mem: &SharedMem<'_>,
        slot: usize,
        write: bool,
        offset: u64,
        data: Data,
        fsync: bool,
    ) {
        let device = Arc::clone(&self.device);
        if device.kind() == DeviceKind::Nbd {
            let req = if write {
                NbdRequest::Write {
                    offset,
                    flush: fsync,
                }
            } else {
                NbdRequest::Read { offset }
            };
            return self.submit_nbd(mem, slot, req, Some(data));
        }
        match self
            .uring
            .submit_rw(slot, device.fd(), write, offset, data, fsync)
        {
            Ok(()) => self.slots.set(slot, State::InFlight),
            Err((e, region)) => {
                tracing::error!(queue = %self.name, "submitting I/O: {e}");
                if let Some(r) = region {
                    self.grants.give_back(r);
                }
                self.finish(mem, slot, Status::Error);
            }
        }
    }

    /// Sends `req` for `slot` to the NBD server (see `uring`'s NBD connection).
    fn submit_nbd(
        &mut self,
        mem: &SharedMem<'_>,
        slot: usize,
        req: NbdRequest,
        data: Option<Data>,
    ) {
        match self.uring.submit_nbd(slot, req, data) {
            Ok(()) => self.slots.set(slot, State::InFlight),
            Err((e, region)) => {
                match e {
                    // The guest's request or a connection already reported broken.
                    NbdSubmitError::Refused(_) | NbdSubmitError::Broken => {
                        tracing::debug!(queue = %self.name, "NBD request not sent: {e}");
                    }
                    NbdSubmitError::Io(_) => {
                        tracing::error!(queue = %self.name, "submitting an NBD request: {e}");
                    }
                }
                if let Some(r) = region {
                    self.grants.give_back(r);
                }
                self.finish(mem, slot, Status::Error);
            }
        }
    }

    /// Grant-copies, in one batch (one `GNTTABOP_copy`), the data of every write waiting in
    /// `CopyIn` and of every read waiting in `CopyOut`; then submits the writes and answers
    /// the reads whose copy succeeded.
    pub(super) fn copy(&mut self, mem: &SharedMem<'_>) {
        let mut batch = std::mem::take(&mut self.batch);
        self.slots.waiting_for_copy(&mut batch);
        if !batch.is_empty() {
            self.grants
                .copy(self.slots.as_mut_slice(), &batch, &mut self.failed);
            for (bi, &slot) in batch.iter().enumerate() {
                let failed = self.failed.get(bi).copied().unwrap_or(true);
                let copy_in = self
                    .slots
                    .get(slot)
                    .is_some_and(|s| matches!(s.state, State::CopyIn { .. }));
                if failed {
                    let id = self.slots.get(slot).map_or(0, |s| s.req.id);
                    let what = if copy_in { "write" } else { "read" };
                    tracing::debug!(queue = %self.name, id, "grant copy of {what} data failed");
                    self.finish(mem, slot, Status::Error);
                } else if copy_in {
                    self.copied_in(mem, slot);
                } else {
                    self.finish(mem, slot, Status::Okay);
                }
            }
        }
        self.batch = batch;
    }

    /// Submits a write whose data is now in its region.
    fn copied_in(&mut self, mem: &SharedMem<'_>, slot: usize) {
        let Some(s) = self.slots.get_mut(slot) else {
            return;
        };
        let State::CopyIn {
            region,
            len,
            offset,
            fsync,
        } = std::mem::replace(&mut s.state, State::Deferred)
        else {
            return;
        };
        self.submit_rw(mem, slot, true, offset, Data::Bounce(region, len), fsync);
    }

    /// Handles a slot whose I/O completed.
    pub(super) fn complete(&mut self, mem: &SharedMem<'_>, c: Completion) {
        crate::fault::point(crate::fault::Step::Completed);
        let Completion {
            slot,
            result,
            region,
            guards,
        } = c;
        self.grants.completed(guards, self.now);
        if !self.slots.complete(slot) {
            // Not a slot in flight (cannot happen): nothing to answer.
            if let Some(r) = region {
                self.grants.give_back(r);
            }
            return;
        }
        let Some(op) = self.slots.get(slot).map(|s| &s.req.op) else {
            return;
        };
        let id = self.slots.get(slot).map_or(0, |s| s.req.id);
        if let Err(e) = &result {
            if matches!(op, Op::Discard { .. })
                && *e == Errno::OPNOTSUPP
                && self.uring_discard
                && self.device.kind() != DeviceKind::Nbd
            {
                // The kernel lacks the io_uring discard command: use the ioctl from now on.
                self.uring_discard = false;
                return self.start(mem, slot);
            }
            tracing::debug!(queue = %self.name, id, "I/O failed: {e}");
        }
        match (result, region, op) {
            (Ok(()), Some(region), Op::Read(t)) => {
                let len = data_len(t.nr_sectors);
                self.slots.set(slot, State::CopyOut { region, len });
            }
            (result, region, _) => {
                if let Some(r) = region {
                    self.grants.give_back(r);
                }
                let status = if result.is_ok() {
                    Status::Okay
                } else {
                    Status::Error
                };
                self.finish(mem, slot, status);
            }
        }
    }

    /// Answers slot `slot` and frees it, giving back what it held.
    pub(super) fn finish(&mut self, mem: &SharedMem<'_>, slot: usize, status: Status) {
        let Some(s) = self.slots.get(slot) else {
            return;
        };
        let rsp = s.req.response(status);
        let entry = s.entry;
        let latency = s.start.elapsed();
        if let Some(o) = self.observer.as_mut() {
            o.finishing(&s.req, status);
        }
        match self.slots.release(slot) {
            Some(State::CopyIn { region, .. } | State::CopyOut { region, .. }) => {
                self.grants.give_back(region);
            }
            Some(_) => {}
            None => {
                // Free or in flight: answering it would be a bug (its buffers are the kernel's).
                tracing::error!(queue = %self.name, slot, "not answering a slot that is free or in flight");
                return;
            }
        }
        self.stats.count(Count::Answered(latency));
        self.put(mem, &rsp, entry);
    }
}
