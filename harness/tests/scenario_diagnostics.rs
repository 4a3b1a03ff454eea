//! Every broken scenario in tests/fixtures/broken is refused with a located, rendered diagnostic.
//!
//! Each fixture's second line says where the first problem must be: `# expect: <line>:<column>`.

use std::path::{Path, PathBuf};

use miette::{GraphicalReportHandler, GraphicalTheme};
use vigil::scenario::{self, ScenarioError};

fn fixtures() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/broken");
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

fn render(error: &ScenarioError) -> String {
    let mut out = String::new();
    GraphicalReportHandler::new_themed(GraphicalTheme::unicode_nocolor())
        .with_width(110)
        .with_links(false)
        .render_report(&mut out, error)
        .unwrap();
    out
}

fn expected_position(text: &str) -> (u32, u32) {
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("# expect: "))
        .expect("fixture has an `# expect: line:column` header");
    let (l, c) = line.trim().split_once(':').unwrap();
    (l.parse().unwrap(), c.parse().unwrap())
}

#[test]
fn there_are_at_least_fifteen_broken_fixtures() {
    assert!(fixtures().len() >= 15, "only {} fixtures", fixtures().len());
}

#[test]
fn each_broken_fixture_fails_where_intended() {
    for path in fixtures() {
        let stem = path.file_stem().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&path).unwrap();
        let origin = format!("{stem}.yaml");
        let error = match scenario::parse_str(&text, &origin) {
            Ok(_) => panic!("{stem}: a broken scenario was accepted"),
            Err(error) => error,
        };
        let first = error
            .problems()
            .first()
            .unwrap_or_else(|| panic!("{stem}: no located problem in {error:?}"));
        assert_eq!(
            (first.at.line, first.at.column),
            expected_position(&text),
            "{stem}: first problem `{}` is not where the fixture expects it",
            first.message
        );
        let rendered = render(&error);
        assert!(
            rendered.contains(&format!("[{origin}:{}:{}]", first.at.line, first.at.column)),
            "{stem}: the rendering lacks file:line:column\n{rendered}"
        );
        insta::assert_snapshot!(stem.as_str(), rendered);
    }
}

#[test]
fn the_display_line_names_file_line_and_column() {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/broken/unknown-machine.yaml"),
    )
    .unwrap();
    let error = scenario::parse_str(&text, "unknown-machine.yaml").unwrap_err();
    assert_eq!(
        error.to_string(),
        "Invalid scenario unknown-machine.yaml:15:11: unknown machine `vm3`; known: host-a, vm1, vm2"
    );
}

#[test]
fn load_reports_the_path_it_read() {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/broken/unknown-step.yaml");
    let error = scenario::load(&path).unwrap_err();
    let ScenarioError::Invalid { origin, .. } = &error else {
        panic!("expected an invalid scenario, got {error:?}");
    };
    assert_eq!(origin, &path.display().to_string());
}
