//! Command lines of `meterd` and `meter`; the binaries (and multi-call hosts) call these.

use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use serde_json::json;

use crate::client::ClientError;
use crate::commands::MeterCommand;
use crate::outcome::{EXIT_DENIED, EXIT_OK, EXIT_UNREACHABLE, Refused};

/// Runs meterd with these arguments (argv[0] first) until SIGTERM or SIGINT.
pub fn run_daemon(args: Vec<OsString>) -> anyhow::Result<()> {
    let args = crate::startup::DaemonArgs::parse_from(args);
    if args.runtime_id.is_some() && !crate::harness_build::enabled() {
        // Presenting any id would let two machines pass for one runtime (to a dongle: hops
        // that count no rebind); only harness builds, which play that attack, take it.
        anyhow::bail!(
            "--runtime-id is for harness builds only: this runtime's id is its own (stored part and machine UUID)"
        );
    }
    init_logging();
    crate::weakened::announce()?;
    let roots = crate::trust_roots::load().map_err(Clone::clone)?;
    tracing::info!(
        roots = roots.len(),
        "trusting firm certificates from these roots"
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("meterd")
        .build()
        .context("Cannot start the async runtime")?;
    let outcome = runtime.block_on(crate::startup::daemon_main(args));
    // A task stuck in blocking work must not keep a stopped daemon (and its database) alive.
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    outcome
}

fn init_logging() {
    init_logging_at("info");
}

/// Logs to stderr, filtered by `METER_LOG` (else `default`); colours only on a terminal.
fn init_logging_at(default: &str) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("METER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
}

/// meter: ask the local licence runtime for licences, administer it, and issue licences as a vendor.
///
/// Every subcommand prints JSON with --json (one document per line). Exit codes: 0 done or
/// granted, 1 the runtime said no (the JSON says why), 2 usage error or runtime unreachable.
#[derive(Debug, Parser)]
#[command(name = "meter", version)]
pub struct MeterArgs {
    /// The local meterd socket.
    #[arg(
        long,
        env = "METER_SOCKET",
        global = true,
        default_value = "/run/meter/meterd.sock"
    )]
    pub socket: PathBuf,
    /// Print JSON, one document per line.
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: MeterCommand,
}

/// The name the process was called by (argv[0]'s file name): `meter` for the command-line
/// tool, anything else for the daemon.
pub fn called_as(args: &[OsString]) -> &str {
    args.first()
        .and_then(|arg0| std::path::Path::new(arg0).file_name())
        .and_then(|name| name.to_str())
        .unwrap_or_default()
}

/// Runs meter with these arguments (argv[0] first); returns the process exit code.
pub fn run_meter(args: Vec<OsString>) -> i32 {
    let args = match MeterArgs::try_parse_from(args) {
        Ok(args) => args,
        Err(e) => {
            let _ = e.print();
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                    EXIT_OK
                }
                _ => EXIT_UNREACHABLE,
            };
        }
    };
    init_logging_quiet();
    if let Err(e) = crate::weakened::from_environment() {
        eprintln!("meter: {e}");
        return EXIT_UNREACHABLE;
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("meter: cannot start: {e}");
            return EXIT_UNREACHABLE;
        }
    };
    let json = args.json;
    match runtime.block_on(crate::commands::run(args.socket, args.json, args.command)) {
        Ok(outcome) => outcome.code,
        Err(e) => {
            let reachable = !e.chain().any(|c| c.downcast_ref::<ClientError>().is_some());
            if json {
                println!("{}", json!({"error": format!("{e:#}"), "reason": null}));
            } else {
                eprintln!("meter: {e:#}");
            }
            if reachable && e.downcast_ref::<Refused>().is_some() {
                EXIT_DENIED
            } else {
                EXIT_UNREACHABLE
            }
        }
    }
}

fn init_logging_quiet() {
    init_logging_at("warn");
}
