//! The connection to the frontend: its state changes (Linux `frontend_changed`), connecting
//! the queues and writing the connect transaction, watching the queues and the device size
//! while connected, and disconnecting.

use std::sync::Arc;

use xen::xenbus::{parse_decimal, ReadState, XenbusState};
use xen::xenstore::{XsError, XsOps};

use super::{xs_err, Backend, Connection, Outcome, ServeError};
use crate::advertise::DeviceInfo;
use crate::dataplane::{self, InflightParams, QueueExit, QueueParams};
use crate::dev_error::{errno, DevError};
use crate::frontend_config::read_frontend_config;
use crate::xenbus_state::{on_frontend_state, FrontendAction};

impl Backend {
    /// Linux `frontend_changed`.
    pub(super) fn frontend_changed(&mut self) -> Result<Option<Outcome>, ServeError> {
        let fe_state = ReadState::parse(
            self.read_opt(&format!("{}/state", self.frontend))?
                .as_deref(),
        );
        let online = self
            .read_opt(&self.be.node("online"))?
            .as_deref()
            .and_then(parse_decimal)
            .unwrap_or(0)
            != 0;
        let action = on_frontend_state(self.state, fe_state, online);
        tracing::debug!(backend = %self.be, ?fe_state, own = %self.state, ?action, "frontend changed");
        match action {
            FrontendAction::Nothing => {}
            FrontendAction::PrepareReconnect => {
                tracing::info!(backend = %self.be, "prepare for reconnect");
                self.switch_state(XenbusState::InitWait)?;
            }
            FrontendAction::Connect => {
                self.disconnect();
                self.read_pending()?;
            }
            FrontendAction::Closing => self.switch_state(XenbusState::Closing)?,
            FrontendAction::Close { remove } => {
                self.disconnect();
                self.pending = None;
                self.switch_state(XenbusState::Closed)?;
                if remove {
                    return Ok(Some(Outcome::Removed));
                }
            }
            FrontendAction::Remove => {
                tracing::info!(backend = %self.be, "frontend gone");
                return Ok(Some(Outcome::Removed));
            }
            FrontendAction::Fatal(n) => {
                self.fatal(&DevError::new(
                    errno::EINVAL,
                    format!("saw state {n} at frontend"),
                ))?;
            }
        }
        Ok(None)
    }

    /// Reads and validates the frontend's keys (its rings, ports, protocol), then connects
    /// if the device is held.
    pub(super) fn read_pending(&mut self) -> Result<(), ServeError> {
        let xs = &self.xs;
        let mut read = |path: &str| match xs.read(path) {
            Ok(v) => Ok(Some(String::from_utf8_lossy(&v).into_owned())),
            Err(XsError::NotFound) => Ok(None),
            Err(e) => Err(DevError::new(errno::EIO, format!("reading {path}: {e}"))),
        };
        match read_frontend_config(&self.frontend, &self.features, &mut read) {
            Ok(config) => {
                tracing::info!(
                    backend = %self.be,
                    queues = config.queues.len(),
                    protocol = %config.protocol,
                    ring_pages = 1u32 << config.ring_page_order,
                    persistent = config.persistent_grants,
                    "frontend ready"
                );
                self.pending = Some(config);
                self.try_connect()
            }
            Err(e) => self.fatal(&e),
        }
    }

    /// `xen_update_blkif_status` + `connect`: once the frontend's rings are known and the
    /// device is held, start the queues, write the connect transaction and switch to Connected.
    pub(super) fn try_connect(&mut self) -> Result<(), ServeError> {
        if (self.state == XenbusState::Connected && !self.resuming) || self.connection.is_some() {
            return Ok(());
        }
        let (Some(config), Some(device)) = (&self.pending, &self.device) else {
            return Ok(());
        };
        let resume = self.resuming;
        if resume
            && self.inflight.as_ref().and_then(|l| l.connected_queues())
                != u32::try_from(config.queues.len()).ok()
        {
            self.resuming = false;
            let err = DevError::new(
                errno::EIO,
                "cannot resume: the in-flight log does not match the frontend's queues",
            );
            return self.fatal(&err);
        }
        let info = DeviceInfo::of(device, self.cdrom, self.discard_enabled()?);
        let mut queues = Vec::with_capacity(config.queues.len());
        for (index, ring) in config.queues.iter().enumerate() {
            let mut params = QueueParams::new(
                Arc::clone(&self.platform),
                self.be.frontend_domid(),
                config.abi,
                ring.ring_refs.clone(),
                ring.port,
                Arc::clone(device),
            );
            params.grant_mode = self.grant_mode;
            params.poll = self.poll;
            params.sqpoll = self.sqpoll;
            params.nbd_timeout = self.nbd_timeout;
            params.nbd_connector = self.nbd_connector.clone();
            if index > 0 && device.nbd_export().is_some() {
                // Multi-conn: every queue but the first has a connection of its own.
                match self.queue_connection(device) {
                    Ok(socket) => params.nbd_socket = Some(socket),
                    Err(e) => {
                        Connection { queues }.stop();
                        let err = DevError::new(
                            errno::EIO,
                            format!("connecting queue {index} to the NBD export: {e}"),
                        );
                        return self.fatal(&err);
                    }
                }
            }
            params.observer = self.observer.clone();
            params.persistent_grants = config.persistent_grants;
            params.max_indirect_segments = u16::try_from(
                self.features
                    .max_indirect_segments
                    .min(ring::MAX_INDIRECT_SEGMENTS as u32),
            )
            .unwrap_or(0);
            params.features = info.queue_features();
            params.stats = Arc::clone(&self.stats);
            params.name = format!("{}-q{index}", self.be.file_stem());
            params.inflight = self.inflight.as_ref().map(|log| InflightParams {
                log: Arc::clone(log),
                queue: index,
                resume,
            });
            match dataplane::spawn_queue(params) {
                Ok(q) => queues.push(q),
                Err(e) => {
                    Connection { queues }.stop();
                    self.resuming = false;
                    let err = DevError::new(
                        errno::EIO,
                        format!("mapping ring-ref port {}: {e}", ring.port),
                    );
                    return self.fatal(&err);
                }
            }
        }
        let nr_queues = u32::try_from(queues.len()).unwrap_or(u32::MAX);
        self.connection = Some(Connection { queues });
        if let Some(log) = &self.inflight {
            log.set_connected(nr_queues);
            log.count_start();
        }
        if resume {
            // Everything in XenStore is as the backend that died left it.
            self.resuming = false;
            self.state = XenbusState::Connected;
            tracing::info!(backend = %self.be, "resumed");
            return Ok(());
        }
        let nodes = info.connect_nodes(self.features.persistent_grants);
        let be = &self.be;
        self.xs
            .transaction(|tx| {
                for (name, value) in &nodes {
                    tx.write(&be.node(name), value)?;
                }
                Ok(())
            })
            .map_err(xs_err(format!(
                "writing the connect transaction under {be}"
            )))?;
        self.switch_state(XenbusState::Connected)?;
        tracing::info!(backend = %self.be, sectors = info.sectors, "connected");
        Ok(())
    }

    pub(super) fn discard_enabled(&self) -> Result<bool, ServeError> {
        Ok(self
            .read_opt(&self.be.node("discard-enable"))?
            .as_deref()
            .and_then(parse_decimal)
            .unwrap_or(1)
            != 0)
    }

    /// `xen_blkif_disconnect`: stops every queue (answering or dropping what is in flight).
    pub(super) fn disconnect(&mut self) {
        if let Some(c) = self.connection.take() {
            // Nothing to resume from once the queues start closing.
            if let Some(log) = &self.inflight {
                log.set_disconnected();
            }
            c.stop();
            tracing::debug!(backend = %self.be, "disconnected");
        }
    }

    /// A new connection to the device's NBD export, for a queue of its own (multi-conn).
    fn queue_connection(
        &self,
        device: &crate::device::Device,
    ) -> Result<std::os::fd::OwnedFd, String> {
        let connector = self.nbd_connector.as_ref().ok_or("no NBD connector")?;
        let (socket, export) = connector.connect().map_err(|e| e.to_string())?;
        match device.nbd_export() {
            Some(first) if crate::nbd_connector::same_export(first, &export) => Ok(socket),
            _ => Err(format!("the server offers another export now ({export:?})")),
        }
    }

    /// Collects queues that ended by themselves. A frontend that broke the ring protocol has
    /// that ring halted, as Linux does ("Halting ring processing"), and the device otherwise
    /// stays as it is; a local failure (io_uring, event channel) is fatal for the device.
    pub(super) fn check_queues(&mut self) -> Result<(), ServeError> {
        let Some(conn) = &mut self.connection else {
            return Ok(());
        };
        let mut failure = None;
        let mut i = 0;
        while i < conn.queues.len() {
            if !conn.queues[i].is_finished() {
                i += 1;
                continue;
            }
            match conn.queues.swap_remove(i).wait() {
                QueueExit::Stopped => {}
                QueueExit::Protocol(v) => {
                    if self.guest_log.allow() {
                        tracing::warn!(backend = %self.be, "frontend broke the ring protocol ({v}); ring halted");
                    } else {
                        tracing::debug!(backend = %self.be, "frontend broke the ring protocol ({v}); ring halted");
                    }
                }
                QueueExit::Failed(why) => failure = Some(why.to_string()),
                QueueExit::Panicked => failure = Some("the queue thread panicked".to_owned()),
            }
        }
        match failure {
            Some(why) => self.fatal(&DevError::new(errno::EIO, format!("queue failed: {why}"))),
            None => Ok(()),
        }
    }

    /// `xen_vbd_resize`: publishes a changed size with the current state, in one transaction.
    pub(super) fn check_resize(&mut self) -> Result<(), ServeError> {
        let Some(device) = &self.device else {
            return Ok(());
        };
        let before = device.sectors();
        let after = match device.refresh_size() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(backend = %self.be, "reading the device size: {e}");
                return Ok(());
            }
        };
        if before == after || self.state != XenbusState::Connected {
            return Ok(());
        }
        tracing::info!(backend = %self.be, before, after, "VBD resize");
        let (sectors, state) = (self.be.node("sectors"), self.be.node("state"));
        let value = self.state.as_u32().to_string();
        self.xs
            .transaction(|tx| {
                tx.write(&sectors, after.to_string())?;
                tx.write(&state, &value)
            })
            .map_err(xs_err("writing the new size"))
    }
}
