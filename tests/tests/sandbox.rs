//! Least privilege, layer by layer: the real `blkbackd serve` is confined once it holds its
//! device (and still serves), a confined process cannot open a new file nor make a system call
//! outside the allow-list (it is killed with SIGSYS), and a restricted io_uring cannot reach an
//! fd it was not given nor run an operation outside its list.
//!
//! The layer tests run the confinement in a child process (this test binary, re-run with
//! `BLKBACKD_SANDBOX_CHILD` naming what to try), since confinement cannot be undone.

use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use backend::sandbox::{self, Policy, Reachable};
use io_uring::{opcode, types};
use sim::front::FrontOptions;
use sim::toolstack::VbdSpec;
use sim::workload::DiskModel;
use tests::{connected, exercise, remove, Backend, Sim, TempDir, DEVID, GUEST};
use xen::handoff::Reply;

const CHILD: &str = "BLKBACKD_SANDBOX_CHILD";
const SIGSYS: i32 = 31;

/// One line of `/proc/<pid>/status` (or of a thread's), its value.
fn status_field(status: &str, name: &str) -> Option<String> {
    status.lines().find_map(|l| {
        l.strip_prefix(name)?
            .strip_prefix(':')
            .map(|v| v.trim().to_owned())
    })
}

/// Capability bits a confined backend may keep: none, or CAP_IPC_LOCK (bit 14) where
/// RLIMIT_MEMLOCK cannot be lifted (a container without CAP_SYS_RESOURCE).
fn caps_ok(hex: &str) -> bool {
    u64::from_str_radix(hex, 16).is_ok_and(|v| v & !(1 << 14) == 0)
}

#[test]
fn the_real_backend_is_confined_and_still_serves() {
    let sim = Sim::new("sandbox-serve");
    let (spec, mut backend, mut front) =
        connected(&sim, 32, &["--grant-mode", "copy"], FrontOptions::default());
    let mut model = DiskModel::zeroed(front.info().unwrap().sectors / 8, true);
    exercise(&mut front, &mut model);
    // Every thread: no_new_privs, a seccomp filter, no capabilities.
    let threads = assert_confined(backend.pid(), None).len();
    // Main thread, XenStore reader, at least one queue.
    assert!(threads >= 3, "{threads} threads");
    // The statistics file is still rewritten under Landlock.
    let before = std::fs::metadata(&backend.stats_file)
        .unwrap()
        .modified()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(600));
    let after = std::fs::metadata(&backend.stats_file)
        .unwrap()
        .modified()
        .unwrap();
    assert!(after > before, "the statistics file is no longer updated");
    remove(&sim, &spec, &mut backend, &mut front);
}

#[test]
fn no_sandbox_leaves_the_backend_unconfined() {
    let sim = Sim::new("sandbox-off");
    let (spec, mut backend, mut front) =
        connected(&sim, 8, &["--no-sandbox"], FrontOptions::default());
    let status = std::fs::read_to_string(format!("/proc/{}/status", backend.pid())).unwrap();
    assert_eq!(status_field(&status, "Seccomp").as_deref(), Some("0"));
    remove(&sim, &spec, &mut backend, &mut front);
}

/// Re-runs `test` in a child with `what` to try; returns its exit status.
fn child(test: &str, what: &str, dir: &Path) -> std::process::ExitStatus {
    Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD, what)
        .env("BLKBACKD_SANDBOX_DIR", dir)
        .status()
        .expect("running the child")
}

/// In the child: confines this process with `dir` as its only reachable directory.
fn confine_child() -> std::path::PathBuf {
    let dir = std::path::PathBuf::from(std::env::var_os("BLKBACKD_SANDBOX_DIR").unwrap());
    sandbox::prepare(None).expect("prepare");
    let policy = Policy {
        user: None,
        reachable: vec![
            Reachable::SimDir(dir.join("reachable")),
            Reachable::Device("/dev/null".into()),
        ],
    };
    let report = sandbox::confine(&policy, None).expect("confine");
    assert!(report.syscalls > 20);
    dir
}

/// `TIOCSTI`: pushes a byte into a terminal's input, as if typed (a classic way out of a
/// sandbox that shares a terminal); no backend has any use for it.
const TIOCSTI: u32 = 0x5412;

/// A request of the allow-list, by name.
fn allowed_request(name: &str) -> u32 {
    sandbox::syscalls::IOCTLS
        .iter()
        .find(|(n, _)| *n == name)
        .unwrap_or_else(|| panic!("{name} is not allowed"))
        .1
}

/// Issues ioctl `request` on `file` (`/dev/null`), with a pointer to a zeroed argument as
/// large as any of the backend's.
fn ioctl(file: &std::fs::File, request: u32) -> rustix::io::Result<()> {
    let mut arg = [0u8; 64];
    // SAFETY: the file is /dev/null, whose driver has no ioctls (ENOTTY): the argument, valid
    // and large enough for any request used here, is not even read.
    unsafe {
        xen::ioctl::call(
            std::os::fd::AsFd::as_fd(file),
            request as rustix::ioctl::Opcode,
            arg.as_mut_ptr(),
        )
    }
    .map(drop)
}

/// Exits the child: 0 when `ok`, with a message otherwise.
fn child_exit(ok: bool, what: &str) -> ! {
    if !ok {
        eprintln!("sandbox child: {what}");
    }
    std::process::exit(if ok { 0 } else { 1 })
}

#[test]
fn a_confined_process_cannot_open_a_new_file() {
    if std::env::var_os(CHILD).is_some() {
        let dir = confine_child();
        let denied = |r: std::io::Result<std::fs::File>| matches!(r, Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied);
        // An existing file elsewhere, for reading or writing, and a new one.
        if !denied(std::fs::File::open(dir.join("outside"))) {
            child_exit(false, "opened an existing file for reading");
        }
        if !denied(
            std::fs::OpenOptions::new()
                .write(true)
                .open(dir.join("outside")),
        ) {
            child_exit(false, "opened an existing file for writing");
        }
        if !denied(std::fs::File::create(dir.join("new"))) {
            child_exit(false, "created a file");
        }
        if !denied(std::fs::File::open("/etc/passwd")) {
            child_exit(false, "opened /etc/passwd");
        }
        if !denied(std::fs::File::open("/dev/zero")) {
            child_exit(false, "opened /dev/zero");
        }
        // A reachable device opens, and its ioctls reach the driver (ENOTTY from /dev/null,
        // not EACCES from Landlock): the event-channel device needs both.
        let null = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null");
        match null.map(|f| ioctl(&f, allowed_request("IOCTL_EVTCHN_NOTIFY"))) {
            Ok(Err(rustix::io::Errno::NOTTY)) => {}
            other => child_exit(false, &format!("/dev/null: {other:?}")),
        }
        // The real platform opens the event-channel device with rustix::fs::open, which is
        // open(2), not openat(2), on x86_64: allowed by seccomp, decided by Landlock (a
        // queue on real Xen was once killed here with SIGSYS).
        let flags = rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CLOEXEC;
        if let Err(e) = rustix::fs::open("/dev/null", flags, rustix::fs::Mode::empty()) {
            child_exit(false, &format!("open(2) of a reachable device: {e}"));
        }
        if rustix::fs::open("/etc/passwd", flags, rustix::fs::Mode::empty()).is_ok() {
            child_exit(false, "open(2) of /etc/passwd succeeded");
        }
        // What the policy keeps reachable still is.
        let kept = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(dir.join("reachable/file"));
        child_exit(
            kept.is_ok(),
            "the reachable directory's file could not be opened",
        );
    }
    let tmp = TempDir::new("sandbox-open");
    std::fs::write(tmp.path().join("outside"), b"x").unwrap();
    std::fs::create_dir(tmp.path().join("reachable")).unwrap();
    std::fs::write(tmp.path().join("reachable/file"), b"x").unwrap();
    let status = child(
        "a_confined_process_cannot_open_a_new_file",
        "open",
        tmp.path(),
    );
    assert!(status.success(), "child: {status}");
    assert!(!tmp.path().join("new").exists());
}

#[test]
fn a_forbidden_system_call_kills_the_process() {
    if let Some(what) = std::env::var_os(CHILD) {
        let dir = confine_child();
        let dgram_socket =
            |family| rustix::net::socket(family, rustix::net::SocketType::DGRAM, None);
        if what == "allowed" {
            // An allowed call returns normally.
            let _ = rustix::thread::gettid();
            child_exit(true, "");
        }
        if what == "unix" {
            // Unix sockets stay possible (the simulated platform's event channels).
            let ok = dgram_socket(rustix::net::AddressFamily::UNIX).is_ok();
            child_exit(ok, "a unix socket was refused");
        }
        if what == "ioctl-allowed" || what == "ioctl-forbidden" {
            let null = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")
                .unwrap_or_else(|e| child_exit(false, &format!("/dev/null: {e}")));
            if what == "ioctl-allowed" {
                // Every request the backend makes gets through to the driver.
                for (name, request) in sandbox::syscalls::IOCTLS {
                    if ioctl(&null, *request) != Err(rustix::io::Errno::NOTTY) {
                        child_exit(false, &format!("{name} did not reach /dev/null"));
                    }
                }
                child_exit(true, "");
            }
            // Any other request kills, even on a file that may be opened: here.
            let _ = ioctl(&null, TIOCSTI);
            child_exit(false, "ioctl(TIOCSTI) returned");
        }
        if what == "connect" {
            // No connection even to a unix socket in reach: new ones come from connectors
            // (backend::connector), started before confinement.
            let sock = rustix::net::socket(
                rustix::net::AddressFamily::UNIX,
                rustix::net::SocketType::STREAM,
                None,
            )
            .unwrap_or_else(|e| child_exit(false, &format!("socket: {e}")));
            let addr = rustix::net::SocketAddrUnix::new(dir.join("reachable/listener"))
                .unwrap_or_else(|e| child_exit(false, &format!("address: {e}")));
            let _ = rustix::net::connect(&sock, &addr);
            child_exit(false, "connect returned");
        }
        if what == "inet" {
            // A network socket is not: killed here.
            let _ = dgram_socket(rustix::net::AddressFamily::INET);
            child_exit(false, "socket(AF_INET) returned");
        }
        // getppid is not in the allow-list: the kernel kills the process here.
        let _ = rustix::process::getppid();
        child_exit(false, "getppid returned");
    }
    let tmp = TempDir::new("sandbox-syscall");
    std::fs::create_dir(tmp.path().join("reachable")).unwrap();
    let test = "a_forbidden_system_call_kills_the_process";
    let allowed = child(test, "allowed", tmp.path());
    assert!(allowed.success(), "allowed: {allowed}");
    let status = child(test, "forbidden", tmp.path());
    assert_eq!(status.signal(), Some(SIGSYS), "forbidden: {status}");
    let unix = child(test, "unix", tmp.path());
    assert!(unix.success(), "unix: {unix}");
    let _listener =
        std::os::unix::net::UnixListener::bind(tmp.path().join("reachable/listener")).unwrap();
    let connect = child(test, "connect", tmp.path());
    assert_eq!(connect.signal(), Some(SIGSYS), "connect: {connect}");
    assert!(!sandbox::syscalls::ALLOWED.contains(&"connect"));
    let inet = child(test, "inet", tmp.path());
    assert_eq!(inet.signal(), Some(SIGSYS), "inet: {inet}");
    let ioctl_allowed = child(test, "ioctl-allowed", tmp.path());
    assert!(ioctl_allowed.success(), "ioctl-allowed: {ioctl_allowed}");
    let ioctl_forbidden = child(test, "ioctl-forbidden", tmp.path());
    assert_eq!(
        ioctl_forbidden.signal(),
        Some(SIGSYS),
        "ioctl-forbidden: {ioctl_forbidden}"
    );
    assert!(!sandbox::syscalls::ALLOWED.contains(&"getppid"));
    assert!(sandbox::syscalls::IOCTLS.iter().all(|(_, r)| *r != TIOCSTI));
}

/// Submits one entry and returns its result.
fn run_one(ring: &mut io_uring::IoUring, e: io_uring::squeue::Entry) -> i32 {
    // SAFETY: the entries built by the callers point at buffers that outlive this call, which
    // waits for the completion.
    unsafe { ring.submission().push(&e) }.unwrap();
    ring.submit_and_wait(1).unwrap();
    ring.completion().next().unwrap().result()
}

#[test]
fn a_restricted_io_uring_reaches_only_its_registered_files_and_operations() {
    let tmp = TempDir::new("sandbox-uring");
    let given = std::fs::File::create(tmp.path().join("given")).unwrap();
    std::fs::write(tmp.path().join("other"), b"secret").unwrap();
    let other = std::fs::File::open(tmp.path().join("other")).unwrap();
    let mut ring = sandbox::uring::builder().build(8).unwrap();
    sandbox::uring::restrict(&ring, &[given.as_raw_fd()], false).unwrap();
    let mut buf = [0u8; 6];
    let eacces = -rustix::io::Errno::ACCESS.raw_os_error();
    // A write to the registered file works.
    let data = *b"hello!";
    let w = opcode::Write::new(types::Fixed(0), data.as_ptr(), 6).build();
    // Write (non-vectored, unregistered buffer) is not in the list either.
    assert_eq!(run_one(&mut ring, w), eacces, "plain write allowed");
    let iov = [rustix::io::IoSlice::new(&data)];
    let wv = opcode::Writev::new(types::Fixed(0), iov.as_ptr().cast(), 1).build();
    assert_eq!(run_one(&mut ring, wv), 6);
    // Another fd of the process, by number: refused.
    let mut iov = [rustix::io::IoSliceMut::new(&mut buf)];
    let rv = opcode::Readv::new(types::Fd(other.as_raw_fd()), iov.as_mut_ptr().cast(), 1).build();
    assert_eq!(run_one(&mut ring, rv), eacces, "read another fd");
    // An index that is not registered: refused by the kernel's fixed-file table.
    let rv = opcode::Readv::new(types::Fixed(1), iov.as_mut_ptr().cast(), 1).build();
    assert!(run_one(&mut ring, rv) < 0);
    // Opening a file through the ring (seccomp never sees io_uring operations): refused.
    let path = c"/etc/passwd";
    let open = opcode::OpenAt::new(types::Fd(libc_at_fdcwd()), path.as_ptr()).build();
    assert_eq!(run_one(&mut ring, open), eacces, "openat through the ring");
    // The ring takes no new registrations.
    assert!(ring
        .submitter()
        .register_files_update(0, &[other.as_raw_fd()])
        .is_err());
    assert_eq!(std::fs::read(tmp.path().join("given")).unwrap(), b"hello!");
    assert_eq!(buf, [0; 6]);
}

/// `AT_FDCWD`.
fn libc_at_fdcwd() -> i32 {
    -100
}

/// Opens every file and directory under `dir` to everyone (the simulated platform's files
/// belong to root; a backend running as another user must reach them, as it must reach
/// `/dev/xen/evtchn` on real Xen).
fn open_to_all(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mode = if dir.is_dir() { 0o777 } else { 0o666 };
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode));
    if dir.is_dir() {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            open_to_all(&e.path());
        }
    }
}

#[test]
fn with_user_the_backend_serves_as_that_user() {
    if !tests::root_or_skip("switching users") {
        return;
    }
    let (sim, spec) = Sim::with_disk("sandbox-user", 16);
    open_to_all(sim.tmp());
    let mut backend =
        tests::Backend::serve(&sim, &spec, &["--open-params", "--user", "65534:65534"]);
    sim.wait_for(&format!("{}/opened", spec.backend_path()), "1");
    let mut front = sim.front(FrontOptions::default());
    open_to_all(sim.tmp());
    front
        .connect()
        .expect("handshake with a backend running as nobody");
    let mut model = DiskModel::zeroed(front.info().unwrap().sectors / 8, true);
    exercise(&mut front, &mut model);
    // Every thread, the XenStore reader included (restarted under the confinement).
    let threads = assert_confined(backend.pid(), Some(NOBODY));
    assert!(
        threads.iter().any(|t| t.name == READER),
        "no XenStore reader"
    );
    // xenstored restarts, and its new socket is root's alone, as on a host: the backend,
    // running as nobody, connects again through its connector (started as root), or it
    // could not follow the removal below.
    let xenstored = sim::xenstored_dir(sim.dir());
    std::fs::set_permissions(&xenstored, std::fs::Permissions::from_mode(0o700)).unwrap();
    sim.restart_xenstored(Duration::from_millis(100));
    exercise(&mut front, &mut model);
    remove(&sim, &spec, &mut backend, &mut front);
}

/// `--user` in the tests, and how its ids show in `/proc/<pid>/status`.
const NOBODY: &str = "65534\t65534\t65534\t65534";
/// The XenStore client's reader thread's name.
const READER: &str = "xenstore-reader";

/// One thread of a process, as `/proc/<pid>/task/<tid>/status` shows it.
struct Thread {
    tid: u32,
    name: String,
    status: String,
}

/// The threads of process `pid`.
fn threads(pid: u32) -> Vec<Thread> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("listing the backend's threads")
        .map(|task| {
            let task = task.unwrap();
            let status = std::fs::read_to_string(task.path().join("status")).unwrap();
            Thread {
                tid: task.file_name().to_str().unwrap().parse().unwrap(),
                name: status_field(&status, "Name").unwrap_or_default(),
                status,
            }
        })
        .collect()
}

/// Checks that every thread of the confined process `pid` has `no_new_privs`, the seccomp
/// filter and no capabilities (but the documented `CAP_IPC_LOCK`), and, with `user`, runs
/// as that user with no supplementary groups. Returns the threads.
fn assert_confined(pid: u32, user: Option<&str>) -> Vec<Thread> {
    let threads = threads(pid);
    for t in &threads {
        let (name, status) = (&t.name, &t.status);
        assert_eq!(
            status_field(status, "NoNewPrivs").as_deref(),
            Some("1"),
            "{name}"
        );
        assert_eq!(
            status_field(status, "Seccomp").as_deref(),
            Some("2"),
            "{name}"
        );
        for set in ["CapEff", "CapPrm", "CapInh", "CapAmb"] {
            let v = status_field(status, set).unwrap();
            assert!(caps_ok(&v), "{name}: {set} {v}");
        }
        if tests::is_root() {
            let v = status_field(status, "CapBnd").unwrap();
            assert!(caps_ok(&v), "{name}: CapBnd {v}");
        }
        if let Some(user) = user {
            for ids in ["Uid", "Gid"] {
                assert_eq!(
                    status_field(status, ids).as_deref(),
                    Some(user),
                    "{name}: {ids}"
                );
            }
            assert_eq!(
                status_field(status, "Groups").as_deref(),
                Some(""),
                "{name}"
            );
        }
    }
    threads
}

/// Whether the capability set `hex` (from `/proc/<pid>/status`) holds `bit`.
fn has_cap(hex: &str, bit: u32) -> bool {
    u64::from_str_radix(hex, 16).is_ok_and(|v| v & (1 << bit) != 0)
}

/// The XenStore reader, started when blkbackd connects (before it holds its device and
/// confines itself), is replaced at confinement by one the confined thread starts: Landlock,
/// the `--user` switch and the capability sets are per thread, and inherited only by threads
/// started afterwards (see `backend::sandbox`, "Every thread").
///
/// Landlock shows in no `/proc` file (there is no `attr/landlock`), so the test shows which
/// thread started the reader instead. Before confinement the reader runs as root with
/// `CAP_SETUID`/`CAP_SETGID` (kept for the `--user` switch). Afterwards the reader is another
/// thread (a new TID, the old one gone) running as the user with no capabilities. A thread
/// gets its uid and capabilities from the thread that starts it or from its own
/// `setresuid`/`capset`, which the reader never calls; the only thread holding exactly these
/// is the serve thread after `sandbox::confine`'s user switch, Landlock and capability drop,
/// in that order. So the new reader was started by the serve thread after its
/// `landlock_restrict_self`, and is in its Landlock domain.
#[test]
fn the_xenstore_reader_is_restarted_under_the_confinement() {
    let Some((sim, lo)) = tests::loop_disk("sandbox-reader", 8) else {
        return;
    };
    let spec = VbdSpec::disk(0, GUEST, DEVID, lo.device.to_str().unwrap());
    sim.create_vbd(&spec);
    open_to_all(sim.tmp());
    let sock = sim.tmp().join("handoff.sock");
    let mut backend = Backend::serve(
        &sim,
        &spec,
        &[
            "--handoff-socket",
            sock.to_str().unwrap(),
            "--user",
            "65534:65534",
        ],
    );
    // Connected to XenStore, waiting for its device: not confined yet.
    sim.wait_for(
        &format!("{}/handoff-socket", spec.backend_path()),
        sock.to_str().unwrap(),
    );
    let before = threads(backend.pid());
    let old: Vec<&Thread> = before.iter().filter(|t| t.name == READER).collect();
    let [old] = old[..] else {
        panic!("{} XenStore readers before confinement", old.len());
    };
    assert_eq!(
        status_field(&old.status, "Uid").as_deref(),
        Some("0\t0\t0\t0")
    );
    let caps = status_field(&old.status, "CapEff").unwrap();
    assert!(has_cap(&caps, 6) && has_cap(&caps, 7), "CapEff {caps}");
    // The hotplug tool hands the device over: blkbackd holds it and confines itself.
    assert_eq!(
        tests::hotplug_hands_over(&sim, &spec, &lo, &sock),
        Reply::Accepted
    );
    sim.wait_for(&format!("{}/opened", spec.backend_path()), "1");
    // It still talks to XenStore and serves through the new reader.
    let mut front = sim.front(FrontOptions::default());
    open_to_all(sim.tmp());
    let info = front.connect().expect("handshake after the restart");
    let mut model = DiskModel::zeroed(info.sectors / 8, false);
    exercise(&mut front, &mut model);
    let after = assert_confined(backend.pid(), Some(NOBODY));
    let new: Vec<&Thread> = after.iter().filter(|t| t.name == READER).collect();
    let [new] = new[..] else {
        panic!("{} XenStore readers after confinement", new.len());
    };
    assert_ne!(new.tid, old.tid, "the reader was not restarted");
    assert!(
        after.iter().all(|t| t.tid != old.tid),
        "the old reader still runs"
    );
    remove(&sim, &spec, &mut backend, &mut front);
}
