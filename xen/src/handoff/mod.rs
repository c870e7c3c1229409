//! What passes between blkhotplug and a block backend: XenStore node names and formats, and the
//! device fd over a unix socket.
//!
//! # XenStore nodes (all in the backend directory, `backend/vbd/<domid>/<devid>`)
//!
//! | node | written by | format |
//! |---|---|---|
//! | [`PARAMS`], [`MODE`] | toolstack | path of the file or device; `r` or `w` (+ `!` = shared) |
//! | [`OPENED`] | backend | `0` at probe (before InitWait): "I understand `diskseq@major:minor` and will say when I hold the device"; `1` once it holds a reference |
//! | [`HANDOFF_SOCKET`] | backend (blkbackd) | absolute path of a `SOCK_SEQPACKET` unix socket accepting the device fd (this module's message) |
//! | [`PHYSICAL_DEVICE`] | hotplug | `major:minor` (hex), or the series' `diskseq@major:minor` where [`OPENED`] exists |
//! | [`PHYSICAL_DEVICE_PATH`] | hotplug | the device node opened, e.g. `/dev/loop3` |
//! | [`DISKSEQ`] | hotplug | the opened device's diskseq, hex, no leading zero (Qubes not-script convention) |
//! | [`HOTPLUG_STATUS`], [`HOTPLUG_ERROR`] | hotplug | `connected`, or `busy` plus a message in `hotplug-error` |
//!
//! The three hotplug nodes describing the device are written in one XenStore transaction.
//!
//! # The fd handoff (version [`HANDOFF_VERSION`])
//!
//! The hotplug side connects to the [`HANDOFF_SOCKET`] path (a `SOCK_SEQPACKET` unix socket; the
//! listener must run as root or as the hotplug's own uid: [`connect`] checks `SO_PEERCRED`) and
//! sends one message of [`DEVICE_MESSAGE_LEN`] bytes with exactly one fd in `SCM_RIGHTS`:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `XBHO` |
//! | 4 | 2 | version, little endian (1) |
//! | 6 | 2 | flags, little endian: bit 0 = read-only (the fd is `O_RDONLY`); other bits must be 0 |
//! | 8 | 4 | major, little endian |
//! | 12 | 4 | minor, little endian |
//! | 16 | 8 | diskseq, little endian (0 = unknown) |
//!
//! Device `0:0` with diskseq 0 (major 0 is no block device's) says the fd is instead a stream
//! socket connected to the NBD server that [`PARAMS`] names; the backend negotiates the export
//! on it ([`DeviceInfo::nbd_socket`]).
//!
//! The backend answers with one [`REPLY_LEN`]-byte message: magic `XBHR`, then a little-endian
//! `u32`: 0 = accepted (the backend now holds the device), else an errno saying why it refused.
//! Once the message is sent the fd is in flight: if the backend dies before receiving it, the
//! kernel drops it with the socket, so nothing leaks on either side.
//!
//! # Modules
//! The node names and [`HandoffError`] are here; the rest is split by concern:
//! `physical_device` (the [`PHYSICAL_DEVICE`] and [`DISKSEQ`] values), `wire` (the two messages'
//! byte layout), `socket` (the [`HANDOFF_SOCKET`] path, listening and connecting), `transfer`
//! (sending and receiving the fd and the reply).

use rustix::io::Errno;

mod physical_device;
mod socket;
mod transfer;
mod wire;

pub use physical_device::{
    format_diskseq, parse_diskseq, ParseError, PhysicalDevice, MAX_MAJOR, MAX_MINOR,
};
pub use socket::{connect, listen, parse_socket_path};
pub use transfer::{recv_device, recv_held, recv_reply, send_device, send_held, send_reply};
pub use wire::{DeviceInfo, Reply, DEVICE_MESSAGE_LEN, HANDOFF_VERSION, REPLY_LEN};

/// Backend node: the device as `major:minor` or `diskseq@major:minor` (see [`PhysicalDevice`]).
pub const PHYSICAL_DEVICE: &str = "physical-device";
/// Backend node: the path of the device node the hotplug opened.
pub const PHYSICAL_DEVICE_PATH: &str = "physical-device-path";
/// Backend node: the opened device's diskseq in hex (see [`parse_diskseq`]).
pub const DISKSEQ: &str = "diskseq";
/// Backend node written by a backend that understands diskseq: `0`, then `1` once it holds the device.
pub const OPENED: &str = "opened";
/// Backend node: the hotplug's result, [`STATUS_CONNECTED`] or [`STATUS_BUSY`].
pub const HOTPLUG_STATUS: &str = "hotplug-status";
/// Backend node: why the hotplug failed, for people.
pub const HOTPLUG_ERROR: &str = "hotplug-error";
/// Backend node written by the toolstack: the file or device to serve.
pub const PARAMS: &str = "params";
/// Backend node written by the toolstack: `r` or `w`, optionally followed by `!`.
pub const MODE: &str = "mode";
/// Backend node written by blkbackd: the unix socket that accepts the device fd.
pub const HANDOFF_SOCKET: &str = "handoff-socket";

/// [`HOTPLUG_STATUS`] value: the device is ready.
pub const STATUS_CONNECTED: &str = "connected";
/// [`HOTPLUG_STATUS`] value written together with [`HOTPLUG_ERROR`] on failure.
pub const STATUS_BUSY: &str = "busy";
/// [`OPENED`] value once the backend holds the device.
pub const OPENED_YES: &str = "1";

/// Errors of the fd handoff.
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    /// A system call failed.
    #[error("{op}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The error.
        #[source]
        source: Errno,
    },
    /// The peer sent something that is not a handoff message.
    #[error("malformed handoff message: {0}")]
    BadMessage(&'static str),
    /// The peer speaks another version of the protocol.
    #[error("handoff protocol version {0} is not supported (this side speaks {HANDOFF_VERSION})")]
    Version(u16),
    /// The fd is not the device the message names, or its access mode does not match.
    #[error("handed-over fd does not match its description: {0}")]
    Mismatch(&'static str),
    /// The peer closed the connection.
    #[error("peer closed the connection")]
    Closed,
    /// The listener runs as another user.
    #[error("handoff socket is owned by uid {0}, not root or us")]
    UntrustedPeer(u32),
    /// The [`HANDOFF_SOCKET`] value is not usable.
    #[error("bad {HANDOFF_SOCKET} path: {0}")]
    BadSocketPath(&'static str),
}

pub(crate) fn io(op: &'static str) -> impl FnOnce(Errno) -> HandoffError {
    move |source| HandoffError::Io { op, source }
}
