//! A lean load generator playing the guest's blkfront against a real `blkbackd serve`: the
//! XenStore handshake as blkfront does it, then requests straight on `ring::FrontRing` with
//! data pages granted once up front (reused by every request, as a guest with persistent
//! grants does), so that the frontend's own cost stays small beside the backend's on a
//! machine where both share the CPUs.

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use ring::{FrontRequest, Segment, OP_READ, OP_WRITE};
use rustix::event::{PollFd, PollFlags};
use shmem::PAGE_SIZE;
use sim::front::{write_ring_details, GuestRing, RingDetails};
use sim::{SimDomain, SimEventChannel};
use xen::xenbus::{ReadState, XenbusState};
use xen::xenstore::{XenStore, XsOps};
use xen::{Access, DomId, EventChannel, GrantRef, Port};

/// Ring pages per queue (order 2).
const RING_PAGES: usize = 4;
/// Pages of the first `BIG_SLOTS` slots: room for the largest request (1 MiB); the other
/// slots have one page (4 KiB requests).
const SLOT_PAGES: usize = 256;
const BIG_SLOTS: usize = 4;

/// One queue of the frontend, usable from a thread of its own (as blkfront drives each
/// queue from its own CPU) with a shared `&SimDomain`.
pub struct Queue {
    shared: GuestRing,
    /// This queue's own event-channel handle (blkfront has one interrupt per queue).
    evt: SimEventChannel,
    ports: Vec<Port>,
    /// Per slot: data page grants, the indirect page's frame and grant.
    data: Vec<Vec<GrantRef>>,
    indirect: Vec<(u32, GrantRef)>,
    started: Vec<Option<Instant>>,
    free: Vec<usize>,
}

/// The frontend of one connected disk.
pub struct Front {
    dom: SimDomain,
    xs: XenStore,
    fe: String,
    be: String,
    queues: Vec<Queue>,
}

fn state(xs: &XenStore, dir: &str) -> ReadState {
    ReadState::parse(xs.read_string(&format!("{dir}/state")).ok().as_deref())
}

fn set_state(xs: &XenStore, dir: &str, state: XenbusState) -> anyhow::Result<()> {
    Ok(xs.write(&format!("{dir}/state"), state.as_u32().to_string())?)
}

fn wait_state(xs: &XenStore, dir: &str, want: &[XenbusState]) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let now = state(xs, dir);
        if matches!(now, ReadState::Known(s) if want.contains(&s)) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("backend state {now:?}, waiting for {want:?}");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

impl Front {
    /// Creates guest `domid` in `dir`, connects `queues` queues to the backend of `fe`/`be`
    /// with `max_qd` slots of data pages each.
    pub fn connect(
        dir: &std::path::Path,
        domid: DomId,
        fe: &str,
        be: &str,
        queues: u32,
        persistent: bool,
        max_qd: usize,
    ) -> anyhow::Result<Self> {
        let slot_pages = |i: usize| if i < BIG_SLOTS { SLOT_PAGES } else { 1 };
        let per_queue = RING_PAGES + (0..max_qd).map(|i| slot_pages(i) + 1).sum::<usize>();
        let pages = 1 + queues as usize * per_queue;
        let dom = SimDomain::create(dir, domid, pages)?;
        let xs = XenStore::open_at(sim::xenstore_socket(dir, domid))?;
        wait_state(&xs, be, &[XenbusState::InitWait])?;
        let mut qs = Vec::new();
        let mut frame = 1u32;
        let mut take = |n: usize| {
            let f = frame;
            frame += n as u32;
            f
        };
        for _ in 0..queues {
            let mut evt = dom.open_event_channel()?;
            let shared = GuestRing::create(
                &dom,
                &mut evt,
                0,
                ring::Abi::Native,
                take(RING_PAGES),
                RING_PAGES,
            )?;
            let mut data = Vec::new();
            let mut indirect = Vec::new();
            for i in 0..max_qd {
                let n = slot_pages(i);
                let first = take(n);
                let grefs = (0..n as u32)
                    .map(|i| dom.grant(0, first + i, Access::ReadWrite))
                    .collect::<Result<Vec<_>, _>>()?;
                data.push(grefs);
                let f = take(1);
                indirect.push((f, dom.grant(0, f, Access::ReadOnly)?));
            }
            qs.push(Queue {
                shared,
                evt,
                ports: Vec::new(),
                started: vec![None; data.len()],
                free: (0..data.len()).rev().collect(),
                data,
                indirect,
            });
        }
        let rings: Vec<(&[GrantRef], Port)> = qs
            .iter()
            .map(|q| (q.shared.grefs.as_slice(), q.shared.port))
            .collect();
        let details = RingDetails {
            order: Some(RING_PAGES.ilog2()),
            protocol: Some(ring::PROTOCOL_NATIVE),
            persistent,
        };
        xs.transaction(|tx| write_ring_details(tx, fe, &rings, details))
            .context("writing the ring details")?;
        set_state(&xs, fe, XenbusState::Initialised)?;
        wait_state(&xs, be, &[XenbusState::Connected])?;
        set_state(&xs, fe, XenbusState::Connected)?;
        Ok(Self {
            dom,
            xs,
            fe: fe.to_owned(),
            be: be.to_owned(),
            queues: qs,
        })
    }

    /// Number of queues.
    pub fn queues(&self) -> usize {
        self.queues.len()
    }

    /// Whether queue `q` has a free slot for a request of `bytes`.
    pub fn can_submit(&self, q: usize, bytes: usize) -> bool {
        self.queues[q].can_submit(bytes)
    }

    /// Queues a request of `bytes` at byte `offset` on queue `q` (pushed by [`Front::push`]).
    pub fn submit(
        &mut self,
        q: usize,
        offset: u64,
        bytes: usize,
        write: bool,
    ) -> anyhow::Result<()> {
        self.queues[q].submit(&self.dom, offset, bytes, write)
    }

    /// Publishes queued requests on every queue, notifying where the backend asks.
    pub fn push(&mut self) -> anyhow::Result<()> {
        for qu in &mut self.queues {
            qu.push(&self.dom)?;
        }
        Ok(())
    }

    /// Waits for at least one response on any queue; calls `done(latency, ok)` for each
    /// collected.
    pub fn complete(&mut self, mut done: impl FnMut(Duration, bool)) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let mut got = 0;
            for qu in &mut self.queues {
                got += qu.collect(&self.dom, &mut done)?;
            }
            if got > 0 {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("no response within 15 s");
            }
            let fds: Vec<_> = self.queues.iter().map(|q| q.evt.as_fd()).collect();
            let mut polls: Vec<_> = fds
                .iter()
                .map(|fd| PollFd::new(fd, PollFlags::IN))
                .collect();
            let _ = rustix::event::poll(&mut polls, Some(&ONE_SECOND));
            drop(polls);
            for qu in &mut self.queues {
                qu.ack_events()?;
            }
        }
    }

    /// The domain and the queues, for driving each queue from a thread of its own.
    pub fn split(&mut self) -> (&SimDomain, &mut [Queue]) {
        (&self.dom, &mut self.queues)
    }

    /// Closes as blkfront does when unplugged (the toolstack asked for removal first).
    pub fn close(self) -> anyhow::Result<()> {
        set_state(&self.xs, &self.fe, XenbusState::Closing)?;
        wait_state(
            &self.xs,
            &self.be,
            &[XenbusState::Closing, XenbusState::Closed],
        )?;
        set_state(&self.xs, &self.fe, XenbusState::Closed)?;
        Ok(())
    }
}

const ONE_SECOND: rustix::time::Timespec = rustix::time::Timespec {
    tv_sec: 1,
    tv_nsec: 0,
};

impl Queue {
    /// Whether a slot with room for a request of `bytes` is free.
    pub fn can_submit(&self, bytes: usize) -> bool {
        let n = bytes.div_ceil(PAGE_SIZE);
        self.free.iter().any(|&s| self.data[s].len() >= n)
    }

    fn ring_mem<'a>(&self, dom: &'a SimDomain) -> anyhow::Result<shmem::SharedMem<'a>> {
        Ok(dom.mem().subregion(
            self.shared.frames[0] as usize * PAGE_SIZE,
            RING_PAGES * PAGE_SIZE,
        )?)
    }

    /// Queues a request of `bytes` at byte `offset` (published by [`Queue::push`]).
    pub fn submit(
        &mut self,
        dom: &SimDomain,
        offset: u64,
        bytes: usize,
        write: bool,
    ) -> anyhow::Result<()> {
        let n = bytes.div_ceil(PAGE_SIZE);
        let pos = self
            .free
            .iter()
            .rposition(|&s| self.data[s].len() >= n)
            .context("no free slot large enough")?;
        let slot = self.free.swap_remove(pos);
        let segs: Vec<Segment> = self.data[slot][..n]
            .iter()
            .map(|&gref| Segment {
                gref,
                first_sect: 0,
                last_sect: 7,
            })
            .collect();
        let op = if write { OP_WRITE } else { OP_READ };
        let id = slot as u64;
        let sector = offset / 512;
        let mem = self.ring_mem(dom)?;
        if n <= ring::MAX_SEGMENTS_PER_REQUEST {
            let req = FrontRequest::Direct {
                operation: op,
                id,
                sector,
                handle: 0,
                segs: &segs,
            };
            self.shared.ring.queue_request(&mem, &req)?;
        } else {
            let (frame, gref) = self.indirect[slot];
            let mut page = vec![0u8; n * 8];
            for (i, s) in segs.iter().enumerate() {
                page[i * 8..i * 8 + 4].copy_from_slice(&s.gref.to_le_bytes());
                page[i * 8 + 5] = 7;
            }
            dom.page(frame)?.write_from(0, &page)?;
            let req = FrontRequest::Indirect {
                indirect_op: op,
                id,
                sector,
                handle: 0,
                nr_segments: n as u16,
                page_grefs: &[gref],
            };
            self.shared.ring.queue_request(&mem, &req)?;
        }
        self.started[slot] = Some(Instant::now());
        Ok(())
    }

    /// Publishes queued requests, notifying the backend where it asks.
    pub fn push(&mut self, dom: &SimDomain) -> anyhow::Result<()> {
        let mem = self.ring_mem(dom)?;
        if self.shared.ring.push_requests(&mem)? {
            self.evt.notify(self.shared.port)?;
        }
        Ok(())
    }

    /// Collects the responses there are; calls `done(latency, ok)` for each and returns how
    /// many.
    fn collect(
        &mut self,
        dom: &SimDomain,
        done: &mut impl FnMut(Duration, bool),
    ) -> anyhow::Result<usize> {
        let mem = self.ring_mem(dom)?;
        let mut got = 0;
        loop {
            match self.shared.ring.next_response(&mem)? {
                Some(r) => {
                    let slot = r.id as usize;
                    let Some(start) = self.started.get_mut(slot).and_then(Option::take) else {
                        bail!("response for unknown id {}", r.id);
                    };
                    done(start.elapsed(), r.status == 0);
                    self.free.push(slot);
                    got += 1;
                }
                None if self.shared.ring.final_check_for_responses(&mem)? => {}
                None => return Ok(got),
            }
        }
    }

    /// Clears and unmasks this queue's pending events.
    fn ack_events(&mut self) -> anyhow::Result<()> {
        self.ports.clear();
        self.evt.pending(&mut self.ports)?;
        for &p in &self.ports {
            self.evt.unmask(p)?;
        }
        Ok(())
    }

    /// Waits for at least one response on this queue; calls `done(latency, ok)` for each.
    pub fn complete(
        &mut self,
        dom: &SimDomain,
        mut done: impl FnMut(Duration, bool),
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if self.collect(dom, &mut done)? > 0 {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("no response within 15 s");
            }
            let fd = self.evt.as_fd();
            let mut fds = [PollFd::new(&fd, PollFlags::IN)];
            let _ = rustix::event::poll(&mut fds, Some(&ONE_SECOND));
            self.ack_events()?;
        }
    }
}
