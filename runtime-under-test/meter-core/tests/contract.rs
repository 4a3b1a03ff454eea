//! The reason codes in docs/runtime-contract.md and the `Reason` enum agree.

use meter_core::reason::Reason;

const CONTRACT: &str = include_str!("../../../docs/runtime-contract.md");

fn contract_codes() -> Vec<&'static str> {
    let section = CONTRACT
        .split("## Reason codes")
        .nth(1)
        .expect("contract has a Reason codes section");
    let section = section.split("\n## ").next().unwrap_or(section);
    // The first paragraph lists the reasons of denials; a later sentence adds the one code that
    // answers a command rather than an access.
    let denials = section.split("\n\n").next().unwrap_or(section);
    let mut codes: Vec<&str> = denials.split('`').skip(1).step_by(2).collect();
    codes.extend(
        section
            .split("answers a command rather than an access: `")
            .nth(1)
            .and_then(|rest| rest.split('`').next()),
    );
    codes
}

#[test]
fn every_contract_code_is_a_reason() {
    let codes = contract_codes();
    assert_eq!(codes.len(), Reason::ALL.len(), "{codes:?}");
    for code in codes {
        code.parse::<Reason>()
            .unwrap_or_else(|_| panic!("{code} is in the contract but not in Reason"));
    }
}

#[test]
fn every_reason_the_runtime_reports_is_in_the_contract() {
    let codes = contract_codes();
    for reason in Reason::ALL {
        assert!(
            codes.contains(&reason.code()),
            "{reason} missing from the contract"
        );
    }
}
