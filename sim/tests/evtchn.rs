//! Event channels: one suite written against `&mut dyn EventChannel`, run on the simulation
//! and, where `/dev/xen/evtchn` exists, on the real device (dom0 to itself); then
//! simulation-only checks (ring overflow, destroyed domains).

use std::path::Path;

use rustix::event::{PollFd, PollFlags, Timespec};
use sim::{ScratchDir, SimDomain, SimPlatform};
use xen::{DomId, EventChannel, EvtchnError, Platform, Port, XenEventChannel, EVTCHN_PATH};

/// A sim directory removed when the test ends.
fn sim_dir(name: &str) -> ScratchDir {
    ScratchDir::new(&format!("sim-{}-{name}", "evtchn")).expect("creating the sim directory")
}

/// Whether `ch`'s fd polls readable within `ms` milliseconds.
fn readable(ch: &dyn EventChannel, ms: u64) -> bool {
    let fd = ch.as_fd();
    let mut fds = [PollFd::from_borrowed_fd(fd, PollFlags::IN)];
    let t = Timespec {
        tv_sec: (ms / 1000) as i64,
        tv_nsec: ((ms % 1000) * 1_000_000) as i64,
    };
    rustix::event::poll(&mut fds, Some(&t)).expect("poll") == 1
}

/// Waits (up to 5 s) for the fd to be readable, then returns the pending ports.
fn wait_pending(ch: &mut dyn EventChannel) -> Vec<Port> {
    assert!(readable(ch, 5000), "no event within 5 s");
    let mut out = Vec::new();
    ch.pending(&mut out).expect("pending");
    out
}

/// No event arrives within a short while.
fn quiet(ch: &mut dyn EventChannel) {
    assert!(!readable(ch, 50), "unexpected event");
    let mut out = Vec::new();
    ch.pending(&mut out).expect("pending");
    assert_eq!(out, Vec::<Port>::new());
}

/// A frontend handle with one port offered to the backend's domain, and a backend handle.
struct Pair {
    front: Box<dyn EventChannel>,
    front_port: Port,
    front_dom: DomId,
    back: Box<dyn EventChannel>,
}

/// Binds the backend to the offered port and consumes Xen's initial event on the new port
/// (`evtchn_bind_interdomain` sets the local port pending), leaving it unmasked.
fn connect(p: &mut Pair) -> Port {
    let bport = p
        .back
        .bind_interdomain(p.front_dom, p.front_port)
        .expect("bind");
    assert_eq!(
        wait_pending(p.back.as_mut()),
        vec![bport],
        "bind sets the new port pending"
    );
    p.back.unmask(bport).expect("unmask");
    bport
}

fn suite_notify_both_ways(p: &mut Pair) {
    let bport = connect(p);
    p.front.notify(p.front_port).expect("front notify");
    assert_eq!(wait_pending(p.back.as_mut()), vec![bport]);
    p.back.unmask(bport).expect("unmask");
    p.back.notify(bport).expect("back notify");
    assert_eq!(wait_pending(p.front.as_mut()), vec![p.front_port]);
    p.front.unmask(p.front_port).expect("unmask");
    quiet(p.back.as_mut());
    quiet(p.front.as_mut());
}

fn suite_masking_coalesces(p: &mut Pair) {
    let bport = connect(p);
    for _ in 0..50 {
        p.front.notify(p.front_port).expect("notify");
    }
    assert_eq!(
        wait_pending(p.back.as_mut()),
        vec![bport],
        "50 notifications, one wake-up"
    );
    // Delivered, so masked: nothing more until unmasked, however many notifications.
    p.front.notify(p.front_port).expect("notify");
    quiet(p.back.as_mut());
    // Events arrived while masked: unmasking delivers them, once.
    p.back.unmask(bport).expect("unmask");
    assert_eq!(wait_pending(p.back.as_mut()), vec![bport]);
    p.back.unmask(bport).expect("unmask");
    quiet(p.back.as_mut());
}

/// Reads one delivery off `ch`'s fd as an io_uring would (4 bytes), and hands it over.
fn read_one(ch: &mut dyn EventChannel) -> Vec<Port> {
    assert!(readable(ch, 5000), "no event within 5 s");
    let mut buf = [0u8; 4];
    let n = rustix::io::read(ch.as_fd(), &mut buf).expect("read");
    let mut out = Vec::new();
    ch.read_done(Ok(&buf[..n]), &mut out).expect("read_done");
    out
}

/// Unmasks as a caller with its own submission does: a write when the handle says so.
fn unmask_own(ch: &dyn EventChannel, port: Port) {
    if ch.unmask_is_write() {
        let n = rustix::io::write(ch.as_fd(), &port.to_ne_bytes()).expect("unmask write");
        assert_eq!(n, 4);
    } else {
        ch.unmask(port).expect("unmask");
    }
}

fn suite_reads_and_unmasks_by_the_caller(p: &mut Pair) {
    let bport = connect(p);
    p.front.notify(p.front_port).expect("notify");
    assert_eq!(read_one(p.back.as_mut()), vec![bport]);
    // Masked: a notification now (a request after the backend's last look at its ring)
    // waits for the unmask, which delivers it.
    p.front.notify(p.front_port).expect("notify");
    assert!(!readable(p.back.as_ref(), 50), "delivered while masked");
    unmask_own(p.back.as_ref(), bport);
    assert_eq!(read_one(p.back.as_mut()), vec![bport]);
    unmask_own(p.back.as_ref(), bport);
    let mut out = Vec::new();
    p.back
        .read_done(Err(rustix::io::Errno::AGAIN), &mut out)
        .expect("EAGAIN is no error");
    assert_eq!(out, Vec::<Port>::new());
    quiet(p.back.as_mut());
}

fn suite_unbind_and_rebind(p: &mut Pair) {
    let bport = connect(p);
    p.back.unbind(bport).expect("unbind");
    assert!(matches!(p.back.notify(bport), Err(EvtchnError::NotBound(x)) if x == bport));
    assert!(matches!(
        p.back.unmask(bport),
        Err(EvtchnError::NotBound(_))
    ));
    assert!(matches!(
        p.back.unbind(bport),
        Err(EvtchnError::NotBound(_))
    ));
    // The frontend's end is unbound again: its events are dropped, not errors.
    p.front
        .notify(p.front_port)
        .expect("notify on unbound port");
    quiet(p.back.as_mut());
    // ... and offered to the backend's domain again: a reconnect binds it anew.
    let again = connect(p);
    p.front.notify(p.front_port).expect("notify");
    assert_eq!(wait_pending(p.back.as_mut()), vec![again]);
}

fn suite_bind_needs_an_offered_unbound_port(p: &mut Pair) {
    connect(p);
    assert!(
        p.back.bind_interdomain(p.front_dom, p.front_port).is_err(),
        "bound twice"
    );
    assert!(
        p.back
            .bind_interdomain(p.front_dom, p.front_port + 300)
            .is_err(),
        "never offered"
    );
    assert!(p.back.bind_interdomain(p.front_dom, 0).is_err(), "port 0");
    quiet(p.back.as_mut());
}

fn suite_restrict(p: &mut Pair) {
    let other = if p.front_dom == 7 { 8 } else { 7 };
    p.back.restrict(other).expect("restrict");
    assert!(
        p.back.bind_interdomain(p.front_dom, p.front_port).is_err(),
        "restricted handle bound another domain"
    );
    assert!(p.back.restrict(other).is_err(), "restricting twice");
    assert!(p.front.restrict(0).is_err(), "restricting to dom0");
}

type Suite = fn(&mut Pair);
const SUITE: &[(&str, Suite)] = &[
    ("notify_both_ways", suite_notify_both_ways),
    ("masking_coalesces", suite_masking_coalesces),
    (
        "reads_and_unmasks_by_the_caller",
        suite_reads_and_unmasks_by_the_caller,
    ),
    ("unbind_and_rebind", suite_unbind_and_rebind),
    (
        "bind_needs_an_offered_unbound_port",
        suite_bind_needs_an_offered_unbound_port,
    ),
    ("restrict", suite_restrict),
];

fn sim_pair(dir: &Path, front_dom: DomId) -> (SimDomain, Pair) {
    let dom = SimDomain::create(dir, front_dom, 1).expect("create domain");
    let backend = SimPlatform::open(dir, 0).expect("platform");
    let mut front = dom.open_event_channel().expect("front handle");
    let front_port = front.alloc_unbound(0).expect("alloc unbound");
    let back = backend.open_event_channel().expect("back handle");
    let pair = Pair {
        front: Box::new(front),
        front_port,
        front_dom,
        back,
    };
    (dom, pair)
}

#[test]
fn suite_on_simulation() {
    for (i, (name, test)) in SUITE.iter().enumerate() {
        let dir = sim_dir(name);
        let (_dom, mut pair) = sim_pair(dir.path(), 5 + i as DomId);
        test(&mut pair);
    }
}

#[test]
fn suite_on_real_device() {
    if !Path::new(EVTCHN_PATH).exists() {
        sim::skip::report_skip(&format!("needs Xen: {EVTCHN_PATH}"));
        return;
    }
    for (name, test) in SUITE {
        eprintln!("real evtchn: {name}");
        let mut front = XenEventChannel::open().expect("open");
        let front_port = front.bind_unbound_port(0).expect("bind unbound");
        let mut pair = Pair {
            front: Box::new(front),
            front_port,
            front_dom: 0,
            back: Box::new(XenEventChannel::open().expect("open")),
        };
        test(&mut pair);
    }
}

#[test]
fn overflowing_the_wakeup_queue_loses_no_port() {
    // Far more ports on one handle than its socket queues: every port is still reported.
    let dir = sim_dir("overflow");
    let dom = SimDomain::create(dir.path(), 5, 1).expect("create domain");
    let backend = SimPlatform::open(dir.path(), 0).expect("platform");
    let mut front = dom.open_event_channel().expect("front");
    let mut back = backend.open_event_channel().expect("back");
    let offered: Vec<Port> = (0..300)
        .map(|_| front.alloc_unbound(0).expect("alloc"))
        .collect();
    // Each bind sets its new port pending: 300 events at once.
    let mut bound: Vec<Port> = offered
        .iter()
        .map(|&fp| back.bind_interdomain(5, fp).expect("bind"))
        .collect();
    let mut seen = Vec::new();
    while readable(back.as_ref(), 200) {
        back.pending(&mut seen).expect("pending");
    }
    seen.sort_unstable();
    seen.dedup();
    bound.sort_unstable();
    assert_eq!(
        seen, bound,
        "every bound port reported after the queue overflowed"
    );
}

#[test]
fn destroyed_domain_drops_events_and_refuses_binds() {
    let dir = sim_dir("destroy");
    let (dom, mut p) = sim_pair(dir.path(), 5);
    let bport = connect(&mut p);
    drop(p.front);
    // Closing the frontend's handle left the backend's end unbound: notifying is harmless.
    p.back.notify(bport).expect("notify after peer closed");
    dom.destroy().expect("destroy");
    p.back.notify(bport).expect("notify after peer destroyed");
    assert!(
        p.back.bind_interdomain(5, 1).is_err(),
        "bound to a destroyed domain"
    );
    quiet(p.back.as_mut());
}

#[test]
fn fds_are_distinct_per_handle() {
    let dir = sim_dir("fds");
    let backend = SimPlatform::open(dir.path(), 0).expect("platform");
    let a = backend.open_event_channel().expect("a");
    let b = backend.open_event_channel().expect("b");
    assert_ne!(
        rustix::fs::fstat(a.as_fd()).expect("stat").st_ino,
        rustix::fs::fstat(b.as_fd()).expect("stat").st_ino
    );
}

#[test]
fn no_wakeup_is_lost_under_concurrent_notify_and_unmask() {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LAST: u32 = 2000;
    let dir = sim_dir("race");
    let (_dom, mut p) = sim_pair(dir.path(), 5);
    let bport = connect(&mut p);
    let seq = AtomicU32::new(0);
    let front = p.front;
    let back = &mut p.back;
    std::thread::scope(|s| {
        let seq = &seq;
        s.spawn(move || {
            for i in 1..=LAST {
                seq.store(i, Ordering::SeqCst);
                front.notify(p.front_port).expect("notify");
                if i % 64 == 0 {
                    std::thread::yield_now();
                }
            }
        });
        // Every notification after our last look must produce a wake-up.
        loop {
            let got = wait_pending(back.as_mut());
            assert!(got.iter().all(|&x| x == bport), "{got:?}");
            back.unmask(bport).expect("unmask");
            if seq.load(Ordering::SeqCst) == LAST {
                break;
            }
        }
    });
}

/// Set in the child of `a_dead_binders_port_can_be_bound_again`: `<sim dir>:<port>`.
const DEAD_BINDER: &str = "SIM_EVTCHN_DEAD_BINDER";

#[test]
fn a_dead_binders_port_can_be_bound_again() {
    if let Ok(arg) = std::env::var(DEAD_BINDER) {
        // The child: bind the frontend's port as dom0, then die without closing anything.
        let (dir, port) = arg.rsplit_once(':').expect("dir:port");
        let backend = SimPlatform::open(Path::new(dir), 0).expect("platform");
        let mut back = backend.open_event_channel().expect("back");
        back.bind_interdomain(5, port.parse().expect("port"))
            .expect("bind in the child");
        let me = rustix::process::getpid();
        let _ = rustix::process::kill_process(me, rustix::process::Signal::KILL);
        unreachable!("SIGKILL returned");
    }
    let dir = sim_dir("dead-binder");
    let (_dom, mut p) = sim_pair(dir.path(), 5);
    let status = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "a_dead_binders_port_can_be_bound_again",
            "--nocapture",
        ])
        .env(
            DEAD_BINDER,
            format!("{}:{}", dir.path().display(), p.front_port),
        )
        .status()
        .expect("running the child");
    assert!(!status.success(), "the child was to die by SIGKILL");
    // The dead process's end still holds the frontend's port; binding it again from another
    // handle succeeds (on Xen the kernel closed the dead end), and events flow.
    let bport = connect(&mut p);
    p.front.notify(p.front_port).expect("notify");
    assert_eq!(wait_pending(p.back.as_mut()), vec![bport]);
    p.back.notify(bport).expect("notify back");
    assert_eq!(wait_pending(p.front.as_mut()), vec![p.front_port]);
    // A live binder keeps its port: a second handle cannot take it.
    let mut other = SimPlatform::open(dir.path(), 0)
        .expect("platform")
        .open_event_channel()
        .expect("other");
    assert!(
        other.bind_interdomain(5, p.front_port).is_err(),
        "took a live binder's port"
    );
}
