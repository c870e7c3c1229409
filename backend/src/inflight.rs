//! The in-flight log: what a new `serve` needs to take over a disk's rings from one that died
//! (issue 15). The design, and why each store comes where it does, is in ARCHITECTURE.md
//! ("Surviving a crash of `serve`"); in short, per queue: the ring's consumer index, the
//! response producer last published, and one entry per request consumed and not yet
//! published (its slot as copied, the index it was consumed at, and whether its response was
//! written, at which index).
//!
//! `supervise` creates the log ([`create`], a memfd) and every `serve` of the disk inherits
//! it ([`Log::open`]). Each queue thread writes its own part through a [`QueueLog`]; the next
//! process reads it after the writer died, so every commit point is a release store made in
//! program order, and nothing is read back by the writer.
//!
//! The reader trusts nothing it reads: the log was written by a process that served a hostile
//! guest. Every value is range-checked; a log that contradicts itself is refused
//! ([`LogError`]), and every request it returns is validated again before it is started.
//!
//! Layout (little-endian `u32`s): a 64-byte header (magic, queues, entries per queue,
//! connected, queues connected, starts), then per queue a 64-byte header (`cons`, `pushed`)
//! and its entries, 128 bytes each: state, index consumed at, index answered at, length, then
//! the slot's bytes.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use ring::{Abi, RawRequest};

use crate::fault::{self, Step};
use shmem::{MappedFile, SharedMem, PAGE_SIZE};

const MAGIC: u32 = 0x314c_4649; // "IFL1"
const HEADER: usize = 64;
const H_MAGIC: usize = 0;
const H_QUEUES: usize = 4;
const H_ENTRIES: usize = 8;
const H_CONNECTED: usize = 12;
const H_NR_QUEUES: usize = 16;
const H_STARTS: usize = 20;

const QUEUE_HEADER: usize = 64;
const Q_CONS: usize = 0;
const Q_PUSHED: usize = 4;

const ENTRY: usize = 128;
const E_STATE: usize = 0;
const E_INDEX: usize = 4;
const E_RSP: usize = 8;
const E_LEN: usize = 12;
const E_BYTES: usize = 16;
/// The largest request slot (x86_64's 112 bytes).
const MAX_BYTES: usize = ENTRY - E_BYTES;

const FREE: u32 = 0;
const IN_FLIGHT: u32 = 1;
const ANSWERED: u32 = 2;

/// Most queues a log can hold (Linux's blkfront asks for at most one per vCPU).
pub const MAX_QUEUES: u32 = 256;

/// Entries a queue of a ring of `ring_size` slots needs: requests in flight (at most the
/// ring's size) plus responses written and not yet published (at most as many; the queue
/// publishes early rather than run out).
fn entries_for(ring_size: u32) -> u32 {
    ring_size.saturating_mul(2)
}

/// Why a log cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The memfd could not be created, sized, inspected or mapped.
    #[error("in-flight log: {0}")]
    Io(#[from] io::Error),
    /// The log is not one this program wrote, or is too small.
    #[error("in-flight log: {0}")]
    Format(&'static str),
    /// The log contradicts itself (or the rings found on resume).
    #[error("in-flight log of queue {queue}: {what}")]
    Inconsistent {
        /// The queue.
        queue: usize,
        /// What is wrong.
        what: String,
    },
}

fn queue_stride(entries: u32) -> usize {
    (QUEUE_HEADER + entries as usize * ENTRY).next_multiple_of(PAGE_SIZE)
}

fn log_len(queues: u32, entries: u32) -> Option<usize> {
    queue_stride(entries)
        .checked_mul(queues as usize)?
        .checked_add(PAGE_SIZE)
}

/// Creates an empty log (a memfd, not close-on-exec is up to the caller) for up to `queues`
/// queues with rings of up to `max_ring_size` slots. Its pages are allocated as they are
/// written, so a generous geometry costs nothing.
///
/// # Errors
/// When the memfd cannot be created or sized, or the geometry is out of range.
pub fn create(queues: u32, max_ring_size: u32) -> Result<OwnedFd, LogError> {
    let entries = entries_for(max_ring_size);
    if queues == 0 || queues > MAX_QUEUES || entries == 0 || entries > entries_for(4096) {
        return Err(LogError::Format("geometry out of range"));
    }
    let len = log_len(queues, entries).ok_or(LogError::Format("geometry out of range"))?;
    let fd = rustix::fs::memfd_create(
        "blkbackd-inflight",
        rustix::fs::MemfdFlags::CLOEXEC | rustix::fs::MemfdFlags::ALLOW_SEALING,
    )
    .map_err(io::Error::from)?;
    rustix::fs::ftruncate(&fd, len as u64).map_err(io::Error::from)?;
    // The size is part of the format: no process may shrink the file under another's mapping
    // (touching a page beyond the end would be SIGBUS).
    rustix::fs::fcntl_add_seals(
        &fd,
        rustix::fs::SealFlags::SHRINK | rustix::fs::SealFlags::GROW | rustix::fs::SealFlags::SEAL,
    )
    .map_err(io::Error::from)?;
    let map = MappedFile::map(fd.as_fd(), len)?;
    let mem = map.mem();
    let store = |off, v| mem.store_u32(off, v, Ordering::Relaxed);
    store(H_QUEUES, queues)
        .and_then(|()| store(H_ENTRIES, entries))
        .and_then(|()| mem.store_u32(H_MAGIC, MAGIC, Ordering::Release))
        .map_err(|_| LogError::Format("log smaller than its header"))?;
    Ok(fd)
}

/// A disk's in-flight log, mapped.
#[derive(Debug)]
pub struct Log {
    map: MappedFile,
    queues: u32,
    entries: u32,
}

impl Log {
    /// Maps an inherited log and checks its header against its size.
    ///
    /// # Errors
    /// [`LogError::Format`] for a file that is not a log of this program, or too small.
    pub fn open(fd: OwnedFd) -> Result<Arc<Log>, LogError> {
        let len = usize::try_from(rustix::fs::fstat(&fd).map_err(io::Error::from)?.st_size)
            .map_err(|_| LogError::Format("size out of range"))?;
        if len < HEADER {
            return Err(LogError::Format("smaller than its header"));
        }
        let map = MappedFile::map(fd.as_fd(), len)?;
        let mem = map.mem();
        let load = |off| mem.load_u32(off, Ordering::Acquire).unwrap_or(0);
        if load(H_MAGIC) != MAGIC {
            return Err(LogError::Format("not an in-flight log"));
        }
        let (queues, entries) = (load(H_QUEUES), load(H_ENTRIES));
        if queues == 0
            || queues > MAX_QUEUES
            || log_len(queues, entries).is_none_or(|need| need > len)
        {
            return Err(LogError::Format("geometry does not fit the file"));
        }
        Ok(Arc::new(Log {
            map,
            queues,
            entries,
        }))
    }

    fn mem(&self) -> SharedMem<'_> {
        self.map.mem()
    }

    fn load(&self, off: usize) -> u32 {
        // Offsets are computed from the checked geometry: in bounds and aligned.
        self.mem().load_u32(off, Ordering::Acquire).unwrap_or(0)
    }

    fn store(&self, off: usize, v: u32) {
        let _ = self.mem().store_u32(off, v, Ordering::Release);
    }

    /// The number of queues of the connection an earlier `serve` recorded as established and
    /// not closed, if any.
    pub fn connected_queues(&self) -> Option<u32> {
        (self.load(H_CONNECTED) != 0).then(|| self.load(H_NR_QUEUES))
    }

    /// Records that `queues` queues are connected (after each queue's [`QueueLog`] started).
    pub fn set_connected(&self, queues: u32) {
        self.store(H_NR_QUEUES, queues);
        self.store(H_CONNECTED, 1);
    }

    /// Records that the connection is closed (before the queues stop): nothing to resume.
    pub fn set_disconnected(&self) {
        self.store(H_CONNECTED, 0);
    }

    /// How many `serve` processes connected or resumed with this log: the supervisor tells
    /// a backend that made progress from one that died on its way up.
    pub fn starts(&self) -> u32 {
        self.load(H_STARTS)
    }

    /// Counts a connection or resumption ([`Log::starts`]).
    pub fn count_start(&self) {
        self.store(H_STARTS, self.load(H_STARTS).wrapping_add(1));
    }

    /// The part of queue `queue`, for a ring of `ring_size` slots.
    ///
    /// # Errors
    /// [`LogError::Format`] when the log has no room for that queue or ring.
    pub fn queue(self: &Arc<Self>, queue: usize, ring_size: u32) -> Result<QueueLog, LogError> {
        let entries = entries_for(ring_size);
        if queue >= self.queues as usize || entries > self.entries || entries == 0 {
            return Err(LogError::Format("no room for this queue or ring"));
        }
        Ok(QueueLog {
            log: Arc::clone(self),
            queue,
            base: PAGE_SIZE + queue * queue_stride(self.entries),
            entries,
            free: Vec::new(),
            answered: VecDeque::new(),
        })
    }
}

/// One queue's part of the log, written by the queue's thread only.
#[derive(Debug)]
pub struct QueueLog {
    log: Arc<Log>,
    queue: usize,
    base: usize,
    entries: u32,
    /// Entries free to take (this writer's own bookkeeping, never read from the log).
    free: Vec<u32>,
    /// Entries answered and not yet published: (entry, response index), in index order.
    answered: VecDeque<(u32, u32)>,
}

/// What a queue resumes with ([`QueueLog::resume`]).
#[derive(Debug)]
pub struct Resumed {
    /// Requests consumed.
    pub req_cons: u32,
    /// Responses published.
    pub rsp_pushed: u32,
    /// Responses written (those beyond `rsp_pushed` are published by the first push).
    pub rsp_written: u32,
    /// Requests to start again, oldest first: their log entry and their slot as copied.
    pub pending: VecDeque<(u32, RawRequest)>,
}

impl QueueLog {
    fn entry(&self, e: u32) -> usize {
        self.base + QUEUE_HEADER + e as usize * ENTRY
    }

    fn inconsistent(&self, what: String) -> LogError {
        LogError::Inconsistent {
            queue: self.queue,
            what,
        }
    }

    /// Starts afresh on a ring whose consumer index is `req_cons` (nothing in flight).
    pub fn fresh(&mut self, req_cons: u32) {
        for e in 0..self.entries {
            self.log.store(self.entry(e) + E_STATE, FREE);
        }
        self.log.store(self.base + Q_CONS, req_cons);
        self.log.store(self.base + Q_PUSHED, req_cons);
        self.free = (0..self.entries).rev().collect();
        self.answered.clear();
    }

    /// Reads what the dead writer left, for a ring of `ring_size` slots in `abi`: the indexes
    /// to resume at and the requests to start again. Responses written and not published
    /// are kept, to be published by the next push.
    ///
    /// # Errors
    /// [`LogError::Inconsistent`] for a log that contradicts itself.
    pub fn resume(&mut self, abi: Abi, ring_size: u32) -> Result<Resumed, LogError> {
        let log = Arc::clone(&self.log);
        let mut cons = log.load(self.base + Q_CONS);
        let pushed = log.load(self.base + Q_PUSHED);
        let mut in_flight = Vec::new();
        let mut answered = Vec::new();
        self.free.clear();
        self.answered.clear();
        for e in (0..self.entries).rev() {
            let off = self.entry(e);
            match log.load(off + E_STATE) {
                FREE => {
                    self.free.push(e);
                    continue;
                }
                st @ (IN_FLIGHT | ANSWERED) => {
                    let index = log.load(off + E_INDEX);
                    let len = log.load(off + E_LEN) as usize;
                    if len != abi.request_size() || len > MAX_BYTES {
                        return Err(self.inconsistent(format!("entry {e}: {len} bytes")));
                    }
                    let mut bytes = [0u8; MAX_BYTES];
                    let _ = log.mem().read_into(off + E_BYTES, &mut bytes[..len]);
                    let raw = RawRequest::from_bytes(abi, &bytes[..len])
                        .map_err(|err| self.inconsistent(format!("entry {e}: {err}")))?;
                    if st == IN_FLIGHT {
                        in_flight.push((index, e, raw));
                    } else {
                        answered.push((log.load(off + E_RSP), e, index, raw));
                    }
                }
                other => return Err(self.inconsistent(format!("entry {e}: state {other}"))),
            }
        }
        // An entry logged at `cons` was written just before the crash could move `cons`.
        if in_flight.iter().any(|&(index, _, _)| index == cons) {
            cons = cons.wrapping_add(1);
        }
        // Responses below `pushed` are published; those from `pushed` on, in a row, were
        // written and are published now; any beyond a gap is answered again.
        answered.sort_by_key(|&(k, ..)| k.wrapping_sub(pushed));
        let mut written = pushed;
        for (k, e, index, raw) in answered {
            if pushed.wrapping_sub(k).wrapping_sub(1) < ring_size.saturating_mul(2) {
                log.store(self.entry(e) + E_STATE, FREE);
                self.free.push(e);
            } else if k == written {
                written = written.wrapping_add(1);
                self.answered.push_back((e, k));
            } else {
                log.store(self.entry(e) + E_STATE, IN_FLIGHT);
                in_flight.push((index, e, raw));
            }
        }
        let owed = cons.wrapping_sub(written);
        if owed > ring_size
            || owed as usize != in_flight.len()
            || written.wrapping_sub(pushed) > ring_size
        {
            return Err(self.inconsistent(format!(
                "cons {cons}, pushed {pushed}, written {written}, {} in flight",
                in_flight.len()
            )));
        }
        for &(index, e, _) in &in_flight {
            if cons.wrapping_sub(index).wrapping_sub(1) >= ring_size.saturating_mul(2) {
                return Err(self.inconsistent(format!(
                    "entry {e} consumed at {index}, outside the window before {cons}"
                )));
            }
        }
        // Oldest first: requests start again in the order they were consumed.
        in_flight.sort_by_key(|&(index, ..)| std::cmp::Reverse(cons.wrapping_sub(index)));
        log.store(self.base + Q_CONS, cons);
        Ok(Resumed {
            req_cons: cons,
            rsp_pushed: pushed,
            rsp_written: written,
            pending: in_flight.into_iter().map(|(_, e, raw)| (e, raw)).collect(),
        })
    }

    /// Whether an entry is free for the next request consumed (if not, publish the responses
    /// written: that frees their entries).
    pub fn has_room(&self) -> bool {
        !self.free.is_empty()
    }

    /// Logs the request consumed at ring index `index` (its slot as copied), then moves the
    /// consumer index past it. Returns its entry; `None` when none is free
    /// ([`QueueLog::has_room`]).
    pub fn consumed(&mut self, raw: &RawRequest, index: u32) -> Option<u32> {
        fault::point(Step::Consumed);
        let e = self.free.pop()?;
        let off = self.entry(e);
        let bytes = raw.as_bytes();
        let _ = self.log.mem().write_from(off + E_BYTES, bytes);
        self.log.store(off + E_LEN, bytes.len() as u32);
        self.log.store(off + E_INDEX, index);
        self.log.store(off + E_STATE, IN_FLIGHT);
        fault::point(Step::Logged);
        self.log.store(self.base + Q_CONS, index.wrapping_add(1));
        fault::point(Step::Accepted);
        Some(e)
    }

    /// Records that entry `e`'s response was written at ring index `rsp`.
    pub fn answered(&mut self, e: u32, rsp: u32) {
        fault::point(Step::Written);
        let off = self.entry(e);
        self.log.store(off + E_RSP, rsp);
        self.log.store(off + E_STATE, ANSWERED);
        self.answered.push_back((e, rsp));
        fault::point(Step::Answered);
    }

    /// Records that the responses below `rsp_prod` are published, and frees their entries.
    pub fn pushed(&mut self, rsp_prod: u32) {
        fault::point(Step::Published);
        self.log.store(self.base + Q_PUSHED, rsp_prod);
        while let Some(&(e, k)) = self.answered.front() {
            if rsp_prod.wrapping_sub(k).wrapping_sub(1) >= self.entries {
                break;
            }
            self.answered.pop_front();
            self.log.store(self.entry(e) + E_STATE, FREE);
            self.free.push(e);
        }
        fault::point(Step::Cleared);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(id: u8) -> RawRequest {
        let mut b = [0u8; 112];
        b[8] = id;
        RawRequest::from_bytes(Abi::X86_64, &b).unwrap()
    }

    fn open(fd: &OwnedFd) -> Arc<Log> {
        Log::open(fd.try_clone().unwrap()).unwrap()
    }

    fn ids(r: &Resumed) -> Vec<u64> {
        r.pending
            .iter()
            .map(|(_, raw)| raw.as_bytes()[8].into())
            .collect()
    }

    #[test]
    fn resume_after_a_crash_at_each_step() {
        let fd = create(2, 32).unwrap();
        let log = open(&fd);
        assert_eq!(log.connected_queues(), None);
        log.set_connected(2);
        let mut q = log.queue(1, 32).unwrap();
        q.fresh(100);
        // Three consumed; the second answered at 100 and published; the third answered at
        // 101, not published; a fourth logged but `cons` not moved (crash inside step 1).
        let e1 = q.consumed(&raw(1), 100).unwrap();
        let e2 = q.consumed(&raw(2), 101).unwrap();
        let e3 = q.consumed(&raw(3), 102).unwrap();
        q.answered(e2, 100);
        q.pushed(101);
        q.answered(e3, 101);
        let e4 = q.consumed(&raw(4), 103).unwrap();
        log.store(q.base + Q_CONS, 103);
        let _ = (e1, e4);

        let log2 = open(&fd);
        assert_eq!(log2.connected_queues(), Some(2));
        let mut r = log2.queue(1, 32).unwrap();
        let got = r.resume(Abi::X86_64, 32).unwrap();
        assert_eq!(
            (got.req_cons, got.rsp_pushed, got.rsp_written),
            (104, 101, 102)
        );
        assert_eq!(ids(&got), vec![1, 4]);
        // The rolled-forward response is freed by the next push, as any other.
        r.pushed(102);
        assert_eq!(r.free.len(), 62);
    }

    #[test]
    fn a_response_beyond_a_gap_is_answered_again() {
        let fd = create(1, 32).unwrap();
        let log = open(&fd);
        let mut q = log.queue(0, 32).unwrap();
        q.fresh(0);
        let a = q.consumed(&raw(1), 0).unwrap();
        let _b = q.consumed(&raw(2), 1).unwrap();
        // Response 0 written but its entry not yet marked (crash inside step 2), response 1
        // marked: 1 is not published, both are answered again.
        q.answered(a, 1);
        let got = open(&fd)
            .queue(0, 32)
            .unwrap()
            .resume(Abi::X86_64, 32)
            .unwrap();
        assert_eq!((got.req_cons, got.rsp_written), (2, 0));
        assert_eq!(ids(&got), vec![1, 2]);
    }

    #[test]
    fn a_log_that_contradicts_itself_is_refused() {
        let fd = create(1, 32).unwrap();
        let log = open(&fd);
        let mut q = log.queue(0, 32).unwrap();
        q.fresh(0);
        q.consumed(&raw(1), 0).unwrap();
        // Claims 40 consumed with one in flight.
        log.store(q.base + Q_CONS, 40);
        let r = open(&fd).queue(0, 32).unwrap().resume(Abi::X86_64, 32);
        assert!(matches!(r, Err(LogError::Inconsistent { .. })), "{r:?}");
        // A bad state word and a bad length.
        let mut q = log.queue(0, 32).unwrap();
        q.fresh(0);
        let e = q.consumed(&raw(1), 0).unwrap();
        log.store(q.entry(e) + E_LEN, 500);
        assert!(q.resume(Abi::X86_64, 32).is_err());
        log.store(q.entry(e) + E_STATE, 9);
        assert!(q.resume(Abi::X86_64, 32).is_err());
        // Not a log at all.
        let other = rustix::fs::memfd_create("x", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&other, 8192).unwrap();
        assert!(matches!(Log::open(other), Err(LogError::Format(_))));
    }

    #[test]
    fn entries_run_out_only_without_a_push() {
        let fd = create(1, 32).unwrap();
        let log = open(&fd);
        let mut q = log.queue(0, 32).unwrap();
        q.fresh(0);
        for i in 0..64u32 {
            let e = q.consumed(&raw(0), i).unwrap();
            q.answered(e, i);
        }
        assert!(!q.has_room());
        q.pushed(64);
        assert!(q.has_room());
    }
}
