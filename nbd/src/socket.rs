//! Reading and writing the socket with the step named in every error, so that "the server
//! closed the connection while reading a reply's payload" is what an operator reads, not
//! "failed to fill whole buffer".

use std::io::{self, Read, Write};

/// A socket operation that failed, with what the client was doing at the time.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// The server closed the connection (end of file) in the middle of a message.
    #[error("the server closed the connection while {0}")]
    Closed(&'static str),
    /// The socket's timeout passed with no data from (or no room towards) the server.
    #[error("the server did not answer within the timeout while {0}")]
    TimedOut(&'static str),
    /// Any other socket error.
    #[error("socket error while {during}: {source}")]
    Other {
        /// What the client was doing.
        during: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
}

impl SocketError {
    /// Classifies `source`, which happened while doing `during`.
    pub(crate) fn new(during: &'static str, source: io::Error) -> Self {
        match source.kind() {
            io::ErrorKind::UnexpectedEof | io::ErrorKind::WriteZero => Self::Closed(during),
            // A socket read or write timeout shows as EAGAIN (WouldBlock) on Linux.
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Self::TimedOut(during),
            _ => Self::Other { during, source },
        }
    }
}

/// Fills `buf` from `r`.
pub(crate) fn read_exact(
    r: &mut impl Read,
    buf: &mut [u8],
    during: &'static str,
) -> Result<(), SocketError> {
    r.read_exact(buf).map_err(|e| SocketError::new(during, e))
}

/// Reads exactly `N` bytes.
pub(crate) fn read_array<const N: usize>(
    r: &mut impl Read,
    during: &'static str,
) -> Result<[u8; N], SocketError> {
    let mut buf = [0u8; N];
    read_exact(r, &mut buf, during)?;
    Ok(buf)
}

/// Writes all of `buf` to `w`.
pub(crate) fn write_all(
    w: &mut impl Write,
    buf: &[u8],
    during: &'static str,
) -> Result<(), SocketError> {
    w.write_all(buf).map_err(|e| SocketError::new(during, e))
}
