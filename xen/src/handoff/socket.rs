//! The handoff socket: the [`HANDOFF_SOCKET`](super::HANDOFF_SOCKET) value, the backend's
//! listener and the hotplug side's connection (which checks who listens).

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::io::Errno;

use super::{io, HandoffError};
use crate::abspath;

/// Validates the [`HANDOFF_SOCKET`] value with [`abspath::parse`]: an absolute path, no NUL,
/// no `.`/`..` components, short enough for `sun_path`.
///
/// # Errors
/// [`HandoffError::BadSocketPath`].
pub fn parse_socket_path(value: &[u8]) -> Result<PathBuf, HandoffError> {
    abspath::parse(value, abspath::SOCKET_PATH_MAX)
        .map_err(|e| HandoffError::BadSocketPath(e.as_str()))
}

/// Creates the backend's end of the handoff: a `SOCK_SEQPACKET` unix socket (close-on-exec,
/// blocking) listening at `path`, mode 0600 so that only root and our uid can connect. A stale
/// socket left at `path` is replaced. `backlog` bounds the connections waiting for `accept`.
///
/// # Errors
/// [`HandoffError::Io`] naming the step that failed.
pub fn listen(path: &Path, backlog: i32) -> Result<OwnedFd, HandoffError> {
    let sock = seqpacket_socket()?;
    match rustix::fs::unlink(path) {
        Ok(()) | Err(Errno::NOENT) => {}
        Err(e) => return Err(io("removing a stale socket")(e)),
    }
    let addr = rustix::net::SocketAddrUnix::new(path).map_err(io("socket address"))?;
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
    let sock = seqpacket_socket()?;
    let timeout = Some(timeout.max(Duration::from_millis(1)));
    rustix::net::sockopt::set_socket_timeout(&sock, Timeout::Send, timeout)
        .map_err(io("SO_SNDTIMEO"))?;
    rustix::net::sockopt::set_socket_timeout(&sock, Timeout::Recv, timeout)
        .map_err(io("SO_RCVTIMEO"))?;
    let addr = rustix::net::SocketAddrUnix::new(path).map_err(io("socket address"))?;
    rustix::net::connect(&sock, &addr).map_err(io("connect"))?;
    let cred = rustix::net::sockopt::socket_peercred(&sock).map_err(io("SO_PEERCRED"))?;
    let peer = cred.uid.as_raw();
    if peer != 0 && peer != rustix::process::geteuid().as_raw() {
        return Err(HandoffError::UntrustedPeer(peer));
    }
    Ok(sock)
}

/// A unix `SOCK_SEQPACKET` socket, close-on-exec and blocking: either end of the handoff.
fn seqpacket_socket() -> Result<OwnedFd, HandoffError> {
    use rustix::net::{AddressFamily, SocketFlags, SocketType};
    rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )
    .map_err(io("socket"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handoff::{recv_reply, send_reply, Reply};

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
