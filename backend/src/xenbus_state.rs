//! The backend half of the xenbus state machine, as pure functions over states.
//!
//! Linux's `drivers/block/xen-blkback/xenbus.c` (`frontend_changed`) decides what the backend
//! does when the frontend's `state` node changes; this module makes the same decisions without
//! touching XenStore, so that they can be tested on their own and the driver loop in
//! [`crate::serve`] only carries them out.

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

    fn from_u32(v: u32) -> Option<Self> {
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

/// What the backend does when the frontend's state changes (Linux `frontend_changed`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrontendAction {
    /// Nothing to do.
    Nothing,
    /// The frontend starts over after the backend closed (reboot, kexec): back to InitWait.
    PrepareReconnect,
    /// The frontend published its rings: drop any old connection, read the frontend's keys,
    /// and connect once the device is held.
    Connect,
    /// The frontend is closing: follow it to Closing.
    Closing,
    /// The frontend closed: disconnect and switch to Closed; when the toolstack has set
    /// `online` to 0, the device is also removed.
    Close {
        /// Whether to remove the device (and end this backend) after closing.
        remove: bool,
    },
    /// The frontend is gone (state Unknown): disconnect and remove the device.
    Remove,
    /// A state the protocol does not allow at the frontend: fatal for the device.
    Fatal(u32),
}

/// Decides the backend's reaction to the frontend's new state, given the backend's own state
/// and the backend's `online` node.
pub fn on_frontend_state(own: XenbusState, frontend: ReadState, online: bool) -> FrontendAction {
    let frontend = match frontend {
        ReadState::Known(s) => s,
        ReadState::Invalid(n) => return FrontendAction::Fatal(n),
    };
    match frontend {
        XenbusState::Initialising if own == XenbusState::Closed => FrontendAction::PrepareReconnect,
        XenbusState::Initialising => FrontendAction::Nothing,
        // Two watch events in close succession may skip Initialised: connect on either.
        XenbusState::Initialised | XenbusState::Connected if own == XenbusState::Connected => {
            FrontendAction::Nothing
        }
        XenbusState::Initialised | XenbusState::Connected => FrontendAction::Connect,
        XenbusState::Closing => FrontendAction::Closing,
        XenbusState::Closed => FrontendAction::Close { remove: !online },
        XenbusState::Unknown => FrontendAction::Remove,
        other
        @ (XenbusState::InitWait | XenbusState::Reconfiguring | XenbusState::Reconfigured) => {
            FrontendAction::Fatal(other.as_u32())
        }
    }
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
    fn connects_on_initialised_or_connected_unless_connected() {
        for own in [InitWait, Closed, Closing] {
            for fe in [Initialised, Connected] {
                assert_eq!(
                    on_frontend_state(own, known(fe), true),
                    FrontendAction::Connect
                );
            }
        }
        assert_eq!(
            on_frontend_state(Connected, known(Initialised), true),
            FrontendAction::Nothing
        );
        assert_eq!(
            on_frontend_state(Connected, known(Connected), true),
            FrontendAction::Nothing
        );
    }

    #[test]
    fn reconnects_only_after_closed() {
        assert_eq!(
            on_frontend_state(Closed, known(Initialising), true),
            FrontendAction::PrepareReconnect
        );
        assert_eq!(
            on_frontend_state(InitWait, known(Initialising), true),
            FrontendAction::Nothing
        );
        assert_eq!(
            on_frontend_state(Connected, known(Initialising), true),
            FrontendAction::Nothing
        );
    }

    #[test]
    fn closes_and_removes_when_offline() {
        assert_eq!(
            on_frontend_state(Connected, known(Closing), true),
            FrontendAction::Closing
        );
        assert_eq!(
            on_frontend_state(Closing, known(Closed), true),
            FrontendAction::Close { remove: false }
        );
        assert_eq!(
            on_frontend_state(Closing, known(Closed), false),
            FrontendAction::Close { remove: true }
        );
        assert_eq!(
            on_frontend_state(Connected, known(Unknown), true),
            FrontendAction::Remove
        );
    }

    #[test]
    fn other_frontend_states_are_fatal() {
        assert_eq!(
            on_frontend_state(InitWait, known(InitWait), true),
            FrontendAction::Fatal(2)
        );
        assert_eq!(
            on_frontend_state(InitWait, known(Reconfiguring), true),
            FrontendAction::Fatal(7)
        );
        assert_eq!(
            on_frontend_state(InitWait, ReadState::Invalid(42), true),
            FrontendAction::Fatal(42)
        );
    }
}
