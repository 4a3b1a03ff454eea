//! The `meter` commands apps and admins run against the local daemon, and their arguments.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use serde_json::json;

use crate::client::LocalClient;
use crate::outcome::{EXIT_DENIED, EXIT_OK, EXIT_UNREACHABLE, Outcome, report_error};
use crate::protocol::{LocalReply, LocalRequest};
use crate::vendor::VendorCommand;

/// A product on the command line.
#[derive(Debug, Clone, Args)]
pub struct ProductArg {
    /// Product code.
    #[arg(long)]
    pub product: u32,
    /// Vendor firm code [default: the firm of a local item with this product, else 10].
    #[arg(long)]
    pub firm: Option<u32>,
}

/// `meter` subcommands.
#[derive(Debug, Subcommand)]
pub enum MeterCommand {
    /// Take a licence and give it back when meter exits: a probe.
    Access(ProductArg),
    /// Take a licence and hold it until killed; exits 1 if the runtime revokes it.
    Hold(ProductArg),
    /// Give a licence back.
    Release {
        /// The handle printed by access or hold.
        #[arg(long)]
        handle: u64,
    },
    /// Show the machine, its licence containers and the network server.
    Status,
    /// List every allocation (handle, product, station, pid or peer).
    List,
    /// Add or remove network servers this runtime forwards to.
    #[command(subcommand)]
    Servers(ServersCommand),
    /// Make this network server one of a triad of three (2-of-3 redundancy), or show it.
    #[command(subcommand)]
    Triad(TriadCommand),
    /// Trust a vendor on this machine: install its firm certificate (`meter root certify`),
    /// accepted only when a root this runtime carries signed it.
    Trust {
        /// The firm certificate file (e.g. firm.cert).
        certificate: PathBuf,
    },
    /// Activate soft licences bound to this machine.
    #[command(subcommand)]
    Activate(ActivateCommand),
    /// Vendor tools: keys, licence issue, activation answers.
    #[command(subcommand)]
    Vendor(VendorCommand),
    /// The runtime maker's tools: root keys and firm certificates.
    #[command(subcommand)]
    Root(crate::root_commands::RootCommand),
    /// Access rules of this runtime: who may use which product, reservations and caps.
    #[command(subcommand)]
    Rules(RulesCommand),
    /// The usage log: check it, report from it.
    #[command(subcommand)]
    Usage(crate::usage_commands::UsageCommand),
    /// An attack the harness stages (harness builds only): remove one usage record, as root
    /// editing the state database would.
    #[command(hide = true)]
    TamperUsageLog {
        /// The record's place (from 1).
        seq: u64,
    },
    /// An attack the harness stages (harness builds only): hand the witnesses a receipt of
    /// another machine's licence, signed with this runtime's key, before its owner sends any.
    #[command(hide = true)]
    ClaimWitness {
        /// The licence id (`meter status` of its machine shows it).
        licence: String,
    },
    /// An attack the harness stages (harness builds only): this triad member asks the leader
    /// for its own apps' seats as if the licence had QUANTITY seats, as a runtime its licensee
    /// modified would.
    #[command(hide = true)]
    InflateSeats {
        /// The quantity claimed (at least 1).
        #[arg(value_parser = clap::value_parser!(u32).range(1..))]
        quantity: u32,
    },
    /// An attack the harness stages (harness builds only): this triad member gives back,
    /// through the leader, the seats the other members' apps hold, as a runtime its licensee
    /// modified would.
    #[command(hide = true)]
    ReleaseMemberSeats,
    /// Dongles attached to this machine, reached directly (no meterd needed).
    #[command(subcommand)]
    Dongle(crate::dongle_probe::LocalDongleCommand),
}

/// `meter servers` subcommands.
#[derive(Debug, Subcommand)]
pub enum ServersCommand {
    /// Forward accesses to a network server whose certificate has this SHA-256, or to a triad
    /// of three (`a:port,b:port,c:port` with `--pin pa,pb,pc`): the runtime links to the
    /// member that leads and follows the lead when it moves.
    Add {
        /// `addr:port` of the server, or of a triad's three members separated by commas.
        addr: String,
        /// SHA-256 of the server certificate, hex (the server's `<state>/server.pin`); for a
        /// triad, one per member separated by commas.
        #[arg(long)]
        pin: String,
    },
    /// Stop forwarding to a network server.
    Remove {
        /// `addr:port` of the server.
        addr: String,
    },
}

/// `meter triad` subcommands.
#[derive(Debug, Subcommand)]
pub enum TriadCommand {
    /// Join a triad: name its three members as `<pin>@<addr:port>`, in the same order on each
    /// member. `addr:port` is where this member reaches that member's triad port (for itself:
    /// where it listens for the others); `pin` is each server's certificate SHA-256 (its
    /// `<state>/server.pin`). Kept in the state: a restarted member joins again and catches up.
    /// Administrators only.
    Join {
        /// The three members, `<pin>@<addr:port>`.
        #[arg(num_args = 3, required = true)]
        members: Vec<String>,
    },
    /// This member's number, the leader it knows, and whether it leads.
    Status {
        /// Also the seat events (grants, releases, expiries) its ledger applied.
        #[arg(long)]
        history: bool,
    },
}

/// Reads `<pin>@<addr:port>`.
fn parse_member(text: &str) -> anyhow::Result<crate::triad_types::Member> {
    let (pin, addr) = text
        .split_once('@')
        .ok_or_else(|| anyhow::anyhow!("{text:?} is not <pin>@<addr:port>"))?;
    crate::tls::parse_pin(pin).map_err(|e| anyhow::anyhow!("Bad pin in {text:?}: {e}"))?;
    addr.parse::<std::net::SocketAddr>()
        .map_err(|e| anyhow::anyhow!("Bad address in {text:?}: {e}"))?;
    Ok(crate::triad_types::Member {
        addr: addr.to_owned(),
        pin: pin.to_ascii_lowercase(),
    })
}

/// `meter rules` subcommands.
#[derive(Debug, Subcommand)]
pub enum RulesCommand {
    /// Put a rules document (YAML; see docs/runtime-contract.md, Access rules) in force,
    /// replacing the one before; an empty document lifts every rule. Administrators only.
    Apply {
        /// The rules file.
        file: PathBuf,
    },
    /// Show the rules in force.
    Show,
}

/// `meter activate` subcommands.
#[derive(Debug, Subcommand)]
pub enum ActivateCommand {
    /// Collect this machine's traits and write an activation request sealed to the vendor.
    Request {
        /// Product code.
        #[arg(long)]
        product: u32,
        /// Vendor firm code.
        #[arg(long)]
        firm: u32,
        /// The vendor's public key file (vendor.pub) the request is sealed to.
        #[arg(long)]
        vendor: Option<PathBuf>,
        /// Where to write the request.
        #[arg(long)]
        out: PathBuf,
        /// Ask for a licence of a server triad (`meter vendor activate-triad` answers the three
        /// members' requests together): the request names this server's certificate pin.
        #[arg(long)]
        triad_member: bool,
    },
    /// Install a signed licence file (an activation answer or an issued licence).
    Apply {
        /// The licence file.
        file: PathBuf,
    },
}

fn print(json_mode: bool, document: &serde_json::Value, human: impl FnOnce() -> String) {
    if json_mode {
        println!("{document}");
    } else {
        println!("{}", human());
    }
}

fn granted_json(reply: &LocalReply) -> serde_json::Value {
    match reply {
        LocalReply::Granted {
            handle,
            product,
            container,
            station,
        } => {
            json!({"granted": true, "handle": handle, "product": product, "container": container, "station": station})
        }
        LocalReply::Denied { reason, message } => {
            json!({"granted": false, "reason": reason.code(), "message": message})
        }
        LocalReply::Error { message, reason } => {
            json!({"error": message, "reason": reason.map(|r| r.code())})
        }
        other => json!({"error": format!("Unexpected reply {other:?}"), "reason": null}),
    }
}

/// Runs one `meter` command against the daemon at `socket`.
pub async fn run(
    socket: PathBuf,
    json_mode: bool,
    command: MeterCommand,
) -> anyhow::Result<Outcome> {
    match command {
        MeterCommand::Access(product) => {
            let (mut client, reply) = ask_for(&socket, json_mode, &product).await?;
            match reply {
                LocalReply::Granted { handle, .. } => {
                    client.request(&LocalRequest::Release { handle }).await?;
                    Ok(Outcome { code: EXIT_OK })
                }
                LocalReply::Denied { .. } => Ok(Outcome { code: EXIT_DENIED }),
                _ => Ok(Outcome {
                    code: EXIT_UNREACHABLE,
                }),
            }
        }
        MeterCommand::Hold(product) => hold(&socket, json_mode, product).await,
        MeterCommand::Release { handle } => {
            let mut client = LocalClient::connect(&socket).await?;
            match client.request(&LocalRequest::Release { handle }).await? {
                LocalReply::Released => {
                    print(json_mode, &json!({"released": true}), || {
                        format!("released handle {handle}")
                    });
                    Ok(Outcome { code: EXIT_OK })
                }
                LocalReply::Error { message, reason } => {
                    Ok(report_error(json_mode, &message, reason))
                }
                other => anyhow::bail!("Unexpected reply {other:?}"),
            }
        }
        MeterCommand::Status => json_command(&socket, json_mode, LocalRequest::Status).await,
        MeterCommand::Rules(RulesCommand::Apply { file }) => {
            let bytes = read_file(&file)?;
            let source_name = file.display().to_string();
            json_command(
                &socket,
                json_mode,
                LocalRequest::RulesApply { source_name, bytes },
            )
            .await
        }
        MeterCommand::Rules(RulesCommand::Show) => {
            json_command(&socket, json_mode, LocalRequest::RulesShow).await
        }
        MeterCommand::Usage(command) => {
            crate::usage_commands::run(&socket, json_mode, command).await
        }
        MeterCommand::TamperUsageLog { seq } => {
            json_command(&socket, json_mode, LocalRequest::TamperUsage { seq }).await
        }
        MeterCommand::ClaimWitness { licence } => {
            json_command(&socket, json_mode, LocalRequest::ClaimWitness { licence }).await
        }
        MeterCommand::InflateSeats { quantity } => {
            json_command(&socket, json_mode, LocalRequest::InflateSeats { quantity }).await
        }
        MeterCommand::ReleaseMemberSeats => {
            json_command(&socket, json_mode, LocalRequest::ReleaseMemberSeats).await
        }
        MeterCommand::List => json_command(&socket, json_mode, LocalRequest::List).await,
        MeterCommand::Servers(ServersCommand::Add { addr, pin }) => {
            ok_command(&socket, json_mode, LocalRequest::ServersAdd { addr, pin }).await
        }
        MeterCommand::Triad(TriadCommand::Join { members }) => {
            let members = members
                .iter()
                .map(|m| parse_member(m))
                .collect::<anyhow::Result<Vec<_>>>()?;
            json_command(&socket, json_mode, LocalRequest::TriadJoin { members }).await
        }
        MeterCommand::Triad(TriadCommand::Status { history }) => {
            json_command(&socket, json_mode, LocalRequest::TriadStatus { history }).await
        }
        MeterCommand::Servers(ServersCommand::Remove { addr }) => {
            ok_command(&socket, json_mode, LocalRequest::ServersRemove { addr }).await
        }
        MeterCommand::Trust { certificate } => {
            let bytes = read_file(&certificate)?;
            let source_name = certificate.display().to_string();
            json_command(
                &socket,
                json_mode,
                LocalRequest::Trust { source_name, bytes },
            )
            .await
        }
        MeterCommand::Activate(ActivateCommand::Apply { file }) => {
            let source_name = file.display().to_string();
            let bytes = crate::activation_commands::licence_bytes(read_file(&file)?, &source_name);
            json_command(
                &socket,
                json_mode,
                LocalRequest::InstallLicence { source_name, bytes },
            )
            .await
        }
        MeterCommand::Activate(ActivateCommand::Request {
            product,
            firm,
            vendor,
            out,
            triad_member,
        }) => {
            let asked = crate::activation_commands::Asked {
                product,
                firm,
                vendor,
                triad_member,
            };
            crate::activation_commands::request_command(&socket, json_mode, asked, &out).await
        }
        MeterCommand::Vendor(command) => crate::vendor::run(json_mode, command),
        MeterCommand::Root(command) => crate::root_commands::run(json_mode, command),
        MeterCommand::Dongle(command) => crate::dongle_probe::run(json_mode, command).await,
    }
}

fn read_file(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("Cannot read {}", path.display()))
}

fn human_grant(reply: &LocalReply) -> String {
    match reply {
        LocalReply::Granted {
            handle,
            product,
            container,
            station,
        } => format!(
            "granted product {product} (handle {handle}) from {container} to station {station}"
        ),
        LocalReply::Denied { reason, message } => format!("denied: {message} ({reason})"),
        LocalReply::Error { message, .. } => format!("error: {message}"),
        other => format!("{other:?}"),
    }
}

async fn json_command(
    socket: &Path,
    json_mode: bool,
    request: LocalRequest,
) -> anyhow::Result<Outcome> {
    let mut client = LocalClient::connect(socket).await?;
    match client.request(&request).await? {
        LocalReply::Json(text) => {
            let value: serde_json::Value = serde_json::from_str(&text)?;
            if json_mode {
                println!("{value}");
            } else {
                println!("{}", serde_json::to_string_pretty(&value)?);
            }
            Ok(Outcome { code: EXIT_OK })
        }
        LocalReply::Error { message, reason } => Ok(report_error(json_mode, &message, reason)),
        other => anyhow::bail!("Unexpected reply {other:?}"),
    }
}

async fn ok_command(
    socket: &Path,
    json_mode: bool,
    request: LocalRequest,
) -> anyhow::Result<Outcome> {
    let mut client = LocalClient::connect(socket).await?;
    match client.request(&request).await? {
        LocalReply::Ok => {
            print(json_mode, &json!({"ok": true}), || "ok".to_owned());
            Ok(Outcome { code: EXIT_OK })
        }
        LocalReply::Error { message, reason } => {
            // Admin refusals are the runtime saying no.
            let outcome = report_error(json_mode, &message, reason);
            Ok(Outcome {
                code: if outcome.code == EXIT_UNREACHABLE {
                    EXIT_DENIED
                } else {
                    outcome.code
                },
            })
        }
        other => anyhow::bail!("Unexpected reply {other:?}"),
    }
}

/// Asks the daemon for a licence of `product` and prints its answer; the connection stays open
/// (a grant lives as long as it).
async fn ask_for(
    socket: &Path,
    json_mode: bool,
    product: &ProductArg,
) -> anyhow::Result<(LocalClient, LocalReply)> {
    let mut client = LocalClient::connect(socket).await?;
    let reply = client
        .request(&LocalRequest::Access {
            firm: product.firm,
            product: product.product,
        })
        .await?;
    print(json_mode, &granted_json(&reply), || human_grant(&reply));
    Ok((client, reply))
}

async fn hold(socket: &Path, json_mode: bool, product: ProductArg) -> anyhow::Result<Outcome> {
    let (mut client, reply) = ask_for(socket, json_mode, &product).await?;
    let handle = match reply {
        LocalReply::Granted { handle, .. } => handle,
        LocalReply::Denied { .. } => return Ok(Outcome { code: EXIT_DENIED }),
        _ => {
            return Ok(Outcome {
                code: EXIT_UNREACHABLE,
            });
        }
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        let event = tokio::select! {
            event = client.next_event() => event,
            _ = term.recv() => {
                // A clean end: give the licence back (and wait until it is given back) first.
                let _ = client.request(&LocalRequest::Release { handle }).await;
                return Ok(Outcome { code: EXIT_OK });
            }
        };
        match event {
            Ok(LocalReply::Revoked { handle: h, reason }) if h == handle => {
                print(
                    json_mode,
                    &json!({"event": "revoked", "handle": handle, "reason": reason.code()}),
                    || format!("revoked: {} ({reason})", reason.message()),
                );
                return Ok(Outcome { code: EXIT_DENIED });
            }
            Ok(_) => {}
            Err(_) => {
                // meterd restarted: our grant survives it; watch again once it is back.
                client = reconnect_and_watch(socket, handle, json_mode).await?;
            }
        }
    }
}

async fn reconnect_and_watch(
    socket: &Path,
    handle: u64,
    json_mode: bool,
) -> anyhow::Result<LocalClient> {
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let Ok(mut client) = LocalClient::connect(socket).await else {
            continue;
        };
        match client.request(&LocalRequest::Watch { handle }).await {
            Ok(LocalReply::Ok) => return Ok(client),
            Ok(LocalReply::Error {
                reason: Some(reason),
                ..
            }) => {
                print(
                    json_mode,
                    &json!({"event": "revoked", "handle": handle, "reason": reason.code()}),
                    || format!("revoked: {} ({reason})", reason.message()),
                );
                std::process::exit(EXIT_DENIED);
            }
            _ => continue,
        }
    }
}
