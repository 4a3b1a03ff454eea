//! Benchmark of the network server and the local daemon: throughput, latency, crash release, memory.
//!
//! Run: `cargo run --release -p meterd --example server-bench` (writes reports/bench/server.json).
//! With `-- --server-protocol-only [--levels 1,16,64]` it runs the server protocol levels alone and
//! writes nothing. Built with `--features weakened` and run with `-- --owner-check`, it measures
//! the cost of the owner check instead (reports/bench/owner-check.json; see `owner_check.rs`).
//! With `-- --rules-log` it measures the cost of 50 access rules and the usage log, and a usage
//! report over a million records (reports/bench/rules-log.json; see `rules_log.rs`). With
//! `-- --triad` it compares a triad of servers with one server and times failovers
//! (reports/bench/triad-server.json; see `triad.rs`). The daemons log at `warn` unless
//! `METER_BENCH_LOG` gives their `METER_LOG` filter.

mod owner_check;
mod rules_log;
mod triad;

/// The allocator the shipped daemon uses (the bench runs the daemon in this executable).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use meter_core::allocation::ProductKey;
use meter_core::firm_certificate::RootKey;
use meter_core::licence::{LicenceBody, VendorKey};
use meter_core::policy::ProductPolicy;
use meter_core::station::{MachineRole, StationId};
use meterd::client::LocalClient;
use meterd::protocol::{Claim, FromServer, LocalReply, LocalRequest, ToServer, WireSession};
use serde_json::json;

const SECONDS_PER_LEVEL: f64 = 3.0;
const LEVELS: [usize; 3] = [1, 16, 64];
const HELD: usize = 10_000;
/// Idle authenticated stations kept linked for the keepalive cost.
const IDLE: usize = 10_000;
/// How long the idle stations are watched.
const IDLE_SECONDS: u64 = 10;
/// Outages timed for the revoke delay, and the keepalive window they run against.
const OUTAGES: usize = 5;
const OUTAGE_WINDOW_S: f64 = 2.0;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("__meterd") => {
            let mut daemon_args: Vec<std::ffi::OsString> = vec!["meterd".into()];
            daemon_args.extend(args[2..].iter().map(Into::into));
            meterd::harness_build::enable();
            return meterd::cli::run_daemon(daemon_args);
        }
        Some("__hold") => return hold(&args[2], args[3].parse()?),
        _ => {}
    }
    // One thread drives every simulated client: the load generator shares the cores with the
    // daemons under test, so it should spend as little of them as it can.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(bench())
}

/// A holder process: takes a licence, says so on stdout, then sleeps until killed.
fn hold(socket: &str, product: u32) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut client = LocalClient::connect(Path::new(socket)).await?;
        let reply = client
            .request(&LocalRequest::Access {
                firm: Some(10),
                product,
            })
            .await?;
        println!("{}", matches!(reply, LocalReply::Granted { .. }));
        tokio::time::sleep(Duration::from_secs(3600)).await;
        Ok(())
    })
}

struct Machine {
    dir: PathBuf,
    child: Child,
}

/// The root of the bench's world (a fixed key: the bench proves speed, not trust).
fn bench_root() -> RootKey {
    RootKey::from_seed([0x42; 32])
}

impl Machine {
    fn start(dir: PathBuf, name: &str, address: &str, extra: &[String]) -> anyhow::Result<Self> {
        Self::start_with_env(dir, name, address, extra, &[])
    }

    /// Starts a daemon with extra environment variables (e.g. `METER_WEAKEN`).
    fn start_with_env(
        dir: PathBuf,
        name: &str,
        address: &str,
        extra: &[String],
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir.join("platform"))?;
        std::fs::write(
            dir.join("platform/machine.json"),
            json!({"kind": "physical", "name": name, "address": address, "traits": {}}).to_string(),
        )?;
        let ready = dir.join("state/meterd.ready");
        let child = Command::new(std::env::current_exe()?)
            .arg("__meterd")
            .arg("--state")
            .arg(dir.join("state"))
            .arg("--socket")
            .arg(dir.join("run/meterd.sock"))
            .arg("--platform")
            .arg(format!("sim:{}", dir.join("platform").display()))
            .args(extra)
            .env("METER_HARNESS_ROOT", bench_root().public().to_hex())
            .env(
                "METER_LOG",
                std::env::var("METER_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .envs(env.iter().copied())
            .stderr(Stdio::inherit())
            .spawn()?;
        let started = Instant::now();
        while !ready.exists() {
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(20),
                "meterd not ready"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(Machine { dir, child })
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("run/meterd.sock")
    }

    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Trusts the bench's vendor on a daemon and installs the bench's licence there.
async fn install_licence(
    machine: &Machine,
    certificate: &[u8],
    licence_json: &str,
) -> anyhow::Result<()> {
    request(
        &machine.socket(),
        LocalRequest::Trust {
            source_name: "bench.cert".into(),
            bytes: certificate.to_vec(),
        },
    )
    .await?;
    match request(
        &machine.socket(),
        LocalRequest::InstallLicence {
            source_name: "bench".into(),
            bytes: licence_json.as_bytes().to_vec(),
        },
    )
    .await?
    {
        LocalReply::Json(_) => Ok(()),
        other => anyhow::bail!("Licence not installed: {other:?}"),
    }
}

/// Starts a network server with the bench's licence; with the name `plain`, its usage log off.
/// Returns it, its listening address and its certificate pin (hex).
async fn start_server(
    work: &Path,
    name: &str,
    certificate: &[u8],
    licence: &meter_core::licence::SignedLicence,
) -> anyhow::Result<(Machine, String, String)> {
    let mut args: Vec<String> = vec![
        "--server".into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--max-connections".into(),
        (IDLE + 1000).to_string(),
    ];
    if name == "plain" {
        args.push("--no-usage-log".into());
    }
    let server = Machine::start(work.join(name), name, "127.0.0.1", &args)?;
    install_licence(&server, certificate, &licence.to_json()).await?;
    let status: serde_json::Value = match request(&server.socket(), LocalRequest::Status).await? {
        LocalReply::Json(text) => serde_json::from_str(&text)?,
        other => anyhow::bail!("{other:?}"),
    };
    let addr = status["server"]["listen"]
        .as_str()
        .context("no listen")?
        .to_owned();
    let pin = status["server"]["cert_sha256"]
        .as_str()
        .context("no pin")?
        .to_owned();
    Ok((server, addr, pin))
}

async fn request(socket: &Path, request: LocalRequest) -> anyhow::Result<LocalReply> {
    Ok(LocalClient::connect(socket)
        .await?
        .request(&request)
        .await?)
}

/// CPU time (user + system) used so far by a process (`None` = this one), from /proc.
fn cpu_time(pid: Option<u32>) -> Duration {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/stat"),
        None => "/proc/self/stat".to_owned(),
    };
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    // Fields after the command name (which may hold spaces): state is field 3, utime 14, stime 15.
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<u64> = after
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|f| f.parse().ok())
        .collect();
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Duration::from_secs_f64(fields.iter().sum::<u64>() as f64 / ticks)
}

/// CPU used so far by the daemons under test and by this load generator.
#[derive(Clone, Copy)]
struct CpuSnapshot {
    daemons: Duration,
    load: Duration,
}

impl CpuSnapshot {
    fn take(daemons: &[u32]) -> Self {
        CpuSnapshot {
            daemons: daemons.iter().map(|pid| cpu_time(Some(*pid))).sum(),
            load: cpu_time(None),
        }
    }
}

/// Load of the machine (1-minute average from /proc/loadavg), to tell how shared the cores were.
fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index].as_secs_f64() * 1000.0
}

fn summary(
    clients: usize,
    elapsed: Duration,
    mut latencies: Vec<Duration>,
    cpu: (CpuSnapshot, CpuSnapshot),
    load_before: f64,
) -> serde_json::Value {
    latencies.sort();
    let pairs = latencies.len();
    let per_pair = |spent: Duration| spent.as_secs_f64() * 1e6 / pairs.max(1) as f64;
    json!({
        "clients": clients,
        "pairs": pairs,
        "seconds": elapsed.as_secs_f64(),
        "pairs_per_second": pairs as f64 / elapsed.as_secs_f64(),
        "p50_ms": percentile(&latencies, 0.5),
        "p99_ms": percentile(&latencies, 0.99),
        // CPU per pair holds up better than pairs/s when other work shares the cores.
        "daemon_cpu_us_per_pair": per_pair(cpu.1.daemons.saturating_sub(cpu.0.daemons)),
        "load_generator_cpu_us_per_pair": per_pair(cpu.1.load.saturating_sub(cpu.0.load)),
        "load_average_before": load_before,
    })
}

fn claim(client_handle: u64, code: u32, machine: &str) -> Claim {
    Claim {
        client_handle,
        product: ProductKey { firm: 10, code },
        station: StationId {
            machine: machine.to_owned(),
            session: None,
        },
        session: WireSession::Console,
        role: MachineRole::Workstation,
        guest: false,
        user: None,
    }
}

type Link = tokio_util::codec::Framed<
    tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    tokio_util::codec::LengthDelimitedCodec,
>;

/// The key every benchmark station authenticates with (one key may present many runtime ids).
fn bench_identity() -> &'static meterd::tls::Identity {
    static IDENTITY: std::sync::OnceLock<meterd::tls::Identity> = std::sync::OnceLock::new();
    IDENTITY.get_or_init(|| meterd::tls::Identity::generate().expect("identity"))
}

async fn link(addr: &str, pin: [u8; 32], runtime: &str) -> anyhow::Result<Link> {
    let stream = meterd::remote::connect(addr, pin, bench_identity(), None).await?;
    let mut framed = meterd::frame::framed(stream);
    meterd::frame::send(
        &mut framed,
        &ToServer::Hello {
            runtime: runtime.to_owned(),
            machine: runtime.to_owned(),
            claims: vec![],
        },
    )
    .await?;
    let _welcome: FromServer = meterd::frame::recv(&mut framed).await?;
    Ok(framed)
}

async fn server_protocol_level(
    addr: &str,
    pin: [u8; 32],
    clients: usize,
    daemons: &[u32],
) -> anyhow::Result<serde_json::Value> {
    let load_before = load_average();
    let cpu_before = CpuSnapshot::take(daemons);
    let deadline = Instant::now() + Duration::from_secs_f64(SECONDS_PER_LEVEL);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let addr = addr.to_owned();
        tasks.push(tokio::spawn(async move {
            let runtime = format!("bench-{clients}-{c}");
            let mut framed = link(&addr, pin, &runtime).await?;
            let mut latencies = Vec::new();
            let mut request = 0u64;
            while Instant::now() < deadline {
                let t = Instant::now();
                request += 1;
                meterd::frame::send(
                    &mut framed,
                    &ToServer::Access {
                        request,
                        claim: claim(request, 1, &runtime),
                    },
                )
                .await?;
                let handle = match meterd::frame::recv::<FromServer, _>(&mut framed).await? {
                    FromServer::Granted { handle, .. } => handle,
                    other => anyhow::bail!("Not granted: {other:?}"),
                };
                request += 1;
                meterd::frame::send(&mut framed, &ToServer::Release { request, handle }).await?;
                let _released: FromServer = meterd::frame::recv(&mut framed).await?;
                latencies.push(t.elapsed());
            }
            Ok::<_, anyhow::Error>(latencies)
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await??);
    }
    let elapsed = started.elapsed();
    let cpu = (cpu_before, CpuSnapshot::take(daemons));
    Ok(summary(clients, elapsed, all, cpu, load_before))
}

async fn end_to_end_level(
    socket: &Path,
    clients: usize,
    daemons: &[u32],
) -> anyhow::Result<serde_json::Value> {
    let load_before = load_average();
    let cpu_before = CpuSnapshot::take(daemons);
    let deadline = Instant::now() + Duration::from_secs_f64(SECONDS_PER_LEVEL);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let socket = socket.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut client = LocalClient::connect(&socket).await?;
            let mut latencies = Vec::new();
            while Instant::now() < deadline {
                let t = Instant::now();
                let handle = match client
                    .request(&LocalRequest::Access {
                        firm: Some(10),
                        product: 1,
                    })
                    .await?
                {
                    LocalReply::Granted { handle, .. } => handle,
                    other => anyhow::bail!("Not granted: {other:?}"),
                };
                client.request(&LocalRequest::Release { handle }).await?;
                latencies.push(t.elapsed());
            }
            Ok::<_, anyhow::Error>(latencies)
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await??);
    }
    let elapsed = started.elapsed();
    let cpu = (cpu_before, CpuSnapshot::take(daemons));
    Ok(summary(clients, elapsed, all, cpu, load_before))
}

async fn kill_release_delays(machine: &Machine, rounds: usize) -> anyhow::Result<Vec<Duration>> {
    let mut delays = Vec::new();
    for _ in 0..rounds {
        let mut holder = Command::new(std::env::current_exe()?)
            .args(["__hold", machine.socket().to_str().unwrap(), "2"])
            .stdout(Stdio::piped())
            .spawn()?;
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(holder.stdout.take().unwrap()),
            &mut line,
        )?;
        anyhow::ensure!(line.trim() == "true", "holder not granted");
        let mut probe = LocalClient::connect(&machine.socket()).await?;
        let killed = Instant::now();
        holder.kill()?;
        loop {
            match probe
                .request(&LocalRequest::Access {
                    firm: Some(10),
                    product: 2,
                })
                .await?
            {
                LocalReply::Granted { handle, .. } => {
                    delays.push(killed.elapsed());
                    probe.request(&LocalRequest::Release { handle }).await?;
                    break;
                }
                _ => anyhow::ensure!(killed.elapsed() < Duration::from_secs(5), "never released"),
            }
        }
        holder.wait()?;
    }
    delays.sort();
    Ok(delays)
}

async fn bench() -> anyhow::Result<()> {
    // `--server-protocol-only`: just the server protocol levels, printed, no report (for profiling).
    let server_protocol_only = std::env::args().any(|a| a == "--server-protocol-only");
    let work = tempfile::tempdir()?;
    let mut entropy = [[0u8; 32]; 3];
    for e in &mut entropy {
        getrandom::fill(e).map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let key = VendorKey::from_seeds(entropy[0], entropy[1]);
    let policy = ProductPolicy::from_yaml(
        "firm: 10\nfirm-name: bench\nproducts:\n  - { code: 1, name: pairs, quantity: 100000, counting: user-limit }\n  - { code: 2, name: crash, quantity: 1, counting: user-limit }\n  - { code: 3, name: held, quantity: 20000, counting: user-limit }\n",
    )?;
    let licence = key.sign_licence(LicenceBody::unbound(&policy, 0, entropy[2]));
    // The bench's world root certifies its vendor; its daemons trust it (METER_HARNESS_ROOT).
    let certificate = bench_root()
        .certify(10, key.public(), 0)
        .to_json()
        .into_bytes();

    if std::env::args().any(|a| a == "--owner-check") {
        return owner_check::run(work.path(), &certificate, &licence.to_json()).await;
    }
    if std::env::args().any(|a| a == "--triad") {
        return triad::run(work.path(), &certificate, &licence).await;
    }
    if std::env::args().any(|a| a == "--rules-log") {
        return rules_log::run(work.path(), &certificate, &licence.to_json()).await;
    }

    // The server as shipped (usage log on) serves every part of the bench; a second one with
    // the usage log off gives the seat-counting protocol alone (the redis peer's figure).
    let (server, addr, pin_hex) =
        start_server(work.path(), "server", &certificate, &licence).await?;
    let pin = meterd::tls::parse_pin(&pin_hex)?;
    let (plain, plain_addr, plain_pin) =
        start_server(work.path(), "plain", &certificate, &licence).await?;
    let plain_pin = meterd::tls::parse_pin(&plain_pin)?;

    let mut server_protocol = Vec::new();
    if server_protocol_only {
        // `--levels 64,64,64`: other client counts (repeat a level to see the spread).
        let args: Vec<String> = std::env::args().collect();
        let levels: Vec<usize> = match args.iter().position(|a| a == "--levels") {
            Some(at) => args
                .get(at + 1)
                .context("--levels needs a list")?
                .split(',')
                .map(str::parse)
                .collect::<Result<_, _>>()?,
            None => LEVELS.to_vec(),
        };
        for clients in levels {
            let result =
                server_protocol_level(&plain_addr, plain_pin, clients, &[plain.child.id()]).await?;
            println!("server protocol: {result}");
            let result = server_protocol_level(&addr, pin, clients, &[server.child.id()]).await?;
            println!("server protocol, usage log: {result}");
        }
        return Ok(());
    }
    let mut server_protocol_usage_log = Vec::new();
    for clients in LEVELS {
        let result =
            server_protocol_level(&plain_addr, plain_pin, clients, &[plain.child.id()]).await?;
        eprintln!("server protocol: {result}");
        server_protocol.push(result);
        let result = server_protocol_level(&addr, pin, clients, &[server.child.id()]).await?;
        eprintln!("server protocol, usage log: {result}");
        server_protocol_usage_log.push(result);
    }
    drop(plain);

    let client = Machine::start(
        work.path().join("client"),
        "client",
        "127.0.3.1",
        &[
            "--remote".into(),
            addr.clone(),
            "--pin".into(),
            pin_hex.clone(),
        ],
    )?;
    // Wait for the link.
    let linked = Instant::now();
    loop {
        if let LocalReply::Json(text) = request(&client.socket(), LocalRequest::Status).await? {
            let s: serde_json::Value = serde_json::from_str(&text)?;
            if s["containers"]
                .as_array()
                .is_some_and(|c| c.iter().any(|c| c["state"] == "valid"))
            {
                break;
            }
        }
        anyhow::ensure!(
            linked.elapsed() < Duration::from_secs(10),
            "client never linked"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut end_to_end = Vec::new();
    for clients in LEVELS {
        let daemons = [server.child.id(), client.child.id()];
        let result = end_to_end_level(&client.socket(), clients, &daemons).await?;
        eprintln!("end to end: {result}");
        end_to_end.push(result);
    }

    let local_delays = kill_release_delays(&server, 20).await?;
    let remote_delays = kill_release_delays(&client, 20).await?;
    eprintln!(
        "kill -9 release: local p50 {:?} max {:?}; via server p50 {:?} max {:?}",
        local_delays[10], local_delays[19], remote_delays[10], remote_delays[19]
    );

    // Memory for held licences: client runtimes hold HELD grants on the server, as many each
    // as the server allows one station.
    let before = server.rss_kib();
    let per_station = meterd::remote_stations::MAX_GRANTS_PER_STATION as usize;
    let mut links = Vec::new();
    for station in 0..HELD.div_ceil(per_station) {
        let name = format!("bench-held-{station}");
        let mut framed = link(&addr, pin, &name).await?;
        let count = per_station.min(HELD - station * per_station) as u64;
        for i in 0..count {
            meterd::frame::send(
                &mut framed,
                &ToServer::Access {
                    request: i,
                    claim: claim(i, 3, &name),
                },
            )
            .await?;
            match meterd::frame::recv::<FromServer, _>(&mut framed).await? {
                FromServer::Granted { .. } => {}
                other => anyhow::bail!("Held access {i} not granted: {other:?}"),
            }
        }
        links.push(framed);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after = server.rss_kib();
    let per_licence = (after.saturating_sub(before)) as f64 * 1024.0 / HELD as f64;
    eprintln!("RSS {before} KiB -> {after} KiB for {HELD} held: {per_licence:.0} bytes each");
    drop(links);

    let idle = idle_stations(&addr, pin, &server).await?;
    eprintln!("idle stations: {idle}");
    let outage = revoke_delays(work.path(), &certificate, &licence.to_json()).await?;
    eprintln!("revoke after outage: {outage}");

    let ms = |d: &Duration| d.as_secs_f64() * 1000.0;
    let report = json!({
        "machine": {
            "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "note": "cores shared with other work: see load_average_before; daemon CPU per pair is the steadier figure",
        },
        "server_protocol": server_protocol,
        "server_protocol_note": "server_protocol: the usage log off (--no-usage-log), seats only; server_protocol_usage_log: as shipped, every grant and release logged and synced before its answer",
        "server_protocol_usage_log": server_protocol_usage_log,
        "end_to_end": end_to_end,
        "release_after_kill_ms": {
            "local": {"p50": ms(&local_delays[10]), "max": ms(&local_delays[19]), "rounds": local_delays.len()},
            "via_server": {"p50": ms(&remote_delays[10]), "max": ms(&remote_delays[19]), "rounds": remote_delays.len()},
        },
        "held_licences": {"count": HELD, "rss_before_kib": before, "rss_after_kib": after, "bytes_per_licence": per_licence},
        "idle_stations": idle,
        "revoke_after_outage": outage,
        "targets": {"pairs_per_second_at_64": 20000, "p99_ms": 2.0, "release_after_kill_ms": 50, "bytes_per_licence": 1024},
    });
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../reports/bench/server.json");
    std::fs::create_dir_all(out.parent().unwrap())?;
    std::fs::write(&out, serde_json::to_string_pretty(&report)?)?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

/// Makes room for `wanted` descriptors in this process (within the hard limit).
fn raise_descriptor_limit(wanted: u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write one rlimit we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < wanted {
            limit.rlim_cur = wanted.min(limit.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// The cost of idle stations: IDLE authenticated stations linked from 64 loopback addresses,
/// each sending its keepalives (a third of the 10 s window) from the moment it is linked; once
/// all are linked, the server's memory per station and its CPU over IDLE_SECONDS.
async fn idle_stations(
    addr: &str,
    pin: [u8; 32],
    server: &Machine,
) -> anyhow::Result<serde_json::Value> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    raise_descriptor_limit(IDLE as u64 + 1024);
    let target: std::net::SocketAddr = addr.parse()?;
    let before = server.rss_kib();
    let linking = Instant::now();
    // Handshakes 64 at a time, so none misses the server's hello deadline.
    let handshakes = Arc::new(tokio::sync::Semaphore::new(64));
    let linked = Arc::new(AtomicUsize::new(0));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let tasks: Vec<_> = (0..IDLE)
        .map(|i| {
            let handshakes = Arc::clone(&handshakes);
            let linked = Arc::clone(&linked);
            let mut stop = stop_rx.clone();
            tokio::spawn(async move {
                let permit = handshakes.acquire_owned().await?;
                let source = std::net::Ipv4Addr::new(127, 0, 5, (i % 64 + 1) as u8);
                let socket = tokio::net::TcpSocket::new_v4()?;
                socket.bind(std::net::SocketAddr::from((source, 0)))?;
                let tcp = socket.connect(target).await?;
                let tls = meterd::remote::secure(tcp, pin, bench_identity()).await?;
                let mut framed = meterd::frame::framed(tls);
                let name = format!("idle-{i}");
                meterd::frame::send(
                    &mut framed,
                    &ToServer::Hello {
                        runtime: name.clone(),
                        machine: name,
                        claims: vec![],
                    },
                )
                .await?;
                match meterd::frame::recv::<FromServer, _>(&mut framed).await? {
                    FromServer::Welcome { .. } => {}
                    other => anyhow::bail!("Idle station {i} not welcomed: {other:?}"),
                }
                drop(permit);
                linked.fetch_add(1, Ordering::Relaxed);
                let interval = Duration::from_millis(3333);
                let mut acks = 0u64;
                let mut seq = 0u64;
                loop {
                    tokio::select! {
                        _ = stop.wait_for(|s| *s) => break,
                        () = tokio::time::sleep(interval) => {}
                    }
                    seq += 1;
                    meterd::frame::send(&mut framed, &ToServer::Keepalive { seq }).await?;
                    match meterd::frame::recv::<FromServer, _>(&mut framed).await? {
                        FromServer::KeepaliveAck { .. } => acks += 1,
                        other => anyhow::bail!("Not an ack: {other:?}"),
                    }
                }
                Ok::<_, anyhow::Error>((acks, framed))
            })
        })
        .collect();
    while linked.load(Ordering::Relaxed) < IDLE {
        anyhow::ensure!(
            linking.elapsed() < Duration::from_secs(300),
            "only {} of {IDLE} idle stations linked",
            linked.load(Ordering::Relaxed)
        );
        if tasks.iter().any(|t| t.is_finished()) {
            // A station failed: its error is reported below.
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let linked_s = linking.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = server.rss_kib();
    let cpu_before = CpuSnapshot::take(&[server.child.id()]);
    let watched = Instant::now();
    tokio::time::sleep(Duration::from_secs(IDLE_SECONDS)).await;
    let seconds = watched.elapsed().as_secs_f64();
    let cpu_after = CpuSnapshot::take(&[server.child.id()]);
    stop_tx.send_replace(true);
    let mut acks = 0;
    let mut kept = Vec::with_capacity(IDLE);
    for task in tasks {
        let (n, framed) = task.await??;
        acks += n;
        kept.push(framed);
    }
    drop(kept);
    let daemon_cpu = cpu_after.daemons.saturating_sub(cpu_before.daemons);
    Ok(json!({
        "stations": IDLE,
        "linked_in_s": linked_s,
        "watched_s": seconds,
        "keepalives_answered": acks,
        "rss_before_kib": before,
        "rss_after_kib": after,
        "bytes_per_station": (after.saturating_sub(before)) as f64 * 1024.0 / IDLE as f64,
        "daemon_cpu_share_of_one_core": daemon_cpu.as_secs_f64() / seconds,
        "daemon_cpu_us_per_station_per_s": daemon_cpu.as_secs_f64() * 1e6 / seconds / IDLE as f64,
    }))
}

/// A TCP relay that a test can cut: while cut it forwards nothing (and loses nothing), like a
/// pulled cable.
async fn cuttable_relay(
    target: std::net::SocketAddr,
) -> anyhow::Result<(std::net::SocketAddr, tokio::sync::watch::Sender<bool>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let local = listener.local_addr()?;
    let (cut_tx, cut_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            let Ok(outbound) = tokio::net::TcpStream::connect(target).await else {
                continue;
            };
            let (ri, wi) = inbound.into_split();
            let (ro, wo) = outbound.into_split();
            tokio::spawn(copy_unless_cut(ri, wo, cut_rx.clone()));
            tokio::spawn(copy_unless_cut(ro, wi, cut_rx.clone()));
        }
    });
    Ok((local, cut_tx))
}

async fn copy_unless_cut(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut cut: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if cut.wait_for(|c| !c).await.is_err() {
            return;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if cut.wait_for(|c| !c).await.is_err() || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// How long after an outage begins the cut-off holder is told (`server-unreachable`) and the
/// server frees the seat, with a 2 s window: OUTAGES rounds, each with the relay cut until both
/// happened, then healed.
async fn revoke_delays(
    work: &Path,
    vendor_certificate: &[u8],
    licence_json: &str,
) -> anyhow::Result<serde_json::Value> {
    let server = Machine::start(
        work.join("outage-server"),
        "outage-server",
        "127.0.0.1",
        &[
            "--server".into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--keepalive".into(),
            OUTAGE_WINDOW_S.to_string(),
        ],
    )?;
    request(
        &server.socket(),
        LocalRequest::Trust {
            source_name: "bench.cert".into(),
            bytes: vendor_certificate.to_vec(),
        },
    )
    .await?;
    request(
        &server.socket(),
        LocalRequest::InstallLicence {
            source_name: "bench".into(),
            bytes: licence_json.as_bytes().to_vec(),
        },
    )
    .await?;
    let status: serde_json::Value = match request(&server.socket(), LocalRequest::Status).await? {
        LocalReply::Json(text) => serde_json::from_str(&text)?,
        other => anyhow::bail!("{other:?}"),
    };
    let listen: std::net::SocketAddr = status["server"]["listen"]
        .as_str()
        .context("no listen")?
        .parse()?;
    let pin = status["server"]["cert_sha256"]
        .as_str()
        .context("no pin")?
        .to_owned();
    let (relay, cut) = cuttable_relay(listen).await?;
    let client = Machine::start(
        work.join("outage-client"),
        "outage-client",
        "127.0.3.9",
        &["--remote".into(), relay.to_string(), "--pin".into(), pin],
    )?;
    let (mut told, mut freed) = (Vec::new(), Vec::new());
    for _ in 0..OUTAGES {
        let mut holder = LocalClient::connect(&client.socket()).await?;
        loop {
            // This connection took the licence, so the runtime's revocation comes on it.
            match holder
                .request(&LocalRequest::Access {
                    firm: Some(10),
                    product: 2,
                })
                .await?
            {
                LocalReply::Granted { .. } => break,
                // The link may still be coming up (after the last round's outage).
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        let started = Instant::now();
        cut.send_replace(true);
        let mut told_at = None;
        let mut freed_at = None;
        while told_at.is_none() || freed_at.is_none() {
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(30),
                "no revocation after an outage"
            );
            if told_at.is_none()
                && let Ok(Ok(LocalReply::Revoked { .. })) =
                    tokio::time::timeout(Duration::from_millis(5), holder.next_event()).await
            {
                told_at = Some(started.elapsed());
            }
            if freed_at.is_none()
                && let LocalReply::Json(text) =
                    request(&server.socket(), LocalRequest::List).await?
                && serde_json::from_str::<serde_json::Value>(&text)?["allocations"]
                    .as_array()
                    .is_some_and(Vec::is_empty)
            {
                freed_at = Some(started.elapsed());
            }
        }
        cut.send_replace(false);
        told.push(told_at.unwrap_or_default());
        freed.push(freed_at.unwrap_or_default());
    }
    let ms = |d: &Duration| d.as_secs_f64() * 1000.0;
    let window = Duration::from_secs_f64(OUTAGE_WINDOW_S);
    let margin = meterd::remote::lease_margin(window);
    Ok(json!({
        "window_ms": ms(&window),
        "margin_ms": ms(&margin),
        "rounds": OUTAGES,
        "holder_told_ms": told.iter().map(ms).collect::<Vec<_>>(),
        "server_freed_ms": freed.iter().map(ms).collect::<Vec<_>>(),
        "holder_always_told_first": told.iter().zip(&freed).all(|(t, f)| t < f),
        "goal_ms": ms(&(window + margin)),
    }))
}
