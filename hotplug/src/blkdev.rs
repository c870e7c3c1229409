//! Opening what `params` names without being fooled: no symbolic link anywhere in the path,
//! the kind of object decided on the opened fd, and the facts about a block device (number,
//! diskseq, block size) read from the fd itself.
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{FileType, Mode as FileMode, OFlags, ResolveFlags, CWD};
use rustix::io::Errno;

use ::blkdev::block;

use crate::Error;

/// What an opened path turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A regular file.
    File,
    /// A block device with this number.
    Block {
        /// Major number.
        major: u32,
        /// Minor number.
        minor: u32,
    },
}

/// Opens `path` (absolute) for reading, and for writing when `write`, refusing symbolic links
/// in any component (`openat2` with `RESOLVE_NO_SYMLINKS`), FIFOs, sockets and character
/// devices. The fd is close-on-exec and blocking.
///
/// # Errors
/// [`Error::NotFound`], [`Error::Symlink`], [`Error::ReadOnly`], [`Error::NotFileOrDevice`] or
/// [`Error::Sys`].
pub fn open(path: &Path, write: bool) -> Result<(OwnedFd, Kind), Error> {
    let access = if write { OFlags::RDWR } else { OFlags::RDONLY };
    // O_NONBLOCK so that a FIFO cannot hang us; cleared below once we know what this is.
    let flags = access | OFlags::CLOEXEC | OFlags::NOCTTY | OFlags::NONBLOCK;
    let fd = rustix::fs::openat2(
        CWD,
        path,
        flags,
        FileMode::empty(),
        ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
    )
    .map_err(|e| match e {
        Errno::NOENT | Errno::NOTDIR => Error::NotFound(path.to_owned()),
        Errno::LOOP => Error::Symlink(path.to_owned()),
        Errno::ISDIR => Error::NotFileOrDevice(path.to_owned()),
        Errno::ACCESS | Errno::ROFS | Errno::PERM if write => Error::ReadOnly(path.to_owned()),
        e => Error::Sys {
            what: format!("open {}", path.display()),
            source: e,
        },
    })?;
    let kind = kind_of(fd.as_fd(), path)?;
    rustix::fs::fcntl_setfl(&fd, access)
        .map_err(Error::sys(format!("F_SETFL {}", path.display())))?;
    if kind == Kind::File && write && !file_writable(fd.as_fd()) {
        return Err(Error::ReadOnly(path.to_owned()));
    }
    Ok((fd, kind))
}

/// Whether a file opened for writing is meant to be written: root opens a file without write
/// permission bits anyway, so honour the bits (a `chmod a-w` image stays read-only), and refuse
/// a file on a read-only mount.
fn file_writable(fd: BorrowedFd<'_>) -> bool {
    let bits = rustix::fs::fstat(fd).is_ok_and(|st| st.st_mode & 0o222 != 0);
    bits && rustix::fs::fstatvfs(fd)
        .is_ok_and(|s| !s.f_flag.contains(rustix::fs::StatVfsMountFlags::RDONLY))
}

/// What `fd` is: a regular file or a block device.
///
/// # Errors
/// [`Error::NotFileOrDevice`] for anything else.
pub fn kind_of(fd: BorrowedFd<'_>, path: &Path) -> Result<Kind, Error> {
    let st = rustix::fs::fstat(fd).map_err(Error::sys(format!("fstat {}", path.display())))?;
    match FileType::from_raw_mode(st.st_mode) {
        FileType::RegularFile => Ok(Kind::File),
        FileType::BlockDevice => Ok(Kind::Block {
            major: rustix::fs::major(st.st_rdev),
            minor: rustix::fs::minor(st.st_rdev),
        }),
        _ => Err(Error::NotFileOrDevice(path.to_owned())),
    }
}

/// The number of the block device open on `fd`.
///
/// # Errors
/// [`Error::WrongDevice`] when `fd` is not a block device.
pub fn device_number(fd: BorrowedFd<'_>, path: &Path) -> Result<(u32, u32), Error> {
    match kind_of(fd, path)? {
        Kind::Block { major, minor } => Ok((major, minor)),
        Kind::File => Err(Error::WrongDevice {
            path: path.to_owned(),
            why: "not a block device".into(),
        }),
    }
}

/// The disk sequence number of the block device open on `fd` (Linux 5.15 or later).
///
/// # Errors
/// [`Error::Sys`].
pub fn diskseq(fd: BorrowedFd<'_>, path: &Path) -> Result<u64, Error> {
    block::diskseq(fd).map_err(Error::sys(format!("BLKGETDISKSEQ {}", path.display())))
}

/// The logical block size of the block device open on `fd`.
///
/// # Errors
/// [`Error::Sys`].
pub fn logical_block_size(fd: BorrowedFd<'_>, path: &Path) -> Result<u32, Error> {
    block::logical_block_size(fd).map_err(Error::sys(format!("BLKSSZGET {}", path.display())))
}

/// The size in bytes of the block device open on `fd`.
///
/// # Errors
/// [`Error::Sys`].
pub fn size_bytes(fd: BorrowedFd<'_>, path: &Path) -> Result<u64, Error> {
    block::size_bytes(fd).map_err(Error::sys(format!("BLKGETSIZE64 {}", path.display())))
}

/// Opens a device node that blkhotplug itself names (`/dev/loopN`, `/dev/dm-N`): no symbolic
/// links, must be a block device.
///
/// # Errors
/// [`Error::NotFound`] when the node is absent (or its device gone: `ENXIO`), else as [`open`].
pub fn open_node(path: &Path, write: bool) -> Result<(OwnedFd, u32, u32), Error> {
    let (fd, kind) = open(path, write).map_err(|e| match e {
        Error::Sys {
            source: Errno::NXIO | Errno::NODEV,
            ..
        } => Error::NotFound(path.to_owned()),
        e => e,
    })?;
    match kind {
        Kind::Block { major, minor } => Ok((fd, major, minor)),
        Kind::File => Err(Error::WrongDevice {
            path: path.to_owned(),
            why: "not a block device".into(),
        }),
    }
}

/// The diskseq of block device `major:minor` from sysfs (`/sys/dev/block/M:m/diskseq`,
/// decimal), for a device without a node in `/dev`.
///
/// # Errors
/// [`Error::NotFound`] when there is no such device, [`Error::Sys`] for a malformed value.
pub fn sysfs_diskseq(major: u32, minor: u32) -> Result<u64, Error> {
    let path = PathBuf::from(format!("/sys/dev/block/{major}:{minor}/diskseq"));
    let text = std::fs::read_to_string(&path).map_err(|_| Error::NotFound(path.clone()))?;
    text.trim_end_matches('\n').parse().map_err(|_| Error::Sys {
        what: format!("parse {}", path.display()),
        source: Errno::INVAL,
    })
}

/// `/dev/loopN`.
#[must_use]
pub fn loop_path(index: u32) -> PathBuf {
    PathBuf::from(format!("/dev/loop{index}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("blkdev-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mkdir");
        dir
    }

    #[test]
    fn refuses_symlinks_anywhere_and_odd_files() {
        let dir = scratch("links");
        let file = dir.join("disk.img");
        std::fs::write(&file, [0u8; 4096]).expect("write");
        assert_eq!(open(&file, false).map(|(_, k)| k).ok(), Some(Kind::File));

        let link = dir.join("link.img");
        std::os::unix::fs::symlink(&file, &link).expect("symlink");
        assert!(matches!(open(&link, false), Err(Error::Symlink(_))));

        let dirlink = dir.join("sub");
        std::os::unix::fs::symlink(&dir, &dirlink).expect("symlink");
        assert!(matches!(
            open(&dirlink.join("disk.img"), false),
            Err(Error::Symlink(_))
        ));

        assert!(matches!(
            open(&dir.join("absent"), false),
            Err(Error::NotFound(_))
        ));
        assert!(matches!(open(&dir, false), Err(Error::NotFileOrDevice(_))));

        let fifo = dir.join("fifo");
        rustix::fs::mknodat(
            CWD,
            &fifo,
            FileType::Fifo,
            FileMode::from_raw_mode(0o600),
            0,
        )
        .expect("mkfifo");
        assert!(matches!(open(&fifo, false), Err(Error::NotFileOrDevice(_))));
        assert!(matches!(
            open(Path::new("/dev/null"), false),
            Err(Error::NotFileOrDevice(_))
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn sysfs_diskseq_matches_the_ioctl() {
        let Ok((fd, major, minor)) = open_node(Path::new("/dev/loop0"), false) else {
            sim::skip::report_skip("needs root: /dev/loop0 cannot be opened here");
            return;
        };
        let by_ioctl = diskseq(fd.as_fd(), Path::new("/dev/loop0")).expect("BLKGETDISKSEQ");
        assert_eq!(sysfs_diskseq(major, minor).ok(), Some(by_ioctl));
        assert!(matches!(
            sysfs_diskseq(0xfff, 0xfffff),
            Err(Error::NotFound(_))
        ));
    }

    #[test]
    fn cleared_nonblock() {
        let dir = scratch("nb");
        let file = dir.join("disk.img");
        std::fs::write(&file, [0u8; 512]).expect("write");
        let (fd, _) = open(&file, true).expect("open");
        let fl = rustix::fs::fcntl_getfl(&fd).expect("getfl");
        assert!(!fl.contains(OFlags::NONBLOCK));
        assert_eq!(fl & OFlags::RWMODE, OFlags::RDWR);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
