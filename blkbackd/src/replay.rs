//! Replaying a trace against the real data plane on the simulated platform: a simulated guest
//! ([`SimDomain`]) grants the pages the trace names under the same grant refs, pushes the
//! recorded slot bytes through [`FrontRing`]'s raw interface, kicks the event channel as the
//! trace says, and checks every response of the real queues ([`spawn_queue`]) against the
//! recording. The first difference ends the replay with a precise report.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ring::{
    Abi, DeviceLimits, FrontRing, IndirectPage, Op, Parsed, RawRequest, RawResponse, Status,
};
use rustix::event::{PollFd, PollFlags};
use shmem::PAGE_SIZE;
use sim::workload::pattern_page;
use sim::{SimDomain, SimEventChannel, SimPlatform};
use xen::{Access, DomId, EventChannel, Platform, Port};

use backend::dataplane::{
    spawn_queue, Features, GrantMode, QueueExit, QueueHandle, QueueParams, Stats,
};
use backend::device::{Device, DeviceOptions};
use backend::replay::format::{self, from_hex, Event, ExitKind, Fnv, GrantAccess, Initial, Mode};

/// The simulated guest's domain id.
const FRONT: DomId = 1;
/// The domain that holds placeholder grants while a chosen ref is allocated.
const FILLER: DomId = 0x7000;

/// How to replay.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    /// The disk's initial content (a copy is used); default a fresh zeroed image.
    pub image: Option<PathBuf>,
    /// How long to wait for any one response or queue exit.
    pub timeout: Duration,
    /// Where to put the simulation and the image (default: the system's temporary directory).
    pub work_dir: Option<PathBuf>,
    /// Where to copy the disk as the replay left it (for the trace that follows it).
    pub final_image: Option<PathBuf>,
}

impl Default for ReplayOptions {
    fn default() -> Self {
        Self {
            image: None,
            timeout: Duration::from_secs(5),
            work_dir: None,
            final_image: None,
        }
    }
}

/// What a successful replay did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Events in the trace.
    pub events: usize,
    /// Slots pushed.
    pub slots: usize,
    /// Responses checked.
    pub responses: usize,
    /// Reads whose data was compared, byte for byte.
    pub reads_compared: usize,
    /// Reads whose data was compared by checksum (`sum`).
    pub checksums: usize,
    /// Queues started (reconnects included).
    pub queues_started: usize,
    /// Whether the data read was not compared (unknown initial disk content, no image given).
    pub reads_skipped: bool,
}

/// Why a replay failed.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The trace file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The trace is not valid (syntax, or an event that cannot be carried out).
    #[error("line {line}: invalid trace: {msg}")]
    Invalid {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        msg: String,
    },
    /// The simulation could not be set up.
    #[error("setting up the replay: {0}")]
    Setup(String),
    /// The backend did not do what the trace recorded.
    #[error("line {line}: difference: {msg}")]
    Differs {
        /// 1-based line number of the event where the difference showed (0: at the end).
        line: usize,
        /// What differs.
        msg: String,
    },
    /// The trace this one follows (its disk's `after`) failed.
    #[error("replaying {}, which this trace follows: {source}", trace.display())]
    Before {
        /// The earlier trace.
        trace: PathBuf,
        /// How it failed.
        source: Box<ReplayError>,
    },
}

/// The replayed disk's file in the work directory.
const DISK_FILE: &str = "disk.img";

/// The most traces a chain of `after` may hold: a longer one (a cycle) is refused.
const MAX_CHAIN: usize = 16;

/// Replays the trace in file `path`.
///
/// # Errors
/// [`ReplayError`]; a difference is [`ReplayError::Differs`].
///
/// A trace whose disk starts `after` another (a guest's next boot) is replayed on the disk
/// that one left, which is replayed first from the same directory, unless `opts.image` gives
/// the disk to start from.
pub fn replay_file(path: &Path, opts: &ReplayOptions) -> Result<Summary, ReplayError> {
    replay_chain(path, opts, MAX_CHAIN)
}

fn replay_chain(path: &Path, opts: &ReplayOptions, room: usize) -> Result<Summary, ReplayError> {
    let text = std::fs::read_to_string(path).map_err(|source| ReplayError::Read {
        path: path.to_owned(),
        source,
    })?;
    let events = parse(&text)?;
    let Some((line, name)) = after_of(&events)? else {
        return replay_events(&events, opts);
    };
    if opts.image.is_some() {
        return replay_events(&events, opts);
    }
    if room == 0 {
        return Err(ReplayError::Invalid {
            line,
            msg: format!("more than {MAX_CHAIN} traces follow each other (a cycle?)"),
        });
    }
    let work = sim::ScratchDir::new_in(opts.work_dir.as_deref(), "blkbackd-replay-chain")
        .map_err(|e| ReplayError::Setup(e.to_string()))?;
    let image = work.path().join("before.img");
    let before = path.with_file_name(name);
    let first = ReplayOptions {
        image: None,
        final_image: Some(image.clone()),
        ..opts.clone()
    };
    replay_chain(&before, &first, room - 1).map_err(|e| ReplayError::Before {
        trace: before,
        source: Box::new(e),
    })?;
    replay_events(
        &events,
        &ReplayOptions {
            image: Some(image),
            ..opts.clone()
        },
    )
}

/// The trace a trace's disk follows, with the disk's line: a plain `.trace` file name.
fn after_of(events: &[(usize, Event)]) -> Result<Option<(usize, &str)>, ReplayError> {
    let Some((line, after)) = events.iter().find_map(|(line, ev)| match ev {
        Event::Disk { after, .. } => Some((*line, after.as_deref())),
        _ => None,
    }) else {
        return Ok(None);
    };
    match after {
        None => Ok(None),
        Some(name)
            if name.ends_with(".trace")
                && !name.starts_with('.')
                && !name.contains(['/', '\\']) =>
        {
            Ok(Some((line, name)))
        }
        Some(name) => Err(ReplayError::Invalid {
            line,
            msg: format!("after {name:?} is not a trace's file name (NAME.trace)"),
        }),
    }
}

fn parse(text: &str) -> Result<Vec<(usize, Event)>, ReplayError> {
    format::parse(text).map_err(|(line, msg)| ReplayError::Invalid { line, msg })
}

/// Replays a trace given as text (one that starts `after` another needs `opts.image`).
///
/// # Errors
/// As [`replay_file`].
pub fn replay_text(text: &str, opts: &ReplayOptions) -> Result<Summary, ReplayError> {
    replay_events(&parse(text)?, opts)
}

fn replay_events(events: &[(usize, Event)], opts: &ReplayOptions) -> Result<Summary, ReplayError> {
    let work = sim::ScratchDir::new_in(opts.work_dir.as_deref(), "blkbackd-replay")
        .map_err(|e| ReplayError::Setup(e.to_string()))?;
    let mut r = Replay::new(work.path(), events, opts)?;
    for (line, ev) in events {
        r.line = *line;
        r.step(ev)?;
    }
    r.line = 0;
    r.finish()?;
    if let Some(to) = &opts.final_image {
        std::fs::copy(work.path().join(DISK_FILE), to)
            .map_err(|e| ReplayError::Setup(format!("copying the final image: {e}")))?;
    }
    r.summary.events = events.len();
    Ok(r.summary)
}

/// A response collected from the ring, not yet matched with the trace.
#[derive(Debug)]
struct Got {
    rsp: RawResponse,
    /// For a successful read: what it put in the guest's pages.
    read: Option<ReadBack>,
}

/// The data a read put in the guest's pages, and the request, to name it in a difference.
#[derive(Debug)]
struct ReadBack {
    sector: u64,
    /// Each segment: its grant ref, offset in the page and length, in bytes.
    segs: Vec<(u32, usize, usize)>,
    data: Vec<u8>,
}

impl ReadBack {
    /// Where byte `at` of the data lies: "segment k (gref g) byte b".
    fn locate(&self, at: usize) -> String {
        let mut start = 0;
        for (k, &(gref, off, len)) in self.segs.iter().enumerate() {
            if at < start + len {
                return format!("segment {k} (gref {gref}) byte {}", off + at - start);
            }
            start += len;
        }
        "past the data".to_owned()
    }
}

/// The negotiation of one queue, as the trace gave it.
#[derive(Debug, Clone)]
struct QueueSpec {
    abi: Abi,
    ring_refs: Vec<u32>,
    mode: Mode,
    persistent: bool,
    max_indirect_segments: u16,
    flush: bool,
    barrier: bool,
    discard: bool,
}

struct FrontQueue {
    spec: QueueSpec,
    ring: FrontRing,
    frames: Vec<u32>,
    port: Port,
    handle: Option<QueueHandle>,
    /// Requests sent, by id (ids may repeat), to check read data.
    sent: HashMap<u64, VecDeque<RawRequest>>,
    received: Vec<Got>,
}

struct Replay<'a> {
    dir: &'a Path,
    opts: &'a ReplayOptions,
    dom: SimDomain,
    evt: SimEventChannel,
    platform: Arc<dyn Platform>,
    device: Option<Arc<Device>>,
    stats: Arc<Stats>,
    queues: BTreeMap<u32, FrontQueue>,
    /// Frame of every ref the trace granted at some point.
    frames: HashMap<u32, u32>,
    /// Refs granted now, with their access.
    granted: HashMap<u32, GrantAccess>,
    next_frame: u32,
    compare_reads: bool,
    line: usize,
    summary: Summary,
}

fn setup<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> ReplayError + '_ {
    move |e| ReplayError::Setup(format!("{what}: {e}"))
}

impl<'a> Replay<'a> {
    fn new(
        dir: &'a Path,
        events: &[(usize, Event)],
        opts: &'a ReplayOptions,
    ) -> Result<Self, ReplayError> {
        // Guest memory: frame 0 unused, ring pages (twice, for reconnects), one page per ref.
        let mut pages = 1usize;
        let mut refs = std::collections::HashSet::new();
        for (_, e) in events {
            match e {
                Event::Queue { ring_refs, .. } => pages += ring_refs.len(),
                Event::Grant { gref, .. } => {
                    refs.insert(*gref);
                }
                _ => {}
            }
        }
        pages += refs.len() + 1;
        let sim = dir.join("sim");
        let dom = SimDomain::create(&sim, FRONT, pages).map_err(setup("creating the guest"))?;
        let evt = dom
            .open_event_channel()
            .map_err(setup("opening the guest's event channel"))?;
        let platform = SimPlatform::open(&sim, 0)
            .map_err(setup("opening the simulated platform"))?
            .into_platform();
        Ok(Self {
            dir,
            opts,
            dom,
            evt,
            platform,
            device: None,
            stats: Arc::new(Stats::new()),
            queues: BTreeMap::new(),
            frames: HashMap::new(),
            granted: HashMap::new(),
            next_frame: 1,
            compare_reads: true,
            line: 0,
            summary: Summary::default(),
        })
    }

    fn invalid(&self, msg: impl Into<String>) -> ReplayError {
        ReplayError::Invalid {
            line: self.line,
            msg: msg.into(),
        }
    }

    fn differs(&self, msg: impl Into<String>) -> ReplayError {
        ReplayError::Differs {
            line: self.line,
            msg: msg.into(),
        }
    }

    fn queue(&mut self, q: u32) -> Result<&mut FrontQueue, ReplayError> {
        get_queue(&mut self.queues, q, self.line)
    }

    fn step(&mut self, ev: &Event) -> Result<(), ReplayError> {
        match ev {
            Event::Trace { version, .. } => {
                if *version != format::VERSION {
                    return Err(self.invalid(format!("trace version {version} (this is 1)")));
                }
            }
            Event::Note { .. } | Event::Event { .. } => {}
            Event::Disk {
                sectors,
                sector_size,
                read_only,
                initial,
                after,
            } => {
                if (*initial == Initial::After) != after.is_some() {
                    return Err(self.invalid("initial \"after\" and an `after` go together"));
                }
                self.disk(*sectors, *sector_size, *read_only, *initial)?;
            }
            Event::Queue {
                q,
                abi,
                ring_refs,
                mode,
                persistent,
                max_indirect_segments,
                flush,
                barrier,
                discard,
            } => {
                let abi = Abi::from_protocol(Some(abi)).map_err(|e| self.invalid(e.to_string()))?;
                let spec = QueueSpec {
                    abi,
                    ring_refs: ring_refs.clone(),
                    mode: *mode,
                    persistent: *persistent,
                    max_indirect_segments: *max_indirect_segments,
                    flush: *flush,
                    barrier: *barrier,
                    discard: *discard,
                };
                self.start_queue(*q, spec)?;
            }
            Event::Grant {
                gref,
                access,
                hex,
                pattern,
            } => self.grant(*gref, *access, hex.as_deref(), *pattern)?,
            Event::Ungrant { gref } => {
                if self.granted.remove(gref).is_none() {
                    return Err(self.invalid(format!("ref {gref} is not granted")));
                }
                if self.dom.end_access(*gref).is_err() {
                    return Err(self.differs(format!(
                        "the backend still holds ref {gref} when the frontend ends access"
                    )));
                }
            }
            Event::Slot { q, hex, push } => {
                let bytes = from_hex(hex).map_err(|e| self.invalid(e))?;
                let line = self.line;
                let fq = get_queue(&mut self.queues, *q, line)?;
                let raw = RawRequest::from_bytes(fq.spec.abi, &bytes);
                let mem = ring_mem(&self.dom, &fq.frames)?;
                fq.ring
                    .queue_raw(&mem, &bytes)
                    .map_err(|e| ReplayError::Invalid {
                        line,
                        msg: format!("queueing the slot: {e}"),
                    })?;
                if let Ok(raw) = raw {
                    fq.sent.entry(raw.id()).or_default().push_back(raw);
                }
                self.summary.slots += 1;
                if *push {
                    self.push(*q)?;
                }
            }
            Event::Push { q } => self.push(*q)?,
            Event::ReqProd { q, value } => {
                let fq = get_queue(&mut self.queues, *q, self.line)?;
                let mem = ring_mem(&self.dom, &fq.frames)?;
                std::sync::atomic::fence(Ordering::Release);
                mem.store_u32(ring::REQ_PROD, *value, Ordering::Relaxed)
                    .map_err(setup("writing req_prod"))?;
            }
            Event::Kick { q, count } => {
                let port = self.queue(*q)?.port;
                for _ in 0..*count {
                    self.evt.notify(port).map_err(setup("notifying"))?;
                }
            }
            Event::Rsp {
                q,
                id,
                op,
                status,
                data,
                sum,
            } => self.expect_response(*q, *id, *op, *status, data.as_deref(), sum.as_deref())?,
            Event::Quiet { ms } => {
                let end = Instant::now() + Duration::from_millis(*ms);
                while Instant::now() < end {
                    self.collect()?;
                    self.wait_event(Duration::from_millis(5))?;
                }
                self.collect()?;
                self.no_unexpected()?;
            }
            Event::Sleep { ms } => std::thread::sleep(Duration::from_millis(*ms)),
            Event::Reconnect { q } => {
                self.end_queue(*q, ExitKind::Stopped)?;
                let spec = self.queue(*q)?.spec.clone();
                self.start_queue(*q, spec)?;
            }
            Event::Exit { q, how, .. } => self.end_queue(*q, *how)?,
        }
        Ok(())
    }

    fn disk(
        &mut self,
        sectors: u64,
        sector_size: u32,
        read_only: bool,
        initial: Initial,
    ) -> Result<(), ReplayError> {
        if self.device.is_some() {
            return Err(self.invalid("a second disk"));
        }
        let path = self.dir.join(DISK_FILE);
        if let Some(src) = &self.opts.image {
            std::fs::copy(src, &path).map_err(setup("copying the image"))?;
        } else if initial == Initial::After {
            return Err(self.invalid(
                "the disk starts after another trace: replay the file (the one before is \
                 replayed first) or give the image it left",
            ));
        } else {
            self.compare_reads = initial == Initial::Zero;
            self.summary.reads_skipped = !self.compare_reads;
        }
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(setup("creating the image"))?;
        let len = sectors
            .checked_mul(512)
            .ok_or_else(|| self.invalid("disk size overflows"))?;
        f.set_len(len).map_err(setup("sizing the image"))?;
        drop(f);
        let dev = Device::open(
            &path,
            &DeviceOptions {
                read_only,
                logical_block_size: Some(sector_size),
                buffered: false,
            },
        )
        .map_err(|e| self.invalid(format!("opening the disk: {e}")))?;
        self.device = Some(Arc::new(dev));
        Ok(())
    }

    fn alloc_frames(&mut self, n: usize) -> Result<Vec<u32>, ReplayError> {
        let first = self.next_frame;
        let n32 = u32::try_from(n).map_err(|_| self.invalid("too many pages"))?;
        if (first + n32) as usize > self.dom.pages() {
            return Err(self.invalid("out of guest memory"));
        }
        self.next_frame += n32;
        Ok((first..first + n32).collect())
    }

    /// Grants `frame` to the backend under exactly `gref`: Xen's allocator hands out the
    /// lowest free entry, so the entries below are held by placeholder grants meanwhile.
    fn grant_as(&mut self, gref: u32, frame: u32, access: GrantAccess) -> Result<(), ReplayError> {
        let acc = match access {
            GrantAccess::Rw => Access::ReadWrite,
            GrantAccess::Ro => Access::ReadOnly,
        };
        let mut fillers = Vec::new();
        let result = loop {
            let g = match self.dom.grant(0, frame, acc) {
                Ok(g) => g,
                Err(e) => break Err(self.invalid(format!("cannot grant ref {gref}: {e}"))),
            };
            if g == gref {
                break Ok(());
            }
            // Not the one: make it a placeholder for another domain instead.
            let _ = self.dom.end_access(g);
            if g > gref {
                break Err(
                    self.invalid(format!("ref {gref} cannot be granted (reserved or in use)"))
                );
            }
            match self.dom.grant(FILLER, 0, Access::ReadOnly) {
                Ok(f) => fillers.push(f),
                Err(e) => break Err(self.invalid(format!("cannot grant ref {gref}: {e}"))),
            }
        };
        for f in fillers {
            let _ = self.dom.end_access(f);
        }
        result?;
        self.granted.insert(gref, access);
        Ok(())
    }

    fn grant(
        &mut self,
        gref: u32,
        access: GrantAccess,
        hex: Option<&str>,
        pattern: Option<u64>,
    ) -> Result<(), ReplayError> {
        let mut page = vec![0u8; PAGE_SIZE];
        if let Some(h) = hex {
            let b = from_hex(h).map_err(|e| self.invalid(e))?;
            if b.len() > PAGE_SIZE {
                return Err(self.invalid("page data longer than a page"));
            }
            page[..b.len()].copy_from_slice(&b);
        } else if let Some(seed) = pattern {
            pattern_page(seed, &mut page);
        }
        let frame = match self.frames.get(&gref) {
            Some(&f) => f,
            None => {
                let f = self.alloc_frames(1)?[0];
                self.frames.insert(gref, f);
                f
            }
        };
        match self.granted.get(&gref) {
            Some(&a) if a == access => {}
            Some(_) => {
                if self.dom.end_access(gref).is_err() {
                    return Err(self.differs(format!(
                        "the backend holds ref {gref}, which the trace re-grants with other access"
                    )));
                }
                self.granted.remove(&gref);
                self.grant_as(gref, frame, access)?;
            }
            None => self.grant_as(gref, frame, access)?,
        }
        self.dom
            .page(frame)
            .map_err(setup("guest page"))?
            .write_from(0, &page)
            .map_err(setup("writing a guest page"))
    }

    fn start_queue(&mut self, q: u32, spec: QueueSpec) -> Result<(), ReplayError> {
        let Some(device) = self.device.clone() else {
            return Err(self.invalid("a queue before the disk"));
        };
        let pages = spec.ring_refs.len();
        // A reconnect keeps the ring pages and what was collected but not yet matched.
        let mut received = Vec::new();
        let mut sent = HashMap::new();
        let frames = match self.queues.remove(&q) {
            Some(old) => {
                received = old.received;
                sent = old.sent;
                old.frames
            }
            None => {
                let frames = self.alloc_frames(pages)?;
                for (&r, &f) in spec.ring_refs.iter().zip(&frames) {
                    self.grant_as(r, f, GrantAccess::Rw)?;
                    self.frames.insert(r, f);
                }
                frames
            }
        };
        let mem = ring_mem(&self.dom, &frames)?;
        let ring = FrontRing::init(&mem, spec.abi, pages)
            .map_err(|e| self.invalid(format!("ring: {e}")))?;
        let port = self
            .evt
            .alloc_unbound(0)
            .map_err(setup("allocating a port"))?;
        let mut p = QueueParams::new(
            Arc::clone(&self.platform),
            FRONT,
            spec.abi,
            spec.ring_refs.clone(),
            port,
            Arc::clone(&device),
        );
        p.grant_mode = match spec.mode {
            Mode::Copy => GrantMode::Copy,
            Mode::Map => GrantMode::Map,
        };
        p.persistent_grants = spec.persistent;
        p.max_indirect_segments = spec.max_indirect_segments;
        p.features = Features {
            flush: spec.flush,
            barrier: spec.barrier,
            discard: spec.discard && device.discard(),
            secure_discard: false,
            read_only: device.read_only(),
        };
        p.stats = Arc::clone(&self.stats);
        p.name = format!("replay-q{q}");
        p.observer = None;
        let handle =
            spawn_queue(p).map_err(|e| self.differs(format!("queue {q} did not start: {e}")))?;
        self.summary.queues_started += 1;
        self.queues.insert(
            q,
            FrontQueue {
                spec,
                ring,
                frames,
                port,
                handle: Some(handle),
                sent,
                received,
            },
        );
        Ok(())
    }

    fn push(&mut self, q: u32) -> Result<(), ReplayError> {
        let fq = get_queue(&mut self.queues, q, self.line)?;
        let mem = ring_mem(&self.dom, &fq.frames)?;
        let notify = fq
            .ring
            .push_requests(&mem)
            .map_err(setup("pushing requests"))?;
        let port = fq.port;
        if notify {
            self.evt.notify(port).map_err(setup("notifying"))?;
        }
        Ok(())
    }

    fn wait_event(&mut self, t: Duration) -> Result<(), ReplayError> {
        let ts = rustix::time::Timespec {
            tv_sec: 0,
            tv_nsec: i64::from(t.subsec_nanos()),
        };
        let fd = self.evt.as_fd();
        let mut fds = [PollFd::new(&fd, PollFlags::IN)];
        match rustix::event::poll(&mut fds, Some(&ts)) {
            Ok(_) | Err(rustix::io::Errno::INTR) => Ok(()),
            Err(e) => Err(ReplayError::Setup(format!("poll: {e}"))),
        }
    }

    /// Collects every response on every ring.
    fn collect(&mut self) -> Result<(), ReplayError> {
        let mut ports = Vec::new();
        self.evt
            .pending(&mut ports)
            .map_err(setup("event channel"))?;
        for p in ports {
            self.evt.unmask(p).map_err(setup("unmask"))?;
        }
        let qs: Vec<u32> = self.queues.keys().copied().collect();
        for q in qs {
            loop {
                let line = self.line;
                let Some(fq) = self.queues.get_mut(&q) else {
                    break;
                };
                let mem = ring_mem(&self.dom, &fq.frames)?;
                let bad = |e: ring::RingError| ReplayError::Differs {
                    line,
                    msg: format!("queue {q}: the backend broke the ring: {e}"),
                };
                let rsp = match fq.ring.next_response(&mem).map_err(bad)? {
                    Some(r) => r,
                    None => {
                        if fq.ring.final_check_for_responses(&mem).map_err(bad)? {
                            continue;
                        }
                        break;
                    }
                };
                let req = fq.sent.get_mut(&rsp.id).and_then(VecDeque::pop_front);
                let read = match req {
                    Some(raw) if rsp.status() == Some(Status::Okay) => self.read_back(&raw),
                    _ => None,
                };
                if let Some(fq) = self.queues.get_mut(&q) {
                    fq.received.push(Got { rsp, read });
                }
            }
        }
        Ok(())
    }

    /// What a successful read put in the guest's pages.
    fn read_back(&self, raw: &RawRequest) -> Option<ReadBack> {
        let limits = DeviceLimits {
            sectors: u64::MAX,
            logical_block_size: 512,
            read_only: false,
            max_indirect_segments: ring::MAX_INDIRECT_SEGMENTS as u16,
            discard: true,
            secure_discard: true,
        };
        let req = match ring::parse(raw, &limits).ok()? {
            Parsed::Ready(r) => r,
            Parsed::Indirect(h) => {
                let mut pages = Vec::new();
                for g in h.page_grefs() {
                    let mut p = IndirectPage::new();
                    p.read_from(&self.dom.page(*self.frames.get(g)?).ok()?)
                        .ok()?;
                    pages.push(p);
                }
                ring::parse_indirect(&h, &pages, &limits).ok()?
            }
        };
        let Op::Read(t) = &req.op else { return None };
        let mut back = ReadBack {
            sector: t.sector.0,
            segs: Vec::new(),
            data: Vec::new(),
        };
        for s in t.segs.as_slice() {
            let (off, len) = (s.offset_bytes() as usize, s.len_bytes() as usize);
            let page = self.dom.page(*self.frames.get(&s.gref)?).ok()?;
            let at = back.data.len();
            back.data.resize(at + len, 0);
            page.read_into(off, &mut back.data[at..]).ok()?;
            back.segs.push((s.gref, off, len));
        }
        Some(back)
    }

    fn expect_response(
        &mut self,
        q: u32,
        id: u64,
        op: u8,
        status: i16,
        data: Option<&str>,
        sum: Option<&str>,
    ) -> Result<(), ReplayError> {
        let deadline = Instant::now() + self.opts.timeout;
        let got = loop {
            let fq = self.queue(q)?;
            if let Some(i) = fq.received.iter().position(|g| g.rsp.id == id) {
                break fq.received.remove(i);
            }
            let finished = fq.handle.as_ref().is_none_or(QueueHandle::is_finished);
            self.collect()?;
            let fq = self.queue(q)?;
            if fq.received.iter().any(|g| g.rsp.id == id) {
                continue;
            }
            if finished {
                return Err(self.differs(format!("queue {q} ended without answering request {id}")));
            }
            if Instant::now() > deadline {
                return Err(self.differs(format!(
                    "no response to request {id} on queue {q} within {:?}",
                    self.opts.timeout
                )));
            }
            self.wait_event(Duration::from_millis(5))?;
        };
        self.summary.responses += 1;
        let r = got.rsp;
        if r.operation != op || r.status != status {
            return Err(self.differs(format!(
                "queue {q} request {id}: expected operation {op} status {status} ({}), got operation {} status {} ({})",
                status_name(status),
                r.operation,
                r.status,
                status_name(r.status)
            )));
        }
        if !self.compare_reads || (data.is_none() && sum.is_none()) {
            return Ok(());
        }
        let Some(back) = &got.read else {
            return Err(self.differs(format!(
                "queue {q} request {id}: recorded as a read with data, answered as no read"
            )));
        };
        if let Some(want) = sum {
            self.summary.checksums += 1;
            let mut f = Fnv::default();
            f.update(&back.data);
            if f.hex() != want {
                return Err(self.differs(format!(
                    "queue {q} request {id} (read of {} bytes at sector {}): data read back has checksum {}, recorded {want}",
                    back.data.len(),
                    back.sector,
                    f.hex()
                )));
            }
        }
        if let Some(want) = data {
            self.summary.reads_compared += 1;
            let want = from_hex(want).map_err(|e| self.invalid(format!("data: {e}")))?;
            if want.len() > back.data.len() {
                return Err(self.differs(format!(
                    "queue {q} request {id} (read at sector {}): {} bytes read, the recording has {}",
                    back.sector,
                    back.data.len(),
                    want.len()
                )));
            }
            let recorded = |i: usize| want.get(i).copied().unwrap_or(0);
            if let Some(i) = (0..back.data.len()).find(|&i| back.data[i] != recorded(i)) {
                return Err(self.differs(format!(
                    "queue {q} request {id} (read of {} bytes at sector {}): first difference at byte {i} ({}): read {:#04x}, recorded {:#04x}",
                    back.data.len(),
                    back.sector,
                    back.locate(i),
                    back.data[i],
                    recorded(i)
                )));
            }
        }
        Ok(())
    }

    fn no_unexpected(&self) -> Result<(), ReplayError> {
        for (q, fq) in &self.queues {
            if let Some(g) = fq.received.first() {
                return Err(self.differs(format!(
                    "queue {q}: unexpected response to request {} (operation {}, status {} ({}))",
                    g.rsp.id,
                    g.rsp.operation,
                    g.rsp.status,
                    status_name(g.rsp.status)
                )));
            }
        }
        Ok(())
    }

    /// Ends queue `q` as the trace says: `stopped` stops it now (the frontend went away);
    /// `protocol` and `failed` wait for it to end by itself.
    fn end_queue(&mut self, q: u32, how: ExitKind) -> Result<(), ReplayError> {
        let timeout = self.opts.timeout;
        let line = self.line;
        let fq = self.queue(q)?;
        let Some(handle) = fq.handle.take() else {
            return Err(ReplayError::Invalid {
                line,
                msg: format!("queue {q} already ended"),
            });
        };
        let exit = if how == ExitKind::Stopped {
            handle.stop()
        } else {
            let deadline = Instant::now() + timeout;
            while !handle.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(2));
            }
            if handle.is_finished() {
                handle.wait()
            } else {
                let exit = handle.stop();
                return Err(self.differs(format!(
                    "queue {q} was expected to stop by itself ({how:?}) but ran on; stopped: {exit:?}"
                )));
            }
        };
        let kind = match &exit {
            QueueExit::Stopped => ExitKind::Stopped,
            QueueExit::Protocol(_) => ExitKind::Protocol,
            QueueExit::Failed(_) | QueueExit::Panicked => ExitKind::Failed,
        };
        if kind != how {
            return Err(self.differs(format!(
                "queue {q} ended {kind:?} ({exit:?}), recorded {how:?}"
            )));
        }
        self.collect()
    }

    /// End of the trace: requests still unanswered get until the timeout, every queue still
    /// running is stopped (and must stop cleanly), no response may be left unmatched, and
    /// the backend must hold no grant.
    fn finish(&mut self) -> Result<(), ReplayError> {
        // Let running queues answer what was pushed last (stopping drops unconsumed slots),
        // so that a response the trace does not have is seen.
        let deadline = Instant::now() + self.opts.timeout;
        loop {
            self.collect()?;
            let waiting = self.queues.values().any(|fq| {
                fq.ring.outstanding() > 0 && fq.handle.as_ref().is_some_and(|h| !h.is_finished())
            });
            if !waiting || Instant::now() > deadline {
                break;
            }
            self.wait_event(Duration::from_millis(5))?;
        }
        let running: Vec<u32> = self
            .queues
            .iter()
            .filter(|(_, fq)| fq.handle.is_some())
            .map(|(q, _)| *q)
            .collect();
        for q in running {
            self.end_queue(q, ExitKind::Stopped)?;
        }
        self.collect()?;
        self.no_unexpected()?;
        let mut refs: Vec<u32> = self.granted.keys().copied().collect();
        refs.sort_unstable();
        for g in refs {
            if self.dom.end_access(g).is_err() {
                return Err(self.differs(format!(
                    "the backend still holds grant ref {g} after every queue stopped"
                )));
            }
        }
        Ok(())
    }
}

fn get_queue(
    queues: &mut BTreeMap<u32, FrontQueue>,
    q: u32,
    line: usize,
) -> Result<&mut FrontQueue, ReplayError> {
    queues.get_mut(&q).ok_or(ReplayError::Invalid {
        line,
        msg: format!("queue {q} was never started"),
    })
}

fn status_name(status: i16) -> &'static str {
    match Status::from_code(status) {
        Some(Status::Okay) => "okay",
        Some(Status::Error) => "error",
        Some(Status::NotSupported) => "not supported",
        None => "not a blkif status",
    }
}

fn ring_mem<'m>(dom: &'m SimDomain, frames: &[u32]) -> Result<shmem::SharedMem<'m>, ReplayError> {
    let first = frames.first().copied().unwrap_or(0) as usize;
    dom.mem()
        .subregion(first * PAGE_SIZE, frames.len() * PAGE_SIZE)
        .map_err(setup("ring memory"))
}
