//! Loop devices, attached race-free: `LOOP_CTL_GET_FREE`, open that device, `LOOP_CONFIGURE`
//! on that same fd with every setting at once (autoclear, read-only, direct I/O, block size).
//! A device another process configured first (`EBUSY`) is simply skipped: no lock is taken.
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::OFlags;
use rustix::io::Errno;

use ::blkdev::loopdev as ioctl;
pub use ::blkdev::loopdev::{
    LoopConfig, LoopInfo64, LOOP_MAJOR, LO_FLAGS_AUTOCLEAR, LO_FLAGS_DIRECT_IO, LO_FLAGS_PARTSCAN,
    LO_FLAGS_READ_ONLY,
};

use crate::{blkdev, Error};

/// How many free devices may be taken by others before giving up.
pub const MAX_ATTEMPTS: u32 = 256;
const LOOP_CONTROL: &str = "/dev/loop-control";

/// Settings for [`attach`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoopOptions {
    /// Bind read-only and open the device read-only.
    pub read_only: bool,
    /// Let the kernel unbind the device once its last opener closes it.
    pub autoclear: bool,
}

/// An attached loop device, held open.
#[derive(Debug)]
pub struct LoopDevice {
    /// The open device (read-only when asked).
    pub fd: OwnedFd,
    /// Its index N.
    pub index: u32,
    /// `/dev/loopN`.
    pub path: PathBuf,
    /// Its minor number (major is [`LOOP_MAJOR`]).
    pub minor: u32,
    /// Its diskseq, read after binding.
    pub diskseq: u64,
    /// Whether the kernel kept direct I/O on.
    pub direct_io: bool,
    /// The logical block size chosen.
    pub block_size: u32,
}

/// Attaches the regular file open on `backing` to a free loop device.
///
/// Direct I/O is asked for and kept by the kernel only where the file and block size allow;
/// the block size is the file's direct-I/O alignment (the logical block size of the storage
/// under it), so a 4Kn disk gives a 4 KiB loop device.
///
/// # Errors
/// [`Error::LoopPoolFull`] when the kernel has no loop device to give,
/// [`Error::LoopContention`] after [`MAX_ATTEMPTS`] devices were taken by others, else
/// [`Error::Sys`] naming the failed step.
pub fn attach(
    backing: BorrowedFd<'_>,
    backing_path: &Path,
    opts: LoopOptions,
) -> Result<LoopDevice, Error> {
    let backing_fd = u32::try_from(std::os::fd::AsRawFd::as_raw_fd(&backing))
        .map_err(|_| Error::sys("backing fd")(Errno::BADF))?;
    let block_size = backing_block_size(backing);
    let st = rustix::fs::fstat(backing)
        .map_err(Error::sys(format!("fstat {}", backing_path.display())))?;
    let ctl = rustix::fs::open(
        LOOP_CONTROL,
        OFlags::RDWR | OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(Error::sys(format!("open {LOOP_CONTROL}")))?;
    let mut flags = LO_FLAGS_DIRECT_IO;
    if opts.read_only {
        flags |= LO_FLAGS_READ_ONLY;
    }
    if opts.autoclear {
        flags |= LO_FLAGS_AUTOCLEAR;
    }
    let mut config = LoopConfig {
        fd: backing_fd,
        block_size,
        ..LoopConfig::default()
    };
    let mut attempts = 0;
    let (fd, index, minor) = loop {
        attempts += 1;
        if attempts > MAX_ATTEMPTS {
            return Err(Error::LoopContention(MAX_ATTEMPTS));
        }
        let index = ioctl::ctl_get_free(ctl.as_fd()).map_err(Error::LoopPoolFull)?;
        let path = blkdev::loop_path(index);
        let (fd, major, minor) = match blkdev::open_node(&path, !opts.read_only) {
            Ok(x) => x,
            // Removed (LOOP_CTL_REMOVE) between GET_FREE and open: take another.
            Err(Error::NotFound(_)) => continue,
            Err(e) => return Err(e),
        };
        if major != LOOP_MAJOR {
            return Err(Error::WrongDevice {
                path,
                why: format!("major {major}, not a loop device"),
            });
        }
        config.info.lo_flags = flags;
        match ioctl::configure(fd.as_fd(), &config) {
            Ok(()) => break (fd, index, minor),
            // Another process bound it first: not an error, take another.
            Err(Errno::BUSY) => continue,
            // Older kernels refuse what newer ones silently drop: retry plainly once.
            Err(Errno::INVAL)
                if config.info.lo_flags & LO_FLAGS_DIRECT_IO != 0 || config.block_size != 0 =>
            {
                flags &= !LO_FLAGS_DIRECT_IO;
                config.block_size = 0;
                attempts -= 1;
                continue;
            }
            Err(e) => {
                return Err(Error::Sys {
                    what: format!("LOOP_CONFIGURE {}", path.display()),
                    source: e,
                })
            }
        }
    };
    let path = blkdev::loop_path(index);
    // Read the diskseq, then check that the binding is still ours: while we hold the device
    // open nobody can unbind it (LOOP_CLR_FD from others only sets autoclear), so the diskseq
    // read belongs to our binding.
    let diskseq = blkdev::diskseq(fd.as_fd(), &path)?;
    let info = ioctl::get_status(fd.as_fd())
        .map_err(Error::sys(format!("LOOP_GET_STATUS64 {}", path.display())))?;
    if info.lo_inode != st.st_ino || info.lo_device != st.st_dev {
        return Err(Error::WrongDevice {
            path,
            why: "bound to another file after LOOP_CONFIGURE".into(),
        });
    }
    let block_size = blkdev::logical_block_size(fd.as_fd(), &path)?;
    Ok(LoopDevice {
        fd,
        index,
        path,
        minor,
        diskseq,
        direct_io: info.lo_flags & LO_FLAGS_DIRECT_IO != 0,
        block_size,
    })
}

/// The logical block size for a loop device over `backing`: the file's direct-I/O offset
/// alignment (`STATX_DIOALIGN`, the logical block size of the storage under it) when that is a
/// valid block size, else 0 (the kernel's default).
fn backing_block_size(backing: BorrowedFd<'_>) -> u32 {
    use rustix::fs::{AtFlags, StatxFlags};
    let align = rustix::fs::statx(backing, "", AtFlags::EMPTY_PATH, StatxFlags::DIOALIGN)
        .ok()
        .filter(|s| s.stx_mask & StatxFlags::DIOALIGN.bits() != 0)
        .map_or(0, |s| s.stx_dio_offset_align);
    if align.is_power_of_two() && (512..=4096).contains(&align) {
        align
    } else {
        0
    }
}

/// What [`detach_if`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detach {
    /// It was ours and is now unbound (or will be once its other openers close it).
    Detached,
    /// It was already gone or unbound.
    Gone,
    /// Its diskseq differs: someone else's device now; left alone.
    Reused {
        /// The diskseq found.
        found: u64,
    },
}

/// Unbinds the loop device at `path` only if its diskseq is still `diskseq`. Holding the device
/// open across the check and `LOOP_CLR_FD` makes this race-free: while we hold it, nobody can
/// unbind and rebind it.
///
/// # Errors
/// [`Error::WrongDevice`] when `path` is not a loop device, [`Error::Sys`] on failure.
pub fn detach_if(path: &Path, diskseq: u64) -> Result<Detach, Error> {
    let (fd, major, _) = match blkdev::open_node(path, false) {
        Ok(x) => x,
        Err(Error::NotFound(_)) => return Ok(Detach::Gone),
        Err(e) => return Err(e),
    };
    if major != LOOP_MAJOR {
        return Err(Error::WrongDevice {
            path: path.to_owned(),
            why: format!("major {major}, not a loop device"),
        });
    }
    match ioctl::get_status(fd.as_fd()) {
        Ok(_) => {}
        Err(Errno::NXIO) => return Ok(Detach::Gone),
        Err(e) => {
            return Err(Error::Sys {
                what: format!("LOOP_GET_STATUS64 {}", path.display()),
                source: e,
            })
        }
    }
    let found = blkdev::diskseq(fd.as_fd(), path)?;
    if found != diskseq {
        return Ok(Detach::Reused { found });
    }
    match ioctl::clr_fd(fd.as_fd()) {
        Ok(()) => Ok(Detach::Detached),
        Err(Errno::NXIO) => Ok(Detach::Gone),
        Err(e) => Err(Error::Sys {
            what: format!("LOOP_CLR_FD {}", path.display()),
            source: e,
        }),
    }
}

/// Unbinds the loop device open on `fd` (used when `add` fails before any backend holds it).
///
/// # Errors
/// [`Error::Sys`].
pub fn detach_fd(fd: BorrowedFd<'_>, path: &Path) -> Result<(), Error> {
    match ioctl::clr_fd(fd) {
        Ok(()) | Err(Errno::NXIO) => Ok(()),
        Err(e) => Err(Error::Sys {
            what: format!("LOOP_CLR_FD {}", path.display()),
            source: e,
        }),
    }
}
