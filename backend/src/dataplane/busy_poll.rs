//! How long a queue busy-polls before it sleeps: a window that adapts as KVM's halt polling
//! does (`grow_halt_poll_ns`, `shrink_halt_poll_ns`).
//!
//! A queue polls only while its waits are short. After a blocking wait, the time from the
//! start of the poll to the wake-up decides: a wait longer than the bound looks like
//! idleness, which polling only burns CPU on, so the window halves (below [`START`] it is
//! zero); a shorter one is work that a long enough poll would have caught without a wake-up,
//! so the window doubles (from [`START`]) up to the bound. Halving rather than dropping to
//! zero keeps a busy queue polling through the odd long wait (a frontend preempted for a
//! moment); an idle one stops after a few. An idle disk thus costs no CPU, a busy one spins,
//! and a disk busy again after a pause polls after a few short waits.

use std::time::Duration;

/// The first window after a short wait (KVM: `halt_poll_ns_grow_start`, 10 µs).
const START: Duration = Duration::from_micros(10);

/// The busy-poll window of one queue.
#[derive(Debug, Clone, Copy)]
pub(super) struct BusyPoll {
    bound: Duration,
    window: Duration,
}

impl BusyPoll {
    /// A window that grows up to `bound` (zero: never poll).
    pub(super) fn new(bound: Duration) -> Self {
        Self {
            bound,
            window: Duration::ZERO,
        }
    }

    /// How long to poll before the next sleep (zero: sleep at once).
    pub(super) fn window(&self) -> Duration {
        self.window
    }

    /// Whether the window adapts at all (a bound was given).
    pub(super) fn adapts(&self) -> bool {
        !self.bound.is_zero()
    }

    /// A blocking wait ended `waited` after its poll began (its sleep, if it did not poll).
    pub(super) fn waited(&mut self, waited: Duration) {
        if waited > self.bound {
            self.window /= 2;
            if self.window < START {
                self.window = Duration::ZERO;
            }
        } else if self.window < self.bound {
            self.window = (self.window * 2).max(START).min(self.bound);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: Duration = Duration::from_micros(1);

    #[test]
    fn short_waits_grow_the_window_from_ten_microseconds_up_to_the_bound() {
        let mut p = BusyPoll::new(50 * US);
        assert_eq!(p.window(), Duration::ZERO);
        let mut seen = Vec::new();
        for _ in 0..5 {
            p.waited(30 * US);
            seen.push(p.window());
        }
        assert_eq!(seen, [10 * US, 20 * US, 40 * US, 50 * US, 50 * US]);
        p.waited(50 * US);
        assert_eq!(
            p.window(),
            50 * US,
            "a wait of exactly the bound is still short"
        );
    }

    #[test]
    fn waits_past_the_bound_halve_the_window_until_polling_stops() {
        let mut p = BusyPoll::new(80 * US);
        for _ in 0..4 {
            p.waited(US);
        }
        assert_eq!(p.window(), 80 * US);
        p.waited(81 * US);
        assert_eq!(p.window(), 40 * US);
        p.waited(Duration::from_secs(1));
        assert_eq!(p.window(), 20 * US);
        p.waited(Duration::from_secs(1));
        assert_eq!(p.window(), 10 * US);
        p.waited(Duration::from_secs(1));
        assert_eq!(p.window(), Duration::ZERO, "below the start: no polling");
        p.waited(Duration::from_secs(1));
        assert_eq!(p.window(), Duration::ZERO);
    }

    #[test]
    fn a_zero_bound_never_polls() {
        let mut p = BusyPoll::new(Duration::ZERO);
        assert!(!p.adapts());
        p.waited(Duration::ZERO);
        assert_eq!(p.window(), Duration::ZERO);
    }

    #[test]
    fn a_bound_below_the_start_is_the_window() {
        let mut p = BusyPoll::new(3 * US);
        p.waited(US);
        assert_eq!(p.window(), 3 * US);
    }
}
