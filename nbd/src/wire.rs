//! The transmission phase's messages, without I/O (proto.md, "Transmission"): a request
//! header is 28 bytes, a simple reply 16. Whoever owns the socket (the blocking
//! [`Client`](crate::Client), or a backend queue's io_uring) moves the bytes; this module only
//! turns them into values and back, and checks a request against the [`Export`] before it is
//! sent ([`Export::check`]).
//!
//! Simple replies are here: without structured replies (`NBD_OPT_STRUCTURED_REPLY`, see
//! [`crate::structured`]) the server answers every request with one, followed, for a
//! successful `NBD_CMD_READ`, by exactly the requested length of data; a structured reply's
//! magic is then an error ([`WireError::StructuredReply`]). With structured replies, a read is
//! never answered with a simple reply ([`WireError::SimpleReadReply`]); other commands may
//! be.
//!
//! The cookie (the protocol's old "handle") is the client's: the server echoes it, and the
//! client uses it to find the request a reply answers (a ring slot, for the backend).
//!
//! ```
//! use nbd::wire::{Command, Request, SimpleReply, FLAG_FUA};
//!
//! let req = Request { flags: FLAG_FUA, command: Command::Write, cookie: 7, offset: 4096, length: 512 };
//! let bytes = req.encode();
//! assert_eq!(bytes[..4], [0x25u8, 0x60, 0x95, 0x13]);
//! assert_eq!(Request::decode(&bytes), Ok(req));
//!
//! let reply = SimpleReply::decode(&[0x67, 0x44, 0x66, 0x98, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7]);
//! assert_eq!(reply, Ok(SimpleReply { error: None, cookie: 7 }));
//! ```

use std::fmt;

use crate::handshake::Export;

/// The magic of every request.
pub const REQUEST_MAGIC: u32 = 0x25609513;
/// The magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x67446698;
/// The magic of a structured reply chunk ([`crate::structured`]).
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e33ef;
/// A request header's length.
pub const REQUEST_LEN: usize = 28;
/// A simple reply's length (before a read's data).
pub const SIMPLE_REPLY_LEN: usize = 16;

/// Command flag: the server replies only once the write is on stable storage.
pub const FLAG_FUA: u16 = 1 << 0;
/// Command flag (`NBD_CMD_WRITE_ZEROES` only): allocate, do not punch a hole.
pub const FLAG_NO_HOLE: u16 = 1 << 1;

/// A request type this client sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    /// `NBD_CMD_READ`.
    Read,
    /// `NBD_CMD_WRITE`: the data follows the header.
    Write,
    /// `NBD_CMD_DISC`: the end of the session; no reply.
    Disc,
    /// `NBD_CMD_FLUSH`.
    Flush,
    /// `NBD_CMD_TRIM`.
    Trim,
    /// `NBD_CMD_WRITE_ZEROES`.
    WriteZeroes,
}

impl Command {
    /// The type's number on the wire.
    pub const fn to_u16(self) -> u16 {
        match self {
            Self::Read => 0,
            Self::Write => 1,
            Self::Disc => 2,
            Self::Flush => 3,
            Self::Trim => 4,
            Self::WriteZeroes => 6,
        }
    }

    /// The command numbered `n`, if it is one of these.
    pub const fn from_u16(n: u16) -> Option<Self> {
        Some(match n {
            0 => Self::Read,
            1 => Self::Write,
            2 => Self::Disc,
            3 => Self::Flush,
            4 => Self::Trim,
            6 => Self::WriteZeroes,
            _ => return None,
        })
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Read => "NBD_CMD_READ",
            Self::Write => "NBD_CMD_WRITE",
            Self::Disc => "NBD_CMD_DISC",
            Self::Flush => "NBD_CMD_FLUSH",
            Self::Trim => "NBD_CMD_TRIM",
            Self::WriteZeroes => "NBD_CMD_WRITE_ZEROES",
        })
    }
}

/// A request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags ([`FLAG_FUA`], [`FLAG_NO_HOLE`]).
    pub flags: u16,
    /// The request type.
    pub command: Command,
    /// The client's cookie, echoed in the reply.
    pub cookie: u64,
    /// The byte offset in the export.
    pub offset: u64,
    /// The length in bytes (for a write, of the data that follows).
    pub length: u32,
}

impl Request {
    /// The header as it goes on the wire.
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.command.to_u16().to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    /// Reads a header (what a server does; tests' fake servers use it).
    ///
    /// # Errors
    /// A wrong magic or a command this client does not know.
    pub fn decode(b: &[u8; REQUEST_LEN]) -> Result<Self, WireError> {
        let [m0, m1, m2, m3, f0, f1, t0, t1, rest @ ..] = *b;
        let [c0, c1, c2, c3, c4, c5, c6, c7, o0, o1, o2, o3, o4, o5, o6, o7, length @ ..] = rest;
        let magic = u32::from_be_bytes([m0, m1, m2, m3]);
        if magic != REQUEST_MAGIC {
            return Err(WireError::RequestMagic(magic));
        }
        let command = u16::from_be_bytes([t0, t1]);
        Ok(Self {
            flags: u16::from_be_bytes([f0, f1]),
            command: Command::from_u16(command).ok_or(WireError::UnknownCommand(command))?,
            cookie: u64::from_be_bytes([c0, c1, c2, c3, c4, c5, c6, c7]),
            offset: u64::from_be_bytes([o0, o1, o2, o3, o4, o5, o6, o7]),
            length: u32::from_be_bytes(length),
        })
    }
}

/// A simple reply: the request's cookie and its outcome. After a successful read the
/// requested length of data follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    /// `None` for success.
    pub error: Option<NbdError>,
    /// The request's cookie.
    pub cookie: u64,
}

impl SimpleReply {
    /// Reads a simple reply.
    ///
    /// # Errors
    /// Anything but the simple reply magic ([`WireError::StructuredReply`] for a structured
    /// reply's).
    pub fn decode(b: &[u8; SIMPLE_REPLY_LEN]) -> Result<Self, WireError> {
        let [m0, m1, m2, m3, e0, e1, e2, e3, cookie @ ..] = *b;
        match u32::from_be_bytes([m0, m1, m2, m3]) {
            SIMPLE_REPLY_MAGIC => {}
            STRUCTURED_REPLY_MAGIC => return Err(WireError::StructuredReply),
            magic => return Err(WireError::ReplyMagic(magic)),
        }
        Ok(Self {
            error: NbdError::from_u32(u32::from_be_bytes([e0, e1, e2, e3])),
            cookie: u64::from_be_bytes(cookie),
        })
    }

    /// The reply as it goes on the wire (what a server does; tests' fake servers use it).
    pub fn encode(&self) -> [u8; SIMPLE_REPLY_LEN] {
        let mut b = [0u8; SIMPLE_REPLY_LEN];
        b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&self.error.map_or(0, NbdError::to_u32).to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b
    }
}

/// The error of a failed request (proto.md, "Error values"). Values the protocol does not
/// define are kept; the protocol asks clients to treat them as `NBD_EINVAL`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NbdError {
    /// `NBD_EPERM`: operation not permitted (a write to a read-only export).
    Perm,
    /// `NBD_EIO`: input/output error.
    Io,
    /// `NBD_ENOMEM`: cannot allocate memory.
    NoMem,
    /// `NBD_EINVAL`: invalid argument.
    Inval,
    /// `NBD_ENOSPC`: no space left on device.
    NoSpc,
    /// `NBD_EOVERFLOW`: value too large.
    Overflow,
    /// `NBD_ENOTSUP`: operation not supported.
    NotSup,
    /// `NBD_ESHUTDOWN`: the server is shutting down.
    Shutdown,
    /// Any other non-zero value.
    Other(u32),
}

impl NbdError {
    /// The error for a reply's error field; `None` for 0 (success).
    pub const fn from_u32(n: u32) -> Option<Self> {
        Some(match n {
            0 => return None,
            1 => Self::Perm,
            5 => Self::Io,
            12 => Self::NoMem,
            22 => Self::Inval,
            28 => Self::NoSpc,
            75 => Self::Overflow,
            95 => Self::NotSup,
            108 => Self::Shutdown,
            n => Self::Other(n),
        })
    }

    /// The value on the wire.
    pub const fn to_u32(self) -> u32 {
        match self {
            Self::Perm => 1,
            Self::Io => 5,
            Self::NoMem => 12,
            Self::Inval => 22,
            Self::NoSpc => 28,
            Self::Overflow => 75,
            Self::NotSup => 95,
            Self::Shutdown => 108,
            Self::Other(n) => n,
        }
    }
}

impl fmt::Display for NbdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (name, what) = match self {
            Self::Perm => ("NBD_EPERM", "operation not permitted"),
            Self::Io => ("NBD_EIO", "input/output error"),
            Self::NoMem => ("NBD_ENOMEM", "cannot allocate memory"),
            Self::Inval => ("NBD_EINVAL", "invalid argument"),
            Self::NoSpc => ("NBD_ENOSPC", "no space left on device"),
            Self::Overflow => ("NBD_EOVERFLOW", "value too large"),
            Self::NotSup => ("NBD_ENOTSUP", "operation not supported"),
            Self::Shutdown => ("NBD_ESHUTDOWN", "server shutting down"),
            Self::Other(n) => return write!(f, "error {n} (not defined by NBD)"),
        };
        write!(f, "{name} ({what})")
    }
}

/// A message that breaks the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// A reply whose magic is neither reply magic.
    #[error("bad reply magic {0:#010x} (expected {SIMPLE_REPLY_MAGIC:#010x}): not in step with the server")]
    ReplyMagic(u32),
    /// A structured reply, which was not negotiated.
    #[error("the server sent a structured reply, which was not negotiated")]
    StructuredReply,
    /// A simple reply to a read after structured replies were negotiated.
    #[error("a simple reply to a read, after structured replies were negotiated")]
    SimpleReadReply,
    /// A chunk whose length its type does not allow.
    #[error("a structured reply chunk of type {kind:#x} with a payload of {length} bytes")]
    ChunkLength {
        /// The chunk's type.
        kind: u16,
        /// Its payload's length.
        length: u32,
    },
    /// `NBD_REPLY_TYPE_NONE` without `NBD_REPLY_FLAG_DONE`.
    #[error("NBD_REPLY_TYPE_NONE without NBD_REPLY_FLAG_DONE")]
    NoneNotDone,
    /// A chunk type this client does not know, without the error bit.
    #[error("unknown structured reply type {0}")]
    ChunkType(u16),
    /// A content chunk of no bytes.
    #[error("a content chunk of zero bytes")]
    EmptyChunk,
    /// An error chunk whose error is 0.
    #[error("an error chunk with error 0")]
    ErrorZero,
    /// Data or a hole in the reply to anything but a read.
    #[error("a content chunk in the reply to a command other than a read")]
    ContentNotRead,
    /// A chunk outside its request.
    #[error("a chunk of {len} bytes at {offset}, outside its request")]
    ChunkOutside {
        /// The chunk's offset.
        offset: u64,
        /// Its length.
        len: u32,
    },
    /// A content chunk over bytes an earlier one covered.
    #[error("a chunk of {len} bytes at {offset} overlaps an earlier one")]
    ChunkOverlap {
        /// The chunk's offset.
        offset: u64,
        /// Its length.
        len: u32,
    },
    /// A read's chunks scattered in more pieces than a server has reason for.
    #[error(
        "a read's chunks in more than {} disjoint pieces",
        crate::structured::MAX_PIECES
    )]
    Scattered,
    /// A reply of more chunks than a server has reason for.
    #[error("a reply of more than {} chunks", crate::structured::MAX_CHUNKS)]
    TooManyChunks,
    /// A read's last chunk came before all of its bytes were covered, with no error.
    #[error("a read's reply ended before all of its bytes came, without an error")]
    Incomplete,
    /// A request whose magic is wrong.
    #[error("bad request magic {0:#010x}")]
    RequestMagic(u32),
    /// A request type this client does not know.
    #[error("unknown request type {0}")]
    UnknownCommand(u16),
}

/// A request the client refuses to send, because the export does not allow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// A write, trim or write-zeroes to a read-only export.
    #[error("{0} refused: the export is read-only")]
    ReadOnly(Command),
    /// A command the server does not offer (flush, trim, write-zeroes).
    #[error("the server does not offer {0}")]
    NotOffered(Command),
    /// FUA on an export that does not offer it.
    #[error("the server does not offer FUA")]
    FuaNotOffered,
    /// A command flag this command does not take.
    #[error("command flags {flags:#x} are not valid for {command}")]
    Flags {
        /// The command.
        command: Command,
        /// Its flags.
        flags: u16,
    },
    /// A zero length for a command that needs one.
    #[error("{0} of zero bytes")]
    Empty(Command),
    /// A flush or disconnect with an offset or length (both must be zero).
    #[error("{0} takes no offset or length")]
    Range(Command),
    /// Past the end of the export.
    #[error("{length} bytes at {offset} reach past the export's end ({size} bytes)")]
    OutOfBounds {
        /// The offset.
        offset: u64,
        /// The length.
        length: u32,
        /// The export's size.
        size: u64,
    },
    /// Not aligned to the export's minimum block size.
    #[error("{length} bytes at {offset} are not aligned to the minimum block size {minimum}")]
    Unaligned {
        /// The offset.
        offset: u64,
        /// The length.
        length: u32,
        /// The minimum block size.
        minimum: u32,
    },
    /// A read or write longer than the server's maximum payload.
    #[error("a payload of {length} bytes, more than the server's maximum {maximum}")]
    TooLong {
        /// The length.
        length: u32,
        /// The maximum payload.
        maximum: u32,
    },
}

impl Export {
    /// Checks a request against what the server advertised, as the protocol requires of a
    /// client before it sends: the flags and commands offered, the read-only flag, the
    /// export's size, the block size constraints.
    ///
    /// # Errors
    /// The first rule `request` breaks.
    pub fn check(&self, request: &Request) -> Result<(), RequestError> {
        let Request {
            flags,
            command,
            offset,
            length,
            ..
        } = *request;
        let writes = matches!(
            command,
            Command::Write | Command::Trim | Command::WriteZeroes
        );
        let allowed = match command {
            Command::WriteZeroes => FLAG_FUA | FLAG_NO_HOLE,
            Command::Write | Command::Trim => FLAG_FUA,
            Command::Read | Command::Flush | Command::Disc => 0,
        };
        if flags & !allowed != 0 {
            return Err(RequestError::Flags { command, flags });
        }
        if flags & FLAG_FUA != 0 && !self.flags.send_fua() {
            return Err(RequestError::FuaNotOffered);
        }
        if writes && self.flags.read_only() {
            return Err(RequestError::ReadOnly(command));
        }
        let offered = match command {
            Command::Flush => self.flags.send_flush(),
            Command::Trim => self.flags.send_trim(),
            Command::WriteZeroes => self.flags.send_write_zeroes(),
            Command::Read | Command::Write | Command::Disc => true,
        };
        if !offered {
            return Err(RequestError::NotOffered(command));
        }
        if matches!(command, Command::Flush | Command::Disc) {
            return match (offset, length) {
                (0, 0) => Ok(()),
                _ => Err(RequestError::Range(command)),
            };
        }
        if length == 0 {
            return Err(RequestError::Empty(command));
        }
        let out_of_bounds = RequestError::OutOfBounds {
            offset,
            length,
            size: self.size,
        };
        match offset.checked_add(u64::from(length)) {
            Some(end) if end <= self.size => {}
            _ => return Err(out_of_bounds),
        }
        let minimum = self.block_size.minimum;
        if offset % u64::from(minimum) != 0 || length % minimum != 0 {
            return Err(RequestError::Unaligned {
                offset,
                length,
                minimum,
            });
        }
        if matches!(command, Command::Read | Command::Write) && length > self.block_size.maximum {
            return Err(RequestError::TooLong {
                length,
                maximum: self.block_size.maximum,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handshake::{BlockSize, Negotiated, TransmissionFlags as F};
    use proptest::prelude::*;

    fn export(flags: u16) -> Export {
        Export {
            size: 1 << 20,
            flags: F::from_bits(F::HAS_FLAGS | flags),
            block_size: BlockSize {
                minimum: 512,
                preferred: 4096,
                maximum: 64 * 1024,
                advertised: true,
            },
            via: Negotiated::Go,
            structured_replies: false,
        }
    }

    fn req(command: Command, flags: u16, offset: u64, length: u32) -> Request {
        Request {
            flags,
            command,
            cookie: 1,
            offset,
            length,
        }
    }

    #[test]
    fn layout_matches_the_protocol() {
        let b = req(
            Command::WriteZeroes,
            FLAG_FUA | FLAG_NO_HOLE,
            0x0102_0304_0506_0708,
            0x0a0b_0c0d,
        )
        .encode();
        assert_eq!(
            b,
            [
                0x25, 0x60, 0x95, 0x13, 0, 3, 0, 6, 0, 0, 0, 0, 0, 0, 0, 1, 1, 2, 3, 4, 5, 6, 7, 8,
                0x0a, 0x0b, 0x0c, 0x0d
            ]
        );
        let r = SimpleReply {
            error: Some(NbdError::NoSpc),
            cookie: 0xfeed,
        };
        assert_eq!(
            r.encode(),
            [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 28, 0, 0, 0, 0, 0, 0, 0xfe, 0xed]
        );
    }

    #[test]
    fn bad_magics() {
        let mut b = SimpleReply {
            error: None,
            cookie: 1,
        }
        .encode();
        b[0] = 0;
        assert_eq!(
            SimpleReply::decode(&b),
            Err(WireError::ReplyMagic(0x00446698))
        );
        b[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(SimpleReply::decode(&b), Err(WireError::StructuredReply));
        let mut r = req(Command::Read, 0, 0, 512).encode();
        r[7] = 5;
        assert_eq!(Request::decode(&r), Err(WireError::UnknownCommand(5)));
        r[0] = 0;
        assert_eq!(
            Request::decode(&r),
            Err(WireError::RequestMagic(0x00609513))
        );
    }

    #[test]
    fn errors_map_both_ways() {
        assert_eq!(NbdError::from_u32(0), None);
        for n in [1, 5, 12, 22, 28, 75, 95, 108, 2, 0xffff_ffff] {
            let e = NbdError::from_u32(n).unwrap();
            assert_eq!(e.to_u32(), n);
            assert!(!e.to_string().is_empty());
        }
        assert_eq!(NbdError::from_u32(1), Some(NbdError::Perm));
        assert_eq!(NbdError::from_u32(2), Some(NbdError::Other(2)));
    }

    #[test]
    fn requests_are_checked_before_sending() {
        use RequestError as E;
        let rw = export(F::SEND_FLUSH | F::SEND_FUA | F::SEND_TRIM | F::SEND_WRITE_ZEROES);
        let ro = export(F::READ_ONLY | F::SEND_FLUSH);
        let bare = export(0);
        let ok = |e: &Export, r: Request| assert_eq!(e.check(&r), Ok(()), "{r:?}");
        ok(&rw, req(Command::Read, 0, 0, 512));
        ok(&rw, req(Command::Write, FLAG_FUA, (1 << 20) - 65536, 65536));
        ok(&rw, req(Command::Trim, 0, 0, 1 << 20));
        ok(&rw, req(Command::WriteZeroes, FLAG_NO_HOLE, 512, 1 << 19));
        ok(&rw, req(Command::Flush, 0, 0, 0));
        ok(&ro, req(Command::Read, 0, 4096, 4096));
        ok(&bare, req(Command::Disc, 0, 0, 0));
        let cases = [
            (
                &ro,
                req(Command::Write, 0, 0, 512),
                E::ReadOnly(Command::Write),
            ),
            (
                &ro,
                req(Command::Trim, 0, 0, 512),
                E::ReadOnly(Command::Trim),
            ),
            (
                &ro,
                req(Command::WriteZeroes, 0, 0, 512),
                E::ReadOnly(Command::WriteZeroes),
            ),
            (
                &bare,
                req(Command::Flush, 0, 0, 0),
                E::NotOffered(Command::Flush),
            ),
            (
                &bare,
                req(Command::Trim, 0, 0, 512),
                E::NotOffered(Command::Trim),
            ),
            (
                &bare,
                req(Command::Write, FLAG_FUA, 0, 512),
                E::FuaNotOffered,
            ),
            (
                &rw,
                req(Command::Read, FLAG_FUA, 0, 512),
                E::Flags {
                    command: Command::Read,
                    flags: 1,
                },
            ),
            (
                &rw,
                req(Command::Write, FLAG_NO_HOLE, 0, 512),
                E::Flags {
                    command: Command::Write,
                    flags: 2,
                },
            ),
            (
                &rw,
                req(Command::Write, 0x80, 0, 512),
                E::Flags {
                    command: Command::Write,
                    flags: 0x80,
                },
            ),
            (
                &rw,
                req(Command::Flush, 0, 512, 0),
                E::Range(Command::Flush),
            ),
            (&rw, req(Command::Read, 0, 0, 0), E::Empty(Command::Read)),
            (
                &rw,
                req(Command::Read, 0, 1 << 20, 512),
                E::OutOfBounds {
                    offset: 1 << 20,
                    length: 512,
                    size: 1 << 20,
                },
            ),
            (
                &rw,
                req(Command::Read, 0, u64::MAX - 511, 512),
                E::OutOfBounds {
                    offset: u64::MAX - 511,
                    length: 512,
                    size: 1 << 20,
                },
            ),
            (
                &rw,
                req(Command::Read, 0, 1, 512),
                E::Unaligned {
                    offset: 1,
                    length: 512,
                    minimum: 512,
                },
            ),
            (
                &rw,
                req(Command::Write, 0, 0, 513),
                E::Unaligned {
                    offset: 0,
                    length: 513,
                    minimum: 512,
                },
            ),
            (
                &rw,
                req(Command::Read, 0, 0, 65536 + 512),
                E::TooLong {
                    length: 65536 + 512,
                    maximum: 65536,
                },
            ),
        ];
        for (e, r, err) in cases {
            assert_eq!(e.check(&r), Err(err), "{r:?}");
            assert!(!err.to_string().is_empty());
        }
    }

    proptest! {
        #[test]
        fn request_round_trips(flags: u16, t in 0u16..8, cookie: u64, offset: u64, length: u32) {
            if let Some(command) = Command::from_u16(t) {
                let r = Request { flags, command, cookie, offset, length };
                prop_assert_eq!(Request::decode(&r.encode()), Ok(r));
            }
        }

        #[test]
        fn reply_decode_never_panics_and_round_trips(b: [u8; 16]) {
            if let Ok(reply) = SimpleReply::decode(&b) {
                prop_assert_eq!(reply.encode(), b);
            }
        }
    }
}
