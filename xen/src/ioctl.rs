//! The one ioctl shape the Xen device nodes use: `_IOC(_IOC_NONE, group, nr, sizeof(arg))`
//! with a pointer to an argument struct that the kernel reads and may update, returning an
//! int (a port for `IOCTL_EVTCHN_BIND_INTERDOMAIN`). [`call`] is public for tests that issue
//! raw requests (the sandbox's ioctl filter test). Block, loop and device-mapper requests are
//! the `blkdev` crate's, which has its own copy of this small `rustix::ioctl::Ioctl`
//! implementation so that it does not depend on Xen.

use std::ffi::c_void;
use std::os::fd::BorrowedFd;

use rustix::ioctl::{opcode, Direction, Ioctl, IoctlOutput, Opcode};

/// `_IOC(_IOC_NONE, group, nr, size)`: the Xen headers encode the argument size but no
/// direction.
pub(crate) const fn none_op(group: u8, nr: u8, size: usize) -> Opcode {
    opcode::from_components(Direction::None, group, nr, size)
}

/// One call: `opcode` with a pointer argument.
struct Call {
    opcode: Opcode,
    arg: *mut c_void,
}

// SAFETY: the kernel receives the pointer that `call`'s contract says matches the opcode; the
// output is the ioctl's return value, not read through the pointer.
unsafe impl Ioctl for Call {
    type Output = IoctlOutput;
    const IS_MUTATING: bool = true;

    fn opcode(&self) -> Opcode {
        self.opcode
    }

    fn as_ptr(&mut self) -> *mut c_void {
        self.arg
    }

    unsafe fn output_from_ptr(out: IoctlOutput, _: *mut c_void) -> rustix::io::Result<IoctlOutput> {
        Ok(out)
    }
}

/// Issues `opcode` on `fd` with the pointer `arg` (null for requests without an argument).
///
/// # Safety
/// `opcode` must be a request of the device behind `fd`, `arg` must point to an argument
/// with exactly the layout that request expects (or be null if it takes none), valid and not
/// otherwise accessed during the call, and every pointer inside the argument must be valid
/// for what the kernel does with it during the call.
pub unsafe fn call<T>(
    fd: BorrowedFd<'_>,
    opcode: Opcode,
    arg: *mut T,
) -> rustix::io::Result<IoctlOutput> {
    // SAFETY: guaranteed by the caller.
    unsafe {
        rustix::ioctl::ioctl(
            fd,
            Call {
                opcode,
                arg: arg.cast(),
            },
        )
    }
}
