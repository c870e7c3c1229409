//! The Xen blkif protocol: the request/response ABIs, the shared ring from both ends, and the
//! copy-once validation of every request.
//!
//! # Design
//! - [`BackRing`] and [`FrontRing`] are plain bookkeeping (indices, size, ABI, a broken flag).
//!   Every method that touches the ring takes the memory as a [`shmem::SharedMem`], whose
//!   accesses are volatile or atomic; this crate has no `unsafe` at all.
//! - [`BackRing::next_request`] copies a slot once into a private [`RawRequest`]; [`parse`]
//!   judges only that copy and takes no memory handle, so a frontend rewriting the slot
//!   afterwards changes nothing (the double fetch of XSA-155). Indirect pages are copied once
//!   the same way, into [`IndirectPage`]s, before [`parse_indirect`] reads them.
//! - Validation follows Linux's xen-blkback rule by rule and in its order (see `validate`),
//!   producing a typed [`Request`] or a [`Rejection`] that names the status it earns.
//! - A bogus producer index is a [`ProtocolViolation`] that halts the ring: never a loop,
//!   never a panic.
//! - Responses are written field by field; padding is never written (XSA-216).
//!
//! # Example
//! ```
//! use ring::*;
//! use shmem::OwnedMem;
//!
//! let pages = OwnedMem::new(1).unwrap();
//! let mem = pages.mem();
//! let mut front = FrontRing::init(&mem, Abi::X86_32, 1).unwrap();
//! let mut back = BackRing::attach(&mem, Abi::X86_32, 1).unwrap();
//!
//! let segs = [Segment { gref: 7, first_sect: 0, last_sect: 7 }];
//! front
//!     .queue_request(&mem, &FrontRequest::Direct {
//!         operation: OP_READ, id: 42, sector: 8, handle: 0, segs: &segs,
//!     })
//!     .unwrap();
//! front.push_requests(&mem).unwrap();
//!
//! let limits = DeviceLimits {
//!     sectors: 1 << 20, logical_block_size: 512, read_only: false,
//!     max_indirect_segments: 256, discard: false, secure_discard: false,
//! };
//! let raw = back.next_request(&mem).unwrap().unwrap();
//! let Ok(Parsed::Ready(req)) = parse(&raw, &limits) else { panic!() };
//! assert!(matches!(&req.op, Op::Read(t) if t.nr_sectors == 8));
//! back.put_response(&mem, &req.response(Status::Okay)).unwrap();
//! back.push_responses(&mem).unwrap();
//!
//! let rsp = front.next_response(&mem).unwrap().unwrap();
//! assert_eq!((rsp.id, rsp.status()), (42, Some(Status::Okay)));
//! ```
#![deny(missing_docs)]
#![forbid(unsafe_code)]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

mod abi;
mod back;
mod error;
mod front;
mod raw;
mod request;
mod sring;
mod validate;

pub use abi::{
    Abi, Layout, RawSegment, UnknownProtocol, X86_32Discard, X86_32Indirect, X86_32Request,
    X86_32Response, X86_64Discard, X86_64Indirect, X86_64Request, X86_64Response, MAX_REQUEST_SIZE,
    PROTOCOL_ARM, PROTOCOL_NATIVE, PROTOCOL_X86_32, PROTOCOL_X86_64,
};
pub use back::BackRing;
pub use error::{ProtocolViolation, RingError};
pub use front::{EncodeError, FrontRequest, FrontRing, RawResponse};
pub use raw::{RawRequest, WrongLength};
pub use request::{
    FlushKind, Op, Request, Response, Sector, Segment, Segments, Status, Transfer, DISCARD_SECURE,
    MAX_INDIRECT_PAGES, MAX_INDIRECT_SEGMENTS, MAX_SEGMENTS_PER_REQUEST, OP_DISCARD,
    OP_FLUSH_DISKCACHE, OP_INDIRECT, OP_READ, OP_RESERVED_1, OP_WRITE, OP_WRITE_BARRIER,
    SECTORS_PER_PAGE, SECTOR_SIZE, SEGS_PER_INDIRECT_FRAME,
};
pub use sring::{
    ring_pages, ring_size, MAX_RING_PAGES, MAX_RING_PAGE_ORDER, REQ_EVENT, REQ_PROD,
    RING_HEADER_SIZE, RSP_EVENT, RSP_PROD,
};
pub use validate::{
    parse, parse_indirect, DeviceLimits, IndirectHeader, IndirectPage, Misalignment, Parsed,
    RejectReason, Rejection,
};
