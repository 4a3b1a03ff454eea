//! report.html in a real browser: headless Chromium (Debian's `chromium`, installed by `make deps`)
//! loads a real run's page without console errors, finds one timeline per scenario, and renders
//! it to a PNG. Skips, saying why, without Chromium; with `VIGIL_REQUIRE_BROWSER=1` (as CI sets
//! it) that is a failure.

use std::path::{Path, PathBuf};
use std::process::Command;

fn vigil() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_vigil"))
}

fn chromium() -> Option<PathBuf> {
    let found = ["chromium", "chromium-browser"].iter().find_map(|name| {
        std::env::var_os("PATH").and_then(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join(name))
                .find(|p| p.is_file())
        })
    });
    if found.is_none() && std::env::var_os("VIGIL_REQUIRE_BROWSER").is_some_and(|v| v == "1") {
        panic!(
            "the browser check is required here (VIGIL_REQUIRE_BROWSER=1) but no chromium is on PATH: run `make deps`"
        );
    }
    found
}

/// Runs Chromium headless on `page` with `args`; its stdout and stderr.
fn headless(chromium: &Path, profile: &Path, page: &Path, args: &[&str]) -> (String, String) {
    let out = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--enable-logging=stderr",
            "--v=0",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(format!("file://{}", page.display()))
        .output()
        .expect("chromium starts");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn report_html_loads_cleanly_with_a_timeline_per_scenario() {
    let Some(chromium) = chromium() else {
        eprintln!("SKIPPED: no chromium on PATH (`make deps` installs Debian's)");
        return;
    };
    let reports = tempfile::tempdir().unwrap();
    let scenarios = [
        "clone-guest",
        "stationshare-terminal-server",
        "crash-release",
    ];
    let status = Command::new(vigil())
        .arg("scenario")
        .args(scenarios)
        .arg("--report-dir")
        .arg(reports.path())
        .status()
        .unwrap();
    assert!(status.success());
    let run = std::fs::read_dir(reports.path())
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.is_dir())
        .expect("a run folder");
    let page = run.join("report.html");
    let profile = tempfile::tempdir().unwrap();

    let (dom, log) = headless(&chromium, profile.path(), &page, &["--dump-dom"]);
    for line in log.lines() {
        assert!(
            !line.contains("CONSOLE") && !line.contains("Uncaught"),
            "console message: {line}"
        );
    }
    assert_eq!(
        dom.matches("<svg class=\"timeline\"").count(),
        scenarios.len(),
        "one timeline per scenario in the DOM Chromium built"
    );
    for scenario in scenarios {
        assert!(
            dom.contains(&format!("id=\"scenario-{scenario}\"")),
            "{scenario}"
        );
    }
    assert!(dom.contains("class=\"granted\"") && dom.contains("class=\"denied\""));

    let png = run.join("report.png");
    let (_, log) = headless(
        &chromium,
        profile.path(),
        &page,
        &[
            &format!("--screenshot={}", png.display()),
            "--window-size=1280,1600",
            "--hide-scrollbars",
        ],
    );
    let bytes = std::fs::read(&png).unwrap_or_else(|e| panic!("no screenshot ({e}): {log}"));
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.len() > 10_000);
    if let Some(keep) = std::env::var_os("VIGIL_REPORT_PNG") {
        // `VIGIL_REPORT_PNG=docs/report-example.png` refreshes the example in the docs.
        std::fs::copy(&png, keep).unwrap();
    }
}
