//! The one ioctl shape used here: a request number and a pointer (or nothing), with the
//! return value out. One `rustix::ioctl::Ioctl` implementation for every request.

use std::ffi::c_void;
use std::os::fd::BorrowedFd;

use rustix::ioctl::{Ioctl, IoctlOutput, Opcode};

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
/// with exactly the layout that request expects (or be null if it takes none, or be a pointer
/// the kernel only validates), valid and not otherwise accessed during the call.
pub(crate) unsafe fn call<T>(
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
