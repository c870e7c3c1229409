//! The nodes the backend writes about itself: features at probe, and the device's details in
//! the connect transaction (Linux `xen_blkbk_probe` and `connect`).

use crate::dataplane;
use crate::device::Device;

/// VDISK_CDROM in `info`.
pub const VDISK_CDROM: u32 = 1;
/// VDISK_REMOVABLE in `info`.
pub const VDISK_REMOVABLE: u32 = 2;
/// VDISK_READONLY in `info`.
pub const VDISK_READONLY: u32 = 4;

/// What this backend supports, advertised before InitWait: also the limits the frontend's
/// keys are checked against ([`crate::frontend_config::read_frontend_config`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Features {
    /// `feature-max-indirect-segments` (Linux: 256).
    pub max_indirect_segments: u32,
    /// `multi-queue-max-queues`.
    pub max_queues: u32,
    /// `max-ring-page-order` (at most 4).
    pub max_ring_page_order: u32,
    /// `feature-persistent`, written at connect.
    pub persistent_grants: bool,
}

impl Features {
    /// The probe nodes, in the order Linux writes them. `opened` = 0 follows (the RFC
    /// series), then the switch to InitWait.
    pub fn probe_nodes(&self) -> Vec<(&'static str, String)> {
        vec![
            (
                "feature-max-indirect-segments",
                self.max_indirect_segments.to_string(),
            ),
            ("multi-queue-max-queues", self.max_queues.to_string()),
            ("max-ring-page-order", self.max_ring_page_order.to_string()),
        ]
    }
}

/// What the connect transaction says about the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Size in 512-byte sectors, whatever the logical block size.
    pub sectors: u64,
    /// Logical block size in bytes.
    pub sector_size: u32,
    /// Physical block size in bytes.
    pub physical_sector_size: u32,
    /// Writes are refused.
    pub read_only: bool,
    /// The frontend's `device-type` is `cdrom`.
    pub cdrom: bool,
    /// Flush (and barrier) supported.
    pub flush: bool,
    /// Discard supported, and allowed by the toolstack's `discard-enable`.
    pub discard: Option<Discard>,
}

/// Discard parameters (`discard-granularity`, `discard-alignment`, `discard-secure`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Discard {
    /// Granularity in bytes.
    pub granularity: u32,
    /// Alignment in bytes.
    pub alignment: u32,
    /// Secure discard supported.
    pub secure: bool,
}

impl DeviceInfo {
    /// The details of an open device. `discard_enable` is the toolstack's `discard-enable`
    /// node (default on); `cdrom` comes from the frontend's `device-type`.
    pub fn of(device: &Device, cdrom: bool, discard_enable: bool) -> Self {
        Self {
            sectors: device.sectors(),
            sector_size: device.logical_block_size(),
            physical_sector_size: device.physical_block_size(),
            read_only: device.read_only(),
            cdrom,
            // A block device's cache flush, a file's fdatasync; an NBD export only when the
            // server takes NBD_CMD_FLUSH.
            flush: device.flush(),
            discard: (discard_enable && device.discard() && !device.read_only()).then(|| Discard {
                granularity: device.discard_granularity(),
                alignment: 0,
                secure: device.secure_discard(),
            }),
        }
    }

    /// What the data-plane queues serve: exactly what is advertised (flush and barrier with
    /// `feature-flush-cache`/`feature-barrier`, discard with `feature-discard`, secure discard
    /// with `discard-secure`), read-only as advertised in `info`.
    pub fn queue_features(&self) -> dataplane::Features {
        dataplane::Features {
            flush: self.flush,
            barrier: self.flush,
            discard: self.discard.is_some(),
            secure_discard: self.discard.is_some_and(|d| d.secure),
            read_only: self.read_only,
        }
    }

    /// The `info` bits.
    pub fn info(&self) -> u32 {
        let mut info = 0;
        if self.cdrom {
            info |= VDISK_CDROM;
        }
        if self.read_only {
            info |= VDISK_READONLY;
        }
        info
    }

    /// The nodes of the connect transaction, in Linux's order. `persistent` is this
    /// backend's `feature-persistent` offer.
    pub fn connect_nodes(&self, persistent: bool) -> Vec<(&'static str, String)> {
        let flag = |b: bool| u32::from(b).to_string();
        let mut nodes = vec![("feature-flush-cache", flag(self.flush))];
        match self.discard {
            Some(d) => {
                nodes.push(("discard-granularity", d.granularity.to_string()));
                nodes.push(("discard-alignment", d.alignment.to_string()));
                nodes.push(("discard-secure", flag(d.secure)));
                nodes.push(("feature-discard", flag(true)));
            }
            None => nodes.push(("feature-discard", flag(false))),
        }
        nodes.push(("feature-barrier", flag(self.flush)));
        nodes.push(("feature-persistent", flag(persistent)));
        nodes.push(("sectors", self.sectors.to_string()));
        nodes.push(("info", self.info().to_string()));
        nodes.push(("sector-size", self.sector_size.to_string()));
        nodes.push((
            "physical-sector-size",
            self.physical_sector_size.to_string(),
        ));
        nodes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> DeviceInfo {
        DeviceInfo {
            sectors: 2048,
            sector_size: 512,
            physical_sector_size: 4096,
            read_only: false,
            cdrom: false,
            flush: true,
            discard: Some(Discard {
                granularity: 4096,
                alignment: 0,
                secure: false,
            }),
        }
    }

    fn get<'a>(nodes: &'a [(&'static str, String)], k: &str) -> Option<&'a str> {
        nodes.iter().find(|(n, _)| *n == k).map(|(_, v)| v.as_str())
    }

    #[test]
    fn connect_nodes_describe_the_device() {
        let nodes = info().connect_nodes(true);
        assert_eq!(get(&nodes, "sectors"), Some("2048"));
        assert_eq!(get(&nodes, "info"), Some("0"));
        assert_eq!(get(&nodes, "sector-size"), Some("512"));
        assert_eq!(get(&nodes, "physical-sector-size"), Some("4096"));
        assert_eq!(get(&nodes, "feature-flush-cache"), Some("1"));
        assert_eq!(get(&nodes, "feature-barrier"), Some("1"));
        assert_eq!(get(&nodes, "feature-discard"), Some("1"));
        assert_eq!(get(&nodes, "discard-granularity"), Some("4096"));
        assert_eq!(get(&nodes, "discard-alignment"), Some("0"));
        assert_eq!(get(&nodes, "discard-secure"), Some("0"));
        assert_eq!(get(&nodes, "feature-persistent"), Some("1"));
    }

    #[test]
    fn no_discard_writes_only_the_feature() {
        let nodes = DeviceInfo {
            discard: None,
            ..info()
        }
        .connect_nodes(false);
        assert_eq!(get(&nodes, "feature-discard"), Some("0"));
        assert_eq!(get(&nodes, "discard-granularity"), None);
        assert_eq!(get(&nodes, "feature-persistent"), Some("0"));
    }

    #[test]
    fn queues_serve_what_is_advertised() {
        let f = info().queue_features();
        assert!(f.flush && f.barrier && f.discard && !f.secure_discard && !f.read_only);
        let secure = DeviceInfo {
            read_only: true,
            discard: Some(Discard {
                granularity: 512,
                alignment: 0,
                secure: true,
            }),
            ..info()
        }
        .queue_features();
        assert!(secure.secure_discard && secure.read_only);
        let none = DeviceInfo {
            discard: None,
            ..info()
        }
        .queue_features();
        assert!(!none.discard && !none.secure_discard);
    }

    #[test]
    fn info_bits() {
        assert_eq!(
            DeviceInfo {
                read_only: true,
                cdrom: true,
                ..info()
            }
            .info(),
            5
        );
    }

    #[test]
    fn probe_nodes() {
        let f = Features {
            max_indirect_segments: 256,
            max_queues: 4,
            max_ring_page_order: 4,
            persistent_grants: true,
        };
        let nodes = f.probe_nodes();
        assert_eq!(get(&nodes, "feature-max-indirect-segments"), Some("256"));
        assert_eq!(get(&nodes, "multi-queue-max-queues"), Some("4"));
        assert_eq!(get(&nodes, "max-ring-page-order"), Some("4"));
    }
}
