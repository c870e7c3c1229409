//! The one absolute-path validator both binaries use for paths that come from outside
//! (XenStore nodes such as `params` and `handoff-socket`, command-line options): absolute,
//! no NUL, no `.` or `..` component, no trailing `/`, and not longer than the caller's
//! limit (`PATH_MAX` less its NUL, or what a unix socket's `sun_path` holds).
//!
//! ```
//! use xen::abspath::{self, BadPath};
//! assert!(abspath::parse(b"/dev/loop0", abspath::PATH_MAX).is_ok());
//! assert_eq!(abspath::parse(b"dev/loop0", abspath::PATH_MAX), Err(BadPath::NotAbsolute));
//! assert_eq!(abspath::parse(b"/dev/../etc", abspath::PATH_MAX), Err(BadPath::DotComponent));
//! ```

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// The longest path a system call takes: `PATH_MAX` (4096) less the terminating NUL.
pub const PATH_MAX: usize = 4095;
/// The longest path a unix socket address holds: `sun_path` (108 bytes) less the NUL.
pub const SOCKET_PATH_MAX: usize = 107;

/// Why a path was refused; the message is the reason alone, for the caller to prefix with
/// what the path was (`--handoff-dir: not an absolute path`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadPath {
    /// Nothing at all.
    Empty,
    /// Does not start with `/`.
    NotAbsolute,
    /// Contains a NUL byte, which no system call can take.
    Nul,
    /// Longer than the limit given.
    TooLong(usize),
    /// A `.` or `..` component, which could lead somewhere else than it seems to.
    DotComponent,
    /// Ends with `/` (names a directory, or nothing at all).
    TrailingSlash,
}

impl BadPath {
    /// The reason as a static string, for errors that carry one (the same as `Display`).
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Empty => "empty",
            Self::NotAbsolute => "not an absolute path",
            Self::Nul => "contains NUL",
            Self::TooLong(PATH_MAX) => "longer than PATH_MAX",
            Self::TooLong(SOCKET_PATH_MAX) => "longer than a unix socket path may be",
            Self::TooLong(_) => "too long",
            Self::DotComponent => "contains a '.' or '..' component",
            Self::TrailingSlash => "ends with '/'",
        }
    }
}

impl std::fmt::Display for BadPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::error::Error for BadPath {}

/// Checks `value` (raw bytes, as XenStore gives them) and returns it as a path.
///
/// # Errors
/// The first [`BadPath`] that applies, in the order the variants are listed.
pub fn parse(value: &[u8], max_len: usize) -> Result<PathBuf, BadPath> {
    if value.is_empty() {
        return Err(BadPath::Empty);
    }
    if value[0] != b'/' {
        return Err(BadPath::NotAbsolute);
    }
    if value.contains(&0) {
        return Err(BadPath::Nul);
    }
    if value.len() > max_len {
        return Err(BadPath::TooLong(max_len));
    }
    if value.split(|&b| b == b'/').any(|c| c == b"." || c == b"..") {
        return Err(BadPath::DotComponent);
    }
    if value.len() > 1 && value.ends_with(b"/") {
        return Err(BadPath::TrailingSlash);
    }
    Ok(Path::new(OsStr::from_bytes(value)).to_path_buf())
}

/// [`parse`] for a path already held as one (a command-line option).
///
/// # Errors
/// As [`parse`].
pub fn check(path: &Path, max_len: usize) -> Result<(), BadPath> {
    parse(path.as_os_str().as_bytes(), max_len).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_absolute_paths() {
        for good in [
            &b"/"[..],
            b"/dev/loop0",
            b"/run/blkbackd/vbd-1-51712.sock",
            b"/a/.b/c..",
        ] {
            assert_eq!(
                parse(good, PATH_MAX).as_deref(),
                Ok(Path::new(OsStr::from_bytes(good)))
            );
        }
        assert!(check(Path::new("/run/blkbackd"), SOCKET_PATH_MAX).is_ok());
    }

    #[test]
    fn refusals_name_the_reason() {
        let long = [b"/".as_slice(), &[b'a'; SOCKET_PATH_MAX]].concat();
        for (bad, why) in [
            (&b""[..], BadPath::Empty),
            (b"dev/loop0", BadPath::NotAbsolute),
            (b"./x", BadPath::NotAbsolute),
            (b"/dev/\0loop0", BadPath::Nul),
            (&long[..], BadPath::TooLong(SOCKET_PATH_MAX)),
            (b"/dev/./loop0", BadPath::DotComponent),
            (b"/dev/..", BadPath::DotComponent),
            (b"/dev/loop0/", BadPath::TrailingSlash),
        ] {
            assert_eq!(parse(bad, SOCKET_PATH_MAX), Err(why), "{bad:?}");
            assert_eq!(why.to_string(), why.as_str());
        }
        assert_eq!(parse(&long, PATH_MAX).map(drop), Ok(()));
        assert_eq!(
            BadPath::TooLong(PATH_MAX).to_string(),
            "longer than PATH_MAX"
        );
        assert_eq!(BadPath::TooLong(10).to_string(), "too long");
        assert_eq!(
            check(Path::new("relative"), PATH_MAX),
            Err(BadPath::NotAbsolute)
        );
    }
}
