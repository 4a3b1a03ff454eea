//! Access rules on a local runtime: only an administrator sets them, they survive a restart, an
//! empty document lifts them, and a local access is checked under its uid's account name.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::*;
use serde_json::Value;

/// An unprivileged user, named `mallory` in the machine's accounts.
const MALLORY: u32 = 4343;

fn write(dir: &std::path::Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    path.display().to_string()
}

#[test]
fn rules_are_an_administrators_kept_across_restarts_and_checked_by_account_name() {
    let vendor = Vendor::new();
    let licence = vendor.issue(
        "local",
        &["{ code: 1001, name: cad, quantity: 5, counting: user-limit }"],
    );
    let machine = Machine::new("ws1", "workstation", "127.0.6.9");
    std::fs::write(
        machine.platform().join("passwd"),
        format!("mallory:x:{MALLORY}:{MALLORY}::/tmp:/bin/sh\n"),
    )
    .unwrap();
    let mut daemon = machine.start(&[]);
    machine.install(&vendor, &licence);
    machine.open_to_every_user();

    let files = tempfile::tempdir().unwrap();
    std::fs::set_permissions(files.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let rules = write(
        files.path(),
        "rules.yaml",
        "rules:\n  - { who: { user: mallory }, action: deny }\n",
    );

    // Not an administrator's: refused, nothing changes.
    let (code, out) = meter_as(MALLORY, &machine, &["rules", "apply", &rules]);
    assert_ne!(code, 0, "{out}");
    assert_eq!(machine.meter(&["rules", "show"]).1["rules"], Value::Null);

    let (code, out) = machine.meter(&["rules", "apply", &rules]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(out["rules"], 1);
    let (code, out) = meter_as(MALLORY, &machine, &["access", "--product", "1001"]);
    assert_eq!(
        (code, out["reason"].as_str()),
        (1, Some("rule-denied")),
        "{out}"
    );
    let (code, _) = machine.meter(&["access", "--product", "1001"]);
    assert_eq!(code, 0, "root is not mallory");

    // Kept in the state.
    drop(daemon);
    daemon = machine.start(&[]);
    let (_, shown) = machine.meter(&["rules", "show"]);
    assert_eq!(shown["rules"]["rules"][0]["action"], "deny", "{shown}");
    let (code, _) = meter_as(MALLORY, &machine, &["access", "--product", "1001"]);
    assert_eq!(code, 1);

    // A malformed document is refused and the rules in force stay.
    let bad = write(files.path(), "bad.yaml", "rules: [{ who: anyone }]\n");
    let (code, out) = machine.meter(&["rules", "apply", &bad]);
    assert_ne!(code, 0, "{out}");
    assert!(
        out["error"].as_str().unwrap().contains("exactly one"),
        "{out}"
    );
    assert_eq!(
        machine.meter(&["rules", "show"]).1["rules"]["rules"][0]["action"],
        "deny"
    );

    // An empty document lifts every rule.
    let empty = write(files.path(), "empty.yaml", "{}\n");
    let (code, out) = machine.meter(&["rules", "apply", &empty]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(machine.meter(&["rules", "show"]).1["rules"], Value::Null);
    let (code, out) = meter_as(MALLORY, &machine, &["access", "--product", "1001"]);
    assert_eq!(code, 0, "{out}");
    drop(daemon);
}
