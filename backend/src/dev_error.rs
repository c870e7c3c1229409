//! Device errors reported the way Linux's `xenbus_dev_error`/`xenbus_dev_fatal` report them,
//! so that toolstacks that read them (libxl does) find them where they look.
//!
//! Linux (`drivers/xen/xenbus/xenbus_client.c`, `xenbus_va_dev_error`) writes
//! `"%i %s"` (the positive errno, a space, the message) to `error/<nodename>/error`, a path
//! relative to the backend domain's home, where `<nodename>` is the device's path relative to
//! that home (`backend/vbd/<frontend-domid>/<devid>`). A fatal error then switches the device
//! to Closing.

use std::fmt;

/// An error that ends the device's current connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevError {
    /// The positive errno Linux would report.
    pub errno: i32,
    /// What went wrong, in Linux's words where Linux has words for it.
    pub message: String,
}

impl DevError {
    /// An error with an errno and message.
    pub fn new(errno: i32, message: impl Into<String>) -> Self {
        Self {
            errno,
            message: message.into(),
        }
    }

    /// The node value Linux writes: `"<errno> <message>"`.
    pub fn node_value(&self) -> String {
        format!("{} {}", self.errno, self.message)
    }
}

impl fmt::Display for DevError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (errno {})", self.message, self.errno)
    }
}

impl std::error::Error for DevError {}

/// Errno values used in device errors (Linux's numbers, which toolstacks print).
pub mod errno {
    /// No such file or directory.
    pub const ENOENT: i32 = 2;
    /// I/O error.
    pub const EIO: i32 = 5;
    /// Out of memory.
    pub const ENOMEM: i32 = 12;
    /// Device or resource busy.
    pub const EBUSY: i32 = 16;
    /// No such device.
    pub const ENODEV: i32 = 19;
    /// Invalid argument.
    pub const EINVAL: i32 = 22;
    /// Read-only file system (a read-only NBD export behind a writable vbd).
    pub const EROFS: i32 = 30;
    /// Function not implemented (Linux's answer to an unknown protocol or queue count).
    pub const ENOSYS: i32 = 38;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_like_linux() {
        let e = DevError::new(
            errno::EINVAL,
            "reading /local/domain/5/device/vbd/51712/event-channel",
        );
        assert_eq!(
            e.node_value(),
            "22 reading /local/domain/5/device/vbd/51712/event-channel"
        );
    }
}
