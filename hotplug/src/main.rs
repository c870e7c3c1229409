//! blkhotplug: race-free, leak-free block hotplug for Xen toolstacks.
//!
//! As xl's block script: `blkhotplug add|remove` with `XENBUS_PATH` in the environment.
//! Directly: `blkhotplug add --backend PATH`, `blkhotplug attach FILE`, `blkhotplug detach`.
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use hotplug::attach::{self, AttachOptions, Created};
use hotplug::params::{Mode, Source};
use hotplug::script::{self, Config};
use xen::xenstore::XenStore;

#[derive(Parser, Debug)]
#[command(
    name = "blkhotplug",
    version,
    about = "Race-free, leak-free block hotplug for Xen (replaces the `block` script)"
)]
struct Cli {
    /// xenstored socket or xenbus device (default: $XENSTORED_PATH, /var/run/xenstored/socket, /dev/xen/xenbus).
    #[arg(long, global = true)]
    xenstore: Option<PathBuf>,
    /// Bound on each wait for the backend, in seconds (xl kills hotplug scripts after 10 s).
    #[arg(long, global = true, default_value_t = 8.0)]
    timeout: f64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Attach the device of a backend directory (the toolstack's `add`).
    Add {
        /// Backend directory (default: $XENBUS_PATH).
        #[arg(long)]
        backend: Option<String>,
    },
    /// Tear down what `add` created for a backend directory (the toolstack's `remove`).
    Remove {
        /// Backend directory (default: $XENBUS_PATH).
        #[arg(long)]
        backend: Option<String>,
    },
    /// Attach a file to a loop device without XenStore, print `PATH MAJOR:MINOR DISKSEQ` (hex).
    /// The device stays attached until `detach`.
    Attach {
        /// Absolute path of the file (or block device).
        params: String,
        /// `r` or `w`.
        #[arg(long, default_value = "w")]
        mode: String,
    },
    /// Detach a loop device `attach` made, only if its diskseq is still DISKSEQ.
    Detach {
        /// `/dev/loopN`.
        path: PathBuf,
        /// The diskseq `attach` printed (hex).
        diskseq: String,
    },
}

fn backend_path(given: Option<String>) -> Result<String> {
    given.or_else(|| std::env::var("XENBUS_PATH").ok()).context(
        "no backend directory: pass --backend or set XENBUS_PATH (as xl does for hotplug scripts)",
    )
}

fn connect(cli_path: Option<&PathBuf>) -> Result<XenStore> {
    match cli_path {
        Some(p) => XenStore::open_at(p)
            .with_context(|| format!("connecting to XenStore at {}", p.display())),
        None => XenStore::open().context("connecting to XenStore"),
    }
}

fn run(cli: Cli) -> Result<()> {
    if !(cli.timeout.is_finite() && cli.timeout > 0.0 && cli.timeout <= 3600.0) {
        anyhow::bail!("--timeout must be between 0 and 3600 seconds");
    }
    let config = Config {
        timeout: Duration::from_secs_f64(cli.timeout),
    };
    match cli.command {
        Command::Add { backend } => {
            let backend = backend_path(backend)?;
            let xs = connect(cli.xenstore.as_ref())?;
            let attached = script::add(&xs, &backend, config)?;
            // Only now, with the backend holding the device, does our fd close.
            drop(attached);
        }
        Command::Remove { backend } => {
            let backend = backend_path(backend)?;
            let xs = connect(cli.xenstore.as_ref())?;
            script::remove(&xs, &backend)?;
        }
        Command::Attach { params, mode } => {
            let source = Source::parse(params.as_bytes())?;
            let mode = Mode::parse(mode.as_bytes())?;
            let opts = AttachOptions {
                mode,
                autoclear: false,
                dm_name: String::new(),
                dm_uuid: String::new(),
            };
            if matches!(source, Source::Linear(_)) {
                anyhow::bail!("attach does not create device-mapper devices (they need a backend to hand over to)");
            }
            let a = attach::attach(&source, &opts)?;
            println!(
                "{} {:x}:{:x} {:x}",
                a.path.display(),
                a.major,
                a.minor,
                a.diskseq
            );
        }
        Command::Detach { path, diskseq } => {
            let seq = xen::handoff::parse_diskseq(diskseq.as_bytes()).context("diskseq")?;
            let released = attach::release(&Created::Loop, &path, seq)?;
            println!("{released:?}");
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BLKHOTPLUG_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("blkhotplug: {e:#}");
            ExitCode::FAILURE
        }
    }
}
