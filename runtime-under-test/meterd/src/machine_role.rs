//! Whether this machine is a terminal server, judged from the login sessions the kernel shows
//! alive at once, not only from the session table (a file root may delete).
//!
//! A machine where two login sessions were ever alive together serves several users: it stays
//! a terminal server for the rest of the runtime's life, whatever its table says later. One
//! login session viewed remotely (a remote desktop on a workstation) is not a terminal server.

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use meter_core::station::MachineRole;

use crate::platform::{Platform, PlatformError};
use crate::weakened::{self, Defence};

/// How long a look at the live login sessions stands for callers in sessions it already saw.
const LOOK_VALID: Duration = Duration::from_secs(1);

/// The runtime's judgement of its machine's role, with what it saw last.
#[derive(Debug, Default)]
pub struct MachineRoleJudge {
    seen: Mutex<Seen>,
}

#[derive(Debug, Default)]
struct Seen {
    /// Set for good once two login sessions were alive at once.
    terminal_server: bool,
    /// The login sessions alive at the last look, and when it was taken.
    live: BTreeSet<u32>,
    looked_at: Option<Instant>,
}

impl MachineRoleJudge {
    /// The role of the machine for a caller in `login_session` (`None`: outside any login).
    ///
    /// The platform's own answer (its session table) counts; so do the live login sessions,
    /// looked at again whenever the caller's session was not alive at the last look or the
    /// look is older than a second.
    pub fn role(
        &self,
        platform: &dyn Platform,
        login_session: Option<u32>,
    ) -> Result<MachineRole, PlatformError> {
        let declared = platform.role()?;
        if declared == MachineRole::TerminalServer || weakened::is(Defence::TerminalServerRole) {
            return Ok(declared);
        }
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.terminal_server {
            return Ok(MachineRole::TerminalServer);
        }
        let stale = seen.looked_at.is_none_or(|at| at.elapsed() >= LOOK_VALID);
        let unknown_caller = login_session.is_some_and(|id| !seen.live.contains(&id));
        if stale || unknown_caller {
            seen.live = platform.live_login_sessions()?;
            seen.looked_at = Some(Instant::now());
            if seen.live.len() > 1 {
                tracing::info!(
                    sessions = seen.live.len(),
                    "Several login sessions alive at once: this machine is a terminal server"
                );
                seen.terminal_server = true;
            }
        }
        Ok(if seen.terminal_server {
            MachineRole::TerminalServer
        } else {
            MachineRole::Workstation
        })
    }
}
