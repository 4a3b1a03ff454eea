//! The committed JSON Schema matches the model, and every step and assertion kind round-trips
//! through YAML and validates against that schema.

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::Value;
use vigil::scenario::{self, Assertion, ClockSkew, Duration, Scenario, Step};

const EVERY_KIND: &str = r#"
name: every-kind
description: Uses every step and every assertion once.
tags: [schema]
guards: [trait-binding, dongle-rebind-lockout]
allowed-by-policy:
  - { product: 1001, policy: "on-rollback: reconcile", gains: Nothing; the schema test lists it. }
policy:
  products:
    - { code: 1001, name: cad-pro, container: soft, quantity: 2, counting: station-share,
        binding: { scheme: smartbind, tolerance: strict }, virtual-machines: allow,
        terminal-server: deny, expires: 30d, units: 10, on-rollback: reconcile,
        witness: required }
    - { code: 2001, name: cam, container: dongle, quantity: 0, counting: no-count }
hosts:
  - name: host-a
    cpu: { vendor: GenuineIntel, model: "Xeon Gold 6248", family: 6, stepping: 7, microcode: "0x5003604" }
    identity: { board-serial: B-1, product-uuid: 4c4c4544-0001, product-serial: P-1,
                disk-serials: [D-1, D-2], macs: ["52:54:00:00:00:01"] }
  - { name: host-b, role: terminal-server, cpu: { vendor: AuthenticAMD, model: "EPYC 7543" } }
  - { name: host-c, cpu: { vendor: AuthenticAMD, model: "EPYC 7543" } }
guests:
  - { name: vm1, host: host-a, identity: { macs: ["52:54:00:00:01:01"] } }
  - { name: vm2, host: host-a, role: terminal-server }
dongles:
  - { name: d1, serial: "3-1", products: [2001], policy: { max-rebinds: 3, window: 60s, lockout: 5m } }
steps:
  - boot: vm1
  - boot: vm2
  - pause: vm1
  - resume: vm1
  - snapshot: { machine: vm1, name: s0 }
  - activate: { machine: vm1, product: 1001, as: act1 }
  - copy-licence: { product: 1001, from: vm1, to: vm2 }
  - apply-again: { machine: vm1, product: 1001 }
  - forge-licence: { machine: vm1, product: 1001, quantity: 5 }
  - state-save: { machine: vm1, name: kept }
  - state-restore: { machine: vm1, name: kept }
  - session-open: { machine: vm2, as: sess1, kind: rdp, user: alice, client-name: pc-1, client-ip: 10.0.0.1 }
  - start-app: { machine: vm2, session: sess1, product: 1001, as: app1, leave-session: true }
  - access: { machine: vm1, product: 1001, as: probe1, times: 2 }
  - usb-attach: { dongle: d1, machine: vm1 }
  - usb-detach: d1
  - usb-attach: { dongle: d1, machines: [vm1, vm2], mode: shared }
  - usb-detach: d1
  - usbip-attach: { dongle: d1, machine: vm2 }
  - usbip-disconnect: d1
  - usbip-attach: { dongle: d1, machine: vm2 }
  - usb-hang: d1
  - usbip-detach: d1
  - server-start: { machine: host-a, port: 22351, keepalive: 10s }
  - partition: { machines: [host-a, vm1] }
  - heal: { machines: [host-a, vm1] }
  - partition: { machines: [host-a, vm1], mode: reset }
  - heal: {}
  - wait: 10ms
  - flood: { from: vm1, to: host-a, connections: 10 }
  - impersonate: { machine: vm2, as: vm1, runtime-id: false }
  - claim-witness: { machine: vm2, victim: vm1, product: 1001 }
  - rules: { machine: vm2, rules: { rules: [{ who: { user: mallory }, action: deny }] } }
  - advance: 1h30m
  - set-clock: { machine: vm1, skew: -2h }
  - replace-part: { machine: host-b, part: nic }
  - expect: { granted: act1 }
  - expect: { denied: probe1, reason: licence-locked }
  - expect: { in-use: { product: 1001, machine: vm2, stations: 1, accesses: 1 } }
  - expect: { in-use: { product: 1001, stations: 1 } }
  - expect: { licence: { machine: vm1, product: 1001, state: valid } }
  - expect: { units: { machine: vm1, product: 1001, left: 9 } }
  - expect: { dongle: { name: d1, state: locked-out, until: 5m } }
  - expect: { dongle: { name: d1, bound-to: vm2 } }
  - kill: app1
  - expect: { released-within: { app: app1, ms: 100 } }
  - expect: { app: { app: app1, state: exited } }
  - start-app: { machine: vm2, product: 1001, as: app2 }
  - release-elsewhere: { app: app2, session: sess1 }
  - expect: { app: { app: app2, state: revoked, reason: binding-broken } }
  - expect: { holders: { product: 1001, at-most: 1 } }
  - expect: { responsive: vm1 }
  - expect: { usage: { machine: vm2, product: 1001, user: ann, grants: 1, denials: 0, reason: rule-denied, held: 1h, tolerance: 2m } }
  - tamper-usage-log: { machine: vm2, record: 1 }
  - expect: { usage-log: { machine: vm2, intact: false } }
  - release: app2
  - session-close: sess1
  - drop-session-table: vm1
  - activate-triad: { machines: [host-a, host-b, host-c], product: 1001 }
  - server-start: { machine: host-b }
  - server-start: { machine: host-c }
  - triad: [host-a, host-b, host-c]
  - inflate-seats: { machine: host-b, quantity: 3 }
  - release-member-seats: host-c
  - expect: { seat-history: { product: 1001, at-most: 2 } }
  - server-crash: host-a
  - server-pause: host-a
  - server-resume: host-a
  - server-stop: host-a
  - migrate: { machine: vm1, host: host-b }
  - revert: { machine: vm1, snapshot: s0 }
  - clone: { from: vm1, to: vm3, host: host-b, identity: perfect }
  - boot: vm3
  - shutdown: vm1
  - move: { machine: vm1, host: host-a }
"#;

fn every_kind() -> Scenario {
    scenario::parse_str(EVERY_KIND, "every-kind.yaml").unwrap_or_else(|e| panic!("{e:?}"))
}

fn committed_schema_path() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scenario.schema.json")
}

fn schema() -> Value {
    serde_json::from_str(&scenario::schema_json()).unwrap()
}

#[test]
fn committed_schema_is_up_to_date() {
    let generated = scenario::schema_json();
    if std::env::var_os("VIGIL_UPDATE_SCHEMA").is_some() {
        std::fs::write(committed_schema_path(), &generated).unwrap();
    }
    let committed = std::fs::read_to_string(committed_schema_path()).unwrap_or_default();
    assert!(
        committed == generated,
        "harness/scenario.schema.json is stale: run `VIGIL_UPDATE_SCHEMA=1 cargo test -p vigil --test scenario_schema` (or `vigil schema > harness/scenario.schema.json`)"
    );
}

/// The single key of each `oneOf` alternative of a definition.
fn one_of_keys(schema: &Value, definition: &str) -> BTreeSet<String> {
    schema["definitions"][definition]["oneOf"]
        .as_array()
        .unwrap_or_else(|| panic!("{definition} has no oneOf"))
        .iter()
        .map(|alternative| {
            let required = alternative["required"].as_array().unwrap();
            required[0].as_str().unwrap().to_owned()
        })
        .collect()
}

#[test]
fn schema_names_every_step_and_assertion() {
    let schema = schema();
    let steps: BTreeSet<String> = Step::KEYWORDS.iter().map(|k| k.to_string()).collect();
    assert_eq!(one_of_keys(&schema, "Step"), steps);
    let assertions: BTreeSet<String> = Assertion::KEYWORDS.iter().map(|k| k.to_string()).collect();
    assert_eq!(one_of_keys(&schema, "Assertion"), assertions);
}

#[test]
fn every_kind_scenario_uses_every_step_and_assertion() {
    let parsed = every_kind();
    let used_steps: BTreeSet<&str> = parsed.steps.iter().map(|s| s.value.keyword()).collect();
    assert_eq!(used_steps, Step::KEYWORDS.into_iter().collect());
    let used_assertions: BTreeSet<&str> = parsed
        .steps
        .iter()
        .filter_map(|s| match &s.value {
            Step::Expect(assertion) => Some(assertion.keyword()),
            _ => None,
        })
        .collect();
    assert_eq!(used_assertions, Assertion::KEYWORDS.into_iter().collect());
}

#[test]
fn every_kind_round_trips_through_yaml() {
    let parsed = every_kind();
    let yaml = serde_saphyr::to_string(&parsed).unwrap();
    let again =
        scenario::parse_str(&yaml, "round-trip.yaml").unwrap_or_else(|e| panic!("{e:?}\n{yaml}"));
    assert_eq!(again.steps, parsed.steps);
    assert_eq!(again.policy, parsed.policy);
    assert_eq!(again.hosts, parsed.hosts);
    assert_eq!(again.guests, parsed.guests);
    assert_eq!(again.dongles, parsed.dongles);
    assert_eq!(again.guards, parsed.guards);
}

#[test]
fn every_kind_validates_against_the_schema() {
    let schema = schema();
    let instance = serde_json::to_value(every_kind()).unwrap();
    let mut errors = Vec::new();
    check(&schema, &schema, &instance, "$", &mut errors);
    assert!(errors.is_empty(), "{}", errors.join("\n"));
}

#[test]
fn the_schema_checker_rejects_what_the_parser_rejects() {
    let schema = schema();
    let mut instance = serde_json::to_value(every_kind()).unwrap();
    instance["steps"][0] = serde_json::json!({ "boooot": "vm1" });
    instance["policy"]["products"][0]["counting"] = serde_json::json!("per-seat");
    instance["steps"][1] = serde_json::json!({ "advance": "5x" });
    instance["steps"][2] = serde_json::json!({ "expect": { "granted": "a", "licence": {} } });
    let mut errors = Vec::new();
    check(&schema, &schema, &instance, "$", &mut errors);
    let paths: BTreeSet<&str> = errors
        .iter()
        .map(|e| e.split(':').next().unwrap())
        .collect();
    for expected in [
        "$.steps[0]",
        "$.policy.products[0].counting",
        "$.steps[1]",
        "$.steps[2]",
    ] {
        assert!(
            paths.contains(expected),
            "{expected} not flagged: {errors:#?}"
        );
    }
}

/// A small JSON Schema (draft-07 subset) checker: the keywords schemars emits for this model.
fn check(root: &Value, schema: &Value, value: &Value, path: &str, errors: &mut Vec<String>) {
    let Some(object) = schema.as_object() else {
        if schema == &Value::Bool(false) {
            errors.push(format!("{path}: not allowed"));
        }
        return;
    };
    for keyword in object.keys() {
        const KNOWN: [&str; 21] = [
            "$schema",
            "$ref",
            "title",
            "description",
            "examples",
            "default",
            "type",
            "format",
            "properties",
            "required",
            "additionalProperties",
            "items",
            "enum",
            "const",
            "oneOf",
            "anyOf",
            "allOf",
            "minimum",
            "maximum",
            "pattern",
            "definitions",
        ];
        assert!(
            KNOWN.contains(&keyword.as_str()),
            "checker does not know `{keyword}`"
        );
    }
    if let Some(reference) = object.get("$ref").and_then(Value::as_str) {
        let name = reference.strip_prefix("#/definitions/").unwrap();
        check(root, &root["definitions"][name], value, path, errors);
    }
    if let Some(types) = object.get("type") {
        let allowed: Vec<&str> = match types {
            Value::String(t) => vec![t.as_str()],
            Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
            _ => panic!("odd type"),
        };
        let matches = allowed.iter().any(|t| match *t {
            "object" => value.is_object(),
            "array" => value.is_array(),
            "string" => value.is_string(),
            "integer" => value.is_i64() || value.is_u64(),
            "number" => value.is_number(),
            "boolean" => value.is_boolean(),
            "null" => value.is_null(),
            other => panic!("unknown type {other}"),
        });
        if !matches {
            errors.push(format!("{path}: expected {allowed:?}, found {value}"));
            return;
        }
    }
    if let Some(options) = object.get("enum").and_then(Value::as_array)
        && !options.contains(value)
    {
        errors.push(format!("{path}: {value} is not one of {options:?}"));
    }
    if let Some(constant) = object.get("const")
        && constant != value
    {
        errors.push(format!("{path}: expected {constant}"));
    }
    if let (Some(minimum), Some(number)) = (
        object.get("minimum").and_then(Value::as_f64),
        value.as_f64(),
    ) && number < minimum
    {
        errors.push(format!("{path}: {number} is below {minimum}"));
    }
    if let (Some(maximum), Some(number)) = (
        object.get("maximum").and_then(Value::as_f64),
        value.as_f64(),
    ) && number > maximum
    {
        errors.push(format!("{path}: {number} is above {maximum}"));
    }
    if let (Some(pattern), Some(text)) = (
        object.get("pattern").and_then(Value::as_str),
        value.as_str(),
    ) {
        let ok = match pattern {
            p if p == scenario::DURATION_PATTERN => text.parse::<Duration>().is_ok(),
            p if p == scenario::CLOCK_SKEW_PATTERN => text.parse::<ClockSkew>().is_ok(),
            p if p == vigil::name::USER_PATTERN => vigil::name::is_user(text),
            other => panic!("checker does not know pattern {other}"),
        };
        if !ok {
            errors.push(format!("{path}: `{text}` does not match {pattern}"));
        }
    }
    if let Some(map) = value.as_object() {
        let properties = object.get("properties").and_then(Value::as_object);
        for required in object
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if !map.contains_key(required.as_str().unwrap()) {
                errors.push(format!("{path}: missing `{required}`"));
            }
        }
        for (key, item) in map {
            let child = format!("{path}.{key}");
            match properties.and_then(|p| p.get(key)) {
                Some(sub) => check(root, sub, item, &child, errors),
                None => match object.get("additionalProperties") {
                    Some(Value::Bool(false)) => errors.push(format!("{child}: unknown key")),
                    Some(sub @ Value::Object(_)) => check(root, sub, item, &child, errors),
                    _ => {}
                },
            }
        }
    }
    if let (Some(items), Some(list)) = (object.get("items"), value.as_array()) {
        for (index, item) in list.iter().enumerate() {
            check(root, items, item, &format!("{path}[{index}]"), errors);
        }
    }
    if let Some(alternatives) = object.get("oneOf").and_then(Value::as_array) {
        let passing = alternatives
            .iter()
            .filter(|alt| {
                let mut sub = Vec::new();
                check(root, alt, value, path, &mut sub);
                sub.is_empty()
            })
            .count();
        if passing != 1 {
            errors.push(format!(
                "{path}: matches {passing} of the oneOf alternatives, not exactly one"
            ));
        }
    }
    for part in object
        .get("allOf")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        check(root, part, value, path, errors);
    }
    if let Some(alternatives) = object.get("anyOf").and_then(Value::as_array) {
        let any = alternatives.iter().any(|alt| {
            let mut sub = Vec::new();
            check(root, alt, value, path, &mut sub);
            sub.is_empty()
        });
        if !any {
            errors.push(format!("{path}: matches none of the anyOf alternatives"));
        }
    }
}
