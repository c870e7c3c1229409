//! The backend half of the xenbus state machine, as pure functions over states.
//!
//! Linux's `drivers/block/xen-blkback/xenbus.c` (`frontend_changed`) decides what the backend
//! does when the frontend's `state` node changes; this module makes the same decisions without
//! touching XenStore, so that they can be tested on their own and the driver loop in
//! [`crate::serve`] only carries them out.

use xen::xenbus::{ReadState, XenbusState};

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
