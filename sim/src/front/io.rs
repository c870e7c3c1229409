//! Requests from the simulated guest: data in granted guest pages, responses collected from
//! the rings.

use std::time::{Duration, Instant};

use ring::{
    FrontRequest, Segment, Status, OP_DISCARD, OP_FLUSH_DISKCACHE, OP_READ, OP_WRITE,
    OP_WRITE_BARRIER,
};
use rustix::event::{PollFd, PollFlags};
use shmem::PAGE_SIZE;
use xen::{Access, EventChannel, GrantRef};

use super::{SimFront, SimFrontError};

/// Bytes per blkif sector.
const SECTOR: usize = 512;
/// Bytes of one segment descriptor in an indirect page.
const INDIRECT_SEG_SIZE: usize = 8;

/// One operation the guest asks for.
#[derive(Debug, Clone, Copy)]
pub enum IoOp<'a> {
    /// Read `sectors` 512-byte sectors at `sector`.
    Read {
        /// First sector.
        sector: u64,
        /// Number of sectors.
        sectors: u32,
    },
    /// Write `data` (a multiple of 512 bytes) at `sector`.
    Write {
        /// First sector.
        sector: u64,
        /// The data.
        data: &'a [u8],
    },
    /// A write barrier with data (`BLKIF_OP_WRITE_BARRIER`).
    Barrier {
        /// First sector.
        sector: u64,
        /// The data.
        data: &'a [u8],
    },
    /// `BLKIF_OP_FLUSH_DISKCACHE` with no data.
    Flush,
    /// `BLKIF_OP_DISCARD`.
    Discard {
        /// First sector.
        sector: u64,
        /// Number of sectors.
        sectors: u64,
        /// Secure erase.
        secure: bool,
    },
}

/// A finished (or abandoned) request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    /// The request id.
    pub id: u64,
    /// The queue it went to.
    pub queue: usize,
    /// The operation echoed by the backend (the one sent, for a lost request).
    pub operation: u8,
    /// The status the backend wrote; `None` when the request was never answered.
    pub status: Option<i16>,
    /// The data read, for a successful read.
    pub data: Option<Vec<u8>>,
}

impl Completion {
    pub(super) fn lost(id: u64, queue: usize, inflight: &Inflight) -> Self {
        Self {
            id,
            queue,
            operation: inflight.operation,
            status: None,
            data: None,
        }
    }

    /// The status, if the backend answered with one the protocol defines.
    pub fn status(&self) -> Option<Status> {
        self.status.and_then(Status::from_code)
    }

    /// Whether the backend answered `BLKIF_RSP_OKAY`.
    pub fn is_ok(&self) -> bool {
        self.status() == Some(Status::Okay)
    }
}

/// What a request in flight holds.
#[derive(Debug)]
pub(super) struct Inflight {
    operation: u8,
    read_len: Option<usize>,
    /// Data pages: (frame, gref, persistent).
    data: Vec<(u32, GrantRef, bool)>,
    /// Indirect pages: (frame, gref, persistent).
    indirect: Vec<(u32, GrantRef, bool)>,
}

impl SimFront {
    /// The most sectors one request may carry with what was negotiated.
    pub fn max_sectors_per_request(&self) -> u32 {
        let segs = self
            .info
            .map_or(0, |i| i.max_indirect_segments)
            .max(ring::MAX_SEGMENTS_PER_REQUEST as u32);
        segs * 8
    }

    /// A data page: from the persistent pool when persistent grants are in use, else freshly
    /// granted with `access`.
    fn data_page(&mut self, access: Access) -> Result<(u32, GrantRef, bool), SimFrontError> {
        let persistent = self.info.is_some_and(|i| i.persistent);
        if persistent {
            if let Some((f, g)) = self.persistent_pool.pop() {
                return Ok((f, g, true));
            }
            let f = self.alloc_frame()?;
            // Persistent grants are reused for reads and writes alike: writable.
            let g = self
                .domain
                .grant(self.backend_domid, f, Access::ReadWrite)?;
            return Ok((f, g, true));
        }
        let f = self.alloc_frame()?;
        let g = self.domain.grant(self.backend_domid, f, access)?;
        Ok((f, g, false))
    }

    /// Gives a request's pages back: persistent ones to the pool, others ended and freed.
    /// Grants the backend still holds are collected in `leaked`.
    pub(super) fn release(&mut self, inflight: Inflight, leaked: &mut Vec<GrantRef>) {
        for (f, g, persistent) in inflight.data.into_iter().chain(inflight.indirect) {
            if persistent {
                self.persistent_pool.push((f, g));
            } else if self.domain.end_access(g).is_ok() {
                self.free_frames.push(f);
            } else {
                leaked.push(g);
            }
        }
    }

    /// Submits one request on `queue` (without waiting) and returns its id.
    ///
    /// # Errors
    /// [`SimFrontError::Usage`] for a request that cannot be expressed (not connected, too
    /// large, bad length), [`SimFrontError::Ring`] when the ring is full.
    pub fn submit(&mut self, queue: usize, op: IoOp<'_>) -> Result<u64, SimFrontError> {
        if queue >= self.queues.len() {
            return Err(SimFrontError::Usage(format!("no queue {queue}")));
        }
        if self.queues[queue].shared.ring.free_slots() == 0 {
            return Err(SimFrontError::Ring(ring::RingError::Full));
        }
        let id = self.next_id;
        self.next_id += 1;
        let mut inflight = Inflight {
            operation: OP_READ,
            read_len: None,
            data: Vec::new(),
            indirect: Vec::new(),
        };
        let result = self.build_and_queue(queue, id, op, &mut inflight);
        if let Err(e) = result {
            let mut leaked = Vec::new();
            self.release(inflight, &mut leaked);
            return Err(e);
        }
        self.queues[queue].inflight.insert(id, inflight);
        let q = &mut self.queues[queue];
        let mem = ring_mem(&self.domain, &q.shared.frames)?;
        if q.shared.ring.push_requests(&mem)? {
            self.evtchn.notify(q.shared.port)?;
        }
        Ok(id)
    }

    fn build_and_queue(
        &mut self,
        queue: usize,
        id: u64,
        op: IoOp<'_>,
        inflight: &mut Inflight,
    ) -> Result<(), SimFrontError> {
        let (operation, sector, len, write_data) = match op {
            IoOp::Read { sector, sectors } => (OP_READ, sector, sectors as usize * SECTOR, None),
            IoOp::Write { sector, data } => (OP_WRITE, sector, data.len(), Some(data)),
            IoOp::Barrier { sector, data } => (OP_WRITE_BARRIER, sector, data.len(), Some(data)),
            IoOp::Flush => (OP_FLUSH_DISKCACHE, 0, 0, None),
            IoOp::Discard {
                sector,
                sectors,
                secure,
            } => {
                inflight.operation = OP_DISCARD;
                let req = FrontRequest::Discard {
                    id,
                    sector,
                    nr_sectors: sectors,
                    secure,
                };
                return self.queue_request(queue, &req);
            }
        };
        inflight.operation = operation;
        if len % SECTOR != 0 {
            return Err(SimFrontError::Usage(format!(
                "{len} bytes is not a whole number of sectors"
            )));
        }
        if operation == OP_READ {
            inflight.read_len = Some(len);
        }
        let access = if write_data.is_some() {
            Access::ReadOnly
        } else {
            Access::ReadWrite
        };
        let mut segs = Vec::with_capacity(len.div_ceil(PAGE_SIZE));
        let mut offset = 0;
        while offset < len {
            let chunk = (len - offset).min(PAGE_SIZE);
            let page = self.data_page(access)?;
            inflight.data.push(page);
            if let Some(data) = write_data {
                self.domain
                    .page(page.0)?
                    .write_from(0, &data[offset..offset + chunk])
                    .map_err(|e| SimFrontError::Usage(format!("guest page: {e}")))?;
            }
            let last = u8::try_from(chunk / SECTOR - 1).unwrap_or(7);
            segs.push(Segment {
                gref: page.1,
                first_sect: 0,
                last_sect: last,
            });
            offset += chunk;
        }
        let handle = 0;
        if segs.len() <= ring::MAX_SEGMENTS_PER_REQUEST {
            let req = FrontRequest::Direct {
                operation,
                id,
                sector,
                handle,
                segs: &segs,
            };
            return self.queue_request(queue, &req);
        }
        let max = self.info.map_or(0, |i| i.max_indirect_segments) as usize;
        if segs.len() > max || !matches!(operation, OP_READ | OP_WRITE) {
            return Err(SimFrontError::Usage(format!(
                "{} segments need indirect requests (backend allows {max})",
                segs.len()
            )));
        }
        // The segment descriptors go in indirect pages, 512 per page.
        let per_page = PAGE_SIZE / INDIRECT_SEG_SIZE;
        let mut page_grefs = Vec::new();
        for chunk in segs.chunks(per_page) {
            let page = self.data_page(Access::ReadOnly)?;
            inflight.indirect.push(page);
            let mut bytes = vec![0u8; chunk.len() * INDIRECT_SEG_SIZE];
            for (i, s) in chunk.iter().enumerate() {
                let b = &mut bytes[i * INDIRECT_SEG_SIZE..(i + 1) * INDIRECT_SEG_SIZE];
                b[0..4].copy_from_slice(&s.gref.to_le_bytes());
                b[4] = s.first_sect;
                b[5] = s.last_sect;
            }
            self.domain
                .page(page.0)?
                .write_from(0, &bytes)
                .map_err(|e| SimFrontError::Usage(format!("guest page: {e}")))?;
            page_grefs.push(page.1);
        }
        let req = FrontRequest::Indirect {
            indirect_op: operation,
            id,
            sector,
            handle,
            nr_segments: u16::try_from(segs.len()).unwrap_or(u16::MAX),
            page_grefs: &page_grefs,
        };
        self.queue_request(queue, &req)
    }

    fn queue_request(&mut self, queue: usize, req: &FrontRequest<'_>) -> Result<(), SimFrontError> {
        let q = &mut self.queues[queue];
        let mem = ring_mem(&self.domain, &q.shared.frames)?;
        q.shared.ring.queue_request(&mem, req)?;
        Ok(())
    }

    /// Queues raw slot bytes on `queue` and pushes them (a hostile guest). No completion is
    /// tracked for it; its response is returned by [`SimFront::wait`] with no data.
    ///
    /// # Errors
    /// As [`ring::FrontRing::queue_raw`].
    pub fn submit_raw(
        &mut self,
        queue: usize,
        id: u64,
        operation: u8,
        bytes: &[u8],
    ) -> Result<(), SimFrontError> {
        let q = self
            .queues
            .get_mut(queue)
            .ok_or_else(|| SimFrontError::Usage(format!("no queue {queue}")))?;
        let mem = ring_mem(&self.domain, &q.shared.frames)?;
        q.shared.ring.queue_raw(&mem, bytes)?;
        q.inflight.insert(
            id,
            Inflight {
                operation,
                read_len: None,
                data: Vec::new(),
                indirect: Vec::new(),
            },
        );
        if q.shared.ring.push_requests(&mem)? {
            self.evtchn.notify(q.shared.port)?;
        }
        Ok(())
    }

    /// Collects every response available, waiting up to `timeout` for an event first when
    /// none is (`None`: no waiting).
    ///
    /// # Errors
    /// A bogus backend (response for an unknown id, bad producer index).
    pub fn poll_responses(&mut self, timeout: Option<Duration>) -> Result<usize, SimFrontError> {
        let mut n = self.collect()?;
        if n == 0 {
            if let Some(t) = timeout {
                let ts = rustix::time::Timespec {
                    tv_sec: i64::try_from(t.as_secs()).unwrap_or(i64::MAX),
                    tv_nsec: i64::from(t.subsec_nanos()),
                };
                let fd = self.evtchn.as_fd();
                let mut fds = [PollFd::new(&fd, PollFlags::IN)];
                match rustix::event::poll(&mut fds, Some(&ts)) {
                    Ok(_) | Err(rustix::io::Errno::INTR) => {}
                    Err(e) => return Err(SimFrontError::Evtchn(xen::EvtchnError::Io(e.into()))),
                }
                n = self.collect()?;
            }
        }
        Ok(n)
    }

    fn collect(&mut self) -> Result<usize, SimFrontError> {
        let mut ports = Vec::new();
        self.evtchn.pending(&mut ports)?;
        for p in ports {
            self.evtchn.unmask(p)?;
        }
        let mut got = 0;
        let mut leaked = Vec::new();
        for qi in 0..self.queues.len() {
            loop {
                let rsp = {
                    let q = &mut self.queues[qi];
                    let mem = ring_mem(&self.domain, &q.shared.frames)?;
                    match q.shared.ring.next_response(&mem)? {
                        Some(r) => r,
                        None => {
                            if q.shared.ring.final_check_for_responses(&mem)? {
                                continue;
                            }
                            break;
                        }
                    }
                };
                let inflight = self.queues[qi].inflight.remove(&rsp.id).ok_or_else(|| {
                    SimFrontError::Backend(format!("response for unknown request id {}", rsp.id))
                })?;
                let data = match inflight.read_len {
                    Some(len) if rsp.status() == Some(Status::Okay) => {
                        Some(self.read_pages(&inflight, len)?)
                    }
                    _ => None,
                };
                self.release(inflight, &mut leaked);
                self.completed.push_back(Completion {
                    id: rsp.id,
                    queue: qi,
                    operation: rsp.operation,
                    status: Some(rsp.status),
                    data,
                });
                got += 1;
            }
        }
        if leaked.is_empty() {
            Ok(got)
        } else {
            Err(SimFrontError::Backend(format!(
                "the backend still holds grants {leaked:?} after answering their request"
            )))
        }
    }

    fn read_pages(&self, inflight: &Inflight, len: usize) -> Result<Vec<u8>, SimFrontError> {
        let mut out = vec![0u8; len];
        for (i, (frame, _, _)) in inflight.data.iter().enumerate() {
            let start = i * PAGE_SIZE;
            let end = (start + PAGE_SIZE).min(len);
            self.domain
                .page(*frame)?
                .read_into(0, &mut out[start..end])
                .map_err(|e| SimFrontError::Usage(format!("guest page: {e}")))?;
        }
        Ok(out)
    }

    /// The next completion, waiting for it up to the frontend's timeout.
    ///
    /// # Errors
    /// [`SimFrontError::Timeout`] when nothing completes in time.
    pub fn wait(&mut self) -> Result<Completion, SimFrontError> {
        let deadline = Instant::now() + self.timeout;
        loop {
            if let Some(c) = self.completed.pop_front() {
                return Ok(c);
            }
            if Instant::now() > deadline {
                return Err(SimFrontError::Timeout(format!(
                    "a response ({} request(s) in flight)",
                    self.in_flight()
                )));
            }
            self.poll_responses(Some(Duration::from_millis(50)))?;
        }
    }

    /// Submits one request and waits for its completion.
    ///
    /// # Errors
    /// As [`SimFront::submit`] and [`SimFront::wait`]; completions of other requests that
    /// arrive meanwhile are kept for later.
    pub fn execute(&mut self, queue: usize, op: IoOp<'_>) -> Result<Completion, SimFrontError> {
        let id = self.submit(queue, op)?;
        let deadline = Instant::now() + self.timeout;
        loop {
            if let Some(pos) = self.completed.iter().position(|c| c.id == id) {
                if let Some(c) = self.completed.remove(pos) {
                    return Ok(c);
                }
            }
            if Instant::now() > deadline {
                return Err(SimFrontError::Timeout(format!(
                    "the response to request {id}"
                )));
            }
            self.poll_responses(Some(Duration::from_millis(50)))?;
        }
    }

    /// [`execute`](Self::execute)s a read of `sectors` sectors at `sector` on `queue`.
    ///
    /// # Errors
    /// As [`SimFront::execute`].
    pub fn read(
        &mut self,
        queue: usize,
        sector: u64,
        sectors: u32,
    ) -> Result<Completion, SimFrontError> {
        self.execute(queue, IoOp::Read { sector, sectors })
    }

    /// [`execute`](Self::execute)s a write of `data` at `sector` on `queue`.
    ///
    /// # Errors
    /// As [`SimFront::execute`].
    pub fn write(
        &mut self,
        queue: usize,
        sector: u64,
        data: &[u8],
    ) -> Result<Completion, SimFrontError> {
        self.execute(queue, IoOp::Write { sector, data })
    }

    /// Overwrites `queue`'s shared `req_prod` with `value` and sends an event: a hostile guest
    /// claiming requests it never wrote (CVE-2010-4247, XSA-155).
    ///
    /// # Errors
    /// [`SimFrontError::Usage`] for a bad queue; event-channel failures.
    pub fn corrupt_req_prod(&mut self, queue: usize, value: u32) -> Result<(), SimFrontError> {
        let q = self
            .queues
            .get(queue)
            .ok_or_else(|| SimFrontError::Usage(format!("no queue {queue}")))?;
        let mem = ring_mem(&self.domain, &q.shared.frames)?;
        mem.store_u32(ring::REQ_PROD, value, std::sync::atomic::Ordering::Release)
            .map_err(|e| SimFrontError::Usage(format!("ring memory: {e}")))?;
        self.evtchn.notify(q.shared.port)?;
        Ok(())
    }

    /// Free slots on `queue`'s ring.
    pub fn free_slots(&self, queue: usize) -> u32 {
        self.queues
            .get(queue)
            .map_or(0, |q| q.shared.ring.free_slots())
    }
}

fn ring_mem<'a>(
    domain: &'a crate::SimDomain,
    frames: &[u32],
) -> Result<shmem::SharedMem<'a>, SimFrontError> {
    let first = frames.first().copied().unwrap_or(0) as usize;
    domain
        .mem()
        .subregion(first * PAGE_SIZE, frames.len() * PAGE_SIZE)
        .map_err(|e| SimFrontError::Usage(format!("ring memory: {e}")))
}
