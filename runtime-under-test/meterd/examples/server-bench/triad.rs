//! A triad of network servers against one server, in the same run: access+release pairs per
//! second through the triad's leader (each grant committed by two members, releases given back
//! with the next entry) as a ratio to a lone server without its usage log, and the failover time
//! from the leader killed (SIGKILL) to the first grant a new leader answers, over 20 rounds.
//! Writes reports/bench/triad-server.json.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use meter_core::licence::SignedLicence;
use meterd::protocol::{FromServer, LocalReply, LocalRequest, ToServer};
use meterd::triad_types::Member;
use serde_json::{Value, json};

use super::{Machine, claim, install_licence, link, request, server_protocol_level};

/// Client counts measured.
const LEVELS: [usize; 3] = [1, 16, 64];
/// Leaders killed for the failover time.
const FAILOVERS: usize = 20;

/// One member: its daemon (restarted after a kill), where it serves clients and its pin.
struct Member3 {
    machine: Option<Machine>,
    dir: PathBuf,
    args: Vec<String>,
    addr: String,
    pin: [u8; 32],
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn status(machine: &Machine, history: bool) -> anyhow::Result<Value> {
    match request(&machine.socket(), LocalRequest::TriadStatus { history }).await? {
        LocalReply::Json(text) => Ok(serde_json::from_str(&text)?),
        other => anyhow::bail!("{other:?}"),
    }
}

async fn server_status(machine: &Machine) -> anyhow::Result<Value> {
    match request(&machine.socket(), LocalRequest::Status).await? {
        LocalReply::Json(text) => Ok(serde_json::from_str(&text)?),
        other => anyhow::bail!("{other:?}"),
    }
}

/// The member that leads now, as the running members know; waits up to `within`.
async fn leader(members: &[Member3], within: Duration) -> anyhow::Result<usize> {
    let started = Instant::now();
    loop {
        for (i, member) in members.iter().enumerate() {
            if let Some(machine) = &member.machine
                && let Ok(answer) = status(machine, false).await
                && answer["leads"].as_bool() == Some(true)
            {
                return Ok(i);
            }
        }
        anyhow::ensure!(started.elapsed() < within, "no leader within {within:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// One access answered by whichever member grants it (the leader); how long it took.
async fn first_grant(members: &[Member3], runtime: &str, request: u64) -> Duration {
    let started = Instant::now();
    loop {
        for member in members.iter().filter(|m| m.machine.is_some()) {
            let granted = async {
                let mut framed = link(&member.addr, member.pin, runtime).await?;
                meterd::frame::send(
                    &mut framed,
                    &ToServer::Access {
                        request,
                        claim: claim(request, 1, runtime),
                    },
                )
                .await?;
                match meterd::frame::recv::<FromServer, _>(&mut framed).await? {
                    FromServer::Granted { .. } => Ok(()),
                    other => anyhow::bail!("{other:?}"),
                }
            };
            if tokio::time::timeout(Duration::from_secs(2), granted)
                .await
                .is_ok_and(|r| r.is_ok())
            {
                return started.elapsed();
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Runs the comparison and the failovers; writes reports/bench/triad-server.json.
pub async fn run(work: &Path, certificate: &[u8], licence: &SignedLicence) -> anyhow::Result<()> {
    let (plain, plain_addr, plain_pin) =
        super::start_server(work, "plain", certificate, licence).await?;
    let plain_pin = meterd::tls::parse_pin(&plain_pin)?;
    let mut members = Vec::new();
    let mut triad_addrs = Vec::new();
    for i in 1..=3 {
        let name = format!("member{i}");
        let dir = work.join(&name);
        let port = free_port()?;
        let args: Vec<String> = vec![
            "--server".into(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--no-usage-log".into(),
        ];
        let machine = Machine::start(dir.clone(), &name, "127.0.0.1", &args)?;
        install_licence(&machine, certificate, &licence.to_json()).await?;
        let answer = server_status(&machine).await?;
        let pin_hex = answer["server"]["cert_sha256"]
            .as_str()
            .context("no pin")?
            .to_owned();
        triad_addrs.push(Member {
            addr: format!("127.0.0.1:{}", free_port()?),
            pin: pin_hex.clone(),
        });
        members.push(Member3 {
            machine: Some(machine),
            dir,
            args,
            addr: format!("127.0.0.1:{port}"),
            pin: meterd::tls::parse_pin(&pin_hex)?,
        });
    }
    for member in &members {
        let machine = member.machine.as_ref().context("running")?;
        let joined = request(
            &machine.socket(),
            LocalRequest::TriadJoin {
                members: triad_addrs.clone(),
            },
        )
        .await?;
        anyhow::ensure!(
            matches!(joined, LocalReply::Json(_)),
            "not joined: {joined:?}"
        );
    }
    let lead = leader(&members, Duration::from_secs(20)).await?;
    eprintln!("triad led by member {}", lead + 1);

    let mut levels = Vec::new();
    for clients in LEVELS {
        let single =
            server_protocol_level(&plain_addr, plain_pin, clients, &[plain.child.id()]).await?;
        let lead = leader(&members, Duration::from_secs(20)).await?;
        let daemons: Vec<u32> = members
            .iter()
            .filter_map(|m| m.machine.as_ref().map(|m| m.child.id()))
            .collect();
        let leader = &members[lead];
        let triad = server_protocol_level(&leader.addr, leader.pin, clients, &daemons).await?;
        let ratio = triad["pairs_per_second"].as_f64().unwrap_or(0.0)
            / single["pairs_per_second"].as_f64().unwrap_or(1.0).max(1e-9);
        eprintln!(
            "{clients} clients: triad {:.0} pairs/s, one server {:.0}: ratio {ratio:.2}",
            triad["pairs_per_second"].as_f64().unwrap_or(0.0),
            single["pairs_per_second"].as_f64().unwrap_or(0.0)
        );
        levels.push(
            json!({"clients": clients, "triad": triad, "single_server": single, "ratio": ratio}),
        );
    }

    let mut failovers = Vec::new();
    for round in 0..FAILOVERS {
        let lead = leader(&members, Duration::from_secs(20)).await?;
        // Killed as by SIGKILL: no goodbye to anyone.
        drop(members[lead].machine.take());
        let took = first_grant(&members, &format!("failover-{round}"), 1).await;
        eprintln!(
            "failover {round}: member {} killed, granted after {took:?}",
            lead + 1
        );
        failovers.push(took);
        let lead_killed = lead;
        let member = &mut members[lead];
        let _ = std::fs::remove_file(member.dir.join("state/meterd.ready"));
        let name = format!("member{}", lead + 1);
        member.machine = Some(Machine::start(
            member.dir.clone(),
            &name,
            "127.0.0.1",
            &member.args,
        )?);
        // Back in the triad before the next round: it knows the leader and has applied what
        // the leader had (a member still catching up cannot be elected).
        let lead = leader(&members, Duration::from_secs(20)).await?;
        let leader_applied = status(members[lead].machine.as_ref().context("running")?, false)
            .await?["applied"]
            .as_u64();
        let member = &members[lead_killed];
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(20) {
            let machine = member.machine.as_ref().context("running")?;
            if status(machine, false).await.is_ok_and(|s| {
                s["leader"].as_u64().is_some() && s["applied"].as_u64() >= leader_applied
            }) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    failovers.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let report = json!({
        "what": "access+release pairs through a triad's leader (each grant committed on two members, fsynced; concurrent commands batched into one entry; releases given back with the next entry) and through one server without its usage log, same run, same load generator; failover: leader killed (SIGKILL) to the first grant a new leader answers, every member caught up before each round",
        "machine": {"cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)},
        "levels": levels,
        "failover_ms": {
            "p50": ms(failovers[failovers.len() / 2]),
            "max": ms(failovers[failovers.len() - 1]),
            "rounds": failovers.len(),
        },
        "targets": {"failover_ms": 2000, "ratio": 0.5},
    });
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../reports/bench/triad-server.json");
    std::fs::create_dir_all(out.parent().context("no parent")?)?;
    std::fs::write(&out, serde_json::to_string_pretty(&report)?)?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
