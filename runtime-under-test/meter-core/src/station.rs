//! Station identity: which machine or terminal-server session a licence is counted for.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// What kind of machine a runtime runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MachineRole {
    /// One interactive user at a time; its remote desktop is the same station as its console.
    #[default]
    Workstation,
    /// Many simultaneous sessions, each a station of its own.
    TerminalServer,
}

/// The login session a process runs in.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum SessionKind {
    /// The machine's local console.
    Console,
    /// A remote-desktop session.
    Rdp {
        /// Name of the client computer.
        #[serde(default)]
        client_name: String,
        /// Address of the client computer.
        #[serde(default)]
        client_ip: String,
    },
    /// No interactive session (a service or daemon).
    Service,
}

impl SessionKind {
    /// True for a remote-desktop session.
    pub fn is_remote_desktop(&self) -> bool {
        matches!(self, SessionKind::Rdp { .. })
    }
}

/// A station: a machine, or one session on a terminal server.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct StationId {
    /// Machine id (name).
    pub machine: String,
    /// Session id, only for interactive sessions on a terminal server.
    pub session: Option<u32>,
}

impl StationId {
    /// The station of a whole machine.
    pub fn machine(machine: impl Into<String>) -> Self {
        StationId {
            machine: machine.into(),
            session: None,
        }
    }

    /// The station a process in `session_id` of `machine` counts as.
    ///
    /// On a terminal server each interactive session (console or remote desktop) is its own
    /// station; services count as the machine. On a workstation every session is the machine.
    pub fn for_session(
        machine: impl Into<String>,
        role: MachineRole,
        session_id: u32,
        kind: &SessionKind,
    ) -> Self {
        let session = match (role, kind) {
            (MachineRole::TerminalServer, SessionKind::Console | SessionKind::Rdp { .. }) => {
                Some(session_id)
            }
            (MachineRole::TerminalServer, SessionKind::Service) | (MachineRole::Workstation, _) => {
                None
            }
        };
        StationId {
            machine: machine.into(),
            session,
        }
    }
}

impl fmt::Display for StationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.session {
            Some(session) => write!(f, "{}/s{session}", self.machine),
            None => f.write_str(&self.machine),
        }
    }
}

/// Text that is not a station id (`machine` or `machine/s<session>`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Invalid station id {0:?}")]
pub struct InvalidStationId(pub String);

impl FromStr for StationId {
    type Err = InvalidStationId;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let invalid = || InvalidStationId(text.to_owned());
        let (machine, session) = match text.rsplit_once('/') {
            Some((machine, session)) => {
                let number = session.strip_prefix('s').ok_or_else(invalid)?;
                (machine, Some(number.parse().map_err(|_| invalid())?))
            }
            None => (text, None),
        };
        if machine.is_empty() || machine.contains('/') {
            return Err(invalid());
        }
        Ok(StationId {
            machine: machine.to_owned(),
            session,
        })
    }
}

#[cfg(test)]
mod tests {
    use rstest::rstest;

    use super::*;

    fn rdp() -> SessionKind {
        SessionKind::Rdp {
            client_name: "pc-7".to_owned(),
            client_ip: "10.0.0.7".to_owned(),
        }
    }

    #[rstest]
    #[case::workstation_console(MachineRole::Workstation, 1, SessionKind::Console, "vm1")]
    #[case::workstation_rdp_is_console(MachineRole::Workstation, 3, rdp(), "vm1")]
    #[case::workstation_service(MachineRole::Workstation, 0, SessionKind::Service, "vm1")]
    #[case::ts_console(MachineRole::TerminalServer, 1, SessionKind::Console, "vm1/s1")]
    #[case::ts_rdp(MachineRole::TerminalServer, 4, rdp(), "vm1/s4")]
    #[case::ts_service(MachineRole::TerminalServer, 0, SessionKind::Service, "vm1")]
    fn station_for_session(
        #[case] role: MachineRole,
        #[case] session: u32,
        #[case] kind: SessionKind,
        #[case] expected: &str,
    ) {
        let station = StationId::for_session("vm1", role, session, &kind);
        assert_eq!(station.to_string(), expected);
        assert_eq!(expected.parse::<StationId>().unwrap(), station);
    }

    #[rstest]
    #[case("")]
    #[case("ts1/4")]
    #[case("ts1/sx")]
    #[case("/s4")]
    #[case("a/b/s1")]
    fn invalid_station_text(#[case] text: &str) {
        assert!(text.parse::<StationId>().is_err());
    }

    #[test]
    fn session_kind_reads_the_platform_session_table() {
        let kind: SessionKind = serde_json::from_str(
            r#"{"kind": "rdp", "user": "alice", "client_name": "pc-7", "client_ip": "10.0.0.7"}"#,
        )
        .unwrap();
        assert_eq!(kind, rdp());
        let console: SessionKind = serde_json::from_str(r#"{"kind": "console"}"#).unwrap();
        assert_eq!(console, SessionKind::Console);
    }
}
