//! Sending and receiving: the hotplug side sends the device fd with its [`DeviceInfo`] and
//! waits for the [`Reply`]; the backend receives the fd, checks it against the message, and
//! answers.

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::fs::{FileType, OFlags};
use rustix::io::Errno;
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};

use super::{io, DeviceInfo, HandoffError, Reply, DEVICE_MESSAGE_LEN, REPLY_LEN};

/// Sends the device fd and its description (one message, one fd).
///
/// # Errors
/// [`HandoffError::Io`] when `sendmsg` fails or sends a short message.
pub fn send_device(
    sock: impl AsFd,
    fd: BorrowedFd<'_>,
    info: &DeviceInfo,
) -> Result<(), HandoffError> {
    send_with_fd(sock, &info.encode(), fd)
}

/// One message `msg` with one fd, whole or not at all.
fn send_with_fd(sock: impl AsFd, msg: &[u8], fd: BorrowedFd<'_>) -> Result<(), HandoffError> {
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
        &[IoSlice::new(msg)],
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
    let got = recv_with_fds(&sock, &mut buf, RecvFlags::empty()).map_err(io("recvmsg"))?;
    if got.hung_up() {
        return Err(HandoffError::Closed);
    }
    if got.truncated {
        return Err(HandoffError::BadMessage(
            "truncated message or ancillary data",
        ));
    }
    let fds = got.fds;
    let got = got.len;
    let info = DeviceInfo::decode(buf.get(..got).unwrap_or(&buf))?;
    let mut fds = fds.into_iter();
    let (Some(fd), None) = (fds.next(), fds.next()) else {
        return Err(HandoffError::BadMessage("not exactly one fd"));
    };
    check_fd_matches(fd.as_fd(), &info)?;
    Ok((fd, info))
}

/// Checks that `fd` is the block device `info` names, with the access mode it claims, or, for
/// [`DeviceInfo::nbd_socket`], a socket.
fn check_fd_matches(fd: BorrowedFd<'_>, info: &DeviceInfo) -> Result<(), HandoffError> {
    let st = rustix::fs::fstat(fd).map_err(io("fstat"))?;
    if info.is_nbd_socket() {
        if FileType::from_raw_mode(st.st_mode) != FileType::Socket {
            return Err(HandoffError::Mismatch("device 0:0 but not a socket"));
        }
        return Ok(());
    }
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
    use crate::handoff::physical_device::tests::pd;
    use std::io::Write as _;

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
            // Straight to stderr in one write: libtest captures `eprintln!` of passing tests.
            let _ = std::io::stderr().write_all(
                format!(
                    "SKIPPED (needs root: a block device node such as /dev/loop0): {}\n",
                    std::thread::current()
                        .name()
                        .unwrap_or("fd_passes_and_is_checked")
                )
                .as_bytes(),
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

        // A socket said to be an NBD connection is taken; a file said to be one is not.
        let nbd = DeviceInfo::nbd_socket(false);
        send_device(&a, x.as_fd(), &nbd).expect("send");
        assert_eq!(recv_device(&b).expect("an NBD socket").1, nbd);
        let file = std::fs::File::open("/dev/null").expect("/dev/null");
        send_device(&a, file.as_fd(), &nbd).expect("send");
        assert!(matches!(
            recv_device(&b),
            Err(HandoffError::Mismatch("device 0:0 but not a socket"))
        ));

        // A message without an fd.
        rustix::net::send(&a, &info.encode(), SendFlags::empty()).expect("send");
        assert!(matches!(recv_device(&b), Err(HandoffError::BadMessage(_))));

        // The peer hung up.
        drop(a);
        assert!(matches!(recv_device(&b), Err(HandoffError::Closed)));
    }
}

/// The message a backend sends its supervisor with the device it holds ([`send_held`]).
const HELD_MAGIC: [u8; 4] = *b"HLD1";

/// Sends the device the backend holds to its supervisor, which keeps it for a backend that
/// takes over should this one die (one message, one fd; any file type: a block device or a
/// regular file).
///
/// # Errors
/// [`HandoffError::Io`] when `sendmsg` fails or sends a short message.
pub fn send_held(sock: impl AsFd, fd: BorrowedFd<'_>) -> Result<(), HandoffError> {
    send_with_fd(sock, &HELD_MAGIC, fd)
}

/// Receives, without waiting, a device a backend sent with [`send_held`]: `None` when no
/// message is waiting. Anything but one such message with exactly one fd is refused (the
/// fds received are closed).
///
/// # Errors
/// [`HandoffError::BadMessage`] for anything else; [`HandoffError::Closed`] when the backend
/// closed its end; [`HandoffError::Io`] when `recvmsg` fails.
pub fn recv_held(sock: impl AsFd) -> Result<Option<OwnedFd>, HandoffError> {
    let mut buf = [0u8; HELD_MAGIC.len() + 1];
    let got = match recv_with_fds(&sock, &mut buf, RecvFlags::DONTWAIT) {
        Ok(got) => got,
        Err(Errno::AGAIN) => return Ok(None),
        Err(e) => return Err(io("recvmsg")(e)),
    };
    if got.hung_up() {
        return Err(HandoffError::Closed);
    }
    if got.truncated || buf.get(..got.len) != Some(&HELD_MAGIC[..]) {
        return Err(HandoffError::BadMessage("not a held-device message"));
    }
    let fds = got.fds;
    let mut fds = fds.into_iter();
    let (Some(fd), None) = (fds.next(), fds.next()) else {
        return Err(HandoffError::BadMessage("not exactly one fd"));
    };
    Ok(Some(fd))
}

#[cfg(test)]
mod held_tests {
    use super::*;
    use rustix::net::{socketpair, AddressFamily, SocketFlags, SocketType};

    #[test]
    fn a_held_device_goes_to_the_supervisor_once() {
        let (sup, serve) = socketpair(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )
        .unwrap();
        assert!(recv_held(&sup).unwrap().is_none(), "nothing sent yet");
        let file = rustix::fs::memfd_create("disk", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        send_held(&serve, file.as_fd()).unwrap();
        let got = recv_held(&sup).unwrap().expect("the device");
        assert_eq!(
            rustix::fs::fstat(&got).unwrap().st_ino,
            rustix::fs::fstat(&file).unwrap().st_ino
        );
        // A message without an fd, or another message, is refused.
        rustix::net::send(&serve, b"HLD1", SendFlags::empty()).unwrap();
        assert!(matches!(recv_held(&sup), Err(HandoffError::BadMessage(_))));
        drop(serve);
        assert!(matches!(recv_held(&sup), Err(HandoffError::Closed)));
    }
}

/// What one `recvmsg` brought: every fd (taken before the message is judged, so that all of
/// them are closed on error), the bytes' length, and whether anything was cut off.
struct Received {
    fds: Vec<OwnedFd>,
    len: usize,
    truncated: bool,
}

impl Received {
    /// An empty message without fds: the peer hung up.
    fn hung_up(&self) -> bool {
        self.len == 0 && self.fds.is_empty()
    }
}

/// One `recvmsg` into `buf`, with room for two fds (one more than any message carries).
fn recv_with_fds(sock: impl AsFd, buf: &mut [u8], flags: RecvFlags) -> Result<Received, Errno> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = rustix::net::recvmsg(
        &sock,
        &mut [IoSliceMut::new(buf)],
        &mut control,
        flags | RecvFlags::CMSG_CLOEXEC,
    )?;
    let mut fds: Vec<OwnedFd> = Vec::new();
    for msg in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = msg {
            fds.extend(received);
        }
    }
    Ok(Received {
        len: got.bytes,
        truncated: got
            .flags
            .intersects(ReturnFlags::TRUNC | ReturnFlags::CTRUNC),
        fds,
    })
}
