//! The xenbus conventions both ends of a split device share: the `state` node's values, how a
//! hostile XenStore number is read, and where device errors are written (Xen's `io/xenbus.h`,
//! Linux's `drivers/xen/xenbus/xenbus_client.c`).

use std::fmt;

/// A xenbus device state (`enum xenbus_state` in Xen's `io/xenbus.h`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XenbusState {
    /// 0: the node is missing or unreadable (a frontend that went away).
    Unknown,
    /// 1: the device is being set up.
    Initialising,
    /// 2: the backend waits for the frontend's details (written after probe).
    InitWait,
    /// 3: the frontend has written its ring details.
    Initialised,
    /// 4: ready for I/O.
    Connected,
    /// 5: the device is being shut down.
    Closing,
    /// 6: the device is shut down.
    Closed,
    /// 7: reconfiguration requested (not used by blkif).
    Reconfiguring,
    /// 8: reconfiguration done (not used by blkif).
    Reconfigured,
}

impl XenbusState {
    /// The number written to XenStore.
    pub fn as_u32(self) -> u32 {
        match self {
            Self::Unknown => 0,
            Self::Initialising => 1,
            Self::InitWait => 2,
            Self::Initialised => 3,
            Self::Connected => 4,
            Self::Closing => 5,
            Self::Closed => 6,
            Self::Reconfiguring => 7,
            Self::Reconfigured => 8,
        }
    }

    /// The state numbered `v`, if any.
    pub fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            0 => Self::Unknown,
            1 => Self::Initialising,
            2 => Self::InitWait,
            3 => Self::Initialised,
            4 => Self::Connected,
            5 => Self::Closing,
            6 => Self::Closed,
            7 => Self::Reconfiguring,
            8 => Self::Reconfigured,
            _ => return None,
        })
    }
}

impl fmt::Display for XenbusState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Self::Unknown => "Unknown",
            Self::Initialising => "Initialising",
            Self::InitWait => "InitWait",
            Self::Initialised => "Initialised",
            Self::Connected => "Connected",
            Self::Closing => "Closing",
            Self::Closed => "Closed",
            Self::Reconfiguring => "Reconfiguring",
            Self::Reconfigured => "Reconfigured",
        };
        write!(f, "{name} ({})", self.as_u32())
    }
}

/// What a `state` node said, read the way Linux's `xenbus_read_driver_state` reads it: a
/// missing or non-numeric node is [`XenbusState::Unknown`]; a number outside the enum is kept
/// so that it can be reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadState {
    /// A known state.
    Known(XenbusState),
    /// A number that names no state.
    Invalid(u32),
}

impl ReadState {
    /// Parses a `state` node's value (`None` when the node is missing).
    pub fn parse(value: Option<&str>) -> Self {
        match value.and_then(parse_decimal) {
            None => Self::Known(XenbusState::Unknown),
            Some(n) => XenbusState::from_u32(n).map_or(Self::Invalid(n), Self::Known),
        }
    }
}

/// Parses an unsigned decimal XenStore value strictly: digits only, no sign, no spaces, no
/// trailing bytes, no overflow. Values come from other domains and are hostile.
pub fn parse_decimal(s: &str) -> Option<u32> {
    if s.is_empty() || s.len() > 10 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// The absolute path of the `error` node for a device at `backend_path`, given the backend
/// domain's home (`/local/domain/<domid>`). A backend path outside the home is used as is
/// below `<home>/error`, with its leading slash dropped.
pub fn error_node_path(home: &str, backend_path: &str) -> String {
    let home = home.trim_end_matches('/');
    let rel = backend_path
        .strip_prefix(home)
        .and_then(|r| r.strip_prefix('/'))
        .unwrap_or_else(|| backend_path.trim_start_matches('/'));
    format!("{home}/error/{rel}/error")
}

#[cfg(test)]
mod tests {
    use super::*;
    use XenbusState::*;

    fn known(s: XenbusState) -> ReadState {
        ReadState::Known(s)
    }

    #[test]
    fn parses_states_like_linux() {
        assert_eq!(ReadState::parse(None), known(Unknown));
        assert_eq!(ReadState::parse(Some("")), known(Unknown));
        assert_eq!(ReadState::parse(Some("x")), known(Unknown));
        assert_eq!(ReadState::parse(Some("4")), known(Connected));
        assert_eq!(ReadState::parse(Some("9")), ReadState::Invalid(9));
        assert_eq!(ReadState::parse(Some("-1")), known(Unknown));
        assert_eq!(ReadState::parse(Some("99999999999")), known(Unknown));
    }

    #[test]
    fn decimal_parse_is_strict() {
        assert_eq!(parse_decimal("0"), Some(0));
        assert_eq!(parse_decimal("4294967295"), Some(u32::MAX));
        assert_eq!(parse_decimal("4294967296"), None);
        assert_eq!(parse_decimal(" 1"), None);
        assert_eq!(parse_decimal("1 "), None);
        assert_eq!(parse_decimal("+1"), None);
        assert_eq!(parse_decimal("0x1"), None);
    }

    #[test]
    fn round_trips_every_state() {
        for n in 0..=8 {
            let s = XenbusState::from_u32(n).unwrap();
            assert_eq!(s.as_u32(), n);
            assert_eq!(ReadState::parse(Some(&n.to_string())), known(s));
        }
    }

    #[test]
    fn error_path_is_relative_to_the_home() {
        assert_eq!(
            error_node_path("/local/domain/0", "/local/domain/0/backend/vbd/5/51712"),
            "/local/domain/0/error/backend/vbd/5/51712/error"
        );
        assert_eq!(
            error_node_path("/local/domain/7/", "/local/domain/7/backend/vbd/5/768"),
            "/local/domain/7/error/backend/vbd/5/768/error"
        );
        // A prefix that is not a whole path component is not the home.
        assert_eq!(
            error_node_path("/local/domain/1", "/local/domain/12/backend/vbd/5/768"),
            "/local/domain/1/error/local/domain/12/backend/vbd/5/768/error"
        );
    }
}
