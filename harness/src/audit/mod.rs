//! `vigil audit`: a vendor's policy against the threat catalogue. Every threat that applies to
//! a product is instantiated from its template, all of them run in one run, and the outcome is a
//! threat × product matrix (audit.json, audit.md, audit.html in the run's report folder).

pub mod matrix;
pub mod threats;

use std::path::Path;

use anyhow::Context;

use crate::engine::{self, LoadedScenario, RunOptions};
use crate::report::{Event, Verdict};
use crate::scenario::{self, Policy, Product};
use matrix::{Cell, Matrix, Row};
use threats::{Plan, THREATS, Threat};

/// What an audit found.
#[derive(Debug, Clone)]
pub struct AuditOutcome {
    /// The matrix.
    pub matrix: Matrix,
    /// The run's report folder (the matrix files are in it).
    pub report_dir: std::path::PathBuf,
}

impl AuditOutcome {
    /// 0 every applicable threat was defended or allowed by the policy, 1 one was undefended,
    /// 2 a threat could not be run.
    pub fn exit_code(&self) -> u8 {
        let cells = self.matrix.rows.iter().flat_map(|r| &r.cells);
        if cells.clone().any(|c| matches!(c, Cell::Error { .. })) {
            2
        } else if cells.clone().any(|c| matches!(c, Cell::Undefended { .. })) {
            1
        } else {
            0
        }
    }
}

/// Reads and checks a policy file.
pub fn load_policy(path: &Path) -> anyhow::Result<Policy> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the policy {}", path.display()))?;
    Ok(scenario::parse_policy(&text, &path.display().to_string())?)
}

/// The name of the scenario a threat becomes for a product.
fn scenario_name(threat: &Threat, product: &Product) -> String {
    format!("{}-{}", threat.name, product.code.value)
}

/// Runs every applicable threat on every product of `policy` and writes the matrix.
pub fn run(policy: &Policy, options: &RunOptions) -> anyhow::Result<AuditOutcome> {
    let mut loaded = Vec::new();
    let mut plans = Vec::new();
    for threat in THREATS {
        for product in &policy.products {
            let plan = threat.plan(product);
            let expect = match &plan {
                Plan::NotApplicable(_) => None,
                Plan::Refused { expect } | Plan::Allowed { expect, .. } => Some(expect.clone()),
            };
            if let Some(expect) = expect {
                let text = threat.instantiate(product, &expect);
                let origin = format!("threats/{}.yaml (product {})", threat.name, product.code);
                let scenario = scenario::parse_str(&text, &origin).with_context(|| {
                    format!(
                        "the `{}` threat does not fit product {}",
                        threat.name, product.code
                    )
                })?;
                loaded.push(LoadedScenario {
                    scenario,
                    source: origin,
                });
            }
            plans.push((threat, product, plan));
        }
    }
    let outcome = engine::run_scenarios(loaded, options)?;
    let rows = THREATS
        .iter()
        .map(|threat| Row {
            threat: threat.name.to_owned(),
            proves: threat.proves.to_owned(),
            cells: plans
                .iter()
                .filter(|(t, _, _)| t.name == threat.name)
                .map(|(t, product, plan)| cell(&outcome.events, &scenario_name(t, product), plan))
                .collect(),
        })
        .collect();
    let matrix = Matrix {
        run_id: outcome
            .report_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        backend: options.backend.to_string(),
        products: policy
            .products
            .iter()
            .map(|p| (p.code.value, p.name.value.clone()))
            .collect(),
        rows,
    };
    matrix.write(&outcome.report_dir)?;
    Ok(AuditOutcome {
        matrix,
        report_dir: outcome.report_dir,
    })
}

/// The cell of one threat on one product, from the run's events.
fn cell(events: &[Event], scenario: &str, plan: &Plan) -> Cell {
    let (expect, field) = match plan {
        Plan::NotApplicable(why) => return Cell::NotApplicable { why: why.clone() },
        Plan::Refused { expect } => (expect, None),
        Plan::Allowed { field, expect } => (expect, Some(field.clone())),
    };
    let finished = events.iter().find_map(|e| match e {
        Event::ScenarioFinished {
            scenario: s,
            verdict,
            error,
            ..
        } if s == scenario => Some((*verdict, error.clone())),
        _ => None,
    });
    // The outcome check is the scenario's last assertion.
    let outcome = events.iter().rev().find_map(|e| match e {
        Event::Assertion {
            scenario: s,
            actual,
            verdict,
            ..
        } if s == scenario => Some((actual.clone(), *verdict)),
        _ => None,
    });
    match (finished, outcome) {
        (None, _) => Cell::Error {
            message: "the threat did not run".into(),
        },
        (Some((Verdict::Error, error)), _) | (Some((_, error @ Some(_))), None) => Cell::Error {
            message: error.unwrap_or_else(|| "the threat could not run".into()),
        },
        (Some(_), None) => Cell::Error {
            message: "the threat checked nothing".into(),
        },
        (Some(_), Some((actual, verdict))) => match (field, verdict == Verdict::Pass) {
            (None, true) => Cell::Defended { actual },
            (None, false) => Cell::Undefended {
                expected: expect.clone(),
                actual,
            },
            (Some(field), true) => Cell::AllowedByPolicy { field, actual },
            (Some(field), false) => Cell::StricterThanPolicy { field, actual },
        },
    }
}

/// `vigil audit --list-threats`: every threat with what it proves and where it applies.
pub fn threat_list() -> String {
    let mut out = String::new();
    for threat in THREATS {
        out.push_str(&format!(
            "{:<28} {} (threats/{}.yaml)\n",
            threat.name, threat.proves, threat.name
        ));
    }
    out
}
