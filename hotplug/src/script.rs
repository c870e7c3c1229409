//! The toolstack side: `add` and `remove` as a block hotplug script, reading the backend
//! directory's nodes and writing the results in one XenStore transaction.
//!
//! `add`: read `params`, `mode`, and what the backend advertises (`handoff-socket`, `opened`);
//! open or create the device; in one transaction write `physical-device`,
//! `physical-device-path`, `diskseq` and the [`CREATED`] record (refusing if the backend
//! directory is gone); hand the device over (fd over the socket, or wait for `opened` = `1`);
//! write `hotplug-status` = `connected`; close our fd. Every wait is bounded. On failure the
//! device nodes are removed, `hotplug-error` and `hotplug-status` = `busy` written, and what was
//! created is undone (or vanishes by itself when our fd closes).
//!
//! An NBD URI in `params` (`nbd://host[:port]/export`, `nbd+unix:///export?socket=PATH`) is no
//! device: `add` connects to the server and hands the connected socket to blkbackd, which
//! negotiates the export on it before it confines itself; no device node is written, and
//! `remove` has nothing to undo.
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use xen::handoff::{self, DeviceInfo, Reply};
use xen::xenstore::{BackendPath, XenStore, XsError, XsOps};

use crate::attach::{self, AttachOptions, Attached, Created, Released, CREATED};
use crate::params::{Mode, Source};
use crate::Error;

/// How a backend takes the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handover {
    /// blkbackd: the fd goes over this unix socket.
    Socket(PathBuf),
    /// A backend that writes `opened` = `1` once it holds the device (the series' blkback).
    Opened,
    /// A backend that says nothing (upstream blkback): no autoclear; `remove` tears down.
    Legacy,
}

/// Settings for [`add`] and [`remove`].
#[derive(Debug, Clone, Copy)]
pub struct Config {
    /// Bound on each wait for the backend.
    pub timeout: Duration,
}

/// Parses the backend directory as the toolstack gives it (`--backend` or `XENBUS_PATH`):
/// absolute, or libxl's relative `backend/vbd/<domid>/<devid>`.
///
/// # Errors
/// [`Error::BadParams`].
pub fn parse_backend_path(path: &str) -> Result<BackendPath, Error> {
    BackendPath::parse_xenbus_path(path).map_err(|_| Error::BadParams {
        params: path.into(),
        why: "not a backend/vbd/<domid>/<devid> XenStore path",
    })
}

fn read_opt(xs: &impl XsOps, path: &str) -> Result<Option<Vec<u8>>, Error> {
    match xs.read(path) {
        Ok(v) => Ok(Some(v)),
        Err(XsError::NotFound) => Ok(None),
        Err(e) => Err(Error::XenStore {
            op: "read",
            path: path.into(),
            source: e,
        }),
    }
}

fn read_req(xs: &impl XsOps, path: &str) -> Result<Vec<u8>, Error> {
    read_opt(xs, path)?.ok_or_else(|| Error::MissingNode(path.into()))
}

fn rm_opt(xs: &impl XsOps, path: &str) -> Result<(), XsError> {
    match xs.rm(path) {
        Ok(()) | Err(XsError::NotFound) => Ok(()),
        Err(e) => Err(e),
    }
}

/// What the backend advertises.
///
/// # Errors
/// [`Error::XenStore`], or [`Error::Handoff`] for a malformed socket path.
pub fn handover_of(xs: &XenStore, backend: &BackendPath) -> Result<Handover, Error> {
    if let Some(sock) = read_opt(xs, &backend.node(handoff::HANDOFF_SOCKET))? {
        return Ok(Handover::Socket(handoff::parse_socket_path(&sock)?));
    }
    if read_opt(xs, &backend.node(handoff::OPENED))?.is_some() {
        return Ok(Handover::Opened);
    }
    Ok(Handover::Legacy)
}

/// A device-mapper name and uuid for this attachment: unique, so an older device still
/// waiting for its deferred removal never collides with a new one.
fn dm_identity(backend: &BackendPath) -> (String, String) {
    let mut rand = [0u8; 8];
    let nonce = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut rand))
        .map_or_else(
            |_| {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default();
                format!("{:x}{:x}", std::process::id(), now.as_nanos())
            },
            |()| rand.iter().map(|b| format!("{b:02x}")).collect(),
        );
    let (domid, devid) = (backend.frontend_domid(), backend.devid());
    (
        format!("blkhotplug-{domid}-{devid}-{nonce}"),
        format!("BLKHOTPLUG-{nonce}"),
    )
}

/// `add`: see the module documentation. Returns the device opened, which the caller keeps
/// open until it exits, or `None` for an NBD export (the backend holds the only socket). On
/// failure the error is also written to the backend directory (`hotplug-error`,
/// `hotplug-status` = `busy`).
///
/// # Errors
/// What went wrong.
pub fn add(xs: &XenStore, backend: &str, config: Config) -> Result<Option<Attached>, Error> {
    let backend = &parse_backend_path(backend)?;
    add_inner(xs, backend, config).inspect_err(|e| {
        tracing::error!("add {backend}: {e}");
        report_failure(xs, backend, e);
    })
}

/// Whether `params` is an NBD URI rather than a path.
fn is_nbd(params: &[u8]) -> bool {
    params.starts_with(b"nbd:") || params.starts_with(b"nbd+")
}

fn add_inner(
    xs: &XenStore,
    backend: &BackendPath,
    config: Config,
) -> Result<Option<Attached>, Error> {
    let deadline = Instant::now() + config.timeout;
    let params = read_req(xs, &backend.node(handoff::PARAMS))?;
    let mode = Mode::parse(&read_req(xs, &backend.node(handoff::MODE))?)?;
    let handover = handover_of(xs, backend)?;
    if is_nbd(&params) {
        return add_nbd(
            xs,
            backend,
            &params,
            mode,
            &handover,
            deadline,
            config.timeout,
        )
        .map(|()| None);
    }
    let source = Source::parse(&params)?;
    let (dm_name, dm_uuid) = dm_identity(backend);
    let opts = AttachOptions {
        mode,
        autoclear: handover != Handover::Legacy,
        dm_name,
        dm_uuid,
    };
    let a = attach::attach(&source, &opts)?;
    match connect_device(xs, backend, &a, &handover, deadline, config.timeout) {
        Ok(()) => {
            tracing::info!(device = %a.path.display(), diskseq = a.diskseq, ?handover, "{backend}: connected");
            Ok(Some(a))
        }
        Err(e) => {
            if let Err(undo) = a.abandon() {
                tracing::error!("undoing: {undo}");
            }
            Err(e)
        }
    }
}

/// Connects to the NBD server `params` names and hands the socket to the backend;
/// `connected` once the backend has negotiated the export on it.
fn add_nbd(
    xs: &XenStore,
    backend: &BackendPath,
    params: &[u8],
    mode: Mode,
    handover: &Handover,
    deadline: Instant,
    timeout: Duration,
) -> Result<(), Error> {
    let text = String::from_utf8_lossy(params).into_owned();
    let nbd_error = |why: String| Error::Nbd {
        params: text.clone(),
        why,
    };
    let Handover::Socket(path) = handover else {
        return Err(Error::NbdNeedsHandoff);
    };
    let uri: nbd::Uri = text.parse().map_err(|e| nbd_error(format!("{e}")))?;
    let left = deadline.saturating_duration_since(Instant::now());
    let stream = nbd::Stream::connect(&uri, left).map_err(|e| nbd_error(format!("{e}")))?;
    let socket: OwnedFd = match stream {
        nbd::Stream::Tcp(s) => s.into(),
        nbd::Stream::Unix(s) => s.into(),
    };
    let info = DeviceInfo::nbd_socket(!mode.writable());
    hand_fd(path, socket.as_fd(), &info, deadline, timeout)?;
    tracing::info!(nbd = %text, "{backend}: connected");
    let status = backend.node(handoff::HOTPLUG_STATUS);
    xs.write(&status, handoff::STATUS_CONNECTED)
        .map_err(Error::xs("write", &status))
}

/// Publishes the opened device and hands it over; `connected` once the backend holds it.
fn connect_device(
    xs: &XenStore,
    backend: &BackendPath,
    a: &Attached,
    handover: &Handover,
    deadline: Instant,
    timeout: Duration,
) -> Result<(), Error> {
    // The series' form for backends that say they understand it: `opened` (blkback with the
    // series), or the fd handoff (blkbackd parses physical-device with xen::handoff).
    write_device_nodes(xs, backend, a, *handover != Handover::Legacy)?;
    match handover {
        Handover::Socket(path) => {
            let info = DeviceInfo {
                device: a.physical_device(true),
                read_only: a.read_only,
            };
            hand_fd(path, a.fd.as_fd(), &info, deadline, timeout)?;
        }
        Handover::Opened => wait_opened(xs, backend, deadline, timeout)?,
        Handover::Legacy => {}
    }
    let status = backend.node(handoff::HOTPLUG_STATUS);
    xs.write(&status, handoff::STATUS_CONNECTED)
        .map_err(Error::xs("write", &status))
}

/// Writes the device nodes in one transaction, refusing when the backend directory is gone.
fn write_device_nodes(
    xs: &XenStore,
    backend: &BackendPath,
    a: &Attached,
    with_diskseq: bool,
) -> Result<(), Error> {
    let pd = a.physical_device(with_diskseq).to_string();
    let path = a.path.to_string_lossy().into_owned();
    let seq = handoff::format_diskseq(a.diskseq);
    let record = a.created.record();
    let state = backend.node("state");
    let gone = xs
        .transaction(|tx| {
            match tx.read(&state) {
                Err(XsError::NotFound) => return Ok(true),
                Err(e) => return Err(e),
                Ok(_) => {}
            }
            // physical-device first: a reader outside the transaction sees all or nothing.
            tx.write(&backend.node(handoff::PHYSICAL_DEVICE), &pd)?;
            tx.write(&backend.node(handoff::PHYSICAL_DEVICE_PATH), &path)?;
            tx.write(&backend.node(handoff::DISKSEQ), &seq)?;
            match &record {
                Some(r) => tx.write(&backend.node(CREATED), r)?,
                None => rm_opt(tx, &backend.node(CREATED))?,
            }
            Ok(false)
        })
        .map_err(Error::xs("transaction", backend.as_str()))?;
    if gone {
        return Err(Error::BackendGone);
    }
    Ok(())
}

fn hand_fd(
    path: &std::path::Path,
    fd: BorrowedFd<'_>,
    info: &DeviceInfo,
    deadline: Instant,
    timeout: Duration,
) -> Result<(), Error> {
    let timed_out = |what| {
        move |e| match e {
            handoff::HandoffError::Io {
                source: rustix::io::Errno::AGAIN,
                ..
            } => Error::Timeout(timeout, what),
            e => e.into(),
        }
    };
    let sock = handoff::connect(path, deadline.saturating_duration_since(Instant::now()))
        .map_err(timed_out("a connection to the backend's handoff socket"))?;
    handoff::send_device(&sock, fd, info).map_err(timed_out("the handoff to be sent"))?;
    match handoff::recv_reply(&sock).map_err(timed_out("the backend's handoff reply"))? {
        Reply::Accepted => Ok(()),
        Reply::Rejected(e) => Err(Error::Rejected(e)),
    }
}

/// Waits until the backend writes `opened` = `1`, failing early when it goes away.
fn wait_opened(
    xs: &XenStore,
    backend: &BackendPath,
    deadline: Instant,
    timeout: Duration,
) -> Result<(), Error> {
    let opened = backend.node(handoff::OPENED);
    let state = backend.node("state");
    let token = format!("blkhotplug-{}", std::process::id());
    xs.watch(&opened, &token)
        .map_err(Error::xs("watch", &opened))?;
    xs.watch(&state, &token)
        .map_err(Error::xs("watch", &state))?;
    let result = loop {
        if read_opt(xs, &opened)?.as_deref() == Some(handoff::OPENED_YES.as_bytes()) {
            break Ok(());
        }
        match read_opt(xs, &state)?.as_deref() {
            None | Some(b"5" | b"6") => break Err(Error::BackendGone),
            Some(_) => {}
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break Err(Error::Timeout(
                timeout,
                "the backend to open the device (opened = 1)",
            ));
        }
        match xs.wait_watch_event(Some(left)) {
            Ok(_) => {}
            Err(e) => {
                break Err(Error::XenStore {
                    op: "wait for watch",
                    path: opened.clone(),
                    source: e,
                })
            }
        }
    };
    let _ = xs.unwatch(&opened, &token);
    let _ = xs.unwatch(&state, &token);
    result
}

/// Removes the device nodes and writes the error, in one transaction (best effort: the
/// error itself is what the caller reports).
fn report_failure(xs: &XenStore, backend: &BackendPath, e: &Error) {
    let msg = e.to_string();
    let state = backend.node("state");
    let r = xs.transaction(|tx| {
        if matches!(tx.read(&state), Err(XsError::NotFound)) {
            return Ok(());
        }
        for n in [
            handoff::PHYSICAL_DEVICE,
            handoff::PHYSICAL_DEVICE_PATH,
            handoff::DISKSEQ,
            CREATED,
        ] {
            rm_opt(tx, &backend.node(n))?;
        }
        tx.write(&backend.node(handoff::HOTPLUG_ERROR), &msg)?;
        tx.write(&backend.node(handoff::HOTPLUG_STATUS), handoff::STATUS_BUSY)
    });
    if let Err(w) = r {
        tracing::error!("could not report the failure in {backend}: {w}");
    }
}

/// `remove`: tears down what `add` created, if it is still the same device.
///
/// # Errors
/// What went wrong.
pub fn remove(xs: &XenStore, backend: &str) -> Result<Released, Error> {
    let backend = &parse_backend_path(backend)?;
    let record = backend.node(CREATED);
    let Some(created) = read_opt(xs, &record)? else {
        return Ok(Released::Gone);
    };
    let created = Created::parse(&created)?;
    let path_node = backend.node(handoff::PHYSICAL_DEVICE_PATH);
    let path = read_req(xs, &path_node)?;
    let path = match Source::parse(&path)? {
        Source::Path(p) => p,
        _ => {
            return Err(Error::BadParams {
                params: path_node,
                why: "not a device node path",
            })
        }
    };
    let seq_node = backend.node(handoff::DISKSEQ);
    let seq =
        handoff::parse_diskseq(&read_req(xs, &seq_node)?).map_err(|source| Error::BadNode {
            node: seq_node,
            source,
        })?;
    let released = attach::release(&created, &path, seq)?;
    rm_opt(xs, &record).map_err(Error::xs("rm", &record))?;
    tracing::info!(?released, "{backend}: removed {}", path.display());
    Ok(released)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_paths() {
        let be = parse_backend_path("/local/domain/0/backend/vbd/3/51712").unwrap();
        assert_eq!(
            be.node("params"),
            "/local/domain/0/backend/vbd/3/51712/params"
        );
        let rel = parse_backend_path("backend/vbd/3/51712").expect("libxl's relative form");
        assert_eq!(rel.node("params"), "backend/vbd/3/51712/params");
        for bad in [
            "",
            "/",
            "/a//b",
            "/a/b/",
            "/a b",
            "@releaseDomain",
            "backend/vif/3/0",
        ] {
            assert!(
                matches!(parse_backend_path(bad), Err(Error::BadParams { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn dm_identity_is_unique_and_valid() {
        let be = BackendPath::new(0, 3, 51712);
        let (n1, u1) = dm_identity(&be);
        let (n2, u2) = dm_identity(&be);
        assert_ne!((&n1, &u1), (&n2, &u2));
        assert!(n1.starts_with("blkhotplug-3-51712-"), "{n1}");
        assert!(crate::params::dm_name(n1.as_bytes()).is_ok());
        assert!(u1.len() < crate::dm::DM_UUID_LEN);
    }
}
