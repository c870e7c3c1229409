//! `blkbackd demo`: the whole backend at work with no Xen, in one command.
//!
//! On the simulated platform (`sim`) it plays every other part: the toolstack (writes the
//! disk's XenStore nodes as xl would), xenstored (in this process), and a guest whose
//! simulated blkfront ([`sim::front`]) negotiates with a real `blkbackd serve` child
//! process through the full XenStore handshake. The guest then writes, reads back and checks
//! data (sequential and random, with flushes and a discard), prints what it did with IOPS and
//! bandwidth, and tears everything down: frontend Closing and Closed, the toolstack's removal,
//! the backend process exiting 0.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use backend::stats_file::Report;
use sim::front::{FrontOptions, SimFront};
use sim::toolstack::{self, VbdSpec};
use sim::workload::{self, DiskModel, PhaseResult, Planned, Rng, BLOCK};

/// The guest's domain id in the demo.
const GUEST: u16 = 1;
/// xvda.
const DEVID: u32 = 51712;

/// Options of `blkbackd demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Serve this disk image (a regular file or block device; its contents are overwritten)
    /// instead of a fresh one in a temporary directory.
    #[arg(long, value_name = "PATH")]
    pub image: Option<PathBuf>,
    /// Size of the fresh image in MiB.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(4..=65536))]
    pub size_mib: u64,
    /// Queues the guest asks for.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=16))]
    pub queues: u32,
    /// log2 of the ring pages the guest asks for (0..=4).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(0..=4))]
    pub ring_page_order: u32,
    /// The guest does not offer persistent grants.
    #[arg(long)]
    pub no_persistent: bool,
    /// The guest does not use indirect requests.
    #[arg(long)]
    pub no_indirect: bool,
    /// The backend reaches guest memory by grant copy instead of grant mapping.
    #[arg(long)]
    pub grant_copy: bool,
    /// The ABI the guest speaks: x86_64-abi or x86_32-abi.
    #[arg(long, default_value = ring::PROTOCOL_NATIVE)]
    pub protocol: String,
    /// Random 4 KiB operations per random phase.
    #[arg(long, default_value_t = 4000)]
    pub random_ops: usize,
    /// Requests kept in flight.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub depth: u64,
    /// Keep the temporary directory (simulation files, image, statistics) for inspection.
    #[arg(long)]
    pub keep: bool,
}

/// The backend child, killed if the demo fails before it exits.
struct Backend(Option<Child>);

impl Backend {
    fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        let child = self.0.as_mut().context("backend already reaped")?;
        loop {
            if let Some(status) = child.try_wait().context("waiting for the backend")? {
                self.0 = None;
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("the backend did not exit within {timeout:?} after the disk was removed");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(child) = &mut self.0 {
            if let Some(status) = child.try_wait()? {
                self.0 = None;
                bail!("the backend exited early ({status}); run with -v for its log");
            }
        }
        Ok(())
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs the demo, writing what it does to `out` as it goes. `verbose` is passed on to the
/// backend process (`-v` flags).
///
/// # Errors
/// Any failure, with what was being done.
pub fn run(args: &DemoArgs, verbose: u8, out: &mut dyn Write) -> anyhow::Result<()> {
    let mut tmp = sim::ScratchDir::new("blkbackd-demo")?;
    if args.keep {
        tmp.keep();
    }
    let sim = tmp.path().join("sim");
    let (image, discard_zeroes) = match &args.image {
        Some(p) => {
            let meta = std::fs::metadata(p).with_context(|| format!("--image {}", p.display()))?;
            (p.clone(), meta.is_file())
        }
        None => {
            let p = tmp.path().join("disk.img");
            let f =
                std::fs::File::create(&p).with_context(|| format!("creating {}", p.display()))?;
            f.set_len(args.size_mib * 1024 * 1024)
                .with_context(|| format!("sizing {}", p.display()))?;
            (p, true)
        }
    };
    let image_str = image
        .to_str()
        .context("the image path is not UTF-8")?
        .to_owned();

    let xenstored = sim::xenstored::SimXenstored::start(sim::xenstored_dir(&sim))
        .context("starting the simulated xenstored")?;
    xenstored
        .introduce_domain(GUEST)
        .context("introducing the guest to the simulated xenstored")?;
    let dom0 = xen::xenstore::XenStore::open_at(sim::xenstore_socket(&sim, 0))
        .context("connecting to the simulated xenstored")?;
    let spec = VbdSpec::disk(0, GUEST, DEVID, &image_str);
    toolstack::create_vbd(&dom0, &spec).context("writing the disk's XenStore nodes")?;

    let stats_path = tmp.path().join("vbd.stats");
    let exe = std::env::current_exe().context("finding blkbackd's own path")?;
    let mut cmd = Command::new(exe);
    if verbose > 0 {
        cmd.arg(format!("-{}", "v".repeat(usize::from(verbose.min(3)))));
    }
    cmd.arg("serve")
        .arg("--platform")
        .arg(format!("sim:{}:0", sim.display()))
        .arg("--backend-path")
        .arg(spec.backend_path())
        .arg("--open-params")
        .arg("--max-queues")
        .arg("4")
        .arg("--stats-file")
        .arg(&stats_path)
        .arg("--grant-mode")
        .arg(if args.grant_copy { "copy" } else { "map" })
        .env_remove("BLKBACK_PLATFORM")
        .stdin(Stdio::null());
    let mut backend = Backend(Some(cmd.spawn().context("starting blkbackd serve")?));
    writeln!(
        out,
        "blkbackd demo: a simulated guest (domain {GUEST}) uses disk {} ({} MiB) through a real `blkbackd serve` (pid {})",
        image.display(),
        std::fs::metadata(&image).map(|m| m.len() >> 20).unwrap_or(0),
        backend.0.as_ref().map_or(0, Child::id),
    )?;

    let options = FrontOptions {
        protocol: Some(args.protocol.clone()),
        ring_page_order: Some(args.ring_page_order),
        queues: args.queues,
        persistent: !args.no_persistent,
        indirect: !args.no_indirect,
        guest_pages: 8192,
        ignore_backend_limits: false,
    };
    let t = Instant::now();
    let mut front =
        SimFront::new(&sim, GUEST, DEVID, options).context("creating the simulated guest")?;
    let info = match front.connect() {
        Ok(i) => i,
        Err(e) => {
            backend.check_alive()?;
            return Err(e).context("XenStore handshake");
        }
    };
    writeln!(
        out,
        "  handshake ({:.0} ms): {} sectors of {} bytes, protocol {}, {} queue(s), {}-page rings, persistent grants {}, indirect segments {}, flush {}, discard {}",
        t.elapsed().as_secs_f64() * 1e3,
        info.sectors,
        info.sector_size,
        info.abi.protocol(),
        info.queues,
        1u32 << info.ring_page_order,
        on_off(info.persistent),
        info.max_indirect_segments,
        on_off(info.flush),
        on_off(info.discard),
    )?;
    writeln!(
        out,
        "  data path: grant {} ({}), one thread and one io_uring per queue",
        if args.grant_copy { "copy" } else { "map" },
        if args.grant_copy {
            "guest pages copied to and from bounce buffers"
        } else {
            "guest pages mapped, zero copy"
        },
    )?;

    let blocks = info.sectors * 512 / BLOCK as u64;
    if blocks < 64 {
        bail!(
            "the disk is too small for the demo ({} sectors)",
            info.sectors
        );
    }
    let mut model = DiskModel::zeroed(blocks, discard_zeroes);
    let mut rng = Rng::new(0x5eed);
    let depth = usize::try_from(args.depth).unwrap_or(32);
    let big = u64::from(front.max_sectors_per_request() / 8).clamp(1, 32);
    let mut phase = |name: &str,
                     plan: Vec<Planned>,
                     front: &mut SimFront,
                     model: &mut DiskModel|
     -> anyhow::Result<PhaseResult> {
        let r = workload::run(front, model, &plan, depth).with_context(|| name.to_owned())?;
        writeln!(
            out,
            "  {name:<34} {:>6} requests {:>9.0} IOPS {:>8.1} MiB/s",
            r.requests,
            r.iops(),
            r.mib_per_s()
        )?;
        Ok(r)
    };
    let mut verified = 0;
    let seq_blocks = blocks.min(16384);
    phase(
        &format!("sequential write, {} KiB requests", big * 4),
        workload::sequential(seq_blocks, big, true),
        &mut front,
        &mut model,
    )?;
    verified += phase(
        &format!("sequential read, {} KiB requests", big * 4),
        workload::sequential(seq_blocks, big, false),
        &mut front,
        &mut model,
    )?
    .verified_reads;
    let n = args
        .random_ops
        .min(usize::try_from(blocks).unwrap_or(usize::MAX));
    phase(
        "random write, 4 KiB",
        workload::random_blocks(&mut rng, blocks, n, true),
        &mut front,
        &mut model,
    )?;
    phase("flush", vec![Planned::Flush], &mut front, &mut model)?;
    verified += phase(
        "random read, 4 KiB",
        workload::random_blocks(&mut rng, blocks, n, false),
        &mut front,
        &mut model,
    )?
    .verified_reads;
    if info.discard {
        phase(
            "discard 1 MiB",
            vec![Planned::Discard {
                block: 0,
                count: 256.min(blocks),
            }],
            &mut front,
            &mut model,
        )?;
        verified += phase(
            "read back the discarded range",
            workload::sequential(256.min(blocks), 8, false),
            &mut front,
            &mut model,
        )?
        .verified_reads;
    }
    phase("flush", vec![Planned::Flush], &mut front, &mut model)?;
    writeln!(out, "  verified: {verified} reads, every byte as written")?;

    // Teardown as libxl does it: online = 0 and Closing, the frontend closes, the backend ends.
    toolstack::request_removal(&dom0, &spec).context("asking for the disk's removal")?;
    let lost = front.close().context("closing the frontend")?;
    if !lost.is_empty() {
        bail!("{} request(s) were never answered", lost.len());
    }
    let status = backend.wait_exit(Duration::from_secs(10))?;
    if !status.success() {
        bail!("the backend exited with {status}");
    }
    toolstack::destroy_vbd(&dom0, &spec).context("removing the disk's XenStore nodes")?;
    writeln!(
        out,
        "  teardown: frontend Closed, every grant ended, backend exited cleanly"
    )?;
    let stats = std::fs::read_to_string(&stats_path)
        .ok()
        .and_then(|t| Report::parse(&t).ok())
        .context("reading the backend's statistics file")?;
    let c = stats.counters;
    writeln!(
        out,
        "  backend statistics: rd_req {} wr_req {} f_req {} ds_req {} rd_sect {} wr_sect {} oo_req {}, mean latency {} us",
        c.rd_req,
        c.wr_req,
        c.f_req,
        c.ds_req,
        c.rd_sect,
        c.wr_sect,
        c.oo_req,
        c.mean_latency_us().unwrap_or(0)
    )?;
    if args.keep {
        writeln!(out, "  files kept in {}", tmp.path().display())?;
    }
    Ok(())
}

fn on_off(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}
