//! The client's side of NBD's fixed-newstyle handshake (proto.md, "Fixed newstyle
//! negotiation"), over any `Read + Write`:
//!
//! 1. The server's greeting: `NBDMAGIC`, `IHAVEOPT`, the handshake flags. An oldstyle
//!    server (`cliserv_magic` instead of `IHAVEOPT`) is refused.
//! 2. The client flags: `NBD_FLAG_C_FIXED_NEWSTYLE` when the server is fixed-newstyle,
//!    `NBD_FLAG_C_NO_ZEROES` when it offers `NBD_FLAG_NO_ZEROES`; nothing else.
//! 3. `NBD_OPT_STRUCTURED_REPLY` (fixed-newstyle servers only): `NBD_REP_ACK` means the
//!    server answers reads with structured replies ([`crate::structured`],
//!    [`Export::structured_replies`]); an error reply (`NBD_REP_ERR_UNSUP` from a server
//!    without them) means simple replies only, and the handshake goes on.
//! 4. `NBD_OPT_GO` with the export name and one information request, `NBD_INFO_BLOCK_SIZE`:
//!    the client promises to keep the server's size constraints. The server answers with
//!    `NBD_REP_INFO` replies (`NBD_INFO_EXPORT`: size and transmission flags;
//!    `NBD_INFO_BLOCK_SIZE`), then `NBD_REP_ACK`, and transmission begins; an error reply is
//!    a [`HandshakeError::Refused`], after which the client aborts (`NBD_OPT_ABORT`).
//! 5. Only when the server answers `NBD_REP_ERR_UNSUP` to `NBD_OPT_GO` (or is not
//!    fixed-newstyle at all) does the client fall back to `NBD_OPT_EXPORT_NAME`, whose answer
//!    is the size and flags, then 124 zero bytes unless `NO_ZEROES` was agreed.
//!
//! Every length the server sends is bounded before anything is allocated for it (an option
//! reply's payload at [`MAX_OPTION_REPLY`] bytes), and so is the number of replies to one
//! option ([`MAX_REPLIES`]), so a hostile server can make the handshake fail, not grow or
//! loop. The timeouts are the caller's, set on the socket.

use std::fmt;
use std::io::{Read, Write};

use crate::socket::{read_array, read_exact, write_all, SocketError};

/// The first magic of every newstyle (and oldstyle) greeting: ASCII `NBDMAGIC`.
pub const NBDMAGIC: u64 = 0x4e42444d41474943;
/// The second magic of a newstyle greeting, and the magic of every option the client
/// sends: ASCII `IHAVEOPT`.
pub const IHAVEOPT: u64 = 0x49484156454F5054;
/// The second magic of an oldstyle greeting (`cliserv_magic`), which this client refuses.
pub const CLISERV_MAGIC: u64 = 0x00420281861253;
/// The magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x3e889045565a9;

/// Handshake flag: the server speaks fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server can leave out the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: the server is to leave out the 124 zero bytes.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Option: choose an export and enter transmission, with no way to report an error.
pub const OPT_EXPORT_NAME: u32 = 1;
/// Option: end the negotiation.
pub const OPT_ABORT: u32 = 2;
/// Option: choose an export, learn its details, and enter transmission.
pub const OPT_GO: u32 = 7;
/// Option: structured replies in the transmission phase.
pub const OPT_STRUCTURED_REPLY: u32 = 8;

/// Option reply: the option succeeded (for `NBD_OPT_GO`: transmission begins).
pub const REP_ACK: u32 = 1;
/// Option reply: one piece of information about the export.
pub const REP_INFO: u32 = 3;
/// Set in every error reply's type.
pub const REP_FLAG_ERROR: u32 = 1 << 31;
/// Error reply: the server does not know the option.
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;

/// Information type: the export's size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// Information type: the export's block size constraints.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// The longest option reply payload accepted, in bytes. The replies this client reads are
/// 12 or 14 bytes, or an error message (at most 4096 bytes by the protocol).
pub const MAX_OPTION_REPLY: u32 = 64 * 1024;
/// The most replies accepted to one option before its final one.
pub const MAX_REPLIES: usize = 64;
/// The longest export name NBD allows, in bytes.
pub const MAX_EXPORT_NAME: usize = 4096;
/// The payload limit a server that advertises no block sizes supports (proto.md: "a
/// maximum payload size that is at least 2^25").
pub const DEFAULT_MAX_PAYLOAD: u32 = 1 << 25;

/// The export the server agreed to serve: what the client must know to use it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Export {
    /// The export's size in bytes.
    pub size: u64,
    /// What the server allows and offers.
    pub flags: TransmissionFlags,
    /// The size constraints every request must keep.
    pub block_size: BlockSize,
    /// Which option entered transmission.
    pub via: Negotiated,
    /// Structured replies were negotiated: reads are answered with chunks
    /// ([`crate::structured`]).
    pub structured_replies: bool,
}

/// Which option ended the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Negotiated {
    /// `NBD_OPT_GO`, with the block sizes requested.
    Go,
    /// `NBD_OPT_EXPORT_NAME`: the server did not know `NBD_OPT_GO`.
    ExportName,
}

/// An export's size constraints (proto.md, "Size constraints"): every request's offset and
/// length a multiple of `minimum`, ideally of `preferred`, a read's or write's length at most
/// `maximum`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSize {
    /// The smallest addressable unit: a power of two from 1 to 64 KiB.
    pub minimum: u32,
    /// The size (a power of two, at least 512 and at least `minimum`) from which requests
    /// are efficient.
    pub preferred: u32,
    /// The longest read or write payload the server takes (`u32::MAX`: no fixed limit).
    pub maximum: u32,
    /// Whether the server sent these (`NBD_INFO_BLOCK_SIZE`), or they are the protocol's
    /// defaults (1, 4096, 32 MiB).
    pub advertised: bool,
}

impl BlockSize {
    /// The protocol's defaults for a server that advertises none.
    pub const DEFAULT: Self = Self {
        minimum: 1,
        preferred: 4096,
        maximum: DEFAULT_MAX_PAYLOAD,
        advertised: false,
    };

    /// Whether these constraints are ones the protocol allows a server to advertise.
    pub fn is_valid(&self) -> bool {
        self.minimum.is_power_of_two()
            && self.minimum <= 1 << 16
            && self.preferred.is_power_of_two()
            && self.preferred >= self.minimum.max(512)
            && self.maximum >= self.preferred
    }
}

/// The 16 transmission flags the server sends with the export's size.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TransmissionFlags(u16);

impl TransmissionFlags {
    /// Always set by a server.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// The export is read-only.
    pub const READ_ONLY: u16 = 1 << 1;
    /// `NBD_CMD_FLUSH` is offered.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// `NBD_CMD_FLAG_FUA` is offered.
    pub const SEND_FUA: u16 = 1 << 3;
    /// The export behaves like a rotating disk.
    pub const ROTATIONAL: u16 = 1 << 4;
    /// `NBD_CMD_TRIM` is offered.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// `NBD_CMD_WRITE_ZEROES` is offered.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// `NBD_CMD_FLAG_DF` is offered (only with structured replies).
    pub const SEND_DF: u16 = 1 << 7;
    /// Several connections to the export see one another's flushed writes.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    /// `NBD_CMD_CACHE` is understood.
    pub const SEND_CACHE: u16 = 1 << 10;
    /// `NBD_CMD_FLAG_FAST_ZERO` is offered.
    pub const SEND_FAST_ZERO: u16 = 1 << 11;

    /// The flags as the server sent them.
    pub const fn from_bits(bits: u16) -> Self {
        Self(bits)
    }

    /// The flags as the server sent them.
    pub const fn bits(self) -> u16 {
        self.0
    }

    /// Whether every flag in `mask` is set.
    pub const fn contains(self, mask: u16) -> bool {
        self.0 & mask == mask
    }

    /// The export is read-only: the server fails every write.
    pub const fn read_only(self) -> bool {
        self.contains(Self::READ_ONLY)
    }

    /// The server takes `NBD_CMD_FLUSH`.
    pub const fn send_flush(self) -> bool {
        self.contains(Self::SEND_FLUSH)
    }

    /// The server takes `NBD_CMD_FLAG_FUA` on writes.
    pub const fn send_fua(self) -> bool {
        self.contains(Self::SEND_FUA)
    }

    /// The export behaves like a rotating disk.
    pub const fn rotational(self) -> bool {
        self.contains(Self::ROTATIONAL)
    }

    /// The server takes `NBD_CMD_TRIM`.
    pub const fn send_trim(self) -> bool {
        self.contains(Self::SEND_TRIM)
    }

    /// The server takes `NBD_CMD_WRITE_ZEROES`.
    pub const fn send_write_zeroes(self) -> bool {
        self.contains(Self::SEND_WRITE_ZEROES)
    }

    /// Several connections to this export may be used at once.
    pub const fn can_multi_conn(self) -> bool {
        self.contains(Self::CAN_MULTI_CONN)
    }
}

impl fmt::Debug for TransmissionFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const NAMES: [(u16, &str); 11] = [
            (TransmissionFlags::HAS_FLAGS, "HAS_FLAGS"),
            (TransmissionFlags::READ_ONLY, "READ_ONLY"),
            (TransmissionFlags::SEND_FLUSH, "SEND_FLUSH"),
            (TransmissionFlags::SEND_FUA, "SEND_FUA"),
            (TransmissionFlags::ROTATIONAL, "ROTATIONAL"),
            (TransmissionFlags::SEND_TRIM, "SEND_TRIM"),
            (TransmissionFlags::SEND_WRITE_ZEROES, "SEND_WRITE_ZEROES"),
            (TransmissionFlags::SEND_DF, "SEND_DF"),
            (TransmissionFlags::CAN_MULTI_CONN, "CAN_MULTI_CONN"),
            (TransmissionFlags::SEND_CACHE, "SEND_CACHE"),
            (TransmissionFlags::SEND_FAST_ZERO, "SEND_FAST_ZERO"),
        ];
        write!(f, "TransmissionFlags({:#06x}", self.0)?;
        for (bit, name) in NAMES {
            if self.contains(bit) {
                write!(f, " {name}")?;
            }
        }
        f.write_str(")")
    }
}

/// An error reply's type (the ones the protocol defines; any other is kept as a number).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepError {
    /// `NBD_REP_ERR_UNSUP`: the option is unknown to the server.
    Unsup,
    /// `NBD_REP_ERR_POLICY`: the server's policy forbids it.
    Policy,
    /// `NBD_REP_ERR_INVALID`: the option is invalid.
    Invalid,
    /// `NBD_REP_ERR_PLATFORM`: not supported on the server's platform.
    Platform,
    /// `NBD_REP_ERR_TLS_REQD`: the server requires TLS.
    TlsReqd,
    /// `NBD_REP_ERR_UNKNOWN`: no such export.
    Unknown,
    /// `NBD_REP_ERR_SHUTDOWN`: the server is shutting down.
    Shutdown,
    /// `NBD_REP_ERR_BLOCK_SIZE_REQD`: the client must ask for the block sizes.
    BlockSizeReqd,
    /// `NBD_REP_ERR_TOO_BIG`: the request or reply is too large.
    TooBig,
    /// Any other error type.
    Other(u32),
}

impl RepError {
    /// The error reply type `reply` (which has [`REP_FLAG_ERROR`] set).
    pub fn from_reply(reply: u32) -> Self {
        match reply & !REP_FLAG_ERROR {
            1 => Self::Unsup,
            2 => Self::Policy,
            3 => Self::Invalid,
            4 => Self::Platform,
            5 => Self::TlsReqd,
            6 => Self::Unknown,
            7 => Self::Shutdown,
            8 => Self::BlockSizeReqd,
            9 => Self::TooBig,
            _ => Self::Other(reply),
        }
    }
}

impl fmt::Display for RepError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (name, what) = match self {
            Self::Unsup => ("NBD_REP_ERR_UNSUP", "option not supported"),
            Self::Policy => ("NBD_REP_ERR_POLICY", "forbidden by the server's policy"),
            Self::Invalid => ("NBD_REP_ERR_INVALID", "invalid option"),
            Self::Platform => (
                "NBD_REP_ERR_PLATFORM",
                "not supported on the server's platform",
            ),
            Self::TlsReqd => ("NBD_REP_ERR_TLS_REQD", "the server requires TLS"),
            Self::Unknown => ("NBD_REP_ERR_UNKNOWN", "no such export"),
            Self::Shutdown => ("NBD_REP_ERR_SHUTDOWN", "the server is shutting down"),
            Self::BlockSizeReqd => (
                "NBD_REP_ERR_BLOCK_SIZE_REQD",
                "block sizes must be requested",
            ),
            Self::TooBig => ("NBD_REP_ERR_TOO_BIG", "request or reply too large"),
            Self::Other(n) => return write!(f, "error reply {n:#x}"),
        };
        write!(f, "{name} ({what})")
    }
}

/// Why the handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The socket failed or the server closed it.
    #[error("{0}")]
    Socket(#[from] SocketError),
    /// A magic number is wrong: not an NBD server, or not in step with one.
    #[error("bad magic in the server's {what}: {got:#x}, expected {expected:#x} (is this an NBD server?)")]
    BadMagic {
        /// Which message.
        what: &'static str,
        /// What the protocol says.
        expected: u64,
        /// What the server sent.
        got: u64,
    },
    /// The server speaks oldstyle negotiation (no export names, no options).
    #[error("the server uses oldstyle negotiation, which this client does not support")]
    Oldstyle,
    /// The export name is longer than NBD allows or contains NUL.
    #[error(
        "invalid export name: {0} bytes, or a NUL byte (at most {MAX_EXPORT_NAME} bytes, no NUL)"
    )]
    ExportName(usize),
    /// An option reply answers an option the client did not send.
    #[error("the server answered option {got} to option {sent}")]
    WrongOption {
        /// The option sent.
        sent: u32,
        /// The option the reply names.
        got: u32,
    },
    /// An option reply's payload is longer than [`MAX_OPTION_REPLY`].
    #[error("an option reply of {0} bytes, more than the {MAX_OPTION_REPLY} accepted")]
    ReplyTooLong(u32),
    /// More than [`MAX_REPLIES`] replies to one option.
    #[error("more than {MAX_REPLIES} replies to one option")]
    TooManyReplies,
    /// The server refused the option with an error reply.
    #[error("the server refused {option}: {error}, message {message:?}")]
    Refused {
        /// The option.
        option: &'static str,
        /// The error reply.
        error: RepError,
        /// The server's message (lossily decoded).
        message: String,
    },
    /// A reply type the option does not allow.
    #[error("unexpected reply type {reply:#x} to {option}")]
    UnexpectedReply {
        /// The option.
        option: &'static str,
        /// The reply type.
        reply: u32,
    },
    /// An `NBD_REP_INFO` whose length does not fit its type.
    #[error("NBD_REP_INFO type {info} of {len} bytes, the protocol says {expected}")]
    InfoLength {
        /// The information type.
        info: u16,
        /// The payload's length (with the 2-byte type).
        len: usize,
        /// The length the protocol gives it.
        expected: usize,
    },
    /// An `NBD_REP_ACK` carrying a payload.
    #[error("NBD_REP_ACK with a {0}-byte payload (it has none)")]
    AckPayload(usize),
    /// `NBD_REP_ACK` to `NBD_OPT_GO` without `NBD_INFO_EXPORT` before it.
    #[error("the server accepted NBD_OPT_GO without sending the export's size (NBD_INFO_EXPORT)")]
    NoExportInfo,
    /// Transmission flags without `NBD_FLAG_HAS_FLAGS`.
    #[error("transmission flags {0:#06x} lack NBD_FLAG_HAS_FLAGS")]
    NoFlags(u16),
    /// Block size constraints the protocol does not allow.
    #[error("invalid block sizes: minimum {}, preferred {}, maximum {}", .0.minimum, .0.preferred, .0.maximum)]
    InvalidBlockSize(BlockSize),
    /// The server closed the connection after `NBD_OPT_EXPORT_NAME`: its way of refusing.
    #[error("the server closed the connection after NBD_OPT_EXPORT_NAME {0:?}: no such export, or refused")]
    ExportNameRefused(String),
}

/// Negotiates `export_name` with the server at the other end of `stream`, which has just
/// connected. On success the stream is in the transmission phase.
///
/// # Errors
/// A [`HandshakeError`]: the socket failed or timed out, the server is not a newstyle NBD
/// server, refused the export, or broke the protocol.
pub fn negotiate<S: Read + Write>(
    stream: &mut S,
    export_name: &str,
) -> Result<Export, HandshakeError> {
    if export_name.len() > MAX_EXPORT_NAME || export_name.contains('\0') {
        return Err(HandshakeError::ExportName(export_name.len()));
    }
    let magic = u64::from_be_bytes(read_array(stream, "reading the server's greeting")?);
    if magic != NBDMAGIC {
        return Err(HandshakeError::BadMagic {
            what: "greeting",
            expected: NBDMAGIC,
            got: magic,
        });
    }
    match u64::from_be_bytes(read_array(stream, "reading the server's greeting")?) {
        IHAVEOPT => {}
        CLISERV_MAGIC => return Err(HandshakeError::Oldstyle),
        got => {
            return Err(HandshakeError::BadMagic {
                what: "newstyle greeting",
                expected: IHAVEOPT,
                got,
            })
        }
    }
    let flags = u16::from_be_bytes(read_array(stream, "reading the handshake flags")?);
    let fixed = flags & FLAG_FIXED_NEWSTYLE != 0;
    let no_zeroes = flags & FLAG_NO_ZEROES != 0;
    let mut client_flags = 0;
    if fixed {
        client_flags |= FLAG_C_FIXED_NEWSTYLE;
    }
    if no_zeroes {
        client_flags |= FLAG_C_NO_ZEROES;
    }
    write_all(
        stream,
        &client_flags.to_be_bytes(),
        "sending the client flags",
    )?;
    let structured_replies = fixed && structured_reply(stream)?;
    let export = match fixed {
        true => go(stream, export_name)?,
        false => None,
    };
    let export = match export {
        Some(export) => export,
        None => export_name_option(stream, export_name, no_zeroes)?,
    };
    Ok(Export {
        structured_replies,
        ..export
    })
}

/// `NBD_OPT_STRUCTURED_REPLY`: whether the server agreed.
fn structured_reply<S: Read + Write>(stream: &mut S) -> Result<bool, HandshakeError> {
    send_option(stream, OPT_STRUCTURED_REPLY, &[])?;
    match read_reply(stream, OPT_STRUCTURED_REPLY)? {
        (REP_ACK, payload) if payload.is_empty() => Ok(true),
        (REP_ACK, payload) => Err(HandshakeError::AckPayload(payload.len())),
        (error, _) if error & REP_FLAG_ERROR != 0 => Ok(false),
        (reply, _) => Err(HandshakeError::UnexpectedReply {
            option: "NBD_OPT_STRUCTURED_REPLY",
            reply,
        }),
    }
}

/// `NBD_OPT_GO`; `None` when the server does not know it.
fn go<S: Read + Write>(stream: &mut S, name: &str) -> Result<Option<Export>, HandshakeError> {
    let name_len = u32::try_from(name.len()).map_err(|_| HandshakeError::ExportName(name.len()))?;
    let mut data = Vec::with_capacity(name.len() + 8);
    data.extend_from_slice(&name_len.to_be_bytes());
    data.extend_from_slice(name.as_bytes());
    data.extend_from_slice(&1u16.to_be_bytes());
    data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    send_option(stream, OPT_GO, &data)?;

    let mut export = None;
    let mut block_size = None;
    for _ in 0..=MAX_REPLIES {
        let (reply, payload) = read_reply(stream, OPT_GO)?;
        match reply {
            REP_INFO => parse_info(&payload, &mut export, &mut block_size)?,
            REP_ACK if !payload.is_empty() => {
                return Err(HandshakeError::AckPayload(payload.len()))
            }
            REP_ACK => {
                let (size, flags) = export.ok_or(HandshakeError::NoExportInfo)?;
                return Export::new(size, flags, block_size, Negotiated::Go).map(Some);
            }
            REP_ERR_UNSUP => return Ok(None),
            error if error & REP_FLAG_ERROR != 0 => {
                // A soft disconnect, as proto.md asks of a client that gives up; the
                // server's answer (if any) is not awaited.
                let _ = send_option(stream, OPT_ABORT, &[]);
                return Err(HandshakeError::Refused {
                    option: "NBD_OPT_GO",
                    error: RepError::from_reply(error),
                    message: String::from_utf8_lossy(&payload).into_owned(),
                });
            }
            reply => {
                return Err(HandshakeError::UnexpectedReply {
                    option: "NBD_OPT_GO",
                    reply,
                })
            }
        }
    }
    Err(HandshakeError::TooManyReplies)
}

/// One `NBD_REP_INFO` payload: the export's size and flags, or its block sizes; other
/// types are ignored, as the protocol asks.
fn parse_info(
    payload: &[u8],
    export: &mut Option<(u64, u16)>,
    block_size: &mut Option<BlockSize>,
) -> Result<(), HandshakeError> {
    let Some((info, rest)) = payload.split_first_chunk::<2>() else {
        return Err(HandshakeError::InfoLength {
            info: 0,
            len: payload.len(),
            expected: 2,
        });
    };
    let info = u16::from_be_bytes(*info);
    let wrong_length = |expected| HandshakeError::InfoLength {
        info,
        len: payload.len(),
        expected,
    };
    match info {
        INFO_EXPORT => {
            let Some(([size @ .., f0, f1], [])) = rest.split_first_chunk::<10>() else {
                return Err(wrong_length(12));
            };
            let size: [u8; 8] = *size;
            *export = Some((u64::from_be_bytes(size), u16::from_be_bytes([*f0, *f1])));
        }
        INFO_BLOCK_SIZE => {
            let Some((&[a0, a1, a2, a3, b0, b1, b2, b3, c0, c1, c2, c3], [])) =
                rest.split_first_chunk::<12>()
            else {
                return Err(wrong_length(14));
            };
            *block_size = Some(BlockSize {
                minimum: u32::from_be_bytes([a0, a1, a2, a3]),
                preferred: u32::from_be_bytes([b0, b1, b2, b3]),
                maximum: u32::from_be_bytes([c0, c1, c2, c3]),
                advertised: true,
            });
        }
        _ => {}
    }
    Ok(())
}

/// `NBD_OPT_EXPORT_NAME`, for a server without `NBD_OPT_GO`.
fn export_name_option<S: Read + Write>(
    stream: &mut S,
    name: &str,
    no_zeroes: bool,
) -> Result<Export, HandshakeError> {
    send_option(stream, OPT_EXPORT_NAME, name.as_bytes())?;
    let refused = |e: SocketError| match e {
        SocketError::Closed(_) => HandshakeError::ExportNameRefused(name.to_owned()),
        e => HandshakeError::Socket(e),
    };
    let size = read_array(stream, "reading the export's size").map_err(refused)?;
    let flags = read_array(stream, "reading the transmission flags")?;
    if !no_zeroes {
        read_exact(
            stream,
            &mut [0u8; 124],
            "reading the handshake's zero padding",
        )?;
    }
    Export::new(
        u64::from_be_bytes(size),
        u16::from_be_bytes(flags),
        None,
        Negotiated::ExportName,
    )
}

fn send_option<S: Write>(stream: &mut S, option: u32, data: &[u8]) -> Result<(), HandshakeError> {
    let len = u32::try_from(data.len()).map_err(|_| HandshakeError::ExportName(data.len()))?;
    let mut message = Vec::with_capacity(16 + data.len());
    message.extend_from_slice(&IHAVEOPT.to_be_bytes());
    message.extend_from_slice(&option.to_be_bytes());
    message.extend_from_slice(&len.to_be_bytes());
    message.extend_from_slice(data);
    Ok(write_all(stream, &message, "sending an option")?)
}

/// Reads one option reply to `option`: its type and its payload.
fn read_reply<S: Read>(stream: &mut S, option: u32) -> Result<(u32, Vec<u8>), HandshakeError> {
    let during = "reading an option reply";
    let magic = u64::from_be_bytes(read_array(stream, during)?);
    if magic != OPTION_REPLY_MAGIC {
        return Err(HandshakeError::BadMagic {
            what: "option reply",
            expected: OPTION_REPLY_MAGIC,
            got: magic,
        });
    }
    let got = u32::from_be_bytes(read_array(stream, during)?);
    if got != option {
        return Err(HandshakeError::WrongOption { sent: option, got });
    }
    let reply = u32::from_be_bytes(read_array(stream, during)?);
    let len = u32::from_be_bytes(read_array(stream, during)?);
    if len > MAX_OPTION_REPLY {
        return Err(HandshakeError::ReplyTooLong(len));
    }
    // Bounded just above, so the cast cannot truncate.
    let mut payload = vec![0u8; len as usize];
    read_exact(stream, &mut payload, "reading an option reply's payload")?;
    Ok((reply, payload))
}

impl Export {
    /// Checks what the server sent and fills in the default block sizes.
    fn new(
        size: u64,
        flags: u16,
        block_size: Option<BlockSize>,
        via: Negotiated,
    ) -> Result<Self, HandshakeError> {
        let flags = TransmissionFlags::from_bits(flags);
        if !flags.contains(TransmissionFlags::HAS_FLAGS) {
            return Err(HandshakeError::NoFlags(flags.bits()));
        }
        let block_size = block_size.unwrap_or(BlockSize::DEFAULT);
        if !block_size.is_valid() {
            return Err(HandshakeError::InvalidBlockSize(block_size));
        }
        Ok(Self {
            size,
            flags,
            block_size,
            via,
            structured_replies: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::io;

    /// A server's whole side of the conversation, played back; what the client sends is
    /// kept.
    struct Replay {
        input: io::Cursor<Vec<u8>>,
        sent: Vec<u8>,
    }

    impl Read for Replay {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.input.read(buf)
        }
    }

    impl Write for Replay {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.sent.extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn play(input: Vec<u8>) -> (Result<Export, HandshakeError>, Vec<u8>) {
        let mut replay = Replay {
            input: io::Cursor::new(input),
            sent: Vec::new(),
        };
        let result = negotiate(&mut replay, "disk");
        (result, replay.sent)
    }

    fn greeting(flags: u16) -> Vec<u8> {
        let mut v = NBDMAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&IHAVEOPT.to_be_bytes());
        v.extend_from_slice(&flags.to_be_bytes());
        v
    }

    fn option_reply(v: &mut Vec<u8>, reply: u32, payload: &[u8]) {
        option_reply_to(v, OPT_GO, reply, payload);
    }

    fn option_reply_to(v: &mut Vec<u8>, option: u32, reply: u32, payload: &[u8]) {
        v.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
        v.extend_from_slice(&option.to_be_bytes());
        v.extend_from_slice(&reply.to_be_bytes());
        v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        v.extend_from_slice(payload);
    }

    #[test]
    fn go_asks_for_block_sizes_and_reads_the_export() {
        let mut input = greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        option_reply_to(&mut input, OPT_STRUCTURED_REPLY, REP_ACK, &[]);
        let mut info = INFO_EXPORT.to_be_bytes().to_vec();
        info.extend_from_slice(&(1u64 << 30).to_be_bytes());
        info.extend_from_slice(&0x012du16.to_be_bytes());
        option_reply(&mut input, REP_INFO, &[0, 2, b'h', b'i']);
        option_reply(&mut input, REP_INFO, &info);
        option_reply(&mut input, REP_ACK, &[]);
        let (result, sent) = play(input);
        let export = result.unwrap();
        assert_eq!(export.size, 1 << 30);
        assert!(export.flags.send_flush() && export.flags.send_fua() && export.flags.send_trim());
        assert!(export.flags.can_multi_conn() && !export.flags.read_only());
        assert_eq!(
            (export.block_size, export.via, export.structured_replies),
            (BlockSize::DEFAULT, Negotiated::Go, true)
        );
        let mut expected = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
            .to_be_bytes()
            .to_vec();
        expected.extend_from_slice(&IHAVEOPT.to_be_bytes());
        expected.extend_from_slice(&OPT_STRUCTURED_REPLY.to_be_bytes());
        expected.extend_from_slice(&0u32.to_be_bytes());
        expected.extend_from_slice(&IHAVEOPT.to_be_bytes());
        expected.extend_from_slice(&OPT_GO.to_be_bytes());
        expected.extend_from_slice(&12u32.to_be_bytes());
        expected.extend_from_slice(&4u32.to_be_bytes());
        expected.extend_from_slice(b"disk");
        expected.extend_from_slice(&[0, 1, 0, 3]);
        assert_eq!(sent, expected);
    }

    #[test]
    fn a_server_without_structured_replies_gets_simple_ones() {
        let mut input = greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        option_reply_to(&mut input, OPT_STRUCTURED_REPLY, REP_ERR_UNSUP, b"no");
        let mut info = INFO_EXPORT.to_be_bytes().to_vec();
        info.extend_from_slice(&(1u64 << 20).to_be_bytes());
        info.extend_from_slice(&1u16.to_be_bytes());
        option_reply(&mut input, REP_INFO, &info);
        option_reply(&mut input, REP_ACK, &[]);
        let export = play(input).0.unwrap();
        assert!(!export.structured_replies);
        assert_eq!(export.size, 1 << 20);
        // Anything but an ACK or an error to the option is a protocol error.
        let mut input = greeting(FLAG_FIXED_NEWSTYLE);
        option_reply_to(&mut input, OPT_STRUCTURED_REPLY, REP_INFO, &[]);
        assert!(matches!(
            play(input).0,
            Err(HandshakeError::UnexpectedReply {
                reply: REP_INFO,
                ..
            })
        ));
    }

    #[test]
    fn export_names_nbd_cannot_carry_are_refused_before_connecting() {
        let mut replay = Replay {
            input: io::Cursor::new(Vec::new()),
            sent: Vec::new(),
        };
        let long = "x".repeat(MAX_EXPORT_NAME + 1);
        assert!(matches!(
            negotiate(&mut replay, &long),
            Err(HandshakeError::ExportName(4097))
        ));
        assert!(matches!(
            negotiate(&mut replay, "a\0b"),
            Err(HandshakeError::ExportName(3))
        ));
        assert!(replay.sent.is_empty());
    }

    /// A reply the property below strings together: mostly well-formed, some not.
    fn any_reply() -> impl Strategy<Value = (u32, Vec<u8>)> {
        let export = (any::<u64>(), any::<u16>()).prop_map(|(size, flags)| {
            let mut p = INFO_EXPORT.to_be_bytes().to_vec();
            p.extend_from_slice(&size.to_be_bytes());
            p.extend_from_slice(&flags.to_be_bytes());
            p
        });
        let block = (any::<u32>(), any::<u32>(), any::<u32>()).prop_map(|(a, b, c)| {
            let mut p = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
            for v in [a, b, c] {
                p.extend_from_slice(&v.to_be_bytes());
            }
            p
        });
        let payload = prop_oneof![export, block, proptest::collection::vec(any::<u8>(), 0..20),];
        let reply = prop_oneof![
            Just(REP_ACK),
            Just(REP_INFO),
            Just(REP_ERR_UNSUP),
            Just(REP_FLAG_ERROR | 6),
            any::<u32>(),
        ];
        (reply, payload)
    }

    proptest! {
        #[test]
        fn negotiate_never_panics_on_replies(
            flags: u16,
            structured in prop_oneof![Just(REP_ACK), Just(REP_ERR_UNSUP), any::<u32>()],
            replies in proptest::collection::vec(any_reply(), 0..8),
            tail in proptest::collection::vec(any::<u8>(), 0..160),
        ) {
            let mut input = greeting(flags);
            if flags & FLAG_FIXED_NEWSTYLE != 0 {
                option_reply_to(&mut input, OPT_STRUCTURED_REPLY, structured, &[]);
            }
            for (reply, payload) in &replies {
                option_reply(&mut input, *reply, payload);
            }
            input.extend_from_slice(&tail);
            if let (Ok(export), _) = play(input) {
                prop_assert!(export.block_size.is_valid());
                prop_assert!(export.flags.contains(TransmissionFlags::HAS_FLAGS));
            }
        }

        #[test]
        fn negotiate_never_panics_on_bytes(
            start in 0usize..3,
            tail in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let mut input = match start {
                0 => Vec::new(),
                1 => greeting(FLAG_FIXED_NEWSTYLE),
                _ => greeting(0),
            };
            input.extend_from_slice(&tail);
            let _ = play(input);
        }
    }

    #[test]
    fn block_size_rules() {
        let ok = |minimum, preferred, maximum| {
            BlockSize {
                minimum,
                preferred,
                maximum,
                advertised: true,
            }
            .is_valid()
        };
        assert!(BlockSize::DEFAULT.is_valid());
        assert!(ok(1, 512, 512));
        assert!(ok(512, 4096, u32::MAX));
        assert!(ok(65536, 65536, 1 << 25));
        assert!(!ok(0, 4096, 1 << 25));
        assert!(!ok(3, 4096, 1 << 25));
        assert!(!ok(1 << 17, 1 << 17, 1 << 25));
        assert!(!ok(512, 256, 1 << 25));
        assert!(!ok(4096, 2048, 1 << 25));
        assert!(!ok(512, 4096, 4095));
    }

    #[test]
    fn info_replies() {
        let mut export = None;
        let mut bs = None;
        let mut p = INFO_EXPORT.to_be_bytes().to_vec();
        p.extend_from_slice(&(1u64 << 30).to_be_bytes());
        p.extend_from_slice(&0x0103u16.to_be_bytes());
        parse_info(&p, &mut export, &mut bs).unwrap();
        assert_eq!(export, Some((1 << 30, 0x0103)));
        p.push(0);
        assert!(matches!(
            parse_info(&p, &mut export, &mut bs),
            Err(HandshakeError::InfoLength {
                info: 0,
                len: 13,
                expected: 12
            })
        ));
        let mut p = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        for v in [512u32, 4096, 1 << 25] {
            p.extend_from_slice(&v.to_be_bytes());
        }
        parse_info(&p, &mut export, &mut bs).unwrap();
        assert_eq!(
            bs.map(|b| (b.minimum, b.preferred, b.maximum)),
            Some((512, 4096, 1 << 25))
        );
        assert!(parse_info(&p[..13], &mut export, &mut bs).is_err());
        assert!(parse_info(&[0], &mut export, &mut bs).is_err());
        // Unknown information types are ignored.
        parse_info(&[0, 1, b'x'], &mut export, &mut bs).unwrap();
    }

    #[test]
    fn flags_debug_names_the_bits() {
        let f = TransmissionFlags::from_bits(0x0103);
        assert_eq!(
            format!("{f:?}"),
            "TransmissionFlags(0x0103 HAS_FLAGS READ_ONLY CAN_MULTI_CONN)"
        );
        assert!(f.read_only() && f.can_multi_conn() && !f.send_flush());
    }
}
