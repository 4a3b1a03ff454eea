//! Starting `meterd`: its arguments, state, platform, TLS identity, local socket and server.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;

use crate::daemon::{DaemonSettings, Runtime};
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
    /// Unix socket for local apps, outside the private state folder [default:
    /// /run/meter/meterd.sock].
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
    /// Most network connections the server holds at once (1 to 60000); the descriptor budget
    /// grows with it.
    #[arg(long, default_value_t = crate::connection_limits::MAX_CONNECTIONS, value_parser = parse_max_connections)]
    pub max_connections: usize,
    /// Present this runtime id instead of its own (1 to 64 hex digits; harness builds only, which
    /// play the attack of a runtime posing as another; servers bind ids to keys).
    #[arg(long, value_parser = parse_runtime_id)]
    pub runtime_id: Option<String>,
    /// Keep no usage log (the administrator's record of every grant, denial and release, read
    /// with `meter usage report`; on by default).
    #[arg(long)]
    pub no_usage_log: bool,
}

fn parse_max_connections(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(n) if (1..=60_000).contains(&n) => Ok(n),
        _ => Err(format!("{text:?} is not a number from 1 to 60000")),
    }
}

fn parse_runtime_id(text: &str) -> Result<String, String> {
    if !text.is_empty() && text.len() <= 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(text.to_ascii_lowercase())
    } else {
        Err(format!("{text:?} is not 1 to 64 hex digits"))
    }
}

/// Where local apps find the daemon unless told otherwise (as `meter` looks for it).
pub const DEFAULT_SOCKET: &str = "/run/meter/meterd.sock";

/// The daemon's descriptor budget besides its network connections (soft open-file limit,
/// within the hard one): enough to watch thousands of holders.
pub const DESCRIPTOR_BUDGET: u64 = 8192;

/// Sets the open-file limit to the descriptor budget plus `connections` beyond the default
/// network share (or the hard limit, when lower).
fn set_descriptor_budget(connections: usize) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let extra = connections.saturating_sub(crate::connection_limits::MAX_CONNECTIONS) as u64;
    let budget = DESCRIPTOR_BUDGET.saturating_add(extra);
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, budget.min(hard), hard)
    {
        tracing::warn!(error = %e, "Cannot set the descriptor budget");
    }
}

/// Starts the daemon: its state, platform, TLS identity, local socket and (with --server) the
/// network server; runs until SIGTERM or SIGINT.
pub async fn daemon_main(args: DaemonArgs) -> anyhow::Result<()> {
    if args.remotes.len() != args.pins.len() {
        anyhow::bail!("Give one --pin for every --remote");
    }
    if !(args.keepalive > 0.0 && args.keepalive.is_finite()) {
        anyhow::bail!("--keepalive must be a positive number of seconds");
    }
    set_descriptor_budget(args.max_connections);
    let started = std::time::Instant::now();
    let ms = |since: std::time::Instant| since.elapsed().as_millis() as u64;
    // Before anything is touched: a platform this build refuses leaves no trace.
    let platform = platform::from_spec(&args.platform)?;
    std::fs::create_dir_all(&args.state)
        .with_context(|| format!("Cannot create state folder {}", args.state.display()))?;
    // The state holds the runtime's keys and metered state: its owner's alone.
    std::fs::set_permissions(&args.state, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("Cannot make {} private", args.state.display()))?;
    let stage = std::time::Instant::now();
    let database = args.state.join("meterd.redb");
    let (store, snapshot) = store::Store::open(&database)?;
    std::fs::set_permissions(&database, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("Cannot make {} private", database.display()))?;
    let store_ms = ms(stage);
    let saved_servers: Vec<(String, String)> = snapshot
        .meta
        .get("servers")
        .and_then(|b| serde_json::from_slice(b).ok())
        .unwrap_or_default();
    let triad: Option<crate::triad_server::TriadSettings> = snapshot
        .meta
        .get(crate::triad_server::TRIAD_META_KEY)
        .and_then(|b| serde_json::from_slice(b).ok());
    let settings = DaemonSettings {
        state_dir: args.state.clone(),
        keepalive: Duration::from_secs_f64(args.keepalive),
        runtime_id: args.runtime_id.clone(),
        usage_log: !args.no_usage_log,
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
        let pins =
            crate::remote::parse_pins(&pin).with_context(|| format!("Bad pin for {addr}"))?;
        runtime
            .remotes
            .add(&runtime, addr.clone(), pins)
            .with_context(|| format!("Cannot link to {addr}"))?;
    }

    let socket = args
        .socket
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET));
    if let Some(parent) = socket.parent()
        && !parent.as_os_str().is_empty()
        && !parent.exists()
    {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("Cannot create the socket folder {}", parent.display()))?;
        std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o755))
            .with_context(|| format!("Cannot open {} to local users", parent.display()))?;
    }
    let listener =
        local::bind(&socket).with_context(|| format!("Cannot listen on {}", socket.display()))?;
    tokio::spawn(local::serve(Arc::clone(&runtime), listener));
    runtime.watch_expiry();

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
        // A triad member joins again before it serves anyone: until then it would answer as a
        // lone server, with seats the triad does not count.
        if let Some(triad) = triad {
            runtime
                .join_triad(triad, false)
                .await
                .context("Cannot join the triad again")?;
        }
        tokio::spawn(server::serve(
            Arc::clone(&runtime),
            tcp,
            config,
            args.max_connections,
        ));
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
