//! Simulated event channels between domains, across processes, with the Linux evtchn
//! device's masking.
//!
//! Each domain has `evtchn.<domid>`: a 64-byte header, then one 16-byte entry per port:
//! `{u32 state | remote_domid << 16, u32 remote_port, u32 event bits, u32 owner handle}`.
//! Port 0 is never allocated, as in Xen. States follow Xen's `ECS_FREE`, `ECS_UNBOUND` (with
//! the domain allowed to bind it) and `ECS_INTERDOMAIN`; binding follows
//! `evtchn_bind_interdomain`: the remote port must be unbound and offered to the binding
//! domain, and the new local port is conservatively set pending. Closing an interdomain port
//! makes the remote end unbound again, offered to the closer (`evtchn_close`). A process that
//! dies without closing its handle (SIGKILL) leaves its ports bound; binding the remote end
//! again finds the owner's socket dead and closes them first, as the kernel's release of the
//! dead process's evtchn fd does on Xen.
//!
//! Each open handle (one [`SimEventChannel`]) owns a unix datagram socket
//! `evtchn.<domid>.<handle>` in the sim directory. Raising an unmasked port masks it and sends
//! its number to the owner's socket, so the socket polls readable exactly when ports are
//! pending, as the device's fd does; raising a masked port only marks it pending, and
//! unmasking a pending port delivers it then. So any number of notifications between two
//! unmasks coalesce into one wake-up. If the owner's socket queue is full the port is marked
//! lost and reported by the owner's next `pending` (the device's ring overflow, without data
//! loss).

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use rustix::io::Errno;
use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketAddrUnix, SocketFlags, SocketType};
use shmem::SharedMem;

use crate::shm::MappedFile;
use crate::{domain_file, SimError};
use xen::{DomId, EventChannel, EvtchnError, Port};

const MAGIC: u32 = 0x3145_5645; // "EVE1"
const HEADER: usize = 64;
const OFF_MAGIC: usize = 0;
const OFF_NR: usize = 4;
const OFF_STATE: usize = 8;
const OFF_NEXT_HANDLE: usize = 12;
const ENTRY: usize = 16;
const STATE_ALIVE: u32 = 1;
const STATE_DEAD: u32 = 2;

/// Ports per domain (Xen's 2-level ABI allows more; a backend needs a few).
pub(crate) const NR_PORTS: u32 = 1024;

const ECS_FREE: u32 = 0;
const ECS_UNBOUND: u32 = 1;
const ECS_INTERDOMAIN: u32 = 2;
/// Being set up by a binder; refused like a free port.
const ECS_RESERVED: u32 = 3;

/// Event bits: set while an event arrived during masking.
const EV_PENDING: u32 = 1;
/// Event bits: delivered and not yet unmasked (the device's disabled irq).
const EV_MASKED: u32 = 2;
/// Event bits: delivery failed because the owner's queue was full.
const EV_LOST: u32 = 4;

fn state(combo: u32) -> u32 {
    combo & 0xffff
}

fn peer(combo: u32) -> DomId {
    (combo >> 16) as DomId
}

fn combo(state: u32, domid: DomId) -> u32 {
    state | (u32::from(domid) << 16)
}

fn errno(e: Errno) -> EvtchnError {
    EvtchnError::Io(io::Error::from_raw_os_error(e.raw_os_error()))
}

/// Path of handle `hid`'s socket of domain `domid`.
fn socket_path(dir: &Path, domid: DomId, hid: u32) -> PathBuf {
    dir.join(format!("evtchn.{domid}.{hid}"))
}

/// One domain's event-channel table, mapped.
#[derive(Debug)]
pub(crate) struct EvtchnTable {
    map: MappedFile,
    domid: DomId,
    nr: u32,
}

impl EvtchnTable {
    pub(crate) fn file_len() -> usize {
        HEADER + NR_PORTS as usize * ENTRY
    }

    /// Initialises a freshly created, zeroed file of [`EvtchnTable::file_len`] bytes.
    pub(crate) fn init(file: &File, path: &Path) -> Result<(), SimError> {
        let map =
            MappedFile::map(file.as_fd(), Self::file_len()).map_err(SimError::io("map", path))?;
        let m = map.mem();
        let init = m
            .write_u32(OFF_NR, NR_PORTS)
            .and(m.store_u32(OFF_NEXT_HANDLE, 1, Ordering::Relaxed))
            .and(m.store_u32(OFF_STATE, STATE_ALIVE, Ordering::Release))
            .and(m.store_u32(OFF_MAGIC, MAGIC, Ordering::Release));
        init.map_err(|_| SimError::Corrupt(path.to_owned()))
    }

    /// Opens domain `domid`'s table in `dir`.
    pub(crate) fn open(dir: &Path, domid: DomId) -> Result<Self, SimError> {
        let path = domain_file(dir, "evtchn", domid);
        let file = File::options()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => SimError::NoDomain(domid),
                _ => SimError::io("open", &path)(e),
            })?;
        let len = file.metadata().map_err(SimError::io("stat", &path))?.len();
        if len < Self::file_len() as u64 {
            return Err(SimError::Corrupt(path));
        }
        let map =
            MappedFile::map(file.as_fd(), Self::file_len()).map_err(SimError::io("map", &path))?;
        let m = map.mem();
        let ok = m.load_u32(OFF_MAGIC, Ordering::Acquire) == Ok(MAGIC)
            && m.read_u32(OFF_NR) == Ok(NR_PORTS);
        if !ok {
            return Err(SimError::Corrupt(path));
        }
        Ok(Self {
            map,
            domid,
            nr: NR_PORTS,
        })
    }

    fn mem(&self) -> SharedMem<'_> {
        self.map.mem()
    }

    pub(crate) fn alive(&self) -> bool {
        self.mem().load_u32(OFF_STATE, Ordering::Acquire) == Ok(STATE_ALIVE)
    }

    fn entry(&self, port: Port) -> Option<usize> {
        (port != 0 && port < self.nr).then(|| HEADER + port as usize * ENTRY)
    }

    fn load(&self, off: usize) -> u32 {
        self.mem().load_u32(off, Ordering::Acquire).unwrap_or(0)
    }

    fn store(&self, off: usize, v: u32) {
        // Offsets come from `entry`, inside the mapping and 4-aligned.
        let _ = self.mem().store_u32(off, v, Ordering::Release);
    }

    fn cas(&self, off: usize, cur: u32, new: u32) -> Result<(), u32> {
        match self.mem().compare_exchange_u32(off, cur, new) {
            Ok(r) => r.map(drop),
            Err(_) => Err(cur),
        }
    }

    fn update(&self, off: usize, f: impl Fn(u32) -> u32) -> u32 {
        let mut cur = self.load(off);
        loop {
            match self.cas(off, cur, f(cur)) {
                Ok(()) => return cur,
                Err(now) => cur = now,
            }
        }
    }

    fn new_handle_id(&self) -> u32 {
        self.update(OFF_NEXT_HANDLE, |v| v.wrapping_add(1).max(1))
    }

    /// Allocates a free port in state `st` offered to / bound to `remote`, owned by `owner`.
    fn alloc(&self, st: u32, remote: DomId, remote_port: Port, owner: u32) -> Option<Port> {
        (1..self.nr).find(|&port| {
            let Some(off) = self.entry(port) else {
                return false;
            };
            if self
                .cas(off, ECS_FREE, combo(ECS_RESERVED, remote))
                .is_err()
            {
                return false;
            }
            self.store(off + 4, remote_port);
            self.store(off + 8, 0);
            self.store(off + 12, owner);
            self.store(off, combo(st, remote));
            true
        })
    }

    fn free(&self, port: Port) {
        if let Some(off) = self.entry(port) {
            self.store(off + 12, 0);
            self.store(off, ECS_FREE);
        }
    }

    /// Sets `port` pending; returns its owner handle when the event must be delivered now
    /// (the port was unmasked and not pending: it is now masked).
    fn raise(&self, port: Port) -> Option<u32> {
        let off = self.entry(port)?;
        let old = self.update(off + 8, |b| {
            if b & (EV_MASKED | EV_PENDING) == 0 {
                b | EV_MASKED
            } else {
                b | EV_PENDING
            }
        });
        (old & (EV_MASKED | EV_PENDING) == 0).then(|| self.load(off + 12))
    }

    /// Unmasks `port`; returns true when an event arrived while masked and must be delivered
    /// now (the port stays masked for that delivery).
    fn unmask(&self, port: Port) -> bool {
        let Some(off) = self.entry(port) else {
            return false;
        };
        let old = self.update(off + 8, |b| {
            if b & EV_PENDING != 0 {
                (b & !EV_PENDING) | EV_MASKED
            } else {
                b & !EV_MASKED
            }
        });
        old & EV_PENDING != 0
    }

    fn take_lost(&self, port: Port) -> bool {
        let Some(off) = self.entry(port) else {
            return false;
        };
        self.update(off + 8, |b| b & !EV_LOST) & EV_LOST != 0
    }

    fn mark_lost(&self, port: Port) {
        if let Some(off) = self.entry(port) {
            self.update(off + 8, |b| b | EV_LOST);
        }
    }

    /// Sends an event from local `port`: raises the remote end if the port is interdomain
    /// (an unbound port drops the event, as Xen does), delivering through `sock`.
    fn send(&self, dir: &Path, remote: &EvtchnTable, port: Port, sock: BorrowedFd<'_>) {
        let Some(off) = self.entry(port) else { return };
        let c = self.load(off);
        if state(c) != ECS_INTERDOMAIN || peer(c) != remote.domid || !remote.alive() {
            return;
        }
        let rport = self.load(off + 4);
        let Some(roff) = remote.entry(rport) else {
            return;
        };
        if remote.load(roff) != combo(ECS_INTERDOMAIN, self.domid) || remote.load(roff + 4) != port
        {
            return;
        }
        if let Some(owner) = remote.raise(rport) {
            remote.deliver(dir, rport, owner, sock);
        }
    }

    /// Sends `port` to its owner's socket.
    fn deliver(&self, dir: &Path, port: Port, owner: u32, sock: BorrowedFd<'_>) {
        if owner == 0 {
            return;
        }
        let Ok(addr) = SocketAddrUnix::new(socket_path(dir, self.domid, owner)) else {
            return;
        };
        match rustix::net::sendto(sock, &port.to_ne_bytes(), SendFlags::DONTWAIT, &addr) {
            Ok(_) => {}
            Err(Errno::AGAIN) => {
                // The owner's queue is full, so its fd is readable and its next `pending`
                // reports lost ports. Mark this one, then send once more: if the owner drained
                // the queue and scanned for lost ports between our two steps, this datagram
                // wakes it again (at worst the port is reported twice, which is harmless).
                self.mark_lost(port);
                let _ = rustix::net::sendto(sock, &port.to_ne_bytes(), SendFlags::DONTWAIT, &addr);
            }
            // The owner is gone (its process died): nobody is listening, as for a closed fd.
            Err(e) => tracing::debug!("sim evtchn: delivery of port {port} to handle {owner}: {e}"),
        }
    }

    /// Destroys the domain: marks it dead and closes its interdomain ports, leaving the remote
    /// ends unbound (Xen's `evtchn_destroy`).
    pub(crate) fn kill(&self, dir: &Path) {
        self.store(OFF_STATE, STATE_DEAD);
        for port in 1..self.nr {
            let Some(off) = self.entry(port) else {
                continue;
            };
            let c = self.load(off);
            if state(c) == ECS_INTERDOMAIN {
                if let Ok(remote) = EvtchnTable::open(dir, peer(c)) {
                    remote.close_remote_end(self.load(off + 4), self.domid, port);
                }
            }
            self.free(port);
        }
    }

    /// When `remote`'s port `rport` is bound to a port of this domain whose owner handle's
    /// process has died (its socket is no longer bound: nobody will close that port), closes
    /// that port, leaving `rport` unbound and offered to this domain again. Returns whether
    /// it did.
    fn close_dead_end(
        &self,
        dir: &Path,
        remote: &EvtchnTable,
        rport: Port,
        sock: BorrowedFd<'_>,
    ) -> bool {
        let Some(roff) = remote.entry(rport) else {
            return false;
        };
        if remote.load(roff) != combo(ECS_INTERDOMAIN, self.domid) {
            return false;
        }
        let port = remote.load(roff + 4);
        let Some(off) = self.entry(port) else {
            return false;
        };
        if self.load(off) != combo(ECS_INTERDOMAIN, remote.domid)
            || self.load(off + 4) != rport
            || handle_alive(dir, self.domid, self.load(off + 12), sock)
        {
            return false;
        }
        remote.close_remote_end(rport, self.domid, port);
        self.free(port);
        true
    }

    /// Makes `rport` (bound to `domid`'s `port`) unbound again, offered to `domid`.
    fn close_remote_end(&self, rport: Port, domid: DomId, port: Port) {
        if let Some(roff) = self.entry(rport) {
            if self.load(roff + 4) == port {
                let _ = self.cas(
                    roff,
                    combo(ECS_INTERDOMAIN, domid),
                    combo(ECS_UNBOUND, domid),
                );
            }
        }
    }
}

/// The socket beside a handle's that only says the handle is alive ([`handle_alive`]).
fn live_path(sock_path: &Path) -> PathBuf {
    let mut p = sock_path.as_os_str().to_owned();
    p.push(".live");
    PathBuf::from(p)
}

/// A non-blocking datagram socket bound at `path` (a stale socket of a dead process holding
/// the name is replaced: handle ids are not reused unless the counter wraps).
pub(crate) fn bound_socket(path: &Path) -> Result<OwnedFd, SimError> {
    let sock = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::DGRAM,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    )
    .map_err(|e| SimError::io("socket", path)(e.into()))?;
    let _ = std::fs::remove_file(path);
    let addr =
        SocketAddrUnix::new(path).map_err(|e| SimError::io("socket address", path)(e.into()))?;
    rustix::net::bind(&sock, &addr).map_err(|e| SimError::io("bind", path)(e.into()))?;
    Ok(sock)
}

/// Whether handle `hid` of `domid` belongs to a live process: an empty datagram sent from
/// `sock` reaches its liveness socket (a dead process's socket file refuses it, or is gone;
/// a full queue means alive). The owner never reads that socket, so the probe wakes nothing;
/// only `sendto` is needed, which a confined backend may use.
fn handle_alive(dir: &Path, domid: DomId, hid: u32, sock: BorrowedFd<'_>) -> bool {
    socket_alive(&live_path(&socket_path(dir, domid, hid)), sock)
}

/// Whether the process that bound the datagram socket at `path` (and never reads it) is
/// alive: an empty datagram sent from `sock` is refused by a dead process's socket file, or
/// its file is gone; a full queue means alive. The kernel closes a dead process's sockets
/// when it exits (before it is reaped), and a new socket is never bound at a live one's path.
pub(crate) fn socket_alive(path: &Path, sock: BorrowedFd<'_>) -> bool {
    let Ok(addr) = SocketAddrUnix::new(path) else {
        return false;
    };
    !matches!(
        rustix::net::sendto(sock, &[], SendFlags::DONTWAIT, &addr),
        Err(Errno::CONNREFUSED | Errno::NOENT)
    )
}

/// Sends an event on local `port` of `domid` without a handle (gntdev's unmap notify).
pub(crate) fn send_from(dir: &Path, domid: DomId, port: Port) -> Result<(), SimError> {
    let local = EvtchnTable::open(dir, domid)?;
    let off = local.entry(port).ok_or(SimError::BadPort(port))?;
    let c = local.load(off);
    if state(c) != ECS_INTERDOMAIN {
        return Ok(());
    }
    let remote = EvtchnTable::open(dir, peer(c))?;
    let sock = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::DGRAM,
        SocketFlags::CLOEXEC,
        None,
    )
    .map_err(|e| SimError::io("socket", dir)(e.into()))?;
    local.send(dir, &remote, port, sock.as_fd());
    Ok(())
}

/// What this handle knows of a port bound through it: the remote domain's table, once known
/// (a port allocated unbound learns its peer when the peer binds it).
#[derive(Debug, Default)]
struct Bound {
    remote: Mutex<Option<Arc<EvtchnTable>>>,
}

impl Bound {
    fn with(table: Arc<EvtchnTable>) -> Self {
        Self {
            remote: Mutex::new(Some(table)),
        }
    }

    /// The table of `domid`, cached while that domain lives.
    fn remote(&self, dir: &Path, domid: DomId) -> Option<Arc<EvtchnTable>> {
        let mut cached = self
            .remote
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(t) = cached.as_ref().filter(|t| t.domid == domid && t.alive()) {
            return Some(Arc::clone(t));
        }
        let t = Arc::new(EvtchnTable::open(dir, domid).ok()?);
        *cached = Some(Arc::clone(&t));
        Some(t)
    }
}

/// An event-channel handle of one domain in the simulation: the simulation's
/// [`EventChannel`]. Dropping it unbinds its ports, as closing the device does.
#[derive(Debug)]
pub struct SimEventChannel {
    dir: PathBuf,
    table: Arc<EvtchnTable>,
    hid: u32,
    sock: OwnedFd,
    sock_path: PathBuf,
    /// Bound while this handle lives and never read: what [`handle_alive`] probes.
    _live: OwnedFd,
    bound: HashMap<Port, Bound>,
    tables: HashMap<DomId, Arc<EvtchnTable>>,
    restrict: Option<DomId>,
}

impl SimEventChannel {
    /// Opens a handle for domain `domid`, whose table must exist.
    pub(crate) fn open(dir: &Path, domid: DomId) -> Result<Self, SimError> {
        let table = Arc::new(EvtchnTable::open(dir, domid)?);
        let hid = table.new_handle_id();
        let sock_path = socket_path(dir, domid, hid);
        let sock = bound_socket(&sock_path)?;
        let live = bound_socket(&live_path(&sock_path))?;
        Ok(Self {
            dir: dir.to_owned(),
            table,
            hid,
            sock,
            sock_path,
            _live: live,
            bound: HashMap::new(),
            tables: HashMap::new(),
            restrict: None,
        })
    }

    /// The domain this handle belongs to.
    pub fn domid(&self) -> DomId {
        self.table.domid
    }

    /// Allocates a port offered to `remote` for binding (`EVTCHNOP_alloc_unbound`), owned by
    /// this handle: what a frontend advertises in XenStore as `event-channel`.
    ///
    /// # Errors
    /// `ENOSPC` when the domain has no free port.
    pub fn alloc_unbound(&mut self, remote: DomId) -> Result<Port, EvtchnError> {
        let port = self
            .table
            .alloc(ECS_UNBOUND, remote, 0, self.hid)
            .ok_or_else(|| errno(Errno::NOSPC))?;
        self.bound.insert(port, Bound::default());
        Ok(port)
    }

    fn remote_table(&mut self, domid: DomId) -> Result<Arc<EvtchnTable>, EvtchnError> {
        if let Some(t) = self.tables.get(&domid).filter(|t| t.alive()) {
            return Ok(Arc::clone(t));
        }
        let t = Arc::new(EvtchnTable::open(&self.dir, domid).map_err(|e| match e {
            SimError::NoDomain(_) => errno(Errno::SRCH),
            e => EvtchnError::Io(io::Error::other(e)),
        })?);
        if !t.alive() {
            return Err(errno(Errno::SRCH));
        }
        self.tables.insert(domid, Arc::clone(&t));
        Ok(t)
    }
}

impl SimEventChannel {
    /// Appends a delivered `port` if it is bound here (a stale datagram may name another).
    fn push_port(&self, port: Port, out: &mut Vec<Port>) {
        if self.bound.contains_key(&port) {
            out.push(port);
        }
    }

    /// Appends the bound ports whose delivery failed on a full queue, unless already in
    /// `out[start..]`.
    fn push_lost(&self, out: &mut Vec<Port>, start: usize) {
        for &port in self.bound.keys() {
            if self.table.take_lost(port) && !out[start..].contains(&port) {
                out.push(port);
            }
        }
    }
}

impl EventChannel for SimEventChannel {
    fn bind_interdomain(&mut self, remote: DomId, remote_port: Port) -> Result<Port, EvtchnError> {
        if self.restrict.is_some_and(|d| d != remote) {
            return Err(errno(Errno::ACCESS));
        }
        let rtable = self.remote_table(remote)?;
        let me = self.table.domid;
        let roff = rtable
            .entry(remote_port)
            .ok_or_else(|| errno(Errno::INVAL))?;
        let port = self
            .table
            .alloc(ECS_RESERVED, remote, remote_port, self.hid)
            .ok_or_else(|| errno(Errno::NOSPC))?;
        // Claim the remote end: it must be unbound and offered to us. An end still bound to
        // a port of a dead process is unbound first, as the kernel's release of that
        // process's evtchn fd would have done.
        let claim = |t: &EvtchnTable| t.cas(roff, combo(ECS_UNBOUND, me), combo(ECS_RESERVED, me));
        if claim(&rtable).is_err()
            && !(self
                .table
                .close_dead_end(&self.dir, &rtable, remote_port, self.sock.as_fd())
                && claim(&rtable).is_ok())
        {
            self.table.free(port);
            return Err(errno(Errno::INVAL));
        }
        rtable.store(roff + 4, port);
        rtable.store(roff, combo(ECS_INTERDOMAIN, me));
        if let Some(off) = self.table.entry(port) {
            self.table.store(off, combo(ECS_INTERDOMAIN, remote));
        }
        self.bound.insert(port, Bound::with(rtable));
        // Xen conservatively sets the new local port pending: events sent to the unbound
        // remote end before the bind are not lost.
        if let Some(owner) = self.table.raise(port) {
            self.table
                .deliver(&self.dir, port, owner, self.sock.as_fd());
        }
        Ok(port)
    }

    fn unbind(&mut self, port: Port) -> Result<(), EvtchnError> {
        let b = self
            .bound
            .remove(&port)
            .ok_or(EvtchnError::NotBound(port))?;
        if let Some(off) = self.table.entry(port) {
            let c = self.table.load(off);
            if state(c) == ECS_INTERDOMAIN {
                if let Some(remote) = b.remote(&self.dir, peer(c)) {
                    remote.close_remote_end(self.table.load(off + 4), self.table.domid, port);
                }
            }
        }
        self.table.free(port);
        Ok(())
    }

    fn notify(&self, port: Port) -> Result<(), EvtchnError> {
        let b = self.bound.get(&port).ok_or(EvtchnError::NotBound(port))?;
        let Some(off) = self.table.entry(port) else {
            return Ok(());
        };
        let c = self.table.load(off);
        // An unbound port drops the event, as in Xen.
        if state(c) == ECS_INTERDOMAIN {
            if let Some(remote) = b.remote(&self.dir, peer(c)) {
                self.table.send(&self.dir, &remote, port, self.sock.as_fd());
            }
        }
        Ok(())
    }

    fn pending(&mut self, out: &mut Vec<Port>) -> Result<(), EvtchnError> {
        let start = out.len();
        let mut buf = [0u8; 4];
        loop {
            match rustix::net::recv(&self.sock, &mut buf, RecvFlags::DONTWAIT) {
                Ok((_, 4)) => self.push_port(u32::from_ne_bytes(buf), out),
                Ok(_) => {}
                Err(Errno::AGAIN) => break,
                Err(Errno::INTR) => {}
                Err(e) => return Err(errno(e)),
            }
        }
        self.push_lost(out, start);
        Ok(())
    }

    fn read_done(
        &mut self,
        read: Result<&[u8], Errno>,
        out: &mut Vec<Port>,
    ) -> Result<(), EvtchnError> {
        let start = out.len();
        match read {
            // One read takes one datagram: one port.
            Ok(&[a, b, c, d]) => self.push_port(u32::from_ne_bytes([a, b, c, d]), out),
            Ok(_) | Err(Errno::AGAIN | Errno::INTR) => {}
            Err(e) => return Err(errno(e)),
        }
        self.push_lost(out, start);
        Ok(())
    }

    fn unmask(&self, port: Port) -> Result<(), EvtchnError> {
        if !self.bound.contains_key(&port) {
            return Err(EvtchnError::NotBound(port));
        }
        if self.table.unmask(port) {
            self.table
                .deliver(&self.dir, port, self.hid, self.sock.as_fd());
        }
        Ok(())
    }

    fn unmask_is_write(&self) -> bool {
        false
    }

    fn restrict(&mut self, domid: DomId) -> Result<(), EvtchnError> {
        // As the Linux device: once only, and never to dom0 or a reserved domid.
        if self.restrict.is_some() {
            return Err(errno(Errno::ACCESS));
        }
        if domid == 0 || domid >= crate::DOMID_FIRST_RESERVED {
            return Err(errno(Errno::INVAL));
        }
        self.restrict = Some(domid);
        Ok(())
    }

    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}

impl Drop for SimEventChannel {
    fn drop(&mut self) {
        let ports: Vec<Port> = self.bound.keys().copied().collect();
        for port in ports {
            let _ = self.unbind(port);
        }
        let _ = std::fs::remove_file(&self.sock_path);
        let _ = std::fs::remove_file(live_path(&self.sock_path));
    }
}
