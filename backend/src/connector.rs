//! New connections for a backend that may make none itself. Once confined, a backend can
//! neither connect a socket nor open a device (see [`crate::sandbox`]), and after `--user`
//! it may lack the rights to; so before it confines itself (and before any privilege drop)
//! `serve` starts a connector for each thing it may have to reach again: `blkbackd KIND
//! TARGET` ([`crate::nbd_connector`]: `nbd-connect URI`; [`crate::xenstore_connector`]:
//! `xenstore-connect PATH`), a child process that knows only its one target and holds the
//! other end of a socket pair as its standard input. Each request the backend sends (one
//! byte) asks for one new connection; the connector answers with the connected fd
//! (`SCM_RIGHTS`) and what the kind needs to say about it, or with why it could not. It
//! exits when the backend's end closes, and the backend reaps it then.
//!
//! The answer, [`ANSWER_LEN`] bytes, little endian: magic `CONN`, a `u32` errno (0:
//! connected), [`DETAILS_LEN`] bytes the kind defines (an NBD export's size and flags), then
//! for an error up to [`MAX_REASON`] bytes of UTF-8 saying why, zero-padded. What the
//! backend receives is checked like anything else from outside: the answer's length and
//! magic, exactly one fd with a connection, and that fd must be what was asked for
//! ([`FdKind`]: a socket, or the very character device).

use std::ffi::OsStr;
use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use rustix::fs::FileType;
use rustix::io::Errno;
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, SocketFlags, SocketType,
};

/// How long a connector may take to make a connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest error text in an answer.
pub const MAX_REASON: usize = 200;
/// What a kind says about a connection, in each answer.
pub const DETAILS_LEN: usize = 23;
/// An answer's length.
pub const ANSWER_LEN: usize = 8 + DETAILS_LEN + MAX_REASON;
/// Where an answer's reason begins.
const REASON_AT: usize = 8 + DETAILS_LEN;
const MAGIC: [u8; 4] = *b"CONN";

/// What a kind says about a connection.
pub type Details = [u8; DETAILS_LEN];

/// Why no new connection came.
#[derive(Debug, thiserror::Error)]
pub enum ConnectorError {
    /// The connector could not connect.
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
    #[error("starting the connector: {0}")]
    Start(#[source] std::io::Error),
}

/// What the fd of an answer must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FdKind {
    /// A socket (an NBD server's, xenstored's).
    Socket,
    /// The character device with this device number (`/dev/xen/xenbus`).
    CharDevice(u64),
}

impl FdKind {
    /// What `fd` is; `None` for anything but a socket or a character device.
    fn of(fd: BorrowedFd<'_>) -> Result<Option<Self>, Errno> {
        let st = rustix::fs::fstat(fd)?;
        Ok(match FileType::from_raw_mode(st.st_mode) {
            FileType::Socket => Some(Self::Socket),
            FileType::CharacterDevice => Some(Self::CharDevice(st.st_rdev)),
            _ => None,
        })
    }
}

/// The backend's end: asks for new connections.
#[derive(Debug)]
pub struct Connector {
    sock: OwnedFd,
    expect: FdKind,
    /// One request and its answer at a time (queues of one disk share the connector).
    turn: Mutex<()>,
    /// Reaped when it is found gone, or on drop.
    child: Mutex<Child>,
}

impl Connector {
    /// Starts `program ARGS` with the other end of a new socket pair as its standard input;
    /// each fd it answers with must be `expect`. Its answers are awaited at most twice
    /// [`CONNECT_TIMEOUT`].
    ///
    /// # Errors
    /// [`ConnectorError::Start`].
    pub fn start<I, S>(program: &Path, args: I, expect: FdKind) -> Result<Self, ConnectorError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
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
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::from(theirs))
            .stdout(Stdio::null())
            .spawn()
            .map_err(ConnectorError::Start)?;
        Ok(Self {
            sock: ours,
            expect,
            turn: Mutex::new(()),
            child: Mutex::new(child),
        })
    }

    /// Asks for a new connection, waiting for it (at most twice [`CONNECT_TIMEOUT`]).
    ///
    /// # Errors
    /// [`ConnectorError`].
    pub fn request(&self) -> Result<(OwnedFd, Details), ConnectorError> {
        let _turn = self
            .turn
            .lock()
            .map_err(|_| ConnectorError::Answer("a queue died while asking"))?;
        let answer = self.exchange();
        if matches!(
            answer,
            Err(ConnectorError::Io(_) | ConnectorError::Answer(_))
        ) {
            // It may have died: no zombie while the backend lives on.
            let _ = self
                .child
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .try_wait();
        }
        answer
    }

    fn exchange(&self) -> Result<(OwnedFd, Details), ConnectorError> {
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
        if got.bytes == 0 {
            return Err(ConnectorError::Answer("the connector is gone"));
        }
        let answer = buf
            .get(..got.bytes)
            .filter(|a| a.len() == ANSWER_LEN)
            .ok_or(ConnectorError::Answer("wrong length"))?;
        let (errno, details, reason) = decode(answer)?;
        if errno != 0 {
            return Err(ConnectorError::Refused {
                errno: Errno::from_raw_os_error(i32::try_from(errno).unwrap_or(i32::MAX)),
                reason,
            });
        }
        let mut fds = fds.into_iter();
        let (Some(fd), None) = (fds.next(), fds.next()) else {
            return Err(ConnectorError::Answer("not exactly one fd"));
        };
        match FdKind::of(fd.as_fd()).map_err(ConnectorError::Io)? {
            Some(kind) if kind == self.expect => Ok((fd, details)),
            _ => Err(ConnectorError::Answer(match self.expect {
                FdKind::Socket => "the fd is not a socket",
                FdKind::CharDevice(_) => "the fd is not the device asked for",
            })),
        }
    }
}

impl Drop for Connector {
    /// Ends the connector (it sees the end of its input) and reaps it: it exits at once, or
    /// once a connection under way is made or times out.
    fn drop(&mut self) {
        let _ = rustix::net::shutdown(&self.sock, rustix::net::Shutdown::Both);
        let _ = self
            .child
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .wait();
    }
}

fn encode(errno: u32, details: &Details, reason: &str) -> [u8; ANSWER_LEN] {
    let mut m = [0u8; ANSWER_LEN];
    m[0..4].copy_from_slice(&MAGIC);
    m[4..8].copy_from_slice(&errno.to_le_bytes());
    m[8..REASON_AT].copy_from_slice(details);
    let mut end = reason.len().min(MAX_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    m[REASON_AT..REASON_AT + end].copy_from_slice(&reason.as_bytes()[..end]);
    m
}

fn decode(m: &[u8]) -> Result<(u32, Details, String), ConnectorError> {
    if m.get(0..4) != Some(&MAGIC[..]) {
        return Err(ConnectorError::Answer("bad magic"));
    }
    let errno = m
        .get(4..8)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u32::from_le_bytes);
    let details = m
        .get(8..REASON_AT)
        .and_then(|b| b.try_into().ok())
        .ok_or(ConnectorError::Answer("wrong length"))?;
    let reason = m.get(REASON_AT..).unwrap_or(&[]);
    let reason = reason.split(|&b| b == 0).next().unwrap_or(&[]);
    Ok((errno, details, String::from_utf8_lossy(reason).into_owned()))
}

/// The connector's side: for each request on `sock` (its standard input), `connect` makes a
/// connection (or says why not: an errno and words), which is sent back; returns when the
/// backend closes `sock`.
///
/// # Errors
/// Talking to the backend failing.
pub fn serve_requests(
    sock: BorrowedFd<'_>,
    mut connect: impl FnMut() -> Result<(OwnedFd, Details), (Errno, String)>,
) -> Result<(), ConnectorError> {
    let mut byte = [0u8; 1];
    loop {
        match rustix::io::read(sock, &mut byte) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(Errno::INTR) => continue,
            Err(e) => return Err(ConnectorError::Io(e)),
        }
        let sent = match connect() {
            Ok((fd, details)) => send_answer(sock, &encode(0, &details, ""), &[fd.as_fd()]),
            Err((errno, reason)) => send_answer(
                sock,
                &encode(
                    errno.raw_os_error().unsigned_abs(),
                    &[0; DETAILS_LEN],
                    &reason,
                ),
                &[],
            ),
        };
        sent.map_err(ConnectorError::Io)?;
    }
}

fn send_answer(sock: BorrowedFd<'_>, answer: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), Errno> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
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
    use std::os::unix::fs::MetadataExt;

    /// Set in a child started by the test below: how it answers, standing in for a connector.
    const ANSWER: &str = "BLKBACKD_TEST_CONNECTOR_ANSWER";

    /// In a child: answers one request as [`ANSWER`] says; nothing in the test run itself.
    #[test]
    fn connector_side() {
        let Ok(how) = std::env::var(ANSWER) else {
            return;
        };
        let stdin = std::io::stdin();
        let sock = stdin.as_fd();
        rustix::io::read(sock, &mut [0u8; 1]).unwrap();
        let (a, b) = rustix::net::socketpair(
            AddressFamily::UNIX,
            SocketType::STREAM,
            SocketFlags::CLOEXEC,
            None,
        )
        .unwrap();
        let null = std::fs::File::open("/dev/null").unwrap();
        let good = encode(0, &[0; DETAILS_LEN], "");
        let mut bad_magic = good;
        bad_magic[0] = b'X';
        let refused = encode(111, &[0; DETAILS_LEN], "nobody there");
        let (answer, fds): (&[u8], &[BorrowedFd<'_>]) = match how.as_str() {
            "gone" => return,
            "socket" => (&good, &[a.as_fd()]),
            "short" => (&good[..10], &[a.as_fd()]),
            "magic" => (&bad_magic, &[a.as_fd()]),
            "no fd" => (&good, &[]),
            "two fds" => (&good, &[a.as_fd(), b.as_fd()]),
            "a device" => (&good, &[null.as_fd()]),
            "refused" => (&refused, &[]),
            _ => panic!("{how}?"),
        };
        send_answer(sock, answer, fds).unwrap();
    }

    #[test]
    fn only_the_fd_asked_for_comes_through_and_connectors_are_reaped() {
        let exe = std::env::current_exe().unwrap();
        let null = std::fs::metadata("/dev/null").unwrap().rdev();
        let cases = [
            ("socket", FdKind::Socket, ""),
            ("a device", FdKind::CharDevice(null), ""),
            (
                "gone",
                FdKind::Socket,
                "the connector's answer: the connector is gone",
            ),
            (
                "short",
                FdKind::Socket,
                "the connector's answer: wrong length",
            ),
            ("magic", FdKind::Socket, "the connector's answer: bad magic"),
            (
                "no fd",
                FdKind::Socket,
                "the connector's answer: not exactly one fd",
            ),
            (
                "two fds",
                FdKind::Socket,
                "the connector's answer: not exactly one fd",
            ),
            (
                "a device",
                FdKind::Socket,
                "the connector's answer: the fd is not a socket",
            ),
            (
                "socket",
                FdKind::CharDevice(null),
                "not the device asked for",
            ),
            (
                "a device",
                FdKind::CharDevice(null + 1),
                "not the device asked for",
            ),
            (
                "refused",
                FdKind::Socket,
                "could not connect (Connection refused (os error 111)): nobody there",
            ),
        ];
        for (how, expect, says) in cases {
            std::env::set_var(ANSWER, how);
            let args = ["--exact", "connector::tests::connector_side"];
            let connector = Connector::start(&exe, args, expect).unwrap();
            let pid = connector.child.lock().unwrap().id();
            match connector.request() {
                Ok((fd, _)) => {
                    assert!(says.is_empty(), "{how}: accepted as {expect:?}");
                    assert_eq!(FdKind::of(fd.as_fd()).unwrap(), Some(expect));
                }
                Err(e) => assert!(
                    !says.is_empty() && e.to_string().contains(says),
                    "{how} as {expect:?}: {e}"
                ),
            }
            drop(connector);
            assert!(
                !Path::new(&format!("/proc/{pid}")).exists(),
                "{how}: the connector was not reaped"
            );
        }
        std::env::remove_var(ANSWER);
    }
}
