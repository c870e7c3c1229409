//! Device-mapper through its ioctls, in Rust: `struct dm_ioctl` encoded by hand (layout of
//! `include/uapi/linux/dm-ioctl.h`, checked by tests), and the few operations blkhotplug needs:
//! create a linear device over a block device, check an existing device, remove (deferred).
//!
//! Where the kernel has the series' fd-returning interface (DM interface 4.49, see
//! `kernel-patches/README.md`), `DM_TABLE_LOAD` with [`DM_FILE_DESCRIPTOR_FLAG`] returns an fd
//! to the device and, with [`DM_DEFERRED_REMOVE`], marks it for removal once its last opener
//! closes it. Elsewhere [`create_linear`] creates, loads, resumes, opens `/dev/dm-N`, verifies
//! by uuid, and asks for deferred removal: a kill between `DM_DEV_CREATE` and that last step
//! leaves the device behind (see the README). Even with 4.49 a kill between `DM_DEV_CREATE`
//! and `DM_TABLE_LOAD` leaves an empty device (no table, no disk).
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::OFlags;
use rustix::io::Errno;
use rustix::ioctl::Opcode;

pub use ::blkdev::dm::{
    decode_dev, encode_dev, Lookup, Reply, Request, Target, DM_ACTIVE_PRESENT_FLAG,
    DM_DEFERRED_REMOVE, DM_DEV_CREATE, DM_DEV_REMOVE, DM_DEV_STATUS, DM_DEV_SUSPEND,
    DM_FILE_DESCRIPTOR_FLAG, DM_IOCTL_SIZE, DM_MAX_TYPE_NAME, DM_NAME_LEN, DM_READONLY_FLAG,
    DM_SUSPEND_FLAG, DM_TABLE_LOAD, DM_TARGET_SPEC_SIZE, DM_UUID_LEN, DM_VERSION, DM_VERSION_MAJOR,
    FD_INTERFACE_MINOR,
};

use crate::{blkdev, Error};

/// An open `/dev/mapper/control` and the kernel's interface version.
#[derive(Debug)]
pub struct Control {
    fd: OwnedFd,
    version: [u32; 3],
}

const CONTROL: &str = "/dev/mapper/control";

impl Control {
    /// Opens the control node and asks for the interface version.
    ///
    /// # Errors
    /// [`Error::Dm`] (`ENOENT` where the kernel has no device-mapper).
    pub fn open() -> Result<Self, Error> {
        let fd = rustix::fs::open(
            CONTROL,
            OFlags::RDWR | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            rustix::fs::Mode::empty(),
        )
        .map_err(|source| Error::Dm {
            op: "open /dev/mapper/control",
            source,
        })?;
        let mut ctl = Self {
            fd,
            version: [DM_VERSION_MAJOR, 0, 0],
        };
        let reply = ctl.call("DM_VERSION", DM_VERSION, &ctl.request(0, Lookup::None))?;
        ctl.version = reply.version;
        Ok(ctl)
    }

    /// The kernel's interface version.
    #[must_use]
    pub fn version(&self) -> [u32; 3] {
        self.version
    }

    /// Whether `DM_TABLE_LOAD` can return an fd (the series' 4.49 interface).
    #[must_use]
    pub fn has_fd_interface(&self) -> bool {
        self.version[0] == DM_VERSION_MAJOR && self.version[1] >= FD_INTERFACE_MINOR
    }

    fn request(&self, flags: u32, lookup: Lookup) -> Request {
        Request {
            minor: 0,
            flags,
            lookup,
            targets: Vec::new(),
        }
    }

    fn call(&self, op: &'static str, code: Opcode, req: &Request) -> Result<Reply, Error> {
        ::blkdev::dm::call(self.fd.as_fd(), code, req).map_err(|source| Error::Dm { op, source })
    }

    fn call_with_fd(
        &self,
        op: &'static str,
        code: Opcode,
        req: &Request,
    ) -> Result<(Reply, Option<OwnedFd>), Error> {
        ::blkdev::dm::call_with_fd(self.fd.as_fd(), code, req)
            .map_err(|source| Error::Dm { op, source })
    }

    /// `DM_DEV_STATUS`.
    ///
    /// # Errors
    /// [`Error::Dm`] (`ENXIO` when there is no such device).
    pub fn status(&self, lookup: Lookup) -> Result<Reply, Error> {
        self.call("DM_DEV_STATUS", DM_DEV_STATUS, &self.request(0, lookup))
    }

    /// `DM_DEV_REMOVE`; with `deferred`, a device still open is removed when its last opener
    /// closes it.
    ///
    /// # Errors
    /// [`Error::Dm`].
    pub fn remove(&self, lookup: Lookup, deferred: bool) -> Result<(), Error> {
        let flags = if deferred { DM_DEFERRED_REMOVE } else { 0 };
        self.call("DM_DEV_REMOVE", DM_DEV_REMOVE, &self.request(flags, lookup))
            .map(drop)
    }
}

/// A device-mapper device blkhotplug created, held open.
#[derive(Debug)]
pub struct DmDevice {
    /// The open device.
    pub fd: OwnedFd,
    /// `/dev/dm-N`.
    pub path: PathBuf,
    /// Device number.
    pub dev: (u32, u32),
    /// Its diskseq.
    pub diskseq: u64,
    /// Its uuid (unique: remove looks it up by this).
    pub uuid: String,
}

/// Creates `name` (uuid `uuid`) as a linear device over the whole block device open on
/// `under`, read-only when asked, marked for deferred removal, and returns it open. On failure
/// nothing is left behind (the half-made device is removed).
///
/// # Errors
/// [`Error::Dm`], [`Error::WrongDevice`] or [`Error::Sys`].
pub fn create_linear(
    under: BorrowedFd<'_>,
    under_path: &Path,
    name: &str,
    uuid: &str,
    read_only: bool,
) -> Result<DmDevice, Error> {
    let ctl = Control::open()?;
    let (major, minor) = blkdev::device_number(under, under_path)?;
    let sectors = blkdev::size_bytes(under, under_path)? / 512;
    if sectors == 0 {
        return Err(Error::WrongDevice {
            path: under_path.to_owned(),
            why: "empty device".into(),
        });
    }
    let create = Lookup::Create {
        name: name.to_owned(),
        uuid: uuid.to_owned(),
    };
    let created = ctl.call("DM_DEV_CREATE", DM_DEV_CREATE, &ctl.request(0, create))?;
    let result = finish_linear(
        &ctl,
        created.dev,
        (major, minor),
        sectors,
        name,
        uuid,
        read_only,
    );
    if result.is_err() {
        // Nobody else can hold a device this young open; our fd (if any) is already closed.
        let _ = ctl.remove(Lookup::Uuid(uuid.to_owned()), false);
    }
    result
}

fn finish_linear(
    ctl: &Control,
    dev: (u32, u32),
    under: (u32, u32),
    sectors: u64,
    name: &str,
    uuid: &str,
    read_only: bool,
) -> Result<DmDevice, Error> {
    let table = vec![Target {
        start: 0,
        length: sectors,
        kind: "linear".into(),
        params: format!("{}:{} 0", under.0, under.1),
    }];
    let ro = if read_only { DM_READONLY_FLAG } else { 0 };
    let path = PathBuf::from(format!("/dev/dm-{}", dev.1));
    let by_name = Lookup::Name(name.to_owned());
    let fd = if ctl.has_fd_interface() {
        let req = Request {
            minor: FD_INTERFACE_MINOR,
            flags: ro | DM_FILE_DESCRIPTOR_FLAG | DM_DEFERRED_REMOVE,
            lookup: by_name.clone(),
            targets: table,
        };
        let (_, fd) = ctl.call_with_fd("DM_TABLE_LOAD", DM_TABLE_LOAD, &req)?;
        let fd = fd.ok_or(Error::Dm {
            op: "DM_TABLE_LOAD returned no fd",
            source: Errno::BADF,
        })?;
        ctl.call(
            "DM_DEV_SUSPEND (resume)",
            DM_DEV_SUSPEND,
            &ctl.request(0, by_name),
        )?;
        fd
    } else {
        let req = Request {
            minor: 0,
            flags: ro,
            lookup: by_name.clone(),
            targets: table,
        };
        ctl.call("DM_TABLE_LOAD", DM_TABLE_LOAD, &req)?;
        ctl.call(
            "DM_DEV_SUSPEND (resume)",
            DM_DEV_SUSPEND,
            &ctl.request(0, by_name),
        )?;
        let (fd, _, _) = blkdev::open_node(&path, !read_only)?;
        // The node we opened must be the device we made: same number, and device-mapper
        // says the device with that number carries our (random) uuid.
        let status = ctl.status(Lookup::Dev(dev.0, dev.1))?;
        if status.uuid != uuid {
            return Err(Error::WrongDevice {
                path,
                why: format!("uuid {:?}, expected {uuid:?}", status.uuid),
            });
        }
        ctl.remove(Lookup::Uuid(uuid.to_owned()), true)?;
        fd
    };
    let got = blkdev::device_number(fd.as_fd(), &path)?;
    if got != dev {
        return Err(Error::WrongDevice {
            path,
            why: format!("device {}:{}, expected {}:{}", got.0, got.1, dev.0, dev.1),
        });
    }
    let diskseq = blkdev::diskseq(fd.as_fd(), &path)?;
    let [major, minor, _] = ctl.version();
    if ctl.has_fd_interface() {
        tracing::info!("{name}: {} from DM_TABLE_LOAD's fd (device-mapper interface {major}.{minor}), removed with its last opener", path.display());
    } else {
        tracing::info!("{name}: {} opened by path and checked by uuid (device-mapper interface {major}.{minor} returns no fd)", path.display());
    }
    Ok(DmDevice {
        fd,
        path,
        dev,
        diskseq,
        uuid: uuid.to_owned(),
    })
}

/// Checks that `fd`, opened from `/dev/mapper/NAME`, is the device-mapper device `name`.
///
/// # Errors
/// [`Error::WrongDevice`] or [`Error::Dm`].
pub fn verify_mapper(fd: BorrowedFd<'_>, path: &Path, name: &str) -> Result<(), Error> {
    let ctl = Control::open()?;
    let dev = blkdev::device_number(fd, path)?;
    let by_dev = ctl
        .status(Lookup::Dev(dev.0, dev.1))
        .map_err(|_| Error::WrongDevice {
            path: path.to_owned(),
            why: "not a device-mapper device".into(),
        })?;
    if by_dev.name != name {
        return Err(Error::WrongDevice {
            path: path.to_owned(),
            why: format!("is device-mapper device {:?}", by_dev.name),
        });
    }
    Ok(())
}

/// What [`remove_if`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    /// Removed, or marked to go once its openers close it.
    Removed,
    /// No device with that uuid.
    Gone,
    /// The device with that uuid has another diskseq; left alone.
    Mismatch,
}

/// Removes (deferred) the device with `uuid` if its diskseq is still `diskseq`. The uuid is
/// blkhotplug's own random one, so it names our device alone; the diskseq comes from sysfs,
/// so no `/dev/dm-N` node is needed.
///
/// # Errors
/// [`Error::Dm`] or [`Error::Sys`].
pub fn remove_if(uuid: &str, diskseq: u64) -> Result<Removal, Error> {
    let ctl = Control::open()?;
    let status = match ctl.status(Lookup::Uuid(uuid.to_owned())) {
        Ok(s) => s,
        Err(Error::Dm {
            source: Errno::NXIO,
            ..
        }) => return Ok(Removal::Gone),
        Err(e) => return Err(e),
    };
    match blkdev::sysfs_diskseq(status.dev.0, status.dev.1) {
        Ok(found) if found == diskseq => {}
        Ok(_) => return Ok(Removal::Mismatch),
        Err(Error::NotFound(_)) => return Ok(Removal::Gone),
        Err(e) => return Err(e),
    }
    match ctl.remove(Lookup::Uuid(uuid.to_owned()), true) {
        Ok(()) => Ok(Removal::Removed),
        Err(Error::Dm {
            source: Errno::NXIO,
            ..
        }) => Ok(Removal::Gone),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_is_absent_or_answers() {
        // This kernel has no device-mapper; where one exists, DM_VERSION must answer 4.x.
        match Control::open() {
            Ok(ctl) => assert_eq!(ctl.version()[0], 4),
            Err(Error::Dm { source, .. }) => assert!(
                matches!(source, Errno::NOENT | Errno::NODEV | Errno::NXIO),
                "{source}"
            ),
            Err(e) => panic!("unexpected {e}"),
        }
    }
}
