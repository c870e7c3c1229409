//! The backing store of a virtual disk: an open block device or regular file.
//!
//! A [`Device`] owns the file descriptor the data plane submits I/O on and knows what the
//! frontend must be told about it (`sectors`, `sector-size`, `physical-sector-size`, read-only,
//! discard), read once at open time, except the size, which is re-read on demand for online
//! resize ([`Device::refresh_size`]) and kept in an atomic that every queue validates against.
//!
//! I/O uses `O_DIRECT` where possible so that a guest's data does not pass through dom0's page
//! cache and a flush means what the guest thinks it means:
//! - block devices are always opened (or switched, for an inherited fd) to `O_DIRECT`; their
//!   logical and physical block sizes come from `BLKSSZGET`/`BLKPBSZGET`.
//! - regular files present 512-byte logical sectors unless the caller asks for another size
//!   ([`DeviceOptions::logical_block_size`], e.g. 4096 for a 4Kn image). `O_DIRECT` is used
//!   only when the file system's direct-I/O offset alignment (`statx` `STATX_DIOALIGN`) is no
//!   larger than that logical block size (otherwise every 512-byte-aligned guest request could
//!   fail with `EINVAL`); else the file is used buffered and flushes still reach the disk
//!   through `fdatasync`. [`Device::direct`] says which was chosen.
//!
//! An NBD export ([`Device::nbd`]) is a connected socket whose handshake is done: its size,
//! read-only flag, flush and discard support and block size constraints come from what the
//! server said ([`nbd::Export`]); the data plane speaks the transmission protocol on the socket
//! (`dataplane::uring`'s NBD connection).
//!
//! Discard: a block device supports it when its queue's `discard_max_bytes` is non-zero
//! (sysfs), secure discard when `BLKSECDISCARD` is implemented (probed without side effects,
//! see [`blkdev::block::probe_secure_discard`]); a regular file supports it as `FALLOC_FL_PUNCH_HOLE`, probed
//! on an empty range.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use blkdev::block;
use rustix::fs::{FallocateFlags, FileType, Mode, OFlags, StatxFlags};
use rustix::io::Errno;

/// The unit of blkif sector numbers and of the `sectors` XenStore node, whatever the logical
/// block size.
pub const SECTOR_SIZE: u64 = 512;

/// The smallest maximum payload an NBD export must accept: a blkif request's 11 pages.
pub const NBD_MIN_PAYLOAD: usize = ring::MAX_SEGMENTS_PER_REQUEST * 4096;

/// Why a device could not be opened or queried.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// `open` failed.
    #[error("cannot open {path}: {source}")]
    Open {
        /// The path given.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The fd is neither a block device nor a regular file.
    #[error("not a block device or regular file")]
    NotABlockDeviceOrFile,
    /// A query (fstat, ioctl, sysfs) failed.
    #[error("{what}: {source}")]
    Query {
        /// Which query.
        what: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A logical block size that is not a power of two between 512 and 4096.
    #[error("unsupported logical block size {0} (512..=4096, power of two)")]
    BlockSize(u32),
    /// A read-write device was asked for, but the fd or device is read-only.
    #[error("device is read-only")]
    ReadOnly,
    /// An NBD export this backend cannot serve.
    #[error("NBD export: {0}")]
    Nbd(String),
}

fn query(what: &'static str) -> impl FnOnce(Errno) -> DeviceError {
    move |e| DeviceError::Query {
        what,
        source: e.into(),
    }
}

/// How to open a device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceOptions {
    /// Open (or use) it read-only; writes are then refused by validation (`mode=r`).
    pub read_only: bool,
    /// For regular files: the logical block size to present (default 512). Ignored for
    /// block devices, whose own logical block size is used.
    pub logical_block_size: Option<u32>,
    /// Never use `O_DIRECT` (for file systems where it misbehaves). Default: use it.
    pub buffered: bool,
}

/// What kind of object backs the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    /// A block device with this major:minor.
    Block {
        /// Major number.
        major: u32,
        /// Minor number.
        minor: u32,
    },
    /// A regular file.
    File,
    /// An NBD export, reached through its connected socket.
    Nbd,
}

/// An open block device or regular file, with the properties the frontend is told about.
#[derive(Debug)]
pub struct Device {
    fd: OwnedFd,
    kind: DeviceKind,
    sectors: AtomicU64,
    logical_block_size: u32,
    physical_block_size: u32,
    read_only: bool,
    direct: bool,
    discard: bool,
    secure_discard: bool,
    discard_granularity: u32,
    diskseq: Option<u64>,
    nbd: Option<nbd::Export>,
}

impl Device {
    /// Opens `path` (a block device or regular file).
    ///
    /// # Errors
    /// [`DeviceError`] when it cannot be opened or is of the wrong type.
    pub fn open(path: &Path, options: &DeviceOptions) -> Result<Self, DeviceError> {
        let access = if options.read_only {
            OFlags::RDONLY
        } else {
            OFlags::RDWR
        };
        let flags = access | OFlags::CLOEXEC | OFlags::NOCTTY;
        let fd = rustix::fs::open(path, flags, Mode::empty()).map_err(|e| DeviceError::Open {
            path: path.to_owned(),
            source: e.into(),
        })?;
        Self::from_fd(fd, options)
    }

    /// Takes over an already open fd (inherited, or received from the hotplug tool). `O_DIRECT`
    /// is switched on with `fcntl(F_SETFL)` where the rules above allow it.
    ///
    /// # Errors
    /// [`DeviceError`] when the fd is of the wrong type, cannot be queried, or is read-only
    /// while `options.read_only` is false.
    pub fn from_fd(fd: OwnedFd, options: &DeviceOptions) -> Result<Self, DeviceError> {
        let st = rustix::fs::fstat(&fd).map_err(query("fstat"))?;
        let fl = rustix::fs::fcntl_getfl(&fd).map_err(query("fcntl(F_GETFL)"))?;
        let fd_read_only = (fl & OFlags::RWMODE) == OFlags::RDONLY;
        let dev = match FileType::from_raw_mode(st.st_mode) {
            FileType::BlockDevice => Self::block(fd, st.st_rdev, options.buffered)?,
            FileType::RegularFile => Self::file(fd, &st, options)?,
            _ => return Err(DeviceError::NotABlockDeviceOrFile),
        };
        let read_only = dev.read_only || fd_read_only || options.read_only;
        if read_only && !options.read_only {
            return Err(DeviceError::ReadOnly);
        }
        Ok(Self { read_only, ..dev })
    }

    fn block(fd: OwnedFd, rdev: u64, buffered: bool) -> Result<Self, DeviceError> {
        let (major, minor) = (rustix::fs::major(rdev), rustix::fs::minor(rdev));
        let direct = !buffered && set_direct(&fd, true).is_ok();
        let lbs = block::logical_block_size(fd.as_fd()).map_err(query("BLKSSZGET"))?;
        let pbs = block::physical_block_size(fd.as_fd()).map_err(query("BLKPBSZGET"))?;
        check_block_size(lbs)?;
        let ro = block::read_only(fd.as_fd()).map_err(query("BLKROGET"))?;
        let bytes = block::size_bytes(fd.as_fd()).map_err(query("BLKGETSIZE64"))?;
        let diskseq = block::diskseq(fd.as_fd()).ok().filter(|&s| s != 0);
        let queue = sysfs_queue_dir(major, minor);
        let discard_max = read_sysfs_u64(&queue, "discard_max_bytes").unwrap_or(0);
        let discard = discard_max > 0;
        let discard_granularity = read_sysfs_u64(&queue, "discard_granularity")
            .ok()
            .and_then(|g| u32::try_from(g).ok())
            .filter(|&g| g != 0)
            .unwrap_or(lbs);
        let secure_discard = discard && block::probe_secure_discard(fd.as_fd());
        Ok(Self {
            fd,
            kind: DeviceKind::Block { major, minor },
            sectors: AtomicU64::new(bytes / SECTOR_SIZE),
            logical_block_size: lbs,
            physical_block_size: pbs.max(lbs),
            read_only: ro,
            direct,
            discard,
            secure_discard,
            discard_granularity,
            diskseq,
            nbd: None,
        })
    }

    fn file(
        fd: OwnedFd,
        st: &rustix::fs::Stat,
        options: &DeviceOptions,
    ) -> Result<Self, DeviceError> {
        let lbs = options.logical_block_size.unwrap_or(SECTOR_SIZE as u32);
        check_block_size(lbs)?;
        let dio_align = rustix::fs::statx(
            &fd,
            "",
            rustix::fs::AtFlags::EMPTY_PATH,
            StatxFlags::DIOALIGN,
        )
        .ok()
        .filter(|sx| StatxFlags::from_bits_retain(sx.stx_mask).contains(StatxFlags::DIOALIGN))
        .map(|sx| sx.stx_dio_offset_align);
        // 0 means the file system does not support O_DIRECT on this file.
        let direct_ok = matches!(dio_align, Some(a) if a != 0 && a <= lbs);
        let direct = !options.buffered && direct_ok && set_direct(&fd, true).is_ok();
        if !direct {
            // An inherited fd may already carry O_DIRECT that this file system cannot honour
            // at the presented block size.
            let _ = set_direct(&fd, false);
        }
        let blksize = u32::try_from(st.st_blksize).unwrap_or(4096).max(lbs);
        // Punching an empty range is accepted exactly when the file system implements it.
        let discard = !options.read_only && punch_hole_supported(&fd);
        let size = u64::try_from(st.st_size).unwrap_or(0);
        Ok(Self {
            fd,
            kind: DeviceKind::File,
            sectors: AtomicU64::new(size / SECTOR_SIZE),
            logical_block_size: lbs,
            physical_block_size: lbs,
            read_only: false,
            direct,
            discard,
            secure_discard: false,
            discard_granularity: blksize,
            diskseq: None,
            nbd: None,
        })
    }

    /// Takes over a connected NBD socket whose handshake negotiated `export`. The logical
    /// block size is the export's minimum block size (at least 512; an export needing more
    /// than 4096 is refused), the physical one its preferred block size (up to 64 KiB); writes
    /// are refused when the export is read-only, flush is offered when the server takes
    /// `NBD_CMD_FLUSH`, discard when it takes `NBD_CMD_TRIM` or `NBD_CMD_WRITE_ZEROES`. The
    /// size is the export's, rounded down to whole logical blocks.
    ///
    /// # Errors
    /// [`DeviceError::Nbd`] for a block size outside 512..=4096, a maximum payload below
    /// [`NBD_MIN_PAYLOAD`], an export smaller than one block or whose size is not a multiple
    /// of 512; [`DeviceError::ReadOnly`] for a read-only
    /// export when `options.read_only` is false; [`DeviceError::Query`] when the socket cannot
    /// be switched to blocking without timeouts.
    pub fn nbd(
        stream: nbd::Stream,
        export: nbd::Export,
        options: &DeviceOptions,
    ) -> Result<Self, DeviceError> {
        // The data plane's io_uring waits for the socket itself: no timeouts left over from the
        // handshake.
        stream
            .set_timeout(None)
            .map_err(|source| DeviceError::Query {
                what: "clearing the NBD socket's timeouts",
                source,
            })?;
        let bs = export.block_size;
        let lbs = bs.minimum.max(SECTOR_SIZE as u32);
        check_block_size(lbs).map_err(|_| {
            DeviceError::Nbd(format!(
                "minimum block size {} (this backend serves 512 to 4096)",
                bs.minimum
            ))
        })?;
        if export.size % SECTOR_SIZE != 0 || export.size < u64::from(lbs) {
            return Err(DeviceError::Nbd(format!(
                "size {} bytes (not a whole number of 512-byte sectors, or less than a block)",
                export.size
            )));
        }
        // A blkif request without indirect segments carries up to 11 pages; the data plane
        // sends each request as one command, so the server must take that much at once.
        if (bs.maximum as usize) < NBD_MIN_PAYLOAD {
            return Err(DeviceError::Nbd(format!(
                "maximum payload {} bytes, less than a blkif request's {NBD_MIN_PAYLOAD}",
                bs.maximum
            )));
        }
        let pbs = bs.preferred.clamp(lbs, 64 * 1024);
        let pbs = if pbs.is_power_of_two() { pbs } else { lbs };
        let flags = export.flags;
        if flags.read_only() && !options.read_only {
            return Err(DeviceError::ReadOnly);
        }
        let read_only = flags.read_only() || options.read_only;
        let bytes = export.size - export.size % u64::from(lbs);
        let fd = match stream {
            nbd::Stream::Tcp(s) => OwnedFd::from(s),
            nbd::Stream::Unix(s) => OwnedFd::from(s),
        };
        Ok(Self {
            fd,
            kind: DeviceKind::Nbd,
            sectors: AtomicU64::new(bytes / SECTOR_SIZE),
            logical_block_size: lbs,
            physical_block_size: pbs,
            read_only,
            direct: true,
            discard: flags.send_trim() || flags.send_write_zeroes(),
            secure_discard: false,
            discard_granularity: pbs,
            diskseq: None,
            nbd: Some(export),
        })
    }

    /// What the NBD server said about the export ([`DeviceKind::Nbd`] only).
    pub fn nbd_export(&self) -> Option<&nbd::Export> {
        self.nbd.as_ref()
    }

    /// Whether a flush makes written data durable: always for a block device or file
    /// (`fdatasync`), for an NBD export when the server takes `NBD_CMD_FLUSH`.
    pub fn flush(&self) -> bool {
        self.nbd.as_ref().is_none_or(|e| e.flags.send_flush())
    }

    /// The fd I/O is submitted on (for an NBD export, its socket).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Block device or file.
    pub fn kind(&self) -> DeviceKind {
        self.kind
    }

    /// Size in 512-byte sectors as last read (at open or by [`Device::refresh_size`]).
    pub fn sectors(&self) -> u64 {
        self.sectors.load(Ordering::Acquire)
    }

    /// Re-reads the size (after the device or file grew or shrank) and publishes it to every
    /// queue validating against this device. Returns the new size in sectors.
    ///
    /// # Errors
    /// When the size cannot be read.
    pub fn refresh_size(&self) -> Result<u64, DeviceError> {
        let bytes = match self.kind {
            DeviceKind::Block { .. } => {
                block::size_bytes(self.fd.as_fd()).map_err(query("BLKGETSIZE64"))?
            }
            DeviceKind::File => {
                let st = rustix::fs::fstat(&self.fd).map_err(query("fstat"))?;
                u64::try_from(st.st_size).unwrap_or(0)
            }
            // The size an NBD server states in its handshake does not change on a connection.
            DeviceKind::Nbd => return Ok(self.sectors()),
        };
        let sectors = bytes / SECTOR_SIZE;
        self.sectors.store(sectors, Ordering::Release);
        Ok(sectors)
    }

    /// Logical block size in bytes (`sector-size`): 512 or 4096 (or in between).
    pub fn logical_block_size(&self) -> u32 {
        self.logical_block_size
    }

    /// Physical block size in bytes (`physical-sector-size`).
    pub fn physical_block_size(&self) -> u32 {
        self.physical_block_size
    }

    /// Whether writes are refused.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Whether I/O bypasses the page cache.
    pub fn direct(&self) -> bool {
        self.direct
    }

    /// Whether discard is supported (`feature-discard`).
    pub fn discard(&self) -> bool {
        self.discard && !self.read_only
    }

    /// Whether secure discard is supported (`discard-secure`).
    pub fn secure_discard(&self) -> bool {
        self.secure_discard && !self.read_only
    }

    /// Discard granularity in bytes (`discard-granularity`).
    pub fn discard_granularity(&self) -> u32 {
        self.discard_granularity
    }

    /// The block device's disk sequence number (`BLKGETDISKSEQ`), `None` for files and kernels
    /// without it.
    pub fn diskseq(&self) -> Option<u64> {
        self.diskseq
    }

    /// Discards `len` bytes at `offset` synchronously: `BLKDISCARD` (or `BLKSECDISCARD` when
    /// `secure`) on a block device, a punched hole in a file. The data plane prefers the
    /// asynchronous io_uring forms and uses this for secure discard, which has none.
    ///
    /// # Errors
    /// The system call's error.
    pub fn discard_sync(&self, offset: u64, len: u64, secure: bool) -> std::io::Result<()> {
        match self.kind {
            DeviceKind::Block { .. } => {
                block::discard(self.fd.as_fd(), offset, len, secure).map_err(Into::into)
            }
            DeviceKind::File => {
                if secure {
                    return Err(Errno::OPNOTSUPP.into());
                }
                rustix::fs::fallocate(
                    &self.fd,
                    FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
                    offset,
                    len,
                )
                .map_err(Into::into)
            }
            // The data plane sends an NBD export's discards on the socket.
            DeviceKind::Nbd => Err(Errno::OPNOTSUPP.into()),
        }
    }
}

fn check_block_size(lbs: u32) -> Result<(), DeviceError> {
    if lbs.is_power_of_two() && (512..=4096).contains(&lbs) {
        Ok(())
    } else {
        Err(DeviceError::BlockSize(lbs))
    }
}

fn set_direct(fd: &OwnedFd, on: bool) -> rustix::io::Result<()> {
    let fl = rustix::fs::fcntl_getfl(fd)?;
    let fl = if on {
        fl | OFlags::DIRECT
    } else {
        fl - OFlags::DIRECT
    };
    rustix::fs::fcntl_setfl(fd, fl)
}

/// The sysfs queue directory of a whole disk or, for a partition, of its parent disk.
fn sysfs_queue_dir(major: u32, minor: u32) -> PathBuf {
    let base = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    let own = base.join("queue");
    if own.is_dir() {
        own
    } else {
        base.join("..").join("queue")
    }
}

fn read_sysfs_u64(dir: &Path, name: &str) -> std::io::Result<u64> {
    let s = std::fs::read_to_string(dir.join(name))?;
    s.trim()
        .parse()
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{name}: {s:?}")))
}

/// Whether the file's file system punches holes: probed one block past the end of the file,
/// where punching changes nothing (an empty range would be refused as invalid everywhere).
fn punch_hole_supported(fd: &OwnedFd) -> bool {
    let Ok(st) = rustix::fs::fstat(fd) else {
        return false;
    };
    let end = u64::try_from(st.st_size).unwrap_or(0);
    rustix::fs::fallocate(
        fd,
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        end.next_multiple_of(4096),
        4096,
    )
    .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str, bytes: u64) -> (PathBuf, PathBuf) {
        let dir = std::env::temp_dir().join(format!("dev-test-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("img");
        std::fs::File::create(&p).unwrap().set_len(bytes).unwrap();
        (dir, p)
    }

    #[test]
    fn regular_file_properties_and_resize() {
        let (dir, p) = scratch("file", 1 << 20);
        let d = Device::open(&p, &DeviceOptions::default()).unwrap();
        assert_eq!(d.kind(), DeviceKind::File);
        assert_eq!(d.sectors(), 2048);
        assert_eq!(
            (d.logical_block_size(), d.physical_block_size()),
            (512, 512)
        );
        assert!(!d.read_only());
        assert!(d.discard(), "ext4/tmpfs punch holes");
        assert!(!d.secure_discard());
        assert_eq!(d.diskseq(), None);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(3 << 20)
            .unwrap();
        assert_eq!(d.sectors(), 2048, "size is cached until refreshed");
        assert_eq!(d.refresh_size().unwrap(), 6144);
        assert_eq!(d.sectors(), 6144);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn options_and_refusals() {
        let (dir, p) = scratch("opts", 1 << 20);
        let d = Device::open(
            &p,
            &DeviceOptions {
                logical_block_size: Some(4096),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(d.logical_block_size(), 4096);
        let bad = Device::open(
            &p,
            &DeviceOptions {
                logical_block_size: Some(1000),
                ..Default::default()
            },
        );
        assert!(matches!(bad, Err(DeviceError::BlockSize(1000))));
        let ro = Device::open(
            &p,
            &DeviceOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert!(ro.read_only() && !ro.discard());
        // A read-only fd cannot serve a read-write vbd.
        let fd: OwnedFd = std::fs::File::open(&p).unwrap().into();
        assert!(matches!(
            Device::from_fd(fd, &DeviceOptions::default()),
            Err(DeviceError::ReadOnly)
        ));
        // Neither a directory nor a character device is a disk.
        assert!(matches!(
            Device::open(
                &dir,
                &DeviceOptions {
                    read_only: true,
                    ..Default::default()
                }
            ),
            Err(DeviceError::Open { .. } | DeviceError::NotABlockDeviceOrFile)
        ));
        assert!(matches!(
            Device::open(Path::new("/dev/null"), &DeviceOptions::default()),
            Err(DeviceError::NotABlockDeviceOrFile)
        ));
        assert!(matches!(
            Device::open(&dir.join("missing"), &DeviceOptions::default()),
            Err(DeviceError::Open { .. })
        ));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn inherited_fd_gets_o_direct_where_the_file_system_allows() {
        let (dir, p) = scratch("fd", 1 << 20);
        let fd: OwnedFd = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&p)
            .unwrap()
            .into();
        let d = Device::from_fd(fd, &DeviceOptions::default()).unwrap();
        let fl = rustix::fs::fcntl_getfl(d.fd()).unwrap();
        assert_eq!(fl.contains(OFlags::DIRECT), d.direct());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn discard_sync_punches_a_hole_in_a_file() {
        let (dir, p) = scratch("punch", 0);
        std::fs::write(&p, vec![0xa5u8; 1 << 20]).unwrap();
        let d = Device::open(&p, &DeviceOptions::default()).unwrap();
        let blocks = || std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&p).unwrap());
        let before = blocks();
        d.discard_sync(0, 1 << 20, false).unwrap();
        assert!(blocks() < before);
        assert!(
            d.discard_sync(0, 4096, true).is_err(),
            "no secure discard on files"
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}
