//! summary.md: a table of scenarios fit for a CI job summary.

use std::fmt::Write;

use super::{Event, Verdict, scenario_results};

/// Renders the Markdown summary of a run.
pub fn summary_markdown(run_id: &str, events: &[Event]) -> String {
    let results = scenario_results(events);
    let passed = results
        .iter()
        .filter(|r| r.verdict == Verdict::Pass)
        .count();
    let mut out = String::new();
    let _ = writeln!(out, "# Vigil run {run_id}\n");
    let _ = writeln!(out, "{passed} of {} scenarios passed.\n", results.len());
    let _ = writeln!(
        out,
        "| scenario | verdict | assertions | failed | duration |"
    );
    let _ = writeln!(out, "|---|---|---:|---:|---:|");
    for r in &results {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {:.2} s |",
            r.name,
            r.verdict.label(),
            r.assertions,
            r.failed,
            r.elapsed_ms / 1000.0
        );
    }
    let failures: Vec<&Event> = events
        .iter()
        .filter(|e| {
            matches!(e, Event::Assertion { verdict, .. } if *verdict != Verdict::Pass)
                || matches!(e, Event::Step { verdict, .. } if *verdict != Verdict::Pass)
        })
        .collect();
    if !failures.is_empty() {
        let _ = writeln!(out, "\n## Failures\n");
        for event in failures {
            match event {
                Event::Assertion {
                    scenario,
                    line,
                    summary,
                    expected,
                    actual,
                    ..
                } => {
                    let _ = writeln!(
                        out,
                        "- **{scenario}** line {line}: {summary} — expected `{expected}`, got `{actual}`"
                    );
                }
                Event::Step {
                    scenario,
                    line,
                    summary,
                    message,
                    ..
                } => {
                    let first = message
                        .as_deref()
                        .and_then(|m| m.lines().next())
                        .unwrap_or("failed");
                    let _ = writeln!(out, "- **{scenario}** line {line}: {summary} — {first}");
                }
                _ => {}
            }
        }
    }
    out
}
