//! The threat × product matrix of an audit, and its JSON, Markdown and HTML forms.

use std::path::Path;

use anyhow::Context;
use serde::Serialize;

/// What one threat did on one product.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "cell", rename_all = "kebab-case")]
pub enum Cell {
    /// The runtime refused the attack (what it answered).
    Defended {
        /// What the runtime showed.
        actual: String,
    },
    /// The product's policy allows the attack, and the runtime allowed it.
    AllowedByPolicy {
        /// The policy field that allows it.
        field: String,
        /// What the runtime showed.
        actual: String,
    },
    /// The runtime let the attack through although the policy forbids it: a hole.
    Undefended {
        /// What a defended runtime shows.
        expected: String,
        /// What the runtime showed.
        actual: String,
    },
    /// The policy allows the attack, yet the runtime refused it.
    StricterThanPolicy {
        /// The policy field that allows it.
        field: String,
        /// What the runtime showed.
        actual: String,
    },
    /// The threat does not apply to the product.
    NotApplicable {
        /// Why not.
        why: String,
    },
    /// The threat could not be run.
    Error {
        /// Why.
        message: String,
    },
}

impl Cell {
    /// A short label.
    pub fn label(&self) -> &'static str {
        match self {
            Cell::Defended { .. } => "defended",
            Cell::AllowedByPolicy { .. } => "allowed by your policy",
            Cell::Undefended { .. } => "UNDEFENDED",
            Cell::StricterThanPolicy { .. } => "refused (stricter than your policy)",
            Cell::NotApplicable { .. } => "n/a",
            Cell::Error { .. } => "error",
        }
    }

    /// The detail shown beside the label.
    pub fn detail(&self) -> String {
        match self {
            Cell::Defended { actual } => actual.clone(),
            Cell::AllowedByPolicy { field, actual } => format!("`{field}`: {actual}"),
            Cell::Undefended { expected, actual } => format!("expected {expected}, got {actual}"),
            Cell::StricterThanPolicy { field, actual } => format!("`{field}`, yet {actual}"),
            Cell::NotApplicable { why } => why.clone(),
            Cell::Error { message } => message.clone(),
        }
    }

    fn css(&self) -> &'static str {
        match self {
            Cell::Defended { .. } => "defended",
            Cell::AllowedByPolicy { .. } => "allowed",
            Cell::Undefended { .. } => "undefended",
            Cell::StricterThanPolicy { .. } => "stricter",
            Cell::NotApplicable { .. } => "na",
            Cell::Error { .. } => "error",
        }
    }
}

/// One threat's row: a cell per product, in the policy's order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Row {
    /// Threat name.
    pub threat: String,
    /// What it proves.
    pub proves: String,
    /// One cell per product.
    pub cells: Vec<Cell>,
}

/// The whole matrix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Matrix {
    /// The run that produced it.
    pub run_id: String,
    /// The backend it ran on.
    pub backend: String,
    /// Products (code, name), the columns.
    pub products: Vec<(u32, String)>,
    /// Threats, the rows.
    pub rows: Vec<Row>,
}

impl Matrix {
    /// Writes audit.json, audit.md and audit.html into `dir`.
    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        let files = [
            ("audit.json", serde_json::to_string_pretty(self)?),
            ("audit.md", self.markdown()),
            ("audit.html", self.html()),
        ];
        for (name, text) in files {
            let path = dir.join(name);
            std::fs::write(&path, text)
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        Ok(())
    }

    /// The matrix as a Markdown table, with a line per cell that needs reading.
    pub fn markdown(&self) -> String {
        let mut out = format!(
            "# Policy audit (run {}, {} backend)\n\n| threat |",
            self.run_id, self.backend
        );
        for (code, name) in &self.products {
            out.push_str(&format!(" {code} {name} |"));
        }
        out.push_str("\n|---|");
        out.push_str(&"---|".repeat(self.products.len()));
        out.push('\n');
        for row in &self.rows {
            out.push_str(&format!("| {} |", row.threat));
            for cell in &row.cells {
                out.push_str(&format!(" {} |", cell.label()));
            }
            out.push('\n');
        }
        out.push_str("\n## Cells\n\n");
        for row in &self.rows {
            for ((code, _), cell) in self.products.iter().zip(&row.cells) {
                out.push_str(&format!(
                    "- **{}** on {code}: {} — {}\n",
                    row.threat,
                    cell.label(),
                    cell.detail()
                ));
            }
        }
        out
    }

    /// The matrix as a self-contained HTML page, cells coloured by kind.
    pub fn html(&self) -> String {
        let mut out = String::from(
            "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Vigil policy audit</title>\n<style>\
             body{font-family:sans-serif;margin:2em;color:#222}table{border-collapse:collapse}\
             th,td{border:1px solid #bbb;padding:.4em .6em;vertical-align:top;font-size:14px}\
             td small{display:block;color:#444;max-width:22em}\
             .defended{background:#d7f5d7}.allowed{background:#fff3c4}.undefended{background:#f8c4c4;font-weight:bold}\
             .stricter{background:#dde8ff}.na{background:#f2f2f2;color:#777}.error{background:#f0d0f0}\
             </style></head><body>\n",
        );
        out.push_str(&format!(
            "<h1>Policy audit</h1>\n<p>Run {} on the {} backend. Green: the runtime refused the attack. \
             Yellow: your policy allows it. Red: a hole. Grey: does not apply.</p>\n<table><tr><th>threat</th>",
            escape(&self.run_id),
            escape(&self.backend)
        ));
        for (code, name) in &self.products {
            out.push_str(&format!("<th>{code} {}</th>", escape(name)));
        }
        out.push_str("</tr>\n");
        for row in &self.rows {
            out.push_str(&format!(
                "<tr><th title=\"{}\">{}</th>",
                escape(&row.proves),
                escape(&row.threat)
            ));
            for cell in &row.cells {
                out.push_str(&format!(
                    "<td class=\"{}\">{}<small>{}</small></td>",
                    cell.css(),
                    escape(cell.label()),
                    escape(&cell.detail())
                ));
            }
            out.push_str("</tr>\n");
        }
        out.push_str("</table>\n<p>The run's own report, with a timeline per threat: <a href=\"report.html\">report.html</a>.</p>\n</body></html>\n");
        out
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matrix() -> Matrix {
        Matrix {
            run_id: "r1".into(),
            backend: "sim".into(),
            products: vec![(1001, "cad".into()), (2001, "cam<".into())],
            rows: vec![Row {
                threat: "crash".into(),
                proves: "released".into(),
                cells: vec![
                    Cell::Defended {
                        actual: "released in 3 ms".into(),
                    },
                    Cell::NotApplicable {
                        why: "not a soft licence".into(),
                    },
                ],
            }],
        }
    }

    #[test]
    fn the_forms_show_every_cell() {
        let m = matrix();
        insta::assert_snapshot!(m.markdown());
        let html = m.html();
        assert!(html.contains("class=\"defended\"") && html.contains("class=\"na\""));
        assert!(html.contains("cam&lt;") && !html.contains("cam<"));
    }
}
