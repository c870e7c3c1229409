//! When a queue wakes up and when it wakes the frontend: the event channel in both
//! directions, late EOI against event storms, busy polling, and notify suppression.
//!
//! - Events in, with no system call of their own: the port's fd is polled by an SQE in the
//!   queue's io_uring ([`Wake::arm`]). A delivery masks the port until the pass is done
//!   ([`Wake::after_pass`]); then [`Wake::unmask`] queues, for the `io_uring_enter` that
//!   also waits, one linked chain: the unmask (on the Linux device a `WRITEV` of the port;
//!   the simulation's unmask is a store in shared memory, made at once), the read of the
//!   delivery that woke the queue (4 bytes: exactly one delivery, so a second one keeps the
//!   fd readable and a request that arrived after the ring's final check still wakes the
//!   queue), and the next poll. Where the kernel can, the unmask and read post no CQE when
//!   they succeed: the wait then ends for the disk's completion or the next event, not at
//!   once for them (at depth 1 that saves an `io_uring_enter` per request). A read is armed only behind a poll that saw a delivery:
//!   the evtchn device has no `FMODE_NOWAIT`, so a read of an empty, non-blocking fd would
//!   just fail (or be punted to io-wq on older kernels), and the simulation's socket would
//!   wait in it instead of in the poll.
//! - Event storms (XSA-332): a wake-up that finds no request is spurious; after the second in
//!   a row the port is unmasked only after a delay that doubles from 1 ms up to 1 s, as
//!   Linux's late-EOI handling does.
//! - Polling (`--poll-us`): before sleeping, the queue spins watching for completions and
//!   new requests with the frontend's events left off, for a window that adapts to how long
//!   its waits are ([`BusyPoll`]).
//! - Notifications out: responses are pushed once per pass, with one notification only if the
//!   frontend's `rsp_event` asks for it (the ring's `RING_PUSH_RESPONSES_AND_CHECK_NOTIFY`).

use std::time::{Duration, Instant};

use ring::{BackRing, RingError};
use rustix::io::Errno;
use shmem::SharedMem;
use xen::{EventChannel, EvtchnError, Port};

use super::busy_poll::BusyPoll;
use super::error::QueueError;
use super::stats::{Count, Meter};
use super::uring::{Control, EvtchnOp, Uring};

/// Busy polling reads the clock once in this many turns (a turn reads two cache lines).
const SPINS_PER_CLOCK_READ: u32 = 64;

/// The longest late-EOI delay (Linux: `HZ` jiffies).
const MAX_EOI_DELAY: Duration = Duration::from_secs(1);

/// What busy polling found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Polled {
    /// Work came (a completion or a request): go round again.
    Work,
    /// Nothing came; the frontend was asked for an event (if requests are taken): sleep.
    Idle,
    /// The ring broke while polling.
    Broken(RingError),
}

/// The wake-up policy of one queue, and its event channel.
#[derive(Debug)]
pub(super) struct Wake {
    evtchn: Box<dyn EventChannel>,
    port: Port,
    ports: Vec<Port>,
    poll: BusyPoll,
    /// An event came this pass: the port is masked until [`Wake::after_pass`] decides.
    eoi_due: bool,
    /// Requests consumed since the port was last unmasked: an event is spurious only if none
    /// were (requests consumed by a pass that a completion woke count too, or a busy queue
    /// would see its own events as spurious).
    consumed_since_unmask: usize,
    /// Spurious wake-ups in a row.
    spurious: u32,
}

/// The late-EOI delay after `spurious` spurious wake-ups in a row: none for the first.
fn eoi_delay(spurious: u32) -> Option<Duration> {
    if spurious < 2 {
        return None;
    }
    let shift = (spurious - 2).min(20);
    Some(Duration::from_millis(1u64 << shift).min(MAX_EOI_DELAY))
}

impl Wake {
    /// `evtchn` with `port` bound; busy-poll up to `poll` before sleeping (zero: never).
    pub(super) fn new(evtchn: Box<dyn EventChannel>, port: Port, poll: Duration) -> Self {
        Self {
            evtchn,
            port,
            ports: Vec::with_capacity(16),
            poll: BusyPoll::new(poll),
            eoi_due: false,
            consumed_since_unmask: 0,
            spurious: 0,
        }
    }

    /// The event channel, to register its fd with the io_uring.
    pub(super) fn evtchn(&self) -> &dyn EventChannel {
        &*self.evtchn
    }

    /// Whether the queue busy-polls before its next sleep, instead of asking for events
    /// while it has work.
    pub(super) fn polls(&self) -> bool {
        !self.poll.window().is_zero()
    }

    /// Whether the queue times its waits to adapt its polling (`--poll-us` not zero).
    pub(super) fn adapts(&self) -> bool {
        self.poll.adapts()
    }

    /// A blocking wait ended `waited` after its poll began: polling adapts (see
    /// [`BusyPoll`]).
    pub(super) fn waited(&mut self, waited: Duration) {
        self.poll.waited(waited);
    }

    /// Arms the poll of the port's fd (with nothing delivered to read first).
    ///
    /// # Errors
    /// When the SQE cannot be queued.
    pub(super) fn arm(&mut self, uring: &mut Uring) -> Result<(), QueueError> {
        uring
            .evtchn_poll(self.evtchn.as_fd())
            .map_err(|source| QueueError::Arm {
                what: "event poll",
                source,
            })
    }

    /// An operation on the port's fd completed; `true` when it is the poll seeing a delivery
    /// (then call [`Wake::event`]).
    ///
    /// # Errors
    /// When the event channel fails (a read, an unmask, the poll itself).
    pub(super) fn completed(
        &mut self,
        uring: &mut Uring,
        op: EvtchnOp,
        result: Result<usize, Errno>,
    ) -> Result<bool, QueueError> {
        let io = |e: Errno| EvtchnError::Io(e.into());
        match (op, result) {
            (EvtchnOp::Poll, Ok(_)) => Ok(true),
            // The read linked before it failed (and the device dealt with it): poll again.
            (EvtchnOp::Poll, Err(Errno::CANCELED)) => self.arm(uring).map(|()| false),
            (EvtchnOp::Poll, Err(e)) => Err(QueueError::Pending(io(e))),
            (EvtchnOp::Read(bytes), result) => {
                // Only the device knows what the bytes mean (it filters them to its ports);
                // the queue needs no port: a wake-up means "look at the ring". So a read
                // whose success posts no CQE loses nothing; a failure still comes here (an
                // overflowed Linux device is reset).
                self.ports.clear();
                let read = result.map(|n| bytes.get(..n).unwrap_or(&bytes));
                self.evtchn
                    .read_done(read, &mut self.ports)
                    .map_err(QueueError::Pending)?;
                Ok(false)
            }
            (EvtchnOp::Unmask, Ok(_)) => Ok(false),
            (EvtchnOp::Unmask, Err(e)) => Err(QueueError::Unmask(io(e))),
        }
    }

    /// The port fired: it stays masked until the pass ends.
    pub(super) fn event(&mut self, meter: &dyn Meter) {
        meter.count(Count::Event);
        self.eoi_due = true;
    }

    /// Counts `n` requests taken off the ring.
    pub(super) fn consumed(&mut self, n: usize) {
        self.consumed_since_unmask += n;
    }

    /// Linux's late EOI, at the end of a pass that an event woke: unmask now if the wake-up
    /// found work (or the queue is `full`: it could take none), else count it as spurious
    /// and, from the second in a row, unmask only after a doubling delay.
    ///
    /// # Errors
    /// When unmasking or arming fails.
    pub(super) fn after_pass(
        &mut self,
        uring: &mut Uring,
        full: bool,
        meter: &dyn Meter,
    ) -> Result<(), QueueError> {
        if !std::mem::take(&mut self.eoi_due) {
            return Ok(());
        }
        if self.consumed_since_unmask > 0 || full {
            self.spurious = 0;
            return self.unmask(uring);
        }
        meter.count(Count::Spurious);
        self.spurious = self.spurious.saturating_add(1);
        match eoi_delay(self.spurious) {
            None => self.unmask(uring),
            Some(delay) => {
                uring
                    .timer(Control::EoiTimer, delay)
                    .map_err(|source| QueueError::Arm {
                        what: "EOI timer",
                        source,
                    })
            }
        }
    }

    /// Unmasks the port, reads the delivery that woke the queue and re-arms the poll (at the
    /// end of a pass, or when the EOI delay expires), all queued for the next
    /// `io_uring_enter` but the simulation's unmask (see the module's documentation).
    ///
    /// # Errors
    /// When unmasking or arming fails.
    pub(super) fn unmask(&mut self, uring: &mut Uring) -> Result<(), QueueError> {
        self.consumed_since_unmask = 0;
        let write = if self.evtchn.unmask_is_write() {
            Some(self.port)
        } else {
            self.evtchn.unmask(self.port).map_err(QueueError::Unmask)?;
            None
        };
        uring
            .evtchn_rearm(self.evtchn.as_fd(), write)
            .map_err(|source| QueueError::Arm {
                what: "unmask, read and poll of the event channel",
                source,
            })
    }

    /// Publishes the responses written and notifies the frontend if it asked.
    ///
    /// # Errors
    /// When the ring cannot be written.
    pub(super) fn push(
        &mut self,
        back: &mut BackRing,
        mem: &SharedMem<'_>,
        meter: &dyn Meter,
        queue: &str,
    ) -> Result<(), QueueError> {
        if back.push_responses(mem).map_err(QueueError::Push)? {
            meter.count(Count::Notify);
            // The frontend may have closed its end (a reboot in progress): as Linux's
            // notify_remote_via_irq, carry on; the control plane sees the state change.
            if let Err(e) = self.evtchn.notify(self.port) {
                tracing::debug!(queue = %queue, "notify: {e}");
            }
        }
        Ok(())
    }

    /// Notifies the frontend whatever `rsp_event` says: a queue resumed after a crash cannot
    /// know whether the dead process's last notification was sent (a spurious one is
    /// harmless).
    pub(super) fn notify_frontend(&self, queue: &str) {
        if let Err(e) = self.evtchn.notify(self.port) {
            tracing::debug!(queue = %queue, "notify: {e}");
        }
    }

    /// Busy-polls for completions and new requests (when `takes_requests`) before the queue
    /// sleeps, until the window has passed `since` (the pass's start); when nothing came, asks for an event at the next request
    /// (`RING_FINAL_CHECK_FOR_REQUESTS`) so that sleeping misses nothing.
    ///
    /// # Errors
    /// When submitting what is queued fails.
    pub(super) fn poll_for_work(
        &self,
        since: Instant,
        uring: &mut Uring,
        back: &mut BackRing,
        mem: &SharedMem<'_>,
        takes_requests: bool,
        meter: &dyn Meter,
    ) -> Result<Polled, QueueError> {
        if uring.submit_queued().map_err(QueueError::Enter)? {
            meter.count(Count::UringEnter);
        }
        let deadline = since + self.poll.window();
        for spin in 1u32.. {
            if uring.has_completions() {
                return Ok(Polled::Work);
            }
            if takes_requests {
                match back.has_unconsumed_requests(mem) {
                    Ok(false) => {}
                    Ok(true) => return Ok(Polled::Work),
                    Err(e) => return Ok(Polled::Broken(e)),
                }
            }
            // The clock is read once in SPINS_PER_CLOCK_READ turns: in a PV dom0 each read
            // is a system call through Xen.
            if spin % SPINS_PER_CLOCK_READ == 0 && Instant::now() >= deadline {
                break;
            }
            std::hint::spin_loop();
        }
        if !takes_requests {
            // Only a completion can make progress now, and it wakes the sleeper.
            return Ok(Polled::Idle);
        }
        match back.final_check_for_requests(mem) {
            Ok(true) => Ok(Polled::Work),
            Ok(false) => Ok(Polled::Idle),
            Err(e) => Ok(Polled::Broken(e)),
        }
    }

    /// Unbinds the port (at the end of the queue).
    pub(super) fn unbind(&mut self, queue: &str) {
        if let Err(e) = self.evtchn.unbind(self.port) {
            tracing::debug!(queue = %queue, "unbinding the event channel: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn late_eoi_delay_doubles_from_the_second_spurious_wake_up_up_to_a_second() {
        assert_eq!(eoi_delay(0), None);
        assert_eq!(eoi_delay(1), None);
        assert_eq!(eoi_delay(2), Some(Duration::from_millis(1)));
        assert_eq!(eoi_delay(3), Some(Duration::from_millis(2)));
        assert_eq!(eoi_delay(11), Some(Duration::from_millis(512)));
        assert_eq!(eoi_delay(12), Some(MAX_EOI_DELAY));
        assert_eq!(eoi_delay(u32::MAX), Some(MAX_EOI_DELAY));
    }
}
