//! The one name of a virtual block device's backend directory, shared by blkbackd and
//! blkhotplug: `/local/domain/<backend-domid>/backend/vbd/<frontend-domid>/<devid>`, or the
//! relative form libxl passes hotplug scripts in `XENBUS_PATH` (`backend/vbd/<frontend-domid>/<devid>`,
//! which xenstored resolves against the connection's own domain).
//!
//! ```
//! use xen::xenstore::BackendPath;
//! let be = BackendPath::parse("/local/domain/0/backend/vbd/5/51712").unwrap();
//! assert_eq!((be.backend_domid(), be.frontend_domid(), be.devid()), (Some(0), 5, 51712));
//! assert_eq!(be.node("state"), "/local/domain/0/backend/vbd/5/51712/state");
//! assert_eq!(be.relative(), "backend/vbd/5/51712");
//! assert_eq!(be.file_stem(), "vbd-5-51712");
//! assert_eq!(BackendPath::new(0, 5, 51712), be);
//! ```

use std::fmt;

use crate::DomId;

/// The absolute form, for messages.
const ABSOLUTE_FORM: &str = "/local/domain/<backend-domid>/backend/vbd/<frontend-domid>/<devid>";
/// Both forms a hotplug script accepts, for messages.
const XENBUS_FORMS: &str = "/local/domain/<backend-domid>/backend/vbd/<frontend-domid>/<devid> \
                            or backend/vbd/<frontend-domid>/<devid>";

/// A backend directory path that is not one of the accepted forms.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("backend path {path:?} is not {expected}")]
pub struct BadBackendPath {
    /// The path given.
    pub path: String,
    /// The form(s) that were accepted.
    pub expected: &'static str,
}

/// A virtual block device's backend directory: the backend domain (unknown for the relative
/// form), the frontend domain and the virtual device number. Parsing and formatting are
/// each other's inverse: [`BackendPath::as_str`] is the path parsed (numbers without leading
/// zeros or signs).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BackendPath {
    backend_domid: Option<DomId>,
    frontend_domid: DomId,
    devid: u32,
    path: String,
}

/// A decimal number as XenStore paths spell it: digits only, no leading zero.
fn decimal<T: std::str::FromStr>(s: &str) -> Option<T> {
    let canonical =
        !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'));
    canonical.then(|| s.parse().ok()).flatten()
}

impl BackendPath {
    /// The absolute path for a backend domain, frontend domain and device.
    #[must_use]
    pub fn new(backend_domid: DomId, frontend_domid: DomId, devid: u32) -> Self {
        Self {
            backend_domid: Some(backend_domid),
            frontend_domid,
            devid,
            path: format!("/local/domain/{backend_domid}/backend/vbd/{frontend_domid}/{devid}"),
        }
    }

    /// Parses the absolute form,
    /// `/local/domain/<backend-domid>/backend/vbd/<frontend-domid>/<devid>`.
    ///
    /// # Errors
    /// [`BadBackendPath`] for anything else (including the relative form).
    pub fn parse(path: &str) -> Result<Self, BadBackendPath> {
        let bad = || BadBackendPath {
            path: path.to_owned(),
            expected: ABSOLUTE_FORM,
        };
        match path.split('/').collect::<Vec<_>>().as_slice() {
            ["", "local", "domain", be, "backend", "vbd", fe, dev] => Ok(Self::new(
                decimal(be).ok_or_else(bad)?,
                decimal(fe).ok_or_else(bad)?,
                decimal(dev).ok_or_else(bad)?,
            )),
            _ => Err(bad()),
        }
    }

    /// Parses what a hotplug script is given in `XENBUS_PATH`: the absolute form, or the
    /// relative `backend/vbd/<frontend-domid>/<devid>` that libxl passes.
    ///
    /// # Errors
    /// [`BadBackendPath`] for anything else.
    pub fn parse_xenbus_path(path: &str) -> Result<Self, BadBackendPath> {
        let bad = || BadBackendPath {
            path: path.to_owned(),
            expected: XENBUS_FORMS,
        };
        match path.split('/').collect::<Vec<_>>().as_slice() {
            ["backend", "vbd", fe, dev] => Ok(Self {
                backend_domid: None,
                frontend_domid: decimal(fe).ok_or_else(bad)?,
                devid: decimal(dev).ok_or_else(bad)?,
                path: path.to_owned(),
            }),
            _ => Self::parse(path).map_err(|_| bad()),
        }
    }

    /// The backend domain, `None` for the relative form (it is the domain of whoever
    /// connected to XenStore).
    #[must_use]
    pub fn backend_domid(&self) -> Option<DomId> {
        self.backend_domid
    }

    /// The frontend (guest) domain.
    #[must_use]
    pub fn frontend_domid(&self) -> DomId {
        self.frontend_domid
    }

    /// The virtual device number.
    #[must_use]
    pub fn devid(&self) -> u32 {
        self.devid
    }

    /// The whole path, as parsed or built.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.path
    }

    /// A node below the directory: `<path>/<name>`.
    #[must_use]
    pub fn node(&self, name: &str) -> String {
        format!("{}/{name}", self.path)
    }

    /// The path relative to the backend domain's home, `backend/vbd/<frontend-domid>/<devid>`:
    /// Linux's `nodename` of the device, below which `xenbus_dev_error` writes
    /// `error/<nodename>/error`.
    #[must_use]
    pub fn relative(&self) -> String {
        format!("backend/vbd/{}/{}", self.frontend_domid, self.devid)
    }

    /// A file-name-safe name of the device, `vbd-<frontend-domid>-<devid>`, for its handoff
    /// socket, statistics file and thread names.
    #[must_use]
    pub fn file_stem(&self) -> String {
        format!("vbd-{}-{}", self.frontend_domid, self.devid)
    }
}

impl fmt::Display for BackendPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.path)
    }
}

impl std::str::FromStr for BackendPath {
    type Err = BadBackendPath;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absolute_round_trip() {
        let p = BackendPath::parse("/local/domain/0/backend/vbd/5/51712").unwrap();
        assert_eq!(
            (p.backend_domid(), p.frontend_domid(), p.devid()),
            (Some(0), 5, 51712)
        );
        assert_eq!(p, BackendPath::new(0, 5, 51712));
        assert_eq!(p.as_str(), "/local/domain/0/backend/vbd/5/51712");
        assert_eq!(p.to_string(), p.as_str());
        assert_eq!(p.node("state"), "/local/domain/0/backend/vbd/5/51712/state");
        assert_eq!(p.relative(), "backend/vbd/5/51712");
        assert_eq!(p.file_stem(), "vbd-5-51712");
        assert_eq!(
            "/local/domain/7/backend/vbd/1/768".parse(),
            Ok(BackendPath::new(7, 1, 768))
        );
    }

    #[test]
    fn refusals() {
        for bad in [
            "",
            "/",
            "/local/domain/0/backend/vbd/5",
            "/local/domain/0/backend/vif/5/0",
            "/local/domain/0/backend/vbd/5/51712/",
            "/local/domain//backend/vbd/5/51712",
            "/local/domain/x/backend/vbd/5/51712",
            "/local/domain/0/backend/vbd/65536/51712",
            "/local/domain/0/backend/vbd/5/4294967296",
            "/local/domain/0/backend/vbd/+5/51712",
            "/local/domain/0/backend/vbd/05/51712",
            "/local/domain/0/backend/vbd/5/51712\n",
            "local/domain/0/backend/vbd/5/51712",
            "backend/vbd/5/51712",
        ] {
            let e = BackendPath::parse(bad).unwrap_err();
            assert_eq!(e.path, bad);
            assert!(e.to_string().contains(ABSOLUTE_FORM), "{e}");
        }
    }

    #[test]
    fn xenbus_path_forms() {
        let rel = BackendPath::parse_xenbus_path("backend/vbd/3/51712").unwrap();
        assert_eq!(
            (rel.backend_domid(), rel.frontend_domid(), rel.devid()),
            (None, 3, 51712)
        );
        assert_eq!(rel.node("params"), "backend/vbd/3/51712/params");
        assert_eq!(rel.relative(), rel.as_str());
        assert_eq!(
            BackendPath::parse_xenbus_path("/local/domain/0/backend/vbd/3/51712"),
            Ok(BackendPath::new(0, 3, 51712))
        );
        for bad in [
            "",
            "/",
            "/a//b",
            "a//b",
            "/a/b/",
            "/a b",
            "@releaseDomain",
            "backend/vbd/3",
            "backend/vbd/3/51712/",
            "backend/vbd/x/51712",
            "/backend/vbd/3/51712",
            "backend/vif/3/0",
        ] {
            let e = BackendPath::parse_xenbus_path(bad).unwrap_err();
            assert!(e.to_string().contains(XENBUS_FORMS), "{e}");
        }
    }
}
