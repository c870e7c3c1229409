//! Selecting the platform by configuration, and the simulation across processes: a guest in
//! this process, a backend in a child process that finds the simulation through
//! `$BLKBACK_PLATFORM`, as the real `blkbackd` binary would.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use rustix::event::{PollFd, PollFlags, Timespec};
use sim::{ScratchDir, SimDomain};
use xen::{
    Access, CopyOp, EventChannel, GrantAddr, GrantStatus, PlatformConfig, PlatformError, Port,
    GNTDEV_PATH, PLATFORM_ENV,
};

/// A sim directory removed when the test ends.
fn sim_dir(name: &str) -> ScratchDir {
    ScratchDir::new(&format!("sim-{}-{name}", "platform")).expect("creating the sim directory")
}

/// Waits up to `timeout` for an event; returns the pending ports (empty on timeout).
fn wait_event(ch: &mut dyn EventChannel, timeout: Duration) -> Vec<Port> {
    let mut fds = [PollFd::from_borrowed_fd(ch.as_fd(), PollFlags::IN)];
    let t = Timespec {
        tv_sec: timeout.as_secs() as i64,
        tv_nsec: i64::from(timeout.subsec_nanos()),
    };
    let mut out = Vec::new();
    if rustix::event::poll(&mut fds, Some(&t)).expect("poll") == 1 {
        ch.pending(&mut out).expect("pending");
    }
    out
}

#[test]
fn sim_config_opens_the_simulation() {
    let dir = sim_dir("config");
    let cfg: PlatformConfig = format!("sim:{}:3", dir.path().display()).parse().unwrap();
    let p = sim::open_platform(&cfg).expect("open sim platform");
    assert_eq!(p.domid(), 3);
    assert_eq!(
        p.xenstore_path(),
        dir.path().join("xenstored").join("socket.d3")
    );
    assert_eq!(p.xenstore_path(), sim::xenstore_socket(dir.path(), 3));
    let dom0: PlatformConfig = format!("sim:{}", dir.path().display()).parse().unwrap();
    assert_eq!(
        sim::open_platform(&dom0).unwrap().xenstore_path(),
        dir.path().join("xenstored/socket")
    );
    // Each queue gets its own handle with its own fd.
    let a = p.open_event_channel().unwrap();
    let b = p.open_event_channel().unwrap();
    assert_ne!(a.as_fd().as_raw_fd(), b.as_fd().as_raw_fd());
}

#[test]
fn xen_config_needs_the_devices() {
    let opened = sim::open_platform(&PlatformConfig::Xen);
    if Path::new(GNTDEV_PATH).exists() {
        assert!(opened.is_ok(), "{:?}", opened.err());
    } else {
        assert!(
            matches!(opened, Err(sim::OpenPlatformError::Xen(PlatformError::Device { path, .. })) if path == GNTDEV_PATH),
            "without /dev/xen, opening Xen fails with the device's name"
        );
    }
}

const CHILD_ARGS: &str = "XEN_PLATFORM_TEST_CHILD";

#[test]
fn grants_and_events_work_across_processes() {
    let dir = sim_dir("xproc");
    let guest = SimDomain::create(dir.path(), 5, 4).unwrap();
    let mut front = guest.open_event_channel().unwrap();
    let fport = front.alloc_unbound(0).unwrap();
    let gref = guest.grant(0, 1, Access::ReadWrite).unwrap();
    guest.page(1).unwrap().write_from(0, b"request").unwrap();

    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "backend_child", "--ignored", "--nocapture"])
        .env(PLATFORM_ENV, format!("sim:{}:0", dir.path().display()))
        .env(CHILD_ARGS, format!("{gref}:{fport}"))
        .spawn()
        .unwrap();

    // The backend maps the page, answers in it, copies into it, unmaps, then notifies.
    let got = wait_event(&mut front, Duration::from_secs(20));
    assert_eq!(got, vec![fport], "event from the backend process");
    let mut b = [0u8; 8];
    guest.page(1).unwrap().read_into(100, &mut b).unwrap();
    assert_eq!(&b, b"response", "written through the backend's mapping");
    guest.page(1).unwrap().read_into(200, &mut b[..6]).unwrap();
    assert_eq!(&b[..6], b"copied", "written by the backend's grant copy");
    guest
        .end_access(gref)
        .expect("the backend unmapped before notifying");
    front.unmask(fport).unwrap();
    // Now the other way: the backend waits for our event and exits 0 when it arrives.
    front.notify(fport).unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "backend child failed: {status}");
}

#[test]
#[ignore = "child process of grants_and_events_work_across_processes"]
fn backend_child() {
    let args = std::env::var(CHILD_ARGS).expect("run by grants_and_events_work_across_processes");
    let (gref, fport) = args.split_once(':').unwrap();
    let (gref, fport): (u32, u32) = (gref.parse().unwrap(), fport.parse().unwrap());
    let platform = sim::open_platform(&PlatformConfig::from_env().unwrap()).unwrap();
    let mut ch = platform.open_event_channel().unwrap();
    ch.restrict(5).unwrap();
    let bport = ch.bind_interdomain(5, fport).unwrap();
    assert_eq!(
        wait_event(ch.as_mut(), Duration::from_secs(5)),
        vec![bport],
        "bind sets pending"
    );
    ch.unmask(bport).unwrap();

    let m = platform
        .grant_mapper()
        .map(5, &[gref], Access::ReadWrite)
        .unwrap();
    let mut req = [0u8; 7];
    m.mem().read_into(0, &mut req).unwrap();
    assert_eq!(&req, b"request");
    m.writable().unwrap().write_from(100, b"response").unwrap();
    drop(m);
    let mut ops = [CopyOp::ToGuest {
        src: b"copied",
        dst: GrantAddr {
            domid: 5,
            gref,
            offset: 200,
        },
        status: GrantStatus::GeneralError,
    }];
    platform.grant_copier().copy(&mut ops).unwrap();
    assert_eq!(ops[0].status(), GrantStatus::Okay);
    ch.notify(bport).unwrap();

    let got = wait_event(ch.as_mut(), Duration::from_secs(20));
    assert_eq!(got, vec![bport], "event from the guest process");
}

#[test]
fn domains_are_created_concurrently_and_once() {
    let dir = sim_dir("create");
    std::thread::scope(|s| {
        for i in 0..8u16 {
            let dir = dir.path();
            s.spawn(move || {
                let d = SimDomain::create(dir, 10 + i, 2).expect("create");
                d.page(1).unwrap().write_u8(0, i as u8).unwrap();
                sim::SimPlatform::open(dir, 0).expect("backend platform");
            });
        }
    });
    for i in 0..8u16 {
        let d = SimDomain::open(dir.path(), 10 + i).expect("open");
        assert_eq!(
            d.page(1).unwrap().read_u8(0).unwrap(),
            i as u8,
            "each domain its own memory"
        );
        assert!(matches!(
            SimDomain::create(dir.path(), 10 + i, 2),
            Err(sim::SimError::Exists(id)) if id == 10 + i
        ));
    }
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp."))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}
