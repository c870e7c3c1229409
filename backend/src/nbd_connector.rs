//! Reconnecting a confined backend to its NBD server. Once confined, a backend can make no
//! connection (see [`crate::sandbox`]), so before it confines itself `serve` starts a
//! connector: `blkbackd nbd-connect URI`, a child process that knows only the export's URI and
//! holds the other end of a socket pair as its standard input. Each request the backend sends
//! (one byte) asks for one new connection: the connector connects and negotiates the export
//! ([`nbd::Client`], bounded by [`CONNECT_TIMEOUT`]) and answers with the export's details and
//! the connected socket (`SCM_RIGHTS`), or with why it could not. It exits when the backend's
//! end closes.
//!
//! The answer, [`ANSWER_LEN`] bytes, little endian: magic `NBDC`, a `u32` errno (0: connected),
//! then for a connection the size (`u64`), the transmission flags (`u16`) and the minimum,
//! preferred and maximum block sizes (`u32` each), and whether structured replies were
//! negotiated (one byte, 0 or 1); for an error, up to [`MAX_REASON`] bytes of
//! UTF-8 saying why, zero-padded. What the backend receives is checked like anything else
//! from outside: the answer's length and magic, exactly one fd with a connection, and the
//! export must be the one the backend serves ([`same_export`]).

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use nbd::{BlockSize, Export, Negotiated, TransmissionFlags};
use rustix::io::Errno;
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, SocketFlags, SocketType,
};

/// How long the connector may take to connect and negotiate.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest error text in an answer.
pub const MAX_REASON: usize = 200;
/// An answer's length.
pub const ANSWER_LEN: usize = 8 + 8 + 2 + 12 + 1 + MAX_REASON;
/// Where an answer's reason begins.
const REASON_AT: usize = 31;
const MAGIC: [u8; 4] = *b"NBDC";

/// Why no new connection came.
#[derive(Debug, thiserror::Error)]
pub enum ConnectorError {
    /// The connector could not connect or negotiate.
    #[error("the connector could not connect ({errno}): {reason}")]
    Refused {
        /// Its errno.
        errno: Errno,
        /// Its words.
        reason: String,
    },
    /// The connector's answer is malformed, or it is gone.
    #[error("the connector's answer: {0}")]
    Answer(&'static str),
    /// Talking to the connector failed.
    #[error("talking to the connector: {0}")]
    Io(#[source] Errno),
    /// Starting it failed.
    #[error("starting the NBD connector: {0}")]
    Start(#[source] std::io::Error),
}

/// The backend's end: asks for new connections.
#[derive(Debug)]
pub struct Connector {
    sock: OwnedFd,
    /// One request and its answer at a time (queues of one disk share the connector).
    turn: std::sync::Mutex<()>,
}

impl Connector {
    /// Starts `program nbd-connect URI` with the other end of a new socket pair as its
    /// standard input. Its answers are awaited at most twice [`CONNECT_TIMEOUT`].
    ///
    /// # Errors
    /// [`ConnectorError::Start`].
    pub fn start(program: &Path, uri: &str) -> Result<Self, ConnectorError> {
        let (ours, theirs) = rustix::net::socketpair(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )
        .map_err(|e| ConnectorError::Start(e.into()))?;
        rustix::net::sockopt::set_socket_timeout(
            &ours,
            rustix::net::sockopt::Timeout::Recv,
            Some(CONNECT_TIMEOUT * 2),
        )
        .map_err(|e| ConnectorError::Start(e.into()))?;
        // Not waited for: it exits when our end closes, with this process (a confined
        // backend may not wait for children); init reaps it then.
        Command::new(program)
            .arg("nbd-connect")
            .arg(uri)
            .stdin(Stdio::from(theirs))
            .stdout(Stdio::null())
            .spawn()
            .map_err(ConnectorError::Start)?;
        Ok(Self {
            sock: ours,
            turn: std::sync::Mutex::new(()),
        })
    }

    /// Asks for a new connection, waiting for it (at most twice [`CONNECT_TIMEOUT`]).
    ///
    /// # Errors
    /// [`ConnectorError`].
    pub fn connect(&self) -> Result<(OwnedFd, Export), ConnectorError> {
        let _turn = self
            .turn
            .lock()
            .map_err(|_| ConnectorError::Answer("a queue died while asking"))?;
        let sent =
            rustix::net::send(&self.sock, &[1], SendFlags::NOSIGNAL).map_err(ConnectorError::Io)?;
        if sent != 1 {
            return Err(ConnectorError::Answer("the request was not sent"));
        }
        let mut buf = [0u8; ANSWER_LEN + 1];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let got = rustix::net::recvmsg(
            &self.sock,
            &mut [IoSliceMut::new(&mut buf)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        )
        .map_err(ConnectorError::Io)?;
        let mut fds: Vec<OwnedFd> = Vec::new();
        for msg in control.drain() {
            if let RecvAncillaryMessage::ScmRights(received) = msg {
                fds.extend(received);
            }
        }
        let answer = buf
            .get(..got.bytes)
            .filter(|a| a.len() == ANSWER_LEN)
            .ok_or(ConnectorError::Answer("wrong length"))?;
        let (export, errno, reason) = decode(answer)?;
        if errno != 0 {
            return Err(ConnectorError::Refused {
                errno: Errno::from_raw_os_error(i32::try_from(errno).unwrap_or(i32::MAX)),
                reason,
            });
        }
        let mut fds = fds.into_iter();
        match (fds.next(), fds.next()) {
            (Some(fd), None) => Ok((fd, export)),
            _ => Err(ConnectorError::Answer("not exactly one fd")),
        }
    }
}

/// Whether `new` is the export `old` was: the same size, flags and minimum block size (the
/// disk the guest was told about, and the commands it may send).
pub fn same_export(old: &Export, new: &Export) -> bool {
    old.size == new.size
        && old.flags.bits() == new.flags.bits()
        && old.block_size.minimum == new.block_size.minimum
        && new.block_size.maximum >= old.block_size.maximum
}

fn encode(export: Option<&Export>, errno: u32, reason: &str) -> [u8; ANSWER_LEN] {
    let mut m = [0u8; ANSWER_LEN];
    m[0..4].copy_from_slice(&MAGIC);
    m[4..8].copy_from_slice(&errno.to_le_bytes());
    if let Some(e) = export {
        m[8..16].copy_from_slice(&e.size.to_le_bytes());
        m[16..18].copy_from_slice(&e.flags.bits().to_le_bytes());
        m[18..22].copy_from_slice(&e.block_size.minimum.to_le_bytes());
        m[22..26].copy_from_slice(&e.block_size.preferred.to_le_bytes());
        m[26..30].copy_from_slice(&e.block_size.maximum.to_le_bytes());
        m[30] = u8::from(e.structured_replies);
    }
    let mut end = reason.len().min(MAX_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    m[REASON_AT..REASON_AT + end].copy_from_slice(&reason.as_bytes()[..end]);
    m
}

fn decode(m: &[u8]) -> Result<(Export, u32, String), ConnectorError> {
    let u32_at = |i: usize| {
        m.get(i..i + 4)
            .and_then(|b| b.try_into().ok())
            .map_or(0, u32::from_le_bytes)
    };
    if m.get(0..4) != Some(&MAGIC[..]) {
        return Err(ConnectorError::Answer("bad magic"));
    }
    let size = m
        .get(8..16)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_le_bytes);
    let flags = m
        .get(16..18)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u16::from_le_bytes);
    let block_size = BlockSize {
        minimum: u32_at(18),
        preferred: u32_at(22),
        maximum: u32_at(26),
        advertised: true,
    };
    let reason = m.get(REASON_AT..).unwrap_or(&[]);
    let reason = reason.split(|&b| b == 0).next().unwrap_or(&[]);
    let export = Export {
        size,
        flags: TransmissionFlags::from_bits(flags),
        block_size,
        via: Negotiated::Go,
        structured_replies: m.get(30) == Some(&1),
    };
    if u32_at(4) == 0 && !block_size.is_valid() {
        return Err(ConnectorError::Answer("invalid block sizes"));
    }
    Ok((
        export,
        u32_at(4),
        String::from_utf8_lossy(reason).into_owned(),
    ))
}

/// The connector's side (`blkbackd nbd-connect URI`): serves requests on `sock` (its standard
/// input) until the backend closes it.
///
/// # Errors
/// A malformed URI; talking to the backend failing.
pub fn run_connector(sock: BorrowedFd<'_>, uri: &str) -> Result<(), ConnectorError> {
    let uri: nbd::Uri = uri.parse().map_err(|e| ConnectorError::Refused {
        errno: Errno::INVAL,
        reason: format!("{e}"),
    })?;
    let mut byte = [0u8; 1];
    loop {
        match rustix::io::read(sock, &mut byte) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(Errno::INTR) => continue,
            Err(e) => return Err(ConnectorError::Io(e)),
        }
        let answer = match nbd::Client::connect_timeout(&uri, CONNECT_TIMEOUT) {
            Ok(client) => {
                let (stream, export) = client.into_parts();
                // The backend's io_uring waits for the socket itself: no timeouts left over
                // from the handshake (as `Device::nbd` does for the first connection).
                let _ = stream.set_timeout(None);
                let fd: OwnedFd = match stream {
                    nbd::Stream::Tcp(s) => s.into(),
                    nbd::Stream::Unix(s) => s.into(),
                };
                send_answer(sock, &encode(Some(&export), 0, ""), Some(fd.as_fd()))
            }
            Err(e) => {
                let errno = Errno::CONNREFUSED.raw_os_error().unsigned_abs();
                send_answer(sock, &encode(None, errno, &e.to_string()), None)
            }
        };
        answer.map_err(ConnectorError::Io)?;
    }
}

fn send_answer(
    sock: BorrowedFd<'_>,
    answer: &[u8; ANSWER_LEN],
    fd: Option<BorrowedFd<'_>>,
) -> Result<(), Errno> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    let fds: Vec<BorrowedFd<'_>> = fd.into_iter().collect();
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err(Errno::NOBUFS);
    }
    rustix::net::sendmsg(
        sock,
        &[IoSlice::new(answer)],
        &mut control,
        SendFlags::NOSIGNAL,
    )
    .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_round_trip_and_bad_ones_are_refused() {
        let export = Export {
            size: 1 << 30,
            flags: TransmissionFlags::from_bits(
                TransmissionFlags::HAS_FLAGS | TransmissionFlags::SEND_FLUSH,
            ),
            block_size: BlockSize {
                minimum: 512,
                preferred: 4096,
                maximum: 1 << 25,
                advertised: true,
            },
            via: Negotiated::Go,
            structured_replies: true,
        };
        let (got, errno, _) = decode(&encode(Some(&export), 0, "")).unwrap();
        assert_eq!(
            (got.size, got.flags.bits(), errno),
            (export.size, export.flags.bits(), 0)
        );
        assert!(same_export(&export, &got));
        assert_eq!(got, export);
        let simple = Export {
            structured_replies: false,
            ..export
        };
        assert_eq!(decode(&encode(Some(&simple), 0, "")).unwrap().0, simple);
        let (_, errno, reason) = decode(&encode(None, 111, &"é".repeat(150))).unwrap();
        assert_eq!(errno, 111);
        assert!(reason.len() <= MAX_REASON && reason.chars().all(|c| c == 'é'));
        let mut bad = encode(Some(&export), 0, "");
        bad[0] = b'X';
        assert!(decode(&bad).is_err());
        let mut bad = encode(Some(&export), 0, "");
        bad[18..22].copy_from_slice(&3u32.to_le_bytes());
        assert!(decode(&bad).is_err(), "a minimum block size of 3");
        let mut other = got;
        other.size += 512;
        assert!(!same_export(&export, &other));
    }
}
