//! Tests that need root (loop devices, device-mapper, switching users) return early without
//! it; [`root_or_skip`] makes such a skip visible in the test output.

/// Whether this process runs as root. When it does not, writes
/// `SKIPPED (needs root): <test> (<why>)` to stderr, where `<test>` is the running test's name
/// (the name libtest gives the test's thread), so that a test that returns early does not pass
/// silently.
///
/// ```
/// fn some_test() {
///     if !blkdev::root_or_skip("loop devices") {
///         return;
///     }
///     // ... attach a loop device ...
/// }
/// ```
#[must_use]
pub fn root_or_skip(why: &str) -> bool {
    if rustix::process::geteuid().is_root() {
        return true;
    }
    let thread = std::thread::current();
    eprintln!(
        "SKIPPED (needs root): {} ({why})",
        thread.name().unwrap_or("<unnamed test>")
    );
    false
}
