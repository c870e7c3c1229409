//! Event channels over `/dev/xen/evtchn`.
//!
//! The request encoding follows the kernel's `include/uapi/xen/evtchn.h` and the device's
//! behaviour `drivers/xen/evtchn.c`: `read()` returns the `u32` ports that fired (each masked
//! until written back with `write()`), and fails with `EFBIG` once its ring overflowed, after
//! which `IOCTL_EVTCHN_RESET` clears it. The fd is opened non-blocking, so that it can sit in
//! an io_uring or epoll loop and be drained when readable.
//!
//! This host has no Xen: the unit tests below check the request numbers and layouts against
//! the header's values, and `tests/evtchn.rs` runs its shared suite on this implementation
//! only where `/dev/xen/evtchn` exists. All the evtchn `unsafe` (ioctls) is in this module.

use std::collections::BTreeSet;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;
use rustix::ioctl::Opcode;

use crate::ioctl::{call, none_op};
use crate::{DomId, EventChannel, EvtchnError, Port};

/// The device node.
pub const EVTCHN_PATH: &str = "/dev/xen/evtchn";

/// `struct ioctl_evtchn_bind_interdomain`.
#[repr(C)]
#[allow(dead_code)] // Fields are read by the kernel.
struct BindInterdomain {
    remote_domain: u32,
    remote_port: u32,
}

/// `struct ioctl_evtchn_bind_unbound_port`.
#[repr(C)]
#[allow(dead_code)] // Fields are read by the kernel.
struct BindUnboundPort {
    remote_domain: u32,
}

/// `struct ioctl_evtchn_unbind` and `struct ioctl_evtchn_notify`: one port.
#[repr(C)]
#[allow(dead_code)] // Fields are read by the kernel.
struct PortArg {
    port: u32,
}

/// `struct ioctl_evtchn_restrict_domid`.
#[repr(C)]
#[allow(dead_code)] // Fields are read by the kernel.
struct RestrictDomid {
    domid: u16,
}

const IOCTL_EVTCHN_BIND_INTERDOMAIN: Opcode = none_op(b'E', 1, size_of::<BindInterdomain>());
const IOCTL_EVTCHN_BIND_UNBOUND_PORT: Opcode = none_op(b'E', 2, size_of::<BindUnboundPort>());
const IOCTL_EVTCHN_UNBIND: Opcode = none_op(b'E', 3, size_of::<PortArg>());
const IOCTL_EVTCHN_NOTIFY: Opcode = none_op(b'E', 4, size_of::<PortArg>());
const IOCTL_EVTCHN_RESET: Opcode = none_op(b'E', 5, 0);
const IOCTL_EVTCHN_RESTRICT_DOMID: Opcode = none_op(b'E', 6, size_of::<RestrictDomid>());

/// Bytes per `read()`: the device returns at most a page of ports at a time.
const READ_BYTES: usize = 4096;

fn err(e: Errno) -> EvtchnError {
    EvtchnError::Io(io::Error::from_raw_os_error(e.raw_os_error()))
}

/// One open `/dev/xen/evtchn`: the real [`EventChannel`]. Closing it unbinds its ports.
#[derive(Debug)]
pub struct XenEventChannel {
    fd: OwnedFd,
    /// Ports bound through this handle, reported all at once after a ring overflow.
    bound: BTreeSet<Port>,
}

impl XenEventChannel {
    /// Opens [`EVTCHN_PATH`], non-blocking.
    ///
    /// # Errors
    /// When the device cannot be opened (not a Xen domain, no permission).
    pub fn open() -> io::Result<Self> {
        let fd = rustix::fs::open(
            EVTCHN_PATH,
            OFlags::RDWR | OFlags::CLOEXEC | OFlags::NONBLOCK,
            Mode::empty(),
        )?;
        Ok(Self {
            fd,
            bound: BTreeSet::new(),
        })
    }

    /// Allocates a port offered to `remote` for binding and binds it to this handle
    /// (`IOCTL_EVTCHN_BIND_UNBOUND_PORT`): the frontend's side of a channel.
    ///
    /// # Errors
    /// When the device refuses (restricted handle, no free port).
    pub fn bind_unbound_port(&mut self, remote: DomId) -> Result<Port, EvtchnError> {
        let mut arg = BindUnboundPort {
            remote_domain: u32::from(remote),
        };
        // SAFETY: BIND_UNBOUND_PORT takes a struct ioctl_evtchn_bind_unbound_port.
        let port = unsafe { call(self.fd.as_fd(), IOCTL_EVTCHN_BIND_UNBOUND_PORT, &mut arg) }
            .map_err(err)?;
        let port = Port::try_from(port).map_err(|_| err(Errno::INVAL))?;
        self.bound.insert(port);
        Ok(port)
    }

    fn port_ioctl(&self, opcode: Opcode, port: Port) -> Result<(), EvtchnError> {
        let mut arg = PortArg { port };
        // SAFETY: UNBIND and NOTIFY take a struct with one u32 port, which `arg` is.
        unsafe { call(self.fd.as_fd(), opcode, &mut arg) }
            .map(drop)
            .map_err(err)
    }

    /// `IOCTL_EVTCHN_RESET`: empties the device ring and clears its overflow.
    fn reset(&self) -> Result<(), EvtchnError> {
        // SAFETY: RESET takes no argument.
        unsafe {
            call(
                self.fd.as_fd(),
                IOCTL_EVTCHN_RESET,
                std::ptr::null_mut::<u8>(),
            )
        }
        .map(drop)
        .map_err(err)
    }
}

impl EventChannel for XenEventChannel {
    fn bind_interdomain(&mut self, remote: DomId, remote_port: Port) -> Result<Port, EvtchnError> {
        let mut arg = BindInterdomain {
            remote_domain: u32::from(remote),
            remote_port,
        };
        // SAFETY: BIND_INTERDOMAIN takes a struct ioctl_evtchn_bind_interdomain, which `arg` is.
        let port = unsafe { call(self.fd.as_fd(), IOCTL_EVTCHN_BIND_INTERDOMAIN, &mut arg) }
            .map_err(err)?;
        let port = Port::try_from(port).map_err(|_| err(Errno::INVAL))?;
        self.bound.insert(port);
        Ok(port)
    }

    fn unbind(&mut self, port: Port) -> Result<(), EvtchnError> {
        if !self.bound.contains(&port) {
            return Err(EvtchnError::NotBound(port));
        }
        self.port_ioctl(IOCTL_EVTCHN_UNBIND, port)?;
        self.bound.remove(&port);
        Ok(())
    }

    fn notify(&self, port: Port) -> Result<(), EvtchnError> {
        if !self.bound.contains(&port) {
            return Err(EvtchnError::NotBound(port));
        }
        self.port_ioctl(IOCTL_EVTCHN_NOTIFY, port)
    }

    fn pending(&mut self, out: &mut Vec<Port>) -> Result<(), EvtchnError> {
        let mut buf = [0u8; READ_BYTES];
        loop {
            let read = rustix::io::read(&self.fd, &mut buf);
            match read {
                Ok(0) | Err(Errno::AGAIN) => return Ok(()),
                Err(Errno::INTR) => {}
                Ok(n) => self.read_done(Ok(&buf[..n]), out)?,
                Err(e) => return self.read_done(Err(e), out),
            }
        }
    }

    fn read_done(
        &mut self,
        read: Result<&[u8], Errno>,
        out: &mut Vec<Port>,
    ) -> Result<(), EvtchnError> {
        match read {
            Ok(bytes) => {
                out.extend(
                    bytes
                        .chunks_exact(4)
                        .map(|c| u32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
                        .filter(|p| self.bound.contains(p)),
                );
                Ok(())
            }
            Err(Errno::AGAIN | Errno::INTR) => Ok(()),
            Err(Errno::FBIG) => {
                // The ring overflowed: events were dropped, and their ports stay masked
                // until written back. Reset, and report every bound port as pending; the
                // caller checks its rings and unmasks each (harmless where not masked).
                tracing::warn!("evtchn: device ring overflowed; resetting");
                self.reset()?;
                out.extend(self.bound.iter().copied());
                Ok(())
            }
            Err(e) => Err(err(e)),
        }
    }

    fn unmask(&self, port: Port) -> Result<(), EvtchnError> {
        if !self.bound.contains(&port) {
            return Err(EvtchnError::NotBound(port));
        }
        rustix::io::write(&self.fd, &port.to_ne_bytes())
            .map(drop)
            .map_err(err)
    }

    fn unmask_is_write(&self) -> bool {
        true
    }

    fn restrict(&mut self, domid: DomId) -> Result<(), EvtchnError> {
        let mut arg = RestrictDomid { domid };
        // SAFETY: RESTRICT_DOMID takes a struct ioctl_evtchn_restrict_domid, which `arg` is.
        unsafe { call(self.fd.as_fd(), IOCTL_EVTCHN_RESTRICT_DOMID, &mut arg) }
            .map(drop)
            .map_err(err)
    }

    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    //! The request encoding, checked against `include/uapi/xen/evtchn.h` (values as listed in
    //! the project's blkback-facts). This host has no Xen, so these tests check encoding
    //! only.
    use std::mem::size_of;

    use super::*;

    #[test]
    fn request_numbers_match_the_header() {
        assert_eq!(IOCTL_EVTCHN_BIND_INTERDOMAIN as u64, 0x0008_4501);
        assert_eq!(IOCTL_EVTCHN_BIND_UNBOUND_PORT as u64, 0x0004_4502);
        assert_eq!(IOCTL_EVTCHN_UNBIND as u64, 0x0004_4503);
        assert_eq!(IOCTL_EVTCHN_NOTIFY as u64, 0x0004_4504);
        assert_eq!(IOCTL_EVTCHN_RESET as u64, 0x0000_4505);
        assert_eq!(IOCTL_EVTCHN_RESTRICT_DOMID as u64, 0x0002_4506);
    }

    #[test]
    fn layouts_match_the_header() {
        assert_eq!(size_of::<BindInterdomain>(), 8);
        assert_eq!(std::mem::offset_of!(BindInterdomain, remote_port), 4);
        assert_eq!(size_of::<PortArg>(), 4);
        assert_eq!(size_of::<RestrictDomid>(), 2);
    }
}
