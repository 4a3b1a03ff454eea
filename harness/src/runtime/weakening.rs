//! The switch of a runtime's test-only weakened build (runtime contract: "Defences").

/// The variable that switches one defence off in a runtime's weakened build.
pub const WEAKEN_VARIABLE: &str = "METER_WEAKEN";
