//! The scenario language: YAML files describing a world, a licence policy and ordered steps.
//!
//! [`load`] and [`parse_str`] parse and validate a whole scenario before anything runs;
//! every problem is a [`Problem`] pointing at a line and column.

mod builtin;
mod duration;
mod error;
mod located;
mod model;
mod validate;

use std::path::Path;

pub use builtin::BuiltinScenario;
pub use duration::{CLOCK_SKEW_PATTERN, ClockSkew, DURATION_PATTERN, Duration, DurationError};
pub use error::{Problem, ScenarioError};
pub use located::{Located, Position};
pub use model::*;

use error::Source;

/// Reads, parses and validates the scenario file at `path`.
pub fn load(path: impl AsRef<Path>) -> Result<Scenario, ScenarioError> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_str(&text, &path.display().to_string())
}

/// Parses and validates scenario `text`; `origin` names it in diagnostics (a path or built-in name).
pub fn parse_str(text: &str, origin: &str) -> Result<Scenario, ScenarioError> {
    let source = Source::new(origin, text);
    let mut scenario: Scenario = serde_saphyr::from_str(text).map_err(|error| {
        let error = error.without_snippet();
        let message = serde_saphyr::MessageFormatter::format_message(
            &serde_saphyr::DefaultMessageFormatter,
            error,
        )
        .into_owned();
        let at = error
            .location()
            .map(|l| Position::from_location(&l))
            .unwrap_or(Position {
                line: 1,
                column: 1,
                offset: 0,
                len: 0,
            });
        let (message, label, help) = explain_syntax_error(message);
        source.error(vec![source.problem(at, message, label, help)])
    })?;
    scenario.origin = origin.to_owned();
    let problems = validate::validate(&scenario, &source);
    if problems.is_empty() {
        Ok(scenario)
    } else {
        Err(source.error(problems))
    }
}

/// Rewords a parser message for scenario authors: (message, label, help).
fn explain_syntax_error(message: String) -> (String, &'static str, Option<String>) {
    const DOCS: &str = "see docs/scenario-language.md";
    if message.starts_with("unknown variant") && message.contains("boot, shutdown") {
        let help = format!("each step is a mapping with exactly one of these keys; {DOCS}");
        (message, "unknown step", Some(help))
    } else if message.starts_with("unknown variant") {
        (
            message,
            "not an allowed value",
            Some(format!("{DOCS} for the allowed values")),
        )
    } else if message.starts_with("unknown field") {
        (
            message,
            "unknown key",
            Some(format!("keys are kebab-case; {DOCS}")),
        )
    } else if message.starts_with("missing field") {
        (
            message,
            "in this mapping",
            Some("docs/scenario-language.md lists the required keys".to_owned()),
        )
    } else if let Some(kind) = ["u16", "u32", "u64"]
        .into_iter()
        .find(|kind| message == format!("invalid {kind}"))
    {
        let range = match kind {
            "u16" => "0 to 65535",
            "u32" => "0 to 4294967295",
            _ => "0 or more",
        };
        (
            format!("expected a whole number ({range})"),
            "not a whole number",
            None,
        )
    } else if message.starts_with("Invalid duration") {
        (message, "not a duration", None)
    } else {
        (message, "here", None)
    }
}

/// The built-in scenarios shipped in the binary.
pub fn builtin() -> &'static [BuiltinScenario] {
    builtin::BUILTINS
}

/// Loads a built-in scenario by name, or a scenario file by path.
///
/// An existing file, or an argument with a path separator or a `.yaml`/`.yml` extension, is a path;
/// anything else is a built-in name.
pub fn find(name_or_path: &str) -> Result<Scenario, ScenarioError> {
    let path = Path::new(name_or_path);
    let looks_like_path = name_or_path.contains(std::path::MAIN_SEPARATOR)
        || name_or_path.contains('/')
        || name_or_path.ends_with(".yaml")
        || name_or_path.ends_with(".yml");
    if path.is_file() || looks_like_path {
        return load(path);
    }
    match builtin().iter().find(|b| b.name == name_or_path) {
        Some(scenario) => parse_str(scenario.text, scenario.path),
        None => Err(ScenarioError::NotFound {
            name: name_or_path.to_owned(),
            known: builtin()
                .iter()
                .map(|b| b.name)
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

/// The JSON Schema (draft-07) of scenario files, for editors and `vigil schema`.
pub fn schema_json() -> String {
    let schema = schemars::generate::SchemaSettings::draft07()
        .into_generator()
        .into_root_schema_for::<Scenario>();
    let mut text = serde_json::to_string_pretty(&schema).expect("a schema always serialises");
    text.push('\n');
    text
}
