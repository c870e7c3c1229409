//! The Xen blkif protocol.
#![deny(missing_docs)]
