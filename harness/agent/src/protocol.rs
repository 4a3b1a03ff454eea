//! Requests and answers between the harness and the agent: one JSON document per line.
//!
//! Every request carries an `id` (echoed in its answer) and a `timeout_ms` after which the agent
//! gives up on it and answers with an error. Answers may come back in any order.

use serde::{Deserialize, Serialize};

/// Name of the virtio-serial port the agent listens on (`-device virtserialport,name=…`).
pub const PORT_NAME: &str = "vigil";

/// Folder of the runtime's session table and vmgenid file inside the guest.
pub const RUN_DIR: &str = "/run/meter";

/// The session table the runtime's `host` platform reads.
pub const SESSION_TABLE: &str = "/run/meter/sessions.json";

/// Where the agent records the ACPI VM generation id for the runtime.
pub const VMGENID_FILE: &str = "/run/meter/vmgenid";

/// The virtio serial of the read-only disk carrying a runtime given with `--runtime`; the
/// guest's init looks for it only when the kernel command line says `vigil.runtime-disk=1`.
pub const RUNTIME_DISK_SERIAL: &str = "vigil-runtime";

/// One request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Caller-chosen id, echoed in the answer.
    pub id: u64,
    /// How long the agent may take before answering with a timeout error.
    pub timeout_ms: u64,
    /// What to do.
    #[serde(flatten)]
    pub op: Op,
}

/// The kind of a login session, as the session table records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum SessionKind {
    /// The local console.
    Console {
        /// Logged-in user.
        user: String,
    },
    /// A remote desktop session.
    Rdp {
        /// Logged-in user.
        user: String,
        /// Name of the client computer.
        client_name: String,
        /// Address of the client computer.
        client_ip: String,
    },
}

impl SessionKind {
    /// The user logged in.
    pub fn user(&self) -> &str {
        match self {
            SessionKind::Console { user } | SessionKind::Rdp { user, .. } => user,
        }
    }
}

fn a_login() -> bool {
    true
}

/// An operation the agent performs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Op {
    /// Is the guest ready (agent up, runtime accepting connections)?
    Ready {
        /// File whose existence means the runtime is ready.
        ready_file: String,
    },
    /// Runs a command to completion, inside a session when one is named.
    Exec {
        /// Program and arguments.
        argv: Vec<String>,
        /// Extra environment variables.
        env: Vec<(String, String)>,
        /// Session to run in; `None` runs it as a service of the agent.
        session: Option<String>,
    },
    /// Opens a login session: a new session leader (setsid) recorded in the session table.
    SessionOpen {
        /// Harness name of the session.
        name: String,
        /// What kind of session it is.
        session: SessionKind,
        /// Whether it is a login (a login session of its own, in the session table); without,
        /// an unattended console: a process session the table does not list.
        #[serde(default = "a_login")]
        login: bool,
        /// The uid the session's processes run as (the agent creates the user's account);
        /// none: as the agent (root).
        #[serde(default)]
        uid: Option<u32>,
    },
    /// Closes a login session, killing its processes, and removes it from the session table.
    SessionClose {
        /// Harness name of the session.
        name: String,
    },
    /// Starts a long-lived app inside a session.
    Spawn {
        /// Harness name of the app.
        app: String,
        /// Session to run in.
        session: String,
        /// Program and arguments.
        argv: Vec<String>,
        /// Extra environment variables.
        env: Vec<(String, String)>,
        /// The app calls `setsid` as it starts (it stays in the session's login session).
        #[serde(default)]
        leave_session: bool,
    },
    /// How an app is doing and what it printed.
    AppStatus {
        /// Harness name of the app.
        app: String,
    },
    /// Sends a signal to an app.
    AppSignal {
        /// Harness name of the app.
        app: String,
        /// Signal number.
        signal: i32,
    },
    /// Sets the system clock (settimeofday) to an absolute time.
    SetClock {
        /// Milliseconds since the Unix epoch.
        epoch_ms: i64,
    },
    /// Deletes the runtime's session table and writes it no more while the agent runs (an
    /// attack: root hides who is logged in).
    DropSessionTable,
    /// Reads a file.
    ReadFile {
        /// Absolute path inside the guest.
        path: String,
    },
    /// Writes a file atomically (write + rename), creating its folder.
    WriteFile {
        /// Absolute path inside the guest.
        path: String,
        /// Contents, hex-encoded.
        data_hex: String,
    },
    /// Reads the ACPI VM generation id again and records it for the runtime.
    RefreshVmgenid,
    /// Imports a device from a USB/IP server and attaches it to the kernel's vhci_hcd.
    UsbipAttach {
        /// The server's address as the guest reaches it.
        host: String,
        /// The server's TCP port.
        port: u16,
        /// Bus id of the exported device.
        busid: String,
    },
    /// Detaches the USB/IP device on a vhci_hcd port.
    UsbipDetach {
        /// The port `usbip-attach` answered with.
        vhci_port: u32,
    },
    /// Stops the runtime, syncs and unmounts the disk, and powers the guest off.
    PowerOff {
        /// Program whose processes get SIGTERM first (the runtime daemon).
        daemon: String,
    },
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exit {
    /// Exit code, when it exited.
    pub code: Option<i32>,
    /// Terminating signal, when killed.
    pub signal: Option<i32>,
}

/// Successful results, one shape per operation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum Outcome {
    /// Answer to `ready`.
    Ready {
        /// Whether the runtime's ready file exists.
        runtime_ready: bool,
        /// The guest's VM generation id, if it has one.
        vmgenid: Option<String>,
        /// Seconds since the guest kernel started.
        uptime_s: f64,
    },
    /// A finished command.
    Exited {
        /// How it ended.
        exit: Exit,
        /// Its standard output.
        stdout: String,
        /// Its standard error.
        stderr: String,
    },
    /// A session was opened.
    SessionOpened {
        /// Its key in the session table: its login session, else its session id (the
        /// leader's pid).
        sid: i32,
    },
    /// An app was started.
    Spawned {
        /// Its pid.
        pid: i32,
    },
    /// An app's state.
    AppStatus {
        /// `None` while running.
        exit: Option<Exit>,
        /// Everything it printed on stdout so far.
        stdout: String,
    },
    /// File contents.
    File {
        /// Contents, hex-encoded.
        data_hex: String,
    },
    /// The VM generation id now recorded.
    Vmgenid {
        /// Canonical GUID text, if the machine has one.
        vmgenid: Option<String>,
    },
    /// A USB/IP device was attached.
    UsbipAttached {
        /// The vhci_hcd port it is on (for `usbip-detach`).
        vhci_port: u32,
    },
    /// Done, nothing to report.
    Done,
}

/// An answer to one request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Answer {
    /// The request's id.
    pub id: u64,
    /// What happened.
    #[serde(flatten)]
    pub reply: Reply,
}

/// Success or failure of a request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reply {
    /// The operation succeeded.
    Ok(Outcome),
    /// The operation failed; the text says why.
    Error(String),
    /// A command did not end within the request's timeout and was killed.
    TimedOut(String),
}

/// A command the agent ran did not end in time and was killed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{command} did not finish in time (killed)")]
pub struct CommandTimedOut {
    /// The command line.
    pub command: String,
}

/// A line the agent writes without being asked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Always `hello`.
    pub hello: String,
    /// Agent version.
    pub version: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_flat_json_lines() {
        let request = Request {
            id: 7,
            timeout_ms: 5000,
            op: Op::SetClock {
                epoch_ms: 1_790_000_000_000,
            },
        };
        let text = serde_json::to_string(&request).unwrap();
        assert_eq!(
            text,
            r#"{"id":7,"timeout_ms":5000,"op":"set-clock","epoch_ms":1790000000000}"#
        );
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), request);
    }

    #[test]
    fn answers_round_trip() {
        for reply in [
            Reply::Ok(Outcome::Spawned { pid: 42 }),
            Reply::Error("No such app `x`".into()),
            Reply::Ok(Outcome::AppStatus {
                exit: Some(Exit {
                    code: None,
                    signal: Some(9),
                }),
                stdout: "{\"granted\":true}\n".into(),
            }),
        ] {
            let answer = Answer { id: 3, reply };
            let text = serde_json::to_string(&answer).unwrap();
            assert!(!text.contains('\n'), "one line per answer: {text}");
            assert_eq!(serde_json::from_str::<Answer>(&text).unwrap(), answer);
        }
    }

    #[test]
    fn usbip_ops_round_trip() {
        for op in [
            Op::UsbipAttach {
                host: "10.0.2.2".into(),
                port: 40123,
                busid: "1-1".into(),
            },
            Op::UsbipDetach { vhci_port: 3 },
        ] {
            let request = Request {
                id: 9,
                timeout_ms: 10_000,
                op,
            };
            let text = serde_json::to_string(&request).unwrap();
            assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), request);
        }
        let text = serde_json::to_string(&Op::UsbipDetach { vhci_port: 3 }).unwrap();
        assert_eq!(text, r#"{"op":"usbip-detach","vhci_port":3}"#);
        let answer = Answer {
            id: 9,
            reply: Reply::Ok(Outcome::UsbipAttached { vhci_port: 0 }),
        };
        let text = serde_json::to_string(&answer).unwrap();
        assert_eq!(
            text,
            r#"{"id":9,"ok":{"result":"usbip-attached","vhci_port":0}}"#
        );
        assert_eq!(serde_json::from_str::<Answer>(&text).unwrap(), answer);
    }

    #[test]
    fn session_kinds_use_the_runtime_table_format() {
        let rdp = SessionKind::Rdp {
            user: "alice".into(),
            client_name: "pc-1".into(),
            client_ip: "10.0.0.11".into(),
        };
        assert_eq!(
            serde_json::to_value(&rdp).unwrap(),
            serde_json::json!({"kind": "rdp", "user": "alice", "client_name": "pc-1", "client_ip": "10.0.0.11"})
        );
    }
}
