//! Real device errors, as root: each fails its own request with `BLKIF_RSP_ERROR`, and the
//! backend keeps serving.
//!
//! No fault-injecting block device exists on a plain host (no device-mapper `error`/`flakey`
//! targets, no `null_blk` or `scsi_debug` modules here), so the errors come from real kernel
//! paths that fail deterministically:
//! - EIO: a loop device whose backing file is truncated after it was attached keeps its size;
//!   reading a sector past the backing file's new end finds no data, and the loop driver ends
//!   the request with `BLK_STS_IOERR` (`lo_complete_rq`: a short read with no data is EIO);
//! - ENOSPC: an image on a full tmpfs, where writing into a hole needs a page it cannot get.

use std::process::Command;

use ring::Status;
use sim::front::{FrontOptions, IoOp};
use sim::toolstack::VbdSpec;
use sim::workload::DiskModel;
use tests::{remove, Backend, Sim, DEVID, GUEST};

#[test]
fn eio_on_one_sector_fails_that_request_only() {
    let Some((sim, file, lo)) = tests::loop_disk_with("eio", 8, Some(0x3c)) else {
        return;
    };
    // Cut the last 4 KiB off the backing file: the loop device still says 8 MiB.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len((8 << 20) - 4096)
        .unwrap();
    let spec = VbdSpec::disk(0, GUEST, DEVID, lo.device.to_str().unwrap());
    sim.create_vbd(&spec);
    let mut backend = Backend::serve(&sim, &spec, &["--open-params"]);
    let mut front = sim.front(FrontOptions::default());
    let info = front.connect().unwrap();
    assert_eq!(info.sectors, 8 * 2048);
    let last = info.sectors - 8;
    for _ in 0..2 {
        let c = front.read(0, last, 8).unwrap();
        assert_eq!(
            c.status(),
            Some(Status::Error),
            "reading past the backing file"
        );
        // The sector before is fine, and so is everything else.
        let c = front.read(1, last - 8, 8).unwrap();
        assert_eq!(c.data, Some(vec![0x3c; 4096]));
    }
    let mut model = DiskModel::zeroed(256, false);
    tests::write_then_read(&mut front, &mut model, 256, 16, 8);
    remove(&sim, &spec, &mut backend, &mut front);
    let c = backend.stats().unwrap().counters;
    assert!(c.rd_req >= 4);
}

/// A tmpfs mounted for the test, unmounted on drop.
struct Tmpfs(std::path::PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn enospc_fails_the_write_and_the_backend_carries_on() {
    if !tests::root_or_skip("mounting a tmpfs") {
        return;
    }
    let sim = Sim::new("enospc");
    let mnt = sim.tmp().join("small");
    std::fs::create_dir_all(&mnt).unwrap();
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(&mnt)
        .status()
        .unwrap();
    assert!(ok.success(), "mount tmpfs");
    let _guard = Tmpfs(mnt.clone());
    let image = mnt.join("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let spec = VbdSpec::disk(0, GUEST, DEVID, image.to_str().unwrap());
    sim.create_vbd(&spec);
    let mut backend = Backend::serve(&sim, &spec, &["--open-params"]);
    let mut front = sim.front(FrontOptions::default());
    front.connect().unwrap();
    let data = vec![0x99u8; 65536];
    let mut failed = None;
    for i in 0..64u64 {
        let c = front.write(0, i * 128, &data).unwrap();
        if !c.is_ok() {
            assert_eq!(c.status(), Some(Status::Error));
            failed = Some(i);
            break;
        }
    }
    let failed = failed.expect("a 1 MiB tmpfs cannot hold 4 MiB");
    assert!(failed > 0);
    // What was written before is intact, and the backend still answers.
    let c = front.read(1, 0, 128).unwrap();
    assert_eq!(c.data, Some(data));
    assert!(front.execute(0, IoOp::Flush).unwrap().status().is_some());
    remove(&sim, &spec, &mut backend, &mut front);
}
