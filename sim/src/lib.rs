//! The simulated Xen platform, and the simulated guest that runs against it.
//!
//! Nothing here ships in the production libraries: tests, benches, `blkbackd demo` and
//! `blkbackd replay` build on it, and the `blkbackd` binary offers it as the `sim:DIR`
//! platform ([`open_platform`]) so that the real binary is what the tests run.
//!
//! The hypervisor stand-in plays Xen's part across processes. Everything lives in one
//! directory (a test temp dir, or under `/dev/shm`), so that separate processes (a real
//! `blkbackd` and a simulated guest) share it:
//!
//! | file | what |
//! |---|---|
//! | `mem.<domid>` | a guest's memory, `pages` pages, mapped `MAP_SHARED` by every side |
//! | `gnttab.<domid>` | its v1 grant table, with the pin locks and journals (see [`gnttab`]) |
//! | `gnttab.<domid>.h<id>` | the liveness socket of one process's view of that table |
//! | `evtchn.<domid>` | its event-channel ports (see [`evtchn`]); exists for every domain |
//! | `evtchn.<domid>.<handle>` | the wake-up socket of one open event-channel handle |
//! | `xenstored/socket`, `xenstored/socket.d<domid>` | the simulated xenstored ([`xenstored`]) |
//!
//! The frontend side is [`SimDomain`] (a guest: memory, grants, an event-channel handle);
//! the backend side is [`SimPlatform`], the same [`Platform`] the real backend uses, selected
//! with [`xen::PlatformConfig`] (`sim:DIR:DOMID`).
//!
//! The simulated guest is [`front::SimFront`], a blkfront written the way Linux's behaves;
//! [`toolstack`] writes a disk's XenStore nodes as xl does, [`workload`] drives verified I/O.
//!
//! A process that dies releases its grant pins and locks and its ports as the real kernel
//! does when the device fds close, once another process notices (see [`gnttab`] and
//! [`evtchn`]). Not simulated: grant table v2, transitive and sub-page grants.
//!
//! Beside the simulation, the little that tests share and production never needs: visible
//! skips ([`skip`]) and loop devices ([`losetup`]).
//!
//! The mmap `unsafe` of the simulation is confined to [`shm`](crate::shm).

pub mod evtchn;
pub mod front;
pub mod gnttab;
pub mod losetup;
mod scratch;
mod shm;
pub mod skip;
pub mod toolstack;
pub mod workload;
pub mod xenstored;

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use shmem::{SharedMem, PAGE_SIZE};

pub use evtchn::SimEventChannel;
pub use gnttab::SimGnttab;
pub use scratch::ScratchDir;

use self::evtchn::EvtchnTable;
use self::gnttab::GrantTable;
use self::shm::MappedFile;
use xen::{
    Access, DomId, EventChannel, EvtchnError, GrantCopier, GrantMapper, GrantRef, Platform,
    PlatformConfig, Port, DOMID_FIRST_RESERVED,
};

/// Grant entries per simulated domain: 32 frames of v1 entries, as Xen's default
/// `max_grant_frames`.
pub const DEFAULT_GRANT_ENTRIES: u32 = 32 * 512;

/// A failure of the simulation itself (its files), or a guest-side refusal that Xen would
/// give the guest.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// A file operation on the sim directory failed.
    #[error("sim: {op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On which file.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
    /// A domain with this id already exists.
    #[error("sim: domain {0} already exists")]
    Exists(DomId),
    /// No domain with this id exists (or it was destroyed).
    #[error("sim: no domain {0}")]
    NoDomain(DomId),
    /// A sim file is not what it should be.
    #[error("sim: {0} is not a valid simulation file")]
    Corrupt(PathBuf),
    /// An argument was refused.
    #[error("sim: {0}")]
    Invalid(&'static str),
    /// The frame lies outside the domain's memory.
    #[error("sim: frame {0} outside the domain's memory")]
    BadFrame(u32),
    /// The grant ref is not a granted entry of this domain.
    #[error("sim: grant ref {0} is not granted")]
    BadGrant(GrantRef),
    /// Ending access failed: the grantee has the grant mapped or is copying.
    #[error("sim: grant ref {0} is in use by the grantee")]
    GrantInUse(GrantRef),
    /// The grant table is full.
    #[error("sim: no free grant entry")]
    NoFreeGrant,
    /// The port is not a port of this domain.
    #[error("sim: bad event channel port {0}")]
    BadPort(Port),
}

impl SimError {
    fn io(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> SimError {
        let path = path.to_owned();
        move |source| SimError::Io { op, path, source }
    }
}

fn domain_file(dir: &Path, kind: &str, domid: DomId) -> PathBuf {
    dir.join(format!("{kind}.{domid}"))
}

/// The directory of the simulated xenstored's sockets.
pub fn xenstored_dir(dir: &Path) -> PathBuf {
    dir.join("xenstored")
}

/// The socket through which domain `domid` reaches the simulated xenstored:
/// `xenstored/socket` for dom0 (the privileged socket, like the real one), and
/// `xenstored/socket.d<domid>` for other domains (whose identity is the socket they use).
pub fn xenstore_socket(dir: &Path, domid: DomId) -> PathBuf {
    let d = xenstored_dir(dir);
    if domid == 0 {
        d.join("socket")
    } else {
        d.join(format!("socket.d{domid}"))
    }
}

/// Creates `path` of `len` zero bytes, initialised by `init`, atomically: other processes see
/// either no file or an initialised one. `Ok(false)` when it already exists.
fn create_file(
    path: &Path,
    len: usize,
    init: impl FnOnce(&File, &Path) -> Result<(), SimError>,
) -> Result<bool, SimError> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let tmp = path.with_file_name(format!(".{name}.tmp.{}.{seq}", std::process::id()));
    let file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(SimError::io("create", &tmp))?;
    let made = file
        .set_len(len as u64)
        .map_err(SimError::io("size", &tmp))
        .and_then(|()| init(&file, &tmp))
        .and_then(|()| match std::fs::hard_link(&tmp, path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(SimError::io("link", path)(e)),
        });
    let _ = std::fs::remove_file(&tmp);
    made
}

/// Opens a domain's memory file read-write and maps its first `len` bytes (the file must be
/// at least that long).
fn open_mem(path: &Path, len: usize) -> Result<(File, MappedFile), SimError> {
    let file = File::options()
        .read(true)
        .write(true)
        .open(path)
        .map_err(SimError::io("open", path))?;
    if file.metadata().map_err(SimError::io("stat", path))?.len() < len as u64 {
        return Err(SimError::Corrupt(path.to_owned()));
    }
    let mem =
        MappedFile::map(std::os::fd::AsFd::as_fd(&file), len).map_err(SimError::io("map", path))?;
    Ok((file, mem))
}

fn check_domid(domid: DomId) -> Result<(), SimError> {
    if domid >= DOMID_FIRST_RESERVED {
        return Err(SimError::Invalid("domid is reserved"));
    }
    Ok(())
}

/// Creates the event-channel table of `domid` unless it exists; returns whether it was made.
fn ensure_evtchn(dir: &Path, domid: DomId) -> Result<bool, SimError> {
    check_domid(domid)?;
    std::fs::create_dir_all(dir).map_err(SimError::io("create dir", dir))?;
    create_file(
        &domain_file(dir, "evtchn", domid),
        EvtchnTable::file_len(),
        EvtchnTable::init,
    )
}

/// A simulated guest domain: its memory, its grant table and its event channels. This is the
/// frontend's side of the simulation; the guest trusts itself, so its own pages are plain
/// shared memory.
#[derive(Debug)]
pub struct SimDomain {
    dir: PathBuf,
    domid: DomId,
    gnttab: GrantTable,
    mem: MappedFile,
    pages: usize,
}

impl SimDomain {
    /// Creates domain `domid` with `pages` zeroed pages of memory and the default grant
    /// table size.
    ///
    /// # Errors
    /// [`SimError::Exists`] when the domain exists; I/O failures on the sim directory.
    pub fn create(dir: &Path, domid: DomId, pages: usize) -> Result<Self, SimError> {
        Self::create_with_grants(dir, domid, pages, DEFAULT_GRANT_ENTRIES)
    }

    /// As [`SimDomain::create`], with `grant_entries` grant table entries.
    ///
    /// # Errors
    /// As [`SimDomain::create`].
    pub fn create_with_grants(
        dir: &Path,
        domid: DomId,
        pages: usize,
        grant_entries: u32,
    ) -> Result<Self, SimError> {
        let frames = u32::try_from(pages)
            .ok()
            .filter(|&p| p > 0)
            .ok_or(SimError::Invalid("a domain needs 1 to 2^32-1 pages"))?;
        if grant_entries <= gnttab::RESERVED_ENTRIES {
            return Err(SimError::Invalid("too few grant entries"));
        }
        let mem_len = pages
            .checked_mul(PAGE_SIZE)
            .ok_or(SimError::Invalid("too many pages"))?;
        // The event-channel table claims the domid: whoever links it first creates the domain.
        if !ensure_evtchn(dir, domid)? {
            return Err(SimError::Exists(domid));
        }
        create_file(&domain_file(dir, "mem", domid), mem_len, |_, _| Ok(()))?;
        create_file(
            &domain_file(dir, "gnttab", domid),
            GrantTable::file_len(grant_entries),
            |f, p| GrantTable::init(f, p, grant_entries, frames),
        )?;
        Self::open(dir, domid)
    }

    /// Opens an existing domain (for a guest driven from another process).
    ///
    /// # Errors
    /// [`SimError::NoDomain`] when it does not exist; [`SimError::Corrupt`] for bad files.
    pub fn open(dir: &Path, domid: DomId) -> Result<Self, SimError> {
        let gpath = domain_file(dir, "gnttab", domid);
        if !gpath.exists() {
            return Err(SimError::NoDomain(domid));
        }
        let gnttab = GrantTable::open(&gpath)?;
        if !gnttab.alive() {
            return Err(SimError::NoDomain(domid));
        }
        let pages = gnttab.frames() as usize;
        let (_, mem) = open_mem(&domain_file(dir, "mem", domid), pages * PAGE_SIZE)?;
        Ok(Self {
            dir: dir.to_owned(),
            domid,
            gnttab,
            mem,
            pages,
        })
    }

    /// This domain's id.
    pub fn domid(&self) -> DomId {
        self.domid
    }

    /// The sim directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Number of pages of memory.
    pub fn pages(&self) -> usize {
        self.pages
    }

    /// All of the domain's memory; frame `f` is at `f * PAGE_SIZE`.
    pub fn mem(&self) -> SharedMem<'_> {
        self.mem.mem()
    }

    /// One page of memory.
    ///
    /// # Errors
    /// [`SimError::BadFrame`] outside the domain's memory.
    pub fn page(&self, frame: u32) -> Result<SharedMem<'_>, SimError> {
        self.mem
            .mem()
            .subregion(frame as usize * PAGE_SIZE, PAGE_SIZE)
            .map_err(|_| SimError::BadFrame(frame))
    }

    /// Grants page `frame` to domain `to`, read-only or writable
    /// (`gnttab_grant_foreign_access`).
    ///
    /// # Errors
    /// [`SimError::BadFrame`], [`SimError::NoFreeGrant`].
    pub fn grant(&self, to: DomId, frame: u32, access: Access) -> Result<GrantRef, SimError> {
        self.gnttab.grant(to, frame, access == Access::ReadOnly)
    }

    /// Ends access to a grant (`gnttab_end_foreign_access_ref`), making the ref free again.
    ///
    /// # Errors
    /// [`SimError::GrantInUse`] while the grantee has it mapped or is copying, as in Xen;
    /// [`SimError::BadGrant`] for a ref not granted.
    pub fn end_access(&self, gref: GrantRef) -> Result<(), SimError> {
        self.gnttab.end_access(gref)
    }

    /// Whether the grantee currently has `gref` mapped (or is copying it): Xen's
    /// `GTF_reading`/`GTF_writing` in the entry.
    pub fn grant_in_use(&self, gref: GrantRef) -> bool {
        self.gnttab.in_use(gref)
    }

    /// Number of grant entries.
    pub fn grant_entries(&self) -> u32 {
        self.gnttab.len()
    }

    /// Opens an event-channel handle of this domain (allocate unbound ports on it with
    /// [`SimEventChannel::alloc_unbound`]).
    ///
    /// # Errors
    /// I/O failures on the sim directory.
    pub fn open_event_channel(&self) -> Result<SimEventChannel, SimError> {
        SimEventChannel::open(&self.dir, self.domid)
    }

    /// Destroys the domain: grant operations on it fail with `GNTST_bad_domain`, its ports
    /// close (remote ends become unbound), and its files are removed. Existing mappings of its
    /// pages stay valid until unmapped, as Xen keeps a dying domain's mapped pages. As in Xen,
    /// no event is sent: a backend learns of the death from XenStore, so pair this with the
    /// simulated xenstored's `release_domain` (`@releaseDomain`).
    ///
    /// # Errors
    /// I/O failures removing the files.
    pub fn destroy(self) -> Result<(), SimError> {
        self.gnttab.kill();
        if let Ok(t) = EvtchnTable::open(&self.dir, self.domid) {
            t.kill(&self.dir);
        }
        for kind in ["gnttab", "mem", "evtchn"] {
            let p = domain_file(&self.dir, kind, self.domid);
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(SimError::io("remove", &p)(e)),
            }
        }
        Ok(())
    }
}

/// The backend's view of the simulation: the [`Platform`] of domain `domid` (usually 0).
#[derive(Debug)]
pub struct SimPlatform {
    dir: PathBuf,
    domid: DomId,
    gnttab: SimGnttab,
}

impl SimPlatform {
    /// The platform of domain `domid` in `dir`, creating its event-channel table (and the
    /// directory) if needed: a backend domain needs no memory of its own in the simulation.
    ///
    /// # Errors
    /// I/O failures on the sim directory.
    pub fn open(dir: &Path, domid: DomId) -> Result<Self, SimError> {
        ensure_evtchn(dir, domid)?;
        EvtchnTable::open(dir, domid)?;
        Ok(Self {
            dir: dir.to_owned(),
            domid,
            gnttab: SimGnttab::new(dir, domid),
        })
    }

    /// The sim directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The platform as the trait object the backend takes.
    pub fn into_platform(self) -> Arc<dyn Platform> {
        Arc::new(self)
    }
}

impl Platform for SimPlatform {
    fn domid(&self) -> DomId {
        self.domid
    }

    fn grant_mapper(&self) -> &dyn GrantMapper {
        &self.gnttab
    }

    fn grant_copier(&self) -> &dyn GrantCopier {
        &self.gnttab
    }

    fn open_event_channel(&self) -> Result<Box<dyn EventChannel>, EvtchnError> {
        SimEventChannel::open(&self.dir, self.domid)
            .map(|c| Box::new(c) as Box<dyn EventChannel>)
            .map_err(|e| EvtchnError::Io(io::Error::other(e)))
    }

    fn xenstore_path(&self) -> PathBuf {
        xenstore_socket(&self.dir, self.domid)
    }
}

/// Opening the platform a [`PlatformConfig`] names failed.
#[derive(Debug, thiserror::Error)]
pub enum OpenPlatformError {
    /// Real Xen's device nodes could not be opened.
    #[error(transparent)]
    Xen(#[from] xen::PlatformError),
    /// The simulation could not be opened.
    #[error(transparent)]
    Sim(#[from] SimError),
}

/// Opens the platform `config` names: Xen's device nodes, or the simulation in its directory.
/// It lives here because only this crate knows both.
///
/// # Errors
/// When a device node or the simulation cannot be opened.
pub fn open_platform(config: &PlatformConfig) -> Result<Arc<dyn Platform>, OpenPlatformError> {
    match config {
        PlatformConfig::Xen => Ok(Arc::new(xen::XenPlatform::open()?)),
        PlatformConfig::Sim { dir, domid } => Ok(SimPlatform::open(dir, *domid)?.into_platform()),
    }
}
