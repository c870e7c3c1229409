//! The seccomp allow-list: the system calls a confined backend makes. Found by running the
//! whole end-to-end suite (`cargo test -p tests`: every grant mode and ABI, indirect and
//! persistent grants, reconnects, device errors, removal, SIGTERM) and the demo under
//! `strace -f`, and keeping the calls of the `blkbackd serve` threads after their
//! `seccomp(SECCOMP_SET_MODE_FILTER)`: 33 distinct calls. To those are added the calls that
//! real Xen needs instead of the simulation (`ioctl` on gntdev, evtchn and the block device),
//! and the alternatives a libc, the standard library or another kernel may pick: `clone`,
//! `brk`, `mremap` (glibc's `realloc` of large blocks), `restart_syscall` (a sleep interrupted
//! by SIGTERM), the `*at` and older forms, `gettimeofday`/`time` (a paravirtualised clock
//! without a vDSO), identity and limit queries (`getpid`, `getuid`, `getrlimit`,
//! `prlimit64`, `uname`, `sysinfo`, `getcpu`), reads and writes on fds already open
//! (`pread64`, `pwrite64`, `readv`, `writev`, `lseek`, `fsync`, `fdatasync`, `sendmsg`,
//! `recvmsg`, `shutdown`) and `getdents64`/`readlinkat` (Landlock decides what can be reached).
//! None of them gains anything: what matters is what stays out (`execve`, `ptrace`, `mount`,
//! `bpf`, `setuid`, `capset`, `kexec_load`, module loading, `perf_event_open`,
//! `process_vm_*`, `userfaultfd`, sockets of any family but `AF_UNIX`, ...).
//! Anything else kills the process.
//!
//! `ioctl` is filtered by request number ([`IOCTLS`]): only the requests the backend makes
//! once confined. Everything else a device driver offers, on the fds opened before
//! confinement too (the XenStore device, gntdev, the disk), kills the process.
//!
//! Why each group is there:
//! - the serve loop and XenStore: `ppoll`/`poll`, `read`, `write`, `sendto`, `recvfrom`,
//!   `futex`, `clock_gettime`, `clock_nanosleep`/`nanosleep` (retry backoff);
//! - starting and ending a queue: `clone3`/`clone`, `mmap`, `munmap`, `mprotect`, `madvise`,
//!   `brk`, `rseq`, `set_robust_list`, `sigaltstack`, `rt_sigprocmask`, `prctl` (thread name),
//!   `sched_getaffinity`, `getrandom`, `gettid`, `io_uring_setup`, `io_uring_register`,
//!   `io_uring_enter`, `eventfd2`, `ioctl` ([`IOCTLS`]: grant maps and copies, event
//!   channels, block device size and discard), `openat` (`open` on x86_64) and `close` (the event-channel device, opened per queue: Landlock
//!   decides which paths), `fcntl`, `fstat`/`newfstatat`/`statx`;
//! - new connections (to xenstored after it restarted, to an NBD server) come from
//!   connectors started before confinement (`crate::connector`), over `sendmsg`/`recvmsg`:
//!   there is no `connect`, so a confined backend reaches no socket it was not given;
//!   `wait4` reaps a connector (only the backend's own children);
//! - the simulated platform: `socket`, `bind`, `unlink`/`unlinkat` (event-channel sockets),
//!   `sched_yield` (grant-table spin);
//! - the statistics file: `openat`, `write`, `rename`/`renameat`/`renameat2`,
//!   `mkdir`/`mkdirat`;
//! - a synchronous discard on a file: `fallocate`;
//! - ending: `exit`, `exit_group`, `rt_sigreturn`, `tgkill` (an abort).

use blkdev::block;
use rustix::ioctl::{opcode, Direction};

use super::SandboxError;

/// System calls allowed on every architecture.
pub const ALLOWED: &[&str] = &[
    "bind",
    "brk",
    "clock_gettime",
    "clock_nanosleep",
    "clone",
    "clone3",
    "close",
    "eventfd2",
    "exit",
    "exit_group",
    "fallocate",
    "fcntl",
    "fdatasync",
    "fstat",
    "fsync",
    "futex",
    "getcpu",
    "getdents64",
    "getegid",
    "geteuid",
    "getgid",
    "getpid",
    "getrandom",
    "getrlimit",
    "gettid",
    "gettimeofday",
    "getuid",
    "io_uring_enter",
    "io_uring_register",
    "io_uring_setup",
    "ioctl",
    "lseek",
    "madvise",
    "mkdirat",
    "mmap",
    "mprotect",
    "mremap",
    "munmap",
    "nanosleep",
    "newfstatat",
    "openat",
    "ppoll",
    "prctl",
    "pread64",
    "prlimit64",
    "pwrite64",
    "read",
    "readlinkat",
    "readv",
    "recvfrom",
    "recvmsg",
    "renameat",
    "renameat2",
    "restart_syscall",
    "rseq",
    "rt_sigaction",
    "rt_sigprocmask",
    "rt_sigreturn",
    "sched_getaffinity",
    "sched_yield",
    "sendmsg",
    "sendto",
    "set_robust_list",
    "shutdown",
    "sigaltstack",
    "socket",
    "statx",
    "sysinfo",
    "tgkill",
    "uname",
    "unlinkat",
    "wait4",
    "write",
    "writev",
];

/// System calls that exist only on x86_64 (older forms std or rustix may pick there).
#[cfg(target_arch = "x86_64")]
/// `open`: rustix's `fs::open` is `open(2)` there, and the real platform opens the
/// event-channel device with it on each queue's thread, after confinement.
pub const ALLOWED_ARCH: &[&str] = &[
    "mkdir", "open", "poll", "readlink", "rename", "time", "unlink",
];
/// System calls that exist only on this architecture.
#[cfg(not(target_arch = "x86_64"))]
pub const ALLOWED_ARCH: &[&str] = &[];

/// `AF_UNIX`: the one address family `socket` may create.
const AF_UNIX: u32 = 1;

/// `_IOC(_IOC_NONE, group, nr, size)`, the Xen devices' request encoding.
const fn xen_request(group: u8, nr: u8, size: usize) -> u32 {
    opcode::from_components(Direction::None, group, nr, size) as u32
}

/// The `ioctl` requests a confined backend makes, with their names (the values of Linux's
/// `include/uapi/xen/evtchn.h`, `include/uapi/xen/gntdev.h` and `include/uapi/linux/fs.h`;
/// the `xen` crate checks its own copies against the headers; the block requests are the
/// `blkdev` crate's, the very numbers `Device` calls). Found by reading every
/// `ioctl` of the code that runs after [`super::confine`]:
/// - the event-channel device, opened per queue on real Xen: bind to the frontend's port,
///   restrict the handle to its domain, notify, reset after an overflow, unbind
///   (`xen::evtchn`; binding an unbound port is the frontend's side, not the backend's);
/// - gntdev, opened before confinement: map, find and unmap grants (`--grant-mode map`) and
///   grant copy (`--grant-mode copy`) (`xen::gntdev`; raising the grant limit is done at open);
/// - the disk: its size again on a resize (`BLKGETSIZE64`, `Device::refresh_size`) and a
///   synchronous discard (`BLKDISCARD`, `BLKSECDISCARD`, `Device::discard_sync`). The other
///   block queries happen when the device is opened, before confinement.
///
/// The simulated platform makes no ioctl (files and unix sockets). Only the low 32 bits of
/// the request are compared: the kernel's `ioctl` takes an `unsigned int`.
pub const IOCTLS: &[(&str, u32)] = &[
    ("IOCTL_EVTCHN_BIND_INTERDOMAIN", xen_request(b'E', 1, 8)),
    ("IOCTL_EVTCHN_UNBIND", xen_request(b'E', 3, 4)),
    ("IOCTL_EVTCHN_NOTIFY", xen_request(b'E', 4, 4)),
    ("IOCTL_EVTCHN_RESET", xen_request(b'E', 5, 0)),
    ("IOCTL_EVTCHN_RESTRICT_DOMID", xen_request(b'E', 6, 2)),
    ("IOCTL_GNTDEV_MAP_GRANT_REF", xen_request(b'G', 0, 24)),
    ("IOCTL_GNTDEV_UNMAP_GRANT_REF", xen_request(b'G', 1, 16)),
    (
        "IOCTL_GNTDEV_GET_OFFSET_FOR_VADDR",
        xen_request(b'G', 2, 24),
    ),
    ("IOCTL_GNTDEV_GRANT_COPY", xen_request(b'G', 8, 16)),
    ("BLKGETSIZE64", block::BLKGETSIZE64),
    ("BLKDISCARD", block::BLKDISCARD),
    ("BLKSECDISCARD", block::BLKSECDISCARD),
];

/// Every allowed system call's name.
pub fn allow_list() -> impl Iterator<Item = &'static str> {
    ALLOWED.iter().chain(ALLOWED_ARCH).copied()
}

/// The filter as seccompiler's JSON: allow the list, kill the process on anything else.
fn filter_json() -> String {
    let rules: Vec<String> = allow_list()
        .map(|name| match name {
            // Unix sockets only (the simulated platform's event channels): no network.
            "socket" => format!(
                "{{\"syscall\":\"socket\",\"args\":[{{\"index\":0,\"type\":\"dword\",\"op\":\"eq\",\"val\":{AF_UNIX}}}]}}"
            ),
            // Only the requests the backend makes: one rule each (any of them matches).
            "ioctl" => IOCTLS
                .iter()
                .map(|(_, request)| format!(
                    "{{\"syscall\":\"ioctl\",\"args\":[{{\"index\":1,\"type\":\"dword\",\"op\":\"eq\",\"val\":{request}}}]}}"
                ))
                .collect::<Vec<_>>()
                .join(","),
            _ => format!("{{\"syscall\":\"{name}\"}}"),
        })
        .collect();
    format!(
        "{{\"blkbackd\":{{\"mismatch_action\":\"kill_process\",\"filter_action\":\"allow\",\"filter\":[{}]}}}}",
        rules.join(",")
    )
}

/// Installs the filter on every thread of the process. Returns the allow-list's size.
pub(super) fn install() -> Result<usize, SandboxError> {
    let arch = std::env::consts::ARCH
        .try_into()
        .map_err(|e| SandboxError::Seccomp(seccompiler::Error::Backend(e)))?;
    let mut programs = seccompiler::compile_from_json(filter_json().as_bytes(), arch)
        .map_err(SandboxError::Seccomp)?;
    let program = programs
        .remove("blkbackd")
        .ok_or(SandboxError::Seccomp(seccompiler::Error::EmptyFilter))?;
    seccompiler::apply_filter_all_threads(&program).map_err(SandboxError::Seccomp)?;
    Ok(allow_list().count())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_allow_list_compiles_for_this_architecture() {
        let arch = std::env::consts::ARCH.try_into().unwrap();
        let programs = seccompiler::compile_from_json(filter_json().as_bytes(), arch).unwrap();
        assert!(!programs["blkbackd"].is_empty());
        let mut names: Vec<&str> = allow_list().collect();
        names.sort_unstable();
        let n = names.len();
        names.dedup();
        assert_eq!(names.len(), n, "duplicate names");
        for forbidden in [
            "execve",
            "execveat",
            "ptrace",
            "open_by_handle_at",
            "setuid",
            "capset",
            "kexec_load",
            "bpf",
            "mount",
        ] {
            assert!(
                !names.contains(&forbidden),
                "{forbidden} must not be allowed"
            );
        }
    }

    #[test]
    #[cfg(target_pointer_width = "64")]
    fn ioctl_requests_match_the_headers() {
        let want: &[(&str, u32)] = &[
            ("IOCTL_EVTCHN_BIND_INTERDOMAIN", 0x0008_4501),
            ("IOCTL_EVTCHN_UNBIND", 0x0004_4503),
            ("IOCTL_EVTCHN_NOTIFY", 0x0004_4504),
            ("IOCTL_EVTCHN_RESET", 0x0000_4505),
            ("IOCTL_EVTCHN_RESTRICT_DOMID", 0x0002_4506),
            ("IOCTL_GNTDEV_MAP_GRANT_REF", 0x0018_4700),
            ("IOCTL_GNTDEV_UNMAP_GRANT_REF", 0x0010_4701),
            ("IOCTL_GNTDEV_GET_OFFSET_FOR_VADDR", 0x0018_4702),
            ("IOCTL_GNTDEV_GRANT_COPY", 0x0010_4708),
            ("BLKGETSIZE64", 0x8008_1272),
            ("BLKDISCARD", 0x1277),
            ("BLKSECDISCARD", 0x127d),
        ];
        assert_eq!(IOCTLS, want);
    }
}
