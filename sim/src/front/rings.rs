//! What every simulated frontend sets up the way blkfront does: a ring in the guest's memory,
//! granted to the backend, with an unbound port offered to it (`setup_blkring`), and the
//! details of all rings written in one transaction (`talk_to_blkback`). [`super::SimFront`],
//! the performance harness's lean frontend and the data-plane tests all build on it.

use ring::{Abi, FrontRing};
use xen::xenstore::{XsError, XsOps};
use xen::{Access, DomId, GrantRef, Port};

use super::SimFrontError;
use crate::{SimDomain, SimEventChannel};

/// One ring of a guest's frontend.
#[derive(Debug)]
pub struct GuestRing {
    /// The frontend's side of the shared ring.
    pub ring: FrontRing,
    /// The guest frames holding it, contiguous.
    pub frames: Vec<u32>,
    /// Their grants to the backend, in order (`ring-ref<i>`).
    pub grefs: Vec<GrantRef>,
    /// The port offered to the backend (`event-channel`), bound through `evtchn`.
    pub port: Port,
}

impl GuestRing {
    /// Lays a ring of `pages` pages over the guest's frames `first..first + pages`, grants
    /// them read-write to `backend` and allocates an unbound port for it on `evtchn`.
    ///
    /// # Errors
    /// When the frames lie outside the guest's memory, or the simulated hypervisor refuses
    /// the grants or the port.
    pub fn create(
        domain: &SimDomain,
        evtchn: &mut SimEventChannel,
        backend: DomId,
        abi: Abi,
        first: u32,
        pages: usize,
    ) -> Result<Self, SimFrontError> {
        let mem = domain
            .mem()
            .subregion(first as usize * shmem::PAGE_SIZE, pages * shmem::PAGE_SIZE)
            .map_err(|e| SimFrontError::Usage(format!("ring memory: {e}")))?;
        let ring = FrontRing::init(&mem, abi, pages)?;
        let frames: Vec<u32> = (first..).take(pages).collect();
        let grefs = frames
            .iter()
            .map(|&f| domain.grant(backend, f, Access::ReadWrite))
            .collect::<Result<Vec<_>, _>>()?;
        let port = evtchn.alloc_unbound(backend)?;
        Ok(Self {
            ring,
            frames,
            grefs,
            port,
        })
    }
}

/// What a frontend writes beside its rings.
#[derive(Debug, Clone, Copy)]
pub struct RingDetails<'a> {
    /// `ring-page-order`; `None` writes none and a single `ring-ref` (one page, as blkfront
    /// does for one page).
    pub order: Option<u32>,
    /// `protocol`; `None` writes none (the default ABI).
    pub protocol: Option<&'a str>,
    /// `feature-persistent`.
    pub persistent: bool,
}

/// Writes the ring details of `rings` under the frontend directory `fe`, in `tx` (one
/// transaction, so that the backend never reads half of them): per ring its refs and port,
/// under `queue-<i>/` when there is more than one (with `multi-queue-num-queues`).
///
/// # Errors
/// XenStore's.
pub fn write_ring_details(
    tx: &impl XsOps,
    fe: &str,
    rings: &[(&[GrantRef], Port)],
    details: RingDetails<'_>,
) -> Result<(), XsError> {
    let write_ring = |dir: &str, grefs: &[GrantRef], port: Port| -> Result<(), XsError> {
        match (details.order, grefs) {
            (None, [gref]) => tx.write(&format!("{dir}/ring-ref"), gref.to_string())?,
            _ => {
                for (i, g) in grefs.iter().enumerate() {
                    tx.write(&format!("{dir}/ring-ref{i}"), g.to_string())?;
                }
            }
        }
        tx.write(&format!("{dir}/event-channel"), port.to_string())
    };
    if let Some(o) = details.order {
        tx.write(&format!("{fe}/ring-page-order"), o.to_string())?;
    }
    if let [(grefs, port)] = rings {
        write_ring(fe, grefs, *port)?;
    } else {
        tx.write(
            &format!("{fe}/multi-queue-num-queues"),
            rings.len().to_string(),
        )?;
        for (i, (grefs, port)) in rings.iter().enumerate() {
            write_ring(&format!("{fe}/queue-{i}"), grefs, *port)?;
        }
    }
    if let Some(p) = details.protocol {
        tx.write(&format!("{fe}/protocol"), p)?;
    }
    tx.write(
        &format!("{fe}/feature-persistent"),
        if details.persistent { "1" } else { "0" },
    )
}
