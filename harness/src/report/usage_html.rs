//! The usage reports of a scenario's runtimes as HTML tables: who held what for how long, the
//! peaks, and every denial with its reason.

use std::fmt::Write as _;

use serde_json::Value;

use super::Event;
use super::html::escape;

/// The usage tables of every runtime a scenario recorded a usage report for (empty if none).
pub(super) fn usage_tables(events: &[Event], scenario: &str) -> String {
    let mut out = String::new();
    for event in events {
        let Event::UsageReport {
            scenario: s,
            machine,
            report,
        } = event
        else {
            continue;
        };
        if s != scenario {
            continue;
        }
        let _ = writeln!(
            out,
            "<h3>Usage on {} <small>({} records)</small></h3>",
            escape(machine),
            report["records"]
        );
        out.push_str(&table(
            &["product", "user", "grants", "held"],
            rows(report, "usage").map(|r| {
                vec![
                    product(r),
                    text(&r["user"]),
                    r["grants"].to_string(),
                    held(&r["held-ms"]),
                ]
            }),
        ));
        out.push_str(&table(
            &["product", "hour (unix ms)", "peak"],
            rows(report, "peaks")
                .map(|r| vec![product(r), r["hour-ms"].to_string(), r["peak"].to_string()]),
        ));
        out.push_str(&table(
            &["product", "user", "reason", "rule", "denials"],
            rows(report, "denials").map(|r| {
                vec![
                    product(r),
                    text(&r["user"]),
                    text(&r["reason"]),
                    text(&r["rule"]),
                    r["count"].to_string(),
                ]
            }),
        ));
        out.push_str(&table(
            &["product", "reserved for", "seats", "unused"],
            rows(report, "reserved-unused").map(|r| {
                vec![
                    product(r),
                    text(&r["who"]),
                    r["reserved"].to_string(),
                    held(&r["unused-ms"]),
                ]
            }),
        ));
    }
    out
}

fn rows<'a>(report: &'a Value, table: &str) -> impl Iterator<Item = &'a Value> {
    report[table].as_array().into_iter().flatten()
}

fn product(row: &Value) -> String {
    row["product"]["code"].to_string()
}

fn text(value: &Value) -> String {
    match value {
        Value::Null => "–".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn held(ms: &Value) -> String {
    format!("{:.1} s", ms.as_u64().unwrap_or(0) as f64 / 1000.0)
}

/// A table with a header, or nothing when there are no rows.
fn table(header: &[&str], rows: impl Iterator<Item = Vec<String>>) -> String {
    let body: Vec<String> = rows
        .map(|cells| {
            let cells: String = cells
                .iter()
                .map(|c| format!("<td>{}</td>", escape(c)))
                .collect();
            format!("<tr>{cells}</tr>\n")
        })
        .collect();
    if body.is_empty() {
        return String::new();
    }
    let head: String = header
        .iter()
        .map(|h| format!("<th>{}</th>", escape(h)))
        .collect();
    format!(
        "<table class=\"usage\">\n<tr>{head}</tr>\n{}</table>\n",
        body.concat()
    )
}
