//! Structured replies (proto.md, "Structured reply chunk message" and "Structured reply
//! types"), without I/O: what the server sends after the client negotiated
//! `NBD_OPT_STRUCTURED_REPLY`. A reply is one or more chunks with the request's cookie, the
//! last one flagged [`REPLY_FLAG_DONE`]; a chunk is a 20-byte header ([`ChunkHeader`]), a
//! fixed part whose length the header's type decides ([`ChunkHeader::fixed_len`]), and, for
//! `NBD_REPLY_TYPE_OFFSET_DATA`, the data.
//!
//! [`Reassembly`] follows one request's reply: every content chunk must lie inside the
//! request and overlap no earlier one, and a read without an error chunk is complete only
//! when every byte of it was covered exactly once. Whatever breaks these rules is a
//! [`WireError`], after which the client must disconnect (the protocol's "hard disconnect").
//!
//! ```
//! use nbd::structured::{Chunk, ChunkHeader, Reassembly, REPLY_FLAG_DONE, TYPE_OFFSET_HOLE};
//! use nbd::wire::Command;
//!
//! let header = ChunkHeader { flags: REPLY_FLAG_DONE, kind: TYPE_OFFSET_HOLE, cookie: 1, length: 12 };
//! assert_eq!(ChunkHeader::decode(&header.encode()), Ok(header));
//! let mut fixed = [0u8; 12];
//! fixed[..8].copy_from_slice(&4096u64.to_be_bytes());
//! fixed[8..].copy_from_slice(&4096u32.to_be_bytes());
//! let chunk = header.parse(&fixed)?;
//! assert_eq!(chunk, Chunk::Hole { offset: 4096, len: 4096 });
//! let mut read = Reassembly::new(Command::Read, 4096, 4096);
//! assert_eq!(read.accept(&chunk)?, Some(0..4096));
//! assert_eq!(read.finish(), Ok(None));
//! # Ok::<(), nbd::WireError>(())
//! ```

use std::ops::Range;

use crate::wire::{Command, NbdError, WireError, STRUCTURED_REPLY_MAGIC};

/// A structured reply chunk's header length.
pub const CHUNK_HEADER_LEN: usize = 20;
/// Chunk flag: the last chunk of the reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// `NBD_REPLY_TYPE_NONE`: the end of a reply, nothing else.
pub const TYPE_NONE: u16 = 0;
/// `NBD_REPLY_TYPE_OFFSET_DATA`: an offset and data.
pub const TYPE_OFFSET_DATA: u16 = 1;
/// `NBD_REPLY_TYPE_OFFSET_HOLE`: an offset and a length that read as zeroes.
pub const TYPE_OFFSET_HOLE: u16 = 2;
/// `NBD_REPLY_TYPE_ERROR`.
pub const TYPE_ERROR: u16 = (1 << 15) + 1;
/// `NBD_REPLY_TYPE_ERROR_OFFSET`.
pub const TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;
/// The bit every error chunk's type has.
pub const TYPE_ERROR_BIT: u16 = 1 << 15;
/// The longest error message the protocol allows.
pub const MAX_MESSAGE: usize = 4096;
/// The longest fixed part this client reads: an error chunk with the longest message and an
/// offset.
pub const MAX_FIXED: usize = 4 + 2 + MAX_MESSAGE + 8;
/// The most disjoint pieces a read's coverage may be in before the server is deemed hostile
/// (chunks in order merge into one; a server has no reason to scatter them this much).
pub const MAX_PIECES: usize = 1024;

/// The most chunks one reply may have (a server that goes on sending chunks for one request
/// is not let to keep the client reading for ever).
pub const MAX_CHUNKS: u32 = 1 << 16;

/// A chunk's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    /// [`REPLY_FLAG_DONE`] and flags to ignore.
    pub flags: u16,
    /// The chunk's type.
    pub kind: u16,
    /// The request's cookie.
    pub cookie: u64,
    /// The length of the payload after the header.
    pub length: u32,
}

/// What a chunk says, once its fixed part is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk {
    /// `NBD_REPLY_TYPE_NONE`.
    None,
    /// `NBD_REPLY_TYPE_OFFSET_DATA`: `len` bytes of data at `offset` follow.
    Data {
        /// Byte offset in the export.
        offset: u64,
        /// Bytes of data after the fixed part.
        len: u32,
    },
    /// `NBD_REPLY_TYPE_OFFSET_HOLE`: `len` bytes at `offset` read as zeroes.
    Hole {
        /// Byte offset in the export.
        offset: u64,
        /// Bytes.
        len: u32,
    },
    /// An error chunk (`NBD_REPLY_TYPE_ERROR`, `NBD_REPLY_TYPE_ERROR_OFFSET`, or an unknown
    /// type with the error bit): the reply fails.
    Error {
        /// The error.
        error: NbdError,
        /// Where it happened (`NBD_REPLY_TYPE_ERROR_OFFSET`).
        offset: Option<u64>,
        /// The server's message for a human.
        message: String,
    },
}

impl ChunkHeader {
    /// Reads a chunk header.
    ///
    /// # Errors
    /// [`WireError::ReplyMagic`] for anything but the structured reply magic.
    pub fn decode(b: &[u8; CHUNK_HEADER_LEN]) -> Result<Self, WireError> {
        let [m0, m1, m2, m3, f0, f1, t0, t1, c0, c1, c2, c3, c4, c5, c6, c7, length @ ..] = *b;
        let magic = u32::from_be_bytes([m0, m1, m2, m3]);
        if magic != STRUCTURED_REPLY_MAGIC {
            return Err(WireError::ReplyMagic(magic));
        }
        Ok(Self {
            flags: u16::from_be_bytes([f0, f1]),
            kind: u16::from_be_bytes([t0, t1]),
            cookie: u64::from_be_bytes([c0, c1, c2, c3, c4, c5, c6, c7]),
            length: u32::from_be_bytes(length),
        })
    }

    /// The header as it goes on the wire (what a server does; tests' fake servers use it).
    pub fn encode(&self) -> [u8; CHUNK_HEADER_LEN] {
        let mut b = [0u8; CHUNK_HEADER_LEN];
        b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..20].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    /// The last chunk of its reply.
    pub const fn done(&self) -> bool {
        self.flags & REPLY_FLAG_DONE != 0
    }

    /// How many bytes of the payload to read before [`ChunkHeader::parse`] (for
    /// `NBD_REPLY_TYPE_OFFSET_DATA` the data follows them); at most [`MAX_FIXED`].
    ///
    /// # Errors
    /// A length the type does not allow, a type this client does not know without the
    /// error bit, `NBD_REPLY_TYPE_NONE` without [`REPLY_FLAG_DONE`].
    pub fn fixed_len(&self) -> Result<usize, WireError> {
        let bad = WireError::ChunkLength {
            kind: self.kind,
            length: self.length,
        };
        let length = self.length as usize;
        match self.kind {
            TYPE_NONE if !self.done() => Err(WireError::NoneNotDone),
            TYPE_NONE => (length == 0).then_some(0).ok_or(bad),
            TYPE_OFFSET_DATA => (length >= 9).then_some(8).ok_or(bad),
            TYPE_OFFSET_HOLE => (length == 12).then_some(12).ok_or(bad),
            TYPE_ERROR_OFFSET => (14..=MAX_FIXED)
                .contains(&length)
                .then_some(length)
                .ok_or(bad),
            kind if kind & TYPE_ERROR_BIT != 0 => (6..=MAX_FIXED)
                .contains(&length)
                .then_some(length)
                .ok_or(bad),
            kind => Err(WireError::ChunkType(kind)),
        }
    }

    /// Reads the chunk's fixed part (exactly [`ChunkHeader::fixed_len`] bytes).
    ///
    /// # Errors
    /// A fixed part of the wrong length, an error chunk with error 0 or a message longer
    /// than the chunk, a hole of zero bytes.
    pub fn parse(&self, fixed: &[u8]) -> Result<Chunk, WireError> {
        let bad = WireError::ChunkLength {
            kind: self.kind,
            length: self.length,
        };
        if self.fixed_len()? != fixed.len() {
            return Err(bad);
        }
        let u64_at = |i: usize| {
            fixed
                .get(i..i + 8)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_be_bytes)
        };
        match self.kind {
            TYPE_NONE => Ok(Chunk::None),
            TYPE_OFFSET_DATA => Ok(Chunk::Data {
                offset: u64_at(0).ok_or(bad)?,
                len: self.length - 8,
            }),
            TYPE_OFFSET_HOLE => {
                let len = fixed
                    .get(8..12)
                    .and_then(|b| b.try_into().ok())
                    .map_or(0, u32::from_be_bytes);
                if len == 0 {
                    return Err(WireError::EmptyChunk);
                }
                Ok(Chunk::Hole {
                    offset: u64_at(0).ok_or(bad)?,
                    len,
                })
            }
            kind => {
                let Some(([e0, e1, e2, e3, l0, l1], rest)) = fixed.split_first_chunk::<6>() else {
                    return Err(bad);
                };
                let error = NbdError::from_u32(u32::from_be_bytes([*e0, *e1, *e2, *e3]))
                    .ok_or(WireError::ErrorZero)?;
                let message_len = usize::from(u16::from_be_bytes([*l0, *l1]));
                let tail = if kind == TYPE_ERROR_OFFSET { 8 } else { 0 };
                if message_len > MAX_MESSAGE || message_len + tail > rest.len() {
                    return Err(bad);
                }
                let (message, after) = rest.split_at(message_len);
                let offset = match kind {
                    TYPE_ERROR_OFFSET => Some(
                        after
                            .get(..8)
                            .and_then(|b| b.try_into().ok())
                            .map(u64::from_be_bytes)
                            .ok_or(bad)?,
                    ),
                    _ => None,
                };
                Ok(Chunk::Error {
                    error,
                    offset,
                    message: String::from_utf8_lossy(message).into_owned(),
                })
            }
        }
    }
}

/// One request's structured reply, chunk by chunk: checks each against the request and, for
/// a read, tracks which bytes were covered.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Reassembly {
    read: bool,
    offset: u64,
    length: u32,
    /// Covered ranges, relative to the request, sorted, disjoint, adjacent ones merged.
    covered: Vec<Range<u64>>,
    error: Option<NbdError>,
    chunks: u32,
}

impl Reassembly {
    /// Follows the reply to `command` of `length` bytes at `offset`.
    pub fn new(command: Command, offset: u64, length: u32) -> Self {
        Self {
            read: command == Command::Read,
            offset,
            length,
            covered: Vec::new(),
            error: None,
            chunks: 0,
        }
    }

    /// Takes a chunk in: for data or a hole, the bytes of the request's buffer it fills.
    ///
    /// # Errors
    /// A content chunk for anything but a read, or outside the request, or overlapping an
    /// earlier one; an error offset outside the request; coverage in more than
    /// [`MAX_PIECES`] pieces; more than [`MAX_CHUNKS`] chunks.
    pub fn accept(&mut self, chunk: &Chunk) -> Result<Option<Range<usize>>, WireError> {
        self.chunks += 1;
        if self.chunks > MAX_CHUNKS {
            return Err(WireError::TooManyChunks);
        }
        let (offset, len) = match *chunk {
            Chunk::None => return Ok(None),
            Chunk::Error { error, offset, .. } => {
                if let Some(at) = offset {
                    self.relative(at, 1)?;
                }
                self.error.get_or_insert(error);
                return Ok(None);
            }
            Chunk::Data { offset, len } | Chunk::Hole { offset, len } => (offset, len),
        };
        if !self.read {
            return Err(WireError::ContentNotRead);
        }
        if len == 0 {
            return Err(WireError::EmptyChunk);
        }
        let range = self.relative(offset, len)?;
        // The first piece ending after the new range's start must start at or after its end.
        let i = self.covered.partition_point(|r| r.end <= range.start);
        if self.covered.get(i).is_some_and(|r| r.start < range.end) {
            return Err(WireError::ChunkOverlap { offset, len });
        }
        let joins_prev = i > 0
            && self
                .covered
                .get(i - 1)
                .is_some_and(|r| r.end == range.start);
        let joins_next = self.covered.get(i).is_some_and(|r| r.start == range.end);
        match (joins_prev, joins_next) {
            (true, true) => {
                let end = self.covered.remove(i).end;
                if let Some(p) = self.covered.get_mut(i - 1) {
                    p.end = end;
                }
            }
            (true, false) => {
                if let Some(p) = self.covered.get_mut(i - 1) {
                    p.end = range.end;
                }
            }
            (false, true) => {
                if let Some(n) = self.covered.get_mut(i) {
                    n.start = range.start;
                }
            }
            (false, false) => {
                if self.covered.len() >= MAX_PIECES {
                    return Err(WireError::Scattered);
                }
                self.covered.insert(i, range.clone());
            }
        }
        // In range of the request (checked by `relative`), which is at most 4 GiB.
        Ok(Some(range.start as usize..range.end as usize))
    }

    /// The reply is over (its last chunk was [`REPLY_FLAG_DONE`]): its error, if an error
    /// chunk came.
    ///
    /// # Errors
    /// [`WireError::Incomplete`]: a read without an error chunk whose bytes were not all
    /// covered.
    pub fn finish(&self) -> Result<Option<NbdError>, WireError> {
        if self.error.is_some() {
            return Ok(self.error);
        }
        let whole = self.covered.len() == 1
            && self
                .covered
                .first()
                .is_some_and(|r| r.start == 0 && r.end == u64::from(self.length));
        if self.read && !whole && self.length > 0 {
            return Err(WireError::Incomplete);
        }
        Ok(None)
    }

    /// `len` bytes at `offset` as a range relative to the request, if inside it.
    fn relative(&self, offset: u64, len: u32) -> Result<Range<u64>, WireError> {
        let outside = WireError::ChunkOutside { offset, len };
        let start = offset.checked_sub(self.offset).ok_or(outside)?;
        let end = start.checked_add(u64::from(len)).ok_or(outside)?;
        if end > u64::from(self.length) {
            return Err(outside);
        }
        Ok(start..end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn header(kind: u16, length: u32, done: bool) -> ChunkHeader {
        ChunkHeader {
            flags: if done { REPLY_FLAG_DONE } else { 0 },
            kind,
            cookie: 9,
            length,
        }
    }

    #[test]
    fn fixed_parts_and_their_lengths() {
        assert_eq!(header(TYPE_NONE, 0, true).fixed_len(), Ok(0));
        assert_eq!(
            header(TYPE_NONE, 0, false).fixed_len(),
            Err(WireError::NoneNotDone)
        );
        assert!(header(TYPE_NONE, 4, true).fixed_len().is_err());
        assert_eq!(header(TYPE_OFFSET_DATA, 9, false).fixed_len(), Ok(8));
        assert!(header(TYPE_OFFSET_DATA, 8, false).fixed_len().is_err());
        assert!(header(TYPE_OFFSET_HOLE, 13, false).fixed_len().is_err());
        assert!(header(TYPE_ERROR, 5, true).fixed_len().is_err());
        assert!(header(TYPE_ERROR, MAX_FIXED as u32 + 1, true)
            .fixed_len()
            .is_err());
        assert!(header(TYPE_ERROR_OFFSET, 13, true).fixed_len().is_err());
        assert_eq!(header(TYPE_ERROR_BIT | 77, 6, true).fixed_len(), Ok(6));
        assert_eq!(
            header(5, 12, true).fixed_len(),
            Err(WireError::ChunkType(5))
        );

        let mut e = vec![0, 0, 0, 5, 0, 2, b'h', b'i'];
        e.extend_from_slice(&4096u64.to_be_bytes());
        assert_eq!(
            header(TYPE_ERROR_OFFSET, 16, true).parse(&e),
            Ok(Chunk::Error {
                error: NbdError::Io,
                offset: Some(4096),
                message: "hi".into()
            })
        );
        // A message longer than the chunk, error 0, a hole of nothing.
        assert!(header(TYPE_ERROR, 6, true)
            .parse(&[0, 0, 0, 5, 0, 1])
            .is_err());
        assert_eq!(
            header(TYPE_ERROR, 6, true).parse(&[0, 0, 0, 0, 0, 0]),
            Err(WireError::ErrorZero)
        );
        assert_eq!(
            header(TYPE_OFFSET_HOLE, 12, true).parse(&[0; 12]),
            Err(WireError::EmptyChunk)
        );
        assert!(header(TYPE_OFFSET_HOLE, 12, true).parse(&[0; 8]).is_err());
    }

    #[test]
    fn a_read_is_covered_exactly_once() {
        let data = |offset, len| Chunk::Data { offset, len };
        let mut r = Reassembly::new(Command::Read, 8192, 8192);
        assert_eq!(r.accept(&data(12288, 4096)), Ok(Some(4096..8192)));
        assert_eq!(r.finish(), Err(WireError::Incomplete));
        assert_eq!(
            r.accept(&data(12288, 512)),
            Err(WireError::ChunkOverlap {
                offset: 12288,
                len: 512
            })
        );
        assert!(r.accept(&data(4096, 8192)).is_err());
        assert!(r.accept(&data(16384, 1)).is_err());
        assert!(r.accept(&data(u64::MAX, 2)).is_err());
        assert_eq!(
            r.accept(&Chunk::Hole {
                offset: 8192,
                len: 4096
            }),
            Ok(Some(0..4096))
        );
        assert_eq!(r.finish(), Ok(None));

        let mut w = Reassembly::new(Command::Write, 0, 512);
        assert_eq!(w.accept(&data(0, 512)), Err(WireError::ContentNotRead));
        let err = |offset| Chunk::Error {
            error: NbdError::NoSpc,
            offset,
            message: String::new(),
        };
        assert!(w.accept(&err(Some(512))).is_err());
        assert_eq!(w.accept(&err(Some(0))), Ok(None));
        assert_eq!(w.finish(), Ok(Some(NbdError::NoSpc)));

        let mut partial = Reassembly::new(Command::Read, 0, 1024);
        partial.accept(&data(0, 512)).unwrap();
        partial.accept(&err(None)).unwrap();
        assert_eq!(partial.finish(), Ok(Some(NbdError::NoSpc)));
    }

    #[test]
    fn scattered_coverage_is_bounded() {
        let mut r = Reassembly::new(Command::Read, 0, u32::MAX);
        for i in 0..MAX_PIECES as u64 {
            r.accept(&Chunk::Data {
                offset: i * 2,
                len: 1,
            })
            .unwrap();
        }
        assert_eq!(
            r.accept(&Chunk::Data {
                offset: 1 << 20,
                len: 1
            }),
            Err(WireError::Scattered)
        );
        // Filling a gap merges two pieces.
        assert_eq!(r.accept(&Chunk::Data { offset: 1, len: 1 }), Ok(Some(1..2)));
        let mut errors = Reassembly::new(Command::Flush, 0, 0);
        let error = Chunk::Error {
            error: NbdError::Io,
            offset: None,
            message: String::new(),
        };
        for _ in 0..MAX_CHUNKS {
            errors.accept(&error).unwrap();
        }
        assert_eq!(errors.accept(&error), Err(WireError::TooManyChunks));
    }

    proptest! {
        #[test]
        fn header_round_trips(flags: u16, kind: u16, cookie: u64, length: u32) {
            let h = ChunkHeader { flags, kind, cookie, length };
            prop_assert_eq!(ChunkHeader::decode(&h.encode()), Ok(h));
            if let Ok(n) = h.fixed_len() {
                prop_assert!(n <= MAX_FIXED);
            }
        }

        #[test]
        fn parse_never_panics(kind in prop_oneof![Just(TYPE_NONE), Just(TYPE_OFFSET_DATA),
                Just(TYPE_OFFSET_HOLE), Just(TYPE_ERROR), Just(TYPE_ERROR_OFFSET), any::<u16>()],
                length in 0u32..64, fixed in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = header(kind, length, true).parse(&fixed);
        }

        /// Chunks in any order: accepted ranges never overlap, stay inside the request, and
        /// the read finishes exactly when their lengths add up to the request's.
        #[test]
        fn coverage_is_exact(start in 0u64..1 << 40, length in 1u32..4096,
                chunks in proptest::collection::vec((0u64..5000, 0u32..600), 0..40)) {
            let mut r = Reassembly::new(Command::Read, start, length);
            let mut seen = vec![false; length as usize];
            for (at, len) in chunks {
                if let Ok(Some(range)) = r.accept(&Chunk::Data { offset: start + at, len }) {
                    for b in &mut seen[range] {
                        prop_assert!(!*b);
                        *b = true;
                    }
                }
            }
            prop_assert_eq!(r.finish().is_ok(), seen.iter().all(|b| *b));
        }
    }
}
