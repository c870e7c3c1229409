//! The in-flight table: one slot per ring entry, each a small state machine saying what its
//! request waits for and owning the buffers it holds while no I/O is in flight.
//!
//! Slots are indexed by our own number, never by the guest's id (which may repeat); there are
//! as many as ring entries, so a frontend can never have more requests outstanding than there
//! are slots, and nothing is allocated per request (a request's segments are stored inline).
//!
//! ```text
//! Free ─take─> Deferred ─┬─> InFlight ──completion──┬─> (answered) Free
//!                 ^      ├─> CopyIn ─copy─> InFlight └─> CopyOut ─copy─> (answered) Free
//!                 └─wait─┘   (any state but InFlight can be answered at once: an error)
//! ```
//! While a slot is `InFlight` the io_uring's entry for it owns what the kernel points at (see
//! `uring`); the region comes back with the completion and moves into `CopyOut`.

use std::time::Instant;

use ring::{FlushKind, Op, Request};

use super::bounce::Region;

/// What a slot's request is waiting for.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) enum State {
    /// No request.
    #[default]
    Free,
    /// Validated, not started: waiting for a barrier's drain or a resource (a bounce region,
    /// retired mappings to be released), or about to start.
    Deferred,
    /// A write whose data must be grant-copied into `region` before `len` bytes of it are
    /// submitted at byte `offset` (then, if `fsync`, a linked `fdatasync`).
    CopyIn {
        /// The bounce region the data goes to.
        region: Region,
        /// Bytes of data.
        len: usize,
        /// Byte offset on the device (converted once, when the request started).
        offset: u64,
        /// A flush or barrier follows the write.
        fsync: bool,
    },
    /// Submitted; the io_uring owns its buffers until the completion.
    InFlight,
    /// A read whose `len` bytes of data, in `region`, must be grant-copied to the guest.
    CopyOut {
        /// The bounce region the device read into.
        region: Region,
        /// Bytes of data.
        len: usize,
    },
}

/// One request slot.
#[derive(Debug)]
pub(super) struct Slot {
    /// What the request waits for.
    pub(super) state: State,
    /// The validated request (meaningless while `Free`).
    pub(super) req: Request,
    /// When it was taken off the ring.
    pub(super) start: Instant,
    /// Already counted as having waited for resources (`oo_req`).
    pub(super) waited: bool,
    /// The request's entry in the in-flight log, if the queue keeps one.
    pub(super) entry: Option<u32>,
}

/// The in-flight table of one queue.
#[derive(Debug)]
pub(super) struct Slots {
    slots: Vec<Slot>,
    free: Vec<usize>,
    /// The one slot waiting to start (requests are started in ring order: while one waits,
    /// no further request is taken off the ring).
    deferred: Option<usize>,
    /// A slot was freed since [`Slots::take_freed`] was last called.
    freed: bool,
}

impl Slots {
    /// `n` free slots.
    pub(super) fn new(n: usize) -> Self {
        let slots = (0..n)
            .map(|_| Slot {
                state: State::Free,
                req: Request {
                    id: 0,
                    operation: 0,
                    op: Op::Flush(FlushKind::Cache),
                },
                start: Instant::now(),
                waited: false,
                entry: None,
            })
            .collect();
        Self {
            slots,
            free: (0..n).rev().collect(),
            deferred: None,
            freed: false,
        }
    }

    /// Slots in use.
    pub(super) fn busy(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Whether every slot is in use.
    pub(super) fn is_full(&self) -> bool {
        self.free.is_empty()
    }

    /// Puts `req`, taken off the ring at `now` and logged in `entry`, into a free slot
    /// (`Deferred`, about to start); `None` when none is free (check [`Slots::is_full`] first
    /// to answer the request).
    pub(super) fn take(&mut self, req: Request, now: Instant, entry: Option<u32>) -> Option<usize> {
        let i = self.free.pop()?;
        let s = &mut self.slots[i];
        s.req = req;
        s.entry = entry;
        s.start = now;
        s.state = State::Deferred;
        s.waited = false;
        Some(i)
    }

    /// Slot `i`.
    pub(super) fn get(&self, i: usize) -> Option<&Slot> {
        self.slots.get(i)
    }

    /// Slot `i`, to change.
    pub(super) fn get_mut(&mut self, i: usize) -> Option<&mut Slot> {
        self.slots.get_mut(i)
    }

    /// Moves slot `i` on to `state` (`InFlight` once submitted, `CopyIn`/`CopyOut` with its
    /// region).
    pub(super) fn set(&mut self, i: usize, state: State) {
        if let Some(s) = self.slots.get_mut(i) {
            s.state = state;
        }
    }

    /// Leaves slot `i` `Deferred` as the one waiting to start; `true` when this is the first
    /// time its request waits for a resource (`out_of_resources`), to be counted in `oo_req`.
    pub(super) fn defer(&mut self, i: usize, out_of_resources: bool) -> bool {
        let Some(s) = self.slots.get_mut(i) else {
            return false;
        };
        s.state = State::Deferred;
        self.deferred = Some(i);
        let first = out_of_resources && !s.waited;
        s.waited |= out_of_resources;
        first
    }

    /// Whether a request waits to start.
    pub(super) fn has_deferred(&self) -> bool {
        self.deferred.is_some()
    }

    /// The slot waiting to start, now to be tried again.
    pub(super) fn take_deferred(&mut self) -> Option<usize> {
        self.deferred.take()
    }

    /// Frees slot `i` (its request is answered) and returns what it held: a region to give
    /// back, or nothing. A slot in flight is not freed (its buffers are the kernel's): `None`.
    pub(super) fn release(&mut self, i: usize) -> Option<State> {
        let s = self.slots.get_mut(i)?;
        if matches!(s.state, State::Free | State::InFlight) {
            return None;
        }
        let held = std::mem::take(&mut s.state);
        if self.deferred == Some(i) {
            self.deferred = None;
        }
        self.free.push(i);
        self.freed = true;
        Some(held)
    }

    /// Frees slot `i` after its completion (`InFlight`, its buffers back from the kernel).
    pub(super) fn complete(&mut self, i: usize) -> bool {
        match self.slots.get_mut(i) {
            Some(s) if s.state == State::InFlight => {
                s.state = State::Deferred;
                true
            }
            _ => false,
        }
    }

    /// Whether a slot was freed since the last call.
    pub(super) fn take_freed(&mut self) -> bool {
        std::mem::take(&mut self.freed)
    }

    /// Fills `out` with the slots in `CopyIn` or `CopyOut`, in slot order.
    pub(super) fn waiting_for_copy(&self, out: &mut Vec<usize>) {
        out.clear();
        out.extend(self.slots.iter().enumerate().filter_map(|(i, s)| {
            matches!(s.state, State::CopyIn { .. } | State::CopyOut { .. }).then_some(i)
        }));
    }

    /// The slots, for a grant-copy batch over several at once.
    pub(super) fn as_mut_slice(&mut self) -> &mut [Slot] {
        &mut self.slots
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::bounce::BouncePool;

    fn req(id: u64) -> Request {
        Request {
            id,
            operation: ring::OP_FLUSH_DISKCACHE,
            op: Op::Flush(FlushKind::Cache),
        }
    }

    #[test]
    fn a_full_table_refuses_and_freed_slots_are_reused() {
        let mut t = Slots::new(2);
        let now = Instant::now();
        let a = t.take(req(1), now, None).unwrap();
        let b = t.take(req(1), now, None).unwrap();
        assert_ne!(a, b, "a repeated guest id gets its own slot");
        assert!(t.is_full());
        assert_eq!(t.take(req(2), now, None), None);
        assert_eq!(t.release(a), Some(State::Deferred));
        assert!(t.take_freed());
        assert!(!t.take_freed());
        assert_eq!(t.take(req(3), now, None), Some(a));
        assert_eq!(t.busy(), 2);
    }

    #[test]
    fn a_slot_in_flight_cannot_be_freed_until_it_completes() {
        let mut t = Slots::new(1);
        let i = t.take(req(1), Instant::now(), None).unwrap();
        t.get_mut(i).unwrap().state = State::InFlight;
        assert_eq!(t.release(i), None, "the kernel owns its buffers");
        assert_eq!(t.busy(), 1);
        assert!(t.complete(i));
        assert!(!t.complete(i), "one completion only");
        assert_eq!(t.release(i), Some(State::Deferred));
        assert_eq!(t.release(i), None, "freed once");
        assert_eq!(t.busy(), 0);
    }

    #[test]
    fn waiting_counts_once_per_request_and_an_answer_ends_the_wait() {
        let mut t = Slots::new(2);
        let i = t.take(req(1), Instant::now(), None).unwrap();
        assert!(
            !t.defer(i, false),
            "a barrier's wait is not out of resources"
        );
        assert!(t.defer(i, true));
        assert!(!t.defer(i, true), "counted once");
        assert!(t.has_deferred());
        t.release(i);
        assert!(!t.has_deferred(), "an answered request no longer waits");
        let j = t.take(req(2), Instant::now(), None).unwrap();
        assert!(t.defer(j, true), "a new request counts again");
        assert_eq!(t.take_deferred(), Some(j));
        assert_eq!(t.take_deferred(), None);
    }

    #[test]
    fn copy_states_own_their_region_and_hand_it_back_when_answered() {
        let mut pool = BouncePool::new(2, 0, 0).unwrap();
        let mut t = Slots::new(2);
        let now = Instant::now();
        let w = t.take(req(1), now, None).unwrap();
        let r = t.take(req(2), now, None).unwrap();
        t.get_mut(w).unwrap().state = State::CopyIn {
            region: pool.small(w).unwrap(),
            len: 512,
            offset: 0,
            fsync: false,
        };
        t.get_mut(r).unwrap().state = State::CopyOut {
            region: pool.small(r).unwrap(),
            len: 512,
        };
        let mut batch = Vec::new();
        t.waiting_for_copy(&mut batch);
        assert_eq!(batch, [w, r]);
        for i in [w, r] {
            match t.release(i) {
                Some(State::CopyIn { region, .. } | State::CopyOut { region, .. }) => {
                    pool.give_back(region);
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(pool.small(w).is_some() && pool.small(r).is_some());
        t.waiting_for_copy(&mut batch);
        assert!(batch.is_empty());
    }
}
