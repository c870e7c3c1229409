//! Recording a live session from inside the data plane, so that it works on real Xen as on the
//! simulation: each queue writes what its frontend did (the raw slots it consumed, the pages
//! those requests name, the events) and what it answered.
//!
//! The recorder is the data plane's [`Observer`], passed in with
//! [`QueueParams::observer`]; a queue without one pays one branch per request.
//! While recording, the recorder reads the guest pages a request names with its own grant
//! copies (write data and indirect pages before the request runs, read data after it
//! completed), so a guest changing a page between the two reads makes the trace differ from
//! what the backend saw; the backend itself still copies every page once.

use std::collections::HashSet;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use ring::{DeviceLimits, IndirectPage, Op, Parsed, RawRequest, Request, Response, Status};
use shmem::PAGE_SIZE;
use xen::{CopyOp, DomId, GrantAddr, GrantStatus, Platform};

use super::format::{page_hex, to_hex, Event, ExitKind, GrantAccess, Initial, Mode, VERSION};
use crate::dataplane::{GrantMode, Observer, QueueExit, QueueObserver, QueueParams};

/// A trace being written, shared by the queues of one backend.
pub struct Recorder {
    out: Mutex<Box<dyn Write + Send>>,
    initial: Initial,
    disk_written: AtomicBool,
    next_queue: AtomicU32,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder")
            .field("initial", &self.initial)
            .finish_non_exhaustive()
    }
}

impl Recorder {
    /// Records to `out`; `initial` says what the disk held before.
    pub fn new(out: Box<dyn Write + Send>, initial: Initial, about: &str) -> Arc<Self> {
        let r = Arc::new(Self {
            out: Mutex::new(out),
            initial,
            disk_written: AtomicBool::new(false),
            next_queue: AtomicU32::new(0),
        });
        r.write(&Event::Trace {
            version: VERSION,
            about: about.to_owned(),
        });
        r
    }

    /// Records to a new file at `path`.
    ///
    /// # Errors
    /// When the file cannot be created.
    pub fn create(path: &Path, initial: Initial, about: &str) -> std::io::Result<Arc<Self>> {
        let f = std::fs::File::create(path)?;
        Ok(Self::new(
            Box::new(std::io::BufWriter::new(f)),
            initial,
            about,
        ))
    }

    fn write(&self, ev: &Event) {
        if let Ok(mut out) = self.out.lock() {
            let _ = writeln!(out, "{}", ev.to_line());
        }
    }

    fn flush(&self) {
        if let Ok(mut out) = self.out.lock() {
            let _ = out.flush();
        }
    }

    /// Starts recording a queue about to run with `p`; writes the disk (once) and the queue's
    /// negotiation.
    pub fn attach(self: &Arc<Self>, p: &QueueParams) -> QueueRecorder {
        if !self.disk_written.swap(true, Ordering::Relaxed) {
            self.write(&Event::Disk {
                sectors: p.device.sectors(),
                sector_size: p.device.logical_block_size(),
                read_only: p.features.read_only || p.device.read_only(),
                initial: self.initial,
                after: None,
            });
        }
        let q = self.next_queue.fetch_add(1, Ordering::Relaxed);
        self.write(&Event::Queue {
            q,
            abi: p.abi.protocol().to_owned(),
            ring_refs: p.ring_refs.clone(),
            mode: match p.grant_mode {
                GrantMode::Copy => Mode::Copy,
                GrantMode::Map => Mode::Map,
            },
            persistent: p.persistent_grants,
            max_indirect_segments: p.max_indirect_segments,
            flush: p.features.flush,
            barrier: p.features.barrier,
            discard: p.features.discard,
        });
        self.flush();
        QueueRecorder {
            rec: Arc::clone(self),
            q,
            platform: Arc::clone(&p.platform),
            frontend: p.frontend,
            seen: HashSet::new(),
            pending_read: None,
            page: vec![0; PAGE_SIZE],
        }
    }
}

impl Observer for Recorder {
    fn queue(self: Arc<Self>, params: &QueueParams) -> Box<dyn QueueObserver> {
        Box::new(self.attach(params))
    }
}

/// One queue's recording, owned by the queue's thread.
#[derive(Debug)]
pub struct QueueRecorder {
    rec: Arc<Recorder>,
    q: u32,
    platform: Arc<dyn Platform>,
    frontend: DomId,
    /// Refs already written as granted (for read pages, whose content does not matter).
    seen: HashSet<u32>,
    /// The data of the read about to be answered: (id, hex).
    pending_read: Option<(u64, String)>,
    page: Vec<u8>,
}

impl QueueRecorder {
    /// Copies `len` bytes at `offset` of the guest's `gref` into `self.page`.
    fn read_grant(&mut self, gref: u32, offset: usize, len: usize) -> bool {
        let Some(dst) = self.page.get_mut(..len) else {
            return false;
        };
        let mut ops = [CopyOp::FromGuest {
            src: GrantAddr {
                domid: self.frontend,
                gref,
                offset: offset as u16,
            },
            dst,
            status: GrantStatus::GeneralError,
        }];
        self.platform.grant_copier().copy(&mut ops).is_ok() && ops[0].status() == GrantStatus::Okay
    }

    /// A page the request names, with its content when `with_data`; nothing when the
    /// backend cannot read it (never granted, or ended): the replay then finds it so too.
    fn grant(&mut self, gref: u32, with_data: bool) {
        if !with_data && self.seen.contains(&gref) {
            return;
        }
        if !self.read_grant(gref, 0, PAGE_SIZE) {
            return;
        }
        self.seen.insert(gref);
        let hex = with_data.then(|| page_hex(&self.page));
        self.rec.write(&Event::Grant {
            gref,
            access: GrantAccess::Rw,
            hex: hex.filter(|h| !h.is_empty()),
            pattern: None,
        });
    }
}

impl QueueObserver for QueueRecorder {
    /// The backend took slot `raw` off the ring (before validating it).
    fn slot(&mut self, raw: &RawRequest, limits: &DeviceLimits) {
        let write = |t: &ring::Transfer| t.segs.as_slice().iter().map(|s| s.gref).collect();
        let (grefs, with_data): (Vec<u32>, bool) = match ring::parse(raw, limits) {
            Ok(Parsed::Ready(req)) => match &req.op {
                Op::Read(t) => (write(t), false),
                Op::Write { transfer, .. } => (write(transfer), true),
                _ => (Vec::new(), false),
            },
            Ok(Parsed::Indirect(h)) => {
                let mut pages = Vec::new();
                for &g in h.page_grefs() {
                    if self.read_grant(g, 0, PAGE_SIZE) {
                        self.grant(g, true);
                        let mut p = [0u8; PAGE_SIZE];
                        p.copy_from_slice(&self.page);
                        pages.push(IndirectPage::from_bytes(p));
                    }
                }
                match ring::parse_indirect(&h, &pages, limits) {
                    Ok(req) => match &req.op {
                        Op::Read(t) => (write(t), false),
                        Op::Write { transfer, .. } => (write(transfer), true),
                        _ => (Vec::new(), false),
                    },
                    Err(_) => (Vec::new(), false),
                }
            }
            Err(_) => (Vec::new(), false),
        };
        for g in grefs {
            self.grant(g, with_data);
        }
        self.rec.write(&Event::Slot {
            q: self.q,
            hex: to_hex(raw.as_bytes()),
            push: true,
        });
    }

    /// Request `req` is about to be answered with `status`: for a successful read, the data
    /// now in the guest's pages.
    fn finishing(&mut self, req: &Request, status: Status) {
        let Op::Read(t) = &req.op else { return };
        if status != Status::Okay {
            return;
        }
        let mut data = Vec::new();
        for s in t.segs.as_slice() {
            let (off, len) = (s.offset_bytes() as usize, s.len_bytes() as usize);
            if !self.read_grant(s.gref, off, len) {
                return;
            }
            data.extend_from_slice(&self.page[..len]);
        }
        self.pending_read = Some((req.id, page_hex(&data)));
    }

    /// The backend wrote response `rsp`.
    fn response(&mut self, rsp: &Response) {
        let data = match self.pending_read.take() {
            Some((id, data)) if id == rsp.id => Some(data),
            _ => None,
        };
        self.rec.write(&Event::Rsp {
            q: self.q,
            id: rsp.id,
            op: rsp.operation,
            status: rsp.status.code(),
            data,
            sum: None,
        });
    }

    /// The backend woke up for an event.
    fn event(&mut self) {
        self.rec.write(&Event::Event { q: self.q });
        self.rec.flush();
    }

    /// The queue ended.
    fn exit(&mut self, exit: &QueueExit) {
        let (how, detail) = match exit {
            QueueExit::Stopped => (ExitKind::Stopped, String::new()),
            QueueExit::Protocol(v) => (ExitKind::Protocol, v.to_string()),
            QueueExit::Failed(e) => (ExitKind::Failed, e.to_string()),
            QueueExit::Panicked => (ExitKind::Failed, "panicked".to_owned()),
        };
        self.rec.write(&Event::Exit {
            q: self.q,
            how,
            detail,
        });
        self.rec.flush();
    }
}
