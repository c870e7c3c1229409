//! Turning `params` into an open block device: a file becomes a loop device, a block device is
//! opened as it is, `/dev/mapper/NAME` is opened and verified, `linear:DEV` becomes a private
//! device-mapper device. What was created is recorded so that `remove` undoes only that.
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use xen::handoff::PhysicalDevice;

use crate::blkdev::{self, Kind};
use crate::loopdev::{self, LoopOptions};
use crate::params::{Mode, Source};
use crate::{dm, Error};

/// What `add` created, as recorded in the [`CREATED`] node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Created {
    /// Nothing: an existing block or device-mapper device was opened.
    Nothing,
    /// A loop device (`physical-device-path` names it).
    Loop,
    /// A device-mapper device with this uuid.
    Dm {
        /// Its uuid.
        uuid: String,
    },
}

/// Backend node recording what `add` created: `loop` or `dm UUID`; absent when nothing.
pub const CREATED: &str = "blkhotplug-created";

impl Created {
    /// The [`CREATED`] node's value; `None` for [`Created::Nothing`].
    #[must_use]
    pub fn record(&self) -> Option<String> {
        match self {
            Self::Nothing => None,
            Self::Loop => Some("loop".into()),
            Self::Dm { uuid } => Some(format!("dm {uuid}")),
        }
    }

    /// Parses the [`CREATED`] node's value.
    ///
    /// # Errors
    /// [`Error::BadParams`] naming the node when it is malformed.
    pub fn parse(value: &[u8]) -> Result<Self, Error> {
        let bad = || Error::BadParams {
            params: String::from_utf8_lossy(value).into_owned(),
            why: "unknown blkhotplug-created record",
        };
        match value {
            b"loop" => Ok(Self::Loop),
            v => {
                let uuid = v.strip_prefix(b"dm ").ok_or_else(bad)?;
                if uuid.is_empty()
                    || uuid.len() >= dm::DM_UUID_LEN
                    || !uuid.iter().all(u8::is_ascii_graphic)
                {
                    return Err(bad());
                }
                Ok(Self::Dm {
                    uuid: String::from_utf8_lossy(uuid).into_owned(),
                })
            }
        }
    }
}

/// The device `add` hands over, held open until the backend holds it.
#[derive(Debug)]
pub struct Attached {
    /// The open device.
    pub fd: OwnedFd,
    /// Its node (`physical-device-path`).
    pub path: PathBuf,
    /// Major number.
    pub major: u32,
    /// Minor number.
    pub minor: u32,
    /// Its diskseq.
    pub diskseq: u64,
    /// Opened read-only.
    pub read_only: bool,
    /// What was created for it.
    pub created: Created,
    autoclear: bool,
}

/// Settings for [`attach`].
#[derive(Debug, Clone)]
pub struct AttachOptions {
    /// The toolstack's `mode`.
    pub mode: Mode,
    /// Whether what is created may vanish once the last opener closes it (only when a backend
    /// will say it holds the device: `opened` or fd handoff).
    pub autoclear: bool,
    /// Name for a device-mapper device created for `linear:` (unique per attachment).
    pub dm_name: String,
    /// Its uuid.
    pub dm_uuid: String,
}

/// Opens or creates the device `source` names.
///
/// # Errors
/// [`Error`] saying what is wrong; nothing is left behind.
pub fn attach(source: &Source, opts: &AttachOptions) -> Result<Attached, Error> {
    let write = opts.mode.writable();
    let read_only = !write;
    match source {
        Source::Path(path) => {
            let (fd, kind) = blkdev::open(path, write)?;
            match kind {
                Kind::File => {
                    let lo = loopdev::attach(
                        fd.as_fd(),
                        path,
                        LoopOptions {
                            read_only,
                            autoclear: opts.autoclear,
                        },
                    )?;
                    tracing::info!(loop_device = %lo.path.display(), direct_io = lo.direct_io, block_size = lo.block_size, "attached {}", path.display());
                    Ok(Attached {
                        fd: lo.fd,
                        path: lo.path,
                        major: loopdev::LOOP_MAJOR,
                        minor: lo.minor,
                        diskseq: lo.diskseq,
                        read_only,
                        created: Created::Loop,
                        autoclear: opts.autoclear,
                    })
                }
                Kind::Block { major, minor } => existing(fd, path, major, minor, read_only),
            }
        }
        Source::Mapper { name, path } => {
            let (fd, kind) = blkdev::open(path, write)?;
            let Kind::Block { major, minor } = kind else {
                return Err(Error::WrongDevice {
                    path: path.clone(),
                    why: "not a block device".into(),
                });
            };
            dm::verify_mapper(fd.as_fd(), path, name)?;
            existing(fd, path, major, minor, read_only)
        }
        Source::Linear(path) => {
            if !opts.autoclear {
                return Err(Error::BadParams {
                    params: format!("linear:{}", path.display()),
                    why: "needs a backend that publishes `opened` or `handoff-socket` (else the device could not be removed safely)",
                });
            }
            let (under, kind) = blkdev::open(path, write)?;
            if !matches!(kind, Kind::Block { .. }) {
                return Err(Error::WrongDevice {
                    path: path.clone(),
                    why: "linear: needs a block device".into(),
                });
            }
            let d =
                dm::create_linear(under.as_fd(), path, &opts.dm_name, &opts.dm_uuid, read_only)?;
            Ok(Attached {
                fd: d.fd,
                path: d.path,
                major: d.dev.0,
                minor: d.dev.1,
                diskseq: d.diskseq,
                read_only,
                created: Created::Dm { uuid: d.uuid },
                autoclear: true,
            })
        }
    }
}

fn existing(
    fd: OwnedFd,
    path: &Path,
    major: u32,
    minor: u32,
    read_only: bool,
) -> Result<Attached, Error> {
    let diskseq = blkdev::diskseq(fd.as_fd(), path)?;
    Ok(Attached {
        fd,
        path: path.to_owned(),
        major,
        minor,
        diskseq,
        read_only,
        created: Created::Nothing,
        autoclear: false,
    })
}

impl Attached {
    /// The `physical-device` value, with the diskseq when the backend understands it.
    #[must_use]
    pub fn physical_device(&self, with_diskseq: bool) -> PhysicalDevice {
        PhysicalDevice {
            major: self.major,
            minor: self.minor,
            diskseq: (with_diskseq && self.diskseq != 0).then_some(self.diskseq),
        }
    }

    /// Gives up after a failed `add`: undoes what was created unless the kernel will do it
    /// when the fd closes (autoclear, deferred remove), then closes the fd.
    ///
    /// # Errors
    /// [`Error::Sys`] when the loop device cannot be unbound.
    pub fn abandon(self) -> Result<(), Error> {
        match self.created {
            Created::Loop if !self.autoclear => loopdev::detach_fd(self.fd.as_fd(), &self.path),
            _ => Ok(()),
        }
    }
}

/// What [`release`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Released {
    /// Torn down (or marked to go once the backend closes it).
    TornDown,
    /// Already gone.
    Gone,
    /// Its diskseq no longer matches: someone else's device now, left alone.
    LeftAlone,
}

/// Tears down what `add` created, only if it is still the same device (same diskseq).
///
/// # Errors
/// [`Error`] when the check or teardown fails.
pub fn release(created: &Created, path: &Path, diskseq: u64) -> Result<Released, Error> {
    match created {
        Created::Nothing => Ok(Released::Gone),
        Created::Loop => {
            Ok(match loopdev::detach_if(path, diskseq)? {
                loopdev::Detach::Detached => Released::TornDown,
                loopdev::Detach::Gone => Released::Gone,
                loopdev::Detach::Reused { found } => {
                    tracing::info!("{} has diskseq {found:x}, not {diskseq:x}: reused by someone else, left alone", path.display());
                    Released::LeftAlone
                }
            })
        }
        Created::Dm { uuid } => Ok(match dm::remove_if(uuid, diskseq)? {
            dm::Removal::Removed => Released::TornDown,
            dm::Removal::Gone => Released::Gone,
            dm::Removal::Mismatch => Released::LeftAlone,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_records_round_trip() {
        for c in [
            Created::Loop,
            Created::Dm {
                uuid: "BLKHOTPLUG-00ff".into(),
            },
        ] {
            let rec = c.record().expect("record");
            assert_eq!(Created::parse(rec.as_bytes()).ok(), Some(c));
        }
        assert_eq!(Created::Nothing.record(), None);
        for bad in [&b""[..], b"loop ", b"dm", b"dm ", b"dm a b", b"lvm x"] {
            assert!(Created::parse(bad).is_err(), "{bad:?}");
        }
    }
}
