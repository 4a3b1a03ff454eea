//! The CI workflows' shape, beyond what actionlint checks (`make lint-workflows`): each
//! parses, every job runs on a runner with steps that each use an action or run a command,
//! every `make` target they call exists, and the nightly matrix runs every backend with shards
//! 1..N of the N its suite command names, so together they run every scenario exactly once.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every workflow file, parsed.
fn workflows() -> Vec<(String, Value)> {
    let dir = root().join(".github/workflows");
    let mut found: Vec<(String, Value)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "yml" || e == "yaml"))
        .map(|path| {
            let text = std::fs::read_to_string(&path).unwrap();
            let value: Value =
                serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            (
                path.file_name().unwrap().to_string_lossy().into_owned(),
                value,
            )
        })
        .collect();
    found.sort_by(|a, b| a.0.cmp(&b.0));
    found
}

/// The Makefile's targets.
fn make_targets() -> BTreeSet<String> {
    let text = std::fs::read_to_string(root().join("Makefile")).unwrap();
    text.lines()
        .filter(|line| !line.starts_with(['\t', '#', ' ', '.']))
        .filter_map(|line| line.split_once(':'))
        .filter(|(_, rest)| !rest.starts_with('='))
        .map(|(target, _)| target.trim().to_owned())
        .filter(|target| !target.contains(' ') && !target.contains('$'))
        .collect()
}

/// The `make` targets the commands of a `run` script call (`make a b VAR=x`, a command of its
/// own: at a line's start or after `&&`, `||` or `;`).
fn targets_called(run: &str) -> Vec<String> {
    let mut called = Vec::new();
    for command in run
        .lines()
        .flat_map(|line| line.split("&&"))
        .flat_map(|part| part.split("||"))
        .flat_map(|part| part.split(';'))
    {
        let mut words = command.split_whitespace();
        if words.next() == Some("make") {
            called.extend(
                words
                    .take_while(|w| !w.contains('=') && !w.starts_with('-'))
                    .map(str::to_owned),
            );
        }
    }
    called
}

fn steps(job: &Value) -> &Vec<Value> {
    job["steps"].as_array().expect("a job has steps")
}

#[test]
fn every_workflow_has_runnable_jobs_and_calls_existing_make_targets() {
    let targets = make_targets();
    let all = workflows();
    assert!(
        all.iter().any(|(name, _)| name == "nightly.yml") && all.len() >= 2,
        "the nightly and pull-request workflows: {:?}",
        all.iter().map(|(n, _)| n).collect::<Vec<_>>()
    );
    for (name, workflow) in &all {
        assert!(workflow["on"].is_object(), "{name}: no `on` triggers");
        let jobs = workflow["jobs"].as_object().expect("jobs");
        assert!(!jobs.is_empty(), "{name}: no jobs");
        for (job_name, job) in jobs {
            assert!(job["runs-on"].is_string(), "{name}/{job_name}: no runs-on");
            for step in steps(job) {
                assert!(
                    step["uses"].is_string() != step["run"].is_string(),
                    "{name}/{job_name}: a step must use an action or run a command: {step}"
                );
                if let Some(run) = step["run"].as_str() {
                    for target in targets_called(run) {
                        assert!(
                            targets.contains(&target),
                            "{name}/{job_name}: `make {target}` is not a Makefile target"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn the_nightly_matrix_runs_every_backend_and_every_shard_once() {
    let (_, nightly) = workflows()
        .into_iter()
        .find(|(name, _)| name == "nightly.yml")
        .expect("nightly.yml");
    assert!(
        nightly["on"]["schedule"].is_array(),
        "nightly runs on a schedule"
    );
    assert!(
        nightly["on"].get("workflow_dispatch").is_some(),
        "and by hand"
    );
    let suite = &nightly["jobs"]["suite"];
    let matrix = &suite["strategy"]["matrix"];
    let backends: BTreeSet<&str> = matrix["backend"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(backends, BTreeSet::from(["sim", "qemu", "libvirt"]));
    let shards: Vec<u64> = matrix["shard"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_u64)
        .collect();
    let run = steps(suite)
        .iter()
        .filter_map(|s| s["run"].as_str())
        .find(|run| run.contains("nightly-suite"))
        .expect("a step runs make nightly-suite");
    let count: u64 = run
        .split("NIGHTLY_SHARD=${{ matrix.shard }}/")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("the suite step names NIGHTLY_SHARD=${{ matrix.shard }}/N");
    assert_eq!(
        shards,
        (1..=count).collect::<Vec<_>>(),
        "shards 1..={count}"
    );
    // Run folders and JUnit go up even when a job fails.
    for step in steps(suite).iter().filter(|s| {
        s["uses"]
            .as_str()
            .is_some_and(|u| u.starts_with("actions/upload-artifact"))
    }) {
        assert_eq!(step["if"], "always()", "{step}");
    }
    assert!(
        steps(suite)
            .iter()
            .any(|s| s["uses"].as_str().is_some_and(|u| u.contains("junit"))),
        "JUnit is published"
    );
}

#[test]
fn targets_are_read_from_make_command_lines() {
    assert_eq!(
        targets_called(
            "make deps images\napt-get install make pkg-config && make nightly-suite NIGHTLY_BACKEND=sim"
        ),
        ["deps", "images", "nightly-suite"]
    );
    assert!(make_targets().contains("nightly-suite"));
    assert!(!make_targets().contains("NIGHTLY_BACKEND"));
}
