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
//! Why each group is there:
//! - the serve loop and XenStore: `ppoll`/`poll`, `read`, `write`, `sendto`, `recvfrom`,
//!   `futex`, `clock_gettime`, `clock_nanosleep`/`nanosleep` (retry backoff);
//! - starting and ending a queue: `clone3`/`clone`, `mmap`, `munmap`, `mprotect`, `madvise`,
//!   `brk`, `rseq`, `set_robust_list`, `sigaltstack`, `rt_sigprocmask`, `prctl` (thread name),
//!   `sched_getaffinity`, `getrandom`, `gettid`, `io_uring_setup`, `io_uring_register`,
//!   `io_uring_enter`, `eventfd2`, `ioctl` (grant maps, event channels, block device size and
//!   discard), `openat` (`open` on x86_64) and `close` (the event-channel device, opened per queue: Landlock
//!   decides which paths), `fcntl`, `fstat`/`newfstatat`/`statx`;
//! - the simulated platform: `socket`, `bind`, `unlink`/`unlinkat` (event-channel sockets),
//!   `sched_yield` (grant-table spin);
//! - the statistics file: `openat`, `write`, `rename`/`renameat`/`renameat2`,
//!   `mkdir`/`mkdirat`;
//! - a synchronous discard on a file: `fallocate`;
//! - ending: `exit`, `exit_group`, `rt_sigreturn`, `tgkill` (an abort).

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
}
