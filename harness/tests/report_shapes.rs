//! The shapes of summary.md, junit.xml, report.json and report.html, pinned with insta.

use vigil::report::{
    Event, StepAnswer, Verdict, junit_xml, report_html, summary_markdown, write_reports,
};

fn events() -> Vec<Event> {
    vec![
        Event::RunStarted {
            run_id: "20261127-120000-abcd".into(),
            backend: "sim".into(),
            environment: serde_json::json!({"runtime": "/tmp/bin"}),
        },
        Event::ScenarioStarted {
            scenario: "clone-guest".into(),
            source: "scenarios/clone-guest.yaml".into(),
            steps: 3,
        },
        Event::Step {
            scenario: "clone-guest".into(),
            index: 1,
            line: 14,
            summary: "boot: vm1".into(),
            machines: vec!["vm1".into()],
            answers: vec![],
            holding: Default::default(),
            power: [("vm1".to_string(), "running".to_string())].into(),
            elapsed_ms: 120.0,
            verdict: Verdict::Pass,
            message: None,
        },
        Event::Step {
            scenario: "clone-guest".into(),
            index: 2,
            line: 15,
            summary: "advance: 1h".into(),
            machines: vec![],
            answers: vec![],
            holding: [(1001, 1)].into(),
            power: [("vm1".to_string(), "running".to_string())].into(),
            elapsed_ms: 20.0,
            verdict: Verdict::Pass,
            message: None,
        },
        Event::Step {
            scenario: "clone-guest".into(),
            index: 3,
            line: 16,
            summary: "start-app: {as: app2, machine: vm1, product: 1001}".into(),
            machines: vec!["vm1".into()],
            answers: vec![StepAnswer {
                product: 1001,
                name: "app2".into(),
                granted: false,
                reason: Some("licence-corrupt".into()),
            }],
            holding: [(1001, 0)].into(),
            power: [("vm1".to_string(), "paused".to_string())].into(),
            elapsed_ms: 30.0,
            verdict: Verdict::Pass,
            message: None,
        },
        Event::Assertion {
            scenario: "clone-guest".into(),
            index: 2,
            line: 15,
            summary: "app1 is granted".into(),
            expected: "granted".into(),
            actual: "granted".into(),
            verdict: Verdict::Pass,
            elapsed_ms: 0.5,
        },
        Event::Assertion {
            scenario: "clone-guest".into(),
            index: 3,
            line: 16,
            summary: "app2 is denied (licence-corrupt)".into(),
            expected: "denied (licence-corrupt)".into(),
            actual: "granted".into(),
            verdict: Verdict::Fail,
            elapsed_ms: 0.5,
        },
        Event::ScenarioFinished {
            scenario: "clone-guest".into(),
            verdict: Verdict::Fail,
            elapsed_ms: 1500.0,
            assertions: 2,
            failed: 1,
            error: None,
        },
        Event::ScenarioStarted {
            scenario: "user-limit".into(),
            source: "scenarios/user-limit.yaml".into(),
            steps: 1,
        },
        Event::Step {
            scenario: "user-limit".into(),
            index: 1,
            line: 12,
            summary: "boot: ws1".into(),
            machines: vec!["ws1".into()],
            answers: vec![],
            holding: Default::default(),
            power: Default::default(),
            elapsed_ms: 10000.0,
            verdict: Verdict::Error,
            message: Some("Timed out after 10s waiting for meterd".into()),
        },
        Event::ScenarioFinished {
            scenario: "user-limit".into(),
            verdict: Verdict::Error,
            elapsed_ms: 10000.0,
            assertions: 0,
            failed: 0,
            error: Some("step 1 could not run".into()),
        },
    ]
}

#[test]
fn summary_markdown_shape() {
    insta::assert_snapshot!(summary_markdown("20261127-120000-abcd", &events()));
}

#[test]
fn junit_xml_shape() {
    insta::assert_snapshot!(junit_xml("20261127-120000-abcd", &events()));
}

#[test]
fn report_files_and_latest_link() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("20261127-120000-abcd");
    write_reports(&run, "20261127-120000-abcd", &events()).unwrap();
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["verdict"], "error");
    assert_eq!(report["scenarios"][0]["verdict"], "fail");
    assert_eq!(report["events"].as_array().unwrap().len(), events().len());
    let latest = std::fs::read_link(dir.path().join("latest")).unwrap();
    assert_eq!(latest.to_str(), Some("20261127-120000-abcd"));
}

#[test]
fn report_html_shape() {
    let html = report_html("20261127-120000-abcd", &events(), "logs");
    // Self-contained: nothing to run, nothing to fetch.
    assert!(!html.contains("<script"), "{html}");
    assert!(!html.contains("http"), "{html}");
    insta::assert_snapshot!(html);
}

#[test]
fn junit_parses_in_standard_consumers_with_classnames_and_properties() {
    let xml = junit_xml("20261127-120000-abcd", &events());
    let report = quick_junit::Report::deserialize_from_str(&xml).unwrap();
    assert_eq!(report.test_suites.len(), 2);
    for suite in &report.test_suites {
        let names: Vec<String> = suite
            .properties
            .iter()
            .map(|p| format!("{}={}", p.name.as_str(), p.value.as_str()))
            .collect();
        assert_eq!(names, ["backend=sim", "accelerator=none"]);
        for case in &suite.test_cases {
            assert_eq!(case.classname.as_deref(), Some(suite.name.as_str()));
        }
    }
    // Python's standard library, as dashboards' import scripts read it.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("junit.xml");
    std::fs::write(&path, &xml).unwrap();
    let script = "import sys, xml.etree.ElementTree as ET\n\
                  root = ET.parse(sys.argv[1]).getroot()\n\
                  for case in root.iter('testcase'):\n    print(case.get('classname'))";
    match std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(&path)
        .output()
    {
        Ok(out) => {
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let classes = String::from_utf8(out.stdout).unwrap();
            assert_eq!(
                classes.lines().collect::<Vec<_>>(),
                ["clone-guest", "clone-guest", "user-limit"]
            );
        }
        Err(e) => eprintln!("SKIPPED the Python reader: {e}"),
    }
}
