//! How a `meter` command ends: its exit code (runtime contract: "Exit codes of `meter`").

/// Exit code: done / granted.
pub const EXIT_OK: i32 = 0;
/// Exit code: the runtime said no.
pub const EXIT_DENIED: i32 = 1;
/// Exit code: usage error or the runtime could not be reached.
pub const EXIT_UNREACHABLE: i32 = 2;

/// What a command ended with.
#[derive(Debug)]
pub struct Outcome {
    pub code: i32,
}

/// The runtime or vendor tool said no (exit code 1).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);
