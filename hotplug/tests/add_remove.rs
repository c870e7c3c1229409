//! blkhotplug against real loop devices and the simulated xenstored. Needs root and
//! /dev/loop-control; without them each test says so and passes as skipped.
mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{bound_under, can_run, wait_unbound, Env, FdBackend};
use xen::handoff::{self, PhysicalDevice};
use xen::xenstore::XsOps;

const MIB: u64 = 1 << 20;

fn status(env: &Env, be: &str) -> (Option<String>, Option<String>) {
    (
        env.read(&format!("{be}/hotplug-status")),
        env.read(&format!("{be}/hotplug-error")),
    )
}

/// 32 `add`s at once, each its own file: all succeed, each with its own loop device, and each
/// fd the backend receives is the device named (diskseq equal).
#[test]
fn concurrent_adds_each_get_their_own_loop_device() {
    if !can_run() {
        return;
    }
    let env = Env::new("concurrent");
    let backend = FdBackend::start(env.dir.join("handoff.sock"), true);
    let n = 32u32;
    let bes: Vec<(String, std::path::PathBuf)> = (0..n)
        .map(|i| {
            let f = env.file(&format!("disk{i}.img"), 4 * MIB);
            let be = env.backend(
                51712 + i,
                &f.to_string_lossy(),
                "w",
                true,
                Some(&backend.path),
            );
            (be, f)
        })
        .collect();
    let start = Instant::now();
    let children: Vec<_> = bes
        .iter()
        .map(|(be, _)| env.command("add", be).output_spawn())
        .collect();
    let results: Vec<_> = children
        .into_iter()
        .map(|c| c.wait_with_output().expect("wait"))
        .collect();
    let elapsed = start.elapsed();
    eprintln!("{n} concurrent adds took {elapsed:?}");
    for (out, (be, _)) in results.iter().zip(&bes) {
        assert!(
            out.status.success(),
            "{be}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(status(&env, be), (Some("connected".into()), None), "{be}");
    }
    let received = backend.received.lock().expect("lock").clone();
    assert_eq!(received.len(), n as usize);
    let mut devices: Vec<_> = received
        .iter()
        .map(|r| (r.info.device.major, r.info.device.minor))
        .collect();
    devices.sort_unstable();
    devices.dedup();
    assert_eq!(
        devices.len(),
        n as usize,
        "every add got its own loop device"
    );
    for (be, file) in &bes {
        let pd = PhysicalDevice::parse(
            env.read(&format!("{be}/physical-device"))
                .expect("physical-device")
                .as_bytes(),
        )
        .expect("parse");
        let r = received
            .iter()
            .find(|r| r.info.device == pd)
            .expect("the backend received the device the node names");
        assert_eq!(
            Some(r.fd_diskseq),
            pd.diskseq,
            "fd handed over is the device created"
        );
        assert_eq!(
            r.backing.as_deref(),
            Some(file.as_path()),
            "loop device backs the right file"
        );
        let seq = env.read(&format!("{be}/diskseq")).expect("diskseq");
        assert_eq!(handoff::parse_diskseq(seq.as_bytes()).ok(), pd.diskseq);
        assert_eq!(
            env.read(&format!("{be}/physical-device-path")),
            Some(format!("/dev/loop{}", pd.minor))
        );
    }
    for r in &received {
        let sys = format!(
            "/sys/dev/block/{}:{}/loop/autoclear",
            r.info.device.major, r.info.device.minor
        );
        assert_eq!(
            std::fs::read_to_string(&sys).expect("autoclear").trim(),
            "1",
            "{sys}"
        );
    }
    // blkhotplug has exited; the backend still holds them: all still attached.
    assert_eq!(bound_under(&env.dir).len(), n as usize);
    // The backend lets go: autoclear detaches every one.
    backend.release_all();
    assert_eq!(wait_unbound(&env.dir, Duration::from_secs(10)), vec![]);
}

trait SpawnOutput {
    fn output_spawn(&mut self) -> std::process::Child;
}

impl SpawnOutput for std::process::Command {
    fn output_spawn(&mut self) -> std::process::Child {
        self.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn")
    }
}

/// SIGKILL at random points of `add`, 200 times: once the backend has let go, no loop device
/// stays attached to any of the files.
#[test]
fn sigkill_during_add_never_leaks_a_loop_device() {
    if !can_run() {
        return;
    }
    let env = Env::new("sigkill");
    // This backend takes each fd, checks it, answers and lets go at once.
    let backend = FdBackend::start(env.dir.join("handoff.sock"), false);
    let file = |i: u32| env.file(&format!("k{i}.img"), MIB);
    // Three unkilled runs to learn how long an add takes; kills then land uniformly within the
    // shortest of them.
    let mut shortest = Duration::MAX;
    for i in 0..3 {
        let f = file(1000 + i);
        let be = env.backend(
            1000 + i,
            &f.to_string_lossy(),
            "w",
            true,
            Some(&backend.path),
        );
        let t = Instant::now();
        env.run_ok("add", &be, "5");
        shortest = shortest.min(t.elapsed());
    }
    // Before: nothing of ours attached (the backend let go of the three above).
    assert_eq!(wait_unbound(&env.dir, Duration::from_secs(10)), vec![]);
    let before = common::bound_loops();
    let mut rng = common::Rng::new();
    let runs = 200u32;
    // Kills that landed while add still ran, in the fd-handoff runs (the odd runs always do).
    let mut killed_running = 0;
    let start = Instant::now();
    for i in 1..=runs {
        let f = file(i);
        // Even runs: fd handoff. Odd runs: a backend with `opened` that never opens the
        // device, so the kill may also land while add waits for it.
        let socket = (i % 2 == 0).then_some(backend.path.as_path());
        let mode = if i % 3 == 0 { "r" } else { "w" };
        let be = env.backend(i, &f.to_string_lossy(), mode, true, socket);
        let mut child = env.spawn("add", &be);
        std::thread::sleep(Duration::from_micros(
            rng.below(shortest.as_micros() as u64),
        ));
        if child.try_wait().expect("try_wait").is_none() && socket.is_some() {
            killed_running += 1;
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    let handed_over = backend.received.lock().expect("lock").len();
    eprintln!(
        "{runs} SIGKILL runs in {:?} (shortest add {shortest:?}; of {} fd-handoff runs {killed_running} killed while \
         running; {handed_over} fds reached the backend before or despite the kill)",
        start.elapsed(),
        runs / 2
    );
    assert!(
        killed_running >= runs / 20,
        "kills should land during add ({killed_running})"
    );
    // After: once the backend has let go (it does at once), nothing of ours is attached, and
    // no loop device is bound that was not bound before, except other tests' files.
    assert_eq!(
        wait_unbound(&env.dir, Duration::from_secs(10)),
        vec![],
        "loop devices leaked after SIGKILL"
    );
    let new: Vec<_> = common::bound_loops()
        .into_iter()
        .filter(|x| !before.contains(x))
        .collect();
    assert!(new.iter().all(|(_, b)| !b.starts_with(&env.dir)), "{new:?}");
}

/// A loop device detached and rebound to another file between `add` and `remove`: `remove`
/// leaves it alone.
#[test]
fn remove_leaves_a_reused_loop_device_alone() {
    if !can_run() {
        return;
    }
    if !Path::new("/usr/sbin/losetup").exists() && !Path::new("/sbin/losetup").exists() {
        sim::skip::report_skip("needs losetup to rebind a chosen loop device");
        return;
    }
    let env = Env::new("reuse");
    let a = env.file("a.img", MIB);
    let b = env.file("b.img", MIB);
    // No `opened`, no socket: an upstream backend, so no autoclear and `remove` tears down.
    let be = env.backend(1, &a.to_string_lossy(), "w", false, None);
    env.run_ok("add", &be, "5");
    let dev = env
        .read(&format!("{be}/physical-device-path"))
        .expect("path");
    assert_eq!(
        env.read(&format!("{be}/physical-device"))
            .map(|p| p.contains('@')),
        Some(false),
        "plain major:minor for a backend without `opened`"
    );
    // Someone else detaches it and binds another file to the same device.
    let run = |args: &[&str]| drop(sim::losetup::losetup(args));
    run(&["-d", &dev]);
    run(&[&dev, &b.to_string_lossy()]);
    env.run_ok("remove", &be, "5");
    let name = dev.trim_start_matches("/dev/").to_owned();
    assert!(
        bound_under(&env.dir).contains(&(name, b.clone())),
        "the reused device must still back b.img"
    );
    run(&["-d", &dev]);
    assert_eq!(wait_unbound(&env.dir, Duration::from_secs(5)), vec![]);
}

/// Without a backend saying anything, `remove` tears down what `add` attached; a second
/// `remove` is a no-op.
#[test]
fn remove_tears_down_what_add_made() {
    if !can_run() {
        return;
    }
    let env = Env::new("remove");
    let a = env.file("a.img", MIB);
    let be = env.backend(1, &a.to_string_lossy(), "r", false, None);
    // libxl passes XENBUS_PATH relative to dom0's home path; xenstored resolves it.
    let relative = be.strip_prefix("/local/domain/0/").expect("a dom0 backend");
    env.run_ok("add", relative, "5");
    assert_eq!(bound_under(&env.dir).len(), 1);
    let dev = env
        .read(&format!("{be}/physical-device-path"))
        .expect("path");
    let ro = std::fs::read_to_string(format!("/sys/block/{}/ro", dev.trim_start_matches("/dev/")))
        .expect("ro");
    assert_eq!(ro.trim(), "1", "mode r gives a read-only loop device");
    let sys = |f: &str| {
        std::fs::read_to_string(format!(
            "/sys/block/{}/{f}",
            dev.trim_start_matches("/dev/")
        ))
        .expect(f)
        .trim()
        .to_owned()
    };
    assert_eq!(
        sys("loop/autoclear"),
        "0",
        "no autoclear for a backend that never says it holds the device"
    );
    assert_eq!(sys("loop/partscan"), "0");
    // Direct I/O and the block size of the storage under the file, where the file allows it.
    let align = common::dio_alignment(&a);
    assert_eq!(
        sys("loop/dio"),
        if align.is_some() { "1" } else { "0" },
        "dio alignment {align:?}"
    );
    assert_eq!(
        sys("queue/logical_block_size"),
        align.unwrap_or(512).to_string()
    );
    env.run_ok("remove", relative, "5");
    assert_eq!(wait_unbound(&env.dir, Duration::from_secs(5)), vec![]);
    assert_eq!(env.read(&format!("{be}/blkhotplug-created")), None);
    assert!(env.run("remove", &be, "5").status.success());
}

/// The device nodes appear in one transaction: a watcher never sees `physical-device`
/// without `physical-device-path` and `diskseq`. And `add` waits for `opened` = `1` before it
/// closes its fd and reports `connected`.
#[test]
fn nodes_in_one_transaction_and_wait_for_opened() {
    if !can_run() {
        return;
    }
    let env = Env::new("opened");
    let a = env.file("a.img", 2 * MIB);
    let be = env.backend(1, &a.to_string_lossy(), "w", true, None);
    // A backend stand-in like the series' blkback: waits for physical-device, opens the device
    // by number, checks the diskseq, waits a little, then says opened = 1 and holds it.
    let watcher = xen::xenstore::XenStore::open_at(env.socket()).expect("connect");
    let pd_node = format!("{be}/physical-device");
    watcher.watch(&pd_node, "pd").expect("watch");
    let mut child = env
        .command("add", &be)
        .arg("--timeout")
        .arg("10")
        .output_spawn();
    let deadline = Instant::now() + Duration::from_secs(10);
    let (pd, held) = loop {
        assert!(Instant::now() < deadline, "physical-device never appeared");
        let _ = watcher.wait_watch_event(Some(Duration::from_millis(200)));
        let Ok(pd) = watcher.read(&pd_node) else {
            continue;
        };
        // All three together, read outside any transaction.
        let path = watcher
            .read(&format!("{be}/physical-device-path"))
            .expect("path with physical-device");
        let seq = watcher
            .read(&format!("{be}/diskseq"))
            .expect("diskseq with physical-device");
        let pd = PhysicalDevice::parse(&pd).expect("physical-device");
        assert_eq!(
            handoff::parse_diskseq(&seq).ok(),
            pd.diskseq,
            "diskseq@ form for a backend with `opened`"
        );
        let path = String::from_utf8(path).expect("utf8");
        let (fd, major, minor) = hotplug::blkdev::open_node(Path::new(&path), true).expect("open");
        assert_eq!((major, minor), (pd.major, pd.minor));
        assert_eq!(
            Some(
                hotplug::blkdev::diskseq(std::os::fd::AsFd::as_fd(&fd), Path::new(&path))
                    .expect("seq")
            ),
            pd.diskseq
        );
        break (pd, fd);
    };
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        child.try_wait().expect("try_wait").is_none(),
        "add must wait for opened = 1"
    );
    assert_eq!(env.read(&format!("{be}/hotplug-status")), None);
    env.xs.write(&format!("{be}/opened"), "1").expect("opened");
    let out = child.wait_with_output().expect("wait");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(status(&env, &be), (Some("connected".into()), None));
    // blkhotplug has closed its fd; our "backend" still holds the device.
    assert_eq!(
        common::backing_of(pd.major, pd.minor).as_deref(),
        Some(a.as_path())
    );
    drop(held);
    assert_eq!(wait_unbound(&env.dir, Duration::from_secs(5)), vec![]);
}

/// A backend that never opens the device: `add` gives up after its timeout, reports the error,
/// removes the device nodes, and the loop device goes away with its fd.
#[test]
fn waiting_for_opened_is_bounded() {
    if !can_run() {
        return;
    }
    let env = Env::new("timeout");
    let a = env.file("a.img", MIB);
    let be = env.backend(1, &a.to_string_lossy(), "w", true, None);
    let t = Instant::now();
    let out = env.run("add", &be, "0.5");
    assert!(!out.status.success());
    assert!(t.elapsed() < Duration::from_secs(5));
    let (st, err) = status(&env, &be);
    assert_eq!(st.as_deref(), Some("busy"));
    assert!(
        err.as_deref().is_some_and(|e| e.contains("timed out")),
        "{err:?}"
    );
    for n in [
        "physical-device",
        "physical-device-path",
        "diskseq",
        "blkhotplug-created",
    ] {
        assert_eq!(
            env.read(&format!("{be}/{n}")),
            None,
            "{n} removed on failure"
        );
    }
    assert_eq!(wait_unbound(&env.dir, Duration::from_secs(5)), vec![]);
}

/// Every bad input: a clear error in `hotplug-error`, `hotplug-status` = `busy`, a failing
/// exit, and nothing attached.
#[test]
fn bad_inputs_fail_cleanly() {
    if !can_run() {
        return;
    }
    let env = Env::new("bad");
    let good = env.file("good.img", MIB);
    let ro = env.file("ro.img", MIB);
    std::fs::set_permissions(&ro, std::os::unix::fs::PermissionsExt::from_mode(0o444))
        .expect("chmod");
    let link = env.dir.join("link.img");
    std::os::unix::fs::symlink(&good, &link).expect("symlink");
    let dirlink = env.dir.join("d");
    std::os::unix::fs::symlink(&env.dir, &dirlink).expect("symlink");
    let missing = env.dir.join("missing.img");
    let cases: Vec<(String, &str, &str)> = vec![
        (missing.to_string_lossy().into_owned(), "w", "no such file"),
        ("good.img".into(), "w", "not an absolute path"),
        (link.to_string_lossy().into_owned(), "w", "symbolic link"),
        (
            dirlink.join("good.img").to_string_lossy().into_owned(),
            "w",
            "symbolic link",
        ),
        (format!("{}/../good.img", env.dir.display()), "w", "'..'"),
        ("/dev/mapper/control".into(), "w", "reserved name"),
        ("/dev/mapper/.".into(), "w", "'.'"),
        ("/dev/mapper/..".into(), "w", "'..'"),
        ("/dev/mapper/a/b".into(), "w", "contains '/'"),
        (
            ro.to_string_lossy().into_owned(),
            "w",
            "cannot be opened for writing",
        ),
        (good.to_string_lossy().into_owned(), "rw", "bad mode"),
        (
            "/dev/null".into(),
            "w",
            "neither a regular file nor a block device",
        ),
        (
            env.dir.to_string_lossy().into_owned(),
            "w",
            "neither a regular file nor a block device",
        ),
    ];
    for (i, (params, mode, want)) in cases.iter().enumerate() {
        let be = env.backend(100 + i as u32, params, mode, true, None);
        let out = env.run("add", &be, "2");
        assert!(!out.status.success(), "{params} {mode}: should fail");
        let (st, err) = status(&env, &be);
        assert_eq!(st.as_deref(), Some("busy"), "{params}");
        let err = err.unwrap_or_default();
        assert!(
            err.contains(want),
            "{params} {mode}: error {err:?} should say {want:?}"
        );
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(want),
            "stderr says it too"
        );
        assert_eq!(env.read(&format!("{be}/physical-device")), None);
    }
    // Missing params node.
    let be = "/local/domain/0/backend/vbd/7/999";
    env.xs.write(&format!("{be}/state"), "2").expect("write");
    env.xs.write(&format!("{be}/mode"), "w").expect("write");
    let out = env.run("add", be, "2");
    assert!(!out.status.success());
    assert!(status(&env, be)
        .1
        .is_some_and(|e| e.contains("params is missing")));
    // The read-only file is fine read-only.
    let be = env.backend(200, &ro.to_string_lossy(), "r", false, None);
    env.run_ok("add", &be, "2");
    assert!(env.run("remove", &be, "2").status.success());
    assert_eq!(wait_unbound(&env.dir, Duration::from_secs(5)), vec![]);
}

/// A backend that refuses the fd: `add` fails and nothing stays attached.
#[test]
fn refused_handoff_fails_and_leaves_nothing() {
    if !can_run() {
        return;
    }
    let env = Env::new("refused");
    let a = env.file("a.img", MIB);
    // A socket path where nothing listens.
    let be = env.backend(
        1,
        &a.to_string_lossy(),
        "w",
        true,
        Some(&env.dir.join("nobody.sock")),
    );
    let out = env.run("add", &be, "2");
    assert!(!out.status.success());
    assert!(
        status(&env, &be).1.is_some_and(|e| e.contains("connect")),
        "{:?}",
        status(&env, &be)
    );
    assert_eq!(wait_unbound(&env.dir, Duration::from_secs(5)), vec![]);
}

/// A backend that never answers: `add` gives up after its timeout. The fd it sent is still in
/// flight in the unaccepted connection; once the backend's socket closes, nothing is left.
#[test]
fn silent_backend_times_out_and_leaves_nothing() {
    if !can_run() {
        return;
    }
    let env = Env::new("silent");
    let a = env.file("a.img", MIB);
    let path = env.dir.join("silent.sock");
    let l = xen::handoff::listen(&path, 4).expect("listen");
    let be = env.backend(1, &a.to_string_lossy(), "w", true, Some(&path));
    let t = Instant::now();
    let out = env.run("add", &be, "0.5");
    assert!(!out.status.success());
    assert!(t.elapsed() < Duration::from_secs(5));
    let (st, err) = status(&env, &be);
    assert_eq!(st.as_deref(), Some("busy"));
    assert!(
        err.as_deref()
            .is_some_and(|e| e.contains("timed out") && e.contains("reply")),
        "{err:?}"
    );
    drop(l);
    assert_eq!(wait_unbound(&env.dir, Duration::from_secs(5)), vec![]);
}
