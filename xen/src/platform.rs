//! The small traits the backend is written against, implemented by the real and the simulated
//! platform alike.

use std::os::fd::BorrowedFd;
use std::time::Duration;

use crate::{
    Access, CopyOp, DomId, EvtchnError, GrantError, GrantMapping, GrantRef, Port, UnmapNotify,
};

/// Maps other domains' grants into this process (`/dev/xen/gntdev` or the simulation).
pub trait GrantMapper: Send + Sync + std::fmt::Debug {
    /// Maps `refs` of `domid` contiguously, in order. All or nothing: when any ref fails,
    /// whatever was mapped is unmapped again and the first failing status is returned
    /// (XSA-361/362/365: partial failures must not leak or crash).
    ///
    /// # Errors
    /// [`GrantError::Status`] with Xen's status for the first ref that failed (the real
    /// gntdev does not report per-ref statuses: there a failed map is [`GrantError::Io`]
    /// with the kernel's errno, except [`crate::GrantStatus::Eagain`] once retries of a
    /// paged-out grant are exhausted); [`GrantError::Invalid`] for an empty or oversized
    /// batch.
    fn map(
        &self,
        domid: DomId,
        refs: &[GrantRef],
        access: Access,
    ) -> Result<GrantMapping, GrantError>;

    /// Arranges for `notify` to happen when `mapping` (made by this mapper) is unmapped,
    /// replacing any earlier request.
    ///
    /// # Errors
    /// [`GrantError::Invalid`] for a byte outside the mapping or in a read-only mapping, or a
    /// mapping of another mapper; [`GrantError::Io`] when the device refuses.
    fn set_unmap_notify(
        &self,
        mapping: &GrantMapping,
        notify: UnmapNotify,
    ) -> Result<(), GrantError>;

    /// How long a mapping that carried I/O must stay mapped after the I/O completed before it
    /// may be unmapped. The kernel reports an `O_DIRECT` request complete before it has let
    /// go of the pages (block/fops.c posts the completion, then releases the bio's pages),
    /// and gntdev on a PV dom0 (since "xen/gntdev: Avoid blocking in unmap_grant_pages()",
    /// 2022) defers the unmap of a page still referenced while munmap clears its PTE anyway:
    /// "BUG: Bad page map" in dom0. Nothing tells user space when the kernel has let go, so
    /// this is a bound chosen well above the window measured (30-38 ms on real Xen under
    /// emulation), not a guarantee; only grant copy has none to rely on.
    fn unmap_grace(&self) -> Duration;
}

/// Copies between local memory and other domains' grants (`IOCTL_GNTDEV_GRANT_COPY` or the
/// simulation).
pub trait GrantCopier: Send + Sync + std::fmt::Debug {
    /// Performs every op in `ops`, setting each op's status. Segments fail independently.
    ///
    /// # Errors
    /// Only when the batch as a whole could not be attempted (the device failed, an op's
    /// local length is 0 or crosses a page); per-segment failures are in the statuses.
    fn copy(&self, ops: &mut [CopyOp<'_>]) -> Result<(), GrantError>;
}

/// One open event-channel handle (`/dev/xen/evtchn` or the simulation). Delivery masks a
/// port until it is unmasked, as the Linux device does.
pub trait EventChannel: Send + std::fmt::Debug {
    /// Binds a local port to `remote_port` of `remote`.
    ///
    /// # Errors
    /// When the remote port is not an unbound port offered to this domain.
    fn bind_interdomain(&mut self, remote: DomId, remote_port: Port) -> Result<Port, EvtchnError>;
    /// Unbinds a port bound through this handle.
    ///
    /// # Errors
    /// [`EvtchnError::NotBound`] for a port not bound here.
    fn unbind(&mut self, port: Port) -> Result<(), EvtchnError>;
    /// Sends an event on a bound port.
    ///
    /// # Errors
    /// [`EvtchnError::NotBound`] for a port not bound here.
    fn notify(&self, port: Port) -> Result<(), EvtchnError>;
    /// Appends the ports that fired since the last call to `out`, without blocking. Each
    /// delivered port stays masked until [`EventChannel::unmask`].
    ///
    /// A port may be reported spuriously (after an overflow, or twice around one): treat a
    /// report as "look at the ring", not as a count of notifications.
    ///
    /// # Errors
    /// On device failure (an overflowed device ring is reset and reported as all bound ports
    /// pending, not as an error).
    fn pending(&mut self, out: &mut Vec<Port>) -> Result<(), EvtchnError>;
    /// Appends the ports of one `read()` of [`EventChannel::as_fd`] that the caller made
    /// itself (an io_uring `READ`, so that the read costs no system call of its own), given
    /// what it returned: the bytes read, or its error. The ports are those
    /// [`EventChannel::pending`] would have reported for that read, with the same masking.
    ///
    /// # Errors
    /// As [`EventChannel::pending`]; `EAGAIN` is no error (nothing was pending).
    fn read_done(
        &mut self,
        read: Result<&[u8], rustix::io::Errno>,
        out: &mut Vec<Port>,
    ) -> Result<(), EvtchnError>;
    /// Unmasks a delivered port so that it can fire again.
    ///
    /// # Errors
    /// [`EvtchnError::NotBound`] for a port not bound here.
    fn unmask(&self, port: Port) -> Result<(), EvtchnError>;
    /// Whether [`EventChannel::unmask`] is exactly a `write()` of the port's number (a
    /// native-endian `u32`) on [`EventChannel::as_fd`], as on the Linux device: a caller may
    /// then submit that write itself (an io_uring `WRITE`, in the batch that also waits)
    /// instead of calling `unmask`. The simulation's unmask is a store in shared memory.
    fn unmask_is_write(&self) -> bool;
    /// Restricts this handle to binding ports of `domid` only (`IOCTL_EVTCHN_RESTRICT_DOMID`).
    ///
    /// # Errors
    /// When the device refuses.
    fn restrict(&mut self, domid: DomId) -> Result<(), EvtchnError>;
    /// A file descriptor that polls readable while ports are pending, for io_uring
    /// (`POLL_ADD`) or epoll. Wait for readability, then call [`EventChannel::pending`], or
    /// read the fd (at most 4096 bytes at a time) and hand what came to
    /// [`EventChannel::read_done`]: only it knows what the bytes mean (the simulation's fd is
    /// a socket of datagrams).
    fn as_fd(&self) -> BorrowedFd<'_>;
}

/// Everything the backend needs from the hypervisor, for one domain's view of it.
pub trait Platform: Send + Sync + std::fmt::Debug {
    /// This domain's id (the backend domain).
    fn domid(&self) -> DomId;
    /// The grant mapper.
    fn grant_mapper(&self) -> &dyn GrantMapper;
    /// The grant copier.
    fn grant_copier(&self) -> &dyn GrantCopier;
    /// Opens a new event-channel handle (one per queue, so each thread waits on its own fd).
    ///
    /// # Errors
    /// When the device cannot be opened.
    fn open_event_channel(&self) -> Result<Box<dyn EventChannel>, EvtchnError>;
    /// Where the XenStore client connects (`xenstore::XenStore::open_at`).
    fn xenstore_path(&self) -> std::path::PathBuf;
}
