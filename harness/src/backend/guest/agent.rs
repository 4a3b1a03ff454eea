//! The harness's side of the in-guest agent: requests over the guest's virtio-serial port, which
//! QEMU exposes as a Unix socket on the harness machine.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vigil_agent::protocol::{Answer, Reply, Request};
pub use vigil_agent::protocol::{Exit, Op, Outcome, SessionKind};

/// Errors talking to the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The socket could not be reached or broke.
    #[error("Agent socket {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// No answer in time.
    #[error("The agent did not answer `{op}` within {after:?}")]
    Timeout { op: String, after: Duration },
    /// The agent answered with an error.
    #[error("The agent could not `{op}`: {message}")]
    Refused { op: String, message: String },
    /// The command the agent ran did not end in time; the agent killed it.
    #[error("The agent's `{op}` ran out of time: {message}")]
    CommandTimedOut { op: String, message: String },
}

/// A connection to one guest's agent.
pub struct AgentClient {
    path: PathBuf,
    stream: UnixStream,
    buffer: Vec<u8>,
    next_id: u64,
}

/// The operation's name as the protocol spells it, for messages.
fn op_name(op: &Op) -> String {
    serde_json::to_value(op)
        .ok()
        .and_then(|v| v.get("op").and_then(|o| o.as_str()).map(str::to_string))
        .unwrap_or_else(|| "request".into())
}

impl AgentClient {
    /// Connects to the socket QEMU serves for the agent's port (retrying until `wait`).
    pub fn connect(path: &Path, wait: Duration) -> Result<AgentClient, AgentError> {
        let deadline = Instant::now() + wait;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(stream) => break stream,
                Err(e) if Instant::now() > deadline => {
                    return Err(AgentError::Io {
                        path: path.display().to_string(),
                        source: e,
                    });
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        Ok(AgentClient {
            path: path.to_path_buf(),
            stream,
            buffer: Vec::new(),
            next_id: 0,
        })
    }

    fn io_error(&self) -> impl FnOnce(std::io::Error) -> AgentError + '_ {
        move |source| AgentError::Io {
            path: self.path.display().to_string(),
            source,
        }
    }

    /// Sends a request and waits for its answer (the agent's own timeout is `timeout`; the
    /// harness waits a little longer for the answer to travel).
    pub fn call(&mut self, op: Op, timeout: Duration) -> Result<Outcome, AgentError> {
        self.call_with(op, timeout, timeout + Duration::from_secs(2))
    }

    /// Waits for the guest to be ready: the agent answers and the runtime's ready file exists.
    pub fn wait_ready(
        &mut self,
        ready_file: &str,
        wait: Duration,
    ) -> Result<Option<String>, AgentError> {
        let deadline = Instant::now() + wait;
        loop {
            let op = Op::Ready {
                ready_file: ready_file.to_string(),
            };
            // Short tries: requests written before the agent opened its port may be lost.
            match self.call_quick(op, Duration::from_millis(500)) {
                Ok(Outcome::Ready {
                    runtime_ready: true,
                    vmgenid,
                    ..
                }) => return Ok(vmgenid),
                Ok(_) | Err(AgentError::Timeout { .. }) => {}
                Err(e) => return Err(e),
            }
            if Instant::now() > deadline {
                return Err(AgentError::Timeout {
                    op: "ready".into(),
                    after: wait,
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn call_quick(&mut self, op: Op, wait: Duration) -> Result<Outcome, AgentError> {
        self.call_with(op, Duration::from_secs(5), wait)
    }

    fn call_with(
        &mut self,
        op: Op,
        agent_timeout: Duration,
        wait: Duration,
    ) -> Result<Outcome, AgentError> {
        self.next_id += 1;
        let id = self.next_id;
        let name = op_name(&op);
        let request = Request {
            id,
            timeout_ms: agent_timeout.as_millis() as u64,
            op,
        };
        let mut line = serde_json::to_vec(&request).expect("requests serialise");
        line.push(b'\n');
        self.stream.write_all(&line).map_err(self.io_error())?;
        let deadline = Instant::now() + wait;
        loop {
            let Some(text) = self.next_line(deadline)? else {
                return Err(AgentError::Timeout {
                    op: name,
                    after: wait,
                });
            };
            // Greetings and answers to earlier, abandoned requests are skipped.
            let Ok(answer) = serde_json::from_str::<Answer>(&text) else {
                continue;
            };
            if answer.id != id {
                continue;
            }
            return match answer.reply {
                Reply::Ok(outcome) => Ok(outcome),
                Reply::Error(message) => Err(AgentError::Refused { op: name, message }),
                Reply::TimedOut(message) => Err(AgentError::CommandTimedOut { op: name, message }),
            };
        }
    }

    /// The next complete line, or `None` at the deadline.
    fn next_line(&mut self, deadline: Instant) -> Result<Option<String>, AgentError> {
        loop {
            if let Some(end) = self.buffer.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buffer.drain(..=end).collect();
                return Ok(Some(String::from_utf8_lossy(&line).trim().to_string()));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            self.stream
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .map_err(self.io_error())?;
            let mut chunk = [0u8; 64 * 1024];
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    return Err(AgentError::Io {
                        path: self.path.display().to_string(),
                        source: std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            "QEMU closed the agent socket",
                        ),
                    });
                }
                Ok(n) => self.buffer.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(None);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(AgentError::Io {
                        path: self.path.display().to_string(),
                        source: e,
                    });
                }
            }
        }
    }
}
