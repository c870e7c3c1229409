//! Disks on NBD exports (issue 16): `blkbackd serve --open-params` with `params` an NBD URI,
//! against real servers each test starts: qemu-storage-daemon on a qcow2 image, nbdkit on a
//! raw file (grant-map mode), qemu-nbd over TCP, a read-only export; `blkhotplug` handing a
//! connection to `blkbackd supervise --handoff-dir`; nbdkit killed and restarted in the middle
//! of the workload (the backend reconnects); fake servers that break the protocol or fall
//! silent. A simulated guest runs a verified workload (random reads and writes at queue
//! depth 16 and 32, flushes, discards, barriers) and the data is checked where it landed (the
//! qcow2 image through qemu-img once the server is gone, the raw files directly).
//!
//! A test whose server program is not installed says so (`SKIPPED (...)` on stderr) and
//! passes, as the NBD client's tests do; CI installs them (`.ci/run`'s `need`, which fails
//! when it cannot). Nothing waits without a bound: a server's socket is awaited for at most
//! [`READY`], and the server is killed when the test ends, however it ends.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use ring::Status;
use sim::front::{FrontOptions, IoOp, SimFront};
use sim::toolstack::VbdSpec;
use sim::workload::{self, DiskModel, Planned, Rng};
use tests::{backend_node, exercise, refused_error, remove, Backend, Sim, DEVID, GUEST};

/// How long a server may take to listen.
const READY: Duration = Duration::from_secs(20);
const MIB: u64 = 1 << 20;
/// Bytes of one workload block ([`DiskModel`]'s unit).
const BLOCK: u64 = 4096;

/// Whether every one of `programs` is on the PATH; if not, reports the test skipped.
fn installed(programs: &[&str]) -> bool {
    for program in programs {
        let found = std::env::var_os("PATH").is_some_and(|path| {
            std::env::split_paths(&path).any(|dir| dir.join(program).is_file())
        });
        if !found {
            sim::skip::report_skip(&format!("{program} is not installed"));
            return false;
        }
    }
    true
}

fn run(program: &str, args: &[&str]) {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

fn path(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 temporary directory")
}

/// A running NBD server on a Unix socket, killed (and reaped) when dropped.
struct Server {
    child: Child,
    log: PathBuf,
}

impl Server {
    /// Starts `program` and waits until `socket` accepts connections.
    fn start(program: &str, args: &[&str], socket: &Path, dir: &Path) -> Self {
        Self::start_until(program, args, dir, || {
            std::os::unix::net::UnixStream::connect(socket).is_ok()
        })
    }

    /// Starts `program` and waits until `listening` says it listens.
    fn start_until(program: &str, args: &[&str], dir: &Path, listening: impl Fn() -> bool) -> Self {
        let log = dir.join(format!("{program}.log"));
        let out = fs::File::create(&log).unwrap();
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
        let mut server = Self { child, log };
        let deadline = Instant::now() + READY;
        while !listening() {
            if let Some(status) = server.child.try_wait().unwrap() {
                panic!(
                    "{program} exited ({status}) before listening:\n{}",
                    server.log()
                );
            }
            assert!(Instant::now() < deadline, "{program} never listened");
            thread::sleep(Duration::from_millis(20));
        }
        server
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn stop(mut self) {
        self.kill();
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// qemu-storage-daemon serving `image` (of `format`) as export `disk0` on `socket`.
fn qemu_storage_daemon(image: &Path, format: &str, writable: bool, socket: &Path) -> Server {
    let file = format!("driver=file,node-name=file0,filename={}", path(image));
    let fmt = format!("driver={format},node-name=disk0,file=file0");
    let nbd = format!("addr.type=unix,addr.path={}", path(socket));
    let export = format!(
        "type=nbd,id=exp0,node-name=disk0,name=disk0,writable={}",
        if writable { "on" } else { "off" }
    );
    let dir = socket.parent().unwrap();
    Server::start(
        "qemu-storage-daemon",
        &[
            "--blockdev",
            &file,
            "--blockdev",
            &fmt,
            "--nbd-server",
            &nbd,
            "--export",
            &export,
        ],
        socket,
        dir,
    )
}

/// nbdkit's file plugin serving `image` on `socket` (`-r`: read-only).
fn nbdkit_file(image: &Path, read_only: bool, socket: &Path) -> Server {
    let file = format!("file={}", path(image));
    // nbdkit ends with the thread that started it (--exit-with-parent follows the thread).
    let mut args = vec!["--exit-with-parent", "-f", "-U", path(socket)];
    if read_only {
        args.push("-r");
    }
    args.extend(["file", &file]);
    Server::start("nbdkit", &args, socket, socket.parent().unwrap())
}

/// Starts `blkbackd serve` (up to 4 queues) with `extra` arguments for a vbd whose `params`
/// is `uri` (mode `mode`).
fn serve_nbd(sim: &Sim, uri: &str, mode: &str, extra: &[&str]) -> (VbdSpec, Backend) {
    let mut spec = VbdSpec::disk(0, GUEST, DEVID, uri);
    spec.mode = mode.to_owned();
    sim.create_vbd(&spec);
    let mut args = vec!["--open-params", "--max-queues", "4"];
    args.extend_from_slice(extra);
    let backend = Backend::serve(sim, &spec, &args);
    (spec, backend)
}

/// Once the backend holds the export, a guest (asking for 2 queues) connects; it gets 2 when
/// the server allows several connections (`multi_conn`: nbdkit's file and memory plugins),
/// else 1.
fn connect(sim: &Sim, spec: &VbdSpec, multi_conn: bool) -> SimFront {
    sim.wait_for(&format!("{}/opened", spec.backend_path()), "1");
    let offered = if multi_conn { "4" } else { "1" };
    assert_eq!(
        backend_node(sim, spec, "multi-queue-max-queues").as_deref(),
        Some(offered),
        "one queue per connection"
    );
    let mut front = sim.front(FrontOptions::default());
    let info = front.connect().expect("connecting");
    assert_eq!(info.queues, if multi_conn { 2 } else { 1 });
    front
}

/// The guest's verified workload ([`exercise`]: sequential and random writes and reads at
/// depth 16 and 32, a flush), then discards (read back as zeros where `model` says discards
/// zero), random writes, a barrier with data and a flush, all checked against `model`.
fn workload(front: &mut SimFront, model: &mut DiskModel) {
    exercise(front, model);
    let blocks = model.blocks().min(2048);
    let mut rng = Rng::new(7);
    let discards: Vec<Planned> = (0..8)
        .map(|_| Planned::Discard {
            block: rng.next_u64() % (blocks - 16),
            count: 1 + rng.next_u64() % 16,
        })
        .collect();
    workload::run(front, model, &discards, 8).expect("discards");
    workload::run(
        front,
        model,
        &workload::random_blocks(&mut rng, blocks, 64, true),
        32,
    )
    .expect("random writes after the discards");
    // A barrier and a flush, each carrying data.
    let data = vec![0x5au8; 8192];
    let c = front
        .execute(
            0,
            IoOp::Barrier {
                sector: 0,
                data: &data,
            },
        )
        .expect("barrier");
    assert_eq!(c.status(), Some(Status::Okay));
    let c = front.execute(0, IoOp::Flush).expect("flush");
    assert_eq!(c.status(), Some(Status::Okay));
    let c = front.read(0, 0, 16).expect("reading the barrier's data");
    assert_eq!(c.data.as_deref(), Some(&data[..]));
    // The model's first two blocks again, so that everything can be checked.
    let rewrite = [Planned::Write { block: 0, count: 2 }];
    workload::run(front, model, &rewrite, 1).expect("rewriting the barrier's blocks");
    workload::run(front, model, &workload::sequential(blocks, 16, false), 16)
        .expect("reading everything back");
}

/// Checks `image` (raw) against what the guest last read through the backend: block by
/// block, over the first `blocks` blocks, `expected` being the guest's own read of them.
fn verify_raw(image: &Path, expected: &[u8]) {
    let file = fs::File::open(image).unwrap();
    let mut buf = vec![0u8; expected.len()];
    file.read_exact_at(&mut buf, 0).unwrap();
    for (i, (a, b)) in buf
        .chunks(BLOCK as usize)
        .zip(expected.chunks(BLOCK as usize))
        .enumerate()
    {
        assert!(
            a == b,
            "block {i} of {} differs from what the guest read",
            image.display()
        );
    }
}

/// Reads the first `blocks` blocks through the guest, up to 32 at a time.
fn read_all(front: &mut SimFront, blocks: u64) -> Vec<u8> {
    let mut all = Vec::with_capacity((blocks * BLOCK) as usize);
    let per = u64::from(front.max_sectors_per_request() / 8).clamp(1, 32);
    let mut block = 0;
    while block < blocks {
        let n = per.min(blocks - block);
        let c = front
            .read(0, block * 8, u32::try_from(n * 8).unwrap())
            .expect("reading");
        assert_eq!(c.status(), Some(Status::Okay));
        all.extend_from_slice(&c.data.expect("data"));
        block += n;
    }
    all
}

#[test]
fn qcow2_through_qemu_storage_daemon() {
    if !installed(&["qemu-img", "qemu-storage-daemon"]) {
        return;
    }
    let sim = Sim::new("nbd-qsd");
    let image = sim.tmp().join("disk.qcow2");
    let socket = sim.tmp().join("qsd.sock");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", path(&image), "16M"],
    );
    let server = qemu_storage_daemon(&image, "qcow2", true, &socket);
    let uri = format!("nbd+unix:///disk0?socket={}", path(&socket));
    let (spec, mut backend) = serve_nbd(&sim, &uri, "w", &[]);
    let mut front = connect(&sim, &spec, true);
    let info = *front.info().unwrap();
    assert_eq!(info.sectors, 16 * 2048);
    assert_eq!(info.sector_size, 512);
    assert_eq!(info.info & 4, 0, "writable");
    assert!(info.flush && info.barrier, "qemu's NBD server flushes");
    assert!(info.discard, "qemu's NBD server trims");
    assert!(!info.discard_secure);
    // A fresh image: its clusters were never written, and come as holes.
    let c = front.read(0, 8192, 64).expect("reading the fresh image");
    assert_eq!(c.status(), Some(Status::Okay));
    assert!(c.data.expect("data").iter().all(|&b| b == 0));
    // qcow2 drops a discard smaller than its 64 KiB clusters: discarded blocks are unknown.
    let mut model = DiskModel::zeroed(info.sectors / 8, false);
    workload(&mut front, &mut model);
    let blocks = model.blocks().min(2048);
    let seen = read_all(&mut front, blocks);
    remove(&sim, &spec, &mut backend, &mut front);
    server.stop();
    // Two connections, each with structured replies; never-written clusters came as holes.
    let report = backend.stats().expect("statistics");
    println!("{}", report.display());
    let nbd = &report.nbd;
    assert_eq!(nbd.len(), 2, "one connection per queue");
    assert!(nbd.iter().all(|c| c.structured == 1), "{nbd:?}");
    assert!(nbd
        .iter()
        .all(|c| c.in_flight == 0 && c.errors == 0 && c.lost == 0));
    let sum = |f: fn(&backend::dataplane::NbdSnapshot) -> u64| nbd.iter().map(f).sum::<u64>();
    assert!(sum(|c| c.hole_bytes) > 0, "{nbd:?}");
    assert!(sum(|c| c.rd_bytes) >= sum(|c| c.hole_bytes));
    let c = report.counters;
    assert_eq!(sum(|c| c.rd_req), c.rd_req, "one NBD read per guest read");
    assert_eq!(sum(|c| c.rd_bytes), c.rd_sect * 512);
    assert!(sum(|c| c.wr_bytes) == c.wr_sect * 512 && sum(|c| c.ds_req) >= c.ds_req);

    // The data is in the qcow2 image: converted to raw by qemu-img, checked there.
    let raw = sim.tmp().join("disk.raw");
    run(
        "qemu-img",
        &["convert", "-U", "-O", "raw", path(&image), path(&raw)],
    );
    verify_raw(&raw, &seen);
}

/// In grant-map mode: the guest's mapped pages are sent and received directly.
#[test]
fn raw_file_through_nbdkit() {
    if !installed(&["nbdkit"]) {
        return;
    }
    let sim = Sim::new("nbd-nbdkit");
    let image = sim.tmp().join("disk.raw");
    let socket = sim.tmp().join("nbdkit.sock");
    fs::File::create(&image).unwrap().set_len(16 * MIB).unwrap();
    let server = nbdkit_file(&image, false, &socket);
    let uri = format!("nbd+unix:///?socket={}", path(&socket));
    let (spec, mut backend) = serve_nbd(&sim, &uri, "w", &["--grant-mode", "map"]);
    let mut front = connect(&sim, &spec, true);
    let info = *front.info().unwrap();
    assert_eq!(info.sectors, 16 * 2048);
    assert!(info.persistent, "the guest's pages go to the socket mapped");
    assert!(info.flush && info.discard);
    let mut model = DiskModel::zeroed(info.sectors / 8, true);
    workload(&mut front, &mut model);
    let blocks = model.blocks().min(2048);
    let seen = read_all(&mut front, blocks);
    verify_raw(&image, &seen);
    remove(&sim, &spec, &mut backend, &mut front);
    let c = backend.stats().expect("statistics").counters;
    assert!(
        c.rd_req > 0 && c.wr_req > 0 && c.ds_req == 8 && c.f_req >= 3,
        "{c:?}"
    );
    server.stop();
}

/// A read-only export: served as a read-only disk to a `mode=r` vbd (reads work, writes and
/// discards fail, nothing changes), refused for a `mode=w` one.
#[test]
fn read_only_export() {
    let nbdkit = installed(&["nbdkit"]);
    if !nbdkit && !installed(&["qemu-storage-daemon"]) {
        return;
    }
    let sim = Sim::new("nbd-ro");
    let image = sim.tmp().join("disk.raw");
    let socket = sim.tmp().join("ro.sock");
    fs::write(&image, vec![0x42u8; (4 * MIB) as usize]).unwrap();
    let (server, uri) = if nbdkit {
        let uri = format!("nbd+unix:///?socket={}", path(&socket));
        (nbdkit_file(&image, true, &socket), uri)
    } else {
        let uri = format!("nbd+unix:///disk0?socket={}", path(&socket));
        (qemu_storage_daemon(&image, "raw", false, &socket), uri)
    };

    // mode=w on a read-only export: refused before anything is published.
    let (spec, mut backend) = serve_nbd(&sim, &uri, "w", &[]);
    let error = refused_error(&sim, &spec);
    assert!(error.starts_with("30 creating vbd structure"), "{error}");
    backend.terminate();
    backend.wait_exit(Duration::from_secs(10));
    sim::toolstack::destroy_vbd(&sim.dom0, &spec).unwrap();

    let (spec, mut backend) = serve_nbd(&sim, &uri, "r", &[]);
    let mut front = connect(&sim, &spec, true);
    let info = *front.info().unwrap();
    assert_eq!(info.info & 4, 4, "VDISK_READONLY");
    assert!(!info.discard, "no discard on a read-only disk");
    let c = front.read(0, 0, 8).unwrap();
    assert_eq!(c.data, Some(vec![0x42; 4096]));
    let c = front.write(0, 0, &[0u8; 4096]).unwrap();
    assert_eq!(c.status(), Some(Status::Error));
    let c = front
        .execute(
            0,
            IoOp::Discard {
                sector: 0,
                sectors: 8,
                secure: false,
            },
        )
        .unwrap();
    assert_ne!(c.status(), Some(Status::Okay));
    let c = front.read(0, 0, 8).unwrap();
    assert_eq!(
        c.data,
        Some(vec![0x42; 4096]),
        "the refused write changed nothing"
    );
    remove(&sim, &spec, &mut backend, &mut front);
    server.stop();
    assert!(fs::read(&image).unwrap().iter().all(|&b| b == 0x42));
}

/// What a fake server does once the handshake is over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Misbehaviour {
    /// Nothing wrong: every request succeeds (reads return zeros).
    Behaves,
    /// Fails every request with `NBD_EIO` (the connection stays usable).
    FailEverything,
    /// Answers the first request with a reply whose magic is wrong.
    WrongMagic,
    /// Answers the first request with a structured reply, never negotiated.
    StructuredReply,
    /// Answers the first request with a cookie that names nothing.
    UnknownCookie,
    /// Answers the first read with half its data, then closes the connection.
    ShortRead,
    /// Reads requests and never answers.
    Silent,
    /// Agrees to structured replies and keeps a 4 MiB disk in memory: a read comes back in
    /// 4 KiB pieces, last first, each data or (all zeroes) a hole, then
    /// `NBD_REPLY_TYPE_NONE` (a read of one piece: that piece is the last chunk); other
    /// commands get `NBD_REPLY_TYPE_NONE`, flush a simple reply.
    Structured,
    /// Structured replies: a read's second data chunk overlaps its first.
    ChunkOverlap,
    /// Structured replies: a read's data chunk lies before the request.
    ChunkOutside,
    /// Structured replies: a read's data chunk is longer than the request.
    ChunkTooLong,
    /// Structured replies: a read's reply ends (`NBD_REPLY_FLAG_DONE`) half covered.
    ChunkIncomplete,
}

impl Misbehaviour {
    fn structured(self) -> bool {
        matches!(
            self,
            Self::Structured
                | Self::ChunkOverlap
                | Self::ChunkOutside
                | Self::ChunkTooLong
                | Self::ChunkIncomplete
        )
    }
}

/// One structured reply chunk for `cookie`.
fn chunk(kind: u16, done: bool, cookie: u64, payload: &[u8]) -> Vec<u8> {
    let header = nbd::structured::ChunkHeader {
        flags: if done {
            nbd::structured::REPLY_FLAG_DONE
        } else {
            0
        },
        kind,
        cookie,
        length: u32::try_from(payload.len()).unwrap(),
    };
    let mut c = header.encode().to_vec();
    c.extend_from_slice(payload);
    c
}

/// An offset, then `rest`: a content chunk's payload.
fn at(offset: u64, rest: &[u8]) -> Vec<u8> {
    let mut p = offset.to_be_bytes().to_vec();
    p.extend_from_slice(rest);
    p
}

/// [`Misbehaviour::Structured`]'s reply to a read of `disk` (the whole export).
fn structured_read(req: &nbd::Request, disk: &[u8]) -> Vec<u8> {
    use nbd::structured::{TYPE_NONE, TYPE_OFFSET_DATA, TYPE_OFFSET_HOLE};
    let start = req.offset as usize;
    let end = start + req.length as usize;
    let pieces: Vec<usize> = (start..end).step_by(4096).collect();
    let single = pieces.len() == 1;
    let mut out = Vec::new();
    for &p in pieces.iter().rev() {
        let data = &disk[p..(p + 4096).min(end)];
        out.extend(if data.iter().all(|&b| b == 0) {
            let len = u32::try_from(data.len()).unwrap().to_be_bytes();
            chunk(TYPE_OFFSET_HOLE, single, req.cookie, &at(p as u64, &len))
        } else {
            chunk(TYPE_OFFSET_DATA, single, req.cookie, &at(p as u64, data))
        });
    }
    if !single {
        out.extend(chunk(TYPE_NONE, true, req.cookie, &[]));
    }
    out
}

/// The commands a fake server received, with their flags.
type Received = std::sync::Arc<std::sync::Mutex<Vec<(nbd::Command, u16)>>>;

/// A fake NBD server on a Unix socket: a correct handshake (a 4 MiB export with transmission
/// `flags`), then `how`, recording each command in `received`. It serves one connection and
/// ends when the backend closes it.
fn fake_server(
    socket: &Path,
    how: Misbehaviour,
    flags: u16,
    received: Received,
) -> thread::JoinHandle<()> {
    use nbd::handshake::{
        FLAG_FIXED_NEWSTYLE, IHAVEOPT, INFO_EXPORT, NBDMAGIC, OPTION_REPLY_MAGIC, OPT_GO,
        OPT_STRUCTURED_REPLY, REP_ACK, REP_ERR_UNSUP, REP_INFO,
    };
    use nbd::structured::{TYPE_NONE, TYPE_OFFSET_DATA};
    use nbd::wire::{Request, SimpleReply, REQUEST_LEN, SIMPLE_REPLY_LEN, STRUCTURED_REPLY_MAGIC};
    use nbd::NbdError;
    use std::io::{Read, Write};

    let listener = std::os::unix::net::UnixListener::bind(socket).unwrap();
    thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut b8 = [0u8; 8];
        let mut b4 = [0u8; 4];
        s.write_all(&NBDMAGIC.to_be_bytes()).unwrap();
        s.write_all(&IHAVEOPT.to_be_bytes()).unwrap();
        s.write_all(&FLAG_FIXED_NEWSTYLE.to_be_bytes()).unwrap();
        s.read_exact(&mut b4).unwrap();
        // NBD_OPT_STRUCTURED_REPLY, agreed to or not.
        s.read_exact(&mut b8).unwrap();
        s.read_exact(&mut b4).unwrap();
        assert_eq!(u32::from_be_bytes(b4), OPT_STRUCTURED_REPLY);
        s.read_exact(&mut b4).unwrap();
        assert_eq!(u32::from_be_bytes(b4), 0);
        s.write_all(&OPTION_REPLY_MAGIC.to_be_bytes()).unwrap();
        s.write_all(&OPT_STRUCTURED_REPLY.to_be_bytes()).unwrap();
        let answer = if how.structured() {
            REP_ACK
        } else {
            REP_ERR_UNSUP
        };
        s.write_all(&answer.to_be_bytes()).unwrap();
        s.write_all(&0u32.to_be_bytes()).unwrap();
        // NBD_OPT_GO: its header, then its data, ignored.
        s.read_exact(&mut b8).unwrap();
        s.read_exact(&mut b4).unwrap();
        assert_eq!(u32::from_be_bytes(b4), OPT_GO);
        s.read_exact(&mut b4).unwrap();
        let mut data = vec![0; u32::from_be_bytes(b4) as usize];
        s.read_exact(&mut data).unwrap();
        let mut info = INFO_EXPORT.to_be_bytes().to_vec();
        info.extend_from_slice(&(4 * MIB).to_be_bytes());
        info.extend_from_slice(&flags.to_be_bytes());
        for (kind, payload) in [(REP_INFO, &info[..]), (REP_ACK, &[][..])] {
            s.write_all(&OPTION_REPLY_MAGIC.to_be_bytes()).unwrap();
            s.write_all(&OPT_GO.to_be_bytes()).unwrap();
            s.write_all(&kind.to_be_bytes()).unwrap();
            s.write_all(&(payload.len() as u32).to_be_bytes()).unwrap();
            s.write_all(payload).unwrap();
        }
        let mut header = [0u8; REQUEST_LEN];
        let mut disk = vec![0u8; 4 * MIB as usize];
        while s.read_exact(&mut header).is_ok() {
            let req = Request::decode(&header).unwrap();
            received.lock().unwrap().push((req.command, req.flags));
            let range = req.offset as usize..(req.offset + u64::from(req.length)) as usize;
            if req.command == nbd::Command::Write && s.read_exact(&mut disk[range.clone()]).is_err()
            {
                return;
            }
            if matches!(req.command, nbd::Command::Trim | nbd::Command::WriteZeroes) {
                disk[range.clone()].fill(0);
            }
            let read = req.command == nbd::Command::Read;
            let done = chunk(TYPE_NONE, true, req.cookie, &[]);
            let data = |offset: u64, len: usize| {
                chunk(
                    TYPE_OFFSET_DATA,
                    true,
                    req.cookie,
                    &at(offset, &vec![0; len]),
                )
            };
            let half = req.length as usize / 2;
            let ok = SimpleReply {
                error: None,
                cookie: req.cookie,
            }
            .encode();
            let reply = match how {
                Misbehaviour::Behaves => {
                    let mut r = ok.to_vec();
                    if req.command == nbd::Command::Read {
                        r.resize(SIMPLE_REPLY_LEN + req.length as usize, 0);
                    }
                    r
                }
                Misbehaviour::FailEverything => SimpleReply {
                    error: Some(NbdError::Io),
                    cookie: req.cookie,
                }
                .encode()
                .to_vec(),
                Misbehaviour::WrongMagic => {
                    let mut r = ok;
                    r[0] ^= 0xff;
                    r.to_vec()
                }
                Misbehaviour::StructuredReply => {
                    let mut r = ok;
                    r[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
                    r.to_vec()
                }
                Misbehaviour::UnknownCookie => SimpleReply {
                    error: None,
                    cookie: req.cookie ^ 0x1234_5678_0000_0000,
                }
                .encode()
                .to_vec(),
                Misbehaviour::Silent => continue,
                Misbehaviour::Structured if read => structured_read(&req, &disk),
                Misbehaviour::Structured if req.command == nbd::Command::Flush => ok.to_vec(),
                Misbehaviour::ChunkOverlap if read => {
                    let mut r = data(req.offset, half);
                    r[4..6].fill(0);
                    r.extend(data(req.offset + half as u64 - 512, half + 512));
                    r
                }
                Misbehaviour::ChunkOutside if read => data(req.offset.wrapping_sub(512), 512),
                Misbehaviour::ChunkTooLong if read => data(req.offset, req.length as usize + 4096),
                Misbehaviour::ChunkIncomplete if read => data(req.offset, half),
                Misbehaviour::Structured
                | Misbehaviour::ChunkOverlap
                | Misbehaviour::ChunkOutside
                | Misbehaviour::ChunkTooLong
                | Misbehaviour::ChunkIncomplete => done,
                Misbehaviour::ShortRead => {
                    let mut r = ok.to_vec();
                    r.resize(SIMPLE_REPLY_LEN + req.length as usize / 2, 0xee);
                    s.write_all(&r).unwrap();
                    return;
                }
            };
            if s.write_all(&reply).is_err() {
                return;
            }
        }
    })
}

/// A server that breaks the protocol, fails requests or never answers: every guest request is
/// answered (with `BLKIF_RSP_ERROR`), in bounded time (`--nbd-timeout 2` for the silent one),
/// the backend neither crashes nor hangs, and the disk is removed cleanly. A server error
/// fails that request only; a broken protocol or a silence fails every request from then on.
#[test]
fn hostile_servers_give_errors_not_crashes() {
    for how in [
        Misbehaviour::FailEverything,
        Misbehaviour::WrongMagic,
        Misbehaviour::StructuredReply,
        Misbehaviour::UnknownCookie,
        Misbehaviour::ShortRead,
        Misbehaviour::Silent,
        Misbehaviour::ChunkOverlap,
        Misbehaviour::ChunkOutside,
        Misbehaviour::ChunkTooLong,
        Misbehaviour::ChunkIncomplete,
    ] {
        let sim = Sim::new(&format!("nbd-hostile-{how:?}"));
        let socket = sim.tmp().join("fake.sock");
        let flags = nbd::TransmissionFlags::HAS_FLAGS | nbd::TransmissionFlags::SEND_FLUSH;
        let server = fake_server(&socket, how, flags, Received::default());
        let uri = format!("nbd+unix:///?socket={}", path(&socket));
        let (spec, mut backend) = serve_nbd(&sim, &uri, "w", &["--nbd-timeout", "2"]);
        let mut front = connect(&sim, &spec, false);
        let start = Instant::now();
        for _ in 0..3 {
            let c = front.read(0, 0, 8).expect("an answer");
            assert_eq!(c.status(), Some(Status::Error), "{how:?}");
            let c = front.write(0, 8, &[1u8; 4096]).expect("an answer");
            assert_eq!(c.status(), Some(Status::Error), "{how:?}");
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{how:?}");
        assert!(backend.running(), "{how:?}: the backend is still there");
        remove(&sim, &spec, &mut backend, &mut front);
        server.join().expect("the fake server");
        let nbd = backend.stats().expect("statistics").nbd;
        let [c] = nbd[..] else {
            panic!("{how:?}: one connection: {nbd:?}")
        };
        assert_eq!(c.structured, u64::from(how.structured()), "{how:?}");
        match how {
            Misbehaviour::FailEverything => assert!(c.errors == 6 && c.lost == 0, "{c:?}"),
            _ => assert!(c.lost == 1 && c.reconnects == 0, "{how:?}: {c:?}"),
        }
    }
}

/// Structured replies from a server that sends a read's pieces last first, holes for zeroes:
/// the guest's verified workload passes, its buffers in grant-copy (a bounce region) and
/// grant-map mode (the guest's mapped pages, where holes are written as zeroes).
#[test]
fn structured_replies_reassembled_in_both_grant_modes() {
    use nbd::TransmissionFlags as F;
    for mode in ["copy", "map"] {
        let sim = Sim::new(&format!("nbd-structured-{mode}"));
        let socket = sim.tmp().join("fake.sock");
        let flags = F::HAS_FLAGS | F::SEND_FLUSH | F::SEND_FUA | F::SEND_TRIM;
        let received = Received::default();
        let server = fake_server(&socket, Misbehaviour::Structured, flags, received.clone());
        let uri = format!("nbd+unix:///?socket={}", path(&socket));
        let (spec, mut backend) = serve_nbd(&sim, &uri, "w", &["--grant-mode", mode]);
        let mut front = connect(&sim, &spec, false);
        let info = *front.info().unwrap();
        assert!(info.persistent || mode == "copy");
        let mut model = DiskModel::zeroed(info.sectors / 8, true);
        workload(&mut front, &mut model);
        remove(&sim, &spec, &mut backend, &mut front);
        server.join().expect("the fake server");
        let reads = received
            .lock()
            .unwrap()
            .iter()
            .filter(|(c, _)| *c == nbd::Command::Read)
            .count();
        assert!(reads > 100, "{reads} reads");
    }
}

/// As a toolstack runs the binaries: `blkbackd supervise --handoff-dir` starts a backend for
/// the disk, `blkhotplug add` (the disk's script) connects to the NBD server `params` names
/// and hands the socket over, the backend negotiates the export on it, the guest's verified
/// workload passes, and `blkhotplug remove` has nothing to undo.
#[test]
fn blkhotplug_hands_an_nbd_connection_to_supervise() {
    if !installed(&["nbdkit"]) {
        return;
    }
    let sim = Sim::new("nbd-hotplug");
    let image = sim.tmp().join("disk.raw");
    let socket = sim.tmp().join("nbdkit.sock");
    fs::File::create(&image).unwrap().set_len(8 * MIB).unwrap();
    let server = nbdkit_file(&image, false, &socket);
    let sockets = sim.tmp().join("handoff");
    let supervisor = Command::new(tests::blkbackd())
        .args(["supervise", "--max-queues", "4", "--platform"])
        .arg(sim.platform_arg())
        .arg("--handoff-dir")
        .arg(&sockets)
        .stdin(Stdio::null())
        .spawn()
        .expect("starting blkbackd supervise");
    let mut supervisor = Server {
        child: supervisor,
        log: PathBuf::new(),
    };
    let uri = format!("nbd+unix:///?socket={}", path(&socket));
    let spec = VbdSpec::disk(0, GUEST, DEVID, &uri);
    sim.create_vbd(&spec);
    let be = spec.backend_path();
    let deadline = Instant::now() + READY;
    while backend_node(&sim, &spec, "handoff-socket").is_none() {
        assert!(Instant::now() < deadline, "no handoff-socket");
        thread::sleep(Duration::from_millis(20));
    }
    let blkhotplug = |action: &str| {
        let out = Command::new(tests::blkhotplug())
            .arg(action)
            .env("XENBUS_PATH", &be)
            .env("XENSTORED_PATH", sim::xenstore_socket(sim.dir(), 0))
            .stdin(Stdio::null())
            .output()
            .expect("running blkhotplug");
        assert!(
            out.status.success(),
            "blkhotplug {action}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    blkhotplug("add");
    assert_eq!(
        backend_node(&sim, &spec, "hotplug-status").as_deref(),
        Some("connected")
    );
    assert_eq!(backend_node(&sim, &spec, "physical-device"), None);
    let mut front = connect(&sim, &spec, true);
    let info = *front.info().unwrap();
    assert_eq!(info.sectors, 8 * 2048);
    let mut model = DiskModel::zeroed(info.sectors / 8, true);
    exercise(&mut front, &mut model);
    sim::toolstack::request_removal(&sim.dom0, &spec).expect("removal request");
    let lost = front.close().expect("closing the frontend");
    assert!(lost.is_empty(), "requests never answered: {lost:?}");
    let deadline = Instant::now() + READY;
    while backend_node(&sim, &spec, "handoff-socket").is_some_and(|s| Path::new(&s).exists()) {
        assert!(Instant::now() < deadline, "the backend did not exit");
        thread::sleep(Duration::from_millis(20));
    }
    blkhotplug("remove");
    supervisor.kill();
    server.stop();
}

/// `nbd://` over TCP: qemu-nbd serving a raw file on 127.0.0.1; the guest's verified workload
/// passes and the data is in the file.
#[test]
fn raw_file_through_qemu_nbd_over_tcp() {
    if !installed(&["qemu-nbd"]) {
        return;
    }
    let sim = Sim::new("nbd-tcp");
    let image = sim.tmp().join("disk.raw");
    fs::File::create(&image).unwrap().set_len(8 * MIB).unwrap();
    // A port nobody listens on now (qemu-nbd is told to bind it a moment later).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let port_arg = port.to_string();
    let server = Server::start_until(
        "qemu-nbd",
        &[
            "--persistent",
            "--format=raw",
            "--bind=127.0.0.1",
            "--port",
            &port_arg,
            "--export-name=disk0",
            path(&image),
        ],
        sim.tmp(),
        || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
    );
    let uri = format!("nbd://127.0.0.1:{port}/disk0");
    let (spec, mut backend) = serve_nbd(&sim, &uri, "w", &[]);
    let mut front = connect(&sim, &spec, false);
    let info = *front.info().unwrap();
    assert_eq!(info.sectors, 8 * 2048);
    assert!(info.flush && info.discard);
    let mut model = DiskModel::zeroed(info.sectors / 8, true);
    exercise(&mut front, &mut model);
    let seen = read_all(&mut front, model.blocks());
    remove(&sim, &spec, &mut backend, &mut front);
    server.stop();
    verify_raw(&image, &seen);
}

/// The server is killed (SIGKILL) while the guest's verified workload runs and started again a
/// second later: the backend reconnects (through its connector, as it is confined) and sends
/// again what had no reply; the guest sees a delay, no error, and every block it wrote reads
/// back, through the backend and in the file.
#[test]
fn server_killed_and_restarted_mid_workload() {
    if !installed(&["nbdkit"]) {
        return;
    }
    let sim = Sim::new("nbd-restart");
    let image = sim.tmp().join("disk.raw");
    let socket = sim.tmp().join("nbdkit.sock");
    fs::File::create(&image).unwrap().set_len(16 * MIB).unwrap();
    let mut server = nbdkit_file(&image, false, &socket);
    let uri = format!("nbd+unix:///?socket={}", path(&socket));
    let (spec, mut backend) = serve_nbd(&sim, &uri, "w", &["--nbd-timeout", "30"]);
    let mut front = connect(&sim, &spec, true);
    let info = *front.info().unwrap();
    let mut model = DiskModel::zeroed(info.sectors / 8, true);
    let blocks = model.blocks().min(2048);
    // The restarted server lives in the thread that starts it (nbdkit ends with its thread)
    // until the test says it is done.
    let restarted = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (done, wait_done) = std::sync::mpsc::channel::<()>();
    let restart = {
        let (image, socket) = (image.clone(), socket.clone());
        let restarted = std::sync::Arc::clone(&restarted);
        thread::spawn(move || {
            thread::sleep(Duration::from_millis(300));
            server.kill();
            let _ = fs::remove_file(&socket);
            thread::sleep(Duration::from_secs(1));
            let server = nbdkit_file(&image, false, &socket);
            restarted.store(true, std::sync::atomic::Ordering::Release);
            let _ = wait_done.recv();
            server.stop();
        })
    };
    let mut rng = Rng::new(11);
    let start = Instant::now();
    let mut after_restart = 0;
    while after_restart < 2 {
        if restarted.load(std::sync::atomic::Ordering::Acquire) {
            after_restart += 1;
        }
        for write in [true, false] {
            let plan = workload::random_blocks(&mut rng, blocks, 128, write);
            workload::run(&mut front, &mut model, &plan, 16)
                .expect("I/O across the restart: a delay, not an error");
        }
        assert!(start.elapsed() < Duration::from_secs(60), "no progress");
    }
    workload::run(
        &mut front,
        &mut model,
        &workload::sequential(blocks, 16, false),
        16,
    )
    .expect("everything written reads back");
    let seen = read_all(&mut front, blocks);
    remove(&sim, &spec, &mut backend, &mut front);
    let _ = done.send(());
    restart.join().expect("the restart");
    verify_raw(&image, &seen);
    // Each connection was lost once and made again, what had no reply sent again.
    let report = backend.stats().expect("statistics");
    println!("{}", report.display());
    assert_eq!(report.nbd.len(), 2);
    for c in &report.nbd {
        assert!(
            c.lost >= 1 && c.reconnects >= 1 && c.in_flight == 0,
            "{c:?}"
        );
    }
    assert!(report.nbd.iter().map(|c| c.resent).sum::<u64>() > 0);
}

/// The server's block size constraints: nbdkit asks for 4 KiB blocks and at most 64 KiB a
/// command (blocksize-policy filter). The guest is told 4 KiB sectors and 16 indirect segments
/// (64 KiB requests), and its verified workload passes.
#[test]
fn block_size_constraints() {
    if !installed(&["nbdkit"]) {
        return;
    }
    let sim = Sim::new("nbd-blocksize");
    let image = sim.tmp().join("disk.raw");
    let socket = sim.tmp().join("nbdkit.sock");
    fs::File::create(&image).unwrap().set_len(16 * MIB).unwrap();
    let file = format!("file={}", path(&image));
    let server = Server::start(
        "nbdkit",
        &[
            "--exit-with-parent",
            "-f",
            "-U",
            path(&socket),
            "--filter=blocksize-policy",
            "file",
            &file,
            "blocksize-minimum=4096",
            "blocksize-preferred=4096",
            "blocksize-maximum=65536",
        ],
        &socket,
        sim.tmp(),
    );
    let uri = format!("nbd+unix:///?socket={}", path(&socket));
    let (spec, mut backend) = serve_nbd(&sim, &uri, "w", &[]);
    let mut front = connect(&sim, &spec, true);
    let info = *front.info().unwrap();
    assert_eq!(info.sector_size, 4096);
    assert_eq!(info.max_indirect_segments, 16);
    assert!(info.flush && info.barrier);
    let mut model = DiskModel::zeroed(info.sectors / 8, true);
    workload(&mut front, &mut model);
    // Not a whole 4 KiB block: refused before anything is sent.
    let c = front.read(0, 1, 1).unwrap();
    assert_eq!(c.status(), Some(Status::Error));
    let seen = read_all(&mut front, model.blocks().min(2048));
    remove(&sim, &spec, &mut backend, &mut front);
    server.stop();
    verify_raw(&image, &seen);
}

/// An export whose server takes less than a blkif request (11 pages) in one command is
/// refused before anything is published.
#[test]
fn export_with_a_too_small_maximum_payload_is_refused() {
    if !installed(&["nbdkit"]) {
        return;
    }
    let sim = Sim::new("nbd-small-max");
    let socket = sim.tmp().join("nbdkit.sock");
    let server = Server::start(
        "nbdkit",
        &[
            "--exit-with-parent",
            "-f",
            "-U",
            path(&socket),
            "--filter=blocksize-policy",
            "memory",
            "size=4M",
            "blocksize-maximum=16384",
        ],
        &socket,
        sim.tmp(),
    );
    let uri = format!("nbd+unix:///?socket={}", path(&socket));
    let (spec, mut backend) = serve_nbd(&sim, &uri, "w", &[]);
    let error = refused_error(&sim, &spec);
    assert!(
        error.starts_with("19 creating vbd structure") && error.contains("maximum payload"),
        "{error}"
    );
    backend.terminate();
    backend.wait_exit(Duration::from_secs(10));
    server.stop();
}

/// A write that flushes (a barrier with data), on a server with FUA: `NBD_CMD_FLUSH`, then the
/// write with `NBD_FLAG_FUA`; without FUA: the write, then `NBD_CMD_FLUSH`. Each sent only
/// once the one before was answered (the fake server sees them in that order).
#[test]
fn flushing_writes_flush_then_write_fua_or_write_then_flush() {
    use nbd::wire::FLAG_FUA;
    use nbd::{Command as C, TransmissionFlags as F};
    for fua in [true, false] {
        let sim = Sim::new(&format!("nbd-fua-{fua}"));
        let socket = sim.tmp().join("fake.sock");
        let flags = F::HAS_FLAGS | F::SEND_FLUSH | if fua { F::SEND_FUA } else { 0 };
        let received = Received::default();
        let server = fake_server(&socket, Misbehaviour::Behaves, flags, received.clone());
        let uri = format!("nbd+unix:///?socket={}", path(&socket));
        let (spec, mut backend) = serve_nbd(&sim, &uri, "w", &[]);
        let mut front = connect(&sim, &spec, false);
        let data = vec![7u8; 4096];
        let c = front
            .execute(
                0,
                IoOp::Barrier {
                    sector: 8,
                    data: &data,
                },
            )
            .unwrap();
        assert_eq!(c.status(), Some(Status::Okay));
        let c = front.execute(0, IoOp::Flush).unwrap();
        assert_eq!(c.status(), Some(Status::Okay));
        let expected = if fua {
            vec![(C::Flush, 0), (C::Write, FLAG_FUA), (C::Flush, 0)]
        } else {
            vec![(C::Write, 0), (C::Flush, 0), (C::Flush, 0)]
        };
        assert_eq!(*received.lock().unwrap(), expected, "FUA offered: {fua}");
        remove(&sim, &spec, &mut backend, &mut front);
        server.join().expect("the fake server");
    }
}
