//! Choosing the real or the simulated platform by configuration, so that the same binaries run
//! on Xen and on the simulation.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::evtchn::XenEventChannel;
use crate::gntdev::Gntdev;
use crate::{
    DomId, EventChannel, EvtchnError, GrantCopier, GrantMapper, Platform, DOMID_FIRST_RESERVED,
};

/// The environment variable [`PlatformConfig::from_env`] reads.
pub const PLATFORM_ENV: &str = "BLKBACK_PLATFORM";

/// Which platform to use: `xen`, `sim:DIR` (domain 0) or `sim:DIR:DOMID`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlatformConfig {
    /// Real Xen, through the Linux device nodes, as domain 0.
    Xen,
    /// The simulation in `dir` (the `sim` crate), as domain `domid`.
    Sim {
        /// The sim directory.
        dir: PathBuf,
        /// The domain this process plays.
        domid: DomId,
    },
}

/// A platform string that is not `xen`, `sim:DIR` or `sim:DIR:DOMID`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad platform {0:?}: expected \"xen\", \"sim:DIR\" or \"sim:DIR:DOMID\"")]
pub struct ParsePlatformError(String);

/// Opening the platform failed.
#[derive(Debug, thiserror::Error)]
pub enum PlatformError {
    /// A Xen device node could not be opened.
    #[error("opening {path}: {source}")]
    Device {
        /// The device node.
        path: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The environment variable holds a bad value.
    #[error("${PLATFORM_ENV}: {0}")]
    Env(#[source] ParsePlatformError),
}

impl FromStr for PlatformConfig {
    type Err = ParsePlatformError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ParsePlatformError(s.to_owned());
        if s == "xen" {
            return Ok(Self::Xen);
        }
        let rest = s.strip_prefix("sim:").ok_or_else(bad)?;
        // A trailing ":N" is the domid; a directory may itself contain colons.
        let (dir, domid) = match rest.rsplit_once(':') {
            Some((dir, id)) if !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()) => {
                (dir, id.parse::<DomId>().map_err(|_| bad())?)
            }
            _ => (rest, 0),
        };
        if dir.is_empty() || domid >= DOMID_FIRST_RESERVED {
            return Err(bad());
        }
        Ok(Self::Sim {
            dir: PathBuf::from(dir),
            domid,
        })
    }
}

impl std::fmt::Display for PlatformConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Xen => f.write_str("xen"),
            Self::Sim { dir, domid } => write!(f, "sim:{}:{domid}", dir.display()),
        }
    }
}

impl PlatformConfig {
    /// The platform named by `$BLKBACK_PLATFORM`, or [`PlatformConfig::Xen`] when unset.
    ///
    /// # Errors
    /// When the variable is set to something unparsable.
    pub fn from_env() -> Result<Self, PlatformError> {
        match std::env::var(PLATFORM_ENV) {
            Ok(v) => v.parse().map_err(PlatformError::Env),
            Err(std::env::VarError::NotPresent) => Ok(Self::Xen),
            Err(std::env::VarError::NotUnicode(v)) => Err(PlatformError::Env(ParsePlatformError(
                v.to_string_lossy().into_owned(),
            ))),
        }
    }
}

/// Real Xen: `/dev/xen/gntdev`, `/dev/xen/evtchn`, and XenStore found the way libxenstore
/// finds it.
#[derive(Debug)]
pub struct XenPlatform {
    gntdev: Gntdev,
}

/// Grants one gntdev handle may map on kernels that still limit it (before 4.x the default
/// was 1024): enough for 16 queues of 1056 persistent grants plus in-flight maps.
const MAX_GRANTS: u32 = 65536;

impl XenPlatform {
    /// Opens `/dev/xen/gntdev` (event-channel handles are opened per queue) and raises its
    /// grant limit where the kernel has one.
    ///
    /// # Errors
    /// When the device cannot be opened.
    pub fn open() -> Result<Self, PlatformError> {
        let dev = |source| PlatformError::Device {
            path: crate::gntdev::GNTDEV_PATH,
            source,
        };
        let gntdev = Gntdev::open().map_err(dev)?;
        gntdev.set_max_grants(MAX_GRANTS).map_err(dev)?;
        Ok(Self { gntdev })
    }
}

impl Platform for XenPlatform {
    /// The backend runs in dom0. A driver domain would read its id from XenStore (`domid`).
    fn domid(&self) -> DomId {
        0
    }

    fn grant_mapper(&self) -> &dyn GrantMapper {
        &self.gntdev
    }

    fn grant_copier(&self) -> &dyn GrantCopier {
        &self.gntdev
    }

    fn open_event_channel(&self) -> Result<Box<dyn EventChannel>, EvtchnError> {
        Ok(Box::new(XenEventChannel::open()?))
    }

    /// `$XENSTORED_PATH`, else the xenstored socket if present, else `/dev/xen/xenbus`: the
    /// order `xenstore::XenStore::open` uses.
    fn xenstore_path(&self) -> PathBuf {
        if let Some(p) = std::env::var_os("XENSTORED_PATH") {
            return PathBuf::from(p);
        }
        let socket = Path::new(crate::xenstore::DEFAULT_SOCKET);
        if socket.exists() {
            socket.to_owned()
        } else {
            PathBuf::from(crate::xenstore::XENBUS_DEVICE)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_forms() {
        assert_eq!("xen".parse(), Ok(PlatformConfig::Xen));
        assert_eq!(
            "sim:/tmp/s".parse(),
            Ok(PlatformConfig::Sim {
                dir: "/tmp/s".into(),
                domid: 0
            })
        );
        assert_eq!(
            "sim:/tmp/s:7".parse(),
            Ok(PlatformConfig::Sim {
                dir: "/tmp/s".into(),
                domid: 7
            })
        );
        assert_eq!(
            "sim:/a:b/c".parse(),
            Ok(PlatformConfig::Sim {
                dir: "/a:b/c".into(),
                domid: 0
            })
        );
    }

    #[test]
    fn refuses_anything_else() {
        for bad in [
            "",
            "Xen",
            "sim",
            "sim:",
            "sim::3",
            "sim:/d:32752",
            "sim:/d:99999",
            "kvm",
        ] {
            assert!(bad.parse::<PlatformConfig>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn display_round_trips() {
        let c = PlatformConfig::Sim {
            dir: "/x".into(),
            domid: 3,
        };
        assert_eq!(c.to_string().parse(), Ok(c));
    }
}
