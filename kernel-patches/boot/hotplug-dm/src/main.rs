// SPDX-License-Identifier: GPL-2.0
//! Boot-test program for blkhotplug's use of the series' device-mapper interface.
//!
//! Runs in the VM as root with `/dev` a plain tmpfs holding only the device-mapper control
//! node, `loop-control` and `loop0`..`loop7`: no `/dev/dm-N` node exists, so blkhotplug can
//! only obtain an fd for the device-mapper device it creates through `DM_TABLE_LOAD` with
//! `DM_FILE_DESCRIPTOR_FLAG` (its fallback for older kernels opens `/dev/dm-N`). Prints one
//! PASS/FAIL line per check and `hotplug-dm: N passed, N failed`.
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{FileExt as _, MetadataExt as _};
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use hotplug::attach::{self, AttachOptions, Attached};
use hotplug::dm::{Control, Lookup, DM_DEFERRED_REMOVE};
use hotplug::params::{Mode, Source};

#[derive(Default)]
struct Tally {
    passed: u32,
    failed: u32,
}

impl Tally {
    fn check(&mut self, ok: bool, name: &str, detail: impl std::fmt::Display) -> bool {
        if ok {
            self.passed += 1;
            println!("PASS {name}");
        } else {
            self.failed += 1;
            println!("FAIL {name}: {detail}");
        }
        ok
    }
}

const IMAGE: &str = "/tmp/hotplug-dm.img";
const SIZE: u64 = 4 << 20;
const UUID: &str = "BLKHOTPLUG-BOOT-TEST-0001";

fn options(autoclear: bool, name: &str) -> AttachOptions {
    AttachOptions {
        mode: Mode::parse(b"w").expect("mode"),
        autoclear,
        dm_name: name.to_owned(),
        dm_uuid: UUID.to_owned(),
    }
}

fn makedev(major: u32, minor: u32) -> u64 {
    let (ma, mi) = (u64::from(major), u64::from(minor));
    ((ma & 0xfff) << 8) | ((ma & !0xfff) << 32) | (mi & 0xff) | ((mi & !0xff) << 12)
}

fn sysfs_diskseq(major: u32, minor: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/diskseq"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Whether the device with our uuid is gone within 5 s (deferred removal runs from a workqueue).
fn gone(ctl: &Control) -> bool {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        if ctl.status(Lookup::Uuid(UUID.to_owned())).is_err() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

fn dm_part(t: &mut Tally, ctl: &Control, lo: &Attached) {
    let source = Source::Linear(lo.path.clone());
    let dm = match attach::attach(&source, &options(true, "blkhotplug-boot-test")) {
        Ok(dm) => dm,
        Err(e) => {
            t.check(false, "blkhotplug creates a linear device-mapper device", e);
            return;
        }
    };
    t.check(true, "blkhotplug creates a linear device-mapper device", "");
    t.check(
        !Path::new(&dm.path).exists(),
        "no /dev/dm-N node: the fd came from DM_TABLE_LOAD",
        dm.path.display(),
    );
    let file = File::from(dm.fd.try_clone().expect("dup"));
    let meta = file.metadata().expect("fstat");
    t.check(
        meta.rdev() == makedev(dm.major, dm.minor),
        "fstat of blkhotplug's fd is the device it reports",
        format_args!(
            "rdev {:#x}, reported {}:{}",
            meta.rdev(),
            dm.major,
            dm.minor
        ),
    );
    t.check(
        dm.diskseq != 0 && sysfs_diskseq(dm.major, dm.minor) == Some(dm.diskseq),
        "blkhotplug's diskseq (BLKGETDISKSEQ on its fd) matches sysfs",
        format_args!("{} vs {:?}", dm.diskseq, sysfs_diskseq(dm.major, dm.minor)),
    );
    match ctl.status(Lookup::Uuid(UUID.to_owned())) {
        Ok(s) => t.check(
            s.flags & DM_DEFERRED_REMOVE != 0 && s.open_count == 1 && s.dev == (dm.major, dm.minor),
            "device is marked for deferred removal, held only by blkhotplug's fd",
            format_args!(
                "flags {:#x}, open_count {}, dev {:?}",
                s.flags, s.open_count, s.dev
            ),
        ),
        Err(e) => t.check(false, "DM_DEV_STATUS of the new device", e),
    };
    let data = b"blkhotplug wrote this through the device-mapper fd";
    let wrote = file.write_all_at(data, 8192).and_then(|()| file.sync_all());
    let mut back = vec![0u8; data.len()];
    let read = File::open(IMAGE).and_then(|img| img.read_exact_at(&mut back, 8192));
    t.check(
        wrote.is_ok() && read.is_ok() && back == data,
        "data written through the fd reaches the image under the loop device",
        format_args!("{wrote:?} {read:?}"),
    );
    drop(file);
    drop(dm);
    t.check(
        gone(ctl),
        "device removed once blkhotplug's fd is closed",
        "still there",
    );
}

fn main() -> ExitCode {
    let mut t = Tally::default();
    let ctl = match Control::open() {
        Ok(c) => c,
        Err(e) => {
            t.check(false, "open the device-mapper control node", e);
            println!("hotplug-dm: {} passed, {} failed", t.passed, t.failed);
            return ExitCode::FAILURE;
        }
    };
    println!("hotplug-dm: kernel DM interface {:?}", ctl.version());
    t.check(
        ctl.has_fd_interface(),
        "blkhotplug detects the fd interface (DM 4.49)",
        format_args!("{:?}", ctl.version()),
    );
    let image = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(IMAGE)
        .and_then(|mut f| f.set_len(SIZE).and_then(|()| f.flush()));
    if let Err(e) = image {
        t.check(false, "create the image", e);
    } else {
        match attach::attach(
            &Source::parse(IMAGE.as_bytes()).expect("params"),
            &options(true, ""),
        ) {
            Ok(lo) => {
                t.check(true, "blkhotplug attaches the image to a loop device", "");
                dm_part(&mut t, &ctl, &lo);
            }
            Err(e) => {
                t.check(false, "blkhotplug attaches the image to a loop device", e);
            }
        }
    }
    println!("hotplug-dm: {} passed, {} failed", t.passed, t.failed);
    if t.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
