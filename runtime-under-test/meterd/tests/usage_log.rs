//! The usage log of a local runtime: grants, releases and denials recorded with who asked, the
//! chain kept across restarts, a removed record found, reports an administrator's alone.

mod common;

use common::*;
use serde_json::Value;

/// An unprivileged user, named `mallory` in the machine's accounts.
const MALLORY: u32 = 4344;

fn rows<'a>(report: &'a Value, table: &str) -> &'a Vec<Value> {
    report[table].as_array().unwrap()
}

#[test]
fn the_log_records_who_used_what_survives_restarts_and_shows_tampering() {
    let vendor = Vendor::new();
    let licence = vendor.issue(
        "local",
        &["{ code: 1001, name: cad, quantity: 5, counting: user-limit }"],
    );
    let machine = Machine::new("ws1", "workstation", "127.0.6.10");
    std::fs::write(
        machine.platform().join("passwd"),
        format!("root:x:0:0::/root:/bin/sh\nmallory:x:{MALLORY}:{MALLORY}::/tmp:/bin/sh\n"),
    )
    .unwrap();
    let mut daemon = machine.start(&[]);
    machine.install(&vendor, &licence);
    machine.open_to_every_user();
    let rules = machine.dir.path().join("rules.yaml");
    std::fs::write(
        &rules,
        "rules:\n  - { who: { user: mallory }, action: deny }\n",
    )
    .unwrap();
    let (code, out) = machine.meter(&["rules", "apply", rules.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");

    for _ in 0..2 {
        assert_eq!(machine.meter(&["access", "--product", "1001"]).0, 0);
    }
    let (code, out) = meter_as(MALLORY, &machine, &["access", "--product", "1001"]);
    assert_eq!(code, 1, "{out}");

    let (code, verified) = machine.meter(&["usage", "verify"]);
    assert_eq!(code, 0, "{verified}");
    assert_eq!(verified["intact"], true);
    assert_eq!(verified["records"], 5, "two grants, two releases, a denial");

    let (code, report) = machine.meter(&["usage", "report"]);
    assert_eq!(code, 0, "{report}");
    let root = rows(&report, "usage")
        .iter()
        .find(|u| u["user"] == "root")
        .unwrap_or_else(|| panic!("{report}"));
    assert_eq!(root["grants"], 2);
    let denials = rows(&report, "denials");
    assert_eq!(denials.len(), 1, "{report}");
    assert_eq!(denials[0]["user"], "mallory");
    assert_eq!(denials[0]["reason"], "rule-denied");
    assert_eq!(denials[0]["rule"], 0);
    assert_eq!(rows(&report, "peaks")[0]["peak"], 1);

    // Only an administrator reads it.
    let (code, out) = meter_as(MALLORY, &machine, &["usage", "report"]);
    assert_ne!(code, 0, "{out}");

    // Read back as seats: each user-limit grant held one, begun and released.
    let (code, seats) = machine.meter(&["usage", "seats"]);
    assert_eq!(code, 0, "{seats}");
    let kinds: Vec<String> = seats["history"]
        .as_array()
        .unwrap_or_else(|| panic!("{seats}"))
        .iter()
        .filter_map(|e| e.as_object()?.keys().next().cloned())
        .collect();
    assert_eq!(
        kinds,
        ["Granted", "Released", "Granted", "Released"],
        "{seats}"
    );
    assert_eq!(seats["history"][0]["Granted"]["holder"], "ws1", "{seats}");
    assert_eq!(seats["history"][2]["Granted"]["lease"], 2, "{seats}");
    let (code, out) = meter_as(MALLORY, &machine, &["usage", "seats"]);
    assert_ne!(code, 0, "{out}");

    // The chain goes on across a restart.
    drop(daemon);
    daemon = machine.start(&[]);
    assert_eq!(machine.meter(&["access", "--product", "1001"]).0, 0);
    let (code, verified) = machine.meter(&["usage", "verify"]);
    assert_eq!(
        (code, &verified["records"]),
        (0, &Value::from(7)),
        "{verified}"
    );

    // Root removes a record: found, and `verify` exits 1.
    let (code, out) = machine.meter(&["tamper-usage-log", "3"]);
    assert_eq!(code, 0, "{out}");
    let (code, verified) = machine.meter(&["usage", "verify"]);
    assert_eq!(code, 1, "{verified}");
    assert_eq!(verified["intact"], false);
    let problems: Vec<&str> = verified["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["problem"].as_str().unwrap())
        .collect();
    assert_eq!(problems, ["missing", "chain-broken"], "{verified}");
    drop(daemon);

    // A runtime told to keep no log says so.
    let _daemon = machine.start(&["--no-usage-log"]);
    let (code, out) = machine.meter(&["usage", "verify"]);
    assert_eq!(code, 2, "{out}");
    assert!(
        out["error"].as_str().unwrap().contains("no usage log"),
        "{out}"
    );
}
