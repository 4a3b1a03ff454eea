//! Errors from reading a scenario: each problem points at a line and column of the file.

use std::path::PathBuf;
use std::sync::Arc;

use miette::{Diagnostic, NamedSource, SourceSpan};

use super::located::Position;

/// Why a scenario could not be loaded.
#[derive(Debug, thiserror::Error, Diagnostic)]
pub enum ScenarioError {
    /// The file could not be read.
    #[error("Cannot read scenario file {path}")]
    #[diagnostic(code(vigil::scenario::read))]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The file is larger than a scenario may be.
    #[error("Scenario file {path} is {size} bytes; at most {max} are read")]
    #[diagnostic(
        code(vigil::scenario::too_large),
        help("a scenario is a short YAML file (the built-in ones are under 8 KiB)")
    )]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size in bytes.
        size: u64,
        /// The limit in bytes.
        max: usize,
    },
    /// No built-in scenario has that name and no such file exists.
    #[error("No scenario named `{name}`")]
    #[diagnostic(code(vigil::scenario::not_found), help("built-in scenarios: {known}"))]
    NotFound {
        /// What was asked for.
        name: String,
        /// Built-in scenario names, comma-separated.
        known: String,
    },
    /// The file is not a valid scenario; every problem found is listed.
    #[error("{}", summary(origin, problems))]
    #[diagnostic(code(vigil::scenario::invalid))]
    Invalid {
        /// File name or built-in path.
        origin: String,
        /// Problems, in file order.
        #[related]
        problems: Vec<Problem>,
    },
}

impl ScenarioError {
    /// The located problems, if the scenario was read but is invalid.
    pub fn problems(&self) -> &[Problem] {
        match self {
            ScenarioError::Invalid { problems, .. } => problems,
            _ => &[],
        }
    }
}

fn summary(origin: &str, problems: &[Problem]) -> String {
    match problems {
        [] => format!("Invalid scenario {origin}"),
        [only] => format!("Invalid scenario {origin}:{}: {}", only.at, only.message),
        [first, rest @ ..] => format!(
            "Invalid scenario {origin}:{}: {} (and {} more problem{})",
            first.at,
            first.message,
            rest.len(),
            if rest.len() == 1 { "" } else { "s" }
        ),
    }
}

/// One problem in a scenario file, with the span it is about.
#[derive(Debug, Clone, thiserror::Error, Diagnostic)]
#[error("{message}")]
pub struct Problem {
    /// What is wrong (includes what would be valid).
    pub message: String,
    /// Where.
    pub at: Position,
    /// A hint on how to fix it.
    #[help]
    pub help: Option<String>,
    #[source_code]
    source_code: NamedSource<Arc<str>>,
    #[label("{label}")]
    span: SourceSpan,
    label: String,
}

/// The scenario text and its name, shared by every problem found in it.
#[derive(Debug, Clone)]
pub(crate) struct Source {
    pub(crate) origin: String,
    text: Arc<str>,
}

impl Source {
    pub(crate) fn new(origin: &str, text: &str) -> Self {
        Self {
            origin: origin.to_owned(),
            text: Arc::from(text),
        }
    }

    /// `at` with its byte offset worked out from its line and column when the parser gave none.
    pub(crate) fn with_offset(&self, mut at: Position) -> Position {
        if at.offset != 0 || at.line <= 1 && at.column <= 1 {
            return at;
        }
        let Some(index) = (at.line as usize).checked_sub(1) else {
            return at;
        };
        let Some(line) = self.text.split_inclusive('\n').nth(index) else {
            return at;
        };
        let line_start = line.as_ptr() as usize - self.text.as_ptr() as usize;
        let column = line
            .char_indices()
            .nth(at.column.saturating_sub(1) as usize)
            .map_or(line.len(), |(byte, _)| byte);
        at.offset = line_start + column;
        at
    }

    /// A problem at `at`, labelled `label`.
    pub(crate) fn problem(
        &self,
        at: Position,
        message: impl Into<String>,
        label: impl Into<String>,
        help: Option<String>,
    ) -> Problem {
        let offset = at.offset.min(self.text.len());
        let len = at.len.min(self.text.len() - offset);
        Problem {
            message: message.into(),
            at,
            help,
            source_code: NamedSource::new(self.origin.clone(), Arc::clone(&self.text))
                .with_language("yaml"),
            span: SourceSpan::new(offset.into(), len),
            label: label.into(),
        }
    }

    pub(crate) fn error(&self, problems: Vec<Problem>) -> ScenarioError {
        ScenarioError::Invalid {
            origin: self.origin.clone(),
            problems,
        }
    }
}
