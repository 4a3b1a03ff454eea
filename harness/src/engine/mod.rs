//! The engine: runs a scenario's steps in order against a world through a [`Backend`], owns the
//! virtual clock, checks assertions, and streams every step and assertion as an [`Event`].

mod assertions;
mod seat_history;
pub mod shard;
mod usage_checks;
mod world;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::backend::WorldConfig;
use crate::backend::{BackendError, BackendKind, Operation};
use crate::report::{self, Event, EventSink, Progress, Recorder, Verdict};
use crate::runtime::VendorDesk;
use crate::scenario::{self, Scenario};

pub use assertions::Check;
pub use world::{FIRM, Tally, World};

/// A scenario ready to run, with where it came from.
#[derive(Debug, Clone)]
pub struct LoadedScenario {
    /// The validated scenario.
    pub scenario: Scenario,
    /// File path or `builtin:<name>`.
    pub source: String,
}

/// How a run is done.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Backend that runs the machines.
    pub backend: BackendKind,
    /// Folder under which the run's report folder is created.
    pub report_root: PathBuf,
    /// Stop a scenario at its first failed assertion.
    pub fail_fast: bool,
    /// Folder with `meter` and `meterd` (default: this binary, which answers to both names).
    pub runtime_bin: Option<PathBuf>,
    /// Keep machine folders after the run.
    pub keep: bool,
    /// Print every step.
    pub verbose: bool,
}

/// What a run produced.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    /// Worst verdict of all scenarios.
    pub verdict: Verdict,
    /// The run's report folder.
    pub report_dir: PathBuf,
    /// Every event.
    pub events: Vec<Event>,
}

impl RunOutcome {
    /// Process exit code: 0 pass, 1 a check failed, 2 the harness could not run.
    pub fn exit_code(&self) -> u8 {
        match self.verdict {
            Verdict::Pass => 0,
            Verdict::Fail => 1,
            Verdict::Error => 2,
        }
    }
}

/// Loads scenarios by built-in name or path; every one is validated before anything runs.
pub fn load_scenarios(names: &[String]) -> anyhow::Result<Vec<LoadedScenario>> {
    let mut loaded = Vec::new();
    for name in names {
        match scenario::find(name) {
            Ok(s) => loaded.push(LoadedScenario {
                source: s.origin.clone(),
                scenario: s,
            }),
            Err(e) => {
                let report = miette::Report::new(e);
                eprintln!("{report:?}");
                anyhow::bail!("scenario `{name}` is not valid; nothing was run");
            }
        }
    }
    Ok(loaded)
}

/// The built-in scenarios, optionally only those carrying one of `tags`.
pub fn builtin_scenarios(tags: &[String]) -> anyhow::Result<Vec<LoadedScenario>> {
    let mut loaded = Vec::new();
    for builtin in scenario::builtin() {
        let s = scenario::parse_str(builtin.text, builtin.path).map_err(|e| {
            anyhow::anyhow!(
                "built-in scenario {} is invalid:\n{:?}",
                builtin.name,
                miette::Report::new(e)
            )
        })?;
        if tags.is_empty() || s.tags.iter().any(|t| tags.contains(&t.value)) {
            loaded.push(LoadedScenario {
                source: s.origin.clone(),
                scenario: s,
            });
        }
    }
    if loaded.is_empty() {
        anyhow::bail!("no built-in scenario has the tag(s) {}", tags.join(", "));
    }
    Ok(loaded)
}

/// Prints the built-in scenarios.
pub fn print_list(backend: Option<BackendKind>) -> anyhow::Result<()> {
    let all = builtin_scenarios(&[])?;
    for s in &all {
        let tags: Vec<&str> = s.scenario.tags.iter().map(|t| t.value.as_str()).collect();
        let availability = match backend {
            None => String::new(),
            Some(kind) => match crate::backend::supports(kind, Operation::Run).err() {
                Some(why) => format!("  [cannot run on {kind}: {why}]"),
                None => String::new(),
            },
        };
        println!(
            "{:<28} [{}] {}{availability}",
            s.scenario.name.value,
            tags.join(", "),
            s.scenario.description.trim()
        );
    }
    Ok(())
}

/// Where the reference runtime lives: this binary, called `meter`/`meterd` through symlinks.
pub fn default_runtime_bin() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find the vigil executable")?;
    let dir = std::env::temp_dir().join(format!("vigil-runtime-{}", std::process::id()));
    crate::runtime::folder::link_multi_call(&exe, &dir)?;
    Ok(dir)
}

/// Runs scenarios one after another, each in a fresh world; writes the reports.
pub fn run_scenarios(
    scenarios: Vec<LoadedScenario>,
    options: &RunOptions,
) -> anyhow::Result<RunOutcome> {
    let run_id = report::new_run_id();
    let report_dir = options.report_root.join(&run_id);
    std::fs::create_dir_all(&report_dir)
        .with_context(|| format!("cannot create {}", report_dir.display()))?;
    let scratch = tempfile_dir(&run_id, options.backend)?;
    let runtime_bin = match &options.runtime_bin {
        Some(dir) => dir.clone(),
        None => {
            let exe = std::env::current_exe().context("cannot find the vigil executable")?;
            let dir = scratch.join("bin");
            crate::runtime::folder::link_multi_call(&exe, &dir)?;
            dir
        }
    };
    let harness_exe = std::env::current_exe().context("cannot find the vigil executable")?;

    let mut progress = Progress {
        verbose: options.verbose,
    };
    let mut recorder = Recorder::default();
    let mut emit = |event: Event| {
        progress.event(&event);
        recorder.event(&event);
    };
    emit(Event::RunStarted {
        run_id: run_id.clone(),
        backend: options.backend.to_string(),
        environment: serde_json::json!({"runtime": runtime_bin.display().to_string()}),
    });
    let interrupted = interrupt_flag();
    for (n, loaded) in scenarios.iter().enumerate() {
        if interrupted.load(std::sync::atomic::Ordering::SeqCst) {
            break;
        }
        let name = loaded.scenario.name.value.clone();
        let vendor = VendorDesk::open(
            &runtime_bin,
            &scratch.join(format!("{n:02}-vendor")),
            world::FIRM,
        );
        let config = WorldConfig {
            runtime_bin: runtime_bin.clone(),
            builtin_runtime: options.runtime_bin.is_none(),
            harness_exe: harness_exe.clone(),
            // Numbered, not named: socket paths inside must not grow with the scenario's name.
            work_dir: scratch.join(format!("{n:02}")),
            log_dir: report_dir.join("logs").join(&name),
            seed: seed_for(&run_id, &name),
            harness_root: vendor.as_ref().ok().map(|v| v.root_key().to_owned()),
        };
        let started = Instant::now();
        emit(Event::ScenarioStarted {
            scenario: name.clone(),
            source: loaded.source.clone(),
            steps: loaded.scenario.steps.len(),
        });
        let result = vendor.map_err(|e| e.to_string()).and_then(|vendor| {
            let backend =
                crate::backend::create(options.backend, config).map_err(|e| e.to_string())?;
            let mut world =
                World::new(backend, &loaded.scenario, vendor).map_err(|e| e.to_string())?;
            let tally = world.run(&loaded.scenario, options.fail_fast, &interrupted, &mut emit);
            world.finish();
            Ok(tally)
        });
        let (verdict, assertions, failed, error) = match result {
            Ok(tally) => (tally.verdict, tally.assertions, tally.failed, tally.error),
            Err(e) => (Verdict::Error, 0, 0, Some(e)),
        };
        emit(Event::ScenarioFinished {
            scenario: name,
            verdict,
            elapsed_ms: started.elapsed().as_secs_f64() * 1000.0,
            assertions,
            failed,
            error,
        });
    }
    let events = recorder.events;
    report::write_reports(&report_dir, &run_id, &events)
        .with_context(|| format!("cannot write reports into {}", report_dir.display()))?;
    if !options.keep {
        let _ = std::fs::remove_dir_all(&scratch);
    } else {
        eprintln!("vigil: machines kept in {}", scratch.display());
    }
    let verdict = report::scenario_results(&events)
        .iter()
        .fold(Verdict::Pass, |acc, r| acc.worst(r.verdict));
    let verdict = if interrupted.load(std::sync::atomic::Ordering::SeqCst) {
        Verdict::Error
    } else {
        verdict
    };
    eprintln!("vigil: reports in {}", report_dir.display());
    Ok(RunOutcome {
        verdict,
        report_dir,
        events,
    })
}

/// Where a run's machines live: `$TMPDIR` when set; for simulated machines otherwise the
/// RAM-backed /dev/shm when it is usable (a simulated disk needs no real one, and creating
/// thousands of small files there is far cheaper); else the system temp folder. Guest disks of
/// real VMs stay off /dev/shm, which may be small.
fn tempfile_dir(run_id: &str, backend: BackendKind) -> anyhow::Result<PathBuf> {
    // With the process id: runs started in the same second by processes side by side (a
    // parallel `vigil verify`, suite shards) never share a scratch folder.
    let name = format!("vigil-{run_id}-{}", std::process::id());
    if backend == BackendKind::Sim && std::env::var_os("TMPDIR").is_none() {
        let shm = Path::new("/dev/shm").join(&name);
        if std::fs::create_dir_all(&shm).is_ok() {
            return Ok(shm);
        }
    }
    let dir = std::env::temp_dir().join(name);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}

fn seed_for(run_id: &str, scenario: &str) -> u64 {
    use sha2::Digest;
    let d = sha2::Sha256::digest(format!("{run_id}/{scenario}"));
    u64::from_le_bytes(d[..8].try_into().expect("8 bytes"))
}

/// A flag set by Ctrl-C: the run stops after the current step and cleans up.
fn interrupt_flag() -> std::sync::Arc<std::sync::atomic::AtomicBool> {
    use std::sync::atomic::AtomicBool;
    static FLAG: std::sync::OnceLock<std::sync::Arc<AtomicBool>> = std::sync::OnceLock::new();
    FLAG.get_or_init(|| {
        let flag = std::sync::Arc::new(AtomicBool::new(false));
        let _ = signal_hook_install(std::sync::Arc::clone(&flag));
        flag
    })
    .clone()
}

fn signal_hook_install(flag: std::sync::Arc<std::sync::atomic::AtomicBool>) -> std::io::Result<()> {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    static TARGET: std::sync::OnceLock<std::sync::Arc<std::sync::atomic::AtomicBool>> =
        std::sync::OnceLock::new();
    let _ = TARGET.set(flag);
    extern "C" fn on_signal(_: libc::c_int) {
        if let Some(flag) = TARGET.get()
            && flag.swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            // Second Ctrl-C: leave now; children die with us (parent-death signal).
            // SAFETY: _exit is async-signal-safe.
            unsafe { libc::_exit(2) };
        }
    }
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for signal in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only touches an atomic and calls _exit.
        unsafe { sigaction(signal, &action) }.map_err(std::io::Error::from)?;
    }
    Ok(())
}

/// Step timeout used when a step has no better bound.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// Classifies a backend error: the runtime misbehaving fails the scenario; anything else means
/// the harness could not run it.
pub fn verdict_of(error: &BackendError) -> Verdict {
    match error {
        BackendError::Runtime { .. } | BackendError::Timeout { .. } => Verdict::Fail,
        _ => Verdict::Error,
    }
}
