//! The client against real NBD servers that each test starts: qemu-storage-daemon serving a
//! qcow2 image over a Unix socket, nbdkit serving a raw file over a Unix socket, qemu-nbd
//! serving a read-only export over TCP. Each test writes patterned data at several offsets,
//! flushes, reads it back, and checks it where it landed (the raw file, or the qcow2 image
//! converted by qemu-img once the server is gone).
//!
//! A test whose server program is not installed says so (`SKIPPED (...)` on stderr) and
//! passes; CI installs them (`.ci/run`). Nothing waits without a bound: the server's socket
//! is awaited for at most [`READY`], the client has a timeout, and the server is killed when
//! the test ends, however it ends.

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use nbd::structured::{Chunk, ChunkHeader, CHUNK_HEADER_LEN};
use nbd::wire::Request;
use nbd::{Client, ClientError, Command as Cmd, Export, NbdError, RequestError, Uri};

/// How long a server may take to listen.
const READY: Duration = Duration::from_secs(20);
const TIMEOUT: Duration = Duration::from_secs(20);
const MIB: u64 = 1 << 20;

/// A directory for one test's image and socket, removed when the test ends.
struct Scratch(PathBuf);

impl Scratch {
    fn new(test: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("nbd-{test}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Whether `program` is on the PATH; if not, reports the test skipped.
fn installed(program: &str) -> bool {
    let found = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()));
    if !found {
        sim::skip::report_skip(&format!("{program} is not installed"));
    }
    found
}

/// A running server, killed (and reaped) when dropped; its output goes to a log file that a
/// failure prints.
struct Server {
    child: Child,
    log: PathBuf,
}

impl Server {
    fn start(program: &str, args: &[&str], scratch: &Scratch) -> Self {
        let log = scratch.path(&format!("{program}.log"));
        let out = fs::File::create(&log).unwrap();
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
        Self { child, log }
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Connects to `uri` as soon as the server listens (at most [`READY`] from now).
    fn connect(&mut self, uri: &str) -> Client {
        let uri: Uri = uri.parse().unwrap();
        let deadline = Instant::now() + READY;
        loop {
            match Client::connect_timeout(&uri, TIMEOUT) {
                Ok(client) => return client,
                // Not listening yet.
                Err(ClientError::Connect { .. }) if Instant::now() < deadline => {}
                Err(e) => panic!("connecting to {uri}: {e}\nserver log:\n{}", self.log()),
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "the server exited ({status}) before listening:\n{}",
                    self.log()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
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

/// A scratch path as a program argument.
fn path(p: &Path) -> String {
    p.to_str().expect("a UTF-8 temporary directory").to_owned()
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

/// A recognisable pattern for `len` bytes at `offset`: every 8 bytes hold their own offset
/// xor a seed, so a block read from the wrong place, or a stale one, shows.
fn pattern(seed: u64, offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .step_by(8)
        .flat_map(|i| ((offset + i) ^ seed).to_le_bytes())
        .collect()
}

/// The regions each test writes: (offset, length), in a disk of `size` bytes, aligned to
/// 4 KiB and apart from one another: the first block, a middle one, across a 64 KiB
/// boundary, the last 64 KiB.
fn regions(size: u64) -> Vec<(u64, usize)> {
    vec![
        (0, 4096),
        (3 * 4096, 8192),
        (size / 2 - 4096, 12288),
        (size - 65536, 65536),
    ]
}

/// Writes the pattern at each region (the last write with FUA when offered), flushes,
/// reads everything back; then checks the unwritten space reads as zeros, write-zeroes and
/// trim when offered, and that a request past the end is refused before it is sent.
fn exercise(client: &mut Client, seed: u64) -> Vec<(u64, Vec<u8>)> {
    let export: Export = *client.export();
    assert!(!export.flags.read_only());
    assert_eq!(export.size % 65536, 0);
    let written: Vec<(u64, Vec<u8>)> = regions(export.size)
        .into_iter()
        .map(|(offset, len)| (offset, pattern(seed, offset, len)))
        .collect();
    for (i, (offset, data)) in written.iter().enumerate() {
        let fua = export.flags.send_fua() && i + 1 == written.len();
        client.write(*offset, data, fua).unwrap();
    }
    if export.flags.send_flush() {
        client.flush().unwrap();
    }
    for (offset, data) in &written {
        let mut buf = vec![0; data.len()];
        client.read(*offset, &mut buf).unwrap();
        assert!(
            buf == *data,
            "{} bytes at {offset} read back differently",
            data.len()
        );
    }
    let mut buf = vec![0xff; 8192];
    client.read(MIB, &mut buf).unwrap();
    assert!(
        buf.iter().all(|&b| b == 0),
        "never-written space is not zero"
    );

    let scratch_region = export.size / 4;
    if export.flags.send_write_zeroes() {
        client
            .write(scratch_region, &pattern(seed, scratch_region, 8192), false)
            .unwrap();
        client.write_zeroes(scratch_region, 8192, false).unwrap();
        buf.fill(0xff);
        client.read(scratch_region, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0), "write-zeroes left data");
    }
    if export.flags.send_trim() {
        client.trim(scratch_region, 8192).unwrap();
    }
    let e = client.read(export.size - 4096, &mut [0; 8192]).unwrap_err();
    assert!(
        matches!(e, ClientError::Request(RequestError::OutOfBounds { .. })),
        "{e}"
    );
    // Still in step after the refusal.
    client.read(0, &mut buf[..4096]).unwrap();
    assert!(buf[..4096] == written[0].1[..]);
    written
}

fn verify(client: &mut Client, written: &[(u64, Vec<u8>)]) {
    for (offset, data) in written {
        let mut buf = vec![0; data.len()];
        client.read(*offset, &mut buf).unwrap();
        assert!(
            buf == *data,
            "{} bytes at {offset} differ on a new connection",
            data.len()
        );
    }
}

fn verify_file(path: &Path, written: &[(u64, Vec<u8>)]) {
    let file = fs::File::open(path).unwrap();
    for (offset, data) in written {
        let mut buf = vec![0; data.len()];
        file.read_exact_at(&mut buf, *offset).unwrap();
        assert!(
            buf == *data,
            "{} bytes at {offset} differ in {}",
            data.len(),
            path.display()
        );
    }
}

#[test]
fn qcow2_through_qemu_storage_daemon_over_unix() {
    if !installed("qemu-img") || !installed("qemu-storage-daemon") {
        return;
    }
    let scratch = Scratch::new("qsd");
    let image = scratch.path("disk.qcow2");
    let socket = scratch.path("nbd.sock");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", &path(&image), "64M"],
    );
    let file = format!("driver=file,node-name=file0,filename={}", image.display());
    let nbd = format!("addr.type=unix,addr.path={}", socket.display());
    let mut server = Server::start(
        "qemu-storage-daemon",
        &[
            "--blockdev",
            &file,
            "--blockdev",
            "driver=qcow2,node-name=disk0,file=file0",
            "--nbd-server",
            &nbd,
            "--export",
            "type=nbd,id=exp0,node-name=disk0,name=disk0,writable=on",
        ],
        &scratch,
    );
    let uri = format!("nbd+unix:///disk0?socket={}", socket.display());
    let mut client = server.connect(&uri);
    let export = *client.export();
    println!("{export:?}");
    assert_eq!(export.size, 64 * MIB);
    assert!(export.flags.send_flush());
    // Reads come as chunks; never-written clusters as holes (`exercise` reads some).
    assert!(export.structured_replies);
    let written = exercise(&mut client, 0x5eed_0001);
    client.disconnect().unwrap();

    // A second connection sees the data, and an export that does not exist is refused.
    let mut client = server.connect(&uri);
    verify(&mut client, &written);
    client.disconnect().unwrap();
    let missing = format!("nbd+unix:///nope?socket={}", socket.display());
    let e = Client::connect_timeout(&missing.parse().unwrap(), TIMEOUT).unwrap_err();
    println!("{e}");
    assert!(
        matches!(
            e,
            ClientError::Handshake(nbd::HandshakeError::Refused { .. })
        ),
        "{e}"
    );
    server.stop();

    // The data is in the qcow2 image: qemu-img converts it to raw, where it is checked.
    let raw = scratch.path("disk.raw");
    run(
        "qemu-img",
        &["convert", "-U", "-O", "raw", &path(&image), &path(&raw)],
    );
    verify_file(&raw, &written);
}

#[test]
fn raw_file_through_nbdkit_over_unix() {
    if !installed("nbdkit") {
        return;
    }
    let scratch = Scratch::new("nbdkit");
    let image = scratch.path("disk.raw");
    let socket = scratch.path("nbd.sock");
    fs::File::create(&image).unwrap().set_len(32 * MIB).unwrap();
    let file = format!("file={}", image.display());
    let mut server = Server::start(
        "nbdkit",
        &[
            "--exit-with-parent",
            "-f",
            "-U",
            &path(&socket),
            "file",
            &file,
        ],
        &scratch,
    );
    let uri = format!("nbd+unix:///?socket={}", socket.display());
    let mut client = server.connect(&uri);
    let export = *client.export();
    println!("{export:?}");
    assert_eq!(export.size, 32 * MIB);
    assert!(export.structured_replies);
    let written = exercise(&mut client, 0x5eed_0002);
    client.disconnect().unwrap();
    // Flushed, so in the file now.
    verify_file(&image, &written);
    server.stop();
}

/// A free TCP port on the loopback (free when this returns; the server binds it next).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn read_only_export_through_qemu_nbd_over_tcp() {
    if !installed("qemu-nbd") {
        return;
    }
    let scratch = Scratch::new("qemu-nbd");
    let image = scratch.path("disk.raw");
    let size = 16 * MIB;
    let content = pattern(0x5eed_0003, 0, size as usize);
    fs::write(&image, &content).unwrap();
    let port = free_port().to_string();
    let mut server = Server::start(
        "qemu-nbd",
        &[
            "--read-only",
            "--persistent",
            "--shared=2",
            "--format=raw",
            "--bind=127.0.0.1",
            "--port",
            &port,
            "--export-name=ro",
            &path(&image),
        ],
        &scratch,
    );
    let uri = format!("nbd://127.0.0.1:{port}/ro");
    let mut client = server.connect(&uri);
    let export = *client.export();
    println!("{export:?}");
    assert_eq!(export.size, size);
    assert!(export.flags.read_only());
    for (offset, len) in regions(size) {
        let mut buf = vec![0; len];
        client.read(offset, &mut buf).unwrap();
        assert!(
            buf[..] == content[offset as usize..][..len],
            "{len} bytes at {offset}"
        );
    }
    // Refused by the client, before anything is sent; the connection stays usable.
    for e in [
        client.write(0, &[0; 512], false).unwrap_err(),
        client.write_zeroes(0, 512, false).unwrap_err(),
        client.trim(0, 512).unwrap_err(),
    ] {
        println!("{e}");
        assert!(
            matches!(
                e,
                ClientError::Request(RequestError::ReadOnly(_) | RequestError::NotOffered(_))
            ),
            "{e}"
        );
    }
    let mut buf = [0; 4096];
    client.read(0, &mut buf).unwrap();
    assert!(buf[..] == content[..4096]);
    client.disconnect().unwrap();

    // Refused by the server, when a write is forced past the client's check: the
    // handshake and the wire codec by hand.
    let mut stream = TcpStream::connect(("127.0.0.1", port.parse::<u16>().unwrap())).unwrap();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(TIMEOUT)).unwrap();
    let export = nbd::handshake::negotiate(&mut stream, "ro").unwrap();
    assert!(export.flags.read_only());
    let request = Request {
        flags: 0,
        command: Cmd::Write,
        cookie: 0x77,
        offset: 0,
        length: 512,
    };
    stream.write_all(&request.encode()).unwrap();
    stream.write_all(&[0xee; 512]).unwrap();
    // qemu-nbd offers structured replies, so the error comes as an error chunk.
    assert!(export.structured_replies);
    let mut header = [0; CHUNK_HEADER_LEN];
    stream.read_exact(&mut header).unwrap();
    let header = ChunkHeader::decode(&header).unwrap();
    let mut fixed = vec![0; header.fixed_len().unwrap()];
    stream.read_exact(&mut fixed).unwrap();
    let chunk = header.parse(&fixed).unwrap();
    println!("forced write: {header:?} {chunk:?}");
    assert_eq!(header.cookie, 0x77);
    assert!(header.done());
    // The protocol says a server SHOULD answer NBD_EPERM; qemu-nbd 10.0 answers NBD_EINVAL.
    // Either way the write fails, and the image is checked unchanged below.
    assert!(
        matches!(
            chunk,
            Chunk::Error {
                error: NbdError::Perm | NbdError::Inval,
                ..
            }
        ),
        "{chunk:?}"
    );
    let disc = Request {
        flags: 0,
        command: Cmd::Disc,
        cookie: 0x78,
        offset: 0,
        length: 0,
    };
    stream.write_all(&disc.encode()).unwrap();
    drop(stream);
    server.stop();
    assert!(
        fs::read(&image).unwrap() == content,
        "the read-only image changed"
    );
}
