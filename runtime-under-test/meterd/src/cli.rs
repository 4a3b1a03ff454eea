//! Command lines of `meterd` and `meter`; the binaries (and multi-call hosts) call these.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use serde_json::json;

use crate::client::{ClientError, LocalClient};
use crate::daemon::{DaemonSettings, Runtime};
use crate::outcome::{EXIT_DENIED, EXIT_OK, EXIT_UNREACHABLE, Outcome, Refused};
use crate::protocol::{LocalReply, LocalRequest};
use crate::vendor::VendorCommand;
use crate::{local, platform, server, store, tls};

/// meterd: the licence runtime daemon of one machine.
///
/// Local apps reach it on a Unix socket; with --server it also serves remote stations over TLS.
/// Holders are watched with pidfds and released the moment they exit.
#[derive(Debug, Parser)]
#[command(name = "meterd", version)]
pub struct DaemonArgs {
    /// Durable state folder (redb database, TLS identity, trusted vendor keys in trust/).
    #[arg(long)]
    pub state: PathBuf,
    /// Unix socket for local apps [default: <state>/meterd.sock].
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Where to learn about the machine: `host` or `sim:<dir>`.
    #[arg(long, default_value = "host")]
    pub platform: String,
    /// Also serve remote stations over TLS.
    #[arg(long)]
    pub server: bool,
    /// Address the network server listens on.
    #[arg(long, default_value_t = SocketAddr::from(([0, 0, 0, 0], server::DEFAULT_PORT)))]
    pub listen: SocketAddr,
    /// Keepalive window of remote stations, seconds (fractions allowed).
    #[arg(long, default_value_t = 10.0)]
    pub keepalive: f64,
    /// A network server to forward accesses to (`addr:port`); pair each with --pin.
    #[arg(long = "remote")]
    pub remotes: Vec<String>,
    /// SHA-256 of the server certificate of the --remote at the same position, hex.
    #[arg(long = "pin")]
    pub pins: Vec<String>,
}

/// Runs meterd with these arguments (argv[0] first) until SIGTERM or SIGINT.
pub fn run_daemon(args: Vec<OsString>) -> anyhow::Result<()> {
    let args = DaemonArgs::parse_from(args);
    init_logging();
    crate::weakened::announce()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("meterd")
        .build()
        .context("Cannot start the async runtime")?;
    runtime.block_on(daemon_main(args))
}

fn init_logging() {
    init_logging_at("info");
}

/// Logs to stderr, filtered by `METER_LOG` (else `default`); colours only on a terminal.
fn init_logging_at(default: &str) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("METER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
}

/// Lets the daemon watch many holders: raise the open-file limit to its hard maximum.
fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write one rlimit struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

async fn daemon_main(args: DaemonArgs) -> anyhow::Result<()> {
    if args.remotes.len() != args.pins.len() {
        anyhow::bail!("Give one --pin for every --remote");
    }
    if !(args.keepalive > 0.0 && args.keepalive.is_finite()) {
        anyhow::bail!("--keepalive must be a positive number of seconds");
    }
    raise_fd_limit();
    let started = std::time::Instant::now();
    let ms = |since: std::time::Instant| since.elapsed().as_millis() as u64;
    std::fs::create_dir_all(&args.state)
        .with_context(|| format!("Cannot create state folder {}", args.state.display()))?;
    let platform = platform::from_spec(&args.platform)?;
    let stage = std::time::Instant::now();
    let (store, snapshot) = store::Store::open(&args.state.join("meterd.redb"))?;
    let store_ms = ms(stage);
    let saved_servers: Vec<(String, String)> = snapshot
        .meta
        .get("servers")
        .and_then(|b| serde_json::from_slice(b).ok())
        .unwrap_or_default();
    let settings = DaemonSettings {
        state_dir: args.state.clone(),
        keepalive: Duration::from_secs_f64(args.keepalive),
    };
    let stage = std::time::Instant::now();
    let runtime = Runtime::new(platform, store, snapshot, settings)?;
    runtime.resume();
    let runtime_ms = ms(stage);
    let stage = std::time::Instant::now();
    crate::dongles::start(Arc::clone(&runtime)).await;
    let dongles_ms = ms(stage);
    let mut servers = saved_servers;
    for (addr, pin) in args.remotes.iter().zip(&args.pins) {
        servers.retain(|(a, _)| a != addr);
        servers.push((addr.clone(), pin.clone()));
    }
    for (addr, pin) in servers {
        let pin = tls::parse_pin(&pin).with_context(|| format!("Bad pin for {addr}"))?;
        runtime.remotes.add(&runtime, addr, pin);
    }

    let socket = args
        .socket
        .clone()
        .unwrap_or_else(|| args.state.join("meterd.sock"));
    let listener =
        local::bind(&socket).with_context(|| format!("Cannot listen on {}", socket.display()))?;
    tokio::spawn(local::serve(Arc::clone(&runtime), listener));

    if args.server {
        let identity = tls::load_or_create_identity(&args.state)?;
        let config = tls::server_config(&identity)?;
        let tcp = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("Cannot listen on {}", args.listen))?;
        let bound = tcp.local_addr()?;
        *runtime
            .server_info
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some((bound.to_string(), identity.fingerprint()));
        tracing::info!(listen = %bound, fingerprint = %identity.fingerprint(), "Network server up");
        tokio::spawn(server::serve(Arc::clone(&runtime), tcp, config));
    }

    let ready = args.state.join("meterd.ready");
    std::fs::write(&ready, format!("{}\n", std::process::id()))
        .with_context(|| format!("Cannot write {}", ready.display()))?;
    tracing::info!(
        socket = %socket.display(),
        platform = %runtime.platform.describe(),
        startup_ms = ms(started),
        store_ms,
        runtime_ms,
        dongles_ms,
        "meterd ready"
    );

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("meterd stopping");
    runtime.dongles.close_all().await;
    let _ = std::fs::remove_file(&ready);
    let _ = std::fs::remove_file(&socket);
    Ok(())
}

/// meter: ask the local licence runtime for licences, administer it, and issue licences as a vendor.
///
/// Every subcommand prints JSON with --json (one document per line). Exit codes: 0 done or
/// granted, 1 the runtime said no (the JSON says why), 2 usage error or runtime unreachable.
#[derive(Debug, Parser)]
#[command(name = "meter", version)]
pub struct MeterArgs {
    /// The local meterd socket.
    #[arg(
        long,
        env = "METER_SOCKET",
        global = true,
        default_value = "/run/meter/meterd.sock"
    )]
    pub socket: PathBuf,
    /// Print JSON, one document per line.
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: MeterCommand,
}

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
    /// Trust a vendor's public key for its firm code on this machine.
    Trust {
        /// Firm code.
        #[arg(long)]
        firm: u32,
        /// The vendor's public key file (vendor.pub).
        key: PathBuf,
    },
    /// Activate soft licences bound to this machine.
    #[command(subcommand)]
    Activate(ActivateCommand),
    /// Vendor tools: keys, licence issue, activation answers.
    #[command(subcommand)]
    Vendor(VendorCommand),
    /// Dongles attached to this machine, reached directly (no meterd needed).
    #[command(subcommand)]
    Dongle(crate::dongle_probe::LocalDongleCommand),
}

/// `meter servers` subcommands.
#[derive(Debug, Subcommand)]
pub enum ServersCommand {
    /// Forward accesses to a network server whose certificate has this SHA-256.
    Add {
        /// `addr:port` of the server.
        addr: String,
        /// SHA-256 of the server certificate, hex (the server's `<state>/server.pin`).
        #[arg(long)]
        pin: String,
    },
    /// Stop forwarding to a network server.
    Remove {
        /// `addr:port` of the server.
        addr: String,
    },
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
    },
    /// Install a signed licence file (an activation answer or an issued licence).
    Apply {
        /// The licence file.
        file: PathBuf,
    },
}

/// Runs meter with these arguments (argv[0] first); returns the process exit code.
pub fn run_meter(args: Vec<OsString>) -> i32 {
    let args = match MeterArgs::try_parse_from(args) {
        Ok(args) => args,
        Err(e) => {
            let _ = e.print();
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                    EXIT_OK
                }
                _ => EXIT_UNREACHABLE,
            };
        }
    };
    init_logging_quiet();
    if let Err(e) = crate::weakened::from_environment() {
        eprintln!("meter: {e}");
        return EXIT_UNREACHABLE;
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("meter: cannot start: {e}");
            return EXIT_UNREACHABLE;
        }
    };
    let json = args.json;
    match runtime.block_on(meter_main(args)) {
        Ok(outcome) => outcome.code,
        Err(e) => {
            let reachable = !e.chain().any(|c| c.downcast_ref::<ClientError>().is_some());
            if json {
                println!("{}", json!({"error": format!("{e:#}"), "reason": null}));
            } else {
                eprintln!("meter: {e:#}");
            }
            if reachable && e.downcast_ref::<Refused>().is_some() {
                EXIT_DENIED
            } else {
                EXIT_UNREACHABLE
            }
        }
    }
}

fn init_logging_quiet() {
    init_logging_at("warn");
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

/// Prints an error reply and turns it into an exit code.
fn print_error(
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

async fn meter_main(args: MeterArgs) -> anyhow::Result<Outcome> {
    let json_mode = args.json;
    let socket = args.socket.clone();
    match args.command {
        MeterCommand::Access(product) => {
            let mut client = LocalClient::connect(&socket).await?;
            let reply = client
                .request(&LocalRequest::Access {
                    firm: product.firm,
                    product: product.product,
                })
                .await?;
            print(json_mode, &granted_json(&reply), || human_grant(&reply));
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
                    Ok(print_error(json_mode, &message, reason))
                }
                other => anyhow::bail!("Unexpected reply {other:?}"),
            }
        }
        MeterCommand::Status => json_command(&socket, json_mode, LocalRequest::Status).await,
        MeterCommand::List => json_command(&socket, json_mode, LocalRequest::List).await,
        MeterCommand::Servers(ServersCommand::Add { addr, pin }) => {
            ok_command(&socket, json_mode, LocalRequest::ServersAdd { addr, pin }).await
        }
        MeterCommand::Servers(ServersCommand::Remove { addr }) => {
            ok_command(&socket, json_mode, LocalRequest::ServersRemove { addr }).await
        }
        MeterCommand::Trust { firm, key } => {
            let key = read_file(&key)?;
            ok_command(&socket, json_mode, LocalRequest::Trust { firm, key }).await
        }
        MeterCommand::Activate(ActivateCommand::Apply { file }) => {
            let source_name = file.display().to_string();
            let bytes = crate::activation::licence_bytes(read_file(&file)?, &source_name);
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
        }) => {
            crate::activation::request_command(&socket, json_mode, product, firm, vendor, &out)
                .await
        }
        MeterCommand::Vendor(command) => crate::vendor::run(json_mode, command),
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
        LocalReply::Error { message, reason } => Ok(print_error(json_mode, &message, reason)),
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
            let outcome = print_error(json_mode, &message, reason);
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

async fn hold(socket: &Path, json_mode: bool, product: ProductArg) -> anyhow::Result<Outcome> {
    let mut client = LocalClient::connect(socket).await?;
    let reply = client
        .request(&LocalRequest::Access {
            firm: product.firm,
            product: product.product,
        })
        .await?;
    print(json_mode, &granted_json(&reply), || human_grant(&reply));
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
