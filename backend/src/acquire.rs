//! Getting hold of the block device race-free (the RFC series' handshake).
//!
//! Three ways, chosen on the command line ([`DeviceSource`]):
//! - an fd inherited from whoever started the backend;
//! - an fd received over the handoff socket from blkhotplug (`xen::handoff`);
//! - opening it here: `physical-device` (`major:minor` or `diskseq@major:minor`, hex) names a
//!   block device, opened as `/dev/block/<major>:<minor>`; or, with `--open-params`, the
//!   toolstack's `params` path, which may be a regular file (served directly, with `O_DIRECT`
//!   where the file system allows it), or an NBD URI (`nbd://host[:port]/export`,
//!   `nbd+unix:///export?socket=PATH`): the connection and handshake are made here, before the
//!   process is confined, and the socket is what the backend keeps ([`open_nbd`]).
//!
//! Whatever the way, when XenStore names a diskseq (in `physical-device` or in the separate
//! `diskseq` node of the Qubes not-script) the device's `BLKGETDISKSEQ` must equal it: a
//! device number can be reused by another device between the hotplug script's check and our
//! open, and the diskseq is what tells them apart. A mismatch is refused.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use xen::handoff::{parse_diskseq, PhysicalDevice};

use crate::dev_error::{errno, DevError};
use crate::device::{Device, DeviceError, DeviceKind, DeviceOptions};

/// Where the device comes from.
#[derive(Debug)]
pub enum DeviceSource {
    /// An fd inherited from the parent (`--device-fd`).
    Fd(OwnedFd),
    /// A handoff socket to listen on for blkhotplug (`--handoff-socket`).
    Handoff(PathBuf),
    /// `physical-device`, opened here once the hotplug script wrote it (the default).
    PhysicalDevice,
    /// The toolstack's `params` path, opened here (`--open-params`).
    Params,
}

/// What the backend directory says about the device, as read from XenStore.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceNodes {
    /// `physical-device`, if written.
    pub physical_device: Option<String>,
    /// `diskseq`, if written.
    pub diskseq: Option<String>,
    /// `params`, if written.
    pub params: Option<String>,
    /// `mode`, if written.
    pub mode: Option<String>,
}

/// The device XenStore expects: a number and maybe a diskseq.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expected {
    /// From `physical-device` (its diskseq merged with the `diskseq` node's).
    pub device: PhysicalDevice,
}

impl DeviceNodes {
    /// Whether the device is to be read-only: `mode` without `w` (Linux:
    /// `!strchr(be->mode, 'w')`).
    ///
    /// # Errors
    /// Linux's "reading mode" when `mode` is missing.
    pub fn read_only(&self) -> Result<bool, DevError> {
        self.mode
            .as_deref()
            .map(|m| !m.contains('w'))
            .ok_or_else(|| DevError::new(errno::ENOENT, "reading mode"))
    }

    /// The expected device, or `None` while `physical-device` is not written yet.
    ///
    /// # Errors
    /// A malformed `physical-device` or `diskseq`, or the two naming different diskseqs.
    pub fn expected(&self) -> Result<Option<Expected>, DevError> {
        let Some(pd) = &self.physical_device else {
            return Ok(None);
        };
        let mut device = PhysicalDevice::parse(pd.as_bytes()).map_err(|e| {
            DevError::new(
                errno::EINVAL,
                format!("invalid physical-device {pd:?}: {e}"),
            )
        })?;
        if let Some(seq) = self.diskseq_node()? {
            match device.diskseq {
                Some(d) if d != seq => {
                    return Err(DevError::new(
                        errno::EINVAL,
                        format!(
                            "physical-device diskseq 0x{d:x} differs from diskseq node 0x{seq:x}"
                        ),
                    ))
                }
                _ => device.diskseq = Some(seq),
            }
        }
        Ok(Some(Expected { device }))
    }

    /// The separate `diskseq` node, parsed.
    ///
    /// # Errors
    /// A malformed value.
    pub fn diskseq_node(&self) -> Result<Option<u64>, DevError> {
        self.diskseq
            .as_deref()
            .map(|s| {
                parse_diskseq(s.as_bytes()).map_err(|e| {
                    DevError::new(errno::EINVAL, format!("invalid diskseq {s:?}: {e}"))
                })
            })
            .transpose()
    }
}

/// Checks an open device against what XenStore expects: the same device number (for block
/// devices) and, when a diskseq is named, the same diskseq.
///
/// # Errors
/// `ENODEV` "creating vbd structure: ..." (the RFC series' refusal) saying what differs.
pub fn check_device(
    device: &Device,
    expected: Option<&Expected>,
    explicit_diskseq: Option<u64>,
) -> Result<(), DevError> {
    let mismatch =
        |what: String| DevError::new(errno::ENODEV, format!("creating vbd structure: {what}"));
    let want_seq = expected.and_then(|e| e.device.diskseq).or(explicit_diskseq);
    if let (Some(e), DeviceKind::Block { major, minor }) = (expected, device.kind()) {
        if (e.device.major, e.device.minor) != (major, minor) {
            return Err(mismatch(format!(
                "device is {major:x}:{minor:x}, physical-device names {:x}:{:x}",
                e.device.major, e.device.minor
            )));
        }
    }
    if let Some(want) = want_seq {
        match (device.kind(), device.diskseq()) {
            (DeviceKind::File, _) => {
                return Err(mismatch(format!(
                    "a diskseq (0x{want:x}) is named but the device is a regular file"
                )))
            }
            (DeviceKind::Nbd, _) => {
                return Err(mismatch(format!(
                    "a diskseq (0x{want:x}) is named but the device is an NBD export"
                )))
            }
            (DeviceKind::Block { major, minor }, got) if got != Some(want) => {
                return Err(mismatch(format!(
                    "device {major:x}:{minor:x} has diskseq {}, expected 0x{want:x}",
                    got.map_or_else(|| "unknown".to_owned(), |g| format!("0x{g:x}"))
                )))
            }
            _ => {}
        }
    }
    Ok(())
}

/// Opens the block device XenStore names, race-free: `/dev/block/<major>:<minor>` (or, where
/// udev made no such link, the node sysfs names for the number), then the number and diskseq
/// of what was opened are checked, so whatever path led there, only the named device with the
/// named diskseq is accepted.
///
/// # Errors
/// `ENOENT` when it cannot be opened, `ENODEV` on a mismatch.
pub fn open_physical(expected: &Expected, options: &DeviceOptions) -> Result<Device, DevError> {
    let (major, minor) = (expected.device.major, expected.device.minor);
    let link = PathBuf::from(format!("/dev/block/{major}:{minor}"));
    let path = if link.exists() {
        link
    } else {
        sysfs_devnode(major, minor).unwrap_or(link)
    };
    let device = Device::open(&path, options)
        .map_err(|e| DevError::new(errno::ENOENT, format!("creating vbd structure: {e}")))?;
    check_device(&device, Some(expected), None)?;
    Ok(device)
}

/// `/dev/<DEVNAME>` from `/sys/dev/block/<major>:<minor>/uevent`.
fn sysfs_devnode(major: u32, minor: u32) -> Option<PathBuf> {
    let uevent = std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/uevent")).ok()?;
    let name = uevent.lines().find_map(|l| l.strip_prefix("DEVNAME="))?;
    // DEVNAME is relative to /dev and never climbs out of it.
    (!name.is_empty() && !name.split('/').any(|c| c == ".." || c.is_empty()))
        .then(|| Path::new("/dev").join(name))
}

/// How long connecting to an NBD server and its handshake may take.
pub const NBD_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Whether `params` names an NBD export (an `nbd:`, `nbd+unix:` or other `nbd+` URI) rather
/// than a path.
pub fn is_nbd_params(params: &str) -> bool {
    params.starts_with("nbd:") || params.starts_with("nbd+")
}

/// Connects to the NBD export `params` names and negotiates it ([`nbd::Client`]), within
/// [`NBD_CONNECT_TIMEOUT`]; a read-only export is accepted only for a read-only vbd.
///
/// # Errors
/// `EINVAL` for a malformed URI (TLS included, which is not supported), `ENOENT` when the
/// server cannot be reached or the handshake fails, `EROFS` for a read-only export behind a
/// writable vbd, `ENODEV` for an export this backend cannot serve.
pub fn open_nbd(params: &str, options: &DeviceOptions) -> Result<Device, DevError> {
    let uri: nbd::Uri = params
        .parse()
        .map_err(|e| DevError::new(errno::EINVAL, format!("reading params: {e}")))?;
    let client = nbd::Client::connect_timeout(&uri, NBD_CONNECT_TIMEOUT)
        .map_err(|e| DevError::new(errno::ENOENT, format!("creating vbd structure: {e}")))?;
    nbd_device(client, options)
}

/// Negotiates the NBD export `params` names on `socket`, a connection to its server that
/// blkhotplug made and handed over ([`DeviceSource::Handoff`]); as [`open_nbd`] otherwise.
///
/// # Errors
/// `EINVAL` when `params` is not an NBD URI or is malformed, `ENOENT` when the handshake
/// fails; as [`open_nbd`].
pub fn negotiate_nbd(
    socket: OwnedFd,
    params: Option<&str>,
    options: &DeviceOptions,
) -> Result<Device, DevError> {
    let params = params.filter(|p| is_nbd_params(p)).ok_or_else(|| {
        DevError::new(
            errno::EINVAL,
            "creating vbd structure: a socket was handed over, but params is not an NBD URI",
        )
    })?;
    let uri: nbd::Uri = params
        .parse()
        .map_err(|e| DevError::new(errno::EINVAL, format!("reading params: {e}")))?;
    let stream = match uri.transport() {
        nbd::Transport::Tcp { .. } => nbd::Stream::Tcp(std::net::TcpStream::from(socket)),
        nbd::Transport::Unix(_) => nbd::Stream::Unix(std::os::unix::net::UnixStream::from(socket)),
    };
    let client = nbd::Client::handshake(stream, uri.export(), NBD_CONNECT_TIMEOUT)
        .map_err(|e| DevError::new(errno::ENOENT, format!("creating vbd structure: {e}")))?;
    nbd_device(client, options)
}

fn nbd_device(client: nbd::Client, options: &DeviceOptions) -> Result<Device, DevError> {
    let (stream, export) = client.into_parts();
    Device::nbd(stream, export, options).map_err(|e| match e {
        DeviceError::ReadOnly => DevError::new(
            errno::EROFS,
            "creating vbd structure: the NBD export is read-only but mode is w",
        ),
        e => DevError::new(errno::ENODEV, format!("creating vbd structure: {e}")),
    })
}

/// Opens the toolstack's `params`: a regular file is served directly; a block device is
/// checked against `physical-device`/`diskseq` when they are written; an NBD URI is connected
/// to ([`open_nbd`]; no device number or diskseq can name it).
///
/// # Errors
/// `ENOENT` when `params` is missing or cannot be opened, `ENODEV` on a mismatch; for NBD, as
/// [`open_nbd`].
pub fn open_params(nodes: &DeviceNodes, options: &DeviceOptions) -> Result<Device, DevError> {
    if let Some(uri) = nodes.params.as_deref().filter(|p| is_nbd_params(p)) {
        if nodes.physical_device.is_some() || nodes.diskseq.is_some() {
            return Err(DevError::new(
                errno::ENODEV,
                "creating vbd structure: params is an NBD URI, but physical-device or diskseq names a block device",
            ));
        }
        return open_nbd(uri, options);
    }
    let params = nodes
        .params
        .as_deref()
        .ok_or(xen::abspath::BadPath::Empty)
        .and_then(|p| xen::abspath::parse(p.as_bytes(), xen::abspath::PATH_MAX))
        .map_err(|e| DevError::new(errno::ENOENT, format!("reading params: {e}")))?;
    let device = Device::open(&params, options)
        .map_err(|e| DevError::new(errno::ENOENT, format!("creating vbd structure: {e}")))?;
    let expected = nodes.expected()?;
    check_device(&device, expected.as_ref(), None)?;
    Ok(device)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(pd: Option<&str>, seq: Option<&str>) -> DeviceNodes {
        DeviceNodes {
            physical_device: pd.map(str::to_owned),
            diskseq: seq.map(str::to_owned),
            params: None,
            mode: Some("w".into()),
        }
    }

    #[test]
    fn merges_diskseq_sources() {
        assert_eq!(nodes(None, Some("5")).expected().unwrap(), None);
        let e = nodes(Some("7:0"), Some("1f")).expected().unwrap().unwrap();
        assert_eq!(
            e.device,
            PhysicalDevice {
                major: 7,
                minor: 0,
                diskseq: Some(0x1f)
            }
        );
        let e = nodes(Some("1f@7:0"), None).expected().unwrap().unwrap();
        assert_eq!(e.device.diskseq, Some(0x1f));
        assert!(nodes(Some("1f@7:0"), Some("1f")).expected().is_ok());
        let err = nodes(Some("1e@7:0"), Some("1f")).expected().unwrap_err();
        assert!(err.message.contains("differs"), "{err}");
    }

    #[test]
    fn malformed_nodes_are_refused() {
        for bad in ["", "7", "0@7:0", "07@7:0", "x:0", "7:0 ", "7:0\n"] {
            assert!(nodes(Some(bad), None).expected().is_err(), "{bad:?}");
        }
        assert!(nodes(Some("7:0"), Some("0")).expected().is_err());
    }

    #[test]
    fn mode_decides_read_only() {
        assert!(!nodes(None, None).read_only().unwrap());
        let mut n = nodes(None, None);
        n.mode = Some("r".into());
        assert!(n.read_only().unwrap());
        n.mode = None;
        assert_eq!(n.read_only().unwrap_err().node_value(), "2 reading mode");
    }

    #[test]
    fn a_file_never_matches_a_diskseq() {
        let dir = std::env::temp_dir().join(format!("acquire-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let img = dir.join("disk.img");
        std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
        let mut n = nodes(None, None);
        n.params = Some(img.to_str().unwrap().to_owned());
        let dev = open_params(&n, &DeviceOptions::default()).unwrap();
        assert_eq!(dev.sectors(), 2048);
        n.diskseq = Some("3".into());
        n.physical_device = Some("7:0".into());
        let err = open_params(&n, &DeviceOptions::default()).unwrap_err();
        assert_eq!(err.errno, errno::ENODEV);
        n.params = Some("relative.img".into());
        assert_eq!(
            open_params(&n, &DeviceOptions::default())
                .unwrap_err()
                .errno,
            errno::ENOENT
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
