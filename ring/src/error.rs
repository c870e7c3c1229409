//! Errors of the shared ring.

use shmem::OutOfBounds;

use crate::raw::WrongLength;

/// The other end broke the ring protocol. The ring is halted: every later call that reads the
/// other end's indices returns the same violation (Linux: "Halting ring processing").
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolViolation {
    /// The frontend's `req_prod` claims more requests than the ring holds beyond the responses
    /// (`RING_REQUEST_PROD_OVERFLOW`: `req_prod - rsp_prod_pvt > size`), or moved behind
    /// requests already consumed.
    #[error("bogus request producer {req_prod}: consumed up to {req_cons}, answered up to {rsp_prod}, ring of {size}")]
    BogusRequestProducer {
        /// The `req_prod` read.
        req_prod: u32,
        /// The backend's consumer index.
        req_cons: u32,
        /// The backend's private response producer.
        rsp_prod: u32,
        /// Ring size in slots.
        size: u32,
    },
    /// The backend's `rsp_prod` claims more responses than requests outstanding.
    #[error(
        "bogus response producer {rsp_prod}: consumed up to {rsp_cons}, requests up to {req_prod}"
    )]
    BogusResponseProducer {
        /// The `rsp_prod` read.
        rsp_prod: u32,
        /// The frontend's consumer index.
        rsp_cons: u32,
        /// The frontend's private request producer.
        req_prod: u32,
    },
}

/// An error of a ring operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    /// The other end broke the protocol; the ring is halted. Fatal for the connection.
    #[error(transparent)]
    Protocol(#[from] ProtocolViolation),
    /// Not a ring size a frontend may choose (1, 2, 4, 8 or 16 pages).
    #[error("ring of {0} pages (must be 1, 2, 4, 8 or 16)")]
    Pages(usize),
    /// The memory handed in is smaller than the ring (a caller bug).
    #[error("ring memory too small")]
    Memory(#[from] OutOfBounds),
    /// A response with no consumed request left to answer (a caller bug: it would overwrite
    /// a request slot).
    #[error("no consumed request left to answer")]
    NothingToAnswer,
    /// A resumed ring's recorded indexes contradict each other ([`crate::BackRing::resume`]).
    #[error("cannot resume at req_cons {req_cons}, rsp_pushed {rsp_pushed}, rsp_written {rsp_written} on a ring of {size}")]
    Resume {
        /// Requests consumed.
        req_cons: u32,
        /// Responses published.
        rsp_pushed: u32,
        /// Responses written.
        rsp_written: u32,
        /// Slots in the ring.
        size: u32,
    },
    /// The frontend's ring has no free slot.
    #[error("ring full")]
    Full,
    /// Raw slot bytes of the wrong length.
    #[error(transparent)]
    WrongLength(#[from] WrongLength),
    /// A typed request that does not fit a slot.
    #[error(transparent)]
    Encode(#[from] crate::front::EncodeError),
}
