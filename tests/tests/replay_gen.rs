//! The generator of the replay corpus in `tests/traces/`, and a test that the committed
//! traces are what it generates (so a trace is never edited out of step with its generator).
//! Regenerate with `REGEN_TRACES=1 cargo test -p tests --test replay_gen`.
//!
//! Expectations are written from the protocol (Linux blkback's rules as `ring::validate`
//! documents them) and from a model of the disk, never from running the backend: the replay
//! test then checks the backend against them.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use backend::replay::format::{
    page_hex, Event, ExitKind, Fnv, GrantAccess, Initial, Mode, VERSION,
};
use ring::{
    Abi, FrontRequest, Segment, OP_DISCARD, OP_FLUSH_DISKCACHE, OP_INDIRECT, OP_READ, OP_WRITE,
    OP_WRITE_BARRIER,
};
use sim::workload::pattern_page;

const OKAY: i16 = 0;
const ERROR: i16 = -1;
const NOTSUPP: i16 = -2;

/// A response to expect later.
#[derive(Debug, Clone)]
struct Pending {
    q: u32,
    id: u64,
    op: u8,
    status: i16,
    /// For a successful read: the data it must return.
    data: Option<Vec<u8>>,
}

/// Queue settings.
#[derive(Debug, Clone, Copy)]
struct QueueOpts {
    abi: Abi,
    pages: usize,
    mode: Mode,
    persistent: bool,
    max_indirect: u16,
}

impl Default for QueueOpts {
    fn default() -> Self {
        Self {
            abi: Abi::X86_64,
            pages: 1,
            mode: Mode::Copy,
            persistent: false,
            max_indirect: 256,
        }
    }
}

struct Gen {
    ev: Vec<Event>,
    abis: BTreeMap<u32, Abi>,
    next_ref: u32,
    next_id: u64,
    next_seed: u64,
    /// The disk's content (the model).
    disk: Vec<u8>,
    /// The checksum of each read's data, by the index of its `rsp` event.
    sums: HashMap<usize, String>,
}

/// A trace whose exact read data would weigh more than this gives checksums instead (the
/// large reads of pattern data in `indirect`, `sequential-map`, ... would make megabytes).
const EXACT_DATA_LIMIT: usize = 256 << 10;

impl Gen {
    fn new(about: &str, sectors: u64, sector_size: u32) -> Self {
        let ev = vec![
            Event::Trace {
                version: VERSION,
                about: about.to_owned(),
            },
            Event::Disk {
                sectors,
                sector_size,
                read_only: false,
                initial: Initial::Zero,
                after: None,
            },
        ];
        Self {
            ev,
            abis: BTreeMap::new(),
            next_ref: 8,
            next_id: 1,
            next_seed: 1,
            disk: vec![0; sectors as usize * 512],
            sums: HashMap::new(),
        }
    }

    fn note(&mut self, text: &str) {
        self.ev.push(Event::Note { text: text.into() });
    }

    fn queue(&mut self, q: u32, o: QueueOpts) {
        let ring_refs: Vec<u32> = (0..o.pages as u32).map(|i| self.next_ref + i).collect();
        self.next_ref += o.pages as u32;
        self.abis.insert(q, o.abi);
        self.ev.push(Event::Queue {
            q,
            abi: o.abi.protocol().to_owned(),
            ring_refs,
            mode: o.mode,
            persistent: o.persistent,
            max_indirect_segments: o.max_indirect,
            flush: true,
            barrier: true,
            discard: true,
        });
    }

    fn id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Grants a fresh page: a pattern page (returned with its bytes) or zeros.
    fn page(&mut self, data: bool, access: GrantAccess) -> (u32, Vec<u8>) {
        let gref = self.next_ref;
        self.next_ref += 1;
        let mut bytes = vec![0u8; 4096];
        let pattern = data.then(|| {
            let s = self.next_seed;
            self.next_seed += 1;
            pattern_page(s, &mut bytes);
            s
        });
        self.ev.push(Event::Grant {
            gref,
            access,
            hex: None,
            pattern,
        });
        (gref, bytes)
    }

    /// A read or write (`op`) in one slot of queue `q`, handle 0.
    fn direct(&mut self, q: u32, op: u8, id: u64, sector: u64, segs: &[Segment]) {
        self.slot(
            q,
            &FrontRequest::Direct {
                operation: op,
                id,
                sector,
                handle: 0,
                segs,
            },
        );
    }

    fn slot(&mut self, q: u32, req: &FrontRequest<'_>) {
        let raw = req.encode(self.abis[&q]).expect("encodable");
        self.raw(q, raw.as_bytes(), true);
    }

    fn raw(&mut self, q: u32, bytes: &[u8], push: bool) {
        self.ev.push(Event::Slot {
            q,
            hex: backend::replay::format::to_hex(bytes),
            push,
        });
    }

    fn expect(&mut self, p: &[Pending]) {
        for p in p {
            if let Some(d) = &p.data {
                let mut f = Fnv::default();
                f.update(d);
                self.sums.insert(self.ev.len(), f.hex());
            }
            self.ev.push(Event::Rsp {
                q: p.q,
                id: p.id,
                op: p.op,
                status: p.status,
                data: p.data.as_deref().map(page_hex),
                sum: None,
            });
        }
    }

    /// Segments of whole pages covering `nsect` sectors; the pages' content (for writes).
    fn segments(&mut self, nsect: u32, data: bool) -> (Vec<Segment>, Vec<u8>) {
        let mut segs = Vec::new();
        let mut bytes = Vec::new();
        let mut left = nsect;
        while left > 0 {
            let n = left.min(8);
            let (gref, page) = self.page(data, GrantAccess::Rw);
            bytes.extend_from_slice(&page[..n as usize * 512]);
            segs.push(Segment {
                gref,
                first_sect: 0,
                last_sect: (n - 1) as u8,
            });
            left -= n;
        }
        (segs, bytes)
    }

    /// Pushes a request with `segs` (direct up to 11 segments, indirect beyond).
    fn rw_slot(&mut self, q: u32, id: u64, op: u8, sector: u64, segs: &[Segment]) -> u8 {
        if segs.len() <= 11 {
            self.direct(q, op, id, sector, segs);
            return op;
        }
        let mut page_grefs = Vec::new();
        for chunk in segs.chunks(512) {
            let mut page = vec![0u8; 4096];
            for (i, s) in chunk.iter().enumerate() {
                page[i * 8..i * 8 + 4].copy_from_slice(&s.gref.to_le_bytes());
                page[i * 8 + 4] = s.first_sect;
                page[i * 8 + 5] = s.last_sect;
            }
            let gref = self.next_ref;
            self.next_ref += 1;
            self.ev.push(Event::Grant {
                gref,
                access: GrantAccess::Ro,
                hex: Some(page_hex(&page)),
                pattern: None,
            });
            page_grefs.push(gref);
        }
        self.slot(
            q,
            &FrontRequest::Indirect {
                indirect_op: op,
                id,
                sector,
                handle: 0,
                nr_segments: segs.len() as u16,
                page_grefs: &page_grefs,
            },
        );
        op
    }

    /// A write of `nsect` sectors of fresh pattern data at `sector`, recorded in the model.
    fn write(&mut self, q: u32, sector: u64, nsect: u32) -> Pending {
        let id = self.id();
        let (segs, bytes) = self.segments(nsect, true);
        let op = self.rw_slot(q, id, OP_WRITE, sector, &segs);
        let at = sector as usize * 512;
        self.disk[at..at + bytes.len()].copy_from_slice(&bytes);
        Pending {
            q,
            id,
            op,
            status: OKAY,
            data: None,
        }
    }

    /// A read of `nsect` sectors at `sector`, expecting the model's content.
    fn read(&mut self, q: u32, sector: u64, nsect: u32) -> Pending {
        let id = self.id();
        let (segs, _) = self.segments(nsect, false);
        let op = self.rw_slot(q, id, OP_READ, sector, &segs);
        let at = sector as usize * 512;
        Pending {
            q,
            id,
            op,
            status: OKAY,
            data: Some(self.disk[at..at + nsect as usize * 512].to_vec()),
        }
    }

    fn flush(&mut self, q: u32) -> Pending {
        let id = self.id();
        self.direct(q, OP_FLUSH_DISKCACHE, id, 0, &[]);
        ok(q, id, OP_FLUSH_DISKCACHE)
    }

    fn discard(&mut self, q: u32, sector: u64, nsect: u64) -> Pending {
        let id = self.id();
        self.slot(
            q,
            &FrontRequest::Discard {
                id,
                sector,
                nr_sectors: nsect,
                secure: false,
            },
        );
        let at = sector as usize * 512;
        self.disk[at..at + nsect as usize * 512].fill(0);
        ok(q, id, OP_DISCARD)
    }

    /// The trace: reads with their exact data, or with checksums past `EXACT_DATA_LIMIT`.
    fn text(&self) -> String {
        let exact: String = self.ev.iter().map(|e| e.to_line() + "\n").collect();
        if exact.len() <= EXACT_DATA_LIMIT {
            return exact;
        }
        let summed = |(i, e): (usize, &Event)| match (e, self.sums.get(&i)) {
            (
                Event::Rsp {
                    q, id, op, status, ..
                },
                Some(sum),
            ) => Event::Rsp {
                q: *q,
                id: *id,
                op: *op,
                status: *status,
                data: None,
                sum: Some(sum.clone()),
            },
            _ => e.clone(),
        };
        self.ev
            .iter()
            .enumerate()
            .map(|ie| summed(ie).to_line() + "\n")
            .collect()
    }
}

/// A segment covering a whole 4 KiB page.
fn whole(gref: u32) -> Segment {
    Segment {
        gref,
        first_sect: 0,
        last_sect: 7,
    }
}
fn ok(q: u32, id: u64, op: u8) -> Pending {
    Pending {
        q,
        id,
        op,
        status: OKAY,
        data: None,
    }
}

fn with_status(mut p: Pending, status: i16) -> Pending {
    p.status = status;
    p.data = None;
    p
}

/// A small deterministic generator of numbers.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

const SECTORS: u64 = 4096; // 2 MiB

// ---- ordinary workloads ----

fn boot() -> Gen {
    let mut g = Gen::new(
        "a guest booting: the installer writes a partition table, boot loader and kernel, then the boot reads the partition table, scattered small reads, a larger sequential read of the kernel, and a flush",
        SECTORS,
        512,
    );
    g.queue(0, QueueOpts::default());
    let w: Vec<Pending> = vec![g.write(0, 0, 8), g.write(0, 64, 16), g.write(0, 2048, 88)];
    g.expect(&w);
    let f = g.flush(0);
    g.expect(&[f]);
    g.note("boot: partition table, then the boot loader and scattered metadata reads");
    for (s, n) in [(0u64, 1u32), (0, 8), (64, 16), (1024, 8), (8, 8), (3000, 2)] {
        let r = g.read(0, s, n);
        g.expect(&[r]);
    }
    let r: Vec<Pending> = (0..4).map(|i| g.read(0, 2048 + i * 22, 22)).collect();
    g.expect(&r);
    g
}

fn sequential() -> Gen {
    let mut g = Gen::new(
        "sequential 64 KiB writes then reads at queue depth 8, grant map with persistent grants, 4-page ring",
        SECTORS,
        512,
    );
    g.queue(
        0,
        QueueOpts {
            pages: 4,
            mode: Mode::Map,
            persistent: true,
            ..QueueOpts::default()
        },
    );
    for batch in 0..2u64 {
        let w: Vec<Pending> = (0..8)
            .map(|i| g.write(0, (batch * 8 + i) * 128, 128))
            .collect();
        g.expect(&w);
    }
    for batch in 0..2u64 {
        let r: Vec<Pending> = (0..8)
            .map(|i| g.read(0, (batch * 8 + i) * 128, 128))
            .collect();
        g.expect(&r);
    }
    g
}

fn random_mix() -> Gen {
    let mut g = Gen::new(
        "random 4 KiB reads and writes, 70/30, queue depth 16, x86_32 ABI, grant copy; requests within a batch never overlap",
        SECTORS,
        512,
    );
    g.queue(
        0,
        QueueOpts {
            abi: Abi::X86_32,
            pages: 2,
            ..QueueOpts::default()
        },
    );
    let mut rng = Rng(0x1234_5678);
    for _ in 0..6 {
        let mut used = std::collections::HashSet::new();
        let mut batch = Vec::new();
        while batch.len() < 16 {
            let block = rng.below(SECTORS / 8);
            if !used.insert(block) {
                continue;
            }
            let p = if rng.below(10) < 7 {
                g.read(0, block * 8, 8)
            } else {
                g.write(0, block * 8, 8)
            };
            batch.push(p);
        }
        g.expect(&batch);
    }
    g
}

fn flush_discard() -> Gen {
    let mut g = Gen::new(
        "flushes, a write barrier with data, discards (the file's hole reads back as zeros), a zero-length discard (answered okay with no I/O)",
        SECTORS,
        512,
    );
    g.queue(0, QueueOpts::default());
    let w: Vec<Pending> = (0..4).map(|i| g.write(0, i * 64, 64)).collect();
    g.expect(&w);
    let f = g.flush(0);
    g.expect(&[f]);
    // A barrier carrying data.
    let id = g.id();
    let (segs, bytes) = g.segments(8, true);
    g.direct(0, OP_WRITE_BARRIER, id, 512, &segs);
    g.disk[512 * 512..512 * 512 + bytes.len()].copy_from_slice(&bytes);
    g.expect(&[ok(0, id, OP_WRITE_BARRIER)]);
    let d = g.discard(0, 64, 64);
    g.expect(&[d]);
    let d = g.discard(0, 0, 0);
    g.expect(&[d]);
    let r: Vec<Pending> = vec![
        g.read(0, 0, 64),
        g.read(0, 64, 64),
        g.read(0, 128, 64),
        g.read(0, 512, 8),
    ];
    g.expect(&r);
    let f = g.flush(0);
    g.expect(&[f]);
    g
}

fn indirect() -> Gen {
    let mut g = Gen::new(
        "indirect requests: 128 KiB and 1 MiB (256 segments, the advertised maximum) writes and reads, grant copy and grant map",
        SECTORS,
        512,
    );
    g.queue(0, QueueOpts::default());
    g.queue(
        1,
        QueueOpts {
            mode: Mode::Map,
            ..QueueOpts::default()
        },
    );
    let w = vec![g.write(0, 0, 256), g.write(1, 256, 2048)];
    g.expect(&w);
    let r = vec![g.read(1, 0, 256), g.read(0, 256, 2048), g.read(0, 2304, 96)];
    g.expect(&r);
    g
}

fn multi_queue() -> Gen {
    let mut g = Gen::new(
        "four queues at once, each writing and reading its own quarter of the disk, then reading another queue's data",
        SECTORS,
        512,
    );
    for q in 0..4 {
        g.queue(
            q,
            QueueOpts {
                pages: 1 << q,
                mode: if q % 2 == 0 { Mode::Copy } else { Mode::Map },
                persistent: q == 3,
                ..QueueOpts::default()
            },
        );
    }
    let quarter = SECTORS / 4;
    let mut p = Vec::new();
    for q in 0..4u32 {
        for i in 0..4 {
            p.push(g.write(q, u64::from(q) * quarter + i * 64, 64));
        }
    }
    g.expect(&p);
    let mut p = Vec::new();
    for q in 0..4u32 {
        let other = u64::from((q + 1) % 4);
        for i in 0..4 {
            p.push(g.read(q, other * quarter + i * 64, 64));
        }
    }
    g.expect(&p);
    g
}

// ---- hostile traces (XSAs in blkback-facts.md) ----

fn bogus_req_prod() -> Gen {
    let mut g = Gen::new(
        "CVE-2010-4247: req_prod claims more requests than the ring holds. The backend must answer what it took before, then halt the ring and report a protocol violation (no loop, no crash), and answer nothing after",
        SECTORS,
        512,
    );
    g.queue(0, QueueOpts::default());
    let w = g.write(0, 0, 8);
    g.expect(&[w]);
    // One ring page of x86_64: 32 slots. 1 answered; req_prod = 1 + 33 overflows.
    g.ev.push(Event::ReqProd { q: 0, value: 34 });
    g.ev.push(Event::Kick { q: 0, count: 1 });
    g.ev.push(Event::Exit {
        q: 0,
        how: ExitKind::Protocol,
        detail: String::new(),
    });
    g.ev.push(Event::Quiet { ms: 50 });
    g
}

fn bogus_req_prod_backwards() -> Gen {
    let mut g = Gen::new(
        "req_prod moved far backwards (behind the requests consumed, a wrapped difference beyond the ring): a protocol violation, the ring halted",
        SECTORS,
        512,
    );
    g.queue(0, QueueOpts::default());
    let r: Vec<Pending> = (0..3).map(|i| g.read(0, i * 8, 8)).collect();
    g.expect(&r);
    g.ev.push(Event::ReqProd {
        q: 0,
        value: 0x8000_0000,
    });
    g.ev.push(Event::Kick { q: 0, count: 1 });
    g.ev.push(Event::Exit {
        q: 0,
        how: ExitKind::Protocol,
        detail: String::new(),
    });
    g
}

fn segment_counts() -> Gen {
    let mut g = Gen::new(
        "CVE-2007-5498 and segment rules: nr_segments 0 on a read, 12 direct (one over 11), 257 indirect (one over the advertised 256) and 0 indirect are answered BLKIF_RSP_ERROR; 11 direct and 256 indirect are served; last_sect 8 and last_sect < first_sect are errors; the queue carries on",
        SECTORS,
        512,
    );
    g.queue(0, QueueOpts::default());
    // 11 direct segments: fine.
    let a = g.write(0, 0, 88);
    g.expect(&[a]);
    // 12 direct: patch nr_segments of a valid 11-segment request (the 12th descriptor
    // does not exist in the slot).
    let id = g.id();
    let (segs, _) = g.segments(88, false);
    let mut raw = FrontRequest::Direct {
        operation: OP_READ,
        id,
        sector: 0,
        handle: 0,
        segs: &segs,
    }
    .encode(Abi::X86_64)
    .unwrap()
    .as_bytes()
    .to_vec();
    raw[1] = 12;
    g.raw(0, &raw, true);
    g.expect(&[with_status(ok(0, id, OP_READ), ERROR)]);
    // 0 segments on a read.
    raw[1] = 0;
    let id2 = g.id();
    raw[8..16].copy_from_slice(&id2.to_le_bytes());
    g.raw(0, &raw, true);
    g.expect(&[with_status(ok(0, id2, OP_READ), ERROR)]);
    // 255 segments in a direct slot.
    raw[1] = 255;
    let id3 = g.id();
    raw[8..16].copy_from_slice(&id3.to_le_bytes());
    g.raw(0, &raw, true);
    g.expect(&[with_status(ok(0, id3, OP_READ), ERROR)]);
    // 256 indirect: fine; 257 and 0: errors.
    let b = g.read(0, 0, 2048);
    g.expect(&[b]);
    for n in [257u16, 0, 4096] {
        let id = g.id();
        let (gref, _) = g.page(false, GrantAccess::Ro);
        g.slot(
            0,
            &FrontRequest::Indirect {
                indirect_op: OP_READ,
                id,
                sector: 0,
                handle: 0,
                nr_segments: n,
                page_grefs: &[gref],
            },
        );
        g.expect(&[with_status(ok(0, id, OP_READ), ERROR)]);
    }
    // Per-segment sector bounds.
    for (first, last) in [(0u8, 8u8), (5, 4), (8, 8), (255, 255)] {
        let id = g.id();
        let (gref, _) = g.page(false, GrantAccess::Rw);
        g.slot(
            0,
            &FrontRequest::Direct {
                operation: OP_READ,
                id,
                sector: 0,
                handle: 0,
                segs: &[Segment {
                    gref,
                    first_sect: first,
                    last_sect: last,
                }],
            },
        );
        g.expect(&[with_status(ok(0, id, OP_READ), ERROR)]);
    }
    // The same rules inside an indirect page: one bad descriptor among good ones.
    let id = g.id();
    let (mut segs, _) = g.segments(96, false);
    segs[7].last_sect = 9;
    g.rw_slot(0, id, OP_READ, 0, &segs);
    g.expect(&[with_status(ok(0, id, OP_READ), ERROR)]);
    let c = g.read(0, 8, 8);
    g.expect(&[c]);
    g
}

fn bad_sectors() -> Gen {
    let mut g = Gen::new(
        "bad sector ranges: past the end, ending one sector past the end, wrapping around 2^64 (sector near u64::MAX), a discard past the end and a wrapping discard: all BLKIF_RSP_ERROR; the last sector itself is served",
        SECTORS,
        512,
    );
    g.queue(0, QueueOpts::default());
    let last = g.write(0, SECTORS - 8, 8);
    g.expect(&[last]);
    let r = g.read(0, SECTORS - 1, 1);
    g.expect(&[r]);
    for (sector, n) in [
        (SECTORS, 8u32),
        (SECTORS - 7, 8),
        (u64::MAX - 3, 8),
        (u64::MAX, 1),
        (1 << 55, 8),
    ] {
        let id = g.id();
        let (segs, _) = g.segments(n, false);
        g.direct(0, OP_READ, id, sector, &segs);
        g.expect(&[with_status(ok(0, id, OP_READ), ERROR)]);
    }
    for (sector, n) in [(SECTORS - 8, 16u64), (8, u64::MAX - 4), (u64::MAX, 2)] {
        let id = g.id();
        g.slot(
            0,
            &FrontRequest::Discard {
                id,
                sector,
                nr_sectors: n,
                secure: false,
            },
        );
        g.expect(&[with_status(ok(0, id, OP_DISCARD), ERROR)]);
    }
    // Still served afterwards.
    let r = g.read(0, SECTORS - 8, 8);
    g.expect(&[r]);
    g
}

fn misaligned_4k() -> Gen {
    let mut g = Gen::new(
        "a disk with 4096-byte logical sectors: a start sector, a segment offset or a length not a multiple of 8 sectors is BLKIF_RSP_ERROR (Misaligned I/O); aligned requests are served",
        SECTORS,
        4096,
    );
    g.queue(0, QueueOpts::default());
    let w = g.write(0, 8, 16);
    g.expect(&[w]);
    let r = g.read(0, 8, 16);
    g.expect(&[r]);
    for (sector, first, last) in [(9u64, 0u8, 7u8), (8, 1, 7), (8, 0, 6), (8, 4, 4)] {
        let id = g.id();
        let (gref, _) = g.page(false, GrantAccess::Rw);
        g.slot(
            0,
            &FrontRequest::Direct {
                operation: OP_READ,
                id,
                sector,
                handle: 0,
                segs: &[Segment {
                    gref,
                    first_sect: first,
                    last_sect: last,
                }],
            },
        );
        g.expect(&[with_status(ok(0, id, OP_READ), ERROR)]);
    }
    g
}

fn unknown_ops() -> Gen {
    let mut g = Gen::new(
        "unknown operations: 4 (BLKIF_OP_RESERVED_1), 7, 0x80 and 255 are answered BLKIF_RSP_EOPNOTSUPP; an indirect request whose inner operation is not read or write (flush, discard, indirect, 200) is BLKIF_RSP_ERROR; the queue carries on",
        SECTORS,
        512,
    );
    g.queue(0, QueueOpts::default());
    let mut expect = Vec::new();
    for op in [4u8, 7, 0x80, 255] {
        let id = g.id();
        let (segs, _) = g.segments(8, false);
        g.direct(0, op, id, 0, &segs);
        expect.push(with_status(ok(0, id, op), NOTSUPP));
    }
    g.expect(&expect);
    for inner in [
        OP_FLUSH_DISKCACHE,
        OP_DISCARD,
        OP_INDIRECT,
        OP_WRITE_BARRIER,
        200,
    ] {
        let id = g.id();
        let (gref, _) = g.page(false, GrantAccess::Ro);
        g.slot(
            0,
            &FrontRequest::Indirect {
                indirect_op: inner,
                id,
                sector: 0,
                handle: 0,
                nr_segments: 1,
                page_grefs: &[gref],
            },
        );
        g.expect(&[with_status(ok(0, id, inner), ERROR)]);
    }
    let r = g.read(0, 0, 8);
    g.expect(&[r]);
    g
}

fn bad_grants(mode: Mode) -> Gen {
    let mut g = Gen::new(
        &format!(
            "grant refs the backend may not use ({mode:?} mode): never granted, beyond the grant table, reserved (0..8), ended after granting, an indirect page never granted, and a read into a read-only grant are BLKIF_RSP_ERROR, never a crash and never a touch of other memory; a write from a read-only grant is served; the backend holds no grant at the end"
        ),
        SECTORS,
        512,
    );
    g.queue(
        0,
        QueueOpts {
            mode,
            ..QueueOpts::default()
        },
    );
    let never = 5000u32;
    let mut bad = vec![never, 1 << 20, 0, 3, u32::MAX];
    // Granted, then ended before the request.
    let (ended, _) = g.page(true, GrantAccess::Rw);
    g.ev.push(Event::Ungrant { gref: ended });
    bad.push(ended);
    for gref in bad.clone() {
        for op in [OP_READ, OP_WRITE] {
            let id = g.id();
            g.direct(0, op, id, 16, &[whole(gref)]);
            g.expect(&[with_status(ok(0, id, op), ERROR)]);
        }
    }
    // A good segment followed by a bad one: the whole request fails.
    let id = g.id();
    let (good, _) = g.page(false, GrantAccess::Rw);
    g.direct(0, OP_READ, id, 16, &[whole(good), whole(never)]);
    g.expect(&[with_status(ok(0, id, OP_READ), ERROR)]);
    // An indirect request whose indirect page was never granted.
    let id = g.id();
    g.slot(
        0,
        &FrontRequest::Indirect {
            indirect_op: OP_READ,
            id,
            sector: 0,
            handle: 0,
            nr_segments: 16,
            page_grefs: &[never],
        },
    );
    g.expect(&[with_status(ok(0, id, OP_READ), ERROR)]);
    // A read into a read-only page: the backend may not write it.
    let id = g.id();
    let (ro, _) = g.page(false, GrantAccess::Ro);
    g.direct(0, OP_READ, id, 0, &[whole(ro)]);
    g.expect(&[with_status(ok(0, id, OP_READ), ERROR)]);
    // A write from a read-only page is fine.
    let id = g.id();
    let (ro, bytes) = g.page(true, GrantAccess::Ro);
    g.direct(0, OP_WRITE, id, 24, &[whole(ro)]);
    g.disk[24 * 512..24 * 512 + 4096].copy_from_slice(&bytes);
    g.expect(&[ok(0, id, OP_WRITE)]);
    let r = g.read(0, 24, 8);
    g.expect(&[r]);
    g
}

fn event_storm() -> Gen {
    let mut g = Gen::new(
        "XSA-332: an event storm with no requests (5000 notifications). The backend must not spin: spurious events are unmasked late; a request after the storm is still answered",
        SECTORS,
        512,
    );
    g.queue(0, QueueOpts::default());
    g.ev.push(Event::Kick { q: 0, count: 5000 });
    g.ev.push(Event::Quiet { ms: 20 });
    let w = g.write(0, 0, 8);
    g.expect(&[w]);
    g.ev.push(Event::Kick { q: 0, count: 1000 });
    let r = g.read(0, 0, 8);
    g.expect(&[r]);
    g
}

fn reconnect_in_flight() -> Gen {
    let mut g = Gen::new(
        "XSA-350 and reconnect: the frontend disconnects with requests in flight (a flush and writes), reconnects on the same ring pages and works on; every consumed request is answered before the queue goes, no grant stays mapped (checked at the end)",
        SECTORS,
        512,
    );
    g.queue(
        0,
        QueueOpts {
            mode: Mode::Map,
            persistent: true,
            pages: 2,
            ..QueueOpts::default()
        },
    );
    let mut p: Vec<Pending> = (0..12).map(|i| g.write(0, i * 64, 64)).collect();
    p.push(g.flush(0));
    g.ev.push(Event::Sleep { ms: 300 });
    g.ev.push(Event::Reconnect { q: 0 });
    g.expect(&p);
    let r: Vec<Pending> = (0..12).map(|i| g.read(0, i * 64, 64)).collect();
    g.expect(&r);
    g.ev.push(Event::Reconnect { q: 0 });
    let r = g.read(0, 0, 8);
    g.expect(&[r]);
    g
}

fn duplicate_ids() -> Gen {
    let mut g = Gen::new(
        "hostile ids: four requests in flight with the same id, and id u64::MAX; each is answered once (the backend tracks requests by its own slot, never by the guest's id)",
        SECTORS,
        512,
    );
    g.queue(0, QueueOpts::default());
    let mut p = Vec::new();
    for i in 0..4u64 {
        let (segs, _) = g.segments(8, false);
        g.direct(0, OP_READ, 42, i * 8, &segs);
        p.push(Pending {
            q: 0,
            id: 42,
            op: OP_READ,
            status: OKAY,
            data: Some(vec![0; 4096]),
        });
    }
    g.expect(&p);
    let (segs, _) = g.segments(8, false);
    g.direct(0, OP_READ, u64::MAX, 0, &segs);
    g.expect(&[Pending {
        q: 0,
        id: u64::MAX,
        op: OP_READ,
        status: OKAY,
        data: Some(vec![0; 4096]),
    }]);
    g
}

fn corpus() -> Vec<(&'static str, Gen)> {
    vec![
        ("boot", boot()),
        ("sequential-map", sequential()),
        ("random-mix-x86_32", random_mix()),
        ("flush-discard", flush_discard()),
        ("indirect", indirect()),
        ("multi-queue", multi_queue()),
        ("hostile-bogus-req-prod", bogus_req_prod()),
        ("hostile-req-prod-backwards", bogus_req_prod_backwards()),
        ("hostile-segment-counts", segment_counts()),
        ("hostile-bad-sectors", bad_sectors()),
        ("hostile-misaligned-4k", misaligned_4k()),
        ("hostile-unknown-ops", unknown_ops()),
        ("hostile-bad-grants-copy", bad_grants(Mode::Copy)),
        ("hostile-bad-grants-map", bad_grants(Mode::Map)),
        ("hostile-event-storm", event_storm()),
        ("hostile-reconnect-in-flight", reconnect_in_flight()),
        ("hostile-duplicate-ids", duplicate_ids()),
    ]
}

fn traces_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("traces")
}

#[test]
fn corpus_is_what_the_generator_writes() {
    let regen = std::env::var_os("REGEN_TRACES").is_some();
    let dir = traces_dir();
    let mut stale = Vec::new();
    for (name, g) in corpus() {
        let path = dir.join(format!("{name}.trace"));
        let text = g.text();
        if regen {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(&path, &text).unwrap();
        } else if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
            stale.push(name);
        }
    }
    assert!(
        stale.is_empty(),
        "traces out of date with their generator: {stale:?} (REGEN_TRACES=1 cargo test -p tests --test replay_gen)"
    );
}
