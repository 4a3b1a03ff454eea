//! The harness names the same reason codes and defences as the runtime contract document.

use std::collections::BTreeSet;

use vigil::scenario::{ALL_REASONS, Defence};

fn contract() -> String {
    std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/runtime-contract.md"),
    )
    .unwrap()
}

/// The text of the `## <title>` section, up to the next `## ` heading.
fn section(doc: &str, title: &str) -> String {
    let start = doc
        .find(&format!("\n## {title}\n"))
        .unwrap_or_else(|| panic!("the contract has no `{title}` section"));
    let rest = &doc[start + title.len() + 5..];
    rest[..rest.find("\n## ").unwrap_or(rest.len())].to_owned()
}

/// Every `code` written in backticks in `text`.
fn backticked(text: &str) -> Vec<String> {
    text.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_reason_codes_are_the_contracts() {
    let doc = contract();
    let reasons = section(&doc, "Reason codes");
    let list = reasons.split("\n\n").next().unwrap();
    let documented: BTreeSet<String> = backticked(list).into_iter().collect();
    let harness: BTreeSet<String> = ALL_REASONS.iter().map(|r| r.code().to_owned()).collect();
    assert_eq!(harness, documented);
}

#[test]
fn the_defences_are_the_contracts() {
    let doc = contract();
    let defences = section(&doc, "Defences");
    let documented: Vec<String> = defences
        .lines()
        .filter_map(|line| line.strip_prefix("| `"))
        .map(|rest| rest.split('`').next().unwrap().to_owned())
        .collect();
    let harness: Vec<String> = Defence::ALL.iter().map(|d| d.name().to_owned()).collect();
    assert_eq!(harness, documented);
    for defence in Defence::ALL {
        assert!(
            defences.contains(&format!("| `{}` | {} |", defence.name(), defence.summary())),
            "{} is described differently in the contract",
            defence.name()
        );
    }
}

#[test]
fn defence_names_are_their_scenario_spelling() {
    for defence in Defence::ALL {
        let yaml = serde_saphyr::to_string(&defence).unwrap();
        assert_eq!(yaml.trim(), defence.name());
    }
}
