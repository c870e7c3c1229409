//! blkbackd: a userspace Xen block backend, one process per virtual disk.
//!
//! `blkbackd serve` serves one disk for the toolstack; `blkbackd supervise` starts a `serve`
//! for each new disk; `blkbackd demo` shows the whole thing working on the simulated
//! platform; `blkbackd stats` prints a running backend's counters.

use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand, ValueEnum};

use backend::acquire::DeviceSource;
use backend::advertise::Features;
use backend::dataplane::{GrantMode, Observer};
use backend::device::DeviceOptions;
use backend::serve::{Outcome, ServeConfig};
use backend::{serve, stats_file, supervise};
use blkbackd::demo;
use xen::xenstore::BackendPath;

/// A userspace Xen block backend (blkback), one process per virtual disk.
#[derive(Debug, Parser)]
#[command(name = "blkbackd", version, about, long_about = None)]
struct Cli {
    /// More log output (-v: info, -vv: debug, -vvv: trace). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// `serve` and `demo`: record a ring trace of every queue to FILE (see
    /// docs/trace-format.md; replay it with `blkbackd replay`). `supervise`: a directory;
    /// each backend it starts records to `<dir>/vbd-<frontend-domid>-<devid>.trace`.
    #[arg(long, global = true, value_name = "FILE", env = "BLKBACKD_RECORD")]
    record: Option<PathBuf>,
    /// What the disk held before the recording: `unknown` (a live disk) or `zero`.
    #[arg(
        long,
        global = true,
        value_name = "CONTENT",
        env = "BLKBACKD_RECORD_INITIAL",
        default_value = "unknown"
    )]
    record_initial: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve one virtual disk (run by the toolstack or by `blkbackd supervise`).
    Serve(ServeArgs),
    /// Watch this domain's backend/vbd directory and start one `serve` per new disk.
    ///
    /// SIGHUP upgrades: every connected disk is handed, without a crash, to a new `serve` of
    /// the program now at this program's path (the new binary installed there).
    Supervise(SuperviseArgs),
    /// Show the backend working with no Xen: a simulated guest writes, reads back and checks
    /// data through the whole protocol, and the figures are printed.
    Demo(demo::DemoArgs),
    /// Print a running backend's statistics (Linux blkback's counters plus latency).
    Stats(StatsArgs),
    /// Replay a ring trace against the real data plane on the simulated platform and check
    /// every response; exits 1 with the first difference.
    Replay(ReplayArgs),
    /// (Started by `serve` for a disk on an NBD export.) Make a new connection to the export
    /// for each request on standard input, a socket from `serve`, which cannot connect once
    /// confined; exits when `serve` closes it.
    #[command(hide = true)]
    NbdConnect {
        /// The export's URI (the disk's `params`).
        uri: String,
    },
    /// (Started by `serve` before it confines itself or switches user.) Open a new
    /// connection to xenstored (its socket or the xenbus device) for each request on standard
    /// input, as `nbd-connect` does; exits when `serve` closes it.
    #[command(hide = true)]
    XenstoreConnect {
        /// xenstored's socket or `/dev/xen/xenbus`.
        path: PathBuf,
    },
}

#[derive(Debug, Args)]
struct ReplayArgs {
    /// The trace (JSON lines, docs/trace-format.md).
    trace: PathBuf,
    /// The disk's initial content (a copy is used); default a fresh zeroed image.
    #[arg(long, value_name = "PATH")]
    image: Option<PathBuf>,
    /// Seconds to wait for any one response.
    #[arg(long, default_value_t = 5)]
    timeout: u64,
}

#[derive(Debug, Args)]
struct PlatformArg {
    /// `xen` (the real hypervisor: /dev/xen/*, xenstored), or `sim:DIR[:DOMID]` (the
    /// simulated platform rooted at DIR, as this domain, default 0).
    #[arg(long, env = "BLKBACK_PLATFORM", default_value = "xen")]
    platform: String,
}

#[derive(Debug, Args)]
struct ServeArgs {
    #[command(flatten)]
    platform: PlatformArg,
    /// The device's backend directory:
    /// /local/domain/<backend-domid>/backend/vbd/<frontend-domid>/<devid>.
    #[arg(long, conflicts_with_all = ["domid", "devid"], required_unless_present_all = ["domid", "devid"])]
    backend_path: Option<String>,
    /// The frontend (guest) domain id (with --devid, instead of --backend-path).
    #[arg(long, requires = "devid")]
    domid: Option<u16>,
    /// The virtual device number, e.g. 51712 for xvda (with --domid).
    #[arg(long, requires = "domid")]
    devid: Option<u32>,
    /// Use this inherited file descriptor as the disk (a block device or regular file).
    #[arg(long, value_name = "N", group = "source")]
    device_fd: Option<i32>,
    /// Receive the disk's fd from blkhotplug on this unix socket (written to the
    /// `handoff-socket` node).
    #[arg(long, value_name = "PATH", group = "source")]
    handoff_socket: Option<PathBuf>,
    /// Open the toolstack's `params` path (a regular file or block device) instead of waiting
    /// for `physical-device`. Default: open `physical-device` (`major:minor` or
    /// `diskseq@major:minor`) once the hotplug script writes it.
    #[arg(long, group = "source")]
    open_params: bool,
    /// For regular files: the logical sector size to present (512 or 4096).
    #[arg(long, value_name = "BYTES")]
    sector_size: Option<u32>,
    /// Never use O_DIRECT on the disk.
    #[arg(long)]
    buffered: bool,
    #[command(flatten)]
    tuning: Tuning,
    /// The disk's in-flight log, an inherited memfd (given by `blkbackd supervise`): lets a
    /// new backend take over this disk if this one dies, and resume from it when an earlier
    /// one did.
    #[arg(long, value_name = "N")]
    inflight_fd: Option<i32>,
    /// A socket inherited from `blkbackd supervise`: the device, once held, is sent there
    /// for a backend that takes over should this one die.
    #[arg(long, value_name = "N")]
    supervisor_fd: Option<i32>,
    /// Keep the statistics in this file (default /run/blkbackd/vbd-<domid>-<devid>.stats).
    #[arg(long, value_name = "PATH")]
    stats_file: Option<PathBuf>,
    /// Do not confine the backend (for debugging only: a bug a guest finds then gets every
    /// privilege of this process).
    #[arg(long, env = "BLKBACKD_NO_SANDBOX")]
    no_sandbox: bool,
    /// Once the device is held, run as this user (NAME, UID or UID:GID). It must be able to
    /// open the event-channel device, which each queue opens when a frontend connects.
    #[arg(long, env = "BLKBACKD_USER", value_name = "USER")]
    user: Option<String>,
}

/// `--poll-us` where the process may run on two CPUs or more: KVM's `halt_poll_ns`, long
/// enough for a wait on io-wq or the frontend on a loaded host (50-60 µs here) to be caught.
const DEFAULT_POLL_US: u32 = 200;

#[derive(Debug, Clone, Args)]
struct Tuning {
    /// Queues offered (`multi-queue-max-queues`). Default: the number of CPUs.
    #[arg(long)]
    max_queues: Option<u32>,
    /// Largest ring (`max-ring-page-order`, 0..=4: 1 to 16 pages).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(0..=4))]
    max_ring_page_order: u32,
    /// Segments per indirect request (`feature-max-indirect-segments`, 0 = no indirect, at
    /// most 256 as in Linux).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(0..=256))]
    max_indirect_segments: u32,
    /// Do not offer persistent grants.
    #[arg(long)]
    no_persistent: bool,
    /// How guest memory is reached. `copy` (the default): grant copy into private bounce
    /// buffers registered with the io_uring, one batched ioctl per pass; no guest page is ever
    /// mapped for data, so nothing the kernel does with a page after an I/O can meet an unmap
    /// (QEMU's qdisk does the same). `map`: zero copy through grant mappings, for frontends
    /// that use persistent grants (others are served by grant copy, as in `copy`); a mapping
    /// that carried I/O is unmapped only a grace period (1 s on Xen) after its last
    /// completion, because the kernel reports O_DIRECT I/O complete before it releases the
    /// pages, and gntdev on a PV dom0 then corrupts dom0's page tables ("BUG: Bad page map").
    /// A `map` backend killed with I/O in flight leaves those unmaps to the kernel, which no
    /// grace covers. On real Xen map moved 1 MiB requests 1.26-1.29x faster than copy, 4 KiB
    /// ones as fast.
    #[arg(long, value_enum, default_value_t = GrantModeArg::Copy)]
    grant_mode: GrantModeArg,
    /// Busy-poll each queue up to this many microseconds for new requests and completions
    /// before it sleeps (0: never). The window adapts: it grows while a queue's waits are
    /// shorter than this and halves after a longer one, so an idle disk costs no CPU
    /// and a busy one spins (up to a whole core per busy queue). While a queue polls the
    /// frontend does not notify: lower latency and fewer system calls. Default: 200 where this
    /// process may run on two CPUs or more, else 0 (a spinning queue would only keep the one
    /// CPU from the I/O it waits for).
    #[arg(long, value_name = "US", value_parser = clap::value_parser!(u32).range(0..=100_000))]
    poll_us: Option<u32>,
    /// Each queue's submissions are made by a kernel thread (io_uring's SQPOLL), so that the
    /// queue's own thread enters the kernel only to sleep (with --poll-us, not at all while
    /// busy): fewer system calls, paid with a kernel thread per queue that polls for a
    /// millisecond after each submission. Off by default.
    #[arg(long)]
    sqpoll: bool,
    /// For a disk on an NBD export: how long requests may wait for the server without any
    /// reply arriving before the connection is given up (every request then fails, the guest
    /// sees I/O errors, the disk can be removed).
    #[arg(long, default_value_t = 60, value_name = "SECONDS", value_parser = clap::value_parser!(u32).range(1..=86_400))]
    nbd_timeout: u32,
    /// How long to try to connect to xenstored again after it went away (a restart, or a
    /// live update that drops connections) before the connection counts as lost and the
    /// backend stops with an error (0: one attempt). Watches are registered again on the new
    /// connection. `supervise`'s own connection always tries for 60 s.
    #[arg(long, default_value_t = xen::xenstore::RECONNECT_WITHIN.as_secs(), value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(0..=86_400))]
    xenstore_reconnect: u64,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum GrantModeArg {
    Map,
    Copy,
}

impl Tuning {
    fn features(&self) -> anyhow::Result<Features> {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let max_queues = self.max_queues.unwrap_or(u32::try_from(cpus).unwrap_or(1));
        if max_queues == 0 {
            bail!("--max-queues must be at least 1");
        }
        Ok(Features {
            max_indirect_segments: self.max_indirect_segments,
            max_queues,
            max_ring_page_order: self.max_ring_page_order,
            persistent_grants: !self.no_persistent,
        })
    }

    /// `--poll-us`, or its default for the CPUs this process may run on.
    fn poll_us(&self) -> u32 {
        self.poll_us.unwrap_or_else(|| {
            let cpus = std::thread::available_parallelism().map_or(1, usize::from);
            if cpus >= 2 {
                DEFAULT_POLL_US
            } else {
                0
            }
        })
    }

    fn grant_mode(&self) -> GrantMode {
        match self.grant_mode {
            GrantModeArg::Map => GrantMode::Map,
            GrantModeArg::Copy => GrantMode::Copy,
        }
    }
}

#[derive(Debug, Args)]
struct SuperviseArgs {
    #[command(flatten)]
    platform: PlatformArg,
    #[command(flatten)]
    tuning: Tuning,
    /// Have each backend open `params` itself rather than wait for `physical-device`.
    #[arg(long, conflicts_with = "handoff_dir")]
    open_params: bool,
    /// Have each backend receive its device from blkhotplug on a socket in this directory
    /// (`vbd-<domid>-<devid>.sock`, named in the `handoff-socket` node).
    #[arg(long, value_name = "DIR")]
    handoff_dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct StatsArgs {
    /// The statistics file to read.
    #[arg(long, value_name = "PATH", conflicts_with_all = ["domid", "devid"])]
    stats_file: Option<PathBuf>,
    /// The frontend domain id (with --devid): reads the default file.
    #[arg(long, requires = "devid")]
    domid: Option<u16>,
    /// The virtual device number (with --domid).
    #[arg(long, requires = "domid")]
    devid: Option<u32>,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // One line: clap's first paragraph, joined, without its "error: " prefix.
            let text = e.to_string();
            let first: Vec<&str> = text
                .lines()
                .take_while(|l| !l.trim().is_empty())
                .map(str::trim)
                .collect();
            eprintln!(
                "blkbackd: {} (see --help)",
                first.join(" ").trim_start_matches("error: ")
            );
            return ExitCode::from(2);
        }
    };
    init_logging(cli.verbose);
    let recorder = match setup_recording(&cli) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("blkbackd: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    match run(cli.command, cli.verbose, recorder, cli.record) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("blkbackd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// `--record`: `serve` records itself (the recorder returned here observes its queues);
/// `demo` passes it to its backend (through the environment), with the fresh image's content
/// known to be zero.
fn setup_recording(cli: &Cli) -> anyhow::Result<Option<Arc<dyn Observer>>> {
    let Some(path) = &cli.record else {
        return Ok(None);
    };
    match &cli.command {
        Command::Serve(_) => {
            let initial = match cli.record_initial.as_str() {
                "zero" => backend::replay::format::Initial::Zero,
                "unknown" => backend::replay::format::Initial::Unknown,
                other => bail!("--record-initial {other:?}: expected zero or unknown"),
            };
            let rec =
                backend::replay::Recorder::create(path, initial, "recorded by blkbackd serve")
                    .with_context(|| format!("creating {}", path.display()))?;
            return Ok(Some(rec));
        }
        Command::Demo(args) => {
            let abs = std::path::absolute(path).context("--record")?;
            std::env::set_var("BLKBACKD_RECORD", abs);
            if args.image.is_none() {
                std::env::set_var("BLKBACKD_RECORD_INITIAL", "zero");
            }
        }
        // `run_supervise` hands each backend a file of its own.
        Command::Supervise(_) => {}
        // A recording `serve`'s connectors inherit its environment; they record nothing.
        Command::NbdConnect { .. } | Command::XenstoreConnect { .. } => {}
        _ => bail!("--record applies to serve, demo and supervise only"),
    }
    Ok(None)
}

fn run_replay(args: &ReplayArgs) -> anyhow::Result<()> {
    let opts = blkbackd::replay::ReplayOptions {
        image: args.image.clone(),
        timeout: std::time::Duration::from_secs(args.timeout),
        ..Default::default()
    };
    let s = blkbackd::replay::replay_file(&args.trace, &opts)
        .with_context(|| format!("replaying {}", args.trace.display()))?;
    println!(
        "{}: replayed {} events, {} slots, {} responses as recorded ({} reads compared byte for byte, {} by checksum{}), {} queue start(s)",
        args.trace.display(),
        s.events,
        s.slots,
        s.responses,
        s.reads_compared,
        s.checksums,
        if s.reads_skipped { "; data not compared: unknown initial disk content, give --image" } else { "" },
        s.queues_started
    );
    Ok(())
}

fn run(
    command: Command,
    verbose: u8,
    recorder: Option<Arc<dyn Observer>>,
    record: Option<PathBuf>,
) -> anyhow::Result<()> {
    match command {
        Command::Serve(args) => run_serve(args, recorder),
        Command::Supervise(args) => run_supervise(args, record),
        Command::Demo(args) => demo::run(&args, verbose, &mut std::io::stdout().lock()),
        Command::Stats(args) => run_stats(&args),
        Command::Replay(args) => run_replay(&args),
        Command::NbdConnect { uri } => {
            let stdin = std::io::stdin();
            backend::nbd_connector::run_connector(std::os::fd::AsFd::as_fd(&stdin), &uri)
                .context("nbd-connect")
        }
        Command::XenstoreConnect { path } => {
            let stdin = std::io::stdin();
            backend::xenstore_connector::run_connector(std::os::fd::AsFd::as_fd(&stdin), &path)
                .context("xenstore-connect")
        }
    }
}

fn parse_platform(arg: &PlatformArg) -> anyhow::Result<xen::PlatformConfig> {
    arg.platform
        .parse::<xen::PlatformConfig>()
        .with_context(|| {
            format!(
                "bad --platform {:?} (expected xen or sim:DIR[:DOMID])",
                arg.platform
            )
        })
}

/// Sets the returned flag on any of `signals`.
fn signal_flag(signals: &[i32]) -> anyhow::Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    for &sig in signals {
        signal_hook::flag::register(sig, Arc::clone(&flag))
            .context("installing signal handlers")?;
    }
    Ok(flag)
}

/// Set on SIGTERM or SIGINT.
fn stop_flag() -> anyhow::Result<Arc<AtomicBool>> {
    signal_flag(&[signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT])
}

fn run_serve(args: ServeArgs, recorder: Option<Arc<dyn Observer>>) -> anyhow::Result<()> {
    // First: until it is handled, SIGUSR1 would kill the process.
    let hand_over = signal_flag(&[signal_hook::consts::SIGUSR1])?;
    backend::fault::arm_from_env().map_err(anyhow::Error::msg)?;
    // Everything the command line says is checked before anything is opened.
    let platform_config = parse_platform(&args.platform)?;
    let given_path = args
        .backend_path
        .as_deref()
        .map(BackendPath::parse)
        .transpose()?;
    if let Some(size) = args.sector_size {
        if !(size.is_power_of_two() && (512..=4096).contains(&size)) {
            bail!("--sector-size must be 512, 1024, 2048 or 4096");
        }
    }
    let features = args.tuning.features()?;
    let mut given: Vec<i32> = [args.device_fd, args.inflight_fd, args.supervisor_fd]
        .into_iter()
        .flatten()
        .collect();
    given.sort_unstable();
    if let Some(w) = given.windows(2).find(|w| w[0] == w[1]) {
        bail!("fd {} is given for two purposes", w[0]);
    }
    let inflight = args
        .inflight_fd
        .map(|fd| {
            let fd = inherited_fd("--inflight-fd", fd)?;
            backend::inflight::Log::open(fd).context("--inflight-fd")
        })
        .transpose()?;
    let supervisor = args
        .supervisor_fd
        .map(|fd| inherited_fd("--supervisor-fd", fd))
        .transpose()?;
    let source = if let Some(fd) = args.device_fd {
        DeviceSource::Fd(inherited_fd("--device-fd", fd)?)
    } else if let Some(path) = args.handoff_socket {
        xen::abspath::check(&path, xen::abspath::SOCKET_PATH_MAX)
            .with_context(|| format!("--handoff-socket {}", path.display()))?;
        DeviceSource::Handoff(path)
    } else if args.open_params {
        DeviceSource::Params
    } else {
        DeviceSource::PhysicalDevice
    };
    let user = args
        .user
        .as_deref()
        .map(backend::sandbox::User::parse)
        .transpose()?;
    if args.no_sandbox {
        tracing::warn!(
            "--no-sandbox: this backend will NOT be confined (capabilities, Landlock, seccomp); \
             a guest that finds a bug gets root's privileges in dom0. For debugging only."
        );
    } else {
        backend::sandbox::prepare(user.as_ref()).context("dropping privileges")?;
    }
    let platform = sim::open_platform(&platform_config)
        .with_context(|| format!("opening the {} platform", args.platform.platform))?;
    let backend_path = match (given_path, args.domid, args.devid) {
        (Some(p), _, _) => p,
        (None, Some(domid), Some(devid)) => BackendPath::new(platform.domid(), domid, devid),
        _ => bail!("give --backend-path, or --domid and --devid"),
    };
    if backend_path.backend_domid() != Some(platform.domid()) {
        bail!(
            "--backend-path names backend domain {}, but this is domain {}",
            backend_path.backend_domid().unwrap_or_default(),
            platform.domid()
        );
    }
    let stats_file = args.stats_file.unwrap_or_else(|| {
        stats_file::default_path(backend_path.frontend_domid(), backend_path.devid())
    });
    if !args.no_sandbox {
        backend::sandbox::arm(backend::sandbox::Policy::new(
            &platform_config,
            Some(&stats_file),
            user,
        ));
    }
    let config = ServeConfig {
        platform,
        backend_path: backend_path.to_string(),
        source,
        device_options: DeviceOptions {
            read_only: false,
            logical_block_size: args.sector_size,
            buffered: args.buffered,
        },
        features,
        grant_mode: args.tuning.grant_mode(),
        poll: Duration::from_micros(args.tuning.poll_us().into()),
        sqpoll: args.tuning.sqpoll,
        nbd_timeout: Duration::from_secs(args.tuning.nbd_timeout.into()),
        // This very image, not the file at its path: after an upgrade (or with the
        // supervisor's fallback) that file may be another program or gone, and the
        // connectors must speak this one's protocol.
        connector: Some(PathBuf::from("/proc/self/exe")),
        xenstore_reconnect: Duration::from_secs(args.tuning.xenstore_reconnect),
        stats_file: Some(stats_file),
        observer: recorder,
        inflight,
        supervisor,
        hand_over,
    };
    let stop = stop_flag()?;
    match serve::serve(config, &stop).with_context(|| format!("serving {backend_path}"))? {
        Outcome::Removed | Outcome::Stopped | Outcome::HandedOver => Ok(()),
    }
}

/// Takes ownership of an inherited fd after checking that it is open.
fn inherited_fd(option: &str, fd: i32) -> anyhow::Result<OwnedFd> {
    if fd < 3 {
        bail!("{option} {fd} is a standard stream");
    }
    // SAFETY: the number is only borrowed for one fcntl(F_GETFD), which fails with EBADF and
    // does nothing else when it is not open.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    if rustix::io::fcntl_getfd(borrowed).is_err() {
        bail!("{option} {fd} is not an open file descriptor");
    }
    // SAFETY: the fd is open, was inherited for this process to use, and nothing else here
    // owns it: this is the only place that wraps it, once at startup.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn run_supervise(args: SuperviseArgs, record: Option<PathBuf>) -> anyhow::Result<()> {
    let platform_config = parse_platform(&args.platform)?;
    if let Some(dir) = &args.handoff_dir {
        xen::abspath::check(dir, xen::abspath::PATH_MAX)
            .with_context(|| format!("--handoff-dir {}", dir.display()))?;
    }
    if let Some(dir) = &record {
        xen::abspath::check(dir, xen::abspath::PATH_MAX)
            .with_context(|| format!("--record {}", dir.display()))?;
    }
    let platform = sim::open_platform(&platform_config)
        .with_context(|| format!("opening the {} platform", args.platform.platform))?;
    let program = std::env::current_exe().context("finding this program's path")?;
    let t = &args.tuning;
    let features = t.features()?;
    let mut serve_args = vec![
        "serve".to_owned(),
        "--platform".to_owned(),
        args.platform.platform.clone(),
        "--max-queues".to_owned(),
        features.max_queues.to_string(),
        "--max-ring-page-order".to_owned(),
        t.max_ring_page_order.to_string(),
        "--max-indirect-segments".to_owned(),
        t.max_indirect_segments.to_string(),
        "--grant-mode".to_owned(),
        match t.grant_mode {
            GrantModeArg::Map => "map",
            GrantModeArg::Copy => "copy",
        }
        .to_owned(),
        "--poll-us".to_owned(),
        t.poll_us().to_string(),
        "--nbd-timeout".to_owned(),
        t.nbd_timeout.to_string(),
        "--xenstore-reconnect".to_owned(),
        t.xenstore_reconnect.to_string(),
    ];
    if t.no_persistent {
        serve_args.push("--no-persistent".to_owned());
    }
    if t.sqpoll {
        serve_args.push("--sqpoll".to_owned());
    }

    let config = supervise::SuperviseConfig {
        program,
        serve_args,
        max_queues: features.max_queues,
        max_ring_page_order: t.max_ring_page_order,
        open_params: args.open_params,
        xenstore_path: platform.xenstore_path(),
        domid: platform.domid(),
        handoff_dir: args.handoff_dir.clone(),
        record_dir: record,
        // The image this supervisor runs, whatever is at `program` by now.
        fallback: Some(PathBuf::from("/proc/self/exe")),
    };
    let stop = stop_flag()?;
    let upgrade = signal_flag(&[signal_hook::consts::SIGHUP])?;
    supervise::supervise(&config, &stop, &upgrade).context("supervising")?;
    Ok(())
}

fn run_stats(args: &StatsArgs) -> anyhow::Result<()> {
    let paths: Vec<PathBuf> = match (&args.stats_file, args.domid, args.devid) {
        (Some(p), _, _) => vec![p.clone()],
        (None, Some(domid), Some(devid)) => vec![stats_file::default_path(domid, devid)],
        _ => {
            let dir = std::path::Path::new(stats_file::DEFAULT_DIR);
            let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
                .with_context(|| format!("listing {} (no backend running?)", dir.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "stats"))
                .collect();
            v.sort();
            if v.is_empty() {
                bail!("no statistics files in {}", dir.display());
            }
            v
        }
    };
    for path in paths {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let report = stats_file::Report::parse(&text)
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("parsing {}", path.display()))?;
        print!("{}", report.display());
    }
    Ok(())
}
