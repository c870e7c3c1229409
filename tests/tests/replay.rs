//! The replay corpus (`tests/traces/`, see docs/trace-format.md): every trace is replayed
//! against the real data plane on the simulated platform and must match response for
//! response. Plus: a replay reports the first difference precisely, and a live session
//! recorded by the real `blkbackd` (`demo --record`) replays cleanly.

use std::path::{Path, PathBuf};
use std::process::Command;

use backend::replay::format::{from_hex, to_hex, VERSION};
use blkbackd::replay::{replay_file, replay_text, ReplayError, ReplayOptions};

fn traces() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("traces");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("tests/traces")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "trace"))
        .collect();
    v.sort();
    v
}

#[test]
fn corpus_replays_as_recorded() {
    let traces = traces();
    assert!(traces.len() >= 15, "the corpus is missing: {traces:?}");
    let mut failures = Vec::new();
    for t in &traces {
        match replay_file(t, &ReplayOptions::default()) {
            Ok(s) => assert!(s.responses > 0, "{}: no response checked", t.display()),
            Err(e) => failures.push(format!("{}: {e}", t.display())),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_hostile_trace_says_what_the_backend_must_do() {
    for t in traces() {
        let text = std::fs::read_to_string(&t).unwrap();
        let first = text.lines().next().unwrap_or_default();
        assert!(
            first.starts_with(&format!(r#"{{"t":"trace","version":{VERSION},"about":""#))
                && first.len() > 60,
            "{}: no description in its header",
            t.display()
        );
    }
}

fn corpus_text(name: &str) -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("traces")
            .join(name),
    )
    .unwrap()
}

/// Replaces the first line containing `needle` by `f(line)`; returns its number.
fn edit(text: &str, needle: &str, f: impl Fn(&str) -> String) -> (String, usize) {
    let mut at = 0;
    let out: Vec<String> = text
        .lines()
        .enumerate()
        .map(|(i, l)| {
            if at == 0 && l.contains(needle) {
                at = i + 1;
                f(l)
            } else {
                l.to_owned()
            }
        })
        .collect();
    assert!(at > 0, "{needle} not found");
    (out.join("\n") + "\n", at)
}

fn differs(text: &str) -> (usize, String) {
    match replay_text(text, &ReplayOptions::default()) {
        Err(ReplayError::Differs { line, msg }) => (line, msg),
        other => panic!("expected a difference, got {other:?}"),
    }
}

#[test]
fn a_wrong_status_is_reported_at_its_line() {
    // unknown operation 4 is BLKIF_RSP_EOPNOTSUPP (-2); claim it was okay.
    let (text, line) = edit(
        &corpus_text("hostile-unknown-ops.trace"),
        r#""op":4,"status":-2"#,
        |l| l.replace(r#""status":-2"#, r#""status":0"#),
    );
    let (at, msg) = differs(&text);
    assert_eq!(at, line);
    assert!(
        msg.contains(
            "expected operation 4 status 0 (okay), got operation 4 status -2 (not supported)"
        ),
        "{msg}"
    );
}

/// `text` with byte `at` of the first recorded read's data flipped.
fn flip_read_byte(text: &str, at: usize) -> (String, usize) {
    edit(text, r#""data":""#, |l| {
        let start = l.find(r#""data":""#).unwrap() + 8;
        let end = start + l[start..].find('"').unwrap();
        let mut data = from_hex(&l[start..end]).unwrap();
        if data.len() <= at {
            data.resize(at + 1, 0);
        }
        data[at] ^= 0xff;
        format!("{}{}{}", &l[..start], to_hex(&data), &l[end..])
    })
}

#[test]
fn a_wrong_byte_is_reported_at_its_line_with_its_request() {
    // The first read of the trace is one sector.
    for at in [0, 511] {
        let (text, line) = flip_read_byte(&corpus_text("boot.trace"), at);
        let (got, msg) = differs(&text);
        assert_eq!(got, line);
        assert!(
            msg.contains(&format!("first difference at byte {at} (segment 0 (gref "))
                && msg.contains("): read 0x")
                && msg.contains("at sector "),
            "{msg}"
        );
    }
}

#[test]
fn a_wrong_checksum_is_reported_at_its_line() {
    let (text, line) = edit(&corpus_text("indirect.trace"), r#""sum":""#, |l| {
        let i = l.find(r#""sum":""#).unwrap() + 7;
        format!("{}0000000000000000{}", &l[..i], &l[i + 16..])
    });
    let (at, msg) = differs(&text);
    assert_eq!(at, line);
    assert!(msg.contains("data read back has checksum"), "{msg}");
}

#[test]
fn a_missing_and_an_unexpected_response_are_reported() {
    // Expect a response to a request never sent.
    let text = corpus_text("hostile-duplicate-ids.trace")
        + r#"{"t":"rsp","q":0,"id":999,"op":0,"status":0}"#
        + "\n";
    let opts = ReplayOptions {
        timeout: std::time::Duration::from_secs(2),
        ..ReplayOptions::default()
    };
    match replay_text(&text, &opts) {
        Err(ReplayError::Differs { msg, .. }) => {
            assert!(msg.contains("no response to request 999"), "{msg}")
        }
        other => panic!("{other:?}"),
    }
    // Drop the last expected response: it arrives unexpected.
    let full = corpus_text("hostile-duplicate-ids.trace");
    let lines: Vec<&str> = full.lines().collect();
    let last = lines
        .iter()
        .rposition(|l| l.contains(r#""t":"rsp""#))
        .unwrap();
    let text: String = lines
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != last)
        .map(|(_, l)| format!("{l}\n"))
        .collect();
    let (at, msg) = differs(&text);
    assert_eq!(at, 0, "reported at the end");
    assert!(msg.contains("unexpected response"), "{msg}");
}

#[test]
fn a_ring_that_should_halt_but_does_not_is_reported() {
    // The bogus req_prod made valid: the queue runs on instead of halting.
    let (text, line) = edit(
        &corpus_text("hostile-bogus-req-prod.trace"),
        r#""t":"req_prod""#,
        |_| r#"{"t":"note","text":"no bogus req_prod"}"#.to_owned(),
    );
    let opts = ReplayOptions {
        timeout: std::time::Duration::from_millis(300),
        ..ReplayOptions::default()
    };
    match replay_text(&text, &opts) {
        Err(ReplayError::Differs { line: at, msg }) => {
            assert_eq!(at, line + 2, "at the exit line");
            assert!(msg.contains("expected to stop by itself"), "{msg}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn invalid_traces_are_refused_with_their_line() {
    let bad = "{\"t\":\"trace\",\"version\":1}\n{\"t\":\"slot\",\"q\":0,\"hex\":\"00\"}\n";
    match replay_text(bad, &ReplayOptions::default()) {
        Err(ReplayError::Invalid { line: 2, msg }) => assert!(msg.contains("never started")),
        other => panic!("{other:?}"),
    }
    match replay_text("{\"t\":\"bogus\"}\n", &ReplayOptions::default()) {
        Err(ReplayError::Invalid { line: 1, .. }) => {}
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_live_session_recorded_by_blkbackd_replays() {
    let dir = tests::TempDir::new("record");
    let trace = dir.path().join("demo.trace");
    let out = Command::new(tests::blkbackd())
        .args([
            "demo",
            "--size-mib",
            "4",
            "--random-ops",
            "20",
            "--queues",
            "2",
        ])
        .arg("--record")
        .arg(&trace)
        .env_remove("BLKBACK_PLATFORM")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&trace).unwrap();
    for kind in [
        r#""t":"disk""#,
        r#""t":"queue","q":1"#,
        r#""t":"slot""#,
        r#""data":""#,
        r#""t":"exit""#,
    ] {
        assert!(text.contains(kind), "the recording has no {kind}");
    }
    let out = Command::new(tests::blkbackd())
        .arg("replay")
        .arg(&trace)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The same recording with one status changed: exit 1 and the line.
    let (bad, line) = edit(&text, r#""t":"rsp""#, |l| {
        l.replace(r#""status":0"#, r#""status":-1"#)
    });
    let bad_path = dir.path().join("bad.trace");
    std::fs::write(&bad_path, bad).unwrap();
    let out = Command::new(tests::blkbackd())
        .arg("replay")
        .arg(&bad_path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("line {line}: difference")), "{err}");
}

/// The corpus's trace of a real guest's second boot starts from the disk its first boot left.
const SECOND_BOOT: &str = "real-linux-2q-boot2.trace";

#[test]
fn a_next_boot_replays_on_the_disk_the_boot_before_left() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("traces")
        .join(SECOND_BOOT);
    let s = replay_file(&path, &ReplayOptions::default()).unwrap();
    assert!(s.reads_compared >= 32 && !s.reads_skipped, "{s:?}");
    // Without the first boot's disk: refused as text, and a zeroed disk reads differently.
    let text = corpus_text(SECOND_BOOT);
    match replay_text(&text, &ReplayOptions::default()) {
        Err(ReplayError::Invalid { line: 2, msg }) => {
            assert!(msg.contains("starts after another trace"), "{msg}")
        }
        other => panic!("{other:?}"),
    }
    let dir = tests::TempDir::new("replay-chain");
    let zero = dir.path().join("zero.img");
    std::fs::File::create(&zero)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let opts = ReplayOptions {
        image: Some(zero),
        ..Default::default()
    };
    match replay_text(&text, &opts) {
        Err(ReplayError::Differs { msg, .. }) => {
            assert!(msg.contains("first difference at byte"), "{msg}")
        }
        other => panic!("expected a difference on a zeroed disk, got {other:?}"),
    }
}

#[test]
fn a_chain_of_boots_that_loops_or_breaks_is_refused() {
    let dir = tests::TempDir::new("replay-loop");
    let text = corpus_text(SECOND_BOOT);
    let (looped, _) = edit(&text, r#""t":"disk""#, |l| {
        l.replace("real-linux-2q-boot1.trace", "self.trace")
    });
    std::fs::write(dir.path().join("self.trace"), &looped).unwrap();
    match replay_file(&dir.path().join("self.trace"), &ReplayOptions::default()) {
        Err(e) => assert!(e.to_string().contains("more than 16 traces"), "{e}"),
        Ok(s) => panic!("a trace after itself replayed: {s:?}"),
    }
    let (broken, _) = edit(&text, r#""t":"disk""#, |l| {
        l.replace("real-linux-2q-boot1.trace", "missing.trace")
    });
    std::fs::write(dir.path().join("broken.trace"), &broken).unwrap();
    match replay_file(&dir.path().join("broken.trace"), &ReplayOptions::default()) {
        Err(ReplayError::Before { trace, source }) => {
            assert!(trace.ends_with("missing.trace"));
            assert!(matches!(*source, ReplayError::Read { .. }), "{source}");
        }
        other => panic!("{other:?}"),
    }
    let (escaping, _) = edit(&text, r#""t":"disk""#, |l| {
        l.replace("real-linux-2q-boot1.trace", "../etc/x.trace")
    });
    std::fs::write(dir.path().join("escaping.trace"), &escaping).unwrap();
    match replay_file(
        &dir.path().join("escaping.trace"),
        &ReplayOptions::default(),
    ) {
        Err(ReplayError::Invalid { line: 2, msg }) => {
            assert!(msg.contains("not a trace's file name"), "{msg}")
        }
        other => panic!("{other:?}"),
    }
}
