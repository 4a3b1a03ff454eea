//! junit.xml: one test case per assertion, one suite per scenario.

use quick_junit::{NonSuccessKind, Report, TestCase, TestCaseStatus, TestSuite};

use super::{Event, Verdict};

/// Renders the JUnit XML of a run.
pub fn junit_xml(run_id: &str, events: &[Event]) -> String {
    let mut report = Report::new(format!("vigil-{run_id}"));
    let mut suite: Option<TestSuite> = None;
    for event in events {
        match event {
            Event::ScenarioStarted { scenario, .. } => {
                if let Some(done) = suite.take() {
                    report.add_test_suite(done);
                }
                suite = Some(TestSuite::new(scenario.clone()));
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
                let case = TestCase::new(format!("{index:03} {summary} (line {line})"), status);
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
