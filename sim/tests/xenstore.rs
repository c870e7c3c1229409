//! The XenStore client against the simulated xenstored: every operation, permissions,
//! transactions (conflicts and retries), watches, typed errors, a server that dies
//! mid-reply, and one that restarts.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use sim::xenstored::{Fault, SimXenstored, QUOTA_WATCHES};
use xen::xenstore::{Perm, PermAccess, WatchEvent, XenStore, XsError, XsOps};

const WAIT: Option<Duration> = Some(Duration::from_secs(5));

fn scratch_dir() -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "xs-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

struct Setup {
    sim: SimXenstored,
    xs: XenStore,
}

fn setup() -> Setup {
    let sim = SimXenstored::start(scratch_dir()).unwrap();
    let xs = XenStore::open_at(sim.socket_path()).unwrap();
    Setup { sim, xs }
}

impl Setup {
    /// Introduces `domid` with a home owned by it that dom0 may read (as libxl does), and
    /// connects as it.
    fn domain(&self, domid: u16) -> XenStore {
        let home = format!("/local/domain/{domid}");
        self.xs.mkdir(&home).unwrap();
        self.xs
            .set_perms(
                &home,
                &[
                    Perm::new(domid, PermAccess::None),
                    Perm::new(0, PermAccess::Read),
                ],
            )
            .unwrap();
        let path = self.sim.introduce_domain(domid).unwrap();
        XenStore::open_at(path).unwrap()
    }
}

fn ev(path: &str, token: &str) -> WatchEvent {
    WatchEvent {
        path: path.into(),
        token: token.into(),
    }
}

fn fd_readable(xs: &XenStore) -> bool {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let fd = xs.watch_fd();
    let mut fds = [PollFd::new(&fd, PollFlags::IN)];
    let zero = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    poll(&mut fds, Some(&zero)).unwrap() == 1
}

/// Waits for the next watch event, which must be `token`'s on `path`.
#[track_caller]
fn expect_event(xs: &XenStore, path: &str, token: &str) {
    assert_eq!(xs.wait_watch_event(WAIT).unwrap(), Some(ev(path, token)));
}

/// The next two watch events, in token order (they may arrive in either).
fn next_two_events(xs: &XenStore) -> Vec<WatchEvent> {
    let mut got = vec![
        xs.wait_watch_event(WAIT).unwrap().unwrap(),
        xs.wait_watch_event(WAIT).unwrap().unwrap(),
    ];
    got.sort_by(|a, b| a.token.cmp(&b.token));
    got
}

fn no_more_events(xs: &XenStore) {
    assert_eq!(
        xs.wait_watch_event(Some(Duration::from_millis(100)))
            .unwrap(),
        None
    );
}

#[test]
fn every_operation() {
    let s = setup();
    let xs = &s.xs;
    xs.write("/a/b/c", "hello").unwrap();
    assert_eq!(xs.read("/a/b/c").unwrap(), b"hello");
    assert_eq!(xs.read_string("/a/b/c").unwrap(), "hello");
    // Missing parents were created, empty.
    assert_eq!(xs.read("/a/b").unwrap(), b"");
    assert_eq!(xs.directory("/a").unwrap(), vec!["b"]);
    xs.write("/a/b/c", b"\x00\xffbinary").unwrap();
    assert_eq!(xs.read("/a/b/c").unwrap(), b"\x00\xffbinary");
    assert!(matches!(xs.read_string("/a/b/c"), Err(XsError::Invalid)));

    xs.mkdir("/a/d").unwrap();
    xs.mkdir("/a/d").unwrap(); // existing: fine
    xs.write("/a/e", "").unwrap();
    assert_eq!(xs.directory("/a").unwrap(), vec!["b", "d", "e"]);
    assert_eq!(xs.directory("/a/d").unwrap(), Vec::<String>::new());

    xs.rm("/a/b").unwrap();
    assert!(matches!(xs.read("/a/b/c"), Err(XsError::NotFound)));
    assert_eq!(xs.directory("/a").unwrap(), vec!["d", "e"]);
    xs.rm("/a/b").unwrap(); // missing, parent exists: fine
    assert!(matches!(xs.rm("/a/b/c"), Err(XsError::NotFound))); // parent missing
    assert!(matches!(xs.rm("/"), Err(XsError::Invalid)));

    assert!(matches!(xs.read("/nope"), Err(XsError::NotFound)));
    assert!(matches!(xs.directory("/nope"), Err(XsError::NotFound)));

    assert_eq!(
        xs.get_perms("/a").unwrap(),
        vec![Perm::new(0, PermAccess::None)]
    );
    let perms = [
        Perm::new(0, PermAccess::Read),
        Perm::new(7, PermAccess::Both),
    ];
    xs.set_perms("/a", &perms).unwrap();
    assert_eq!(xs.get_perms("/a").unwrap(), perms);
    // New nodes inherit their parent's permissions.
    xs.write("/a/f", "1").unwrap();
    assert_eq!(xs.get_perms("/a/f").unwrap(), perms);
    assert!(matches!(xs.set_perms("/a", &[]), Err(XsError::Invalid)));
    assert!(matches!(xs.get_perms("/nope"), Err(XsError::NotFound)));

    assert_eq!(xs.get_domain_path(5).unwrap(), "/local/domain/5");
    assert_eq!(xs.get_domain_path(0).unwrap(), "/local/domain/0");
    // Relative paths are relative to the connection's home.
    xs.write("rel", "x").unwrap();
    assert_eq!(xs.read("/local/domain/0/rel").unwrap(), b"x");
}

#[test]
fn errors_are_typed() {
    let s = setup();
    let xs = &s.xs;
    for bad in ["/a//b", "/a/", "/a b", "/a\u{e9}", "@introduceDomain"] {
        assert!(matches!(xs.write(bad, "v"), Err(XsError::Invalid)), "{bad}");
    }
    assert!(matches!(xs.read(""), Err(XsError::BadArgument(_))));
    assert!(matches!(xs.read("/a\0b"), Err(XsError::BadArgument(_))));
    let long = format!("/{}", "x".repeat(3100));
    assert!(matches!(xs.write(&long, "v"), Err(XsError::Invalid)));
    // Over the socket's 4096-byte payload: refused before sending, connection intact.
    let big = vec![b'v'; 4096];
    assert!(matches!(
        xs.write("/big", &big),
        Err(XsError::PayloadTooLarge {
            len: 4101,
            max: 4096
        })
    ));
    xs.write("/big", &big[..4096 - "/big\0".len()]).unwrap();
    assert_eq!(xs.read("/big").unwrap().len(), 4091);
    // A directory listing over the payload limit: E2BIG, as xenstored's send_reply; the
    // client then lists it in parts.
    let names: Vec<String> = (0..200)
        .map(|i| format!("{i:03}-{}", "n".repeat(40)))
        .collect();
    for name in &names {
        xs.mkdir(&format!("/wide/{name}")).unwrap();
    }
    let raw = xs.request(xen::xenstore::wire::MsgType::Directory, b"/wide\0");
    assert!(matches!(raw, Err(XsError::TooBig)));
    assert_eq!(xs.directory("/wide").unwrap(), names);
    let tx = xs.transaction_start().unwrap();
    assert_eq!(tx.directory("/wide").unwrap(), names);
    tx.abort().unwrap();
    // The same watch twice: EEXIST; unwatching an unknown watch: ENOENT.
    xs.watch("/w", "t").unwrap();
    assert!(matches!(xs.watch("/w", "t"), Err(XsError::Exists)));
    assert!(matches!(xs.unwatch("/w", "other"), Err(XsError::NotFound)));
    // Ending a transaction that does not exist.
    let tx = xs.transaction_start().unwrap();
    let id = tx.id();
    tx.abort().unwrap();
    let reply = xs.request(xen::xenstore::wire::MsgType::Read, b"/a\0");
    assert!(matches!(reply, Err(XsError::NotFound)));
    let _ = id;
}

#[test]
fn domain_permissions() {
    let s = setup();
    let d5 = s.domain(5);
    let d6 = s.domain(6);
    s.xs.write("/secret", "dom0 only").unwrap();

    // Relative paths are under the domain's home; new nodes belong to the creator and
    // inherit the rest of the parent's permissions.
    d5.write("device/vbd/51712/state", "1").unwrap();
    assert_eq!(
        s.xs.get_perms("/local/domain/5/device/vbd/51712/state")
            .unwrap(),
        vec![
            Perm::new(5, PermAccess::None),
            Perm::new(0, PermAccess::Read)
        ]
    );
    assert_eq!(
        s.xs.read("/local/domain/5/device/vbd/51712/state").unwrap(),
        b"1"
    );

    assert!(matches!(d5.read("/secret"), Err(XsError::PermissionDenied)));
    assert!(matches!(
        d5.write("/secret", "x"),
        Err(XsError::PermissionDenied)
    ));
    assert!(matches!(
        d5.write("/local/domain/0/x", "x"),
        Err(XsError::PermissionDenied)
    ));
    // Whether a node exists is not revealed below an unreadable parent.
    assert!(matches!(
        d6.read("/local/domain/5/nope"),
        Err(XsError::PermissionDenied)
    ));
    assert!(matches!(
        d5.read("/local/domain/5/nope"),
        Err(XsError::NotFound)
    ));
    assert!(matches!(
        d6.read("/local/domain/5/device/vbd/51712/state"),
        Err(XsError::PermissionDenied)
    ));

    // The owner grants domain 6 read access.
    d5.set_perms(
        "device/vbd/51712/state",
        &[
            Perm::new(5, PermAccess::None),
            Perm::new(6, PermAccess::Read),
        ],
    )
    .unwrap();
    assert_eq!(
        d6.read("/local/domain/5/device/vbd/51712/state").unwrap(),
        b"1"
    );
    assert!(matches!(
        d6.write("/local/domain/5/device/vbd/51712/state", "2"),
        Err(XsError::PermissionDenied)
    ));
    // Only the owner sets permissions, and an unprivileged owner cannot give a node away.
    assert!(matches!(
        d6.set_perms(
            "/local/domain/5/device/vbd/51712/state",
            &[Perm::new(6, PermAccess::Both)]
        ),
        Err(XsError::PermissionDenied)
    ));
    assert!(matches!(
        d5.set_perms("device", &[Perm::new(6, PermAccess::Both)]),
        Err(XsError::NotPermitted)
    ));
    // dom0 is privileged: reads and writes anything, gives nodes away.
    s.xs.set_perms("/local/domain/5/device", &[Perm::new(6, PermAccess::None)])
        .unwrap();
    assert!(matches!(d5.read("device"), Err(XsError::PermissionDenied)));
    // Node size quota for unprivileged domains: ENOSPC.
    assert!(matches!(
        d6.write("big", vec![b'x'; 3000]),
        Err(XsError::NoSpace)
    ));
    s.xs.write("/local/domain/6/big", vec![b'x'; 3000]).unwrap();
}

#[test]
fn watch_quota_is_e2big() {
    let s = setup();
    let d5 = s.domain(5);
    // xenstored checks `held > quota` before adding, so quota + 1 watches fit.
    for i in 0..=QUOTA_WATCHES {
        d5.watch("w", &format!("t{i}")).unwrap();
    }
    assert!(matches!(
        d5.watch("w", "one-too-many"),
        Err(XsError::TooBig)
    ));
    // dom0 has no watch quota.
    for i in 0..QUOTA_WATCHES + 10 {
        s.xs.watch("/w", &format!("t{i}")).unwrap();
    }
}

#[test]
fn watches_fire_on_registration_create_change_delete_and_subtree() {
    let s = setup();
    let xs = &s.xs;
    xs.watch("/be/vbd", "tok").unwrap();
    expect_event(xs, "/be/vbd", "tok");
    no_more_events(xs);

    xs.write("/be/vbd", "").unwrap();
    expect_event(xs, "/be/vbd", "tok");
    xs.write("/be/vbd/1/51712/state", "2").unwrap();
    expect_event(xs, "/be/vbd/1/51712/state", "tok");
    xs.write("/be/vbd/1/51712/state", "4").unwrap();
    expect_event(xs, "/be/vbd/1/51712/state", "tok");
    xs.mkdir("/be/vbd/2").unwrap();
    expect_event(xs, "/be/vbd/2", "tok");
    xs.set_perms("/be/vbd/2", &[Perm::new(0, PermAccess::Read)])
        .unwrap();
    expect_event(xs, "/be/vbd/2", "tok");
    // Changes elsewhere, or to a sibling sharing a prefix, do not fire.
    xs.write("/be/vbdx", "1").unwrap();
    xs.write("/be", "1").unwrap();
    no_more_events(xs);

    // Removing a parent fires the watch on it and, exactly, watches on removed nodes.
    xs.watch("/be/vbd/1/51712/state", "state").unwrap();
    expect_event(xs, "/be/vbd/1/51712/state", "state");
    xs.rm("/be/vbd/1").unwrap();
    assert_eq!(
        next_two_events(xs),
        vec![ev("/be/vbd/1/51712/state", "state"), ev("/be/vbd/1", "tok")]
    );
    no_more_events(xs);

    xs.unwatch("/be/vbd", "tok").unwrap();
    xs.write("/be/vbd/3", "").unwrap();
    no_more_events(xs);
}

#[test]
fn watch_fd_is_readable_while_events_are_queued() {
    let s = setup();
    let xs = &s.xs;
    assert!(!fd_readable(xs));
    assert_eq!(xs.next_watch_event(), None);
    xs.watch("/x", "t").unwrap();
    // The registration event may still be in flight; wait for it through the fd.
    let fd = xs.watch_fd();
    let mut fds = [rustix::event::PollFd::new(
        &fd,
        rustix::event::PollFlags::IN,
    )];
    let five = rustix::event::Timespec {
        tv_sec: 5,
        tv_nsec: 0,
    };
    assert_eq!(rustix::event::poll(&mut fds, Some(&five)).unwrap(), 1);
    xs.write("/x", "1").unwrap();
    assert!(fd_readable(xs));
    assert_eq!(xs.next_watch_event(), Some(ev("/x", "t")));
    assert!(fd_readable(xs));
    assert_eq!(xs.next_watch_event(), Some(ev("/x", "t")));
    assert!(!fd_readable(xs));
    assert_eq!(xs.next_watch_event(), None);
}

#[test]
fn watches_see_only_what_the_domain_may_read_and_relative_paths() {
    let s = setup();
    let d5 = s.domain(5);
    d5.watch("device", "rel").unwrap();
    expect_event(&d5, "device", "rel");
    d5.watch("/", "root").unwrap();
    assert_eq!(d5.wait_watch_event(WAIT).unwrap(), Some(ev("/", "root")));
    // A change to a node the domain cannot read is not reported.
    s.xs.write("/secret", "x").unwrap();
    no_more_events(&d5);
    // A node the domain cannot read, under a parent it can: reported (`watch_permitted`
    // falls back to the parent), including the permission change that hid it.
    d5.watch("hidden", "hidden").unwrap();
    expect_event(&d5, "hidden", "hidden");
    s.xs.write("/local/domain/5/hidden", "x").unwrap();
    s.xs.set_perms("/local/domain/5/hidden", &[Perm::new(0, PermAccess::None)])
        .unwrap();
    s.xs.write("/local/domain/5/hidden", "y").unwrap();
    for _ in 0..3 {
        assert_eq!(
            next_two_events(&d5),
            vec![ev("hidden", "hidden"), ev("/local/domain/5/hidden", "root")]
        );
    }
    assert!(matches!(d5.read("hidden"), Err(XsError::PermissionDenied)));
    no_more_events(&d5);
    // dom0 writes into the domain's area: the domain sees it, relative to its home for
    // the relative watch.
    s.xs.write("/local/domain/5/device/vbd", "").unwrap();
    assert_eq!(
        next_two_events(&d5),
        vec![
            ev("device/vbd", "rel"),
            ev("/local/domain/5/device/vbd", "root")
        ]
    );
}

#[test]
fn special_watches_on_domain_introduction_and_release() {
    let s = setup();
    s.xs.watch("@introduceDomain", "intro").unwrap();
    s.xs.watch("@releaseDomain", "release").unwrap();
    let mut first = vec![
        s.xs.wait_watch_event(WAIT).unwrap().unwrap(),
        s.xs.wait_watch_event(WAIT).unwrap().unwrap(),
    ];
    first.sort_by(|a, b| a.token.cmp(&b.token));
    assert_eq!(
        first,
        vec![
            ev("@introduceDomain", "intro"),
            ev("@releaseDomain", "release")
        ]
    );

    let path = s.sim.introduce_domain(3).unwrap();
    expect_event(&s.xs, "@introduceDomain", "intro");
    let d3 = XenStore::open_at(&path).unwrap();
    assert_eq!(d3.get_domain_path(3).unwrap(), "/local/domain/3");
    // Unprivileged domains may not watch special nodes unless their permissions allow it.
    d3.watch("@releaseDomain", "r").unwrap();
    s.sim.release_domain(3).unwrap();
    expect_event(&s.xs, "@releaseDomain", "release");
    // The released domain's connection is closed and its socket gone.
    assert!(matches!(d3.read("/x"), Err(XsError::Closed)));
    assert!(matches!(
        d3.wait_watch_event(WAIT),
        Err(XsError::Closed) | Ok(Some(_))
    ));
    assert!(!path.exists());
    assert!(XenStore::open_at(&path).is_err());
    assert!(s.sim.release_domain(3).is_err());
}

#[test]
fn raw_transaction_end_returns_eagain_on_conflict() {
    let s = setup();
    let other = XenStore::open_at(s.sim.socket_path()).unwrap();
    s.xs.write("/counter", "0").unwrap();

    let tx = s.xs.transaction_start().unwrap();
    assert_eq!(tx.read("/counter").unwrap(), b"0");
    tx.write("/result", "from tx").unwrap();
    // Invisible outside the transaction until committed.
    assert!(matches!(s.xs.read("/result"), Err(XsError::NotFound)));
    assert_eq!(tx.read("/result").unwrap(), b"from tx");
    other.write("/counter", "1").unwrap();
    assert!(matches!(tx.commit(), Err(XsError::Again)));
    assert!(matches!(s.xs.read("/result"), Err(XsError::NotFound)));

    // Without interference the same commits.
    let tx = s.xs.transaction_start().unwrap();
    assert_eq!(tx.read("/counter").unwrap(), b"1");
    tx.write("/result", "committed").unwrap();
    tx.commit().unwrap();
    assert_eq!(s.xs.read("/result").unwrap(), b"committed");

    // Abort (explicit or by drop) discards.
    let tx = s.xs.transaction_start().unwrap();
    tx.write("/aborted", "x").unwrap();
    tx.abort().unwrap();
    {
        let tx = s.xs.transaction_start().unwrap();
        tx.rm("/result").unwrap();
        tx.write("/dropped", "x").unwrap();
    }
    assert!(matches!(s.xs.read("/aborted"), Err(XsError::NotFound)));
    assert!(matches!(s.xs.read("/dropped"), Err(XsError::NotFound)));
    assert_eq!(s.xs.read("/result").unwrap(), b"committed");

    // Two transactions touching the same node: the first to commit wins.
    let t1 = s.xs.transaction_start().unwrap();
    let t2 = other.transaction_start().unwrap();
    t1.write("/counter", "t1").unwrap();
    t2.write("/counter", "t2").unwrap();
    t1.commit().unwrap();
    assert!(matches!(t2.commit(), Err(XsError::Again)));
    assert_eq!(s.xs.read("/counter").unwrap(), b"t1");
}

#[test]
fn transaction_retries_conflicts_transparently() {
    let s = setup();
    let other = XenStore::open_at(s.sim.socket_path()).unwrap();
    s.xs.write("/n", "0").unwrap();
    let mut attempts = 0;
    let result =
        s.xs.transaction(|tx| {
            attempts += 1;
            let n: u32 = tx
                .read_string("/n")?
                .parse()
                .map_err(|_| XsError::Invalid)?;
            if attempts == 1 {
                // Someone else changes the node under the first attempt.
                other.write("/n", "10").unwrap();
            }
            tx.write("/n", (n + 1).to_string())?;
            Ok(n)
        })
        .unwrap();
    assert_eq!((attempts, result), (2, 10));
    assert_eq!(s.xs.read("/n").unwrap(), b"11");

    // An error from the closure aborts and is returned unchanged.
    let r: Result<(), _> = s.xs.transaction(|tx| {
        tx.write("/n", "999")?;
        tx.read("/missing").map(drop)
    });
    assert!(matches!(r, Err(XsError::NotFound)));
    assert_eq!(s.xs.read("/n").unwrap(), b"11");
}

#[test]
fn concurrent_transactions_from_many_threads_lose_no_update() {
    let s = setup();
    s.xs.write("/count", "0").unwrap();
    let runs = Arc::new(AtomicUsize::new(0));
    // Threads 0 and 1 share a connection; 2 and 3 have their own.
    let shared = Arc::new(XenStore::open_at(s.sim.socket_path()).unwrap());
    let handles: Vec<_> = (0..4)
        .map(|i| {
            let xs = if i < 2 {
                Arc::clone(&shared)
            } else {
                Arc::new(XenStore::open_at(s.sim.socket_path()).unwrap())
            };
            let runs = Arc::clone(&runs);
            std::thread::spawn(move || {
                for _ in 0..25 {
                    xs.transaction(|tx| {
                        runs.fetch_add(1, Ordering::Relaxed);
                        let n: u32 = tx
                            .read_string("/count")?
                            .parse()
                            .map_err(|_| XsError::Invalid)?;
                        tx.write("/count", (n + 1).to_string())
                    })
                    .unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(s.xs.read("/count").unwrap(), b"100");
    assert!(runs.load(Ordering::Relaxed) >= 100);
}

#[test]
fn one_connection_many_threads_replies_matched_by_request_id() {
    let s = setup();
    let xs = Arc::new(s.xs);
    let handles: Vec<_> = (0..8)
        .map(|t| {
            let xs = Arc::clone(&xs);
            std::thread::spawn(move || {
                for i in 0..100 {
                    let path = format!("/t{t}/n{}", i % 5);
                    let value = format!("{t}-{i}");
                    xs.write(&path, &value).unwrap();
                    assert_eq!(xs.read_string(&path).unwrap(), value);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

#[test]
fn transaction_watches_fire_at_commit_only() {
    let s = setup();
    let watcher = XenStore::open_at(s.sim.socket_path()).unwrap();
    watcher.watch("/fe", "fe").unwrap();
    expect_event(&watcher, "/fe", "fe");
    let tx = s.xs.transaction_start().unwrap();
    tx.write("/fe/state", "3").unwrap();
    no_more_events(&watcher);
    tx.commit().unwrap();
    expect_event(&watcher, "/fe/state", "fe");
    // An aborted transaction fires nothing.
    let tx = s.xs.transaction_start().unwrap();
    tx.write("/fe/state", "4").unwrap();
    tx.abort().unwrap();
    no_more_events(&watcher);
}

#[test]
fn server_closing_mid_reply_fails_every_pending_caller_promptly() {
    let s = setup();
    let xs = Arc::new(s.xs);
    xs.write("/v", vec![b'x'; 2000]).unwrap();
    s.sim.inject_fault(Fault::CloseMidReply);
    let (done_tx, done_rx) = mpsc::channel();
    for _ in 0..4 {
        let xs = Arc::clone(&xs);
        let done = done_tx.clone();
        std::thread::spawn(move || {
            let r = (0..50).map(|_| xs.read("/v")).find(Result::is_err);
            let _ = done.send(r);
        });
    }
    let waiter = {
        let xs = Arc::clone(&xs);
        let done = done_tx.clone();
        std::thread::spawn(move || {
            let _ = done.send(Some(xs.wait_watch_event(None).map(|_| Vec::new())));
        })
    };
    for _ in 0..5 {
        let r = done_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("a caller hung");
        assert!(matches!(r, Some(Err(XsError::Closed))), "{r:?}");
    }
    waiter.join().unwrap();
    assert!(xs.is_closed());
    assert!(fd_readable(&xs));
    assert!(matches!(xs.write("/after", "x"), Err(XsError::Closed)));
    // The server itself lives on for other connections.
    let again = XenStore::open_at(s.sim.socket_path()).unwrap();
    assert_eq!(again.read("/v").unwrap().len(), 2000);
}

#[test]
fn oversized_request_from_a_raw_client_drops_its_connection() {
    use std::io::{Read, Write};
    let s = setup();
    let mut raw = std::os::unix::net::UnixStream::connect(s.sim.socket_path()).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut frame = xen::xenstore::wire::encode(2, 1, 0, b"/a\0");
    frame[12..16].copy_from_slice(&5000u32.to_ne_bytes());
    raw.write_all(&frame).unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(raw.read(&mut buf).unwrap(), 0);
    s.xs.write("/still", "alive").unwrap();
}

#[test]
fn open_follows_xenstored_path() {
    let s = setup();
    // Only this test touches the variable.
    std::env::set_var("XENSTORED_PATH", s.sim.socket_path());
    let xs = XenStore::open().unwrap();
    std::env::remove_var("XENSTORED_PATH");
    xs.write("/via-env", "1").unwrap();
    assert_eq!(s.xs.read("/via-env").unwrap(), b"1");
    assert!(XenStore::open_at(s.sim.dir().join("missing")).is_err());
}

#[test]
fn stop_closes_clients_and_removes_sockets() {
    let s = setup();
    let d2 = s.domain(2);
    let dom0_sock = s.sim.socket_path();
    let d2_sock = s.sim.domain_socket_path(2);
    s.sim.stop();
    assert!(matches!(s.xs.read("/"), Err(XsError::Closed)));
    assert!(matches!(d2.read("x"), Err(XsError::Closed)));
    assert!(!dom0_sock.exists() && !d2_sock.exists());
}

#[test]
fn toolstack_introduces_and_releases_domains_over_the_socket() {
    use xen::xenstore::wire::MsgType;
    let s = setup();
    s.xs.watch("@introduceDomain", "intro").unwrap();
    s.xs.watch("@releaseDomain", "release").unwrap();
    s.xs.wait_watch_event(WAIT).unwrap();
    s.xs.wait_watch_event(WAIT).unwrap();
    assert_eq!(
        s.xs.request(MsgType::IsDomainIntroduced, b"4\0").unwrap(),
        b"F\0"
    );
    s.xs.request(MsgType::Introduce, b"4\x0012345\x007\0")
        .unwrap();
    expect_event(&s.xs, "@introduceDomain", "intro");
    assert_eq!(
        s.xs.request(MsgType::IsDomainIntroduced, b"4\0").unwrap(),
        b"T\0"
    );
    let d4 = XenStore::open_at(s.sim.domain_socket_path(4)).unwrap();
    assert_eq!(d4.get_domain_path(4).unwrap(), "/local/domain/4");
    // Only the toolstack may.
    assert!(matches!(
        d4.request(MsgType::Introduce, b"9\x001\x001\0"),
        Err(XsError::PermissionDenied)
    ));
    assert!(matches!(
        d4.request(MsgType::Release, b"4\0"),
        Err(XsError::PermissionDenied)
    ));
    assert!(matches!(
        s.xs.request(MsgType::Introduce, b"4\x001\0"),
        Err(XsError::Invalid)
    ));
    assert!(matches!(
        s.xs.request(MsgType::Release, b"8\0"),
        Err(XsError::NotFound)
    ));
    s.xs.request(MsgType::Release, b"4\0").unwrap();
    expect_event(&s.xs, "@releaseDomain", "release");
    assert!(matches!(d4.read("x"), Err(XsError::Closed)));
}

#[test]
fn a_bad_transaction_end_keeps_the_transaction() {
    use xen::xenstore::wire::MsgType;
    let s = setup();
    let tx = s.xs.transaction_start().unwrap();
    tx.write("/kept", "1").unwrap();
    assert!(matches!(
        tx.request(MsgType::TransactionEnd, b"X\0"),
        Err(XsError::Invalid)
    ));
    assert!(matches!(
        tx.request(MsgType::TransactionStart, b"\0"),
        Err(XsError::Busy)
    ));
    assert_eq!(tx.read("/kept").unwrap(), b"1");
    tx.commit().unwrap();
    assert_eq!(s.xs.read("/kept").unwrap(), b"1");
    // The transaction is gone now: its id is unknown.
    let tx = s.xs.transaction_start().unwrap();
    let id = tx.id();
    tx.commit().unwrap();
    let stale = xen::xenstore::wire::encode(MsgType::Read as u32, 77, id, b"/kept\0");
    use std::io::{Read, Write};
    let mut raw = std::os::unix::net::UnixStream::connect(s.sim.socket_path()).unwrap();
    raw.write_all(&stale).unwrap();
    let mut reply = [0u8; 16 + 7];
    raw.read_exact(&mut reply).unwrap();
    assert_eq!(reply[0..4], (MsgType::Error as u32).to_ne_bytes());
    assert_eq!(reply[4..8], 77u32.to_ne_bytes());
    assert_eq!(&reply[16..], b"ENOENT\0");
}

mod hostile {
    //! Arbitrary requests never break the simulated xenstored: each gets a reply with its
    //! request id (the request's type or XS_ERROR), and the server keeps serving.

    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    use proptest::prelude::*;
    use xen::xenstore::wire::{self, FrameReader, MsgType};

    use super::*;

    fn payload() -> impl Strategy<Value = Vec<u8>> {
        let byte = prop_oneof![
            Just(0u8),
            Just(b'/'),
            Just(b'a'),
            Just(b'@'),
            Just(b'T'),
            Just(b'5'),
            any::<u8>()
        ];
        proptest::collection::vec(byte, 0..48)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
        #[test]
        fn arbitrary_requests_get_replies(
            reqs in proptest::collection::vec((0u32..24, 0u32..3, payload()), 1..24),
            domain in any::<bool>(),
        ) {
            let s = setup();
            let path = if domain { s.domain(5); s.sim.domain_socket_path(5) } else { s.sim.socket_path() };
            let mut raw = UnixStream::connect(&path).unwrap();
            raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut frames = FrameReader::new(wire::PAYLOAD_MAX);
            let mut buf = [0u8; 8192];
            for (i, (ty, tx, payload)) in reqs.into_iter().enumerate() {
                // Release would close this very connection when it is domain 5's.
                let ty = if ty == MsgType::Release as u32 { MsgType::Read as u32 } else { ty };
                let req_id = 1000 + i as u32;
                raw.write_all(&wire::encode(ty, req_id, tx, &payload)).unwrap();
                let reply = loop {
                    if let Some(m) = frames.next_message().unwrap() {
                        if m.msg_type() != Some(MsgType::WatchEvent) {
                            break m;
                        }
                        continue;
                    }
                    let n = raw.read(&mut buf).unwrap();
                    prop_assert_ne!(n, 0, "server closed the connection");
                    frames.push(&buf[..n]);
                };
                prop_assert_eq!(reply.req_id, req_id);
                prop_assert!(reply.ty == ty || reply.msg_type() == Some(MsgType::Error));
            }
            // Still serving everyone.
            s.xs.write("/alive", "1").unwrap();
        }
    }
}

#[test]
fn special_node_permissions_decide_which_domains_see_special_events() {
    let s = setup();
    let d5 = s.domain(5);
    let d7 = s.domain(7);
    s.domain(6);
    assert_eq!(
        s.xs.get_perms("@releaseDomain").unwrap(),
        vec![Perm::new(0, PermAccess::None)]
    );
    s.xs.set_perms(
        "@releaseDomain",
        &[
            Perm::new(0, PermAccess::None),
            Perm::new(5, PermAccess::Read),
        ],
    )
    .unwrap();
    for d in [&d5, &d7] {
        d.watch("@releaseDomain", "rel").unwrap();
        expect_event(d, "@releaseDomain", "rel");
    }
    s.sim.release_domain(6).unwrap();
    expect_event(&d5, "@releaseDomain", "rel");
    no_more_events(&d7);
    // Special nodes are not part of the tree.
    assert!(!s
        .xs
        .directory("/")
        .unwrap()
        .iter()
        .any(|c| c.starts_with('@')));
    assert!(matches!(s.xs.read("@releaseDomain"), Err(XsError::Invalid)));
}

#[test]
fn a_reconnecting_client_survives_restarts_with_its_watches_and_transactions() {
    let s = setup();
    let xs = XenStore::open_reconnecting(s.sim.socket_path(), Duration::from_secs(10)).unwrap();
    xs.write("/a", "1").unwrap();
    xs.watch("/a", "tok").unwrap();
    expect_event(&xs, "/a", "tok");
    // A transaction open across a restart: its next request is EAGAIN, and `transaction` runs
    // it again on the new connection.
    let mut runs = 0;
    xs.transaction(|tx| {
        runs += 1;
        let v = tx.read_string("/a")?;
        if runs == 1 {
            s.sim.restart(Duration::from_millis(200)).unwrap();
        }
        tx.write("/b", format!("{v}+"))
    })
    .unwrap();
    assert_eq!(runs, 2);
    assert_eq!(xs.read_string("/b").unwrap(), "1+");
    // The watch is back: it fired on its new registration, and fires on a change.
    expect_event(&xs, "/a", "tok");
    let other = XenStore::open_at(s.sim.socket_path()).unwrap();
    other.write("/a", "2").unwrap();
    expect_event(&xs, "/a", "tok");
    no_more_events(&xs);
    // Requests from another thread all along several restarts: none fails, none is lost.
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        let writer = scope.spawn(|| {
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                xs.write("/count", n.to_string()).unwrap();
                assert_eq!(xs.read_string("/count").unwrap(), n.to_string());
            }
            n
        });
        for _ in 0..5 {
            s.sim.restart(Duration::from_millis(50)).unwrap();
            std::thread::sleep(Duration::from_millis(50));
        }
        stop.store(true, Ordering::Relaxed);
        let n = writer.join().unwrap();
        assert_eq!(xs.read_string("/count").unwrap(), n.to_string());
    });
    assert!(!xs.is_closed());
    // Each restart fired the watch once more.
    for _ in 0..5 {
        expect_event(&xs, "/a", "tok");
    }
    no_more_events(&xs);
    // Clients that do not reconnect are closed by the first restart, as before.
    assert!(matches!(s.xs.read("/a"), Err(XsError::Closed)));
    assert!(matches!(other.read("/a"), Err(XsError::Closed)));
}
