//! Faults around a connected, confined backend: the XenStore connection lost, the frontend
//! domain vanishing, SIGTERM with requests in flight (each ends the backend cleanly: every
//! grant unmapped, every event-channel socket gone, in bounded time), and SIGKILL with
//! blkhotplug's autoclear loop device (nothing left attached).
//!
//! Device errors (EIO on some sectors, ENOSPC) are `device_errors.rs`. A device that
//! disappears outright cannot be made here (no device-mapper, `null_blk` or `scsi_debug`);
//! a loop device cannot be detached while open (`LOOP_CLR_FD` then only sets autoclear).
//!
//! The simulation keeps a dead process's grant pins (the real kernel would drop them when
//! gntdev closes), so "no grant in use after the backend exited" shows that the backend
//! itself unmapped everything before it ended.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sim::front::{FrontOptions, IoOp, SimFront};
use sim::toolstack::{self, VbdSpec};
use sim::xenstored::SimXenstored;
use tests::{blkbackd, Backend, Sim, TempDir, DEVID, GUEST};
use xen::handoff::{self, DeviceInfo, PhysicalDevice, Reply};
use xen::xenstore::{XenStore, XsOps};

/// Every grant entry of the guest that the backend still maps or copies.
fn grants_in_use(front: &SimFront) -> Vec<u32> {
    let dom = front.domain();
    (0..dom.grant_entries())
        .filter(|&g| dom.grant_in_use(g))
        .collect()
}

/// The backend's (domain 0's) event-channel sockets left in the sim directory.
fn backend_sockets(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("evtchn.0."))
                .collect()
        })
        .unwrap_or_default()
}

/// Pushes `n` requests without waiting for them.
fn fill(front: &mut SimFront, n: usize) {
    let data = vec![0x5au8; 65536];
    for i in 0..n {
        let q = i % 2;
        let sector = (i as u64 % 128) * 128;
        let op = if i % 2 == 0 {
            IoOp::Write {
                sector,
                data: &data,
            }
        } else {
            IoOp::Read {
                sector,
                sectors: 128,
            }
        };
        if front.free_slots(q) > 0 {
            front.submit(q, op).expect("submitting");
        }
    }
}

fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "blkbackd did not end within {within:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A simulation whose xenstored the test owns (to stop it or release a domain).
struct OwnSim {
    _tmp: TempDir,
    dir: PathBuf,
    xenstored: Option<SimXenstored>,
    dom0: XenStore,
    spec: VbdSpec,
}

impl OwnSim {
    fn new(tag: &str) -> Self {
        let tmp = TempDir::new(tag);
        let dir = tmp.path().join("sim");
        let xenstored = SimXenstored::start(sim::xenstored_dir(&dir)).unwrap();
        xenstored.introduce_domain(GUEST).unwrap();
        let dom0 = XenStore::open_at(sim::xenstore_socket(&dir, 0)).unwrap();
        let image = tmp.path().join("disk.img");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(16 << 20)
            .unwrap();
        let spec = VbdSpec::disk(0, GUEST, DEVID, image.to_str().unwrap());
        toolstack::create_vbd(&dom0, &spec).unwrap();
        Self {
            _tmp: tmp,
            dir,
            xenstored: Some(xenstored),
            dom0,
            spec,
        }
    }

    fn serve(&self) -> Child {
        Command::new(blkbackd())
            .arg("serve")
            .arg("--platform")
            .arg(format!("sim:{}:0", self.dir.display()))
            .arg("--backend-path")
            .arg(self.spec.backend_path())
            .args(["--xenstore-reconnect", "1"])
            .arg("--open-params")
            .arg("--stats-file")
            .arg(self._tmp.path().join("stats/vbd.stats"))
            .env_remove("BLKBACK_PLATFORM")
            .stdin(Stdio::null())
            .spawn()
            .unwrap()
    }

    fn front(&self) -> SimFront {
        let mut f = SimFront::new(&self.dir, GUEST, DEVID, FrontOptions::default()).unwrap();
        f.connect().expect("handshake");
        f
    }
}

#[test]
fn losing_the_xenstore_connection_ends_the_backend_cleanly() {
    let mut sim = OwnSim::new("fault-xs");
    let mut child = sim.serve();
    let mut front = sim.front();
    fill(&mut front, 64);
    assert!(!grants_in_use(&front).is_empty(), "the rings are mapped");
    assert!(!backend_sockets(&sim.dir).is_empty());
    // xenstored stays away past the backend's bound (`--xenstore-reconnect 1`).
    let lost = std::time::Instant::now();
    sim.xenstored.take().unwrap().stop();
    let status = wait_exit(&mut child, Duration::from_secs(10));
    assert!(
        lost.elapsed() >= Duration::from_secs(1),
        "gave up before trying to reconnect"
    );
    assert!(
        !status.success(),
        "a lost XenStore connection is an error exit: {status}"
    );
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        None,
        "{status}"
    );
    assert_eq!(
        grants_in_use(&front),
        Vec::<u32>::new(),
        "grants left mapped"
    );
    assert_eq!(backend_sockets(&sim.dir), Vec::<String>::new());
    drop(sim.dom0);
}

#[test]
fn the_frontend_domain_vanishing_ends_the_backend_cleanly() {
    let sim = OwnSim::new("fault-domain");
    let mut child = sim.serve();
    let mut front = sim.front();
    fill(&mut front, 64);
    assert!(!grants_in_use(&front).is_empty(), "the rings are mapped");
    // The guest dies: its grants and ports go, xenstored fires @releaseDomain and the
    // toolstack removes its directories, as libxl does.
    sim::SimDomain::open(&sim.dir, GUEST)
        .unwrap()
        .destroy()
        .unwrap();
    let xenstored = sim.xenstored.as_ref().unwrap();
    xenstored.release_domain(GUEST).unwrap();
    let _ = sim.dom0.rm(&format!("/local/domain/{GUEST}"));
    let _ = sim.dom0.rm(&sim.spec.backend_path());
    let status = wait_exit(&mut child, Duration::from_secs(10));
    assert!(status.success(), "{status}");
    assert_eq!(
        grants_in_use(&front),
        Vec::<u32>::new(),
        "grants left mapped"
    );
    assert_eq!(backend_sockets(&sim.dir), Vec::<String>::new());
}

#[test]
fn sigterm_with_requests_in_flight_unmaps_everything() {
    let (sim, spec) = Sim::with_disk("fault-term", 16);
    let mut backend = Backend::serve(&sim, &spec, &["--open-params", "--grant-mode", "map"]);
    let mut front = sim.front(FrontOptions::default());
    front.connect().unwrap();
    fill(&mut front, 128);
    assert!(!grants_in_use(&front).is_empty(), "the rings are mapped");
    backend.terminate();
    let status = backend.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{status}");
    assert_eq!(
        grants_in_use(&front),
        Vec::<u32>::new(),
        "grants left mapped"
    );
    assert_eq!(backend_sockets(sim.dir()), Vec::<String>::new());
    assert_eq!(
        tests::backend_node(&sim, &spec, "state").as_deref(),
        Some("6"),
        "Closed on SIGTERM"
    );
}

/// Whether loop device `path` has a backing file (is attached).
fn loop_attached(path: &Path) -> bool {
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    Path::new(&format!("/sys/block/{name}/loop/backing_file")).exists()
}

#[test]
fn sigkill_of_the_backend_leaves_no_autoclear_loop_device_attached() {
    if !tests::root_or_skip("loop devices") {
        return;
    }
    let sim = Sim::new("fault-kill");
    let image = sim.image("backing.img", 8);
    for round in 0..3 {
        let spec = VbdSpec::disk(0, GUEST, DEVID, image.to_str().unwrap());
        sim.create_vbd(&spec);
        let sock = sim.tmp().join(format!("handoff-{round}.sock"));
        let backend = Backend::serve(&sim, &spec, &["--handoff-socket", sock.to_str().unwrap()]);
        sim.wait_for(&format!("{}/state", spec.backend_path()), "2");
        // What blkhotplug add does: an autoclear loop device over the file, handed over.
        let attached = hotplug::attach::attach(
            &hotplug::params::Source::Path(image.clone()),
            &hotplug::attach::AttachOptions {
                mode: hotplug::params::Mode::ReadWrite,
                autoclear: true,
                dm_name: String::new(),
                dm_uuid: String::new(),
            },
        )
        .expect("attaching a loop device");
        let lo = attached.path.clone();
        sim.dom0
            .write(
                &format!("{}/physical-device", spec.backend_path()),
                format!(
                    "{:x}@{:x}:{:x}",
                    attached.diskseq, attached.major, attached.minor
                ),
            )
            .unwrap();
        let conn = handoff::connect(&sock, Duration::from_secs(10)).unwrap();
        let info = DeviceInfo {
            device: PhysicalDevice {
                major: attached.major,
                minor: attached.minor,
                diskseq: Some(attached.diskseq),
            },
            read_only: false,
        };
        handoff::send_device(&conn, std::os::fd::AsFd::as_fd(&attached.fd), &info).unwrap();
        assert_eq!(handoff::recv_reply(&conn).unwrap(), Reply::Accepted);
        drop(attached);
        sim.wait_for(&format!("{}/opened", spec.backend_path()), "1");
        let mut front = sim.front(FrontOptions::default());
        front.connect().unwrap();
        fill(&mut front, 32 + round * 16);
        assert!(loop_attached(&lo), "{} attached while served", lo.display());
        // SIGKILL: no cleanup runs; the kernel closes the fd and autoclear detaches.
        drop(backend);
        let deadline = Instant::now() + Duration::from_secs(10);
        while loop_attached(&lo) {
            assert!(
                Instant::now() < deadline,
                "{} still attached after SIGKILL",
                lo.display()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        drop(front);
        let _ = sim.dom0.rm(&spec.backend_path());
        let _ = sim.dom0.rm(&format!("/local/domain/{GUEST}/device"));
        let _ = std::fs::remove_file(&sock);
        let _ = sim::SimDomain::open(sim.dir(), GUEST).map(|d| d.destroy());
    }
}

#[test]
fn a_device_whose_media_vanishes_fails_requests_without_hanging() {
    // The nearest thing to a disk disappearing here: its loop device's capacity drops to 0
    // (backing file truncated, `losetup -c`), as a disk whose media is gone.
    let Some((sim, file, lo)) = tests::loop_disk_with("fault-vanish", 8, Some(0x3c)) else {
        return;
    };
    let spec = VbdSpec::disk(0, GUEST, DEVID, lo.device.to_str().unwrap());
    sim.create_vbd(&spec);
    let mut backend = Backend::serve(&sim, &spec, &["--open-params"]);
    let mut front = sim.front(FrontOptions::default());
    front.connect().unwrap();
    front.set_timeout(Duration::from_secs(10));
    let data = vec![0x77u8; 4096];
    let ok = front.write(0, 8, &data).unwrap();
    assert!(ok.is_ok());
    std::fs::File::options()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(0)
        .unwrap();
    sim::losetup::losetup([OsStr::new("-c"), lo.device.as_os_str()]);
    // Every request is answered (with an error), none hangs, the backend stays up.
    let mut failed = 0;
    for i in 0..32u64 {
        let op = match i % 3 {
            0 => IoOp::Read {
                sector: i * 8,
                sectors: 8,
            },
            1 => IoOp::Write {
                sector: i * 8,
                data: &data,
            },
            _ => IoOp::Flush,
        };
        let c = front
            .execute((i % 2) as usize, op)
            .expect("answered in bounded time");
        if !c.is_ok() {
            failed += 1;
        }
    }
    assert!(
        failed >= 20,
        "only {failed} of 32 requests failed on a vanished medium"
    );
    assert!(
        backend.running(),
        "the backend survives its device vanishing"
    );
    tests::remove(&sim, &spec, &mut backend, &mut front);
    assert_eq!(grants_in_use(&front), Vec::<u32>::new());
}
