//! Product policy YAML: accepted shapes and errors that name the field.

use meter_core::policy::{
    Allowance, BindingScheme, ContainerKind, Counting, PolicyError, ProductPolicy, Tolerance,
};
use rstest::rstest;

#[test]
fn a_full_policy_reads() {
    let policy = ProductPolicy::from_yaml(
        r#"
firm: 6000010
firm-name: Acme Tools
products:
  - code: 1001
    name: cad-pro
    container: soft
    quantity: 3
    counting: station-share
    expires-at: 1893456000000
    units: 100
    binding: { scheme: random, tolerance: loose }
    virtual-machines: deny
    terminal-server: deny
    on-rollback: reconcile
  - { code: 2001, name: cad-dongle, container: dongle, quantity: 0, counting: user-limit }
"#,
    )
    .unwrap();
    assert_eq!(policy.firm, 6_000_010);
    assert_eq!(policy.firm_name, "Acme Tools");
    let cad = policy.product(1001).unwrap();
    assert_eq!(cad.expires_at, Some(1_893_456_000_000));
    assert_eq!(cad.units, Some(100));
    assert_eq!(cad.binding.scheme, BindingScheme::Random);
    assert_eq!(cad.binding.tolerance, Tolerance::Loose);
    assert_eq!(cad.virtual_machines, Allowance::Deny);
    assert_eq!(cad.terminal_server, Allowance::Deny);
    let dongle = policy.product(2001).unwrap();
    assert_eq!(dongle.container, ContainerKind::Dongle);
    assert_eq!(dongle.counting, Counting::UserLimit);
    assert!(dongle.rules().is_local());
}

#[test]
fn the_scenario_form_without_a_firm_reads() {
    let policy = ProductPolicy::from_yaml(
        "products:\n  - { code: 1001, name: cad-pro, container: soft, quantity: 1, counting: station-share,\n      binding: { scheme: smartbind, tolerance: medium }, virtual-machines: allow }\n",
    )
    .unwrap();
    assert_eq!(policy.products.len(), 1);
}

#[rstest]
#[case::unknown_field("products:\n  - { code: 1001, name: cad, quantty: 3 }\n", &["line 2 column 30", "unknown field `quantty`", "quantity"])]
#[case::unknown_top_level("prodcts: []\n", &["line 1 column 1", "unknown field `prodcts`"])]
#[case::bad_counting("products:\n  - code: 1001\n    name: cad\n    counting: per-seat\n", &["line 4 column 15", "`per-seat`", "station-share"])]
#[case::bad_tolerance("products:\n  - code: 1001\n    name: cad\n    binding: { tolerance: lax }\n", &["line 4", "`lax`", "loose, medium, strict"])]
#[case::unknown_binding_field("products:\n  - code: 1001\n    name: cad\n    binding: { schema: ip }\n", &["line 4", "unknown field `schema`"])]
#[case::negative_quantity("products:\n  - code: 1001\n    name: cad\n    quantity: -1\n", &["line 4 column 15", "quantity: -1"])]
#[case::missing_name("products:\n  - code: 1001\n", &["line 2", "missing field `name`"])]
#[case::bad_allowance("products:\n  - { code: 1, name: a, virtual-machines: maybe }\n", &["`maybe`", "allow, deny"])]
#[case::duplicate_code("products:\n  - { code: 1, name: a }\n  - { code: 1, name: b }\n", &["product code 1 appears more than once"])]
#[case::empty_name("products:\n  - { code: 1, name: ' ' }\n", &["products[0].name", "must not be empty"])]
#[case::zero_code("products:\n  - { code: 5, name: a }\n  - { code: 0, name: b }\n", &["products[1].code"])]
#[case::no_products("products: []\n", &["products is empty"])]
fn bad_policies_are_refused_with_the_place(#[case] yaml: &str, #[case] says: &[&str]) {
    let error = ProductPolicy::from_yaml(yaml).unwrap_err();
    assert!(
        error.to_string().starts_with("Invalid product policy"),
        "{error}"
    );
    let text = chain(&error);
    for part in says {
        assert!(text.contains(part), "{part:?} not in {text}");
    }
    if let PolicyError::Yaml(_) = error {
        assert_eq!(error.to_string(), "Invalid product policy");
    }
}

/// The error and its sources, as `anyhow`'s `{:#}` shows them.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
