//! The one error type of blkhotplug's library: every bad input and every failed step, with a
//! message that says what to fix.
use std::path::PathBuf;
use std::time::Duration;

use rustix::io::Errno;
use xen::handoff::{HandoffError, ParseError};
use xen::xenstore::XsError;

/// What went wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A system call failed.
    #[error("{what}: {source}")]
    Sys {
        /// What was being done, with the object.
        what: String,
        /// The error.
        #[source]
        source: Errno,
    },
    /// `params` is not usable.
    #[error("bad params {params:?}: {why}")]
    BadParams {
        /// The value given.
        params: String,
        /// Why it is refused.
        why: &'static str,
    },
    /// `mode` is neither `r` nor `w`.
    #[error("bad mode {0:?}: expected \"r\" or \"w\"")]
    BadMode(String),
    /// A device-mapper name that is not allowed.
    #[error("bad device-mapper name {name:?}: {why}")]
    BadDmName {
        /// The name.
        name: String,
        /// Why it is refused.
        why: &'static str,
    },
    /// The path does not exist.
    #[error("{0}: no such file or device")]
    NotFound(PathBuf),
    /// The path is or passes through a symbolic link.
    #[error("{0}: is a symbolic link or passes through one (give the real path)")]
    Symlink(PathBuf),
    /// The path is neither a regular file nor a block device.
    #[error("{0}: neither a regular file nor a block device")]
    NotFileOrDevice(PathBuf),
    /// Writing was asked for a file or device that can only be read.
    #[error("{0}: cannot be opened for writing, but mode \"w\" was asked for")]
    ReadOnly(PathBuf),
    /// No loop device could be had.
    #[error("no free loop device: {0}")]
    LoopPoolFull(Errno),
    /// Other processes took every free loop device offered, over and over.
    #[error("gave up after {0} free loop devices were taken by other processes")]
    LoopContention(u32),
    /// The device opened is not the one expected.
    #[error("{path}: {why}")]
    WrongDevice {
        /// The device node.
        path: PathBuf,
        /// What does not match.
        why: String,
    },
    /// device-mapper refused or is missing.
    #[error("device-mapper {op}: {source}")]
    Dm {
        /// The operation.
        op: &'static str,
        /// The error.
        #[source]
        source: Errno,
    },
    /// A XenStore operation failed.
    #[error("XenStore {op} {path}: {source}")]
    XenStore {
        /// The operation.
        op: &'static str,
        /// The node.
        path: String,
        /// The error.
        #[source]
        source: XsError,
    },
    /// A node the toolstack must write is missing.
    #[error("{0} is missing")]
    MissingNode(String),
    /// A node holds something malformed.
    #[error("{node}: {source}")]
    BadNode {
        /// The node.
        node: String,
        /// What is wrong.
        #[source]
        source: ParseError,
    },
    /// A bounded wait ran out.
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, &'static str),
    /// The backend went away (state Closing or Closed, or its directory vanished).
    #[error("the backend went away while waiting for it to open the device")]
    BackendGone,
    /// The backend refused the handed-over device.
    #[error("the backend refused the device: {0}")]
    Rejected(Errno),
    /// The fd handoff failed.
    #[error("fd handoff: {0}")]
    Handoff(#[from] HandoffError),
    /// An NBD URI in `params` that is malformed, or whose server cannot be reached.
    #[error("NBD export {params:?}: {why}")]
    Nbd {
        /// The value given.
        params: String,
        /// What went wrong.
        why: String,
    },
    /// An NBD URI for a backend that cannot take a connected socket (only blkbackd's handoff
    /// socket can).
    #[error(
        "params is an NBD URI, but the backend has no handoff socket (only blkbackd serves NBD)"
    )]
    NbdNeedsHandoff,
}

impl Error {
    /// A failed system call on `what`.
    pub(crate) fn sys(what: impl Into<String>) -> impl FnOnce(Errno) -> Self {
        let what = what.into();
        move |source| Self::Sys { what, source }
    }

    /// A failed XenStore operation on `path`.
    pub(crate) fn xs(op: &'static str, path: &str) -> impl FnOnce(XsError) -> Self {
        let path = path.to_owned();
        move |source| Self::XenStore { op, path, source }
    }
}
