//! The toolstack's part, as xl writes it for a guest created without a disk and a disk added
//! by hand (`shared/reference/xen-e2e-facts.md`, "A userspace backend without xl's help").

use xen::xenstore::{Perm, PermAccess, XenStore, XsError, XsOps};
use xen::DomId;

/// What the toolstack says about one virtual disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VbdSpec {
    /// The backend domain.
    pub backend_domid: DomId,
    /// The guest.
    pub frontend_domid: DomId,
    /// The virtual device number (51712 = xvda).
    pub devid: u32,
    /// `params`: the disk's path.
    pub params: String,
    /// `mode`: `w` or `r`.
    pub mode: String,
    /// `device-type`: `disk` or `cdrom`.
    pub device_type: String,
    /// Extra backend nodes written in the same transaction (e.g. `physical-device`).
    pub extra_backend_nodes: Vec<(String, String)>,
}

impl VbdSpec {
    /// A writable disk at `params`.
    pub fn disk(backend_domid: DomId, frontend_domid: DomId, devid: u32, params: &str) -> Self {
        Self {
            backend_domid,
            frontend_domid,
            devid,
            params: params.to_owned(),
            mode: "w".to_owned(),
            device_type: "disk".to_owned(),
            extra_backend_nodes: Vec::new(),
        }
    }

    /// The backend directory.
    pub fn backend_path(&self) -> String {
        xen::xenstore::BackendPath::new(self.backend_domid, self.frontend_domid, self.devid)
            .to_string()
    }

    /// The frontend directory.
    pub fn frontend_path(&self) -> String {
        format!(
            "/local/domain/{}/device/vbd/{}",
            self.frontend_domid, self.devid
        )
    }
}

/// Writes the backend and frontend directories in one transaction, with xl's permissions:
/// the backend directory owned by the backend domain and readable by the guest, the frontend
/// directory owned by the guest and readable by the backend; `state` = 1 in both.
///
/// # Errors
/// XenStore's.
pub fn create_vbd(xs: &XenStore, spec: &VbdSpec) -> Result<(), XsError> {
    let be = spec.backend_path();
    let fe = spec.frontend_path();
    let be_perms = [
        Perm::new(spec.backend_domid, PermAccess::None),
        Perm::new(spec.frontend_domid, PermAccess::Read),
    ];
    let fe_perms = [
        Perm::new(spec.frontend_domid, PermAccess::None),
        Perm::new(spec.backend_domid, PermAccess::Read),
    ];
    xs.transaction(|tx| {
        let fe_home = format!("/local/domain/{}", spec.frontend_domid);
        tx.mkdir(&fe_home)?;
        tx.set_perms(
            &fe_home,
            &[Perm::new(spec.frontend_domid, PermAccess::None)],
        )?;
        tx.mkdir(&fe)?;
        tx.set_perms(&fe, &fe_perms)?;
        tx.mkdir(&be)?;
        tx.set_perms(&be, &be_perms)?;
        let mut nodes: Vec<(&str, String)> = vec![
            ("frontend", fe.clone()),
            ("frontend-id", spec.frontend_domid.to_string()),
            ("params", spec.params.clone()),
            ("mode", spec.mode.clone()),
            ("type", "phy".to_owned()),
            ("dev", "xvda".to_owned()),
            ("device-type", spec.device_type.clone()),
            ("online", "1".to_owned()),
        ];
        nodes.extend(
            spec.extra_backend_nodes
                .iter()
                .map(|(k, v)| (k.as_str(), v.clone())),
        );
        nodes.push(("state", "1".to_owned()));
        for (name, value) in &nodes {
            tx.write(&format!("{be}/{name}"), value)?;
        }
        for (name, value) in [
            ("backend", be.clone()),
            ("backend-id", spec.backend_domid.to_string()),
            ("virtual-device", spec.devid.to_string()),
            ("device-type", spec.device_type.clone()),
            ("state", "1".to_owned()),
        ] {
            tx.write(&format!("{fe}/{name}"), value)?;
        }
        Ok(())
    })
}

/// Asks for the disk's removal as libxl does: `online` = 0 and `state` = 5 (Closing) in the
/// backend directory.
///
/// # Errors
/// XenStore's.
pub fn request_removal(xs: &XenStore, spec: &VbdSpec) -> Result<(), XsError> {
    let be = spec.backend_path();
    xs.transaction(|tx| {
        tx.write(&format!("{be}/online"), "0")?;
        tx.write(&format!("{be}/state"), "5")
    })
}

/// Removes both directories (after the backend closed), as libxl does at the end.
///
/// # Errors
/// XenStore's, except a directory already gone.
pub fn destroy_vbd(xs: &XenStore, spec: &VbdSpec) -> Result<(), XsError> {
    for p in [spec.backend_path(), spec.frontend_path()] {
        match xs.rm(&p) {
            Ok(()) | Err(XsError::NotFound) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
