//! How a queue reaches the guest pages its requests name: one implementation per
//! [`GrantMode`](super::GrantMode) behind one small trait, so that the queue's loop has no
//! switch on the mode.
//!
//! - [`GrantCopy`](super::grant_copy::GrantCopy): data goes through bounce regions, moved by
//!   batched grant copies (before a write's submission, after a read's completion).
//! - [`GrantMap`](super::grant_map::GrantMap): data goes straight to and from mapped guest
//!   pages (persistent grants), retired after their grace once their I/O completed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ring::{IndirectPage, Segments};
use xen::{DomId, GrantMapping, GrantRef, Platform};

use super::bounce::Region;
use super::slot::Slot;
use super::stats::Meter;
use super::uring::{Data, Uring};

/// What starting a read or write takes, as [`GrantAccess::reach`] found it.
#[derive(Debug)]
pub(super) enum Reach {
    /// Submit the I/O with this data.
    Submit(Data),
    /// A write whose data must first be grant-copied into this region.
    CopyIn(Region),
    /// A resource is short: wait (the request is retried when something completes).
    Wait,
    /// The request cannot be served: answer it with an error.
    Fail,
}

/// Whose grants a strategy reaches and where it reports: the same for both grant modes.
#[derive(Debug, Clone)]
pub(super) struct Frontend {
    /// Reaches the frontend's grants.
    pub(super) platform: Arc<dyn Platform>,
    /// The frontend's domain.
    pub(super) domid: DomId,
    /// Where grant operations are counted.
    pub(super) meter: Arc<dyn Meter>,
    /// The queue's name, for logs.
    pub(super) name: String,
}

/// One grant mode's way to guest memory.
pub(super) trait GrantAccess: Send + std::fmt::Debug {
    /// Reads the indirect pages of several requests once (`reqs[r]`: request `r`'s page
    /// grefs), in order into `pages`, in as few grant operations as the mode allows;
    /// `ok[r]` tells whether all of request `r`'s pages were read. `pages` must have room
    /// for all of them (else nothing is read).
    fn fetch_indirect(
        &mut self,
        reqs: &[&[GrantRef]],
        pages: &mut [IndirectPage],
        ok: &mut Vec<bool>,
    );

    /// Reaches the pages of a read or write of `len` bytes (`segs`) about to start in `slot`;
    /// `alone` when no other request is busy (a wait could then never end).
    fn reach(
        &mut self,
        uring: &mut Uring,
        slot: usize,
        segs: &Segments,
        len: usize,
        write: bool,
        alone: bool,
    ) -> Reach;

    /// One grant-copy batch over `batch`, slots each in `CopyIn` (from the guest) or
    /// `CopyOut` (to it), between their regions and their segments; `failed[i]` tells whether
    /// `batch[i]` failed.
    fn copy(&mut self, slots: &mut [Slot], batch: &[usize], failed: &mut Vec<bool>);

    /// Takes back a region a request no longer needs.
    fn give_back(&mut self, region: Region);

    /// Lets go of the mappings whose I/O completed at `now`.
    fn completed(&mut self, mappings: Vec<Arc<GrantMapping>>, now: Instant);

    /// How often [`tick`](Self::tick) must run; `None`: never.
    fn tick_interval(&self) -> Option<Duration>;

    /// Housekeeping (aging persistent grants, releasing retired mappings).
    fn tick(&mut self, now: Instant);

    /// Persistent grants mapped now.
    fn cached(&self) -> usize;

    /// At the end of the queue, once nothing is in flight: releases every mapping (after its
    /// grace).
    fn close(&mut self);
}
