//! Placeholder until written.
use std::path::PathBuf;
/// Which platform to use.
#[derive(Debug, Clone)]
pub enum PlatformConfig {
    /// Real Xen.
    Xen,
    /// The simulation rooted at a directory.
    Sim(PathBuf),
}
