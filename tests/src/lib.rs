//! What the end-to-end tests share: a simulated platform in a temporary directory (the
//! simulated hypervisor and xenstored), the toolstack's part, and the real `blkbackd` binary
//! run as a child process, as the toolstack or `blkbackd supervise` would run it.
//!
//! The binary is built on first use with the cargo that runs the tests (same profile and
//! target directory), so `cargo test -p tests` needs nothing built beforehand.
#![deny(missing_docs)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use sim::front::{FrontOptions, SimFront};
use sim::toolstack::{self, VbdSpec};
use sim::xenstored::SimXenstored;
use xen::xenstore::{XenStore, XsOps, RECONNECT_WITHIN};
use xen::DomId;

/// The frontend domain used by default.
pub const GUEST: DomId = 1;
/// xvda.
pub const DEVID: u32 = 51712;

/// The `blkbackd` binary of this build, built once per test process.
///
/// # Panics
/// When it cannot be built.
pub fn blkbackd() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| build_for_tests("blkbackd", "blkbackd"))
}

/// The `blkhotplug` binary of this build, built once per test process.
///
/// # Panics
/// When it cannot be built.
pub fn blkhotplug() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| build_for_tests("hotplug", "blkhotplug"))
}

/// `bin` of `package`, built into the profile directory of the running test binary
/// (`target/<profile>/deps/<test binary>`).
fn build_for_tests(package: &str, bin: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    build_binary(profile_dir, package, bin).unwrap_or_else(|e| panic!("building {bin}: {e}"))
}

/// Builds `blkbackd` with the cargo running us (`$CARGO`) into `profile_dir`
/// (`target/<profile>`, release when its name is `release`), and returns the binary's path.
/// The performance harness uses it too.
///
/// # Errors
/// When cargo cannot be run or the build fails.
pub fn build_blkbackd(profile_dir: &Path) -> std::io::Result<PathBuf> {
    build_binary(profile_dir, "blkbackd", "blkbackd")
}

fn build_binary(profile_dir: &Path, package: &str, bin: &str) -> std::io::Result<PathBuf> {
    let target_dir = profile_dir
        .parent()
        .ok_or_else(|| std::io::Error::other("the profile directory has no parent"))?;
    let release = profile_dir.file_name().is_some_and(|n| n == "release");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args([
        "build",
        "--quiet",
        "-p",
        package,
        "--bin",
        bin,
        "--target-dir",
    ])
    .arg(target_dir)
    .current_dir(env!("CARGO_MANIFEST_DIR"));
    if release {
        cmd.arg("--release");
    }
    if !cmd.status()?.success() {
        return Err(std::io::Error::other(format!(
            "cargo build of {bin} failed"
        )));
    }
    Ok(profile_dir.join(bin))
}

/// A temporary directory, removed on drop.
#[derive(Debug)]
pub struct TempDir(sim::ScratchDir);

impl TempDir {
    /// A fresh directory named after `tag`.
    ///
    /// # Panics
    /// When it cannot be created.
    pub fn new(tag: &str) -> Self {
        Self(
            sim::ScratchDir::new(&format!("blkbackd-e2e-{tag}"))
                .expect("creating the test directory"),
        )
    }

    /// The path.
    pub fn path(&self) -> &Path {
        self.0.path()
    }
}

/// A simulated platform: hypervisor files and xenstored in a temporary directory, and a
/// privileged (dom0) XenStore connection for the toolstack's part.
#[derive(Debug)]
pub struct Sim {
    /// dom0's XenStore connection.
    pub dom0: XenStore,
    xenstored: SimXenstored,
    dir: PathBuf,
    tmp: TempDir,
}

impl Sim {
    /// Starts a simulation with guest [`GUEST`] introduced.
    pub fn new(tag: &str) -> Self {
        let tmp = TempDir::new(tag);
        let dir = tmp.path().join("sim");
        let xenstored = SimXenstored::start(sim::xenstored_dir(&dir))
            .expect("starting the simulated xenstored");
        let dom0 = XenStore::open_reconnecting(sim::xenstore_socket(&dir, 0), RECONNECT_WITHIN)
            .expect("connecting as dom0");
        let sim = Self {
            dom0,
            xenstored,
            dir,
            tmp,
        };
        sim.introduce(GUEST);
        sim
    }

    /// Restarts xenstored, keeping its tree: every connection ends and the sockets are gone
    /// for `down` ([`SimXenstored::restart`]).
    pub fn restart_xenstored(&self, down: Duration) {
        self.xenstored
            .restart(down)
            .expect("restarting the simulated xenstored");
    }

    /// Introduces another guest to xenstored.
    pub fn introduce(&self, domid: DomId) {
        self.xenstored
            .introduce_domain(domid)
            .expect("introducing a domain");
    }

    /// The simulation directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The temporary directory (for images and statistics files).
    pub fn tmp(&self) -> &Path {
        self.tmp.path()
    }

    /// `--platform` for the backend.
    pub fn platform_arg(&self) -> String {
        format!("sim:{}:0", self.dir.display())
    }

    /// A sparse image file of `mib` MiB in the temporary directory.
    pub fn image(&self, name: &str, mib: u64) -> PathBuf {
        let p = self.tmp().join(name);
        let f = std::fs::File::create(&p).expect("creating an image");
        f.set_len(mib << 20).expect("sizing an image");
        p
    }

    /// A simulation named after `tag` with one disk: a sparse `disk.img` of `mib` MiB as
    /// the guest's xvda, its toolstack nodes written.
    pub fn with_disk(tag: &str, mib: u64) -> (Self, VbdSpec) {
        let sim = Self::new(tag);
        let image = sim.image("disk.img", mib);
        let spec = VbdSpec::disk(0, GUEST, DEVID, image.to_str().expect("a UTF-8 temp dir"));
        sim.create_vbd(&spec);
        (sim, spec)
    }

    /// Writes the toolstack's nodes for a disk.
    pub fn create_vbd(&self, spec: &VbdSpec) {
        toolstack::create_vbd(&self.dom0, spec).expect("writing the disk's nodes");
    }

    /// A node's value as dom0 sees it.
    pub fn read(&self, path: &str) -> Option<String> {
        self.dom0.read_string(path).ok()
    }

    /// The error node Linux's `xenbus_dev_fatal` would write for the disk.
    pub fn error_node(&self, spec: &VbdSpec) -> Option<String> {
        let home = format!("/local/domain/{}", spec.backend_domid);
        self.read(&xen::xenbus::error_node_path(&home, &spec.backend_path()))
    }

    /// Waits until `path` reads `want`.
    ///
    /// # Panics
    /// When it does not within 10 s.
    pub fn wait_for(&self, path: &str, want: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let v = self.read(path);
            if v.as_deref() == Some(want) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{path} is {v:?}, expected {want:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// A simulated frontend for the disk of guest [`GUEST`].
    pub fn front(&self, options: FrontOptions) -> SimFront {
        SimFront::new(&self.dir, GUEST, DEVID, options).expect("creating the simulated guest")
    }
}

/// A running `blkbackd serve`, killed on drop if still running.
#[derive(Debug)]
pub struct Backend {
    child: Option<Child>,
    /// Its statistics file.
    pub stats_file: PathBuf,
}

impl Backend {
    /// Starts `blkbackd serve` for `spec` on `sim`, with `extra` arguments (e.g.
    /// `--open-params`).
    pub fn serve(sim: &Sim, spec: &VbdSpec, extra: &[&str]) -> Self {
        let stats_file = sim
            .tmp()
            .join(format!("{}.stats", backend_path(spec).file_stem()));
        let child = Command::new(blkbackd())
            .arg("serve")
            .arg("--platform")
            .arg(sim.platform_arg())
            .arg("--backend-path")
            .arg(spec.backend_path())
            .arg("--stats-file")
            .arg(&stats_file)
            .args(extra)
            .env_remove("BLKBACK_PLATFORM")
            .stdin(Stdio::null())
            .spawn()
            .expect("starting blkbackd serve");
        Self {
            child: Some(child),
            stats_file,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Waits for the process to exit.
    ///
    /// # Panics
    /// When it does not within `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().expect("backend already reaped");
        loop {
            if let Some(status) = child.try_wait().expect("waiting for blkbackd") {
                self.child = None;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "blkbackd did not exit within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Whether the process still runs.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let pid =
            rustix::process::Pid::from_raw(i32::try_from(self.pid()).expect("pid")).expect("pid");
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("SIGTERM");
    }

    /// The statistics file, parsed.
    pub fn stats(&self) -> Option<backend::stats_file::Report> {
        let text = std::fs::read_to_string(&self.stats_file).ok()?;
        backend::stats_file::Report::parse(&text).ok()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The disk's backend directory as the shared type.
pub fn backend_path(spec: &VbdSpec) -> xen::xenstore::BackendPath {
    xen::xenstore::BackendPath::new(spec.backend_domid, spec.frontend_domid, spec.devid)
}

/// Whether the tests run as root (loop devices need it).
pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Whether the tests run as root; when not, says `SKIPPED (needs root: <why>): <test>` on
/// stderr, so that a test that returns early is visibly skipped.
pub use sim::skip::root_or_skip;

/// A simulated platform and a loop device over a fresh sparse `mib` MiB image in it; `None`
/// (with a note that the test is skipped) when not root, as loop devices need.
pub fn loop_disk(tag: &str, mib: u64) -> Option<(Sim, Loop)> {
    loop_disk_with(tag, mib, None).map(|(sim, _, lo)| (sim, lo))
}

/// As [`loop_disk`], the image first filled with `fill` where given; also returns the image.
pub fn loop_disk_with(tag: &str, mib: u64, fill: Option<u8>) -> Option<(Sim, PathBuf, Loop)> {
    if !root_or_skip("loop devices") {
        return None;
    }
    let sim = Sim::new(tag);
    let file = sim.image("backing.img", mib);
    if let Some(byte) = fill {
        std::fs::write(&file, vec![byte; (mib << 20) as usize]).expect("filling the image");
    }
    let lo = Loop::attach(&file);
    Some((sim, file, lo))
}

/// A loop device over a file, detached on drop (`losetup`, util-linux).
#[derive(Debug)]
pub struct Loop {
    /// `/dev/loopN`.
    pub device: PathBuf,
}

impl Loop {
    /// Attaches `file`.
    ///
    /// # Panics
    /// When `losetup` fails.
    pub fn attach(file: &Path) -> Self {
        Self {
            device: sim::losetup::attach(file, &[]),
        }
    }

    /// The device's major and minor numbers.
    pub fn numbers(&self) -> (u32, u32) {
        let st = rustix::fs::stat(&self.device).expect("stat loop device");
        (rustix::fs::major(st.st_rdev), rustix::fs::minor(st.st_rdev))
    }

    /// The device's diskseq (`BLKGETDISKSEQ`).
    pub fn diskseq(&self) -> u64 {
        let dev = backend::device::Device::open(
            &self.device,
            &backend::device::DeviceOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .expect("opening the loop device");
        dev.diskseq().expect("loop devices have a diskseq")
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        sim::losetup::detach(&self.device);
    }
}

/// Plays blkhotplug's side of the handoff: opens loop device `lo` and sends its fd, with
/// `diskseq`, on the backend's socket `sock`; returns the backend's reply.
///
/// # Panics
/// When the device cannot be opened or the socket fails.
pub fn hand_over(lo: &Loop, sock: &Path, diskseq: u64) -> xen::handoff::Reply {
    use xen::handoff::{self, DeviceInfo, PhysicalDevice};
    let (major, minor) = lo.numbers();
    let fd = rustix::fs::open(
        &lo.device,
        rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .expect("opening the loop device");
    let conn = handoff::connect(sock, Duration::from_secs(10)).expect("connecting");
    let info = DeviceInfo {
        device: PhysicalDevice {
            major,
            minor,
            diskseq: Some(diskseq),
        },
        read_only: false,
    };
    handoff::send_device(&conn, std::os::fd::AsFd::as_fd(&fd), &info).expect("sending");
    handoff::recv_reply(&conn).expect("reply")
}

/// What blkhotplug does for a disk whose backend listens on `sock`: writes the disk's
/// `physical-device` node (`diskseq@major:minor`) for loop device `lo`, then hands the device
/// over ([`hand_over`]); returns the backend's reply.
///
/// # Panics
/// As [`hand_over`], or when the node cannot be written.
pub fn hotplug_hands_over(
    sim: &Sim,
    spec: &VbdSpec,
    lo: &Loop,
    sock: &Path,
) -> xen::handoff::Reply {
    let (major, minor) = lo.numbers();
    let seq = lo.diskseq();
    sim.dom0
        .write(
            &format!("{}/physical-device", spec.backend_path()),
            format!("{seq:x}@{major:x}:{minor:x}"),
        )
        .expect("writing physical-device");
    hand_over(lo, sock, seq)
}

/// Reads a backend node under `spec`'s directory.
pub fn backend_node(sim: &Sim, spec: &VbdSpec, name: &str) -> Option<String> {
    sim.read(&format!("{}/{name}", spec.backend_path()))
}

/// A disk image of `mib` MiB served with `args` to a frontend with `options`, connected.
pub fn connected(
    sim: &Sim,
    mib: u64,
    args: &[&str],
    options: FrontOptions,
) -> (VbdSpec, Backend, SimFront) {
    let image = sim.image("disk.img", mib);
    let spec = VbdSpec::disk(0, GUEST, DEVID, image.to_str().expect("utf-8 path"));
    sim.create_vbd(&spec);
    let mut all = vec!["--open-params"];
    all.extend_from_slice(args);
    let backend = Backend::serve(sim, &spec, &all);
    let mut front = sim.front(options);
    front.connect().expect("handshake");
    (spec, backend, front)
}

/// A verified mixed workload: sequential writes in large requests, random 4 KiB writes, a
/// flush, then every block written read back and checked.
///
/// # Panics
/// On any failed request or data mismatch.
pub fn exercise(front: &mut SimFront, model: &mut sim::workload::DiskModel) {
    use sim::workload::{self, Planned, Rng};
    let blocks = model.blocks().min(2048);
    let big = u64::from(front.max_sectors_per_request() / 8).clamp(1, 64);
    workload::run(front, model, &workload::sequential(blocks, big, true), 16)
        .expect("sequential writes");
    let mut rng = Rng::new(blocks);
    workload::run(
        front,
        model,
        &workload::random_blocks(&mut rng, blocks, 256, true),
        32,
    )
    .expect("random writes");
    workload::run(front, model, &[Planned::Flush], 1).expect("flush");
    workload::run(front, model, &workload::sequential(blocks, big, false), 16)
        .expect("sequential reads");
    workload::run(
        front,
        model,
        &workload::random_blocks(&mut rng, blocks, 256, false),
        32,
    )
    .expect("random reads");
}

/// Waits until the backend has refused the disk (state Closing) without ever holding it
/// (`opened` stays `0`), and returns the error it wrote.
///
/// # Panics
/// When that does not happen in time, `opened` is not `0`, or no error was written.
pub fn refused_error(sim: &Sim, spec: &VbdSpec) -> String {
    sim.wait_for(&format!("{}/state", spec.backend_path()), "5");
    assert_eq!(backend_node(sim, spec, "opened").as_deref(), Some("0"));
    sim.error_node(spec).expect("the backend's error node")
}

/// Writes the first `blocks` blocks in order, `per_request` blocks a request with `depth` in
/// flight, then reads them back, checked against `model`.
///
/// # Panics
/// On any failed request or data mismatch.
pub fn write_then_read(
    front: &mut SimFront,
    model: &mut sim::workload::DiskModel,
    blocks: u64,
    per_request: u64,
    depth: usize,
) {
    use sim::workload;
    for write in [true, false] {
        let plan = workload::sequential(blocks, per_request, write);
        workload::run(front, model, &plan, depth).expect("sequential I/O");
    }
}

/// Once the backend holds the disk (`opened` is `1`): a default frontend connects, runs
/// verified I/O over a zeroed model of the disk ([`exercise`]; `discard_zeroes` as in
/// [`DiskModel::zeroed`](sim::workload::DiskModel::zeroed)), and the disk is removed
/// ([`remove`]). Returns what the frontend was told about the disk.
///
/// # Panics
/// As [`exercise`] and [`remove`].
pub fn exercise_opened_disk(
    sim: &Sim,
    spec: &VbdSpec,
    backend: &mut Backend,
    discard_zeroes: bool,
) -> sim::front::DiskInfo {
    sim.wait_for(&format!("{}/opened", spec.backend_path()), "1");
    let mut front = sim.front(FrontOptions::default());
    let info = front.connect().expect("connecting");
    let mut model = sim::workload::DiskModel::zeroed(info.sectors / 8, discard_zeroes);
    exercise(&mut front, &mut model);
    remove(sim, spec, backend, &mut front);
    info
}

/// Closes the frontend, asks for removal as libxl does, and checks the backend exits 0.
///
/// # Panics
/// When any step fails, a request was never answered, or a grant leaked.
pub fn remove(sim: &Sim, spec: &VbdSpec, backend: &mut Backend, front: &mut SimFront) {
    toolstack::request_removal(&sim.dom0, spec).expect("removal request");
    let lost = front.close().expect("closing the frontend");
    assert!(lost.is_empty(), "requests never answered: {lost:?}");
    let status = backend.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "blkbackd exited with {status}");
}

/// A running `blkbackd supervise`, killed on drop.
#[derive(Debug)]
pub struct Supervisor(pub Child);

impl Supervisor {
    /// `blkbackd supervise` on `sim`, opening disks itself, up to two queues each.
    ///
    /// # Panics
    /// When it cannot be started.
    pub fn start(sim: &Sim) -> Self {
        Self(
            Command::new(blkbackd())
                .args([
                    "supervise",
                    "--open-params",
                    "--max-queues",
                    "2",
                    "--platform",
                ])
                .arg(sim.platform_arg())
                .stdin(Stdio::null())
                .spawn()
                .expect("starting the supervisor"),
        )
    }
}

impl Drop for Supervisor {
    /// Kills its backends too (stopped first, it starts no new one): they would outlive it,
    /// trying to reach xenstored for a minute once the simulation is gone.
    fn drop(&mut self) {
        let kill = |pid: u32, sig| {
            if let Some(pid) = i32::try_from(pid)
                .ok()
                .and_then(rustix::process::Pid::from_raw)
            {
                let _ = rustix::process::kill_process(pid, sig);
            }
        };
        kill(self.0.id(), rustix::process::Signal::STOP);
        for child in children(self.0.id()) {
            kill(child, rustix::process::Signal::KILL);
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The child processes of `pid`.
pub fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            if let Ok(s) = std::fs::read_to_string(t.path().join("children")) {
                out.extend(s.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
            }
        }
    }
    out
}

/// Sends `sig` to `pid`.
///
/// # Panics
/// When the signal cannot be sent.
pub fn signal(pid: u32, sig: rustix::process::Signal) {
    let pid =
        rustix::process::Pid::from_raw(i32::try_from(pid).expect("a pid")).expect("a non-zero pid");
    rustix::process::kill_process(pid, sig).expect("sending a signal");
}

/// Reads and writes at distinct random blocks, half each, in random order.
pub fn mixed(rng: &mut sim::workload::Rng, blocks: u64, n: usize) -> Vec<sim::workload::Planned> {
    use sim::workload::Planned;
    rng.permutation(blocks)
        .into_iter()
        .take(n)
        .map(|block| {
            if rng.next_u64() % 2 == 0 {
                Planned::Write { block, count: 1 }
            } else {
                Planned::Read { block, count: 1 }
            }
        })
        .collect()
}

/// A guest connected to the disk with two queues and persistent grants.
///
/// # Panics
/// When the handshake fails or gives another number of queues.
pub fn two_queue_front(sim: &Sim) -> SimFront {
    let mut front = sim.front(FrontOptions {
        queues: 2,
        persistent: true,
        ..FrontOptions::default()
    });
    let info = front.connect().expect("handshake");
    assert_eq!(info.queues, 2);
    front
}
