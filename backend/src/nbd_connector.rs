//! Reconnecting a confined backend to its NBD server, through a connector
//! ([`crate::connector`]): `blkbackd nbd-connect URI` connects and negotiates the export
//! ([`nbd::Client`], bounded by [`CONNECT_TIMEOUT`]) and answers with the connected socket and
//! the export's details, little endian: the size (`u64`), the transmission flags (`u16`), the
//! minimum, preferred and maximum block sizes (`u32` each), and whether structured replies
//! were negotiated (one byte, 0 or 1). The export must be the one the backend serves
//! ([`same_export`]).

use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::Path;

use nbd::{BlockSize, Export, Negotiated, TransmissionFlags};
use rustix::io::Errno;

pub use crate::connector::ConnectorError;
use crate::connector::{self, Details, FdKind, CONNECT_TIMEOUT};

/// The backend's end: asks for new connections to the export.
#[derive(Debug)]
pub struct Connector(connector::Connector);

impl Connector {
    /// Starts `program nbd-connect URI` ([`connector::Connector::start`]).
    ///
    /// # Errors
    /// [`ConnectorError::Start`].
    pub fn start(program: &Path, uri: &str) -> Result<Self, ConnectorError> {
        connector::Connector::start(program, ["nbd-connect", uri], FdKind::Socket).map(Self)
    }

    /// Asks for a new connection, waiting for it (at most twice [`CONNECT_TIMEOUT`]).
    ///
    /// # Errors
    /// [`ConnectorError`].
    pub fn connect(&self) -> Result<(OwnedFd, Export), ConnectorError> {
        let (fd, details) = self.0.request()?;
        Ok((fd, decode(&details)?))
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

fn encode(e: &Export) -> Details {
    let mut m = [0u8; connector::DETAILS_LEN];
    m[0..8].copy_from_slice(&e.size.to_le_bytes());
    m[8..10].copy_from_slice(&e.flags.bits().to_le_bytes());
    m[10..14].copy_from_slice(&e.block_size.minimum.to_le_bytes());
    m[14..18].copy_from_slice(&e.block_size.preferred.to_le_bytes());
    m[18..22].copy_from_slice(&e.block_size.maximum.to_le_bytes());
    m[22] = u8::from(e.structured_replies);
    m
}

fn decode(m: &Details) -> Result<Export, ConnectorError> {
    let u32_at = |i: usize| u32::from_le_bytes([m[i], m[i + 1], m[i + 2], m[i + 3]]);
    let mut size = [0u8; 8];
    size.copy_from_slice(&m[0..8]);
    let block_size = BlockSize {
        minimum: u32_at(10),
        preferred: u32_at(14),
        maximum: u32_at(18),
        advertised: true,
    };
    if !block_size.is_valid() {
        return Err(ConnectorError::Answer("invalid block sizes"));
    }
    Ok(Export {
        size: u64::from_le_bytes(size),
        flags: TransmissionFlags::from_bits(u16::from_le_bytes([m[8], m[9]])),
        block_size,
        via: Negotiated::Go,
        structured_replies: m[22] == 1,
    })
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
    connector::serve_requests(sock, || {
        let client = nbd::Client::connect_timeout(&uri, CONNECT_TIMEOUT)
            .map_err(|e| (Errno::CONNREFUSED, e.to_string()))?;
        let (stream, export) = client.into_parts();
        // The backend's io_uring waits for the socket itself: no timeouts left over from the
        // handshake (as `Device::nbd` does for the first connection).
        let _ = stream.set_timeout(None);
        let fd: OwnedFd = match stream {
            nbd::Stream::Tcp(s) => s.into(),
            nbd::Stream::Unix(s) => s.into(),
        };
        Ok((fd, encode(&export)))
    })
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
        let got = decode(&encode(&export)).unwrap();
        assert!(same_export(&export, &got));
        assert_eq!(got, export);
        let simple = Export {
            structured_replies: false,
            ..export
        };
        assert_eq!(decode(&encode(&simple)).unwrap(), simple);
        let mut bad = encode(&export);
        bad[10..14].copy_from_slice(&3u32.to_le_bytes());
        assert!(decode(&bad).is_err(), "a minimum block size of 3");
        let mut other = got;
        other.size += 512;
        assert!(!same_export(&export, &other));
    }
}
