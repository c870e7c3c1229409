//! Simulated grant tables with Xen's v1 semantics, in shared files so that they work across
//! processes.
//!
//! Each domain with memory has `gnttab.<domid>`: a 64-byte header, then `nr_entries` v1 grant
//! entries `{u16 flags, u16 domid, u32 frame}` (the granting guest writes them, as in Xen),
//! then per entry a `u32` pin word and a `u32` lock word, which in Xen are the hypervisor's
//! private active entry and its lock, then the journal slots (below).
//! The guest's memory is `mem.<domid>`, `frames` pages.
//!
//! The "hypervisor" side (mapping, copying) runs in the mapping process and follows Xen's
//! `_set_status_v1` (xen/common/grant_table.c): the flags and domid are updated together by
//! compare-and-swap on the combined 32-bit word, setting `GTF_reading` (and `GTF_writing` for
//! a writable pin) while the grant is pinned, so that the guest's end of access
//! (`gnttab_end_foreign_access_ref`: compare-and-swap to 0 unless reading/writing is set)
//! fails while the grant is in use. Statuses are Xen's: a ref beyond the table is
//! `GNTST_bad_gntref`; a ref not granted, granted to another domain, or read-only for a
//! writable pin is `GNTST_general_error` (Xen's "Bad flags or dom" and "Attempt to write-pin
//! a r/o grant entry"); a frame beyond the guest's memory is `GNTST_bad_page`; an unknown or
//! destroyed domain is `GNTST_bad_domain`.
//!
//! Xen's grant operations are hypercalls, which a dying process cannot leave half done, and
//! Xen releases a process's mappings when its gntdev fd closes. Here the hypervisor's work
//! runs in the calling process, so the table keeps what a dead process must not leave behind:
//! - each process's view of a table is a *holder* with an id from the header and a datagram
//!   socket `gnttab.<domid>.h<id>` bound while it lives and never read ([`socket_alive`]
//!   probes it: the kernel closes a dead process's sockets as it exits, zombie or not, and the
//!   probe needs only `sendto`, which a confined backend may use);
//! - an entry's pin lock is a lock word holding its holder's id. A waiter that has spun a
//!   while probes the holder and, finding it dead, takes the lock over and recomputes the
//!   entry's pins from the journals (below), so a lock never outlives its holder and a pin
//!   half taken or half dropped is settled;
//! - a grantee's view pins through a journal slot it claims in the granting domain's table:
//!   one count word per entry, in the pin word's format, changed under the entry's lock
//!   before the pin word. Whenever an entry is unlocked its pin word is the sum of its counts
//!   over all slots. A slot whose holder died is reaped (its counts taken off the pin words,
//!   the flags cleared where no pins remain, the slot freed) by the next grantee that claims
//!   a slot, and by the guest when an end of access finds the grant in use: the death is
//!   noticed then, as Xen notices a closed gntdev fd. Reaping is idempotent under the entry
//!   locks, so reapers may race and die too.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shmem::{SharedMem, PAGE_SIZE};

use crate::evtchn::{bound_socket, socket_alive};
use crate::shm::{unmap_raw, MappedFile, Reservation};
use crate::{domain_file, open_mem, SimError};
use xen::{check_copy_batch, check_map_refs};
use xen::{
    Access, CopyOp, DomId, GrantCopier, GrantError, GrantMapper, GrantMapping, GrantRef,
    GrantStatus, Unmap, UnmapNotify,
};

const MAGIC: u32 = 0x3154_4e47; // "GNT1"
const HEADER: usize = 64;
const OFF_MAGIC: usize = 0;
const OFF_NR: usize = 4;
const OFF_FRAMES: usize = 8;
const OFF_STATE: usize = 12;
/// The last holder id handed out (ids are 1..2^31).
const OFF_HOLDERS: usize = 16;
const ENTRY: usize = 8;
const STATE_ALIVE: u32 = 1;
const STATE_DEAD: u32 = 2;

/// `GTF_permit_access`: the entry grants access to `frame` for `domid`.
const GTF_PERMIT_ACCESS: u32 = 1;
/// `GTF_type_mask`.
const GTF_TYPE_MASK: u32 = 3;
/// `GTF_readonly`: the grantee may only read.
const GTF_READONLY: u32 = 1 << 2;
/// `GTF_reading`: set by the hypervisor while the grant is pinned.
const GTF_READING: u32 = 1 << 3;
/// `GTF_writing`: set by the hypervisor while the grant is pinned writable.
const GTF_WRITING: u32 = 1 << 4;
/// `GNTTAB_NR_RESERVED_ENTRIES`: refs a Linux guest never hands out (the toolstack's).
pub(crate) const RESERVED_ENTRIES: u32 = 8;
/// A `domid` marking an entry a guest is filling in (`DOMID_INVALID`); its flags are 0, so
/// Xen's checks refuse it like any invalid entry.
const DOMID_INVALID: u32 = 0x7ff4;

/// Pin word (and a journal's count word): bits 16..31 count writable pins, bits 0..16 count
/// all pins. Beside it, the entry's lock word (standing for Xen's active-entry lock): 0 when
/// free, else its holder's id.
const PIN_ONE_WRITER: u32 = 1 << 16;
const PIN_COUNT_MASK: u32 = 0xffff;
const PIN_WRITERS_MASK: u32 = 0x7fff << 16;
/// Journal slots per table: the grantee views (processes and their domains) that can hold
/// pins at once.
const SLOTS: usize = 64;
/// Ids handed to holders stay below this.
const HOLDER_ID_LIMIT: u32 = 1 << 31;
/// Spins on a held lock between probes of its holder.
const PROBE_EVERY: u32 = 256;

/// One process's view of a table: the id its locks and journal slot carry, alive while its
/// socket is bound.
#[derive(Debug)]
struct Holder {
    id: u32,
    path: PathBuf,
    sock: OwnedFd,
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn holder_path(table: &Path, id: u32) -> PathBuf {
    let mut p = table.as_os_str().to_owned();
    p.push(format!(".h{id}"));
    PathBuf::from(p)
}

fn combo(flags: u32, domid: DomId) -> u32 {
    flags | (u32::from(domid) << 16)
}

/// One domain's grant table file, mapped.
#[derive(Debug)]
pub(crate) struct GrantTable {
    map: MappedFile,
    nr: u32,
    frames: u32,
    path: PathBuf,
    holder: Holder,
}

impl GrantTable {
    /// Bytes a table of `nr` entries occupies.
    pub(crate) fn file_len(nr: u32) -> usize {
        HEADER + nr as usize * (ENTRY + 8) + SLOTS * 4 + SLOTS * nr as usize * 4
    }

    /// Initialises a freshly created, zeroed file of [`GrantTable::file_len`] bytes.
    pub(crate) fn init(file: &File, path: &Path, nr: u32, frames: u32) -> Result<(), SimError> {
        let map =
            MappedFile::map(file.as_fd(), Self::file_len(nr)).map_err(SimError::io("map", path))?;
        let m = map.mem();
        let init = m
            .write_u32(OFF_NR, nr)
            .and(m.write_u32(OFF_FRAMES, frames))
            .and(m.store_u32(OFF_STATE, STATE_ALIVE, Ordering::Release))
            .and(m.store_u32(OFF_MAGIC, MAGIC, Ordering::Release));
        init.map_err(|_| SimError::Corrupt(path.to_owned()))
    }

    /// Opens and maps an initialised table.
    pub(crate) fn open(path: &Path) -> Result<Self, SimError> {
        let file = File::options()
            .read(true)
            .write(true)
            .open(path)
            .map_err(SimError::io("open", path))?;
        let len = file.metadata().map_err(SimError::io("stat", path))?.len();
        let corrupt = || SimError::Corrupt(path.to_owned());
        if len < HEADER as u64 {
            return Err(corrupt());
        }
        let header = MappedFile::map(file.as_fd(), HEADER).map_err(SimError::io("map", path))?;
        let h = header.mem();
        let magic = h
            .load_u32(OFF_MAGIC, Ordering::Acquire)
            .map_err(|_| corrupt())?;
        let nr = h.read_u32(OFF_NR).map_err(|_| corrupt())?;
        let frames = h.read_u32(OFF_FRAMES).map_err(|_| corrupt())?;
        if magic != MAGIC || (Self::file_len(nr) as u64) > len {
            return Err(corrupt());
        }
        let map =
            MappedFile::map(file.as_fd(), Self::file_len(nr)).map_err(SimError::io("map", path))?;
        let m = map.mem();
        let mut id = m.load_u32(OFF_HOLDERS, Ordering::Relaxed);
        let id = loop {
            let cur = id.map_err(|_| corrupt())?;
            let next = (cur + 1) % HOLDER_ID_LIMIT;
            let next = next.max(1);
            match m.compare_exchange_u32(OFF_HOLDERS, cur, next) {
                Ok(Ok(_)) => break next,
                Ok(Err(now)) => id = Ok(now),
                Err(_) => return Err(corrupt()),
            }
        };
        let hpath = holder_path(path, id);
        let sock = bound_socket(&hpath)?;
        let holder = Holder {
            id,
            path: hpath,
            sock,
        };
        Ok(Self {
            map,
            nr,
            frames,
            path: path.to_owned(),
            holder,
        })
    }

    fn mem(&self) -> SharedMem<'_> {
        self.map.mem()
    }

    fn entry_off(&self, gref: GrantRef) -> Option<usize> {
        (gref < self.nr).then(|| HEADER + gref as usize * ENTRY)
    }

    fn pin_off(&self, gref: GrantRef) -> usize {
        HEADER + self.nr as usize * ENTRY + gref as usize * 4
    }

    fn lock_off(&self, gref: GrantRef) -> usize {
        HEADER + self.nr as usize * (ENTRY + 4) + gref as usize * 4
    }

    fn slot_off(&self, slot: usize) -> usize {
        HEADER + self.nr as usize * (ENTRY + 8) + slot * 4
    }

    fn count_off(&self, slot: usize, gref: GrantRef) -> usize {
        HEADER
            + self.nr as usize * (ENTRY + 8)
            + SLOTS * 4
            + (slot * self.nr as usize + gref as usize) * 4
    }

    /// Whether the holder with id `id` is alive.
    fn holder_alive(&self, id: u32) -> bool {
        id == self.holder.id || socket_alive(&self.holder_path(id), self.holder.sock.as_fd())
    }

    fn holder_path(&self, id: u32) -> PathBuf {
        holder_path(&self.path, id)
    }

    /// Whether the domain still exists.
    pub(crate) fn alive(&self) -> bool {
        self.mem().load_u32(OFF_STATE, Ordering::Acquire) == Ok(STATE_ALIVE)
    }

    /// Marks the domain destroyed: every later pin fails with `GNTST_bad_domain`.
    pub(crate) fn kill(&self) {
        // The offset is inside the header, so the store cannot fail.
        let _ = self
            .mem()
            .store_u32(OFF_STATE, STATE_DEAD, Ordering::Release);
    }

    /// Pages of the granting domain's memory.
    pub(crate) fn frames(&self) -> u32 {
        self.frames
    }

    /// Number of entries.
    pub(crate) fn len(&self) -> u32 {
        self.nr
    }

    /// Guest side: grants `frame` to `to`, as a Linux guest's `gnttab_grant_foreign_access`
    /// (frame and domid first, then the flags that make the entry valid).
    pub(crate) fn grant(
        &self,
        to: DomId,
        frame: u32,
        readonly: bool,
    ) -> Result<GrantRef, SimError> {
        if frame >= self.frames {
            return Err(SimError::BadFrame(frame));
        }
        let m = self.mem();
        for gref in RESERVED_ENTRIES..self.nr {
            let Some(off) = self.entry_off(gref) else {
                break;
            };
            // Claim a free entry (flags 0) by marking it as being filled in.
            if m.compare_exchange_u32(off, 0, DOMID_INVALID << 16) != Ok(Ok(0)) {
                continue;
            }
            let flags = GTF_PERMIT_ACCESS | if readonly { GTF_READONLY } else { 0 };
            let published = m.write_u32(off + 4, frame).and(m.store_u32(
                off,
                combo(flags, to),
                Ordering::Release,
            ));
            return published.map(|()| gref).map_err(|_| SimError::NoFreeGrant);
        }
        Err(SimError::NoFreeGrant)
    }

    /// Guest side: ends access to `gref` like `gnttab_end_foreign_access_ref`: fails while the
    /// grantee has it mapped or is copying (`GTF_reading`/`GTF_writing` set).
    pub(crate) fn end_access(&self, gref: GrantRef) -> Result<(), SimError> {
        match self.try_end_access(gref) {
            Err(SimError::GrantInUse(_)) if self.reap_dead() => self.try_end_access(gref),
            r => r,
        }
    }

    fn try_end_access(&self, gref: GrantRef) -> Result<(), SimError> {
        let off = self.entry_off(gref).ok_or(SimError::BadGrant(gref))?;
        let m = self.mem();
        let mut cur = m
            .load_u32(off, Ordering::Acquire)
            .map_err(|_| SimError::BadGrant(gref))?;
        loop {
            if cur & GTF_TYPE_MASK != GTF_PERMIT_ACCESS {
                return Err(SimError::BadGrant(gref));
            }
            if cur & (GTF_READING | GTF_WRITING) != 0 {
                return Err(SimError::GrantInUse(gref));
            }
            match m.compare_exchange_u32(off, cur, 0) {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(now)) => cur = now,
                Err(_) => return Err(SimError::BadGrant(gref)),
            }
        }
    }

    /// Whether the grantee currently has `gref` pinned (mapped or being copied).
    pub(crate) fn in_use(&self, gref: GrantRef) -> bool {
        self.entry_off(gref)
            .and_then(|off| self.mem().load_u32(off, Ordering::Acquire).ok())
            .is_some_and(|c| c & (GTF_READING | GTF_WRITING) != 0)
    }

    /// Takes `gref`'s lock (taking it over from a dead holder, and then settling the pins
    /// from the journals); returns its pins. `None` only if the table is unreadable.
    fn lock_pin(&self, gref: GrantRef) -> Option<u32> {
        let m = self.mem();
        let lock = self.lock_off(gref);
        let me = self.holder.id;
        let mut spins = 0u32;
        loop {
            let held = m.load_u32(lock, Ordering::Relaxed).ok()?;
            if held == 0 {
                if m.compare_exchange_u32(lock, 0, me).ok()?.is_ok() {
                    // In bounds (gref < nr), like every offset below.
                    return Some(
                        m.load_u32(self.pin_off(gref), Ordering::Acquire)
                            .unwrap_or(0),
                    );
                }
                continue;
            }
            spins = spins.wrapping_add(1);
            if spins % PROBE_EVERY == 0
                && !self.holder_alive(held)
                && m.compare_exchange_u32(lock, held, me).ok()?.is_ok()
            {
                return Some(self.settle(gref));
            }
            std::thread::yield_now();
        }
    }

    /// With `gref` locked: its pin word becomes the sum of the journals' counts, and the flags
    /// no pins justify are cleared (what a holder that died inside the lock left half done).
    fn settle(&self, gref: GrantRef) -> u32 {
        let m = self.mem();
        let pins = (0..SLOTS)
            .map(|slot| {
                m.load_u32(self.count_off(slot, gref), Ordering::Acquire)
                    .unwrap_or(0)
            })
            .fold(0u32, u32::saturating_add);
        if let Some(off) = self.entry_off(gref) {
            self.release_flags(off, pins);
        }
        pins
    }

    fn unlock_pin(&self, gref: GrantRef, pins: u32) {
        let m = self.mem();
        let _ = m.store_u32(self.pin_off(gref), pins, Ordering::Release);
        let _ = m.store_u32(self.lock_off(gref), 0, Ordering::Release);
    }

    /// Claims a journal slot for this view's pins (after reaping the slots of dead holders);
    /// `None` when every slot belongs to a live holder.
    fn claim_slot(&self) -> Option<usize> {
        self.reap_dead();
        let m = self.mem();
        (0..SLOTS).find(|&slot| {
            m.compare_exchange_u32(self.slot_off(slot), 0, self.holder.id) == Ok(Ok(0))
        })
    }

    /// Reaps the slots of dead holders; returns whether it reaped any.
    fn reap_dead(&self) -> bool {
        let mut reaped = false;
        for slot in 0..SLOTS {
            let Ok(id) = self.mem().load_u32(self.slot_off(slot), Ordering::Acquire) else {
                break;
            };
            if id != 0 && !self.holder_alive(id) {
                self.reap(slot, id);
                reaped = true;
            }
        }
        reaped
    }

    /// Takes the pins journaled in `slot` by holder `id` off the pin words, then frees the
    /// slot. Each entry is settled under its lock, and only while the slot is still `id`'s.
    fn reap(&self, slot: usize, id: u32) {
        let m = self.mem();
        for gref in 0..self.nr {
            let count = self.count_off(slot, gref);
            if m.load_u32(count, Ordering::Acquire) == Ok(0) {
                continue;
            }
            let Some(mut pins) = self.lock_pin(gref) else {
                continue;
            };
            if m.load_u32(self.slot_off(slot), Ordering::Acquire) == Ok(id) {
                let c = m.load_u32(count, Ordering::Acquire).unwrap_or(0);
                let _ = m.store_u32(count, 0, Ordering::Release);
                pins = pins.saturating_sub(c);
                if let Some(off) = self.entry_off(gref) {
                    self.release_flags(off, pins);
                }
            }
            self.unlock_pin(gref, pins);
        }
        let freed = m.compare_exchange_u32(self.slot_off(slot), id, 0) == Ok(Ok(id));
        if freed && id != self.holder.id {
            // The dead holder's socket: a lock word still naming it finds no file, as dead.
            let _ = std::fs::remove_file(self.holder_path(id));
        }
    }

    /// Hypervisor side: pins `gref` for `ldomid`, as Xen's map and copy do, returning the
    /// granted frame.
    /// The pin is journaled in `slot` (claimed with [`GrantTable::claim_slot`]).
    fn pin(
        &self,
        slot: usize,
        gref: GrantRef,
        ldomid: DomId,
        write: bool,
    ) -> Result<u32, GrantStatus> {
        if !self.alive() {
            return Err(GrantStatus::BadDomain);
        }
        let off = self.entry_off(gref).ok_or(GrantStatus::BadGntref)?;
        let pins = self.lock_pin(gref).ok_or(GrantStatus::GeneralError)?;
        let result = self.set_status(off, ldomid, write).and_then(|()| {
            let frame = self
                .mem()
                .read_u32(off + 4)
                .map_err(|_| GrantStatus::GeneralError)?;
            if frame >= self.frames {
                return Err(GrantStatus::BadPage);
            }
            if pins & PIN_COUNT_MASK == PIN_COUNT_MASK
                || pins & PIN_WRITERS_MASK == PIN_WRITERS_MASK
            {
                return Err(GrantStatus::GeneralError);
            }
            Ok(frame)
        });
        match result {
            Ok(frame) => {
                let one = 1 + if write { PIN_ONE_WRITER } else { 0 };
                let m = self.mem();
                let count = self.count_off(slot, gref);
                let journaled = m
                    .load_u32(count, Ordering::Relaxed)
                    .and_then(|c| m.store_u32(count, c + one, Ordering::Release));
                if journaled.is_err() {
                    self.release_flags(off, pins);
                    self.unlock_pin(gref, pins);
                    return Err(GrantStatus::GeneralError);
                }
                self.unlock_pin(gref, pins + one);
                Ok(frame)
            }
            Err(st) => {
                self.release_flags(off, pins);
                self.unlock_pin(gref, pins);
                Err(st)
            }
        }
    }

    /// Xen's `_set_status_v1`: validate the entry and set reading (and writing).
    fn set_status(&self, off: usize, ldomid: DomId, write: bool) -> Result<(), GrantStatus> {
        let m = self.mem();
        let mut cur = m
            .load_u32(off, Ordering::Acquire)
            .map_err(|_| GrantStatus::GeneralError)?;
        for _ in 0..5 {
            if cur & GTF_TYPE_MASK != GTF_PERMIT_ACCESS || cur >> 16 != u32::from(ldomid) {
                return Err(GrantStatus::GeneralError);
            }
            let mut new = cur | GTF_READING;
            if write {
                if cur & GTF_READONLY != 0 {
                    return Err(GrantStatus::GeneralError);
                }
                new |= GTF_WRITING;
            }
            match m.compare_exchange_u32(off, cur, new) {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(now)) => cur = now,
                Err(_) => return Err(GrantStatus::GeneralError),
            }
        }
        // "Shared grant entry is unstable": the guest kept changing it.
        Err(GrantStatus::GeneralError)
    }

    /// Clears the reading/writing flags that `pins` no longer justify.
    fn release_flags(&self, off: usize, pins: u32) {
        let mut clear = 0;
        if pins & PIN_WRITERS_MASK == 0 {
            clear |= GTF_WRITING;
        }
        if pins & PIN_COUNT_MASK == 0 {
            clear |= GTF_READING;
        }
        let m = self.mem();
        let Ok(mut cur) = m.load_u32(off, Ordering::Acquire) else {
            return;
        };
        while cur & clear != 0 {
            match m.compare_exchange_u32(off, cur, cur & !clear) {
                Ok(Ok(_)) | Err(_) => break,
                Ok(Err(now)) => cur = now,
            }
        }
    }

    /// Hypervisor side: drops one pin taken by [`GrantTable::pin`] in `slot`.
    fn unpin(&self, slot: usize, gref: GrantRef, write: bool) {
        let Some(off) = self.entry_off(gref) else {
            return;
        };
        let Some(pins) = self.lock_pin(gref) else {
            return;
        };
        let m = self.mem();
        let count = self.count_off(slot, gref);
        let one = 1 + if write { PIN_ONE_WRITER } else { 0 };
        let mut new = pins;
        if let Ok(c) = m.load_u32(count, Ordering::Relaxed) {
            if c & PIN_COUNT_MASK != 0 && (!write || c & PIN_WRITERS_MASK != 0) {
                let _ = m.store_u32(count, c - one, Ordering::Release);
                new = pins.saturating_sub(one);
            }
        }
        self.release_flags(off, new);
        self.unlock_pin(gref, new);
    }
}

/// The hypervisor's view of another domain: its grant table, its memory, and the journal
/// slot this view's pins are recorded in.
#[derive(Debug)]
struct ForeignDomain {
    gnttab: GrantTable,
    slot: usize,
    mem_file: File,
    mem: MappedFile,
}

impl ForeignDomain {
    fn open(dir: &Path, domid: DomId) -> Result<Self, SimError> {
        let gnttab = GrantTable::open(&domain_file(dir, "gnttab", domid))?;
        let len = gnttab.frames as usize * PAGE_SIZE;
        let (mem_file, mem) = open_mem(&domain_file(dir, "mem", domid), len)?;
        let slot = gnttab
            .claim_slot()
            .ok_or(SimError::Invalid("every grant journal slot is held"))?;
        Ok(Self {
            gnttab,
            slot,
            mem_file,
            mem,
        })
    }

    fn pin(&self, gref: GrantRef, ldomid: DomId, write: bool) -> Result<u32, GrantStatus> {
        self.gnttab.pin(self.slot, gref, ldomid, write)
    }

    fn unpin(&self, gref: GrantRef, write: bool) {
        self.gnttab.unpin(self.slot, gref, write);
    }
}

impl Drop for ForeignDomain {
    /// Releases whatever this view still has pinned and frees its slot, as closing gntdev
    /// does (its mappings hold it, so normally nothing is left).
    fn drop(&mut self) {
        self.gnttab.reap(self.slot, self.gnttab.holder.id);
    }
}

/// One live mapping: what to unpin and notify when it goes.
#[derive(Debug)]
struct MapRecord {
    dom: Arc<ForeignDomain>,
    refs: Vec<GrantRef>,
    access: Access,
    notify: UnmapNotify,
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    domid: DomId,
    domains: Mutex<HashMap<DomId, Arc<ForeignDomain>>>,
    maps: Mutex<HashMap<u64, MapRecord>>,
    next_token: AtomicU64,
}

/// Most refs one map call may take (the real gntdev's default limit per file is larger, but
/// a blkif request never needs more than this).
const MAX_MAP_REFS: usize = 1 << 16;

impl Inner {
    /// The domain's files, reopened when the cached ones belong to a destroyed domain.
    fn domain(&self, domid: DomId) -> Result<Arc<ForeignDomain>, GrantStatus> {
        let mut domains = self.domains.lock().map_err(|_| GrantStatus::GeneralError)?;
        if let Some(d) = domains.get(&domid) {
            if d.gnttab.alive() {
                return Ok(Arc::clone(d));
            }
            domains.remove(&domid);
        }
        match ForeignDomain::open(&self.dir, domid) {
            Ok(d) if d.gnttab.alive() => {
                let d = Arc::new(d);
                domains.insert(domid, Arc::clone(&d));
                Ok(d)
            }
            Ok(_) | Err(_) => Err(GrantStatus::BadDomain),
        }
    }

    fn lock_maps(&self) -> std::sync::MutexGuard<'_, HashMap<u64, MapRecord>> {
        self.maps
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Unmap for Inner {
    fn unmap(&self, addr: NonNull<u8>, pages: usize, token: u64) {
        let Some(rec) = self.lock_maps().remove(&token) else {
            tracing::error!("sim: unmap of unknown grant mapping {token}");
            return;
        };
        if let Some(offset) = rec.notify.clear_byte {
            // SAFETY: addr/pages is the live mapping recorded under token (made writable, as
            // set_unmap_notify checked), not yet unmapped.
            let mem = unsafe { SharedMem::from_raw(addr, pages * PAGE_SIZE) };
            let _ = mem.write_u8(offset, 0);
        }
        // SAFETY: addr/pages came from Reservation::into_raw for this token, which GrantMapping
        // unmaps exactly once, after its last view is gone.
        unsafe { unmap_raw(addr, pages) };
        let write = rec.access == Access::ReadWrite;
        for &gref in &rec.refs {
            rec.dom.unpin(gref, write);
        }
        if let Some(port) = rec.notify.send_event {
            if let Err(e) = super::evtchn::send_from(&self.dir, self.domid, port) {
                tracing::debug!("sim: unmap notify on port {port}: {e}");
            }
        }
    }
}

/// The simulated hypervisor's grant operations for one (backend) domain: the simulation's
/// [`GrantMapper`] and [`GrantCopier`].
#[derive(Debug, Clone)]
pub struct SimGnttab {
    inner: Arc<Inner>,
}

impl SimGnttab {
    /// Grant operations of domain `domid` on the simulation in `dir`.
    pub fn new(dir: &Path, domid: DomId) -> Self {
        Self {
            inner: Arc::new(Inner {
                dir: dir.to_owned(),
                domid,
                domains: Mutex::new(HashMap::new()),
                maps: Mutex::new(HashMap::new()),
                next_token: AtomicU64::new(0),
            }),
        }
    }
}

impl GrantMapper for SimGnttab {
    fn map(
        &self,
        domid: DomId,
        refs: &[GrantRef],
        access: Access,
    ) -> Result<GrantMapping, GrantError> {
        check_map_refs(refs, MAX_MAP_REFS)?;
        let dom = self.inner.domain(domid).map_err(GrantError::Status)?;
        let write = access == Access::ReadWrite;
        let res = Reservation::new(refs.len())?;
        let mut pinned = 0;
        let mut failure = None;
        for (i, &gref) in refs.iter().enumerate() {
            match dom.pin(gref, self.inner.domid, write) {
                Ok(frame) => {
                    pinned += 1;
                    if let Err(e) = res.map_page(i, dom.mem_file.as_fd(), u64::from(frame), write) {
                        failure = Some(GrantError::Io(e));
                        break;
                    }
                }
                Err(st) => {
                    failure = Some(GrantError::Status(st));
                    break;
                }
            }
        }
        if let Some(err) = failure {
            // All or nothing: drop the reservation (unmapping what was mapped), then unpin.
            drop(res);
            for &gref in &refs[..pinned] {
                dom.unpin(gref, write);
            }
            return Err(err);
        }
        let token = self.inner.next_token.fetch_add(1, Ordering::Relaxed);
        self.inner.lock_maps().insert(
            token,
            MapRecord {
                dom,
                refs: refs.to_vec(),
                access,
                notify: UnmapNotify::default(),
            },
        );
        let (addr, pages) = res.into_raw();
        let unmapper: Arc<dyn Unmap> = self.inner.clone();
        // SAFETY: addr/pages is a mapping we just made and own; only Inner::unmap (called once
        // by GrantMapping's drop, with this token) unmaps it.
        Ok(unsafe { GrantMapping::new(addr, pages, token, access, unmapper) })
    }

    fn set_unmap_notify(
        &self,
        mapping: &GrantMapping,
        notify: UnmapNotify,
    ) -> Result<(), GrantError> {
        if let Some(offset) = notify.clear_byte {
            if offset >= mapping.pages() * PAGE_SIZE || mapping.access() != Access::ReadWrite {
                return Err(GrantError::Invalid(
                    "unmap notify byte outside a writable mapping",
                ));
            }
        }
        let mut maps = self.inner.lock_maps();
        let rec = maps
            .get_mut(&mapping.token())
            .ok_or(GrantError::Invalid("mapping not made by this mapper"))?;
        rec.notify = notify;
        Ok(())
    }

    /// The simulation's pages are released when its copy returns: no grace is needed, but
    /// a short one keeps the backend's deferred unmapping exercised by every test.
    fn unmap_grace(&self) -> Duration {
        Duration::from_millis(5)
    }
}

impl SimGnttab {
    /// One segment; `last` keeps the domain of the previous segment, so that a batch (all
    /// of one guest, usually) looks its domain up once.
    fn copy_one(
        &self,
        op: &mut CopyOp<'_>,
        last: &mut Option<(DomId, Arc<ForeignDomain>)>,
    ) -> GrantStatus {
        let (addr, write) = match op {
            CopyOp::FromGuest { src, .. } => (*src, false),
            CopyOp::ToGuest { dst, .. } => (*dst, true),
        };
        let dom = match last {
            Some((id, d)) if *id == addr.domid => Arc::clone(d),
            _ => match self.inner.domain(addr.domid) {
                Ok(d) => {
                    *last = Some((addr.domid, Arc::clone(&d)));
                    d
                }
                Err(st) => return st,
            },
        };
        let frame = match dom.pin(addr.gref, self.inner.domid, write) {
            Ok(f) => f,
            Err(st) => return st,
        };
        let at = frame as usize * PAGE_SIZE + usize::from(addr.offset);
        let done = match op {
            CopyOp::FromGuest { dst, .. } => dom.mem.mem().read_into(at, dst),
            CopyOp::ToGuest { src, .. } => dom.mem.mem().write_from(at, src),
        };
        dom.unpin(addr.gref, write);
        match done {
            Ok(()) => GrantStatus::Okay,
            Err(_) => GrantStatus::BadCopyArg,
        }
    }
}

impl GrantCopier for SimGnttab {
    fn copy(&self, ops: &mut [CopyOp<'_>]) -> Result<(), GrantError> {
        check_copy_batch(ops)?;
        let mut last = None;
        for op in ops.iter_mut() {
            let st = self.copy_one(op, &mut last);
            match op {
                CopyOp::FromGuest { status, .. } | CopyOp::ToGuest { status, .. } => *status = st,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader};
    use std::process::{Child, Command, Stdio};
    use std::sync::mpsc;

    use super::*;
    use crate::{ScratchDir, SimDomain};

    /// `MODE:DIR:GREF` for [`child`].
    const CHILD_ENV: &str = "SIM_GNTTAB_PIN_CHILD";
    const GUEST: DomId = 1;
    const BACKEND: DomId = 0;

    /// Runs [`child`] in a new process doing `mode` on `gref`, and waits until it says it
    /// holds what `mode` takes.
    fn spawn(mode: &str, dir: &Path, gref: GrantRef) -> Child {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "gnttab::tests::child",
                "--ignored",
                "--nocapture",
            ])
            .env(CHILD_ENV, format!("{mode}:{}:{gref}", dir.display()))
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        while line.trim() != "held" {
            line.clear();
            assert_ne!(out.read_line(&mut line).unwrap(), 0, "child ended early");
        }
        child
    }

    fn kill(mut child: Child) {
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Maps `gref` writable and copies into it from another thread, failing rather than
    /// hanging when a lock is never released.
    fn map_and_copy(dir: &Path, gref: GrantRef) {
        let (tx, rx) = mpsc::channel();
        let dir = dir.to_owned();
        std::thread::spawn(move || {
            let g = SimGnttab::new(&dir, BACKEND);
            let m = g.map(GUEST, &[gref], Access::ReadWrite).map(drop);
            let data = [7u8; 16];
            let mut ops = [CopyOp::ToGuest {
                src: &data,
                dst: xen::GrantAddr {
                    domid: GUEST,
                    gref,
                    offset: 0,
                },
                status: GrantStatus::Okay,
            }];
            let c = g.copy(&mut ops).map(|()| match &ops[0] {
                CopyOp::ToGuest { status, .. } | CopyOp::FromGuest { status, .. } => *status,
            });
            let _ = tx.send((m, c));
        });
        let (m, c) = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("grant operations hang on a dead process's lock");
        assert!(m.is_ok(), "map: {m:?}");
        assert_eq!(c.unwrap(), GrantStatus::Okay);
    }

    fn setup(name: &str) -> (ScratchDir, SimDomain, GrantRef) {
        let dir = ScratchDir::new(&format!("sim-pins-{name}")).unwrap();
        let dom = SimDomain::create(dir.path(), GUEST, 4).unwrap();
        let gref = dom.grant(BACKEND, 2, Access::ReadWrite).unwrap();
        (dir, dom, gref)
    }

    #[test]
    fn a_lock_held_by_a_killed_process_is_taken_over() {
        let (dir, dom, gref) = setup("lock");
        let child = spawn("lock", dir.path(), gref);
        kill(child);
        map_and_copy(dir.path(), gref);
        assert_eq!(dom.page(2).unwrap().read_u8(0).unwrap(), 7);
        dom.end_access(gref).unwrap();
    }

    #[test]
    fn a_killed_copier_leaves_no_pin() {
        let (dir, dom, gref) = setup("copy");
        let child = spawn("pin", dir.path(), gref);
        assert!(
            matches!(dom.end_access(gref), Err(SimError::GrantInUse(_))),
            "pinned while the copier lives"
        );
        kill(child);
        dom.end_access(gref).unwrap();
    }

    #[test]
    fn a_killed_mapper_leaves_no_pin() {
        let (dir, dom, gref) = setup("map");
        let other = dom.grant(BACKEND, 3, Access::ReadWrite).unwrap();
        let child = spawn("map", dir.path(), gref);
        // A live process's pins of the same grant stay.
        let g = SimGnttab::new(dir.path(), BACKEND);
        let mine = g.map(GUEST, &[gref, other], Access::ReadOnly).unwrap();
        kill(child);
        assert!(matches!(dom.end_access(gref), Err(SimError::GrantInUse(_))));
        drop(mine);
        dom.end_access(gref).unwrap();
        dom.end_access(other).unwrap();
        // The grant table works on: the entry is granted, pinned and ended again.
        let gref = dom.grant(BACKEND, 2, Access::ReadWrite).unwrap();
        map_and_copy(dir.path(), gref);
        dom.end_access(gref).unwrap();
    }

    /// The child process of the tests above: takes what its mode says, says "held", waits to
    /// be killed.
    #[test]
    #[ignore = "child process of the pin tests"]
    fn child() {
        let Ok(arg) = std::env::var(CHILD_ENV) else {
            return;
        };
        let mut parts = arg.splitn(3, ':');
        let (mode, dir, gref) = (
            parts.next().unwrap(),
            PathBuf::from(parts.next().unwrap()),
            parts.next().unwrap().parse::<GrantRef>().unwrap(),
        );
        let g = SimGnttab::new(&dir, BACKEND);
        let dom = g.inner.domain(GUEST).unwrap();
        let _held = match mode {
            "lock" => {
                dom.gnttab.lock_pin(gref).unwrap();
                None
            }
            // Between the pin and the unpin of a grant copy.
            "pin" => {
                dom.pin(gref, BACKEND, true).unwrap();
                None
            }
            _ => Some(g.map(GUEST, &[gref], Access::ReadWrite).unwrap()),
        };
        println!("held");
        loop {
            std::thread::sleep(Duration::from_secs(60));
        }
    }
}
