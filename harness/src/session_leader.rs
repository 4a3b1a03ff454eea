//! A login-session leader: a process that starts its own session and spawns apps inside it.
//!
//! The sim backend runs one leader per login session (console, RDP), as the in-guest agent does
//! inside a real guest; both use the same leader and protocol from `vigil_agent::leader`. Apps
//! spawned by the leader inherit its session id, so the runtime sees them as members of that
//! session exactly as it would on a real machine. The harness passes its pid (`--parent`), and the
//! leader arms a parent-death signal for it, which survives the leader's `setsid`.

pub use vigil_agent::leader::{LeaderEvent, SpawnRequest, run};
