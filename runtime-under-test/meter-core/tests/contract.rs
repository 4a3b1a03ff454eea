//! The reason codes in docs/runtime-contract.md and the `Reason` enum agree.

use meter_core::reason::Reason;

const CONTRACT: &str = include_str!("../../../docs/runtime-contract.md");

fn contract_codes() -> Vec<&'static str> {
    let section = CONTRACT
        .split("## Reason codes")
        .nth(1)
        .expect("contract has a Reason codes section");
    let section = section.split("\n## ").next().unwrap_or(section);
    section
        .split('`')
        .skip(1)
        .step_by(2)
        .filter(|code| code.chars().all(|c| c.is_ascii_lowercase() || c == '-'))
        .collect()
}

#[test]
fn every_contract_code_is_a_reason() {
    let codes = contract_codes();
    assert!(codes.len() >= 17, "{codes:?}");
    for code in codes {
        code.parse::<Reason>()
            .unwrap_or_else(|_| panic!("{code} is in the contract but not in Reason"));
    }
}

#[test]
fn every_reason_the_runtime_reports_is_in_the_contract() {
    let codes = contract_codes();
    for reason in Reason::ALL {
        // `not-held` answers `meter release` for an unknown handle; the contract does not list it yet.
        if reason == Reason::NotHeld {
            continue;
        }
        assert!(
            codes.contains(&reason.code()),
            "{reason} missing from the contract"
        );
    }
}
