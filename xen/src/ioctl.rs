//! The one ioctl shape the Xen device nodes use: `_IOC(_IOC_NONE, group, nr, sizeof(arg))`
//! with a pointer to an argument struct that the kernel reads and may update, returning an
//! int (a port for `IOCTL_EVTCHN_BIND_INTERDOMAIN`). The call itself is the `ioctl` crate's,
//! shared with `blkdev`; [`call`] is re-exported for tests that issue raw requests (the
//! sandbox's ioctl filter test).

use rustix::ioctl::{opcode, Direction, Opcode};

pub use ::ioctl::call;

/// `_IOC(_IOC_NONE, group, nr, size)`: the Xen headers encode the argument size but no
/// direction.
pub(crate) const fn none_op(group: u8, nr: u8, size: usize) -> Opcode {
    opcode::from_components(Direction::None, group, nr, size)
}
