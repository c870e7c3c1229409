//! The one ioctl shape the device crates use: a request number and a pointer to an argument
//! (or nothing), with the ioctl's return value out. One `rustix::ioctl::Ioctl` implementation
//! serves every request, so that the Xen device nodes (`xen`) and the block, loop and
//! device-mapper requests (`blkdev`) share one call path without either knowing the other.
//! Each call site carries the `// SAFETY:` comment that names the kernel structure its
//! argument mirrors.
#![deny(missing_docs)]

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

/// Issues `opcode` on `fd` with the pointer `arg` (null for requests without an argument),
/// returning the ioctl's return value (a port for `IOCTL_EVTCHN_BIND_INTERDOMAIN`, a loop
/// device number for `LOOP_CTL_GET_FREE`).
///
/// # Safety
/// `opcode` must be a request of the device behind `fd`, `arg` must point to an argument
/// with exactly the layout that request expects (or be null if it takes none, or be a pointer
/// the kernel only validates), valid and not otherwise accessed during the call, and every
/// pointer inside the argument must be valid for what the kernel does with it during the
/// call.
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
