//! Shared helpers for blkhotplug's integration tests: a simulated xenstored, backend
//! directories, scratch files, a stand-in backend taking fds over the handoff socket, and the
//! loop devices the kernel reports in sysfs.
#![allow(dead_code)]

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sim::xenstored::SimXenstored;
use xen::handoff::{self, DeviceInfo, Reply};
use xen::xenstore::{XenStore, XsOps};

/// Whether loop devices can be made here; prints why not (the test then passes as skipped).
pub fn can_run() -> bool {
    if !sim::skip::root_or_skip("loop devices; CI and developers' machines run as root") {
        return false;
    }
    if !Path::new("/dev/loop-control").exists() {
        sim::skip::report_skip("needs /dev/loop-control");
        return false;
    }
    true
}

pub const BIN: &str = env!("CARGO_BIN_EXE_blkhotplug");

/// A scratch directory, a simulated xenstored in it, and a dom0 client.
pub struct Env {
    pub dir: PathBuf,
    pub xsd: Option<SimXenstored>,
    pub xs: XenStore,
}

impl Env {
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("blkhotplug-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mkdir");
        let xsd = SimXenstored::start(dir.join("xs")).expect("start simulated xenstored");
        let xs = XenStore::open_at(xsd.socket_path()).expect("connect");
        Self {
            dir,
            xsd: Some(xsd),
            xs,
        }
    }

    pub fn socket(&self) -> PathBuf {
        self.xsd.as_ref().expect("running").socket_path()
    }

    /// A file of `size` bytes in the scratch directory.
    pub fn file(&self, name: &str, size: u64) -> PathBuf {
        let p = self.dir.join(name);
        let f = std::fs::File::create(&p).expect("create");
        f.set_len(size).expect("set_len");
        p
    }

    /// A backend directory as the toolstack (and the backend, for `opened`/`handoff-socket`)
    /// leave it before running the hotplug script.
    pub fn backend(
        &self,
        devid: u32,
        params: &str,
        mode: &str,
        opened: bool,
        socket: Option<&Path>,
    ) -> String {
        let be = xen::xenstore::BackendPath::new(0, 7, devid).to_string();
        self.xs
            .transaction(|tx| {
                tx.write(&format!("{be}/params"), params)?;
                tx.write(&format!("{be}/mode"), mode)?;
                tx.write(&format!("{be}/type"), "phy")?;
                tx.write(&format!("{be}/state"), "2")?;
                if opened {
                    tx.write(&format!("{be}/opened"), "0")?;
                }
                if let Some(s) = socket {
                    tx.write(
                        &format!("{be}/handoff-socket"),
                        s.to_string_lossy().as_bytes(),
                    )?;
                }
                Ok(())
            })
            .expect("write backend");
        be
    }

    pub fn read(&self, path: &str) -> Option<String> {
        self.xs
            .read(path)
            .ok()
            .map(|v| String::from_utf8_lossy(&v).into_owned())
    }

    pub fn command(&self, action: &str, backend: &str) -> Command {
        let mut c = Command::new(BIN);
        c.arg(action)
            .env("XENBUS_PATH", backend)
            .env("XENSTORED_PATH", self.socket())
            .env("BLKHOTPLUG_LOG", "warn")
            .stdin(Stdio::null());
        c
    }

    pub fn run(&self, action: &str, backend: &str, timeout_s: &str) -> Output {
        self.command(action, backend)
            .args(["--timeout", timeout_s])
            .output()
            .expect("run blkhotplug")
    }

    /// [`Env::run`], which must succeed (its stderr is in the message when it does not).
    pub fn run_ok(&self, action: &str, backend: &str, timeout_s: &str) -> Output {
        let out = self.run(action, backend, timeout_s);
        assert!(
            out.status.success(),
            "{action}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    pub fn spawn(&self, action: &str, backend: &str) -> Child {
        self.command(action, backend)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn blkhotplug")
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(x) = self.xsd.take() {
            x.stop();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Loop devices bound now, with their backing files, from `/sys/block/loop*/loop/backing_file`.
pub fn bound_loops() -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/sys/block")
        .expect("/sys/block")
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        if let Ok(b) = std::fs::read_to_string(e.path().join("loop/backing_file")) {
            out.push((name, PathBuf::from(b.trim_end_matches('\n'))));
        }
    }
    out.sort();
    out
}

/// Loop devices bound to files under `dir`.
pub fn bound_under(dir: &Path) -> Vec<(String, PathBuf)> {
    bound_loops()
        .into_iter()
        .filter(|(_, b)| b.starts_with(dir))
        .collect()
}

/// Waits (bounded) until no loop device is bound to a file under `dir`; returns what is left.
pub fn wait_unbound(dir: &Path, timeout: Duration) -> Vec<(String, PathBuf)> {
    let end = Instant::now() + timeout;
    loop {
        let left = bound_under(dir);
        if left.is_empty() || Instant::now() >= end {
            return left;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What the stand-in backend received.
#[derive(Debug, Clone)]
pub struct Received {
    pub info: DeviceInfo,
    /// The diskseq of the fd itself (`BLKGETDISKSEQ` on what arrived).
    pub fd_diskseq: u64,
    /// The backing file of the loop device, if it is one.
    pub backing: Option<PathBuf>,
}

/// A backend stand-in on a handoff socket: takes each fd, checks it, answers, then holds it
/// (`hold`) or lets go at once.
pub struct FdBackend {
    pub path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    pub received: Arc<Mutex<Vec<Received>>>,
    pub held: Arc<Mutex<Vec<OwnedFd>>>,
}

impl FdBackend {
    pub fn start(path: PathBuf, hold: bool) -> Self {
        use rustix::net::SocketFlags;
        let l = xen::handoff::listen(&path, 128).expect("listen");
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(Mutex::new(Vec::new()));
        let held = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (stop, received, held) = (stop.clone(), received.clone(), held.clone());
            std::thread::spawn(move || {
                while let Ok(conn) = rustix::net::accept_with(&l, SocketFlags::CLOEXEC) {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok((fd, info)) = handoff::recv_device(&conn) else {
                        continue;
                    };
                    let fd_diskseq =
                        hotplug::blkdev::diskseq(fd.as_fd(), Path::new("handed-over fd"))
                            .unwrap_or(0);
                    let backing = backing_of(info.device.major, info.device.minor);
                    let ok = Some(fd_diskseq) == info.device.diskseq;
                    received.lock().expect("lock").push(Received {
                        info,
                        fd_diskseq,
                        backing,
                    });
                    let reply = if ok {
                        Reply::Accepted
                    } else {
                        Reply::Rejected(rustix::io::Errno::NODEV)
                    };
                    if handoff::send_reply(&conn, reply).is_ok() && hold && ok {
                        held.lock().expect("lock").push(fd);
                    }
                }
            })
        };
        Self {
            path,
            stop,
            thread: Some(thread),
            received,
            held,
        }
    }

    /// Lets go of every held device.
    pub fn release_all(&self) {
        self.held.lock().expect("lock").clear();
    }
}

impl Drop for FdBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        if let Ok(s) = handoff::connect(&self.path, Duration::from_secs(1)) {
            drop(s);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.release_all();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The backing file of loop device `major:minor`, from sysfs.
pub fn backing_of(major: u32, minor: u32) -> Option<PathBuf> {
    std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/loop/backing_file"))
        .ok()
        .map(|s| PathBuf::from(s.trim_end_matches('\n')))
}

/// A small deterministic PRNG (xorshift64*), seeded from the clock; the seed is printed.
pub struct Rng(u64);

impl Rng {
    pub fn new() -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            | 1;
        eprintln!("rng seed {seed:#x}");
        Self(seed)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n.max(1)
    }
}

/// The direct-I/O offset alignment of `file` (`STATX_DIOALIGN`) when it supports direct I/O
/// with a block size a loop device can have.
pub fn dio_alignment(file: &Path) -> Option<u32> {
    use rustix::fs::{AtFlags, StatxFlags, CWD};
    let st = rustix::fs::statx(CWD, file, AtFlags::empty(), StatxFlags::DIOALIGN).ok()?;
    let a = st.stx_dio_offset_align;
    (st.stx_mask & StatxFlags::DIOALIGN.bits() != 0
        && a.is_power_of_two()
        && (512..=4096).contains(&a))
    .then_some(a)
}
