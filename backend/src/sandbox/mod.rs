//! Least privilege for `blkbackd serve`: the process a guest talks to gives up everything it
//! does not need once its files are open.
//!
//! A backend is the part of dom0 a guest reaches directly; in Linux it is kernel code. As a
//! process it can be confined, in layers, so that a bug the guest finds owns very little.
//!
//! # When
//! - [`prepare`], first thing in `blkbackd serve` (before any thread exists, so every thread
//!   inherits it): `no_new_privs`, and every capability dropped from all sets and the bounding
//!   set, except `CAP_SETUID`/`CAP_SETGID` (effective and permitted) while a `--user` switch is
//!   still to come. Root's
//!   uid stays: opening the root-owned device nodes (`/dev/xen/*`, `/dev/block/*`) needs
//!   ownership, not capabilities.
//! - [`confine`], as soon as the device is held (the XenStore connection, the platform's
//!   grant device and the disk's fd are open; no frontend can connect before that, so no guest
//!   byte is parsed unconfined). `blkbackd serve` arms it with [`arm`]; the serve loop calls
//!   [`confine_armed`] once the device is held. In order:
//!   1. switch to the configured user (`--user`), with no supplementary groups;
//!   2. Landlock: no file can be opened, created, removed or executed, and no TCP bind or
//!      connect, except what [`Reachable`] lists — the event-channel device (opened once per
//!      queue when a frontend connects; read, write and device ioctls) or, on the simulated
//!      platform, its directory (files, event-channel sockets); and the
//!      directory where the statistics file is atomically replaced. Abstract unix sockets and
//!      signals are scoped to the process (ABI 6). On kernels with an older ABI the ruleset is
//!      downgraded and the downgrade logged; without Landlock it says so loudly;
//!   3. every capability cleared, including `CAP_SETUID`/`CAP_SETGID`. One exception: where
//!      [`prepare`] could not lift `RLIMIT_MEMLOCK` (no `CAP_SYS_RESOURCE`, as in many
//!      containers), `CAP_IPC_LOCK` stays, because io_uring charges the registered bounce
//!      buffers to that limit otherwise (logged at info level);
//!   4. seccomp, on all threads (`SECCOMP_FILTER_FLAG_TSYNC`): an allow-list of the system
//!      calls the backend really makes ([`syscalls::ALLOWED`] and [`syscalls::ALLOWED_ARCH`]:
//!      81 names on x86_64, not `connect`; `socket` for `AF_UNIX` only; `ioctl` for the 12 requests of
//!      [`syscalls::IOCTLS`] only: event channels, grant maps and copies, the disk's size and
//!      discard); any other call or request kills the process (`SECCOMP_RET_KILL_PROCESS`).
//!      Landlock also limits device ioctls to the event-channel device among the files
//!      opened after confinement;
//!   5. the XenStore client's reader thread restarted from the confined thread (see
//!      "Every thread").
//! - Independently of this module's switches, each queue's io_uring is created disabled,
//!   restricted to the opcodes the data plane submits and to its registered files (the disk,
//!   the event channel, the stop eventfd), then enabled ([`uring`]). An NBD export's socket is
//!   connected and negotiated before confinement and is the disk's registered file: the ring
//!   sends and receives on it, and neither the ring (no `SOCKET`, `CONNECT`) nor seccomp (no
//!   `connect`, no `socket` but `AF_UNIX`) lets the process open another. A lost connection
//!   is replaced by a connector `serve` starts before confinement ([`crate::connector`]: a
//!   child process that can connect only to the disk's URI and passes the socket back), and
//!   that ring alone may replace its registered socket (`IORING_REGISTER_FILES_UPDATE`);
//!   xenstored's socket or `/dev/xen/xenbus`, after a xenstored restart, likewise comes from
//!   a connector ([`crate::xenstore_connector`]). io_uring operations are
//!   not seen by seccomp, so the ring gets its own allow-list. Each queue's event-channel
//!   handle is restricted to the frontend's domain (`IOCTL_EVTCHN_RESTRICT_DOMID`).
//!
//! `--no-sandbox` skips [`prepare`] and [`confine`] (not the io_uring and event-channel
//! restrictions, which cost nothing) and logs a warning.
//!
//! # Seeing a kill
//! A forbidden system call ends the process with `SIGSYS`; `blkbackd supervise` (or the
//! toolstack) sees the signal. The kernel also logs it through audit (`seccomp` action
//! `kill_process` is in `/proc/sys/kernel/seccomp/actions_logged` by default):
//! `dmesg | grep 'type=1326'`, `journalctl -k -g seccomp`, or `ausearch -m SECCOMP`, with the
//! process, the architecture and the system call number (`ausyscall <nr>` names it).
//!
//! # Every thread
//! Of the layers, only seccomp and `no_new_privs` are applied to the whole process at once
//! (`SECCOMP_FILTER_FLAG_TSYNC`). The user switch is done with the raw, per-thread
//! `setresuid`/`setresgid` system calls (not glibc's, which signals every thread), capability
//! sets are per thread (`capset`), and `landlock_restrict_self` applies to the calling thread
//! only; each is inherited by the threads that thread starts afterwards. When [`confine`]
//! runs, the process has two threads: the serve loop's, which confines itself, and the
//! XenStore client's reader, started when the connection opened, which still held
//! `CAP_SETUID`/`CAP_SETGID` (with `--user`), root's uid, and no Landlock domain. So
//! [`confine`] ends by restarting that reader ([`xen::xenstore::XenStore::restart_reader`]):
//! the old thread stops between two reads, handing over any message it received in part, and
//! the serve loop's thread, now confined, starts the new one, which inherits every layer.
//! Queue threads are started by the confined thread too. Every thread of a confined backend
//! therefore runs as the configured user, with no capabilities, in the Landlock domain, under
//! the seccomp filter.
//!
//! Linux's `LANDLOCK_RESTRICT_SELF_TSYNC` (Landlock ABI 8, Linux 7.0; 6.18 has ABI 7) would apply the
//! Landlock domain to sibling threads, but not the user switch nor the capability sets, so
//! the reader has to be restarted on every kernel anyway; it is not used.
//!
//! # Memory bounds per backend
//! Everything a guest can make the backend hold is sized at connect time from values the
//! backend caps, and nothing grows per request afterwards:
//! - queues: at most `--max-queues` (`multi-queue-max-queues`, default: the CPU count);
//! - in-flight requests: one slot per ring entry, at most 512 per queue (a 16-page ring,
//!   `--max-ring-page-order` 4): a slot is only taken from the ring when one is free;
//! - bounce buffers (`--grant-mode copy`): 11 pages per slot plus 8 regions of
//!   `--max-indirect-segments` (≤ 256) pages: at most 22 MiB + 8 MiB = 30 MiB per queue,
//!   allocated once;
//! - persistent grants (`--grant-mode map`): at most 1056 mapped pages (4.1 MiB of guest
//!   memory) per queue, as Linux's `max_persistent_grants`; per-request mappings at most one
//!   request's segments per slot, unmapped at completion;
//! - indirect pages: one private 8-page scratch copy per queue;
//! - XenStore values are at most 4096 bytes (xenstored's limit), read one at a time.
//!
//! So the private memory of a backend is bounded by about `queues × 31 MiB` in copy mode and
//! `queues × 1 MiB` in map mode, plus a few MiB of code, stacks and logs; the tests check
//! that a hostile guest run keeps the anonymous RSS under that bound.

mod filesystem;
mod privileges;
pub mod syscalls;
pub mod uring;

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use xen::xenstore::XenStore;

pub use privileges::User;

/// Why confinement failed. Failing closed: `blkbackd serve` stops rather than run unconfined.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// `--user` names no user, or is malformed.
    #[error("bad --user {spec:?}: {reason}")]
    BadUser {
        /// What was given.
        spec: String,
        /// Why it is refused.
        reason: String,
    },
    /// A privilege operation (prctl, capset, setresuid, ...) failed.
    #[error("{what}: {source}")]
    Privileges {
        /// What was being done.
        what: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The Landlock ruleset could not be built or applied.
    #[error("landlock: {0}")]
    Landlock(#[source] landlock::RulesetError),
    /// The seccomp filter could not be built or installed.
    #[error("seccomp: {0}")]
    Seccomp(#[source] seccompiler::Error),
    /// The XenStore reader thread could not be restarted under the confinement.
    #[error("restarting the XenStore reader thread: {0}")]
    XenStoreReader(#[source] xen::xenstore::XsError),
}

/// Something that stays reachable after [`confine`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reachable {
    /// A device node opened read-write after set-up (`/dev/xen/evtchn`, once per queue).
    Device(PathBuf),
    /// The simulated platform's directory: its files are opened read-write and its
    /// event-channel sockets created and removed.
    SimDir(PathBuf),
    /// The directory where the statistics file is rewritten (a temporary file renamed over
    /// it).
    StatsDir(PathBuf),
}

/// What [`confine`] leaves.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    /// The user to switch to, if any.
    pub user: Option<User>,
    /// What stays reachable in the file system.
    pub reachable: Vec<Reachable>,
}

impl Policy {
    /// The policy for a backend on `platform` keeping its statistics in `stats_file`.
    pub fn new(
        platform: &xen::PlatformConfig,
        stats_file: Option<&Path>,
        user: Option<User>,
    ) -> Self {
        let mut reachable = vec![match platform {
            xen::PlatformConfig::Xen => Reachable::Device(PathBuf::from("/dev/xen/evtchn")),
            xen::PlatformConfig::Sim { dir, .. } => Reachable::SimDir(dir.clone()),
        }];
        if let Some(dir) = stats_file.and_then(Path::parent) {
            // Created now, so that the rule has a directory to name.
            let _ = std::fs::create_dir_all(dir);
            reachable.push(Reachable::StatsDir(dir.to_owned()));
        }
        Self { user, reachable }
    }
}

/// What [`confine`] achieved, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// How far Landlock is enforced.
    pub landlock: filesystem::Enforcement,
    /// System calls in the seccomp allow-list.
    pub syscalls: usize,
}

/// Stage one, before any thread exists: `no_new_privs`, `RLIMIT_MEMLOCK` lifted for the
/// registered bounce buffers (the data plane caps them), and no capabilities (but the two a
/// later `--user` switch needs, when `user` is set).
///
/// # Errors
/// [`SandboxError::Privileges`] when the kernel refuses.
pub fn prepare(user: Option<&User>) -> Result<(), SandboxError> {
    privileges::set_no_new_privs()?;
    privileges::lift_memlock_limit();
    privileges::drop_capabilities(user.is_some())
}

/// Stage two, once every file is open: user switch, Landlock, no capabilities, seccomp, then
/// `xenstore`'s reader thread restarted from this thread, so that it inherits all of them.
///
/// # Errors
/// When a layer cannot be applied (Landlock's absence is not an error: it is logged), or
/// the reader thread cannot be restarted.
pub fn confine(policy: &Policy, xenstore: Option<&XenStore>) -> Result<Report, SandboxError> {
    if let Some(user) = &policy.user {
        privileges::switch_user(user)?;
    }
    let landlock = filesystem::restrict(&policy.reachable)?;
    privileges::drop_capabilities(false)?;
    let syscalls = syscalls::install()?;
    // Last, so that the new reader starts with every layer above (see "Every thread").
    if let Some(xs) = xenstore {
        xs.restart_reader().map_err(SandboxError::XenStoreReader)?;
    }
    Ok(Report { landlock, syscalls })
}

static ARMED: Mutex<Option<Policy>> = Mutex::new(None);

/// Arms [`confine_armed`]: confinement is a property of the whole process, so
/// `blkbackd serve`'s `main` decides it once, and the serve loop applies it at the right
/// moment. Library users (the tests, the demo's in-process parts) never arm it.
pub fn arm(policy: Policy) {
    if let Ok(mut armed) = ARMED.lock() {
        *armed = Some(policy);
    }
}

/// Applies the armed policy, once (later calls, and calls in a process that never armed one,
/// do nothing); `xenstore` is the process's XenStore connection, whose reader thread is
/// restarted under the confinement.
///
/// # Errors
/// When confinement fails; the caller must not go on serving.
pub fn confine_armed(xenstore: &XenStore) -> std::io::Result<()> {
    let policy = ARMED.lock().ok().and_then(|mut a| a.take());
    let Some(policy) = policy else {
        return Ok(());
    };
    match confine(&policy, Some(xenstore)) {
        Ok(report) => {
            tracing::info!(
                landlock = %report.landlock,
                syscalls = report.syscalls,
                user = ?policy.user,
                "confined: no capabilities, no new files, seccomp allow-list"
            );
            Ok(())
        }
        Err(e) => Err(std::io::Error::other(e)),
    }
}
