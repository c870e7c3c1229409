//! An NBD client (the Network Block Device protocol, as the NBD project's `doc/proto.md`
//! describes it): what blkbackd needs to serve a guest's disk from qemu-storage-daemon,
//! qemu-nbd, nbdkit or anything else that speaks NBD.
//!
//! # Design
//! - [`uri`] parses the NBD URI forms (`nbd://host[:port]/export`,
//!   `nbd+unix:///export?socket=PATH`, after the NBD project's `doc/uri.md`) into a [`Uri`];
//!   anything else, TLS included, is a [`UriError`] that says what is wrong.
//! - [`handshake`] is the client's side of the fixed-newstyle negotiation over any
//!   `Read + Write`: `NBD_OPT_STRUCTURED_REPLY` where the server offers it, `NBD_OPT_GO`
//!   with the size constraints requested, `NBD_OPT_EXPORT_NAME`
//!   only when the server does not know `NBD_OPT_GO`. Its result is an [`Export`]: the size,
//!   the transmission flags and the block size constraints the client must keep.
//! - [`wire`] is the transmission phase's codec without I/O: a request header into 28 bytes,
//!   a simple reply out of 16. [`structured`] is the same for structured replies: a chunk's
//!   header and fixed part, and [`structured::Reassembly`], which checks a reply's chunks
//!   against its request (inside it, no overlap, a read covered exactly once).
//! - [`client`] is a small blocking [`Client`] over a connected socket (TCP or Unix), one
//!   request at a time. It checks every request against the export (size, alignment,
//!   read-only, the commands the server offers) before anything is sent, and every reply's
//!   cookie; after any protocol or socket error the connection is broken for good, never
//!   half in step with the server.
//!
//! Everything read from the server is bounded before it is used: no length it sends makes
//! the client allocate more than 64 KiB during the handshake, and a read's payload is only
//! ever the length the client asked for, or a chunk of it. Nothing here panics on what a server sends, and
//! every socket has a timeout, so a server that stops talking is an error, not a hang.
//!
//! # Example
//! ```no_run
//! let uri: nbd::Uri = "nbd+unix:///disk0?socket=/run/qsd.sock".parse()?;
//! let mut client = nbd::Client::connect(&uri)?;
//! let mut buf = vec![0u8; 4096];
//! client.read(0, &mut buf)?;
//! if !client.export().flags.read_only() {
//!     client.write(4096, &buf, false)?;
//!     client.flush()?;
//! }
//! client.disconnect()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(missing_docs)]
#![forbid(unsafe_code)]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod client;
pub mod handshake;
mod socket;
pub mod structured;
pub mod uri;
pub mod wire;

pub use client::{Client, ClientError, Stream};
pub use handshake::{BlockSize, Export, HandshakeError, Negotiated, TransmissionFlags};
pub use socket::SocketError;
pub use uri::{Transport, UnixSocket, Uri, UriError};
pub use wire::{Command, NbdError, Request, RequestError, SimpleReply, WireError};
