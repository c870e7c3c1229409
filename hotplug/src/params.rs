//! The toolstack's `params` and `mode` nodes, parsed strictly before anything is opened.
use std::path::PathBuf;

use xen::abspath;

use crate::Error;

/// How the guest may use the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `r`: read-only.
    ReadOnly,
    /// `w`: read-write.
    ReadWrite,
}

impl Mode {
    /// Parses `mode`: `r` or `w`, optionally followed by `!` (xend's "shared anyway" marker,
    /// which changes nothing here).
    ///
    /// # Errors
    /// [`Error::BadMode`].
    pub fn parse(value: &[u8]) -> Result<Self, Error> {
        match value {
            b"r" | b"r!" => Ok(Self::ReadOnly),
            b"w" | b"w!" => Ok(Self::ReadWrite),
            _ => Err(Error::BadMode(String::from_utf8_lossy(value).into_owned())),
        }
    }

    /// Whether writing is allowed.
    #[must_use]
    pub fn writable(self) -> bool {
        self == Self::ReadWrite
    }
}

/// What `params` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A regular file (served through a loop device) or a block device; which one is decided
    /// on the opened fd, never on the path.
    Path(PathBuf),
    /// An existing device-mapper device, `/dev/mapper/NAME`: opened, then verified to be that
    /// device-mapper device.
    Mapper {
        /// The device-mapper name.
        name: String,
        /// `/dev/mapper/NAME`.
        path: PathBuf,
    },
    /// `linear:/dev/BLOCKDEV`: blkhotplug creates a private device-mapper linear device over
    /// the whole block device, removed automatically once the backend lets go of it.
    Linear(PathBuf),
}

/// The prefix of [`Source::Linear`].
pub const LINEAR_PREFIX: &str = "linear:";
const MAPPER_DIR: &str = "/dev/mapper/";
/// Longest device-mapper name (`DM_NAME_LEN` less the NUL).
pub const DM_NAME_MAX: usize = 127;

impl Source {
    /// Parses `params`: an absolute path with no `.` or `..` component and no NUL; paths under
    /// `/dev/mapper/` must name a valid device-mapper device; `linear:` wraps a block device.
    ///
    /// # Errors
    /// [`Error::BadParams`] or [`Error::BadDmName`].
    pub fn parse(value: &[u8]) -> Result<Self, Error> {
        let bad = |why| Error::BadParams {
            params: String::from_utf8_lossy(value).into_owned(),
            why,
        };
        if let Some(rest) = value.strip_prefix(LINEAR_PREFIX.as_bytes()) {
            return Ok(Self::Linear(absolute_path(rest).map_err(bad)?));
        }
        let path = absolute_path(value).map_err(bad)?;
        if let Some(name) = value.strip_prefix(MAPPER_DIR.as_bytes()) {
            let name = dm_name(name)?;
            return Ok(Self::Mapper { name, path });
        }
        Ok(Self::Path(path))
    }
}

fn absolute_path(value: &[u8]) -> Result<PathBuf, &'static str> {
    abspath::parse(value, abspath::PATH_MAX).map_err(abspath::BadPath::as_str)
}

/// Validates a device-mapper name: 1 to 127 printable ASCII characters, no `/`, not `control`,
/// `.` or `..` (names device-mapper or `/dev/mapper/` would misread).
///
/// # Errors
/// [`Error::BadDmName`].
pub fn dm_name(name: &[u8]) -> Result<String, Error> {
    let bad = |why| Error::BadDmName {
        name: String::from_utf8_lossy(name).into_owned(),
        why,
    };
    if name.is_empty() {
        return Err(bad("empty"));
    }
    if name.len() > DM_NAME_MAX {
        return Err(bad("longer than 127 bytes"));
    }
    if name.contains(&b'/') {
        return Err(bad("contains '/'"));
    }
    if matches!(name, b"control" | b"." | b"..") {
        return Err(bad("reserved name"));
    }
    if !name.iter().all(|b| b.is_ascii_graphic()) {
        return Err(bad("not printable ASCII without spaces"));
    }
    Ok(String::from_utf8_lossy(name).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes() {
        assert_eq!(Mode::parse(b"r").ok(), Some(Mode::ReadOnly));
        assert_eq!(Mode::parse(b"w").ok(), Some(Mode::ReadWrite));
        assert_eq!(Mode::parse(b"w!").ok(), Some(Mode::ReadWrite));
        for bad in [&b""[..], b"rw", b"W", b"r ", b"x", b"w!!", b"!"] {
            assert!(
                matches!(Mode::parse(bad), Err(Error::BadMode(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn sources() {
        assert_eq!(
            Source::parse(b"/srv/disk.img").ok(),
            Some(Source::Path("/srv/disk.img".into()))
        );
        assert_eq!(
            Source::parse(b"/dev/mapper/vg-lv").ok(),
            Some(Source::Mapper {
                name: "vg-lv".into(),
                path: "/dev/mapper/vg-lv".into()
            })
        );
        assert_eq!(
            Source::parse(b"linear:/dev/sdb").ok(),
            Some(Source::Linear("/dev/sdb".into()))
        );
        for bad in [
            &b""[..],
            b"disk.img",
            b"./disk.img",
            b"/srv/../etc/shadow",
            b"/srv/./d",
            b"/srv/d\0x",
            b"/srv/",
            b"linear:",
            b"linear:sdb",
        ] {
            assert!(
                matches!(Source::parse(bad), Err(Error::BadParams { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn dm_names() {
        for bad in [
            &b"/dev/mapper/control"[..],
            b"/dev/mapper/.",
            b"/dev/mapper/..",
            b"/dev/mapper/a/b",
            b"/dev/mapper/",
            b"/dev/mapper/a b",
            b"/dev/mapper/\xff",
        ] {
            assert!(
                matches!(
                    Source::parse(bad),
                    Err(Error::BadDmName { .. } | Error::BadParams { .. })
                ),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        // "." and ".." never get past the path check; the name check refuses them too.
        assert!(matches!(dm_name(b".."), Err(Error::BadDmName { .. })));
        assert!(matches!(dm_name(b"control"), Err(Error::BadDmName { .. })));
        assert!(matches!(
            dm_name(&[b'a'; 128]),
            Err(Error::BadDmName { .. })
        ));
        assert_eq!(dm_name(&[b'a'; 127]).map(|s| s.len()).ok(), Some(127));
    }
}
