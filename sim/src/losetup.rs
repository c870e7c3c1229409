//! Loop devices for tests, through util-linux's `losetup` (they need root: check with
//! [`crate::skip::root_or_skip`] first). A failing `losetup` fails the test.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Runs `losetup` with `args` and returns what it printed.
///
/// # Panics
/// When `losetup` cannot be run or fails (its stderr is in the message).
pub fn losetup<I: AsRef<OsStr>>(args: impl IntoIterator<Item = I>) -> String {
    let mut cmd = Command::new("losetup");
    cmd.args(args);
    let out = cmd.output().expect("running losetup");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Attaches `file` to a free loop device with the extra `options` (`--sector-size 4096`) and
/// returns the device's path.
///
/// # Panics
/// As [`losetup`].
pub fn attach(file: &Path, options: &[&str]) -> PathBuf {
    let mut args: Vec<&OsStr> = vec!["--find".as_ref(), "--show".as_ref()];
    args.extend(options.iter().map(OsStr::new));
    args.push(file.as_os_str());
    PathBuf::from(losetup(args))
}

/// Detaches `device`, as a clean-up: a failure is ignored.
pub fn detach(device: &Path) {
    let _ = Command::new("losetup").arg("-d").arg(device).status();
}
