//! The scenario language: YAML files describing a world, a licence policy and ordered steps.
//!
//! [`load`] and [`parse_str`] parse and validate a whole scenario before anything runs;
//! every problem is a [`Problem`] pointing at a line and column.

mod builtin;
mod duration;
mod error;
mod located;
mod model;
mod syntax;
mod validate;

use std::path::Path;

pub use builtin::BuiltinScenario;
pub use duration::{
    CLOCK_SKEW_PATTERN, ClockSkew, DURATION_PATTERN, Duration, DurationError, MAX_SPAN,
};
pub use error::{Problem, ScenarioError};
pub use located::{Located, Position};
pub use model::*;
pub use syntax::MAX_FILE_BYTES;

use error::Source;

/// Reads, parses and validates the scenario file at `path` (at most [`MAX_FILE_BYTES`]).
pub fn load(path: impl AsRef<Path>) -> Result<Scenario, ScenarioError> {
    use std::io::Read;
    let path = path.as_ref();
    let read_error = |source| ScenarioError::Read {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_error)?;
    let mut bytes = Vec::new();
    let limit = u64::try_from(MAX_FILE_BYTES).unwrap_or(u64::MAX);
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(read_error)?;
    if bytes.len() > MAX_FILE_BYTES {
        let size = std::fs::metadata(path).map_or(limit + 1, |m| m.len());
        return Err(ScenarioError::TooLarge {
            path: path.to_owned(),
            size,
            max: MAX_FILE_BYTES,
        });
    }
    let text = String::from_utf8(bytes)
        .map_err(|e| read_error(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?;
    parse_str(&text, &path.display().to_string())
}

/// Parses and validates scenario `text`; `origin` names it in diagnostics (a path or built-in name).
pub fn parse_str(text: &str, origin: &str) -> Result<Scenario, ScenarioError> {
    let mut scenario: Scenario = parse_checked(text, origin, validate::validate)?;
    scenario.origin = origin.to_owned();
    Ok(scenario)
}

/// Parses and validates a policy document on its own (`products:`, as under a scenario's
/// `policy:`); `origin` names it in diagnostics.
pub fn parse_policy(text: &str, origin: &str) -> Result<Policy, ScenarioError> {
    parse_checked(text, origin, validate::validate_policy)
}

/// Parses `text` (at most [`MAX_FILE_BYTES`]) into a `T` and checks it with `validate`; every
/// problem located in `origin`.
fn parse_checked<T: serde::de::DeserializeOwned>(
    text: &str,
    origin: &str,
    validate: impl Fn(&T, &Source) -> Vec<Problem>,
) -> Result<T, ScenarioError> {
    if text.len() > MAX_FILE_BYTES {
        return Err(ScenarioError::TooLarge {
            path: origin.into(),
            size: text.len() as u64,
            max: MAX_FILE_BYTES,
        });
    }
    let source = Source::new(origin, text);
    let parsed: T = serde_saphyr::from_str_with_options(text, syntax::options())
        .map_err(|error| source.error(vec![syntax::problem(&error, &source)]))?;
    let problems = validate(&parsed, &source);
    if problems.is_empty() {
        Ok(parsed)
    } else {
        Err(source.error(problems))
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
