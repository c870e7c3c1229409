//! The two messages of the fd handoff, byte for byte (see the table in [`super`]): the
//! device message the hotplug side sends with the fd, and the backend's reply.

use rustix::io::Errno;

use super::{HandoffError, PhysicalDevice, MAX_MAJOR, MAX_MINOR};

/// The version of the fd handoff message this module speaks.
pub const HANDOFF_VERSION: u16 = 1;
/// Length of the device message.
pub const DEVICE_MESSAGE_LEN: usize = 24;
/// Length of the reply message.
pub const REPLY_LEN: usize = 8;
const DEVICE_MAGIC: [u8; 4] = *b"XBHO";
const REPLY_MAGIC: [u8; 4] = *b"XBHR";
const FLAG_READ_ONLY: u16 = 1;

/// What the hotplug side says about the fd it hands over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceInfo {
    /// The device; `diskseq` `None` is sent as 0.
    pub device: PhysicalDevice,
    /// The fd is read-only (`O_RDONLY`); otherwise it is `O_RDWR`.
    pub read_only: bool,
}

impl DeviceInfo {
    /// What is said about a stream socket connected to the NBD server `params` names: device
    /// `0:0` (major 0 is no block device's) and no diskseq.
    #[must_use]
    pub const fn nbd_socket(read_only: bool) -> Self {
        Self {
            device: PhysicalDevice {
                major: 0,
                minor: 0,
                diskseq: None,
            },
            read_only,
        }
    }

    /// Whether this describes an NBD connection ([`DeviceInfo::nbd_socket`]).
    #[must_use]
    pub const fn is_nbd_socket(&self) -> bool {
        self.device.major == 0 && self.device.minor == 0 && self.device.diskseq.is_none()
    }

    /// The version-1 wire form.
    #[must_use]
    pub fn encode(&self) -> [u8; DEVICE_MESSAGE_LEN] {
        let mut m = [0u8; DEVICE_MESSAGE_LEN];
        m[0..4].copy_from_slice(&DEVICE_MAGIC);
        m[4..6].copy_from_slice(&HANDOFF_VERSION.to_le_bytes());
        let flags = if self.read_only { FLAG_READ_ONLY } else { 0 };
        m[6..8].copy_from_slice(&flags.to_le_bytes());
        m[8..12].copy_from_slice(&self.device.major.to_le_bytes());
        m[12..16].copy_from_slice(&self.device.minor.to_le_bytes());
        m[16..24].copy_from_slice(&self.device.diskseq.unwrap_or(0).to_le_bytes());
        m
    }

    /// Parses the wire form, refusing anything but a well-formed version-1 message.
    ///
    /// # Errors
    /// [`HandoffError::BadMessage`] or [`HandoffError::Version`].
    pub fn decode(m: &[u8]) -> Result<Self, HandoffError> {
        let m: &[u8; DEVICE_MESSAGE_LEN] = m
            .try_into()
            .map_err(|_| HandoffError::BadMessage("wrong length"))?;
        if m[0..4] != DEVICE_MAGIC {
            return Err(HandoffError::BadMessage("bad magic"));
        }
        let version = u16::from_le_bytes([m[4], m[5]]);
        if version != HANDOFF_VERSION {
            return Err(HandoffError::Version(version));
        }
        let flags = u16::from_le_bytes([m[6], m[7]]);
        if flags & !FLAG_READ_ONLY != 0 {
            return Err(HandoffError::BadMessage("unknown flags"));
        }
        let major = u32::from_le_bytes([m[8], m[9], m[10], m[11]]);
        let minor = u32::from_le_bytes([m[12], m[13], m[14], m[15]]);
        if major > MAX_MAJOR || minor > MAX_MINOR {
            return Err(HandoffError::BadMessage("device number out of range"));
        }
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&m[16..24]);
        let seq = u64::from_le_bytes(seq);
        Ok(Self {
            device: PhysicalDevice {
                major,
                minor,
                diskseq: (seq != 0).then_some(seq),
            },
            read_only: flags & FLAG_READ_ONLY != 0,
        })
    }
}

/// The backend's answer to a device message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// The backend holds the device now.
    Accepted,
    /// The backend refused the device, with an errno saying why.
    Rejected(Errno),
}

impl Reply {
    /// The wire form.
    #[must_use]
    pub fn encode(self) -> [u8; REPLY_LEN] {
        let code: u32 = match self {
            Self::Accepted => 0,
            // A refusal must never read as acceptance.
            Self::Rejected(e) => u32::try_from(e.raw_os_error())
                .ok()
                .filter(|&c| c != 0)
                .unwrap_or(5),
        };
        let mut m = [0u8; REPLY_LEN];
        m[0..4].copy_from_slice(&REPLY_MAGIC);
        m[4..8].copy_from_slice(&code.to_le_bytes());
        m
    }

    /// Parses the wire form.
    ///
    /// # Errors
    /// [`HandoffError::BadMessage`].
    pub fn decode(m: &[u8]) -> Result<Self, HandoffError> {
        let m: &[u8; REPLY_LEN] = m
            .try_into()
            .map_err(|_| HandoffError::BadMessage("wrong reply length"))?;
        if m[0..4] != REPLY_MAGIC {
            return Err(HandoffError::BadMessage("bad reply magic"));
        }
        let code = u32::from_le_bytes([m[4], m[5], m[6], m[7]]);
        if code == 0 {
            return Ok(Self::Accepted);
        }
        let code =
            i32::try_from(code).map_err(|_| HandoffError::BadMessage("reply code out of range"))?;
        Ok(Self::Rejected(Errno::from_raw_os_error(code)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handoff::physical_device::tests::pd;

    #[test]
    fn device_message_layout() {
        let info = DeviceInfo {
            device: pd(0x103, 0x20, Some(0x1122_3344_5566_7788)),
            read_only: true,
        };
        let m = info.encode();
        assert_eq!(&m[0..4], b"XBHO");
        assert_eq!(&m[4..6], &[1, 0]);
        assert_eq!(&m[6..8], &[1, 0]);
        assert_eq!(&m[8..12], &[0x03, 0x01, 0, 0]);
        assert_eq!(&m[12..16], &[0x20, 0, 0, 0]);
        assert_eq!(
            &m[16..24],
            &[0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11]
        );
        assert_eq!(DeviceInfo::decode(&m).ok(), Some(info));

        let rw = DeviceInfo {
            device: pd(7, 0, None),
            read_only: false,
        };
        assert_eq!(DeviceInfo::decode(&rw.encode()).ok(), Some(rw));
    }

    #[test]
    fn device_message_refusals() {
        let good = DeviceInfo {
            device: pd(7, 1, Some(5)),
            read_only: false,
        }
        .encode();
        let mutate = |at: usize, v: u8| {
            let mut m = good;
            m[at] = v;
            m
        };
        assert!(matches!(
            DeviceInfo::decode(&good[..23]),
            Err(HandoffError::BadMessage(_))
        ));
        let mut long = good.to_vec();
        long.push(0);
        assert!(matches!(
            DeviceInfo::decode(&long),
            Err(HandoffError::BadMessage(_))
        ));
        assert!(matches!(
            DeviceInfo::decode(&mutate(0, b'Y')),
            Err(HandoffError::BadMessage(_))
        ));
        assert!(matches!(
            DeviceInfo::decode(&mutate(4, 2)),
            Err(HandoffError::Version(2))
        ));
        assert!(matches!(
            DeviceInfo::decode(&mutate(6, 2)),
            Err(HandoffError::BadMessage(_))
        ));
        assert!(matches!(
            DeviceInfo::decode(&mutate(7, 0x80)),
            Err(HandoffError::BadMessage(_))
        ));
        assert!(matches!(
            DeviceInfo::decode(&mutate(9, 0x10)),
            Err(HandoffError::BadMessage(_))
        ));
        assert!(matches!(
            DeviceInfo::decode(&mutate(14, 0x10)),
            Err(HandoffError::BadMessage(_))
        ));
    }

    #[test]
    fn reply_round_trips() {
        assert_eq!(
            Reply::decode(&Reply::Accepted.encode()).ok(),
            Some(Reply::Accepted)
        );
        let r = Reply::Rejected(Errno::NODEV);
        assert_eq!(Reply::decode(&r.encode()).ok(), Some(r));
        assert!(Reply::decode(b"XBHR").is_err());
        assert!(Reply::decode(b"XBHQ\0\0\0\0").is_err());
        assert!(Reply::decode(b"XBHR\xff\xff\xff\xff").is_err());
    }
}
