//! A directory for one simulation (or one test's files), unique per process and call, removed
//! when dropped: every test, bench, the demo and replay put their sim files in one.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

/// A fresh directory under a base directory, removed on drop unless kept.
#[derive(Debug)]
pub struct ScratchDir {
    path: PathBuf,
    keep: bool,
}

impl ScratchDir {
    /// Creates `<base>/<tag>-<pid>-<n>` (`base` defaults to the temp dir), removing whatever
    /// a crashed earlier run of the same pid left there.
    ///
    /// # Errors
    /// When the directory cannot be created.
    pub fn new_in(base: Option<&Path>, tag: &str) -> io::Result<Self> {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let base = base.map_or_else(std::env::temp_dir, Path::to_owned);
        let path = base.join(format!("{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path)
            .map_err(|e| io::Error::new(e.kind(), format!("creating {}: {e}", path.display())))?;
        Ok(Self { path, keep: false })
    }

    /// As [`ScratchDir::new_in`], under the temp dir.
    ///
    /// # Errors
    /// When the directory cannot be created.
    pub fn new(tag: &str) -> io::Result<Self> {
        Self::new_in(None, tag)
    }

    /// Leaves the directory in place when dropped (to look at it afterwards).
    pub fn keep(&mut self) {
        self.keep = true;
    }

    /// The path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}
