//! Holding the device: from the backend directory's nodes, an inherited fd or the handoff
//! socket, checked against `physical-device`/`diskseq` ([`crate::acquire`]); once held, the
//! handoff socket is closed and the process confined.

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use xen::handoff::{self, Reply};

use super::{Backend, Outcome, ServeError};
use crate::acquire::{self, DeviceNodes, DeviceSource};
use crate::dev_error::{errno, DevError};
use crate::device::{Device, DeviceKind, DeviceOptions};
use crate::nbd_connector::Connector;
use xen::xenbus::XenbusState;

impl Backend {
    pub(super) fn device_nodes(&self) -> Result<DeviceNodes, ServeError> {
        Ok(DeviceNodes {
            physical_device: self.read_opt(&self.be.node(handoff::PHYSICAL_DEVICE))?,
            diskseq: self.read_opt(&self.be.node(handoff::DISKSEQ))?,
            params: self.read_opt(&self.be.node(handoff::PARAMS))?,
            mode: self.read_opt(&self.be.node(handoff::MODE))?,
        })
    }

    pub(super) fn device_options(&self, nodes: &DeviceNodes) -> Result<DeviceOptions, DevError> {
        Ok(DeviceOptions {
            read_only: nodes.read_only()?,
            ..self.device_options
        })
    }

    pub(super) fn take_inherited_fd(&mut self) -> Result<(), ServeError> {
        let DeviceSource::Fd(fd) =
            std::mem::replace(&mut self.source, DeviceSource::PhysicalDevice)
        else {
            return Ok(());
        };
        let nodes = self.device_nodes()?;
        let result = self.device_options(&nodes).and_then(|options| {
            let device = Device::from_fd(fd, &options).map_err(|e| {
                DevError::new(errno::ENODEV, format!("creating vbd structure: {e}"))
            })?;
            acquire::check_device(&device, nodes.expected()?.as_ref(), None)?;
            Ok(device)
        });
        self.held(result)
    }

    /// Records the outcome of acquiring the device.
    pub(super) fn held(&mut self, result: Result<Device, DevError>) -> Result<(), ServeError> {
        match result {
            Ok(device) => {
                let device_type = self.read_opt(&format!("{}/device-type", self.frontend))?;
                self.cdrom = device_type.as_deref() == Some("cdrom");
                tracing::info!(
                    backend = %self.be,
                    sectors = device.sectors(),
                    sector_size = device.logical_block_size(),
                    read_only = device.read_only(),
                    direct = device.direct(),
                    "holding the device"
                );
                if device.kind() == DeviceKind::Nbd {
                    self.start_nbd_connector()?;
                }
                // Indirect requests no larger than the server takes in one command.
                let max_segments = device
                    .nbd_export()
                    .map(|e| e.block_size.maximum / 4096)
                    .filter(|&m| m < self.features.max_indirect_segments);
                if let Some(m) = max_segments {
                    let m = if (m as usize) > ring::MAX_SEGMENTS_PER_REQUEST {
                        m
                    } else {
                        0
                    };
                    self.features.max_indirect_segments = m;
                    self.write_node("feature-max-indirect-segments", &m.to_string())?;
                }
                if let Some(export) = device.nbd_export() {
                    // One connection per queue where the server allows several (the connector
                    // makes the others at connect), else one queue. A frontend that already
                    // asked for more than that is refused at connect.
                    let queues = if export.flags.can_multi_conn() && self.nbd_connector.is_some() {
                        self.max_queues
                    } else {
                        1
                    };
                    if queues != self.features.max_queues {
                        self.features.max_queues = queues;
                        self.write_node("multi-queue-max-queues", &queues.to_string())?;
                    }
                }
                if device.kind() == DeviceKind::Nbd {
                    // Not taken over after a crash: the commands on the wire die with the
                    // connection, and the log cannot say which of them the server carried out.
                    self.inflight = None;
                } else if let Some(sock) = self.supervisor.take() {
                    if let Err(e) = handoff::send_held(&sock, device.fd()) {
                        tracing::warn!(backend = %self.be, "giving the device to the supervisor: {e}");
                    }
                }
                self.device = Some(Arc::new(device));
                // The handoff socket has done its job: close it (and remove its name) while
                // that is still allowed, so nothing is accepted once confined.
                self.close_listener();
                // Every file the backend needs is open: confine (`blkbackd serve` armed it).
                crate::sandbox::confine_armed(&self.xs).map_err(|source| ServeError::Io {
                    what: "confining the backend",
                    source,
                })?;
                if !self.resuming {
                    self.write_node(handoff::OPENED, handoff::OPENED_YES)?;
                }
                Ok(())
            }
            Err(e) => self.fatal(&e),
        }
    }

    /// Starts the NBD connector (before confinement, which forbids connecting), so that a
    /// lost connection can be replaced; without one a loss is for good (logged).
    fn start_nbd_connector(&mut self) -> Result<(), ServeError> {
        let (Some(program), Some(uri)) = (
            self.nbd_program.clone(),
            self.read_opt(&self.be.node(handoff::PARAMS))?,
        ) else {
            return Ok(());
        };
        match Connector::start(&program, &uri) {
            Ok(c) => self.nbd_connector = Some(Arc::new(c)),
            Err(e) => tracing::warn!(
                backend = %self.be,
                "{e}: a lost NBD connection will not be replaced"
            ),
        }
        Ok(())
    }

    /// Linux `backend_changed`, plus removal of the directory (`xenbus_dev_changed`).
    pub(super) fn backend_changed(&mut self) -> Result<Option<Outcome>, ServeError> {
        if self.read_opt(&self.be.node("frontend"))?.is_none() {
            tracing::info!(backend = %self.be, "backend directory removed");
            return Ok(Some(Outcome::Removed));
        }
        if self.device.is_some() {
            return Ok(None);
        }
        let nodes = self.device_nodes()?;
        let result = match self.source {
            DeviceSource::PhysicalDevice => match nodes.expected() {
                Ok(None) => return Ok(None),
                Ok(Some(expected)) => self
                    .device_options(&nodes)
                    .and_then(|o| acquire::open_physical(&expected, &o)),
                Err(e) => Err(e),
            },
            DeviceSource::Params => {
                if nodes.params.is_none() {
                    return Ok(None);
                }
                self.device_options(&nodes)
                    .and_then(|o| acquire::open_params(&nodes, &o))
            }
            DeviceSource::Fd(_) | DeviceSource::Handoff(_) => return Ok(None),
        };
        // A refused device is reported once; a later change of the nodes tries again.
        if result.is_err() && self.state == XenbusState::Closing {
            return Ok(None);
        }
        self.held(result)?;
        self.try_connect()?;
        Ok(None)
    }

    /// Accepts one handoff connection, if one is waiting. Returns whether a device is now held.
    pub(super) fn accept_handoff(&mut self) -> Result<bool, ServeError> {
        let Some(listener) = &self.listener else {
            return Ok(false);
        };
        // The listener is non-blocking; the accepted socket is not (Linux does not inherit
        // O_NONBLOCK through accept).
        let conn = match rustix::net::accept_with(listener, rustix::net::SocketFlags::CLOEXEC) {
            Ok(c) => c,
            Err(rustix::io::Errno::AGAIN) => return Ok(false),
            Err(e) => {
                tracing::warn!("handoff accept: {e}");
                return Ok(false);
            }
        };
        // The message is sent right after connect; wait for it a bounded time.
        let _ = rustix::net::sockopt::set_socket_timeout(
            &conn,
            rustix::net::sockopt::Timeout::Recv,
            Some(Duration::from_secs(5)),
        );
        let (fd, info) = match handoff::recv_device(&conn) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(backend = %self.be, "handoff refused: {e}");
                let _ = handoff::send_reply(&conn, Reply::Rejected(rustix::io::Errno::INVAL));
                return Ok(false);
            }
        };
        if self.device.is_some() {
            let _ = handoff::send_reply(&conn, Reply::Rejected(rustix::io::Errno::BUSY));
            return Ok(false);
        }
        let nodes = self.device_nodes()?;
        let result = self.device_options(&nodes).and_then(|options| {
            let options = DeviceOptions {
                read_only: options.read_only || info.read_only,
                ..options
            };
            let device = if info.is_nbd_socket() {
                acquire::negotiate_nbd(fd, nodes.params.as_deref(), &options)?
            } else {
                Device::from_fd(fd, &options).map_err(|e| {
                    DevError::new(errno::ENODEV, format!("creating vbd structure: {e}"))
                })?
            };
            acquire::check_device(&device, nodes.expected()?.as_ref(), info.device.diskseq)?;
            Ok(device)
        });
        let reply = match &result {
            Ok(_) => Reply::Accepted,
            Err(e) => Reply::Rejected(rustix::io::Errno::from_raw_os_error(e.errno)),
        };
        let ok = result.is_ok();
        self.held(result)?;
        if let Err(e) = handoff::send_reply(&conn, reply) {
            tracing::warn!("handoff reply: {e}");
        }
        Ok(ok)
    }

    pub(super) fn close_listener(&mut self) {
        if let (Some(_), DeviceSource::Handoff(path)) = (self.listener.take(), &self.source) {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Creates the handoff listener ([`handoff::listen`]), non-blocking: the serve loop polls it.
pub(super) fn listen(path: &std::path::Path) -> std::io::Result<OwnedFd> {
    let sock = handoff::listen(path, 1).map_err(std::io::Error::other)?;
    rustix::io::ioctl_fionbio(&sock, true)?;
    Ok(sock)
}
