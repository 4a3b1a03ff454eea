//! junit.xml: one test case per assertion (a failed step is an error case), one suite per
//! scenario; every case's `classname` is its scenario, and each suite carries the run's backend
//! and accelerator as properties.

use quick_junit::{NonSuccessKind, Property, Report, TestCase, TestCaseStatus, TestSuite};

use super::{Event, Verdict};

/// Renders the JUnit XML of a run.
pub fn junit_xml(run_id: &str, events: &[Event]) -> String {
    let mut report = Report::new(format!("vigil-{run_id}"));
    let mut suite: Option<TestSuite> = None;
    let mut scenario_name = String::new();
    let mut properties: Vec<Property> = Vec::new();
    for event in events {
        match event {
            Event::RunStarted {
                backend,
                environment,
                ..
            } => {
                let accelerator = environment["accelerator"].as_str().unwrap_or("none");
                properties = vec![
                    Property::new("backend", backend.as_str()),
                    Property::new("accelerator", accelerator),
                ];
            }
            Event::ScenarioStarted { scenario, .. } => {
                if let Some(done) = suite.take() {
                    report.add_test_suite(done);
                }
                let mut new = TestSuite::new(scenario.clone());
                new.add_properties(properties.iter().cloned());
                suite = Some(new);
                scenario_name.clone_from(scenario);
            }
            Event::Assertion {
                index,
                line,
                summary,
                expected,
                actual,
                verdict,
                elapsed_ms,
                ..
            } => {
                let status = match verdict {
                    Verdict::Pass => TestCaseStatus::success(),
                    _ => {
                        let mut status = TestCaseStatus::non_success(NonSuccessKind::Failure);
                        status.set_message(format!("expected {expected}, got {actual}"));
                        status.set_type("assertion");
                        status
                    }
                };
                let mut case = TestCase::new(format!("{index:03} {summary} (line {line})"), status);
                case.set_classname(scenario_name.as_str());
                case.set_time(std::time::Duration::from_secs_f64(elapsed_ms / 1000.0));
                if let Some(s) = suite.as_mut() {
                    s.add_test_case(case);
                }
            }
            Event::Step {
                index,
                line,
                summary,
                verdict,
                message,
                ..
            } if *verdict != Verdict::Pass => {
                let kind = if *verdict == Verdict::Error {
                    NonSuccessKind::Error
                } else {
                    NonSuccessKind::Failure
                };
                let mut status = TestCaseStatus::non_success(kind);
                status.set_message(message.clone().unwrap_or_default());
                status.set_type("step");
                let mut case = TestCase::new(format!("{index:03} {summary} (line {line})"), status);
                case.set_classname(scenario_name.as_str());
                if let Some(s) = suite.as_mut() {
                    s.add_test_case(case);
                }
            }
            Event::ScenarioFinished { elapsed_ms, .. } => {
                if let Some(s) = suite.as_mut() {
                    s.set_time(std::time::Duration::from_secs_f64(elapsed_ms / 1000.0));
                }
            }
            _ => {}
        }
    }
    if let Some(done) = suite.take() {
        report.add_test_suite(done);
    }
    report
        .to_string()
        .unwrap_or_else(|e| format!("<!-- cannot render junit: {e} -->"))
}
