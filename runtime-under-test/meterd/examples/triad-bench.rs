//! Benchmark of a licence server triad (three members on loopback, mutual TLS, redb storage
//! with a synced commit per entry, concurrent commands batched into one entry):
//! - failover: the leader is stopped; measured from then to the first grant the new leader
//!   answers (a client retrying every 10 ms), over 20 rounds (the stopped member restarts and
//!   catches up between rounds);
//! - throughput: grant+release pairs per second at 1, 16 and 64 concurrent clients through the
//!   triad's leader, and the ratio to a one-member "triad" (the same code, no replication) in
//!   the same run.
//!
//! Run: `cargo run --release -p meterd --example triad-bench` (writes reports/bench/triad.json).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use meter_core::seat_ledger::{LedgerCommand, LedgerOutcome};
use meterd::triad::{TriadError, TriadTiming};
use meterd::triad_local::LoopbackTriad;

const ROUNDS: usize = 20;
const WAIT: Duration = Duration::from_secs(30);
const RUN_FOR: Duration = Duration::from_secs(3);

fn grant(request: u64, holder: &str) -> LedgerCommand {
    LedgerCommand::Grant {
        request,
        product: 1001,
        quantity: 1_000_000,
        holder: holder.into(),
        lease_ms: 60_000,
    }
}

fn stats(values: &mut [f64]) -> serde_json::Value {
    values.sort_by(f64::total_cmp);
    serde_json::json!({
        "p50_ms": values.get(values.len() / 2),
        "max_ms": values.last(),
        "runs_ms": values,
    })
}

/// Milliseconds from stopping the leader to the first grant its successor answers, per round.
async fn failover(dir: &Path, timing: TriadTiming) -> anyhow::Result<Vec<f64>> {
    let mut triad = LoopbackTriad::start(dir.to_owned(), 3, timing).await?;
    let mut times = Vec::new();
    for round in 0..ROUNDS {
        let leader = triad.leader(WAIT).await?;
        let stopped = Instant::now();
        triad.stop_member(leader).await;
        let request = round as u64;
        loop {
            let mut answered = false;
            for member in triad.running().values() {
                match member.submit(grant(request, "bench")).await {
                    Ok(LedgerOutcome::Granted { .. }) => {
                        answered = true;
                        break;
                    }
                    Ok(other) => anyhow::bail!("round {round}: answered {other:?}"),
                    Err(TriadError::NotLeader { .. } | TriadError::NoQuorum(_)) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            if answered {
                break;
            }
            anyhow::ensure!(stopped.elapsed() < WAIT, "round {round}: no new leader");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        times.push(stopped.elapsed().as_secs_f64() * 1000.0);
        triad.start_member(leader).await?;
        triad.settle(WAIT).await?;
    }
    triad.stop().await;
    Ok(times)
}

/// Grant+release pairs per second through the leader of `size` members with `clients`.
async fn pairs_per_second(
    dir: &Path,
    size: u64,
    clients: usize,
    timing: TriadTiming,
) -> anyhow::Result<f64> {
    let triad = Arc::new(LoopbackTriad::start(dir.to_owned(), size, timing).await?);
    let leader = triad.leader(WAIT).await?;
    let pairs = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for client in 0..clients {
        let triad = Arc::clone(&triad);
        let pairs = Arc::clone(&pairs);
        tasks.push(tokio::spawn(async move {
            let holder = format!("client-{client}");
            let member = triad.member(leader).expect("the leader runs");
            let mut request = 0;
            while started.elapsed() < RUN_FOR {
                request += 1;
                let LedgerOutcome::Granted { lease, .. } =
                    member.submit(grant(request, &holder)).await?
                else {
                    anyhow::bail!("no seat");
                };
                member
                    .submit(LedgerCommand::Release {
                        lease,
                        holder: holder.clone(),
                    })
                    .await?;
                pairs.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let rate = pairs.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
    if let Ok(triad) = Arc::try_unwrap(triad) {
        triad.stop().await;
    }
    Ok(rate)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let timing = TriadTiming::default();
    let work = tempfile::tempdir()?;
    let mut failover_ms = failover(&work.path().join("failover"), timing).await?;
    let mut throughput = serde_json::Map::new();
    for clients in [1, 16, 64] {
        let triad = pairs_per_second(
            &work.path().join(format!("triad-{clients}")),
            3,
            clients,
            timing,
        )
        .await?;
        let single = pairs_per_second(
            &work.path().join(format!("single-{clients}")),
            1,
            clients,
            timing,
        )
        .await?;
        throughput.insert(
            clients.to_string(),
            serde_json::json!({
                "triad_pairs_per_s": triad.round(),
                "single_member_pairs_per_s": single.round(),
                "ratio": (triad / single * 100.0).round() / 100.0,
            }),
        );
    }
    let report = serde_json::json!({
        "timing": {
            "heartbeat_ms": timing.heartbeat_ms,
            "election_min_ms": timing.election_min_ms,
            "election_max_ms": timing.election_max_ms,
        },
        "failover_leader_stopped_to_first_grant": stats(&mut failover_ms),
        "failover_goal": "p50 and max under 2000 ms",
        "grant_release_pairs": throughput,
        "throughput_goal": "ratio at least 0.5 (peer: one member, no replication)",
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
    });
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../reports/bench");
    std::fs::create_dir_all(&out)?;
    let text = serde_json::to_string_pretty(&report)?;
    std::fs::write(out.join("triad.json"), &text)?;
    println!("{text}");
    Ok(())
}
