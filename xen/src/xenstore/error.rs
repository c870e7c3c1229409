//! XenStore errors: xenstored's errno names (`xsd_errors` in `xs_wire.h`: EINVAL ... E2BIG,
//! EPERM; plus oxenstored's EQUOTA) as typed variants, plus what can go wrong on this side of
//! the connection.

/// A XenStore failure. The variants up to [`XsError::Other`] are xenstored's replies
/// (`XS_ERROR` with an errno name); the rest arise locally.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum XsError {
    /// ENOENT: the node (or watch) does not exist.
    #[error("no such node (ENOENT)")]
    NotFound,
    /// EACCES: the node's permissions refuse this domain.
    #[error("permission denied (EACCES)")]
    PermissionDenied,
    /// EPERM: the operation needs a privileged connection.
    #[error("operation not permitted (EPERM)")]
    NotPermitted,
    /// EINVAL: a malformed path, value, permission or request.
    #[error("invalid argument (EINVAL)")]
    Invalid,
    /// E2BIG: too big (a path, a reply, or too many watches).
    #[error("too big (E2BIG)")]
    TooBig,
    /// EAGAIN: the transaction conflicted with another change; run it again.
    #[error("transaction conflict, try again (EAGAIN)")]
    Again,
    /// EEXIST: already exists (e.g. the same watch twice).
    #[error("already exists (EEXIST)")]
    Exists,
    /// EISDIR: is a directory.
    #[error("is a directory (EISDIR)")]
    IsDir,
    /// ENOSPC: no space (e.g. too many transactions).
    #[error("no space (ENOSPC)")]
    NoSpace,
    /// EQUOTA: a per-domain quota is exhausted (oxenstored's reply; C xenstored answers
    /// ENOSPC or E2BIG instead).
    #[error("quota exceeded (EQUOTA)")]
    Quota,
    /// ENOMEM: xenstored ran out of memory (or a memory quota).
    #[error("out of memory (ENOMEM)")]
    NoMemory,
    /// EIO: xenstored failed internally.
    #[error("I/O error in xenstored (EIO)")]
    RemoteIo,
    /// ENOTEMPTY: not empty.
    #[error("not empty (ENOTEMPTY)")]
    NotEmpty,
    /// ENOSYS: the operation is not implemented by this xenstored.
    #[error("not implemented (ENOSYS)")]
    NotSupported,
    /// EROFS: xenstored is read-only.
    #[error("read-only (EROFS)")]
    ReadOnly,
    /// EBUSY: busy.
    #[error("busy (EBUSY)")]
    Busy,
    /// EISCONN: already connected.
    #[error("already connected (EISCONN)")]
    AlreadyConnected,
    /// An errno name this client does not know.
    #[error("xenstored error {0}")]
    Other(String),
    /// The request would exceed the payload limit of the transport (4096 bytes on the socket,
    /// 4080 on `/dev/xen/xenbus`); caught before sending.
    #[error("request payload of {len} bytes exceeds the limit of {max}")]
    PayloadTooLarge {
        /// The payload length the request needed.
        len: usize,
        /// The transport's limit.
        max: usize,
    },
    /// A path or token that cannot be sent (empty, or containing NUL).
    #[error("invalid path or token {0:?}")]
    BadArgument(String),
    /// xenstored broke the protocol (unexpected reply type, malformed payload).
    #[error("protocol violation by xenstored: {0}")]
    Protocol(String),
    /// The connection is closed (by xenstored, by an I/O error, or by dropping the client);
    /// every pending and later request gets this.
    #[error("XenStore connection closed")]
    Closed,
    /// Opening or using the connection failed.
    #[error("XenStore I/O error")]
    Io(#[from] std::io::Error),
}

/// Makes the variant for one errno name.
type MakeError = fn() -> XsError;

/// The errno names of xenstored's replies and their variants, one table for both directions.
const ERRNO_NAMES: &[(&str, MakeError)] = &[
    ("ENOENT", || XsError::NotFound),
    ("EACCES", || XsError::PermissionDenied),
    ("EPERM", || XsError::NotPermitted),
    ("EINVAL", || XsError::Invalid),
    ("E2BIG", || XsError::TooBig),
    ("EAGAIN", || XsError::Again),
    ("EEXIST", || XsError::Exists),
    ("EISDIR", || XsError::IsDir),
    ("ENOSPC", || XsError::NoSpace),
    ("EQUOTA", || XsError::Quota),
    ("ENOMEM", || XsError::NoMemory),
    ("EIO", || XsError::RemoteIo),
    ("ENOTEMPTY", || XsError::NotEmpty),
    ("ENOSYS", || XsError::NotSupported),
    ("EROFS", || XsError::ReadOnly),
    ("EBUSY", || XsError::Busy),
    ("EISCONN", || XsError::AlreadyConnected),
];

impl XsError {
    /// The error for an `XS_ERROR` payload's errno name (without its NUL).
    pub fn from_errno_name(name: &str) -> Self {
        ERRNO_NAMES
            .iter()
            .find(|(n, _)| *n == name)
            .map_or_else(|| Self::Other(name.to_owned()), |(_, make)| make())
    }

    /// The errno name xenstored sends for this error, `None` for local errors.
    pub fn errno_name(&self) -> Option<&str> {
        match self {
            Self::Other(name) => Some(name),
            _ => ERRNO_NAMES
                .iter()
                .find(|(_, make)| std::mem::discriminant(&make()) == std::mem::discriminant(self))
                .map(|(n, _)| *n),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for (name, _) in ERRNO_NAMES {
            assert_eq!(XsError::from_errno_name(name).errno_name(), Some(*name));
        }
        assert!(matches!(
            XsError::from_errno_name("ENOENT"),
            XsError::NotFound
        ));
        assert!(matches!(XsError::from_errno_name("EWHAT"), XsError::Other(n) if n == "EWHAT"));
        assert_eq!(XsError::Closed.errno_name(), None);
    }
}
