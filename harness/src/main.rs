//! The `vigil` command line. Also answers as `meter`, `meterd` (the reference runtime, when the
//! binary is called by those names) and as a session leader for the sim backend.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use vigil::backend::BackendKind;
use vigil::engine::{self, RunOptions};

/// Proves how a licence runtime behaves in virtual machines and on terminal servers.
///
/// Scenarios are YAML files that boot guests, snapshot, clone, migrate and move them, plug in
/// dongles, open RDP sessions, and then assert what the runtime did. The built-in scenarios live
/// in scenarios/; `vigil list` shows them.
///
/// Exit codes: 0 every verdict passed, 1 the runtime failed a check, 2 the harness could not run.
#[derive(Debug, Parser)]
#[command(name = "vigil", version, propagate_version = true)]
struct Cli {
    /// More log output (repeat for more); also VIGIL_LOG=debug.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Commands,
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Backend that runs the machines.
    #[arg(long, value_enum, default_value_t = BackendKind::Sim)]
    backend: BackendKind,
    /// Folder for the run's reports (a sub-folder per run is created).
    #[arg(long, default_value = "reports")]
    report_dir: PathBuf,
    /// Stop a scenario at its first failed assertion.
    #[arg(long)]
    fail_fast: bool,
    /// Folder with another runtime's `meter` and `meterd` (default: the reference runtime).
    #[arg(long)]
    runtime: Option<PathBuf>,
    /// Keep machine folders and disks after the run.
    #[arg(long)]
    keep: bool,
}

#[derive(Debug, Subcommand)]
enum Commands {
    /// Run scenarios by built-in name or file path.
    ///
    /// Example: `vigil scenario clone-guest` or `vigil scenario ./my-policy.yaml`.
    Scenario {
        /// Built-in names or paths to YAML files.
        #[arg(required = true)]
        scenarios: Vec<String>,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Audit a vendor's licence policy: run every threat of the catalogue that applies to each
    /// product and print a threat × product matrix.
    ///
    /// The policy file holds `products:` exactly as a scenario's `policy:` does. Each cell is
    /// *defended* (the runtime refused the attack), *allowed by your policy* (a policy field lets
    /// it through: the vendor's choice), *UNDEFENDED* (a hole; exit code 1) or *n/a*. The matrix
    /// is written as audit.json, audit.md and audit.html into the run's report folder.
    ///
    /// Example: `vigil audit my-policy.yaml` or `vigil audit --list-threats`.
    Audit {
        /// The policy file (`products:`).
        #[arg(required_unless_present = "list_threats")]
        policy: Option<PathBuf>,
        /// Print the threats with what each proves, and run nothing.
        #[arg(long)]
        list_threats: bool,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Run every built-in scenario (optionally only those with a tag).
    Suite {
        /// Only scenarios with this tag (repeatable: any of them).
        #[arg(long)]
        tag: Vec<String>,
        /// Run only shard K of N (e.g. `2/4`): the scenarios sorted by name, every N-th from the
        /// K-th; the N shards of a job matrix run every scenario exactly once.
        #[arg(long, value_name = "K/N")]
        shard: Option<engine::shard::Shard>,
        #[command(flatten)]
        run: RunArgs,
    },
    /// List the built-in scenarios with their tags and descriptions.
    List {
        /// Show which scenarios a backend can run, and why not.
        #[arg(long, value_enum)]
        backend: Option<BackendKind>,
    },
    /// Check scenario files without running them (exit 2 on the first invalid file).
    Validate {
        /// Paths to YAML files (or built-in names).
        #[arg(required = true)]
        paths: Vec<String>,
    },
    /// Print the JSON Schema of the scenario language (for editors).
    Schema,
    /// Tell which backends this machine can run, and why not.
    Doctor {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Measure the harness: the built-in suite and a large generated station-share scenario.
    Bench {
        /// Folder for the JSON results.
        #[arg(long, default_value = "reports/bench")]
        out: PathBuf,
        /// Guests in the generated scenario.
        #[arg(long, default_value_t = 100)]
        guests: usize,
        /// RDP sessions per guest in the generated scenario.
        #[arg(long, default_value_t = 10)]
        sessions: usize,
    },
    /// Prove the verdicts can fail: each guarded built-in scenario must pass on the full runtime
    /// and fail at a named assertion with each defence it guards switched off.
    ///
    /// Needs the weakened runtime: `cargo build -p meterd --features weakened --bin meter-weakened`.
    Verify {
        /// Only these built-in scenarios or files (default: every built-in one with guards).
        scenarios: Vec<String>,
        /// The weakened runtime binary.
        #[arg(long, default_value = "target/debug/meter-weakened")]
        weakened: PathBuf,
        /// Folder for the per-run reports.
        #[arg(long, default_value = "reports/verify")]
        work_dir: PathBuf,
        /// Folder for verdicts.json and verdicts.md.
        #[arg(long, default_value = "reports")]
        out: PathBuf,
        /// Also write the Markdown table here (e.g. docs/verdicts.md).
        #[arg(long)]
        docs: Option<PathBuf>,
        /// The backend every run uses (a weakened runtime reaches guests on its runtime disk).
        #[arg(long, value_enum, default_value_t = BackendKind::Sim)]
        backend: BackendKind,
        /// How many runs go at once (default: one per CPU on sim, one on guest backends,
        /// whose guests each want a CPU of their own).
        #[arg(long)]
        jobs: Option<std::num::NonZeroUsize>,
    },
    /// Build or inspect the guest image of the qemu backend (images/out/).
    Image {
        #[command(subcommand)]
        action: ImageAction,
    },
    /// Internal: a login-session leader for the sim backend.
    #[command(hide = true)]
    SessionLeader {
        /// Die with this process (the harness that started the leader).
        #[arg(long)]
        parent: Option<i32>,
        /// Open no login session (a process session only, as an unattended console).
        #[arg(long)]
        no_login: bool,
        /// Run the session's processes as this uid (and a group of the same number).
        #[arg(long)]
        uid: Option<u32>,
    },
}

#[derive(Debug, Subcommand)]
enum ImageAction {
    /// Build the guest kernel, initramfs and data disk (the recipe `make images` runs); cached:
    /// nothing is rebuilt unless an input changed. Needs root for the Debian packages it fetches.
    Build {
        /// Cargo profile of the runtime and agent inside the image: release boots faster under
        /// TCG (about 0.6 s of a 2.7 s boot here); dev reuses the test build's compilation.
        #[arg(long, value_enum, default_value_t = ImageProfile::Release)]
        profile: ImageProfile,
    },
    /// Say where the image is and whether it is complete.
    Status,
}

/// Cargo profile of the binaries inside the guest image.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum ImageProfile {
    Dev,
    Release,
}

/// Runs `vigil verify` makes at once unless told: sim runs mostly wait on their runtimes' timers,
/// so one per CPU; guests under emulation want a CPU each, so one at a time.
fn default_verify_jobs(backend: BackendKind) -> std::num::NonZeroUsize {
    match backend {
        BackendKind::Sim => {
            std::thread::available_parallelism().unwrap_or(std::num::NonZeroUsize::MIN)
        }
        _ => std::num::NonZeroUsize::MIN,
    }
}

fn main() -> ExitCode {
    let argv0 = std::env::args_os()
        .next()
        .map(PathBuf::from)
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_default();
    if matches!(argv0.as_str(), "meterd" | "meter") {
        // The harness runs its runtime on simulated machines too.
        meterd::harness_build::enable();
    }
    match argv0.as_str() {
        "meterd" => {
            return match meterd::cli::run_daemon(std::env::args_os().collect()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("meterd: {e:#}");
                    ExitCode::from(2)
                }
            };
        }
        "meter" => {
            let code = meterd::cli::run_meter(std::env::args_os().collect());
            return ExitCode::from(u8::try_from(code).unwrap_or(2));
        }
        _ => {}
    }
    let cli = Cli::parse();
    init_logging(cli.verbose);
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vigil: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("VIGIL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn run_options(run: RunArgs, verbose: u8) -> RunOptions {
    RunOptions {
        backend: run.backend,
        report_root: run.report_dir,
        fail_fast: run.fail_fast,
        runtime_bin: run.runtime,
        keep: run.keep,
        verbose: verbose > 0,
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Commands::Scenario { scenarios, run } => {
            let loaded = engine::load_scenarios(&scenarios)?;
            let outcome = engine::run_scenarios(loaded, &run_options(run, cli.verbose))?;
            Ok(ExitCode::from(outcome.exit_code()))
        }
        Commands::Audit {
            policy,
            list_threats,
            run,
        } => {
            if list_threats {
                print!("{}", vigil::audit::threat_list());
                return Ok(ExitCode::SUCCESS);
            }
            let path = anyhow::Context::context(policy, "a policy file is needed")?;
            let policy = vigil::audit::load_policy(&path)?;
            let outcome = vigil::audit::run(&policy, &run_options(run, cli.verbose))?;
            println!("{}", outcome.matrix.markdown());
            eprintln!(
                "vigil: audit matrix in {}",
                outcome.report_dir.join("audit.html").display()
            );
            Ok(ExitCode::from(outcome.exit_code()))
        }
        Commands::Suite { tag, shard, run } => {
            let mut loaded = engine::builtin_scenarios(&tag)?;
            if let Some(shard) = shard {
                loaded = shard.select(loaded, |l| l.scenario.name.value.as_str());
                eprintln!("vigil: shard {shard}: {} scenarios", loaded.len());
                if loaded.is_empty() {
                    return Ok(ExitCode::SUCCESS);
                }
            }
            let outcome = engine::run_scenarios(loaded, &run_options(run, cli.verbose))?;
            Ok(ExitCode::from(outcome.exit_code()))
        }
        Commands::List { backend } => {
            engine::print_list(backend)?;
            Ok(ExitCode::SUCCESS)
        }
        Commands::Validate { paths } => {
            let loaded = engine::load_scenarios(&paths)?;
            for scenario in &loaded {
                println!(
                    "{}: valid ({} steps)",
                    scenario.source,
                    scenario.scenario.steps.len()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Commands::Schema => {
            println!("{}", vigil::scenario::schema_json());
            Ok(ExitCode::SUCCESS)
        }
        Commands::Doctor { json } => {
            let bin = engine::default_runtime_bin()?;
            let report = vigil::doctor::diagnose(&bin);
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                for f in &report.findings {
                    println!(
                        "{} {:<20} {}",
                        if f.ok { "✓" } else { "✗" },
                        f.check,
                        f.detail
                    );
                }
                println!("usable backends: {}", report.usable_backends.join(", "));
            }
            Ok(ExitCode::SUCCESS)
        }
        Commands::Bench {
            out,
            guests,
            sessions,
        } => {
            vigil::bench::run(&out, guests, sessions)?;
            Ok(ExitCode::SUCCESS)
        }
        Commands::Verify {
            scenarios,
            weakened,
            work_dir,
            out,
            docs,
            backend,
            jobs,
        } => {
            let subset = !scenarios.is_empty();
            let loaded = if scenarios.is_empty() {
                engine::builtin_scenarios(&[])?
            } else {
                engine::load_scenarios(&scenarios)?
            };
            let options = vigil::verify::VerifyOptions {
                vigil: std::env::current_exe()?,
                weakened_bin: weakened,
                work_dir,
                backend,
                subset,
                jobs: jobs.unwrap_or_else(|| default_verify_jobs(backend)),
            };
            let report = vigil::verify::run(&options, &loaded)?;
            vigil::verify::write(&report, &out, docs.as_deref())?;
            println!("{}", report.markdown());
            Ok(if report.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Commands::Image { action } => image(action),
        Commands::SessionLeader {
            parent,
            no_login,
            uid,
        } => {
            vigil::session_leader::run(parent, !no_login, uid)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `vigil image …`: the image recipe lives in this checkout (scripts/build-image.sh).
fn image(action: ImageAction) -> anyhow::Result<ExitCode> {
    use anyhow::Context;
    let checkout = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = vigil::backend::guest::image::image_dir();
    match action {
        ImageAction::Build { profile } => {
            let script = checkout.join("scripts/build-image.sh");
            anyhow::ensure!(
                script.exists(),
                "the image recipe {} is not here: `vigil image build` runs from a Vigil checkout",
                script.display()
            );
            let status = std::process::Command::new(&script)
                .current_dir(&checkout)
                .env(
                    "VIGIL_IMAGE_PROFILE",
                    match profile {
                        ImageProfile::Dev => "dev",
                        ImageProfile::Release => "release",
                    },
                )
                .status()
                .with_context(|| format!("cannot run {}", script.display()))?;
            anyhow::ensure!(status.success(), "the image recipe failed ({status})");
            Ok(ExitCode::SUCCESS)
        }
        ImageAction::Status => {
            let mut complete = true;
            for file in vigil::backend::guest::image::IMAGE_FILES {
                let path = dir.join(file);
                match std::fs::metadata(&path) {
                    Ok(meta) => {
                        println!("{:<16} {:>10} bytes  {}", file, meta.len(), path.display())
                    }
                    Err(_) => {
                        complete = false;
                        println!("{file:<16} missing     {}", path.display());
                    }
                }
            }
            if let Ok(manifest) = std::fs::read_to_string(dir.join("manifest.json")) {
                println!("manifest: {}", manifest.trim());
            }
            if !complete {
                eprintln!(
                    "vigil: the image is incomplete; build it with `vigil image build` (or `make images`)"
                );
                return Ok(ExitCode::from(2));
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
