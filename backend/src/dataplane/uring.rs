//! The io_uring of one queue, and the lifetimes of everything the kernel points at.
//!
//! This is the backend's one module with `unsafe` for I/O. The rule it enforces: an operation
//! in flight owns every piece of memory its SQE names until its last CQE has been reaped:
//! - a bounce [`Region`] (a slice of the registered [`BouncePool`]) moves into the slot's
//!   [`Owned`] entry on submission and comes back only in the [`Completion`];
//! - grant mappings (persistent or per request) are held by `Arc` clones in the same entry, and
//!   the iovecs pointing into them are built from those clones by [`Uring::map_segment`], so a
//!   pointer into a mapping never outlives the guard that keeps the mapping alive;
//! - the iovec array itself lives in the entry and is not touched while the entry is busy;
//! - timer timespecs live in this struct (the kernel copies them at submission).
//!
//! All SQEs go through [`Uring::push`], the one `unsafe { sq.push() }` call site. Dropping a
//! [`Uring`] with operations in flight first waits for them, so no memory is freed under the
//! kernel's feet (XSA-350's lesson for a userspace backend).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::ptr::NonNull;
use std::sync::Arc;
use std::time::Duration;

use io_uring::{opcode, squeue, types, IoUring};
use rustix::io::Errno;
use xen::GrantMapping;

/// `BLOCK_URING_CMD_DISCARD`: `_IO(0x12, 0)` (include/uapi/linux/fs.h, Linux 6.12).
const BLOCK_URING_CMD_DISCARD: u32 = 0x1200;
/// `FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE`.
const PUNCH_HOLE: i32 = 0x01 | 0x02;

/// Tag bit of operations that belong to no request slot.
const CONTROL: u64 = 1 << 63;
/// Tag bit of a slot's secondary operation (the fsync linked after a write).
const AUX: u64 = 1 << 32;

/// What a control (non-request) completion was for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Control {
    /// The event-channel fd polled readable.
    Event,
    /// The stop eventfd polled readable.
    Stop,
    /// The late-EOI delay expired.
    EoiTimer,
    /// The housekeeping tick (persistent grant aging).
    Tick,
}

impl Control {
    fn tag(self) -> u64 {
        CONTROL
            | match self {
                Control::Event => 1,
                Control::Stop => 2,
                Control::EoiTimer => 3,
                Control::Tick => 4,
            }
    }

    fn from_tag(tag: u64) -> Option<Self> {
        match tag {
            t if t == Control::Event.tag() => Some(Control::Event),
            t if t == Control::Stop.tag() => Some(Control::Stop),
            t if t == Control::EoiTimer.tag() => Some(Control::EoiTimer),
            t if t == Control::Tick.tag() => Some(Control::Tick),
            _ => None,
        }
    }
}

/// One `struct iovec`, laid out as the kernel reads it.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct Iovec {
    base: *mut u8,
    len: usize,
}

/// Private, page-aligned memory registered with the io_uring as fixed buffers: one region
/// per ring slot for direct requests (11 pages), and a few large regions for indirect
/// requests (`max_indirect_segments` pages each). A request's data is packed contiguously
/// in its region, so one `READ_FIXED`/`WRITE_FIXED` moves it all.
#[derive(Debug)]
pub(super) struct BouncePool {
    base: NonNull<u8>,
    len: usize,
    small: usize,
    nr_small: usize,
    large: usize,
    free_large: Vec<usize>,
}

/// Exclusive use of one bounce region. Not `Clone`: whoever holds it may write the bytes.
#[derive(Debug)]
pub(super) struct Region {
    offset: usize,
    cap: usize,
    large: bool,
}

impl Region {
    /// Capacity in bytes.
    pub(super) fn capacity(&self) -> usize {
        self.cap
    }
}

/// Bytes of a direct request's bounce region: 11 pages.
pub(super) const SMALL_REGION: usize = ring::MAX_SEGMENTS_PER_REQUEST * shmem::PAGE_SIZE;

impl BouncePool {
    fn new(nr_small: usize, large_pages: usize, nr_large: usize) -> io::Result<Self> {
        let small = SMALL_REGION;
        let large = large_pages * shmem::PAGE_SIZE;
        let len = (nr_small * small + nr_large * large).max(shmem::PAGE_SIZE);
        // SAFETY: a fresh anonymous private mapping; no existing memory is affected.
        let ptr = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                len,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::PRIVATE,
            )
        }
        .map_err(io::Error::from)?;
        let base =
            NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned NULL"))?;
        let large_base = nr_small * small;
        Ok(Self {
            base,
            len,
            small,
            nr_small,
            large,
            free_large: (0..nr_large)
                .rev()
                .map(|i| large_base + i * large)
                .collect(),
        })
    }

    /// The direct region of slot `slot`; the caller (the slot's owner) takes it at most once
    /// at a time, which [`super::queue`]'s slot allocator guarantees by handing out each slot
    /// index once until it is freed.
    pub(super) fn small(&self, slot: usize) -> Option<Region> {
        (slot < self.nr_small).then(|| Region {
            offset: slot * self.small,
            cap: self.small,
            large: false,
        })
    }

    /// A large region, if one is free.
    pub(super) fn take_large(&mut self) -> Option<Region> {
        self.free_large.pop().map(|offset| Region {
            offset,
            cap: self.large,
            large: true,
        })
    }

    /// Gives a region back (large ones return to the free list; small ones belong to their
    /// slot and need no bookkeeping).
    pub(super) fn give_back(&mut self, r: Region) {
        if r.large {
            self.free_large.push(r.offset);
        }
    }

    /// The first `len` bytes of a region, for grant copies. Holding `&mut Region` proves no
    /// I/O is in flight on it (a region in flight is owned by the [`Uring`]).
    pub(super) fn bytes<'a>(&'a self, r: &'a mut Region, len: usize) -> &'a mut [u8] {
        let len = len.min(r.cap);
        // SAFETY: offset..offset+cap lies inside the mapping (constructor arithmetic), which
        // lives as long as self; regions never overlap and a Region is not Clone, so this is
        // the only live slice of these bytes; the kernel touches them only while an SQE owns
        // the Region, which it cannot while we borrow it here.
        unsafe { std::slice::from_raw_parts_mut(self.base.as_ptr().wrapping_add(r.offset), len) }
    }

    fn iovec(&self) -> Iovec {
        Iovec {
            base: self.base.as_ptr(),
            len: self.len,
        }
    }
}

impl Drop for BouncePool {
    fn drop(&mut self) {
        // SAFETY: base/len is exactly the mapping made in new; Uring's Drop has waited for
        // every operation, and the ring (with its registration) is dropped before the pool.
        let _ = unsafe { rustix::mm::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

// SAFETY: the pool is plain private memory; slices are handed out only through &mut Region.
unsafe impl Send for BouncePool {}

/// What the kernel may be pointing at for one request slot.
#[derive(Debug, Default)]
struct Owned {
    /// SQEs submitted and not completed.
    pending: u32,
    /// Bytes the data operation must move (a short transfer is an error).
    expect: usize,
    /// The first error seen among the slot's CQEs.
    error: Option<Errno>,
    region: Option<Region>,
    guards: Vec<Arc<GrantMapping>>,
    iov: Vec<Iovec>,
}

// SAFETY: the raw pointers in iov point into memory owned by `guards` (or nothing), which is
// Send + Sync; they are only dereferenced by the kernel.
unsafe impl Send for Owned {}

/// A slot whose operations have all completed.
#[derive(Debug)]
pub(super) struct Completion {
    /// The slot.
    pub(super) slot: usize,
    /// The outcome: the first failing CQE's errno, or `EIO` for a short transfer.
    pub(super) result: Result<(), Errno>,
    /// The bounce region, back from the kernel (copy mode).
    pub(super) region: Option<Region>,
    /// The grant mappings the request's I/O used (map mode): the kernel has reported the I/O
    /// complete, which is not yet the same as having let go of the pages (see `retire`).
    pub(super) guards: Vec<Arc<GrantMapping>>,
}

/// A completion reaped from the ring.
#[derive(Debug)]
pub(super) enum Reaped {
    /// A control operation finished.
    Control(Control),
    /// All of a slot's operations finished.
    Slot(Completion),
}

/// The io_uring of one queue.
pub(super) struct Uring {
    // Field order matters for Drop: the ring (and so its buffer registration) goes before the
    // pool and the owned guards.
    ring: IoUring,
    owned: Vec<Owned>,
    pool: BouncePool,
    eoi_ts: Box<types::Timespec>,
    tick_ts: Box<types::Timespec>,
    cqes: Vec<(u64, i32)>,
    /// The registered files (the ring is restricted to them: `crate::sandbox::uring`).
    files: Vec<RawFd>,
}

impl std::fmt::Debug for Uring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uring")
            .field("slots", &self.owned.len())
            .finish_non_exhaustive()
    }
}

/// How the data of a read or write reaches the device.
#[derive(Debug)]
pub(super) enum Data {
    /// Through a bounce region (registered buffer), `len` bytes.
    Bounce(Region, usize),
    /// Through the iovecs built with [`Uring::map_segment`].
    Mapped,
}

impl Uring {
    /// A ring for `slots` request slots, with a bounce pool when `bounce` is set
    /// (`large_pages` pages for each of `nr_large` indirect regions), restricted to the
    /// operations the queue submits on `files` (see `crate::sandbox::uring`).
    pub(super) fn new(
        slots: usize,
        bounce: bool,
        large_pages: usize,
        nr_large: usize,
        max_segs: usize,
        files: &[BorrowedFd<'_>],
    ) -> io::Result<Self> {
        let entries = u32::try_from((slots * 2 + 8).next_power_of_two())
            .unwrap_or(4096)
            .min(4096);
        let ring = crate::sandbox::uring::builder()
            .setup_single_issuer()
            .setup_coop_taskrun()
            .build(entries)
            .or_else(|_| crate::sandbox::uring::builder().build(entries))?;
        let pool = if bounce {
            BouncePool::new(slots, large_pages, nr_large)?
        } else {
            BouncePool::new(0, 0, 0)?
        };
        if bounce {
            let iov = [pool.iovec()];
            // SAFETY: Iovec is #[repr(C)] {pointer, usize}, the layout of struct iovec; the
            // slice borrows `iov` for this statement only.
            let iovs = unsafe { std::slice::from_raw_parts(iov.as_ptr().cast(), 1) };
            // SAFETY: the registered memory is the pool's mapping, which outlives the ring
            // (field order; Drop waits for in-flight I/O first).
            unsafe { ring.submitter().register_buffers(iovs) }?;
        }
        let files: Vec<RawFd> = files.iter().map(AsRawFd::as_raw_fd).collect();
        crate::sandbox::uring::restrict(&ring, &files)?;
        let owned = (0..slots)
            .map(|_| Owned {
                guards: Vec::with_capacity(max_segs + 1),
                iov: Vec::with_capacity(max_segs),
                ..Owned::default()
            })
            .collect();
        Ok(Self {
            ring,
            owned,
            pool,
            eoi_ts: Box::new(types::Timespec::new()),
            tick_ts: Box::new(types::Timespec::new()),
            cqes: Vec::with_capacity(entries as usize * 2),
            files,
        })
    }

    /// The registered index of `fd`: every operation names a registered file.
    fn fixed(&self, fd: BorrowedFd<'_>) -> io::Result<types::Fixed> {
        let raw = fd.as_raw_fd();
        self.files
            .iter()
            .position(|&f| f == raw)
            .and_then(|i| u32::try_from(i).ok())
            .map(types::Fixed)
            .ok_or_else(|| io::Error::other("fd not registered with the io_uring"))
    }

    /// The bounce pool.
    pub(super) fn pool(&mut self) -> &mut BouncePool {
        &mut self.pool
    }

    /// Shared access to the pool (for building grant copies over several regions at once).
    pub(super) fn pool_ref(&self) -> &BouncePool {
        &self.pool
    }

    /// Adds one segment of a mapped request to `slot`'s iovecs: `len` bytes at `offset` in
    /// `guard`'s mapping, which the device writes into unless `write` (then it only reads
    /// them). The guard is kept until the slot completes.
    ///
    /// # Errors
    /// `EINVAL` if the range lies outside the mapping or the slot is busy; `EACCES` when the
    /// device would write into a read-only mapping.
    pub(super) fn map_segment(
        &mut self,
        slot: usize,
        guard: &Arc<GrantMapping>,
        offset: usize,
        len: usize,
        write: bool,
    ) -> Result<(), Errno> {
        let o = self.owned.get_mut(slot).ok_or(Errno::INVAL)?;
        if o.pending > 0 {
            return Err(Errno::INVAL);
        }
        let base = if write {
            let sub = guard.mem().subregion(offset, len);
            sub.map_err(|_| Errno::INVAL)?.as_ptr().cast_mut()
        } else {
            let mem = guard.writable().ok_or(Errno::ACCESS)?;
            mem.subregion(offset, len)
                .map_err(|_| Errno::INVAL)?
                .as_ptr()
        };
        if !o.guards.last().is_some_and(|g| Arc::ptr_eq(g, guard)) {
            o.guards.push(Arc::clone(guard));
        }
        o.iov.push(Iovec { base, len });
        Ok(())
    }

    /// Forgets the iovecs and guards of a slot that will not be submitted (a mapping failed
    /// half-way): the guards drop here, unmapping what was mapped for it.
    pub(super) fn reset_slot(&mut self, slot: usize) {
        if let Some(o) = self.owned.get_mut(slot).filter(|o| o.pending == 0) {
            o.guards.clear();
            o.iov.clear();
        }
    }

    /// Submits a read (`write == false`) or write of the slot's data at byte `offset`,
    /// followed, when `fsync` is set, by a linked `fdatasync`.
    ///
    /// # Errors
    /// When the submission queue cannot take the entries even after submitting; the data
    /// (region) is then returned to the caller through the error's second field.
    pub(super) fn submit_rw(
        &mut self,
        slot: usize,
        fd: BorrowedFd<'_>,
        write: bool,
        offset: u64,
        data: Data,
        fsync: bool,
    ) -> Result<(), (io::Error, Option<Region>)> {
        let fdt = match self.fixed(fd) {
            Ok(f) => f,
            Err(e) => return Err((e, data_region(data))),
        };
        let Some(o) = self.owned.get_mut(slot) else {
            return Err((io::Error::other("bad slot"), data_region(data)));
        };
        if o.pending > 0 {
            return Err((io::Error::other("slot busy"), data_region(data)));
        }
        let entry = match data {
            Data::Bounce(region, len) => {
                let len = len.min(region.cap);
                // The pointer is derived from the pool for the region that moves into `o`.
                let ptr = self.pool.base.as_ptr().wrapping_add(region.offset);
                let len32 = u32::try_from(len).unwrap_or(u32::MAX);
                let e = if write {
                    opcode::WriteFixed::new(fdt, ptr, len32, 0)
                        .offset(offset)
                        .build()
                } else {
                    opcode::ReadFixed::new(fdt, ptr, len32, 0)
                        .offset(offset)
                        .build()
                };
                o.expect = len;
                o.region = Some(region);
                e
            }
            Data::Mapped => {
                let n = u32::try_from(o.iov.len()).unwrap_or(u32::MAX);
                o.expect = o.iov.iter().map(|v| v.len).sum();
                let iov = o.iov.as_ptr().cast();
                if write {
                    opcode::Writev::new(fdt, iov, n).offset(offset).build()
                } else {
                    opcode::Readv::new(fdt, iov, n).offset(offset).build()
                }
            }
        };
        o.error = None;
        let tag = slot as u64;
        let mut entries = [
            entry.user_data(tag),
            opcode::Fsync::new(fdt)
                .flags(types::FsyncFlags::DATASYNC)
                .build()
                .user_data(tag | AUX),
        ];
        let n = if fsync {
            entries[0] = entries[0].clone().flags(squeue::Flags::IO_LINK);
            2
        } else {
            1
        };
        match self.push(&entries[..n]) {
            Ok(()) => {
                if let Some(o) = self.owned.get_mut(slot) {
                    o.pending = n as u32;
                }
                Ok(())
            }
            Err(e) => {
                let region = self.owned.get_mut(slot).and_then(|o| {
                    o.iov.clear();
                    o.guards.clear();
                    o.region.take()
                });
                Err((e, region))
            }
        }
    }

    /// Submits an `fdatasync` of the device for a flush request.
    ///
    /// # Errors
    /// When the submission queue is full even after submitting.
    pub(super) fn submit_fsync(&mut self, slot: usize, fd: BorrowedFd<'_>) -> io::Result<()> {
        let e = opcode::Fsync::new(self.fixed(fd)?)
            .flags(types::FsyncFlags::DATASYNC)
            .build();
        self.submit_aux(slot, e)
    }

    /// Submits a discard of `len` bytes at `offset`: the block layer's io_uring discard
    /// command on a block device, a punched hole in a file.
    ///
    /// # Errors
    /// When the submission queue is full even after submitting.
    pub(super) fn submit_discard(
        &mut self,
        slot: usize,
        fd: BorrowedFd<'_>,
        block: bool,
        offset: u64,
        len: u64,
    ) -> io::Result<()> {
        let fdt = self.fixed(fd)?;
        let e = if block {
            // blkdev_uring_cmd reads the start from sqe->addr and the length from sqe->addr3,
            // which is where the command bytes begin.
            let mut cmd = [0u8; 16];
            cmd[..8].copy_from_slice(&len.to_ne_bytes());
            opcode::UringCmd16::new(fdt, BLOCK_URING_CMD_DISCARD)
                .addr(Some(offset))
                .cmd(cmd)
                .build()
        } else {
            opcode::Fallocate::new(fdt, len)
                .offset(offset)
                .mode(PUNCH_HOLE)
                .build()
        };
        self.submit_aux(slot, e)
    }

    fn submit_aux(&mut self, slot: usize, e: squeue::Entry) -> io::Result<()> {
        match self.owned.get(slot) {
            Some(o) if o.pending == 0 => {}
            _ => return Err(io::Error::other("slot busy")),
        }
        self.push(&[e.user_data(slot as u64 | AUX)])?;
        if let Some(o) = self.owned.get_mut(slot) {
            o.pending = 1;
            o.expect = 0;
            o.error = None;
        }
        Ok(())
    }

    /// Arms a one-shot poll for readability of `fd`.
    ///
    /// # Errors
    /// When the submission queue is full even after submitting.
    pub(super) fn poll(&mut self, what: Control, fd: BorrowedFd<'_>) -> io::Result<()> {
        let e = opcode::PollAdd::new(self.fixed(fd)?, rustix::event::PollFlags::IN.bits().into())
            .build();
        self.push(&[e.user_data(what.tag())])
    }

    /// Arms a timer that completes after `after`.
    ///
    /// # Errors
    /// When the submission queue is full even after submitting.
    pub(super) fn timer(&mut self, what: Control, after: Duration) -> io::Result<()> {
        let ts = types::Timespec::new()
            .sec(after.as_secs())
            .nsec(after.subsec_nanos());
        let p: *const types::Timespec = if what == Control::Tick {
            *self.tick_ts = ts;
            &*self.tick_ts
        } else {
            *self.eoi_ts = ts;
            &*self.eoi_ts
        };
        // The restriction requires IOSQE_FIXED_FILE on every SQE; a timeout has no file and
        // the kernel ignores the flag there.
        let e = opcode::Timeout::new(p)
            .build()
            .flags(squeue::Flags::FIXED_FILE)
            .user_data(what.tag());
        self.push(&[e])
    }

    /// Pushes entries, submitting first when the queue has no room.
    fn push(&mut self, entries: &[squeue::Entry]) -> io::Result<()> {
        let room = {
            let sq = self.ring.submission();
            sq.capacity() - sq.len()
        };
        if room < entries.len() {
            self.ring.submit()?;
        }
        let mut sq = self.ring.submission();
        // SAFETY: every pointer in these entries refers to memory this Uring keeps alive until
        // the entry's completion is reaped: bounce regions and iovec arrays and grant mapping
        // guards are owned by the slot's `Owned` entry (its `pending` count keeps them there),
        // timespecs are fields of self (the kernel copies them when it reads the SQE), and the
        // fds are owned by the queue, which drops this Uring (waiting for all completions)
        // before closing them.
        unsafe { sq.push_multiple(entries) }.map_err(|_| io::Error::from(io::ErrorKind::WouldBlock))
    }

    /// Submits everything queued and waits for at least `want` completions.
    ///
    /// # Errors
    /// A failed `io_uring_enter` other than `EINTR`/`EBUSY` (those count as success).
    pub(super) fn submit_and_wait(&mut self, want: usize) -> io::Result<()> {
        match self.ring.submit_and_wait(want) {
            Ok(_) => Ok(()),
            // Interrupted, or the completion queue is full: reaping comes next either way.
            Err(e)
                if e.raw_os_error() == Some(Errno::INTR.raw_os_error())
                    || e.raw_os_error() == Some(Errno::BUSY.raw_os_error()) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Hands the queued entries to the kernel without waiting; `false` when none were queued
    /// (no system call then).
    ///
    /// # Errors
    /// As [`Uring::submit_and_wait`].
    pub(super) fn submit_queued(&mut self) -> io::Result<bool> {
        if self.ring.submission().is_empty() {
            return Ok(false);
        }
        self.submit_and_wait(0).map(|()| true)
    }

    /// Whether completions are waiting to be reaped.
    pub(super) fn has_completions(&mut self) -> bool {
        !self.ring.completion().is_empty()
    }

    /// Reaps every queued completion into `out`.
    pub(super) fn reap(&mut self, out: &mut Vec<Reaped>) {
        self.cqes.clear();
        self.cqes
            .extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
        for i in 0..self.cqes.len() {
            let (tag, res) = self.cqes[i];
            if tag & CONTROL != 0 {
                if let Some(c) = Control::from_tag(tag) {
                    out.push(Reaped::Control(c));
                }
                continue;
            }
            let slot = (tag & 0xffff_ffff) as usize;
            let aux = tag & AUX != 0;
            let Some(o) = self.owned.get_mut(slot) else {
                continue;
            };
            if res < 0 {
                o.error.get_or_insert(Errno::from_raw_os_error(-res));
            } else if !aux && res as usize != o.expect {
                o.error.get_or_insert(Errno::IO);
            }
            o.pending = o.pending.saturating_sub(1);
            if o.pending == 0 {
                // The kernel has completed everything this slot pointed at.
                o.iov.clear();
                out.push(Reaped::Slot(Completion {
                    slot,
                    result: o.error.take().map_or(Ok(()), Err),
                    region: o.region.take(),
                    guards: std::mem::take(&mut o.guards),
                }));
            }
        }
    }

    /// Operations of request slots still in flight.
    pub(super) fn slots_in_flight(&self) -> usize {
        self.owned.iter().filter(|o| o.pending > 0).count()
    }

    /// Waits until no request operation is in flight, reaping into `out`.
    ///
    /// # Errors
    /// When waiting fails (other than `EINTR`); what is still in flight stays owned.
    pub(super) fn drain(&mut self, out: &mut Vec<Reaped>) -> io::Result<()> {
        while self.slots_in_flight() > 0 {
            if let Err(e) = self.ring.submit_and_wait(1) {
                if e.raw_os_error() != Some(Errno::INTR.raw_os_error()) {
                    return Err(e);
                }
            }
            self.reap(out);
        }
        Ok(())
    }
}

fn data_region(d: Data) -> Option<Region> {
    match d {
        Data::Bounce(r, _) => Some(r),
        Data::Mapped => None,
    }
}

impl Drop for Uring {
    fn drop(&mut self) {
        // Wait for every request operation: the kernel may still write into bounce regions
        // or grant mappings. Control operations (polls, timers) point at nothing that dies
        // here but the timespecs, which the kernel copied at submission.
        let mut sink = Vec::new();
        if let Err(e) = self.drain(&mut sink) {
            // Cannot wait: leak the memory rather than free it under the kernel.
            tracing::error!("io_uring wait failed while draining: {e}; leaking buffers");
            let owned = std::mem::take(&mut self.owned);
            std::mem::forget(owned);
            let pool = std::mem::replace(
                &mut self.pool,
                BouncePool {
                    base: NonNull::dangling(),
                    len: 0,
                    small: 0,
                    nr_small: 0,
                    large: 0,
                    free_large: Vec::new(),
                },
            );
            std::mem::forget(pool);
        }
    }
}
