//! How a `meter` command ends: its exit code (runtime contract: "Exit codes of `meter`").

use serde_json::json;

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

/// Prints the runtime's error answer (JSON or a line on stderr) and the exit code it means: 1
/// when the runtime said no (it gave a reason), 2 otherwise.
pub fn report_error(
    json_mode: bool,
    message: &str,
    reason: Option<meter_core::reason::Reason>,
) -> Outcome {
    if json_mode {
        println!(
            "{}",
            json!({"error": message, "reason": reason.map(|r| r.code())})
        );
    } else {
        eprintln!("meter: {message}");
    }
    Outcome {
        code: if reason.is_some() {
            EXIT_DENIED
        } else {
            EXIT_UNREACHABLE
        },
    }
}
