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
//! The backend answers with one [`REPLY_LEN`]-byte message: magic `XBHR`, then a little-endian
//! `u32`: 0 = accepted (the backend now holds the device), else an errno saying why it refused.
//! Once the message is sent the fd is in flight: if the backend dies before receiving it, the
//! kernel drops it with the socket, so nothing leaks on either side.
use std::fmt;
use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use rustix::fs::{FileType, OFlags};
use rustix::io::Errno;
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};

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

/// The version of the fd handoff message this module speaks.
pub const HANDOFF_VERSION: u16 = 1;
/// Length of the device message.
pub const DEVICE_MESSAGE_LEN: usize = 24;
/// Length of the reply message.
pub const REPLY_LEN: usize = 8;
const DEVICE_MAGIC: [u8; 4] = *b"XBHO";
const REPLY_MAGIC: [u8; 4] = *b"XBHR";
const FLAG_READ_ONLY: u16 = 1;

/// Largest major number a Linux `dev_t` can hold inside the kernel (12 bits).
pub const MAX_MAJOR: u32 = 0xfff;
/// Largest minor number a Linux `dev_t` can hold inside the kernel (20 bits).
pub const MAX_MINOR: u32 = 0xf_ffff;
/// Longest diskseq in hex (the series' `%16llx`).
const MAX_DISKSEQ_DIGITS: usize = 16;
/// Longest major or minor in hex (the series' `%8x`).
const MAX_NUMBER_DIGITS: usize = 8;
/// Longest unix socket path (`sun_path` less its NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Why a `physical-device` or `diskseq` value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The value is empty.
    #[error("empty value")]
    Empty,
    /// No `:` between major and minor.
    #[error("no ':' between major and minor")]
    MissingColon,
    /// A field is empty or holds something other than hex digits.
    #[error("{field} is not a hex number")]
    NotHex {
        /// Which field.
        field: &'static str,
    },
    /// A field has more digits than its format allows.
    #[error("{field} has more than {max} hex digits")]
    TooLong {
        /// Which field.
        field: &'static str,
        /// The limit.
        max: usize,
    },
    /// A leading zero where the format has exactly one spelling per number (diskseq, and
    /// major/minor in the `diskseq@` form).
    #[error("{field} has a leading zero")]
    LeadingZero {
        /// Which field.
        field: &'static str,
    },
    /// Diskseq 0 is never a device's sequence number.
    #[error("diskseq 0 is invalid")]
    ZeroDiskseq,
    /// A major or minor number a Linux `dev_t` cannot hold.
    #[error("{field} {value:#x} is out of range")]
    OutOfRange {
        /// Which field.
        field: &'static str,
        /// The value.
        value: u32,
    },
}

/// The device a backend serves, as the `physical-device` node names it.
///
/// Two forms: `major:minor` (Linux blkback's `"%x:%x"`) and the RFC series'
/// `diskseq@major:minor`, which makes a backend refuse the device unless its diskseq matches, so
/// that a device number reused by another device is never served by mistake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PhysicalDevice {
    /// Major device number (at most [`MAX_MAJOR`]).
    pub major: u32,
    /// Minor device number (at most [`MAX_MINOR`]).
    pub minor: u32,
    /// The disk sequence number; `None` when not known. `Some(0)` is never parsed; it is
    /// formatted as `None` (in the series 0 means "no check").
    pub diskseq: Option<u64>,
}

impl PhysicalDevice {
    /// Parses a `physical-device` value strictly: hex digits only, no sign, no `0x`, no white
    /// space, nothing after the minor; major and minor at most 8 digits each and within a Linux
    /// `dev_t`. The plain form takes either case and leading zeros (as `sscanf("%x:%x")` does);
    /// the `diskseq@` form is canonical, as the series' blkback requires
    /// (kernel-patches/README.md): lower-case, no leading zeros (`0` alone is fine for major and
    /// minor), diskseq 1 to 16 digits and not 0.
    ///
    /// # Errors
    /// [`ParseError`] saying what is wrong.
    pub fn parse(value: &[u8]) -> Result<Self, ParseError> {
        if value.is_empty() {
            return Err(ParseError::Empty);
        }
        let (diskseq, rest) = match value.iter().position(|&b| b == b'@') {
            Some(at) => (Some(parse_diskseq(&value[..at])?), &value[at + 1..]),
            None => (None, value),
        };
        let canonical = diskseq.is_some();
        let colon = rest
            .iter()
            .position(|&b| b == b':')
            .ok_or(ParseError::MissingColon)?;
        let major = parse_number(&rest[..colon], "major", canonical)?;
        let minor = parse_number(&rest[colon + 1..], "minor", canonical)?;
        if major > MAX_MAJOR {
            return Err(ParseError::OutOfRange {
                field: "major",
                value: major,
            });
        }
        if minor > MAX_MINOR {
            return Err(ParseError::OutOfRange {
                field: "minor",
                value: minor,
            });
        }
        Ok(Self {
            major,
            minor,
            diskseq,
        })
    }
}

impl FromStr for PhysicalDevice {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, ParseError> {
        Self::parse(s.as_bytes())
    }
}

impl fmt::Display for PhysicalDevice {
    /// `major:minor` or `diskseq@major:minor`, lower-case hex, no leading zeros.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.diskseq {
            Some(seq) if seq != 0 => write!(f, "{seq:x}@{:x}:{:x}", self.major, self.minor),
            _ => write!(f, "{:x}:{:x}", self.major, self.minor),
        }
    }
}

/// Parses a diskseq: the `diskseq` node's value and the part before `@` in `physical-device`.
/// Lower-case hex, 1 to 16 digits, no leading zero, not 0.
///
/// # Errors
/// [`ParseError`] saying what is wrong.
pub fn parse_diskseq(value: &[u8]) -> Result<u64, ParseError> {
    if value.is_empty() {
        return Err(ParseError::NotHex { field: "diskseq" });
    }
    if value.len() > MAX_DISKSEQ_DIGITS {
        return Err(ParseError::TooLong {
            field: "diskseq",
            max: MAX_DISKSEQ_DIGITS,
        });
    }
    if value.first() == Some(&b'0') {
        return Err(if value.len() == 1 {
            ParseError::ZeroDiskseq
        } else {
            ParseError::LeadingZero { field: "diskseq" }
        });
    }
    let mut seq = 0u64;
    for &b in value {
        // 16 digits at most, so the shifts cannot overflow.
        seq = (seq << 4)
            | u64::from(hex_digit(b, false).ok_or(ParseError::NotHex { field: "diskseq" })?);
    }
    Ok(seq)
}

/// Formats a diskseq for the [`DISKSEQ`] node: lower-case hex, no leading zero.
#[must_use]
pub fn format_diskseq(seq: u64) -> String {
    format!("{seq:x}")
}

/// A major or minor number; `canonical`: lower-case only, no leading zero.
fn parse_number(value: &[u8], field: &'static str, canonical: bool) -> Result<u32, ParseError> {
    if value.is_empty() {
        return Err(ParseError::NotHex { field });
    }
    if canonical && value.len() > 1 && value[0] == b'0' {
        return Err(ParseError::LeadingZero { field });
    }
    if value.len() > MAX_NUMBER_DIGITS {
        return Err(ParseError::TooLong {
            field,
            max: MAX_NUMBER_DIGITS,
        });
    }
    let mut n = 0u32;
    for &b in value {
        // 8 digits at most, so the shifts cannot overflow.
        n = (n << 4) | u32::from(hex_digit(b, !canonical).ok_or(ParseError::NotHex { field })?);
    }
    Ok(n)
}

fn hex_digit(b: u8, upper_case_ok: bool) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' if upper_case_ok => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Validates the [`HANDOFF_SOCKET`] value: an absolute path, no NUL, no `.`/`..` components, short
/// enough for `sun_path`.
///
/// # Errors
/// [`HandoffError::BadSocketPath`].
pub fn parse_socket_path(value: &[u8]) -> Result<PathBuf, HandoffError> {
    use std::os::unix::ffi::OsStrExt;
    let bad = |why: &'static str| HandoffError::BadSocketPath(why);
    if value.first() != Some(&b'/') {
        return Err(bad("not an absolute path"));
    }
    if value.len() > MAX_SOCKET_PATH {
        return Err(bad("longer than a unix socket path may be"));
    }
    if value.contains(&0) {
        return Err(bad("contains NUL"));
    }
    if value.split(|&b| b == b'/').any(|c| c == b"." || c == b"..") {
        return Err(bad("contains a '.' or '..' component"));
    }
    Ok(Path::new(std::ffi::OsStr::from_bytes(value)).to_path_buf())
}

/// What the hotplug side says about the fd it hands over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceInfo {
    /// The device; `diskseq` `None` is sent as 0.
    pub device: PhysicalDevice,
    /// The fd is read-only (`O_RDONLY`); otherwise it is `O_RDWR`.
    pub read_only: bool,
}

impl DeviceInfo {
    /// The version-1 wire form.
    #[must_use]
    pub fn encode(&self) -> [u8; DEVICE_MESSAGE_LEN] {
        let mut m = [0u8; DEVICE_MESSAGE_LEN];
        m[0..4].copy_from_slice(&DEVICE_MAGIC);
        m[4..6].copy_from_slice(&HANDOFF_VERSION.to_le_bytes());
        let flags = if self.read_only { FLAG_READ_ONLY } else { 0 };
        m[6..8].copy_from_slice(&flags.to_le_bytes());
        m[8..12].copy_from_slice(&self.device.major.to_le_bytes());
        m[12..16].copy_from_slice(&self.device.minor.to_le_bytes());
        m[16..24].copy_from_slice(&self.device.diskseq.unwrap_or(0).to_le_bytes());
        m
    }

    /// Parses the wire form, refusing anything but a well-formed version-1 message.
    ///
    /// # Errors
    /// [`HandoffError::BadMessage`] or [`HandoffError::Version`].
    pub fn decode(m: &[u8]) -> Result<Self, HandoffError> {
        let m: &[u8; DEVICE_MESSAGE_LEN] = m
            .try_into()
            .map_err(|_| HandoffError::BadMessage("wrong length"))?;
        if m[0..4] != DEVICE_MAGIC {
            return Err(HandoffError::BadMessage("bad magic"));
        }
        let version = u16::from_le_bytes([m[4], m[5]]);
        if version != HANDOFF_VERSION {
            return Err(HandoffError::Version(version));
        }
        let flags = u16::from_le_bytes([m[6], m[7]]);
        if flags & !FLAG_READ_ONLY != 0 {
            return Err(HandoffError::BadMessage("unknown flags"));
        }
        let major = u32::from_le_bytes([m[8], m[9], m[10], m[11]]);
        let minor = u32::from_le_bytes([m[12], m[13], m[14], m[15]]);
        if major > MAX_MAJOR || minor > MAX_MINOR {
            return Err(HandoffError::BadMessage("device number out of range"));
        }
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&m[16..24]);
        let seq = u64::from_le_bytes(seq);
        Ok(Self {
            device: PhysicalDevice {
                major,
                minor,
                diskseq: (seq != 0).then_some(seq),
            },
            read_only: flags & FLAG_READ_ONLY != 0,
        })
    }
}

/// The backend's answer to a device message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// The backend holds the device now.
    Accepted,
    /// The backend refused the device, with an errno saying why.
    Rejected(Errno),
}

impl Reply {
    /// The wire form.
    #[must_use]
    pub fn encode(self) -> [u8; REPLY_LEN] {
        let code: u32 = match self {
            Self::Accepted => 0,
            // A refusal must never read as acceptance.
            Self::Rejected(e) => u32::try_from(e.raw_os_error())
                .ok()
                .filter(|&c| c != 0)
                .unwrap_or(5),
        };
        let mut m = [0u8; REPLY_LEN];
        m[0..4].copy_from_slice(&REPLY_MAGIC);
        m[4..8].copy_from_slice(&code.to_le_bytes());
        m
    }

    /// Parses the wire form.
    ///
    /// # Errors
    /// [`HandoffError::BadMessage`].
    pub fn decode(m: &[u8]) -> Result<Self, HandoffError> {
        let m: &[u8; REPLY_LEN] = m
            .try_into()
            .map_err(|_| HandoffError::BadMessage("wrong reply length"))?;
        if m[0..4] != REPLY_MAGIC {
            return Err(HandoffError::BadMessage("bad reply magic"));
        }
        let code = u32::from_le_bytes([m[4], m[5], m[6], m[7]]);
        if code == 0 {
            return Ok(Self::Accepted);
        }
        let code =
            i32::try_from(code).map_err(|_| HandoffError::BadMessage("reply code out of range"))?;
        Ok(Self::Rejected(Errno::from_raw_os_error(code)))
    }
}

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

fn io(op: &'static str) -> impl FnOnce(Errno) -> HandoffError {
    move |source| HandoffError::Io { op, source }
}

/// Creates the backend's end of the handoff: a `SOCK_SEQPACKET` unix socket (close-on-exec,
/// blocking) listening at `path`, mode 0600 so that only root and our uid can connect. A stale
/// socket left at `path` is replaced. `backlog` bounds the connections waiting for `accept`.
///
/// # Errors
/// [`HandoffError::Io`] naming the step that failed.
pub fn listen(path: &Path, backlog: i32) -> Result<OwnedFd, HandoffError> {
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
    let sock = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )
    .map_err(io("socket"))?;
    match rustix::fs::unlink(path) {
        Ok(()) | Err(Errno::NOENT) => {}
        Err(e) => return Err(io("removing a stale socket")(e)),
    }
    let addr = SocketAddrUnix::new(path).map_err(io("socket address"))?;
    rustix::net::bind(&sock, &addr).map_err(io("bind"))?;
    rustix::fs::chmod(path, rustix::fs::Mode::from_raw_mode(0o600)).map_err(io("chmod"))?;
    rustix::net::listen(&sock, backlog).map_err(io("listen"))?;
    Ok(sock)
}

/// Connects to a handoff socket (`SOCK_SEQPACKET`, close-on-exec) and checks that the listener
/// runs as root or as this process's uid. `timeout` bounds the connect (a full backlog blocks
/// it), the send and the wait for the reply (`SO_SNDTIMEO`, `SO_RCVTIMEO`; expiry shows as
/// `EAGAIN`).
///
/// # Errors
/// [`HandoffError::Io`] or [`HandoffError::UntrustedPeer`].
pub fn connect(path: &Path, timeout: Duration) -> Result<OwnedFd, HandoffError> {
    use rustix::net::sockopt::Timeout;
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
    let sock = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )
    .map_err(io("socket"))?;
    let timeout = Some(timeout.max(Duration::from_millis(1)));
    rustix::net::sockopt::set_socket_timeout(&sock, Timeout::Send, timeout)
        .map_err(io("SO_SNDTIMEO"))?;
    rustix::net::sockopt::set_socket_timeout(&sock, Timeout::Recv, timeout)
        .map_err(io("SO_RCVTIMEO"))?;
    let addr = SocketAddrUnix::new(path).map_err(io("socket address"))?;
    rustix::net::connect(&sock, &addr).map_err(io("connect"))?;
    let cred = rustix::net::sockopt::socket_peercred(&sock).map_err(io("SO_PEERCRED"))?;
    let peer = cred.uid.as_raw();
    if peer != 0 && peer != rustix::process::geteuid().as_raw() {
        return Err(HandoffError::UntrustedPeer(peer));
    }
    Ok(sock)
}

/// Sends the device fd and its description (one message, one fd).
///
/// # Errors
/// [`HandoffError::Io`] when `sendmsg` fails or sends a short message.
pub fn send_device(
    sock: impl AsFd,
    fd: BorrowedFd<'_>,
    info: &DeviceInfo,
) -> Result<(), HandoffError> {
    let msg = info.encode();
    let fds = [fd];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err(HandoffError::Io {
            op: "SCM_RIGHTS",
            source: Errno::NOBUFS,
        });
    }
    let sent = rustix::net::sendmsg(
        sock,
        &[IoSlice::new(&msg)],
        &mut control,
        SendFlags::NOSIGNAL,
    )
    .map_err(io("sendmsg"))?;
    if sent != msg.len() {
        return Err(HandoffError::Io {
            op: "sendmsg (short)",
            source: Errno::MSGSIZE,
        });
    }
    Ok(())
}

/// Receives a device fd and its description, and checks that they agree: the fd is a block
/// device whose number is the one named, opened read-only exactly when the message says so.
/// Extra fds, truncated messages and anything malformed are refused (received fds are closed).
///
/// # Errors
/// [`HandoffError`] saying what is wrong; [`HandoffError::Closed`] when the peer hung up.
pub fn recv_device(sock: impl AsFd) -> Result<(OwnedFd, DeviceInfo), HandoffError> {
    // One byte more than a message, so that a longer message shows as too long.
    let mut buf = [0u8; DEVICE_MESSAGE_LEN + 1];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = rustix::net::recvmsg(
        &sock,
        &mut [IoSliceMut::new(&mut buf)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )
    .map_err(io("recvmsg"))?;
    // Take every fd that arrived before judging the message, so that all of them are closed on error.
    let mut fds: Vec<OwnedFd> = Vec::new();
    for msg in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = msg {
            fds.extend(received);
        }
    }
    if got.bytes == 0 && fds.is_empty() {
        return Err(HandoffError::Closed);
    }
    if got
        .flags
        .intersects(ReturnFlags::TRUNC | ReturnFlags::CTRUNC)
    {
        return Err(HandoffError::BadMessage(
            "truncated message or ancillary data",
        ));
    }
    let info = DeviceInfo::decode(buf.get(..got.bytes).unwrap_or(&buf))?;
    let mut fds = fds.into_iter();
    let (Some(fd), None) = (fds.next(), fds.next()) else {
        return Err(HandoffError::BadMessage("not exactly one fd"));
    };
    check_fd_matches(fd.as_fd(), &info)?;
    Ok((fd, info))
}

/// Checks that `fd` is the block device `info` names, with the access mode it claims.
fn check_fd_matches(fd: BorrowedFd<'_>, info: &DeviceInfo) -> Result<(), HandoffError> {
    let st = rustix::fs::fstat(fd).map_err(io("fstat"))?;
    if FileType::from_raw_mode(st.st_mode) != FileType::BlockDevice {
        return Err(HandoffError::Mismatch("not a block device"));
    }
    let rdev = st.st_rdev;
    if rustix::fs::major(rdev) != info.device.major || rustix::fs::minor(rdev) != info.device.minor
    {
        return Err(HandoffError::Mismatch("device number differs"));
    }
    let mode = rustix::fs::fcntl_getfl(fd).map_err(io("F_GETFL"))? & OFlags::RWMODE;
    let expected = if info.read_only {
        OFlags::RDONLY
    } else {
        OFlags::RDWR
    };
    if mode != expected {
        return Err(HandoffError::Mismatch(
            "access mode differs from the read-only flag",
        ));
    }
    Ok(())
}

/// Sends the backend's answer.
///
/// # Errors
/// [`HandoffError::Io`].
pub fn send_reply(sock: impl AsFd, reply: Reply) -> Result<(), HandoffError> {
    let sent = rustix::net::send(sock, &reply.encode(), SendFlags::NOSIGNAL).map_err(io("send"))?;
    if sent != REPLY_LEN {
        return Err(HandoffError::Io {
            op: "send (short)",
            source: Errno::MSGSIZE,
        });
    }
    Ok(())
}

/// Receives the backend's answer. The wait is bounded by `SO_RCVTIMEO` ([`connect`] sets it;
/// `EAGAIN` then comes back as [`HandoffError::Io`]).
///
/// # Errors
/// [`HandoffError`]; [`HandoffError::Closed`] when the backend hung up without answering.
pub fn recv_reply(sock: impl AsFd) -> Result<Reply, HandoffError> {
    let mut buf = [0u8; REPLY_LEN + 1];
    let (n, _) = rustix::net::recv(sock, &mut buf, RecvFlags::empty()).map_err(io("recv"))?;
    if n == 0 {
        return Err(HandoffError::Closed);
    }
    Reply::decode(buf.get(..n).unwrap_or(&buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pd(major: u32, minor: u32, diskseq: Option<u64>) -> PhysicalDevice {
        PhysicalDevice {
            major,
            minor,
            diskseq,
        }
    }

    #[test]
    fn parses_plain_form() {
        assert_eq!(PhysicalDevice::parse(b"7:3"), Ok(pd(7, 3, None)));
        assert_eq!(PhysicalDevice::parse(b"fd:1a"), Ok(pd(0xfd, 0x1a, None)));
        assert_eq!(PhysicalDevice::parse(b"FD:1A"), Ok(pd(0xfd, 0x1a, None)));
        // sscanf("%x") accepts leading zeros, so do we (within 8 digits).
        assert_eq!(
            PhysicalDevice::parse(b"00000008:00000010"),
            Ok(pd(8, 0x10, None))
        );
        assert_eq!(
            PhysicalDevice::parse(b"fff:fffff"),
            Ok(pd(MAX_MAJOR, MAX_MINOR, None))
        );
        assert_eq!(PhysicalDevice::parse(b"0:0"), Ok(pd(0, 0, None)));
    }

    #[test]
    fn parses_diskseq_form() {
        assert_eq!(PhysicalDevice::parse(b"1f@7:3"), Ok(pd(7, 3, Some(0x1f))));
        assert_eq!(
            PhysicalDevice::parse(b"ffffffffffffffff@103:0"),
            Ok(pd(0x103, 0, Some(u64::MAX)))
        );
        assert_eq!("ab@8:0".parse(), Ok(pd(8, 0, Some(0xab))));
        assert_eq!("1@0:0".parse(), Ok(pd(0, 0, Some(1))));
    }

    #[test]
    fn refuses_what_sscanf_would_accept() {
        use ParseError::*;
        let cases: &[(&[u8], ParseError)] = &[
            (b"", Empty),
            (b"7", MissingColon),
            (b":3", NotHex { field: "major" }),
            (b"7:", NotHex { field: "minor" }),
            (b" 7:3", NotHex { field: "major" }),
            (b"7: 3", NotHex { field: "minor" }),
            (b"7:3 ", NotHex { field: "minor" }),
            (b"7:3\n", NotHex { field: "minor" }),
            (b"7:3\0", NotHex { field: "minor" }),
            (b"+7:3", NotHex { field: "major" }),
            (b"-7:3", NotHex { field: "major" }),
            (b"0x7:3", NotHex { field: "major" }),
            (b"7:3:1", NotHex { field: "minor" }),
            (b"7:3x", NotHex { field: "minor" }),
            (b"g:3", NotHex { field: "major" }),
            (
                b"000000007:3",
                TooLong {
                    field: "major",
                    max: 8,
                },
            ),
            (
                b"7:000000003",
                TooLong {
                    field: "minor",
                    max: 8,
                },
            ),
            (
                b"1000:0",
                OutOfRange {
                    field: "major",
                    value: 0x1000,
                },
            ),
            (
                b"7:100000",
                OutOfRange {
                    field: "minor",
                    value: 0x10_0000,
                },
            ),
            (
                b"ffffffff:0",
                OutOfRange {
                    field: "major",
                    value: u32::MAX,
                },
            ),
        ];
        for (input, want) in cases {
            assert_eq!(
                PhysicalDevice::parse(input).as_ref(),
                Err(want),
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn refuses_bad_diskseq_forms() {
        use ParseError::*;
        let cases: &[(&[u8], ParseError)] = &[
            (b"@7:3", NotHex { field: "diskseq" }),
            (b"0@7:3", ZeroDiskseq),
            (b"01@7:3", LeadingZero { field: "diskseq" }),
            (b"00@7:3", LeadingZero { field: "diskseq" }),
            (
                b"10000000000000000@7:3",
                TooLong {
                    field: "diskseq",
                    max: 16,
                },
            ),
            (b"1@@7:3", NotHex { field: "major" }),
            (b"1@2@7:3", NotHex { field: "major" }),
            (b"x@7:3", NotHex { field: "diskseq" }),
            (b"-1@7:3", NotHex { field: "diskseq" }),
            (b"1 @7:3", NotHex { field: "diskseq" }),
            (b"1@7", MissingColon),
            (
                b"1@1000:3",
                OutOfRange {
                    field: "major",
                    value: 0x1000,
                },
            ),
            // The diskseq@ form is canonical, as the series' blkback wants it.
            (b"Ab@8:0", NotHex { field: "diskseq" }),
            (b"1@FD:0", NotHex { field: "major" }),
            (b"1@fd:1A", NotHex { field: "minor" }),
            (b"1@08:0", LeadingZero { field: "major" }),
            (b"1@8:00", LeadingZero { field: "minor" }),
        ];
        for (input, want) in cases {
            assert_eq!(
                PhysicalDevice::parse(input).as_ref(),
                Err(want),
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn diskseq_node() {
        assert_eq!(parse_diskseq(b"1"), Ok(1));
        assert_eq!(parse_diskseq(b"a3f"), Ok(0xa3f));
        assert_eq!(
            parse_diskseq(b"A3F"),
            Err(ParseError::NotHex { field: "diskseq" })
        );
        assert_eq!(parse_diskseq(b"ffffffffffffffff"), Ok(u64::MAX));
        assert_eq!(
            parse_diskseq(b""),
            Err(ParseError::NotHex { field: "diskseq" })
        );
        assert_eq!(parse_diskseq(b"0"), Err(ParseError::ZeroDiskseq));
        assert_eq!(
            parse_diskseq(b"012"),
            Err(ParseError::LeadingZero { field: "diskseq" })
        );
        assert_eq!(
            parse_diskseq(b"12\n"),
            Err(ParseError::NotHex { field: "diskseq" })
        );
        assert_eq!(parse_diskseq(b"18"), Ok(0x18), "hex, not decimal");
        assert_eq!(
            parse_diskseq(b"1ffffffffffffffff"),
            Err(ParseError::TooLong {
                field: "diskseq",
                max: 16
            })
        );
        assert_eq!(format_diskseq(0x2a), "2a");
        assert_eq!(format_diskseq(u64::MAX), "ffffffffffffffff");
    }

    #[test]
    fn format_round_trips() {
        for dev in [
            pd(7, 3, None),
            pd(0xfff, 0xfffff, Some(u64::MAX)),
            pd(0, 1, Some(1)),
        ] {
            let text = dev.to_string();
            assert_eq!(PhysicalDevice::parse(text.as_bytes()), Ok(dev), "{text}");
        }
        assert_eq!(pd(0xfd, 0x10, Some(0x2a)).to_string(), "2a@fd:10");
        assert_eq!(pd(0xfd, 0x10, Some(0)).to_string(), "fd:10");
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics_and_accepts_only_canonical_alphabet(input in proptest::collection::vec(proptest::num::u8::ANY, 0..40)) {
            if let Ok(dev) = PhysicalDevice::parse(&input) {
                proptest::prop_assert!(input.iter().all(|b| b.is_ascii_hexdigit() || *b == b':' || *b == b'@'));
                // What was accepted means the same after formatting.
                proptest::prop_assert_eq!(PhysicalDevice::parse(dev.to_string().as_bytes()), Ok(dev));
            }
        }

        #[test]
        fn format_then_parse_round_trips(major in 0..=MAX_MAJOR, minor in 0..=MAX_MINOR, seq in proptest::option::of(1..=u64::MAX)) {
            let dev = PhysicalDevice { major, minor, diskseq: seq };
            proptest::prop_assert_eq!(PhysicalDevice::parse(dev.to_string().as_bytes()), Ok(dev));
            if let Some(seq) = seq {
                proptest::prop_assert_eq!(parse_diskseq(format_diskseq(seq).as_bytes()), Ok(seq));
            }
        }
    }

    #[test]
    fn socket_path_rules() {
        assert_eq!(
            parse_socket_path(b"/run/blkbackd/1-51712.sock").ok(),
            Some(PathBuf::from("/run/blkbackd/1-51712.sock"))
        );
        for bad in [
            &b""[..],
            b"run/x.sock",
            b"/run/../etc/x",
            b"/run/./x",
            b"/run/x\0y",
            &[b'/'; 108][..],
        ] {
            assert!(
                parse_socket_path(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn device_message_layout() {
        let info = DeviceInfo {
            device: pd(0x103, 0x20, Some(0x1122_3344_5566_7788)),
            read_only: true,
        };
        let m = info.encode();
        assert_eq!(&m[0..4], b"XBHO");
        assert_eq!(&m[4..6], &[1, 0]);
        assert_eq!(&m[6..8], &[1, 0]);
        assert_eq!(&m[8..12], &[0x03, 0x01, 0, 0]);
        assert_eq!(&m[12..16], &[0x20, 0, 0, 0]);
        assert_eq!(
            &m[16..24],
            &[0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11]
        );
        assert_eq!(DeviceInfo::decode(&m).ok(), Some(info));

        let rw = DeviceInfo {
            device: pd(7, 0, None),
            read_only: false,
        };
        assert_eq!(DeviceInfo::decode(&rw.encode()).ok(), Some(rw));
    }

    #[test]
    fn device_message_refusals() {
        let good = DeviceInfo {
            device: pd(7, 1, Some(5)),
            read_only: false,
        }
        .encode();
        let mutate = |at: usize, v: u8| {
            let mut m = good;
            m[at] = v;
            m
        };
        assert!(matches!(
            DeviceInfo::decode(&good[..23]),
            Err(HandoffError::BadMessage(_))
        ));
        let mut long = good.to_vec();
        long.push(0);
        assert!(matches!(
            DeviceInfo::decode(&long),
            Err(HandoffError::BadMessage(_))
        ));
        assert!(matches!(
            DeviceInfo::decode(&mutate(0, b'Y')),
            Err(HandoffError::BadMessage(_))
        ));
        assert!(matches!(
            DeviceInfo::decode(&mutate(4, 2)),
            Err(HandoffError::Version(2))
        ));
        assert!(matches!(
            DeviceInfo::decode(&mutate(6, 2)),
            Err(HandoffError::BadMessage(_))
        ));
        assert!(matches!(
            DeviceInfo::decode(&mutate(7, 0x80)),
            Err(HandoffError::BadMessage(_))
        ));
        assert!(matches!(
            DeviceInfo::decode(&mutate(9, 0x10)),
            Err(HandoffError::BadMessage(_))
        ));
        assert!(matches!(
            DeviceInfo::decode(&mutate(14, 0x10)),
            Err(HandoffError::BadMessage(_))
        ));
    }

    #[test]
    fn reply_round_trips() {
        assert_eq!(
            Reply::decode(&Reply::Accepted.encode()).ok(),
            Some(Reply::Accepted)
        );
        let r = Reply::Rejected(Errno::NODEV);
        assert_eq!(Reply::decode(&r.encode()).ok(), Some(r));
        assert!(Reply::decode(b"XBHR").is_err());
        assert!(Reply::decode(b"XBHQ\0\0\0\0").is_err());
        assert!(Reply::decode(b"XBHR\xff\xff\xff\xff").is_err());
    }

    fn pair() -> (OwnedFd, OwnedFd) {
        use rustix::net::{AddressFamily, SocketFlags, SocketType};
        rustix::net::socketpair(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )
        .expect("socketpair")
    }

    /// A block device node we can open in tests, if this machine has one.
    fn some_block_device() -> Option<(OwnedFd, u32, u32)> {
        for path in [
            "/dev/loop0",
            "/dev/loop1",
            "/dev/ram0",
            "/dev/sda",
            "/dev/vda",
            "/dev/nvme0n1",
        ] {
            if let Ok(fd) = rustix::fs::open(
                path,
                OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NONBLOCK,
                0.into(),
            ) {
                let st = rustix::fs::fstat(&fd).expect("fstat");
                if FileType::from_raw_mode(st.st_mode) == FileType::BlockDevice {
                    return Some((
                        fd,
                        rustix::fs::major(st.st_rdev),
                        rustix::fs::minor(st.st_rdev),
                    ));
                }
            }
        }
        None
    }

    #[test]
    fn fd_passes_and_is_checked() {
        let Some((dev, major, minor)) = some_block_device() else {
            eprintln!(
                "skipped: no block device node can be opened here (needs root and /dev/loop0)"
            );
            return;
        };
        let (a, b) = pair();
        let info = DeviceInfo {
            device: pd(major, minor, Some(3)),
            read_only: true,
        };
        send_device(&a, dev.as_fd(), &info).expect("send");
        let (fd, got) = recv_device(&b).expect("recv");
        assert_eq!(got, info);
        let st = rustix::fs::fstat(&fd).expect("fstat");
        assert_eq!(
            (rustix::fs::major(st.st_rdev), rustix::fs::minor(st.st_rdev)),
            (major, minor)
        );
        assert!(rustix::io::fcntl_getfd(&fd)
            .expect("getfd")
            .contains(rustix::io::FdFlags::CLOEXEC));

        // Wrong number, wrong access mode: refused.
        let wrong = DeviceInfo {
            device: pd(major, minor ^ 1, None),
            read_only: true,
        };
        send_device(&a, dev.as_fd(), &wrong).expect("send");
        assert!(matches!(recv_device(&b), Err(HandoffError::Mismatch(_))));
        let rw = DeviceInfo {
            device: pd(major, minor, None),
            read_only: false,
        };
        send_device(&a, dev.as_fd(), &rw).expect("send");
        assert!(matches!(recv_device(&b), Err(HandoffError::Mismatch(_))));

        send_reply(&b, Reply::Rejected(Errno::NODEV)).expect("reply");
        assert_eq!(
            recv_reply(&a).expect("recv reply"),
            Reply::Rejected(Errno::NODEV)
        );
    }

    #[test]
    fn recv_refuses_non_block_fds_and_missing_fds() {
        let (a, b) = pair();
        let (x, _y) = pair();
        let info = DeviceInfo {
            device: pd(7, 0, None),
            read_only: false,
        };
        send_device(&a, x.as_fd(), &info).expect("send");
        assert!(matches!(
            recv_device(&b),
            Err(HandoffError::Mismatch("not a block device"))
        ));

        // A message without an fd.
        rustix::net::send(&a, &info.encode(), SendFlags::empty()).expect("send");
        assert!(matches!(recv_device(&b), Err(HandoffError::BadMessage(_))));

        // The peer hung up.
        drop(a);
        assert!(matches!(recv_device(&b), Err(HandoffError::Closed)));
    }

    #[test]
    fn connect_reaches_a_listener_of_ours() {
        let dir = std::env::temp_dir().join(format!("handoff-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let path = dir.join("s");
        // A stale file at the path is replaced.
        std::fs::write(&path, b"stale").expect("stale file");
        let l = listen(&path, 1).expect("listen");
        let mode = std::fs::metadata(&path).expect("stat").permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        let c = connect(&path, Duration::from_secs(5)).expect("connect");
        let s = rustix::net::accept(&l).expect("accept");
        send_reply(&s, Reply::Accepted).expect("reply");
        assert_eq!(recv_reply(&c).expect("recv"), Reply::Accepted);
        assert!(connect(&dir.join("absent"), Duration::from_secs(1)).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
