//! Reading scenario YAML within limits, and wording the parser's errors for scenario authors.

use serde_saphyr::budget::BudgetBreach;
use serde_saphyr::{Error, MessageFormatter};

use super::error::{Problem, Source};
use super::located::Position;

/// The largest scenario file read, in bytes (1 MiB; the built-in ones are under 8 KiB).
pub const MAX_FILE_BYTES: usize = 1 << 20;

/// The most YAML nodes (mappings, lists and values) a scenario may hold.
const MAX_NODES: usize = 100_000;
/// The most aliases (`*name`) a scenario may use.
const MAX_ALIASES: usize = 1_000;
/// The deepest nesting of mappings and lists.
const MAX_DEPTH: usize = 32;

const DOCS: &str = "see docs/scenario-language.md";

/// Parser options with the scenario limits.
pub(crate) fn options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            max_nodes: MAX_NODES,
            max_events: 4 * MAX_NODES,
            max_aliases: MAX_ALIASES,
            max_anchors: MAX_ALIASES,
            max_depth: MAX_DEPTH,
            max_documents: 1,
            max_total_scalar_bytes: MAX_FILE_BYTES,
            max_recorded_anchor_events: MAX_NODES,
            max_recorded_anchor_bytes: MAX_FILE_BYTES,
        },
    }
}

/// The located problem for a parser error.
pub(crate) fn problem(error: &Error, source: &Source) -> Problem {
    let error = error.without_snippet();
    let at = error
        .location()
        .map(|l| Position::from_location(&l))
        .map(|at| source.with_offset(at))
        .unwrap_or(Position {
            line: 1,
            column: 1,
            offset: 0,
            len: 0,
        });
    let (message, label, help) = explain(error);
    source.problem(at, message, label, help)
}

/// (message, label, help) for one parser error.
fn explain(error: &Error) -> (String, &'static str, Option<String>) {
    let default = || {
        serde_saphyr::DefaultMessageFormatter
            .format_message(error)
            .into_owned()
    };
    match error {
        Error::DuplicateMappingKey { key, .. } => (
            match key {
                Some(key) => format!("The key `{key}` is written twice in this mapping"),
                None => "A key is written twice in this mapping".to_owned(),
            },
            "repeated key",
            Some("keep one of the two".to_owned()),
        ),
        Error::MultipleDocuments { .. } => explain_second_document(),
        Error::Budget {
            breach: BudgetBreach::Documents { .. },
            ..
        } => explain_second_document(),
        Error::Budget { breach, .. } => (budget(breach), "over the limit", None),
        Error::SerdeUnknownVariant { expected, .. } if expected.contains(&"boot") => (
            default(),
            "unknown step",
            Some(format!(
                "each step is a mapping with exactly one of these keys; {DOCS}"
            )),
        ),
        Error::SerdeUnknownVariant { .. } => (
            default(),
            "not an allowed value",
            Some(format!("{DOCS} for the allowed values")),
        ),
        Error::SerdeUnknownField { .. } => (
            default(),
            "unknown key",
            Some(format!("keys are kebab-case; {DOCS}")),
        ),
        Error::SerdeMissingField { .. } => (
            default(),
            "in this mapping",
            Some("docs/scenario-language.md lists the required keys".to_owned()),
        ),
        Error::InvalidScalar { ty, .. } if matches!(*ty, "u16" | "u32" | "u64") => {
            let range = match *ty {
                "u16" => "0 to 65535",
                "u32" => "0 to 4294967295",
                _ => "0 or more",
            };
            (
                format!("Expected a whole number ({range})"),
                "not a whole number",
                None,
            )
        }
        Error::Message { msg, .. } if msg.starts_with(super::duration::ERROR_PREFIX) => {
            (default(), "not a duration", None)
        }
        _ => (default(), "here", None),
    }
}

fn explain_second_document() -> (String, &'static str, Option<String>) {
    (
        "A scenario file holds one YAML document; a second one starts here".to_owned(),
        "second document",
        Some("remove the `---` line, or put each scenario in its own file".to_owned()),
    )
}

/// Plain words for a breached parser limit.
fn budget(breach: &BudgetBreach) -> String {
    match breach {
        BudgetBreach::Nodes { .. } | BudgetBreach::Events { .. } => {
            format!("The scenario holds more than {MAX_NODES} values; it is too large to read")
        }
        BudgetBreach::Aliases { .. }
        | BudgetBreach::Anchors { .. }
        | BudgetBreach::AliasAnchorRatio { .. }
        | BudgetBreach::RecordedAnchorEvents { .. }
        | BudgetBreach::RecordedAnchorBytes { .. } => format!(
            "The scenario repeats too much through anchors and aliases (at most {MAX_ALIASES} aliases, each expanded once)"
        ),
        BudgetBreach::Depth { .. } => {
            format!("The scenario nests mappings and lists more than {MAX_DEPTH} levels deep")
        }
        BudgetBreach::ScalarBytes { .. } | BudgetBreach::InputBytes { .. } => format!(
            "The scenario's text is larger than {} KiB",
            MAX_FILE_BYTES / 1024
        ),
        _ => "The scenario passes one of the reader's size limits".to_owned(),
    }
}
