//! Fault points: `BLKBACKD_FAULT=<step>:<n>` makes `serve` abort the `n`th time a request's
//! life reaches `step`, so that the tests can kill it between every pair of the steps the
//! in-flight log's consistency rests on ([`crate::inflight`]), which a random SIGKILL hits
//! only by chance.
//!
//! Always compiled in, inert when unset: the binary tested is the one shipped, and a point
//! costs one load and one branch. The environment is read once, at startup
//! ([`arm_from_env`]); `supervise` removes it from a backend that takes over, so a fault
//! fires once per disk instead of in every replacement.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// The environment variable.
pub const ENV: &str = "BLKBACKD_FAULT";

/// The steps of a request's life, in order; a point is reached just after its step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The slot was copied off the ring; nothing is logged yet.
    Consumed,
    /// The log entry is written (in flight); the log's consumer index has not moved.
    Logged,
    /// The log's consumer index moved past it; the request is not started.
    Accepted,
    /// The queue entered the kernel to submit its I/O and wait for completions (once per
    /// pass), before it looked at what completed.
    Submitted,
    /// The I/O completed; no response is written.
    Completed,
    /// The response is in the ring, not published; the log entry still says in flight.
    Written,
    /// The log entry says answered; the response is not published.
    Answered,
    /// Responses are published to the guest; the log has not recorded it.
    Published,
    /// The log recorded them published and freed their entries.
    Cleared,
}

impl Step {
    /// Every step, in order.
    pub const ALL: [Step; 9] = [
        Step::Consumed,
        Step::Logged,
        Step::Accepted,
        Step::Submitted,
        Step::Completed,
        Step::Written,
        Step::Answered,
        Step::Published,
        Step::Cleared,
    ];

    /// Its name in [`ENV`].
    pub fn name(self) -> &'static str {
        match self {
            Step::Consumed => "consumed",
            Step::Logged => "logged",
            Step::Accepted => "accepted",
            Step::Submitted => "submitted",
            Step::Completed => "completed",
            Step::Written => "written",
            Step::Answered => "answered",
            Step::Published => "published",
            Step::Cleared => "cleared",
        }
    }
}

#[derive(Debug)]
struct Armed {
    step: Step,
    left: AtomicU64,
}

static ARMED: OnceLock<Armed> = OnceLock::new();

/// Parses `<step>:<n>` (`n` from 1).
///
/// # Errors
/// A message naming what is wrong, and what is expected.
pub fn parse(value: &str) -> Result<(Step, u64), String> {
    let names = || Step::ALL.map(Step::name).join(", ");
    let (name, n) = value
        .split_once(':')
        .ok_or_else(|| format!("{value:?}: expected <step>:<n>"))?;
    let step = Step::ALL
        .into_iter()
        .find(|s| s.name() == name)
        .ok_or_else(|| format!("{name:?} is not a step (expected one of {})", names()))?;
    let n = n
        .parse::<u64>()
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("{n:?} is not a count from 1"))?;
    Ok((step, n))
}

/// Arms the fault [`ENV`] names, if it is set.
///
/// # Errors
/// When its value is not `<step>:<n>`.
pub fn arm_from_env() -> Result<(), String> {
    let Some(value) = std::env::var_os(ENV) else {
        return Ok(());
    };
    let value = value.to_str().ok_or_else(|| format!("{ENV}: not UTF-8"))?;
    let (step, n) = parse(value).map_err(|e| format!("{ENV}: {e}"))?;
    tracing::warn!(
        "{ENV}: aborting the {n}th time a request is {}",
        step.name()
    );
    let _ = ARMED.set(Armed {
        step,
        left: AtomicU64::new(n),
    });
    Ok(())
}

/// Aborts the process if this is the armed step's `n`th time.
#[inline]
pub fn point(step: Step) {
    if let Some(armed) = ARMED.get() {
        if armed.step == step && armed.left.fetch_sub(1, Ordering::Relaxed) == 1 {
            std::process::abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_steps_and_refuses_the_rest() {
        assert_eq!(parse("published:3"), Ok((Step::Published, 3)));
        for s in Step::ALL {
            assert_eq!(parse(&format!("{}:1", s.name())), Ok((s, 1)));
        }
        for bad in [
            "published",
            "published:0",
            "published:-1",
            "nope:1",
            ":1",
            "cleared:x",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        assert!(parse("nope:1").unwrap_err().contains("consumed, logged"));
    }
}
