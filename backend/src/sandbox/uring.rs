//! io_uring restrictions (`IORING_REGISTER_RESTRICTIONS`): operations submitted through a ring
//! are not seen by seccomp, so each queue's ring carries its own allow-list.
//!
//! The ring is created disabled ([`builder`]); its owner registers its buffers, then
//! [`restrict`] registers the files it may use, installs the restrictions and enables the ring.
//! From then on:
//! - only [`OPCODES`] can be submitted (no `OPENAT`, `SOCKET`, `CONNECT`, `ACCEPT`, ...);
//! - every SQE must carry `IOSQE_FIXED_FILE`: it can only name a registered file, so the ring
//!   cannot reach any other fd of the process; the only other flags are links and skipping a
//!   success's CQE;
//! - no further `io_uring_register` operation is allowed (no new files or buffers), except,
//!   for a disk on an NBD export, `IORING_REGISTER_FILES_UPDATE`: the replacement of its
//!   socket by a reconnection's (which the confined process cannot make itself; see
//!   `crate::nbd_connector`).

use std::io;
use std::os::fd::RawFd;

use io_uring::register::Restriction;
use io_uring::{opcode, squeue, IoUring};

/// The operations a queue submits: reads and writes (bounce buffers or grant mappings),
/// `fdatasync`, discard (block `URING_CMD` or `fallocate`), the event channel's poll, read and
/// unmask (`READV` and `WRITEV` of one iovec, so that they need no opcode of their own), the
/// removal of its poll when the queue ends, and timers;
/// for an NBD export, sends and receives on its socket, connected before confinement, and its
/// shutdown (a ring can name no other socket, and none can connect).
pub const OPCODES: [u8; 14] = [
    opcode::ReadFixed::CODE,
    opcode::WriteFixed::CODE,
    opcode::Readv::CODE,
    opcode::Writev::CODE,
    opcode::Fsync::CODE,
    opcode::Fallocate::CODE,
    opcode::UringCmd16::CODE,
    opcode::PollAdd::CODE,
    opcode::PollRemove::CODE,
    opcode::Timeout::CODE,
    opcode::SendMsg::CODE,
    opcode::Recv::CODE,
    opcode::RecvMsg::CODE,
    opcode::Shutdown::CODE,
];

/// A builder for a ring that starts disabled (`IORING_SETUP_R_DISABLED`), so that
/// [`restrict`] can install its restrictions before anything is submitted.
pub fn builder() -> io_uring::Builder {
    let mut b = IoUring::builder();
    b.setup_r_disabled();
    b
}

/// `IORING_REGISTER_FILES_UPDATE` (include/uapi/linux/io_uring.h).
const REGISTER_FILES_UPDATE: u8 = 6;

/// Registers `files` (their indices are their positions), restricts the ring as the module
/// says (`replace_files`: allowing registered files to be replaced), and enables it.
///
/// # Errors
/// When the kernel refuses a registration; the ring is then unusable (still disabled).
pub fn restrict(ring: &IoUring, files: &[RawFd], replace_files: bool) -> io::Result<()> {
    let sub = ring.submitter();
    sub.register_files(files)?;
    let mut res: Vec<Restriction> = OPCODES.iter().map(|&op| Restriction::sqe_op(op)).collect();
    if replace_files {
        res.push(Restriction::register_op(REGISTER_FILES_UPDATE));
    }
    res.push(Restriction::sqe_flags_allowed(
        (squeue::Flags::IO_LINK | squeue::Flags::SKIP_SUCCESS).bits(),
    ));
    res.push(Restriction::sqe_flags_required(
        squeue::Flags::FIXED_FILE.bits(),
    ));
    sub.register_restrictions(&mut res)?;
    sub.register_enable_rings()
}
