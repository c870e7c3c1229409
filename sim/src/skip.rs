//! Tests that need root (loop devices, device-mapper, switching users) or real Xen return
//! early without it; [`root_or_skip`] and [`report_skip`] make such a skip visible in the test
//! output. Test support only: no production crate uses them.

use std::io::Write as _;

/// Writes `SKIPPED (<reason>): <test>` to stderr, where `<test>` is the running test's name
/// (the name libtest gives the test's thread). It goes to the process's stderr directly, not
/// through `eprintln!`, which libtest captures and shows only for failing tests, so the line
/// shows in every `cargo test` run.
pub fn report_skip(reason: &str) {
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("<unnamed test>");
    // One write, so that the line is not interleaved with libtest's own output.
    let line = format!("SKIPPED ({reason}): {test}\n");
    let _ = std::io::stderr().write_all(line.as_bytes());
}

/// Whether this process runs as root. When it does not, reports the calling test as skipped
/// ([`report_skip`]): `SKIPPED (needs root: <why>): <test>`, so that a test that returns early
/// does not pass silently.
///
/// ```
/// fn some_test() {
///     if !sim::skip::root_or_skip("loop devices") {
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
    report_skip(&format!("needs root: {why}"));
    false
}
