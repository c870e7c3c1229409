//! Landlock: no new files reachable, beyond what [`super::Reachable`] lists.

use landlock::{
    Access, AccessFs, AccessNet, CompatLevel, Compatible, PathBeneath, PathFd, Ruleset,
    RulesetAttr, RulesetCreatedAttr, RulesetStatus, Scope, ABI,
};

use super::{Reachable, SandboxError};

/// The newest ABI this ruleset is written for; older kernels get a logged downgrade.
const TARGET_ABI: ABI = ABI::V6;

/// How far the ruleset is enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enforcement {
    /// Every requested restriction.
    Full,
    /// Some restrictions are missing on this kernel (an older Landlock ABI).
    Partial,
    /// The kernel has no Landlock: files can still be opened.
    None,
}

impl std::fmt::Display for Enforcement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Full => "full",
            Self::Partial => "partial (older kernel ABI)",
            Self::None => "none (no Landlock in this kernel)",
        })
    }
}

/// Restricts the calling thread and the threads it starts from now on.
pub(super) fn restrict(reachable: &[Reachable]) -> Result<Enforcement, SandboxError> {
    let abi = TARGET_ABI;
    let file_rw = AccessFs::ReadFile | AccessFs::WriteFile;
    let mut created = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(abi))
        .and_then(|r| r.handle_access(AccessNet::from_all(abi)))
        .and_then(|r| r.scope(Scope::AbstractUnixSocket | Scope::Signal))
        .and_then(Ruleset::create)
        .map_err(SandboxError::Landlock)?;
    for r in reachable {
        let (path, access) = match r {
            // ioctl: the event-channel device is opened after confinement, and Landlock ABI 5
            // checks device ioctls on files opened under the ruleset.
            Reachable::Device(p) => (p, file_rw | AccessFs::IoctlDev),
            Reachable::SimDir(p) => (
                p,
                file_rw | AccessFs::ReadDir | AccessFs::MakeSock | AccessFs::RemoveFile,
            ),
            Reachable::StatsDir(p) => (
                p,
                file_rw | AccessFs::MakeReg | AccessFs::RemoveFile | AccessFs::Truncate,
            ),
        };
        // A path that does not exist (no /dev/xen/evtchn here) keeps nothing reachable.
        let Ok(fd) = PathFd::new(path) else {
            tracing::debug!(path = %path.display(), "not reachable after confinement: absent");
            continue;
        };
        created = created
            .add_rule(PathBeneath::new(fd, access))
            .map_err(SandboxError::Landlock)?;
    }
    let status = created.restrict_self().map_err(SandboxError::Landlock)?;
    let enforcement = match status.ruleset {
        RulesetStatus::FullyEnforced => Enforcement::Full,
        RulesetStatus::PartiallyEnforced => Enforcement::Partial,
        RulesetStatus::NotEnforced => Enforcement::None,
    };
    match enforcement {
        Enforcement::Full => {}
        Enforcement::Partial => tracing::warn!(
            "Landlock: this kernel's ABI is older than {abi:?}; some restrictions (truncate, TCP, \
             ioctl on devices, scoping) are missing"
        ),
        Enforcement::None => tracing::error!(
            "Landlock is not available in this kernel: the confined backend can still open files \
             (seccomp and the other layers apply)"
        ),
    }
    Ok(enforcement)
}
