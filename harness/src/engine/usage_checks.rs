//! Checking `usage` and `usage-log` assertions against a runtime's usage report and log.

use serde_json::Value;

use super::assertions::Check;
use super::world::World;
use crate::backend::Caller;
use crate::runtime;
use crate::scenario::{self as sc, Duration};

/// The figures a `usage` assertion reads from a report.
#[derive(Debug, Default, PartialEq)]
struct Figures {
    grants: u64,
    denials: u64,
    peak: u32,
    held_ms: u64,
}

fn figures(report: &Value, a: &sc::UsageAssertion) -> Figures {
    let product = u64::from(a.product.value);
    let user = a.user.as_ref().map(|u| u.value.as_str());
    let of_product = |table: &str| -> Vec<&Value> {
        report[table]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|row| row["product"]["code"].as_u64() == Some(product))
            .collect()
    };
    // Peaks are the product's; the other figures are the user's, when one is named.
    let rows = |table: &str| -> Vec<&Value> {
        of_product(table)
            .into_iter()
            .filter(|row| user.is_none_or(|u| row["user"].as_str() == Some(u)))
            .collect()
    };
    let number = |row: &Value, key: &str| row[key].as_u64().unwrap_or(0);
    let mut figures = Figures::default();
    for row in rows("usage") {
        figures.grants += number(row, "grants");
        figures.held_ms += number(row, "held-ms");
    }
    for row in rows("denials") {
        let reason_matches = a
            .reason
            .as_ref()
            .is_none_or(|r| row["reason"].as_str() == Some(r.value.code()));
        if reason_matches {
            figures.denials += number(row, "count");
        }
    }
    figures.peak = of_product("peaks")
        .iter()
        .map(|row| u32::try_from(number(row, "peak")).unwrap_or(u32::MAX))
        .max()
        .unwrap_or(0);
    figures
}

/// The figures asked for, in words; and whether `found` meets them.
fn describe(a: &sc::UsageAssertion, found: Option<&Figures>) -> (String, bool) {
    let mut parts = Vec::new();
    let mut holds = true;
    let mut figure = |name: String, expected: u64, actual: Option<u64>| {
        holds &= actual == Some(expected);
        parts.push(match actual {
            Some(actual) => format!("{name} {actual}"),
            None => format!("{name} {expected}"),
        });
    };
    let reason = a
        .reason
        .as_ref()
        .map(|r| format!(" ({})", r.value.code()))
        .unwrap_or_default();
    if let Some(grants) = a.grants {
        figure("grants".into(), grants, found.map(|f| f.grants));
    }
    if let Some(denials) = a.denials {
        figure(
            format!("denials{reason}"),
            denials,
            found.map(|f| f.denials),
        );
    }
    if let Some(peak) = a.peak {
        figure(
            "peak".into(),
            u64::from(peak),
            found.map(|f| u64::from(f.peak)),
        );
    }
    if let Some(held) = a.held {
        let tolerance = a.tolerance.unwrap_or(sc::DEFAULT_HELD_TOLERANCE);
        match found {
            Some(f) => {
                holds &= f.held_ms.abs_diff(held.as_millis()) <= tolerance.as_millis();
                parts.push(format!("held {}", Duration::from_millis(f.held_ms)));
            }
            None => parts.push(format!("held {held} ± {tolerance}")),
        }
    }
    (parts.join(", "), holds)
}

impl World {
    /// Checks figures of a runtime's usage report.
    pub(super) fn check_usage(&mut self, a: &sc::UsageAssertion) -> Check {
        let (expected, _) = describe(a, None);
        let whose = a
            .user
            .as_ref()
            .map(|u| format!(" for {}", u.value))
            .unwrap_or_default();
        let summary = format!(
            "usage of product {}{whose} on {}: {expected}",
            a.product.value, a.machine.value
        );
        let machine = a.machine.value.clone();
        self.poll_until(summary, expected, |world| {
            let args = ["usage".to_string(), "report".to_string()];
            let (code, report) =
                runtime::meter_json(world.backend.as_mut(), &machine, Caller::Admin, &args)
                    .map_err(|e| e.to_string())?;
            if code != Some(0) {
                return Err(format!("`meter usage report` answered {report}"));
            }
            Ok(describe(a, Some(&figures(&report, a))))
        })
    }

    /// Checks what verifying a runtime's usage log finds.
    pub(super) fn check_usage_log(&mut self, a: &sc::UsageLogAssertion) -> Check {
        let expected = if a.intact { "intact" } else { "tampered" }.to_string();
        let summary = format!(
            "verifying the usage log on {} finds it {expected}",
            a.machine.value
        );
        let machine = a.machine.value.clone();
        self.poll_until(summary, expected.clone(), |world| {
            let args = ["usage".to_string(), "verify".to_string()];
            let (code, answer) =
                runtime::meter_json(world.backend.as_mut(), &machine, Caller::Admin, &args)
                    .map_err(|e| e.to_string())?;
            let actual = match (code, answer["intact"].as_bool()) {
                (Some(0), Some(true)) => format!("intact ({} records)", answer["records"]),
                (Some(1), Some(false)) => format!(
                    "tampered: {}",
                    answer["problems"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|p| p["problem"].as_str().unwrap_or("?"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                _ => {
                    return Err(format!(
                        "`meter usage verify` answered {answer} (exit {code:?})"
                    ));
                }
            };
            let holds = actual.starts_with(&expected);
            Ok((actual, holds))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assertion(yaml: &str) -> sc::UsageAssertion {
        serde_saphyr::from_str(yaml).unwrap()
    }

    #[test]
    fn figures_sum_a_users_rows_of_the_product() {
        let report = serde_json::json!({
            "usage": [
                {"product": {"firm": 10, "code": 1001}, "user": "dan", "grants": 2, "held-ms": 3_600_000},
                {"product": {"firm": 10, "code": 1001}, "user": "sam", "grants": 1, "held-ms": 5},
                {"product": {"firm": 10, "code": 1002}, "user": "dan", "grants": 9, "held-ms": 9},
            ],
            "denials": [
                {"product": {"firm": 10, "code": 1001}, "user": "dan", "reason": "rule-max-reached", "count": 2},
                {"product": {"firm": 10, "code": 1001}, "user": "dan", "reason": "rule-denied", "count": 1},
            ],
            "peaks": [{"product": {"firm": 10, "code": 1001}, "peak": 3}],
        });
        let a = assertion(
            "{ machine: ts1, product: 1001, user: dan, grants: 2, denials: 2, reason: rule-max-reached, held: 1h }",
        );
        let found = figures(&report, &a);
        assert_eq!(
            found,
            Figures {
                grants: 2,
                denials: 2,
                peak: 3,
                held_ms: 3_600_000
            }
        );
        let (actual, holds) = describe(&a, Some(&found));
        assert!(holds, "{actual}");
        assert_eq!(actual, "grants 2, denials (rule-max-reached) 2, held 1h");
        let off = assertion("{ machine: ts1, product: 1001, user: dan, held: 2h }");
        assert!(!describe(&off, Some(&found)).1);
    }
}
