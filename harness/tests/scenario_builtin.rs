//! Every built-in scenario parses, validates and is embedded in the binary.

use std::collections::BTreeSet;
use std::path::Path;

use vigil::scenario::{self, Step};

fn scenarios_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../scenarios"))
}

#[test]
fn every_builtin_parses_and_validates() {
    let mut failures = Vec::new();
    for builtin in scenario::builtin() {
        match scenario::parse_str(builtin.text, builtin.path) {
            Ok(parsed) => {
                assert_eq!(
                    parsed.name.value, builtin.name,
                    "name must equal the file stem"
                );
                assert!(
                    !parsed.description.is_empty(),
                    "{} has no description",
                    builtin.name
                );
                assert!(!parsed.tags.is_empty(), "{} has no tags", builtin.name);
                assert!(
                    parsed
                        .steps
                        .iter()
                        .any(|s| matches!(s.value, Step::Expect(_))),
                    "{} asserts nothing",
                    builtin.name
                );
            }
            Err(error) => failures.push(format!("{error:?}")),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_file_in_scenarios_is_embedded() {
    let on_disk: BTreeSet<String> = std::fs::read_dir(scenarios_dir())
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "yaml"))
        .map(|path| path.file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    let embedded: BTreeSet<String> = scenario::builtin()
        .iter()
        .map(|b| b.name.to_owned())
        .collect();
    assert_eq!(on_disk, embedded);
}

#[test]
fn embedded_text_is_the_file_on_disk() {
    for builtin in scenario::builtin() {
        let path = scenarios_dir().join(format!("{}.yaml", builtin.name));
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            builtin.text,
            "{}",
            builtin.name
        );
    }
}

#[test]
fn every_builtin_points_editors_at_the_schema() {
    for builtin in scenario::builtin() {
        assert!(
            builtin
                .text
                .starts_with("# yaml-language-server: $schema=../harness/scenario.schema.json\n"),
            "{} lacks the schema modeline",
            builtin.name
        );
    }
}

#[test]
fn find_resolves_builtin_names_and_paths() {
    let by_name = scenario::find("clone-guest").unwrap();
    assert_eq!(by_name.origin, "scenarios/clone-guest.yaml");
    let path = scenarios_dir().join("dongle-hop.yaml");
    let by_path = scenario::find(path.to_str().unwrap()).unwrap();
    assert_eq!(by_path.name.value, "dongle-hop");
    let missing = scenario::find("no-such-scenario").unwrap_err();
    assert!(matches!(missing, scenario::ScenarioError::NotFound { .. }));
    assert!(format!("{missing:?}").contains("clone-guest"));
    let unreadable = scenario::find("missing/file.yaml").unwrap_err();
    assert!(matches!(unreadable, scenario::ScenarioError::Read { .. }));
}

#[test]
fn clone_guest_reads_as_designed() {
    let parsed = scenario::find("clone-guest").unwrap();
    let product = &parsed.policy.products[0];
    assert_eq!(product.code.value, 1001);
    assert_eq!(product.binding.tolerance, scenario::Tolerance::Medium);
    assert_eq!(parsed.steps.len(), 9);
    let Step::Clone(clone) = &parsed.steps[4].value else {
        panic!("step 5 is a clone");
    };
    assert_eq!(clone.to.value, "vm1-copy");
    assert_eq!(clone.host.as_ref().unwrap().value, "host-b");
    assert_eq!(clone.identity, scenario::CloneIdentity::New);
    assert_eq!((clone.to.at.line, clone.to.at.column), (20, 29));
    let Step::Expect(scenario::Assertion::Denied { app, reason }) = &parsed.steps[7].value else {
        panic!("step 8 expects a denial");
    };
    assert_eq!(app.value, "app2");
    assert_eq!(reason.code(), "licence-corrupt");
}
