//! Reconnecting a confined backend to xenstored, through a connector ([`crate::connector`]):
//! `blkbackd xenstore-connect PATH` opens xenstored's socket or `/dev/xen/xenbus` at PATH as
//! any XenStore client does (by path, [`xen::xenstore::Dial`] for a [`PathBuf`]) and passes
//! it over. Started as root, before the backend confines itself or switches user, it can
//! reach a root-only socket and reopen the device; the backend, which may do neither, gets
//! each new connection as its [`Dial`] ([`xen::xenstore::XenStore::open_reconnecting`]).

use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use rustix::io::Errno;
use xen::xenstore::{Dial, Transport};

use crate::connector::{self, ConnectorError, FdKind, DETAILS_LEN};

/// The backend's end: a [`Dial`] that asks the connector.
pub struct XenStoreConnector {
    path: PathBuf,
    transport: Transport,
    connector: connector::Connector,
}

impl XenStoreConnector {
    /// Starts `program xenstore-connect PATH`. Each connection it passes must be what `path`
    /// is now: a socket, or this very character device (the xenbus device).
    ///
    /// # Errors
    /// [`ConnectorError::Start`], also when `path` cannot be looked at.
    pub fn start(program: &Path, path: &Path) -> Result<Self, ConnectorError> {
        let meta = std::fs::metadata(path).map_err(|e| {
            ConnectorError::Start(std::io::Error::new(
                e.kind(),
                format!("{}: {e}", path.display()),
            ))
        })?;
        let (expect, transport) = if meta.file_type().is_char_device() {
            (FdKind::CharDevice(meta.rdev()), Transport::XenbusDevice)
        } else {
            (FdKind::Socket, Transport::Socket)
        };
        let args = [Path::new("xenstore-connect").as_os_str(), path.as_os_str()];
        Ok(Self {
            path: path.to_path_buf(),
            transport,
            connector: connector::Connector::start(program, args, expect)?,
        })
    }
}

impl std::fmt::Debug for XenStoreConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} through its connector", self.path.display())
    }
}

impl Dial for XenStoreConnector {
    fn dial(&self) -> std::io::Result<(OwnedFd, Transport)> {
        let (fd, _) = self.connector.request().map_err(std::io::Error::other)?;
        Ok((fd, self.transport))
    }
}

/// The connector's side (`blkbackd xenstore-connect PATH`): serves requests on `sock` (its
/// standard input) until the backend closes it.
///
/// # Errors
/// Talking to the backend failing.
pub fn run_connector(sock: BorrowedFd<'_>, path: &Path) -> Result<(), ConnectorError> {
    let path = path.to_path_buf();
    connector::serve_requests(sock, || {
        let (fd, _) = path.dial().map_err(|e| {
            let errno = e.raw_os_error().map_or(Errno::IO, Errno::from_raw_os_error);
            (errno, format!("{}: {e}", path.display()))
        })?;
        Ok((fd, [0; DETAILS_LEN]))
    })
}
