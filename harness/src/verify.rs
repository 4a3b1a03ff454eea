//! Verdict fidelity: every built-in scenario must pass on the full runtime and fail, naming the
//! failed assertion, on a runtime with any defence it guards switched off (`METER_WEAKEN`).
//!
//! Each run is a real `vigil scenario` process with its own report folder; the verdict is read
//! from its `report.json`. The weakened runtime is the `meter-weakened` binary of meterd's
//! `weakened` feature, linked as `meter` and `meterd` into a runtime folder.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use serde::Serialize;
use serde_json::Value;

use crate::backend::BackendKind;
use crate::engine::LoadedScenario;
use crate::runtime::WEAKEN_VARIABLE;
use crate::scenario::Defence;

/// Every defence a weakened runtime can switch off, by scenario-language name.
pub fn all_defences() -> Vec<&'static str> {
    Defence::ALL.iter().map(|d| d.name()).collect()
}

/// What `vigil verify` does.
#[derive(Debug, Clone)]
pub struct VerifyOptions {
    /// The `vigil` binary that runs each scenario (normally the current executable).
    pub vigil: PathBuf,
    /// The `meter-weakened` binary (`cargo build -p meterd --features weakened --bin meter-weakened`).
    pub weakened_bin: PathBuf,
    /// Folder for the per-run reports and the weakened runtime folder.
    pub work_dir: PathBuf,
    /// The backend every scenario runs on.
    pub backend: BackendKind,
    /// Only some scenarios run: a defence none of them guards is not counted as uncaught.
    pub subset: bool,
    /// How many runs go at once (each is a `vigil scenario` process of its own).
    pub jobs: std::num::NonZeroUsize,
}

/// How one scenario fared against one runtime.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum Outcome {
    /// Full runtime: every assertion held.
    Passed,
    /// Full runtime: the scenario did not pass.
    Broken {
        /// Exit code and why.
        detail: String,
    },
    /// Weakened runtime: the scenario failed (exit 1) at a named assertion.
    Caught {
        /// The first failed assertion: line, what was asserted, expected and actual.
        assertion: String,
    },
    /// Weakened runtime: the scenario passed, or did not fail at an assertion.
    Missed {
        /// Exit code and what happened instead.
        detail: String,
    },
}

/// One run: a scenario against the full runtime (`defence: None`) or with one defence off.
#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    /// Scenario name.
    pub scenario: String,
    /// Defence switched off, or `None` for the full runtime.
    pub defence: Option<String>,
    /// What happened.
    #[serde(flatten)]
    pub outcome: Outcome,
    /// Wall time of the run, seconds.
    pub seconds: f64,
}

impl Cell {
    /// True when this run is what fidelity requires (pass on full, fail on weakened).
    pub fn as_required(&self) -> bool {
        matches!(self.outcome, Outcome::Passed | Outcome::Caught { .. })
    }
}

/// A hole a scenario shows open because the vendor's policy allows it.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyHole {
    /// The scenario that shows it.
    pub scenario: String,
    /// The product.
    pub product: u32,
    /// The policy field and value that allow it.
    pub policy: String,
    /// What the licensee gains.
    pub gains: String,
    /// The scenario passed on the full runtime: the hole is shown open, as declared.
    pub shown: bool,
}

/// The whole verification: every run plus the coverage it proves.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    /// Every run, scenario by scenario.
    pub cells: Vec<Cell>,
    /// Holes left open by policy, as the scenarios declare and show them.
    pub undefended_by_policy: Vec<PolicyHole>,
    /// Scenarios that catch each defence.
    pub caught_by: BTreeMap<String, Vec<String>>,
    /// Defences no scenario catches.
    pub uncaught: Vec<String>,
    /// Total wall time, seconds.
    pub seconds: f64,
}

impl VerifyReport {
    /// True when every run is as required and every defence is caught by some scenario.
    pub fn ok(&self) -> bool {
        self.uncaught.is_empty()
            && self.cells.iter().all(Cell::as_required)
            && self.undefended_by_policy.iter().all(|hole| hole.shown)
    }

    /// The defence × scenario table in Markdown.
    pub fn markdown(&self) -> String {
        let mut scenarios: Vec<&str> = Vec::new();
        for cell in &self.cells {
            if !scenarios.contains(&cell.scenario.as_str()) {
                scenarios.push(&cell.scenario);
            }
        }
        let mut out = String::from("# Verdict fidelity\n\n");
        out.push_str(
            "Each built-in scenario runs against the full runtime (it must pass) and against a \
             weakened runtime for every defence it guards (it must fail at a named assertion). \
             Generated by `make verify-scenarios` (`vigil verify`).\n\n",
        );
        let _ = writeln!(
            out,
            "Verdict: **{}** ({} runs, {:.0} s).\n",
            if self.ok() {
                "every defence caught"
            } else {
                "INCOMPLETE"
            },
            self.cells.len(),
            self.seconds
        );
        out.push_str("## Defence × scenario\n\n| defence |");
        for scenario in &scenarios {
            let _ = write!(out, " {scenario} |");
        }
        out.push_str("\n|---|");
        out.push_str(&"---|".repeat(scenarios.len()));
        out.push('\n');
        let mut rows: Vec<Option<&str>> = vec![None];
        rows.extend(all_defences().into_iter().map(Some));
        for defence in rows {
            let _ = write!(out, "| {} |", defence.unwrap_or("*(full runtime)*"));
            for scenario in &scenarios {
                let mark = self
                    .cells
                    .iter()
                    .find(|c| c.scenario == *scenario && c.defence.as_deref() == defence)
                    .map_or("", |c| match c.outcome {
                        Outcome::Passed => "pass",
                        Outcome::Broken { .. } => "**BROKEN**",
                        Outcome::Caught { .. } => "caught",
                        Outcome::Missed { .. } => "**missed**",
                    });
                let _ = write!(out, " {mark} |");
            }
            out.push('\n');
        }
        out.push_str("\n## Caught where\n\n| defence | what it holds (off in the weakened runtime) | caught by | first failed assertion |\n|---|---|---|---|\n");
        for weakening in Defence::ALL {
            let defence = weakening.name();
            let by = self.caught_by.get(defence).cloned().unwrap_or_default();
            let tried = self
                .cells
                .iter()
                .any(|c| c.defence.as_deref() == Some(defence));
            if by.is_empty() && !tried && !self.uncaught.iter().any(|d| d == defence) {
                // A run of some scenarios only: none of them guards it.
                continue;
            }
            let first = self
                .cells
                .iter()
                .find_map(|c| match &c.outcome {
                    Outcome::Caught { assertion } if c.defence.as_deref() == Some(defence) => {
                        Some(format!("{}: {}", c.scenario, assertion))
                    }
                    _ => None,
                })
                .unwrap_or_else(|| "**not caught**".into());
            let _ = writeln!(
                out,
                "| {defence} | {} | {} | {} |",
                weakening.summary(),
                if by.is_empty() {
                    "—".into()
                } else {
                    by.join(", ")
                },
                first.replace('|', "\\|")
            );
        }
        if !self.undefended_by_policy.is_empty() {
            out.push_str(
                "\n## Undefended by policy\n\nHoles a vendor's policy leaves open on purpose. Each \
                 is shown by a built-in scenario that asserts the hole on the full runtime (it \
                 passes only while the hole is open); a stricter value of the same field closes \
                 it.\n\n| scenario | product | policy | what the licensee gains | shown |\n|---|---|---|---|---|\n",
            );
            for hole in &self.undefended_by_policy {
                let _ = writeln!(
                    out,
                    "| {} | {} | `{}` | {} | {} |",
                    hole.scenario,
                    hole.product,
                    hole.policy,
                    hole.gains.replace('|', "\\|"),
                    if hole.shown { "open" } else { "**not shown**" }
                );
            }
        }
        let problems: Vec<&Cell> = self.cells.iter().filter(|c| !c.as_required()).collect();
        if !problems.is_empty() {
            out.push_str("\n## Not as required\n\n");
            for cell in problems {
                let detail = match &cell.outcome {
                    Outcome::Broken { detail } | Outcome::Missed { detail } => detail.as_str(),
                    _ => "",
                };
                let _ = writeln!(
                    out,
                    "- {} with {}: {}",
                    cell.scenario,
                    cell.defence.as_deref().unwrap_or("the full runtime"),
                    detail
                );
            }
        }
        out
    }
}

/// Why verification could not run.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The weakened runtime binary is missing.
    #[error(
        "No weakened runtime at {0}: build it with `cargo build -p meterd --features weakened --bin meter-weakened`"
    )]
    NoWeakenedRuntime(PathBuf),
    /// A file or folder could not be written or read.
    #[error("Cannot {what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> VerifyError + 'a {
    move |source| VerifyError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// The names of the defences a scenario guards.
pub fn guards_of(loaded: &LoadedScenario) -> Vec<String> {
    loaded
        .scenario
        .guards
        .iter()
        .map(|g| g.value.name().to_owned())
        .collect()
}

/// Links `meter-weakened` as `meter` and `meterd` into `<work_dir>/runtime`.
fn weakened_runtime_dir(options: &VerifyOptions) -> Result<PathBuf, VerifyError> {
    let bin = std::fs::canonicalize(&options.weakened_bin)
        .map_err(|_| VerifyError::NoWeakenedRuntime(options.weakened_bin.clone()))?;
    let dir = options.work_dir.join("runtime");
    crate::runtime::folder::link_multi_call(&bin, &dir).map_err(|e| VerifyError::Io {
        what: "link",
        path: e.path,
        source: e.source,
    })?;
    Ok(dir)
}

/// One run to make: a scenario against the full runtime (`defence` none) or a weakened one.
struct Job<'a> {
    loaded: &'a LoadedScenario,
    defence: Option<String>,
}

/// Runs every scenario with guards against the full runtime and each guarded weakening,
/// [`VerifyOptions::jobs`] runs at a time; the cells come in the scenarios' order whatever
/// order the runs end in.
pub fn run(
    options: &VerifyOptions,
    scenarios: &[LoadedScenario],
) -> Result<VerifyReport, VerifyError> {
    let started = Instant::now();
    let runtime = weakened_runtime_dir(options)?;
    let mut jobs = Vec::new();
    let mut guarded: BTreeSet<String> = BTreeSet::new();
    for loaded in scenarios {
        let guards = guards_of(loaded);
        guarded.extend(guards.iter().cloned());
        if guards.is_empty() && loaded.scenario.allowed_by_policy.is_empty() {
            continue;
        }
        jobs.push(Job {
            loaded,
            defence: None,
        });
        jobs.extend(guards.into_iter().map(|defence| Job {
            loaded,
            defence: Some(defence),
        }));
    }
    let cells = run_jobs(options, &jobs, &runtime)?;
    let mut undefended_by_policy = Vec::new();
    for (job, cell) in jobs.iter().zip(&cells) {
        if job.defence.is_some() {
            continue;
        }
        let shown = cell.outcome == Outcome::Passed;
        undefended_by_policy.extend(job.loaded.scenario.allowed_by_policy.iter().map(|a| {
            PolicyHole {
                scenario: cell.scenario.clone(),
                product: a.product.value,
                policy: a.policy.value.clone(),
                gains: a.gains.clone(),
                shown,
            }
        }));
    }
    let mut caught_by: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for cell in &cells {
        if let (Some(defence), Outcome::Caught { .. }) = (&cell.defence, &cell.outcome) {
            caught_by
                .entry(defence.clone())
                .or_default()
                .push(cell.scenario.clone());
        }
    }
    let caught: BTreeSet<&str> = caught_by.keys().map(String::as_str).collect();
    let uncaught = all_defences()
        .into_iter()
        .filter(|d| !caught.contains(d) && (!options.subset || guarded.contains(*d)))
        .map(str::to_owned)
        .collect();
    Ok(VerifyReport {
        cells,
        undefended_by_policy,
        caught_by,
        uncaught,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Makes every run of `jobs`, [`VerifyOptions::jobs`] at a time; their cells in `jobs`' order.
fn run_jobs(
    options: &VerifyOptions,
    jobs: &[Job<'_>],
    runtime: &Path,
) -> Result<Vec<Cell>, VerifyError> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let done: std::sync::Mutex<Vec<Option<Result<Cell, VerifyError>>>> =
        std::sync::Mutex::new(jobs.iter().map(|_| None).collect());
    let workers = options.jobs.get().min(jobs.len().max(1));
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let Some(job) = jobs.get(i) else { break };
                    let cell = run_one(
                        options,
                        &job.loaded.source,
                        &job.loaded.scenario.name,
                        job.defence.clone(),
                        runtime,
                    );
                    let failed = cell.is_err();
                    if let Ok(mut done) = done.lock() {
                        done[i] = Some(cell);
                    }
                    if failed {
                        // The harness itself failed: no further runs are started.
                        next.store(jobs.len(), std::sync::atomic::Ordering::SeqCst);
                    }
                }
            });
        }
    });
    let done = done.into_inner().unwrap_or_else(|e| e.into_inner());
    // A run the harness could not make stops the whole verification, with its error; a job
    // left unstarted (None) is only ever one after such a run.
    let mut cells = Vec::with_capacity(jobs.len());
    let mut unstarted = false;
    for cell in done {
        match cell {
            Some(Ok(cell)) => cells.push(cell),
            Some(Err(e)) => return Err(e),
            None => unstarted = true,
        }
    }
    debug_assert!(!unstarted, "a run was left unstarted without an error");
    Ok(cells)
}

/// How `vigil scenario` is told which scenario to run: a built-in by its name (so it runs from
/// any folder), a file by its path.
fn scenario_argument(source: &str, name: &str) -> String {
    if crate::scenario::builtin().iter().any(|b| b.path == source) {
        name.to_owned()
    } else {
        source.to_owned()
    }
}

fn run_one(
    options: &VerifyOptions,
    source: &str,
    name: &str,
    defence: Option<String>,
    runtime: &Path,
) -> Result<Cell, VerifyError> {
    let started = Instant::now();
    let label = defence.clone().unwrap_or_else(|| "full".to_owned());
    let reports = options.work_dir.join(&label).join(name);
    let _ = std::fs::remove_dir_all(&reports);
    std::fs::create_dir_all(&reports).map_err(io("create", &reports))?;
    let mut command = Command::new(&options.vigil);
    command
        .arg("scenario")
        .arg(scenario_argument(source, name))
        .arg("--report-dir")
        .arg(&reports)
        .arg("--backend")
        .arg(options.backend.to_string())
        .env_remove(WEAKEN_VARIABLE)
        .env("NO_COLOR", "1");
    if let Some(defence) = &defence {
        command
            .arg("--fail-fast")
            .arg("--runtime")
            .arg(runtime)
            .env(WEAKEN_VARIABLE, defence);
    }
    let output = command.output().map_err(io("run", &options.vigil))?;
    let code = output.status.code();
    let report = std::fs::read_to_string(reports.join("latest").join("report.json"))
        .ok()
        .and_then(|text| serde_json::from_str::<Value>(&text).ok());
    let failed = report.as_ref().and_then(first_failed_assertion);
    let stderr_tail = || {
        let text = String::from_utf8_lossy(&output.stderr);
        let lines: Vec<&str> = text.lines().rev().take(3).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join(" / ")
    };
    let outcome = match (&defence, code, failed) {
        (None, Some(0), _) => Outcome::Passed,
        (None, code, failed) => Outcome::Broken {
            detail: format!(
                "exit {code:?}: {}",
                failed
                    .unwrap_or_else(|| scenario_error(report.as_ref()).unwrap_or_else(stderr_tail))
            ),
        },
        (Some(_), Some(1), Some(assertion)) => Outcome::Caught { assertion },
        (Some(_), code, _) => Outcome::Missed {
            detail: format!(
                "exit {code:?}: {}",
                scenario_error(report.as_ref()).unwrap_or_else(|| if code == Some(0) {
                    "every assertion held".into()
                } else {
                    stderr_tail()
                })
            ),
        },
    };
    let cell = Cell {
        scenario: name.to_owned(),
        defence,
        outcome,
        seconds: started.elapsed().as_secs_f64(),
    };
    tracing::info!(scenario = name, defence = label, outcome = ?cell.outcome, "Verified");
    eprintln!(
        "{:<28} {:<24} {}",
        name,
        label,
        match &cell.outcome {
            Outcome::Passed => "pass".to_owned(),
            Outcome::Caught { assertion } => format!("caught: {assertion}"),
            Outcome::Broken { detail } => format!("BROKEN: {detail}"),
            Outcome::Missed { detail } => format!("MISSED: {detail}"),
        }
    );
    Ok(cell)
}

/// The first failed assertion of a report: `line N: summary (expected …, got …)`.
pub fn first_failed_assertion(report: &Value) -> Option<String> {
    report["events"].as_array()?.iter().find_map(|event| {
        (event["event"] == "assertion" && event["verdict"] == "fail").then(|| {
            format!(
                "line {}: {} (expected {}, got {})",
                event["line"],
                event["summary"].as_str().unwrap_or("?"),
                event["expected"].as_str().unwrap_or("?"),
                event["actual"].as_str().unwrap_or("?")
            )
        })
    })
}

fn scenario_error(report: Option<&Value>) -> Option<String> {
    report?["scenarios"]
        .as_array()?
        .iter()
        .find_map(|s| s["error"].as_str().map(str::to_owned))
}

/// Writes `verdicts.json` and `verdicts.md` into `dir`, and the Markdown to `docs` if given.
pub fn write(report: &VerifyReport, dir: &Path, docs: Option<&Path>) -> Result<(), VerifyError> {
    std::fs::create_dir_all(dir).map_err(io("create", dir))?;
    let json = dir.join("verdicts.json");
    let text = serde_json::to_string_pretty(report).expect("the report always encodes");
    std::fs::write(&json, text).map_err(io("write", &json))?;
    let markdown = report.markdown();
    let md = dir.join("verdicts.md");
    std::fs::write(&md, &markdown).map_err(io("write", &md))?;
    if let Some(docs) = docs {
        std::fs::write(docs, &markdown).map_err(io("write", docs))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scenario_language_and_the_runtime_name_the_same_defences() {
        let schema: Value = serde_json::from_str(&crate::scenario::schema_json()).unwrap();
        let text = schema.to_string();
        for defence in all_defences() {
            assert!(
                text.contains(&format!("\"{defence}\"")),
                "{defence} missing in the schema"
            );
        }
    }

    #[test]
    fn a_policy_hole_is_listed_and_must_be_shown() {
        let hole = |shown| PolicyHole {
            scenario: "state-restore-unwitnessed".into(),
            product: 3003,
            policy: "witness: optional".into(),
            gains: "Units come back.".into(),
            shown,
        };
        let mut report = VerifyReport {
            cells: vec![Cell {
                scenario: "state-restore-unwitnessed".into(),
                defence: None,
                outcome: Outcome::Passed,
                seconds: 0.1,
            }],
            undefended_by_policy: vec![hole(true)],
            caught_by: BTreeMap::new(),
            uncaught: Vec::new(),
            seconds: 0.1,
        };
        assert!(report.ok());
        let markdown = report.markdown();
        let section = markdown.split("## Undefended by policy").nth(1).unwrap();
        assert!(
            section.contains(
                "| state-restore-unwitnessed | 3003 | `witness: optional` | Units come back. | open |"
            ),
            "{section}"
        );
        // A scenario that did not pass did not show its hole: verification is incomplete.
        report.undefended_by_policy = vec![hole(false)];
        assert!(!report.ok());
        assert!(report.markdown().contains("**not shown**"));
    }

    #[test]
    fn the_first_failed_assertion_is_named() {
        let report = serde_json::json!({"events": [
            {"event": "assertion", "verdict": "pass", "line": 3, "summary": "a", "expected": "x", "actual": "x"},
            {"event": "assertion", "verdict": "fail", "line": 9, "summary": "app2 is denied", "expected": "denied", "actual": "granted"},
        ]});
        assert_eq!(
            first_failed_assertion(&report).as_deref(),
            Some("line 9: app2 is denied (expected denied, got granted)")
        );
    }
}
