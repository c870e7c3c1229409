//! The command line: the demo works in one command; bad arguments get one clear line.

use std::process::Command;

use tests::blkbackd;

#[test]
fn demo_runs_and_verifies() {
    let out = Command::new(blkbackd())
        .args(["demo", "--size-mib", "8", "--random-ops", "300"])
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("verified:"), "{stdout}");
    assert!(stdout.contains("backend exited cleanly"), "{stdout}");
    assert!(
        out.stderr.is_empty(),
        "quiet by default: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `blkbackd` with `command_line` (split at white space) and checks that it fails with
/// one line on stderr that names `needle`.
fn one_line_error(command_line: &str, needle: &str) {
    one_line_error_with(&[], command_line, needle);
}

/// [`one_line_error`] with `env` set.
fn one_line_error_with(env: &[(&str, &str)], command_line: &str, needle: &str) {
    let args: Vec<&str> = command_line.split_whitespace().collect();
    let out = Command::new(blkbackd())
        .args(&args)
        .env_remove("BLKBACK_PLATFORM")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(!out.status.success(), "{args:?} succeeded");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: {stderr}");
    assert!(stderr.starts_with("blkbackd: "), "{stderr}");
    assert!(stderr.contains(needle), "{args:?}: {stderr}");
}

#[test]
fn bad_arguments_get_one_clear_line() {
    one_line_error(
        "serve --backend-path /local/domain/0/backend/vif/1/0",
        "is not /local/domain/",
    );
    one_line_error(
        "serve --domid 1 --devid 51712 --platform bogus",
        "bad --platform",
    );
    one_line_error(
        "serve --domid 1 --devid 51712 --max-ring-page-order 5",
        "max-ring-page-order",
    );
    one_line_error("serve --domid 1", "devid");
    one_line_error(
        "serve --domid 1 --devid 2 --device-fd 99",
        "not an open file descriptor",
    );
    one_line_error(
        "stats --stats-file /nonexistent/x.stats",
        "reading /nonexistent/x.stats",
    );
    one_line_error("frobnicate", "frobnicate");
    for (fault, needle) in [
        (
            "nowhere:1",
            "\"nowhere\" is not a step (expected one of consumed, logged",
        ),
        ("published:0", "\"0\" is not a count from 1"),
        ("published", "\"published\": expected <step>:<n>"),
    ] {
        one_line_error_with(
            &[(backend::fault::ENV, fault)],
            "serve --domid 1 --devid 51712",
            &format!("BLKBACKD_FAULT: {needle}"),
        );
    }
}

#[test]
fn help_explains_the_options() {
    let out = Command::new(blkbackd())
        .args(["serve", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for opt in [
        "--backend-path",
        "--platform",
        "--device-fd",
        "--handoff-socket",
        "--open-params",
        "--grant-mode",
        "--stats-file",
    ] {
        assert!(help.contains(opt), "{opt} missing from serve --help");
    }
}
