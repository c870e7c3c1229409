//! The NBD target (`--targets nbd`): qemu-storage-daemon serving the image (a raw file on
//! tmpfs) over a Unix socket, blkbackd serving a guest's disk from that export (its URI as
//! `params`, one connection per queue), and the baseline straight at the same export: one
//! connection driven by one thread at the workload's queue depth (requests pipelined on the
//! socket, replies read as they come, structured ones reassembled by `nbd::structured`), the
//! way an NBD client in a guest-less program reaches the server.

use std::io::{Read, Write};

use nbd::structured::{Chunk, ChunkHeader, Reassembly, CHUNK_HEADER_LEN};
use nbd::wire::{SimpleReply, SIMPLE_REPLY_LEN, SIMPLE_REPLY_MAGIC};
use nbd::{Command as Cmd, Request};

use super::*;

/// The target's name in `--targets` and the tables.
pub(crate) const NBD_TARGET: &str = "NBD (qemu-storage-daemon on tmpfs)";

/// qemu-storage-daemon exporting an image; stopped on drop.
pub(crate) struct NbdServer {
    child: Child,
    /// The export's URI.
    pub(crate) uri: String,
}

impl NbdServer {
    /// Serves `image` (raw) as the export `disk` on a socket in `dir`.
    pub(crate) fn start(image: &Path, dir: &Path) -> anyhow::Result<Self> {
        let socket = dir.join("nbd.sock");
        let _ = std::fs::remove_file(&socket);
        let file = format!("driver=file,node-name=f0,filename={}", image.display());
        let server = format!("addr.type=unix,addr.path={}", socket.display());
        let child = Command::new("qemu-storage-daemon")
            .args(["--blockdev", &file, "--nbd-server", &server])
            .args([
                "--export",
                "type=nbd,id=e0,node-name=f0,name=disk,writable=on",
            ])
            .stdin(Stdio::null())
            .spawn()
            .context("starting qemu-storage-daemon (Debian: qemu-system-common)")?;
        let mut s = Self {
            child,
            uri: format!("nbd+unix:///disk?socket={}", socket.display()),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            if Instant::now() > deadline || s.child.try_wait()?.is_some() {
                bail!("qemu-storage-daemon did not listen on {}", socket.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(s)
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A request awaiting its reply.
struct Pending {
    start: Instant,
    read: bool,
    reply: Reassembly,
}

/// `w` for `secs` on one new connection to `uri`: up to `w.qd` requests on the socket.
pub(crate) fn run_nbd_direct(
    uri: &str,
    w: Workload,
    secs: f64,
    image: u64,
) -> anyhow::Result<Measured> {
    let uri: nbd::Uri = uri.parse()?;
    let client = nbd::Client::connect_timeout(&uri, Duration::from_secs(10))?;
    let (mut stream, export) = client.into_parts();
    let mut gen = Gen::new(w, image);
    let data = vec![0x5au8; w.bs];
    let mut buf = vec![0u8; w.bs];
    let mut pending: Vec<Option<Pending>> = (0..w.qd).map(|_| None).collect();
    let mut m = Measured::default();
    let cpu0 = cpu_ticks("/proc/self/stat");
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs_f64(secs);
    let mut in_flight = 0;
    loop {
        while in_flight < w.qd && Instant::now() < end {
            let slot = pending
                .iter()
                .position(Option::is_none)
                .context("no free slot")?;
            let (offset, write) = gen.next();
            let req = Request {
                flags: 0,
                command: if write { Cmd::Write } else { Cmd::Read },
                cookie: slot as u64,
                offset,
                length: u32::try_from(w.bs)?,
            };
            export.check(&req)?;
            let mut msg = req.encode().to_vec();
            if write {
                msg.extend_from_slice(&data);
            }
            stream.write_all(&msg)?;
            pending[slot] = Some(Pending {
                start: Instant::now(),
                read: !write,
                reply: Reassembly::new(req.command, offset, req.length),
            });
            in_flight += 1;
        }
        if in_flight == 0 {
            break;
        }
        let (slot, lat) = read_reply(&mut stream, &mut pending, &mut buf)?;
        pending[slot] = None;
        in_flight -= 1;
        m.record(lat, w.bs);
    }
    m.elapsed = t0.elapsed();
    m.cpu_ticks = cpu_ticks("/proc/self/stat").zip(cpu0).map(|(a, b)| a - b);
    let disc = Request {
        flags: 0,
        command: Cmd::Disc,
        cookie: 0,
        offset: 0,
        length: 0,
    };
    stream.write_all(&disc.encode())?;
    Ok(m)
}

/// Reads messages until one request's reply is complete: its slot and latency.
fn read_reply(
    stream: &mut nbd::Stream,
    pending: &mut [Option<Pending>],
    buf: &mut [u8],
) -> anyhow::Result<(usize, Duration)> {
    loop {
        let mut head = [0u8; CHUNK_HEADER_LEN];
        stream.read_exact(&mut head[..SIMPLE_REPLY_LEN])?;
        if head[..4] == SIMPLE_REPLY_MAGIC.to_be_bytes() {
            let simple: [u8; SIMPLE_REPLY_LEN] = head[..SIMPLE_REPLY_LEN].try_into()?;
            let r = SimpleReply::decode(&simple)?;
            let slot = usize::try_from(r.cookie)?;
            let p = pending
                .get(slot)
                .and_then(Option::as_ref)
                .context("reply for nothing")?;
            if let Some(e) = r.error {
                bail!("the server failed a request: {e}");
            }
            if p.read {
                stream.read_exact(buf)?;
            }
            return Ok((slot, p.start.elapsed()));
        }
        stream.read_exact(&mut head[SIMPLE_REPLY_LEN..])?;
        let h = ChunkHeader::decode(&head)?;
        let slot = usize::try_from(h.cookie)?;
        let p = pending
            .get_mut(slot)
            .and_then(Option::as_mut)
            .context("chunk for nothing")?;
        let mut fixed = vec![0u8; h.fixed_len()?];
        stream.read_exact(&mut fixed)?;
        let chunk = h.parse(&fixed)?;
        if let Some(range) = p.reply.accept(&chunk)? {
            let b = buf.get_mut(range).context("chunk outside the buffer")?;
            match chunk {
                Chunk::Data { .. } => stream.read_exact(b)?,
                _ => b.fill(0),
            }
        }
        if h.done() {
            if let Some(e) = p.reply.finish()? {
                bail!("the server failed a request: {e}");
            }
            return Ok((slot, p.start.elapsed()));
        }
    }
}
