//! Run events and the reports made from them: report.json, junit.xml, summary.md, report.html,
//! live progress.

mod html;
mod junit;
mod summary;
mod usage_html;

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;

pub use html::report_html;
pub use junit::junit_xml;
pub use summary::summary_markdown;

/// How a scenario, step or assertion ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// Everything held.
    Pass,
    /// The runtime under test failed a check.
    Fail,
    /// The harness could not run it.
    Error,
}

impl Verdict {
    /// Combines two verdicts: an error outranks a failure, which outranks a pass.
    pub fn worst(self, other: Verdict) -> Verdict {
        use Verdict::*;
        match (self, other) {
            (Error, _) | (_, Error) => Error,
            (Fail, _) | (_, Fail) => Fail,
            _ => Pass,
        }
    }

    /// Upper-case label for tables.
    pub fn label(self) -> &'static str {
        match self {
            Verdict::Pass => "PASS",
            Verdict::Fail => "FAIL",
            Verdict::Error => "ERROR",
        }
    }
}

/// Everything that happens in a run, in order.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Event {
    /// A run began.
    RunStarted {
        /// Run id (also the report folder's name).
        run_id: String,
        /// Backend used.
        backend: String,
        /// Environment details from the backend.
        environment: serde_json::Value,
    },
    /// A scenario began.
    ScenarioStarted {
        /// Scenario name.
        scenario: String,
        /// Where it came from.
        source: String,
        /// Number of steps.
        steps: usize,
    },
    /// A step finished.
    Step {
        /// Scenario name.
        scenario: String,
        /// Step number, from 1.
        index: usize,
        /// Line of the step in the scenario file.
        line: usize,
        /// What the step did, in words.
        summary: String,
        /// The machines it acted on (none for world-wide steps such as `advance`).
        #[serde(skip_serializing_if = "Vec::is_empty")]
        machines: Vec<String>,
        /// What the runtime answered the app, access or activation the step started.
        #[serde(skip_serializing_if = "Vec::is_empty")]
        answers: Vec<StepAnswer>,
        /// How many of the scenario's apps hold each product after the step (for every product
        /// an app was granted so far).
        #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
        holding: std::collections::BTreeMap<u32, u32>,
        /// Every machine's power state after the step (`running`, `paused`, `off`).
        #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
        power: std::collections::BTreeMap<String, String>,
        /// Time taken, milliseconds.
        elapsed_ms: f64,
        /// Pass, or why not.
        verdict: Verdict,
        /// Error or diagnostics, if it did not pass.
        message: Option<String>,
    },
    /// An assertion was checked.
    Assertion {
        /// Scenario name.
        scenario: String,
        /// Step number, from 1.
        index: usize,
        /// Line of the assertion in the scenario file.
        line: usize,
        /// What was asserted, in words.
        summary: String,
        /// What the scenario expected.
        expected: String,
        /// What the runtime showed.
        actual: String,
        /// Pass or fail.
        verdict: Verdict,
        /// Time taken, milliseconds.
        elapsed_ms: f64,
    },
    /// A runtime's usage report at the end of a scenario (`meter usage report`), for the
    /// machines that served licences or had rules or usage checked.
    UsageReport {
        /// Scenario name.
        scenario: String,
        /// The machine whose runtime keeps the log.
        machine: String,
        /// The report, as the runtime answered it.
        report: serde_json::Value,
    },
    /// A scenario ended.
    ScenarioFinished {
        /// Scenario name.
        scenario: String,
        /// Overall verdict.
        verdict: Verdict,
        /// Wall time, milliseconds.
        elapsed_ms: f64,
        /// Assertions checked.
        assertions: usize,
        /// Assertions that failed.
        failed: usize,
        /// Why it errored, if it did.
        error: Option<String>,
    },
}

/// What the runtime answered an app, access or activation a step started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StepAnswer {
    /// The product asked for.
    pub product: u32,
    /// The app's or access's name in the scenario.
    pub name: String,
    /// Granted or denied.
    pub granted: bool,
    /// The reason of a denial.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Receives events as they happen.
pub trait EventSink {
    /// Takes one event.
    fn event(&mut self, event: &Event);
}

/// Prints one line per step and assertion to stderr.
#[derive(Debug, Default)]
pub struct Progress {
    /// Print every step, not only failures and scenario ends.
    pub verbose: bool,
}

impl EventSink for Progress {
    fn event(&mut self, event: &Event) {
        let mut err = std::io::stderr().lock();
        let _ = match event {
            Event::RunStarted {
                run_id, backend, ..
            } => {
                writeln!(err, "vigil: run {run_id} on the {backend} backend")
            }
            Event::ScenarioStarted {
                scenario, steps, ..
            } => writeln!(err, "▶ {scenario} ({steps} steps)"),
            Event::Step {
                index,
                summary,
                elapsed_ms,
                verdict,
                message,
                ..
            } => {
                if *verdict != Verdict::Pass {
                    writeln!(
                        err,
                        "  {index:>3} ✗ {summary} — {}",
                        message.as_deref().unwrap_or("failed")
                    )
                } else if self.verbose {
                    writeln!(err, "  {index:>3} · {summary} ({elapsed_ms:.0} ms)")
                } else {
                    Ok(())
                }
            }
            Event::Assertion {
                index,
                summary,
                expected,
                actual,
                verdict,
                ..
            } => {
                if *verdict == Verdict::Pass {
                    writeln!(err, "  {index:>3} ✓ {summary}")
                } else {
                    writeln!(
                        err,
                        "  {index:>3} ✗ {summary}\n        expected: {expected}\n        actual:   {actual}"
                    )
                }
            }
            Event::UsageReport { .. } => Ok(()),
            Event::ScenarioFinished {
                scenario,
                verdict,
                elapsed_ms,
                assertions,
                failed,
                error,
            } => {
                let extra = error
                    .as_ref()
                    .map(|e| format!(" — {e}"))
                    .unwrap_or_default();
                writeln!(
                    err,
                    "{} {scenario}: {} assertions, {failed} failed, {:.2} s{extra}",
                    verdict.label(),
                    assertions,
                    elapsed_ms / 1000.0
                )
            }
        };
    }
}

/// Keeps every event for the files written at the end.
#[derive(Debug, Default)]
pub struct Recorder {
    /// Events in order.
    pub events: Vec<Event>,
}

impl EventSink for Recorder {
    fn event(&mut self, event: &Event) {
        self.events.push(event.clone());
    }
}

/// A finished scenario, as the reports show it.
#[derive(Debug, Clone, Serialize)]
pub struct ScenarioResult {
    /// Scenario name.
    pub name: String,
    /// Verdict.
    pub verdict: Verdict,
    /// Wall time, milliseconds.
    pub elapsed_ms: f64,
    /// Assertions checked.
    pub assertions: usize,
    /// Assertions failed.
    pub failed: usize,
    /// Error, if the harness could not run it.
    pub error: Option<String>,
}

/// The scenarios of a run, taken from its events.
pub fn scenario_results(events: &[Event]) -> Vec<ScenarioResult> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::ScenarioFinished {
                scenario,
                verdict,
                elapsed_ms,
                assertions,
                failed,
                error,
            } => Some(ScenarioResult {
                name: scenario.clone(),
                verdict: *verdict,
                elapsed_ms: *elapsed_ms,
                assertions: *assertions,
                failed: *failed,
                error: error.clone(),
            }),
            _ => None,
        })
        .collect()
}

/// Writes report.json, junit.xml, summary.md and report.html into a run folder and points
/// `latest` at it.
pub fn write_reports(run_dir: &Path, run_id: &str, events: &[Event]) -> std::io::Result<()> {
    std::fs::create_dir_all(run_dir)?;
    let results = scenario_results(events);
    let overall = results
        .iter()
        .fold(Verdict::Pass, |acc, r| acc.worst(r.verdict));
    let report = serde_json::json!({
        "run_id": run_id,
        "verdict": overall,
        "scenarios": results,
        "events": events,
    });
    std::fs::write(
        run_dir.join("report.json"),
        serde_json::to_vec_pretty(&report).map_err(std::io::Error::other)?,
    )?;
    std::fs::write(run_dir.join("junit.xml"), junit_xml(run_id, events))?;
    std::fs::write(run_dir.join("summary.md"), summary_markdown(run_id, events))?;
    std::fs::write(
        run_dir.join("report.html"),
        report_html(run_id, events, "logs"),
    )?;
    if let Some(parent) = run_dir.parent() {
        let latest = parent.join("latest");
        let _ = std::fs::remove_file(&latest);
        let _ = std::os::unix::fs::symlink(run_id, &latest);
    }
    Ok(())
}

/// A new run id: UTC time plus a short random suffix.
pub fn new_run_id() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    let mut suffix = [0u8; 2];
    let _ = getrandom::fill(&mut suffix);
    format!(
        "{y:04}{m:02}{d:02}-{:02}{:02}{:02}-{}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        hex::encode(suffix)
    )
}

/// Converts days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Default folder for reports: `reports/` in the current directory.
pub fn default_report_root() -> PathBuf {
    PathBuf::from("reports")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_784), (2026, 11, 27));
    }

    #[test]
    fn worst_verdict_wins() {
        assert_eq!(Verdict::Pass.worst(Verdict::Fail), Verdict::Fail);
        assert_eq!(Verdict::Fail.worst(Verdict::Error), Verdict::Error);
        assert_eq!(Verdict::Pass.worst(Verdict::Pass), Verdict::Pass);
    }
}
