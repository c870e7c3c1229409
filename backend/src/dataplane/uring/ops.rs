//! The operations a queue submits, each built into SQEs that name only memory the slot's
//! [`Flight`] owns (or fields of the [`Uring`]), then pushed through [`Uring::push`].

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::Arc;
use std::time::Duration;

use io_uring::{opcode, squeue, types};
use rustix::io::Errno;
use xen::GrantMapping;

use super::{
    Control, Data, Iovec, Uring, AUX, EVTCHN_CHAIN_POLL, EVTCHN_POLL, EVTCHN_READ, EVTCHN_REMOVE,
    EVTCHN_UNMASK,
};
use crate::dataplane::bounce::Region;

/// `BLOCK_URING_CMD_DISCARD`: `_IO(0x12, 0)` (include/uapi/linux/fs.h, Linux 6.12).
const BLOCK_URING_CMD_DISCARD: u32 = 0x1200;
/// `FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE`.
const PUNCH_HOLE: i32 = 0x01 | 0x02;

fn data_region(d: Data) -> Option<Region> {
    match d {
        Data::Bounce(r, _) => Some(r),
        Data::Mapped => None,
    }
}

impl Uring {
    /// The registered index of `fd`: every operation names a registered file.
    pub(super) fn fixed(&self, fd: BorrowedFd<'_>) -> io::Result<types::Fixed> {
        let raw = fd.as_raw_fd();
        self.files
            .iter()
            .position(|&f| f == raw)
            .and_then(|i| u32::try_from(i).ok())
            .map(types::Fixed)
            .ok_or_else(|| io::Error::other("fd not registered with the io_uring"))
    }

    /// Adds one segment of a mapped request to `slot`'s iovecs: `len` bytes at `offset` in
    /// `guard`'s mapping, which the device writes into unless `write` (then it only reads
    /// them). The guard is kept until the slot completes.
    ///
    /// # Errors
    /// `EINVAL` if the range lies outside the mapping or the slot is busy; `EACCES` when the
    /// device would write into a read-only mapping.
    pub(in crate::dataplane) fn map_segment(
        &mut self,
        slot: usize,
        guard: &Arc<GrantMapping>,
        offset: usize,
        len: usize,
        write: bool,
    ) -> Result<(), Errno> {
        let o = self.flights.get_mut(slot).ok_or(Errno::INVAL)?;
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
    pub(in crate::dataplane) fn reset_slot(&mut self, slot: usize) {
        if let Some(o) = self.flights.get_mut(slot).filter(|o| o.pending == 0) {
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
    pub(in crate::dataplane) fn submit_rw(
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
        let Some(o) = self.flights.get_mut(slot) else {
            return Err((io::Error::other("bad slot"), data_region(data)));
        };
        if o.pending > 0 {
            return Err((io::Error::other("slot busy"), data_region(data)));
        }
        let entry = match data {
            Data::Bounce(region, len) => {
                let len = len.min(region.capacity());
                // The pointer is derived from the registered memory for the region that moves
                // into `o`.
                let Some(ptr) = self.bounce.as_ref().and_then(|m| m.ptr(&region, len)) else {
                    return Err((io::Error::other("not a registered region"), Some(region)));
                };
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
                if let Some(o) = self.flights.get_mut(slot) {
                    o.pending = n as u32;
                }
                Ok(())
            }
            Err(e) => {
                let region = self.flights.get_mut(slot).and_then(|o| {
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
    pub(in crate::dataplane) fn submit_fsync(
        &mut self,
        slot: usize,
        fd: BorrowedFd<'_>,
    ) -> io::Result<()> {
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
    pub(in crate::dataplane) fn submit_discard(
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
        match self.flights.get(slot) {
            Some(o) if o.pending == 0 => {}
            _ => return Err(io::Error::other("slot busy")),
        }
        self.push(&[e.user_data(slot as u64 | AUX)])?;
        if let Some(o) = self.flights.get_mut(slot) {
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
    pub(in crate::dataplane) fn poll(
        &mut self,
        what: Control,
        fd: BorrowedFd<'_>,
    ) -> io::Result<()> {
        let e = opcode::PollAdd::new(self.fixed(fd)?, rustix::event::PollFlags::IN.bits().into())
            .build();
        self.push(&[e.user_data(what.tag())])
    }

    /// Arms the event channel's poll on its own (nothing delivered to read).
    ///
    /// # Errors
    /// When the submission queue is full even after submitting.
    pub(in crate::dataplane) fn evtchn_poll(&mut self, fd: BorrowedFd<'_>) -> io::Result<()> {
        let e = opcode::PollAdd::new(self.fixed(fd)?, rustix::event::PollFlags::IN.bits().into())
            .build()
            .user_data(EVTCHN_POLL);
        self.push(&[e])
    }

    /// Queues, as one linked chain (see [`super::EvtchnIo`]): the unmask of `unmask` by a
    /// write of its number on the event channel's fd (the Linux device's unmask), the read of
    /// the one delivery that woke the queue, then the next poll. The device's fd has no
    /// `FMODE_NOWAIT`: a read that found nothing would fail with `EAGAIN` (the fd is
    /// non-blocking) or wait in io-wq, so it is issued only where a poll has seen a delivery.
    /// `READV`/`WRITEV` of one iovec rather than `READ`/`WRITE`: the allow-list has them
    /// already, and the kernel loops `read()` for a device without `read_iter`. Where the
    /// kernel can, the read and unmask post no CQE when they succeed, so that the wait that
    /// follows ends only for what the queue waits for.
    ///
    /// # Errors
    /// When the submission queue is full even after submitting, or the previous chain has
    /// not ended (its read and write may still use the memory this one would).
    pub(in crate::dataplane) fn evtchn_rearm(
        &mut self,
        fd: BorrowedFd<'_>,
        unmask: Option<xen::Port>,
    ) -> io::Result<()> {
        if self.evtchn_io.chain {
            return Err(io::Error::other("an event channel read is still in flight"));
        }
        let fdt = self.fixed(fd)?;
        let link = if self.skip_success {
            squeue::Flags::IO_LINK | squeue::Flags::SKIP_SUCCESS
        } else {
            squeue::Flags::IO_LINK
        };
        let write = unmask.map(|port| {
            self.evtchn_io.unmask = port.to_ne_bytes();
            let iov: *const Iovec = &self.evtchn_io.unmask_iov;
            // Offset -1: at the file's position (the fd is a stream; it has none).
            opcode::Writev::new(fdt, iov.cast(), 1)
                .offset(u64::MAX)
                .build()
                .flags(link)
                .user_data(EVTCHN_UNMASK)
        });
        let iov: *const Iovec = &self.evtchn_io.read_iov;
        let read = opcode::Readv::new(fdt, iov.cast(), 1)
            .offset(u64::MAX)
            .build()
            .flags(link)
            .user_data(EVTCHN_READ);
        let poll = opcode::PollAdd::new(fdt, rustix::event::PollFlags::IN.bits().into())
            .build()
            .user_data(EVTCHN_CHAIN_POLL);
        match write {
            Some(write) => self.push(&[write, read, poll])?,
            None => self.push(&[read, poll])?,
        }
        self.evtchn_io.chain = true;
        Ok(())
    }

    /// Removes the poll at the end of the event channel's chain (to end the chain when the
    /// ring is drained); its CQE then says `ECANCELED`.
    ///
    /// # Errors
    /// When the submission queue is full even after submitting.
    pub(super) fn evtchn_remove_poll(&mut self) -> io::Result<()> {
        // The restriction requires IOSQE_FIXED_FILE on every SQE; POLL_REMOVE has no file
        // and the kernel ignores the flag there.
        let e = opcode::PollRemove::new(EVTCHN_CHAIN_POLL)
            .build()
            .flags(squeue::Flags::FIXED_FILE)
            .user_data(EVTCHN_REMOVE);
        self.push(&[e])?;
        self.evtchn_io.removing = true;
        Ok(())
    }

    /// Arms a timer that completes after `after`.
    ///
    /// # Errors
    /// When the submission queue is full even after submitting.
    pub(in crate::dataplane) fn timer(&mut self, what: Control, after: Duration) -> io::Result<()> {
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
}
