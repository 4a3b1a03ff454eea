//! How a runtime learns the root of the harness's world (docs/runtime-contract.md, "The trust
//! chain"): backends start every runtime with it in this variable.

/// The variable that gives a harness build of the runtime the world's root key (hex).
pub const HARNESS_ROOT_VARIABLE: &str = "METER_HARNESS_ROOT";
