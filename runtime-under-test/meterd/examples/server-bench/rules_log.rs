//! The cost of access rules and the usage log: local access+release pairs on one daemon with 50
//! rules in force and its usage log on, and one with neither, driven in turns at each level; then
//! a usage report over a log of 1,000,000 records, asked of a daemon end to end, and the bytes a
//! record takes.

use std::path::Path;
use std::time::Instant;

use meter_core::allocation::ProductKey;
use meter_core::usage::{EncodedEvent, UsageEvent, UsageKind};
use meterd::protocol::{LocalReply, LocalRequest};
use meterd::store::{Change, Store};
use serde_json::{Value, json};

use super::{Machine, end_to_end_level, install_licence, request};

/// Client counts measured.
const LEVELS: [usize; 2] = [16, 64];
/// Turns per level and daemon (each turn starts with the next daemon, so none is always first).
const TURNS: usize = 8;
/// Records in the log the report reads.
const RECORDS: u64 = 1_000_000;
/// Records written per commit while filling it.
const FILL_BATCH: u64 = 10_000;

/// Fifty rules that every access of the bench's user (root) must read past: exclusions of
/// other users and subnets, caps and reservations of groups it is not in.
fn fifty_rules() -> String {
    let mut text = String::from("groups:\n  users:\n");
    for g in 0..10 {
        let members: Vec<String> = (0..5).map(|m| format!("g{g}u{m}")).collect();
        text.push_str(&format!("    team{g}: [{}]\n", members.join(", ")));
    }
    text.push_str("rules:\n");
    for u in 0..20 {
        text.push_str(&format!(
            "  - {{ product: 1, who: {{ user: banned{u} }}, action: deny }}\n"
        ));
    }
    for s in 0..10 {
        text.push_str(&format!(
            "  - {{ who: {{ subnet: 10.{s}.0.0/16 }}, action: deny }}\n"
        ));
    }
    for g in 0..10 {
        text.push_str(&format!(
            "  - {{ product: 1, who: {{ group: team{g} }}, max: 50 }}\n"
        ));
    }
    for g in 0..10 {
        text.push_str(&format!(
            "  - {{ product: 1, who: {{ group: team{g} }}, reserve: 2 }}\n"
        ));
    }
    text
}

/// Puts the fifty rules in force on a daemon.
async fn apply_fifty_rules(machine: &Machine) -> anyhow::Result<()> {
    match request(
        &machine.socket(),
        LocalRequest::RulesApply {
            source_name: "fifty-rules.yaml".into(),
            bytes: fifty_rules().into_bytes(),
        },
    )
    .await?
    {
        LocalReply::Json(answer) => anyhow::ensure!(answer.contains("\"rules\":50"), "{answer}"),
        other => anyhow::bail!("Rules refused: {other:?}"),
    }
    Ok(())
}

/// Measures and writes reports/bench/rules-log.json.
pub async fn run(work: &Path, certificate: &[u8], licence_json: &str) -> anyhow::Result<()> {
    let passwd = "root:x:0:0::/root:/bin/sh\n";
    // Four daemons: neither, rules only, log only, both.
    let setups: [(&str, bool, bool); 4] = [
        ("plain", false, false),
        ("rules", true, false),
        ("log", false, true),
        ("ruled", true, true),
    ];
    let mut machines = Vec::new();
    for (name, rules, log) in setups {
        std::fs::create_dir_all(work.join(name).join("platform"))?;
        std::fs::write(work.join(name).join("platform/passwd"), passwd)?;
        let extra: Vec<String> = if log {
            Vec::new()
        } else {
            vec!["--no-usage-log".into()]
        };
        let machine = Machine::start(work.join(name), name, "127.0.0.1", &extra)?;
        install_licence(&machine, certificate, licence_json).await?;
        if rules {
            apply_fifty_rules(&machine).await?;
        }
        machines.push(machine);
    }
    let mut levels = Vec::new();
    for clients in LEVELS {
        let mut results: Vec<Vec<Value>> = vec![Vec::new(); machines.len()];
        for turn in 0..TURNS {
            for i in (0..machines.len()).map(|k| (turn + k) % machines.len()) {
                let machine = &machines[i];
                results[i].push(
                    end_to_end_level(&machine.socket(), clients, &[machine.child.id()]).await?,
                );
            }
        }
        let rate = |i: usize| mean(&results[i], "pairs_per_second");
        let cpu = |i: usize| mean(&results[i], "daemon_cpu_us_per_pair");
        let level = json!({
            "clients": clients,
            "turns": TURNS,
            "plain_pairs_per_second": rate(0),
            "rules_only_pairs_per_second": rate(1),
            "log_only_pairs_per_second": rate(2),
            "rules_and_log_pairs_per_second": rate(3),
            "ratio": rate(3) / rate(0),
            "ratio_per_turn": turn_ratios(&results[3], &results[0]),
            "rules_only_ratio": rate(1) / rate(0),
            "log_only_ratio": rate(2) / rate(0),
            "plain_daemon_cpu_us_per_pair": cpu(0),
            "rules_only_daemon_cpu_us_per_pair": cpu(1),
            "log_only_daemon_cpu_us_per_pair": cpu(2),
            "rules_and_log_daemon_cpu_us_per_pair": cpu(3),
        });
        eprintln!("rules and log: {level}");
        levels.push(level);
    }
    let ruled = machines.pop().expect("four machines");
    let verified = match request(&ruled.socket(), LocalRequest::UsageVerify).await? {
        LocalReply::Json(text) => serde_json::from_str::<Value>(&text)?,
        other => anyhow::bail!("Verify failed: {other:?}"),
    };
    anyhow::ensure!(verified["intact"] == true, "log of the run: {verified}");
    drop((machines, ruled));

    let report = report_over_a_million(work, certificate, licence_json).await?;
    let document = json!({
        "what": "local access+release pairs per second on daemons with neither 50 access rules nor the usage log, rules only, the log only, and both (same build, driven in turns, each turn starting with the next daemon; ratio = both / neither, of the turns' means; ratio_per_turn: the median, lowest and highest of the turns' ratios); a usage report over 1,000,000 records asked of a daemon end to end; bytes per record",
        "machine": {"cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)},
        "levels": levels,
        "records_logged_in_pair_levels": verified["records"],
        "report": report,
    });
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../reports/bench/rules-log.json");
    std::fs::create_dir_all(out.parent().expect("a parent"))?;
    std::fs::write(&out, serde_json::to_string_pretty(&document)?)?;
    println!("{}", serde_json::to_string_pretty(&document)?);
    Ok(())
}

/// Fills a state with a log of [`RECORDS`] records (ten users, one product, grants and
/// releases with a denial every tenth event), starts a daemon on it and times its report.
async fn report_over_a_million(
    work: &Path,
    certificate: &[u8],
    licence_json: &str,
) -> anyhow::Result<Value> {
    let dir = work.join("million");
    std::fs::create_dir_all(dir.join("state"))?;
    let database = dir.join("state/meterd.redb");
    let filled = Instant::now();
    {
        let (store, _) = Store::open(&database)?;
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret).map_err(|e| anyhow::anyhow!("{e}"))?;
        store
            .commit(vec![Change::PutMeta(
                meterd::store::USAGE_KEY_KEY.into(),
                secret.to_vec(),
            )])
            .await?;
        store.start_usage_log(&secret);
        let start_ms = 1_790_000_000_000u64;
        let mut n = 0u64;
        while n < RECORDS {
            let batch: Vec<Change> = (n..(n + FILL_BATCH).min(RECORDS))
                .map(|i| Change::AppendUsage(EncodedEvent::of(&event(i, start_ms))))
                .collect();
            n += batch.len() as u64;
            store.commit(batch).await?;
        }
    }
    let fill_s = filled.elapsed().as_secs_f64();
    let db_bytes = std::fs::metadata(&database)?.len();
    let machine = Machine::start(dir, "million", "127.0.0.1", &[])?;
    install_licence(&machine, certificate, licence_json).await?;
    let mut times = Vec::new();
    let mut records = Value::Null;
    let mut answer_bytes = 0;
    for _ in 0..3 {
        let asked = Instant::now();
        let reply = request(
            &machine.socket(),
            LocalRequest::UsageReport {
                from_ms: None,
                to_ms: None,
            },
        )
        .await?;
        times.push(asked.elapsed().as_secs_f64());
        let LocalReply::Json(text) = reply else {
            anyhow::bail!("Report failed: {reply:?}");
        };
        answer_bytes = text.len();
        records = serde_json::from_str::<Value>(&text)?["records"].clone();
    }
    anyhow::ensure!(records == RECORDS, "report read {records} records");
    times.sort_by(f64::total_cmp);
    let stored_bytes = stored_record_bytes(work).await?;
    let result = json!({
        "records": RECORDS,
        "report_seconds_median": times[1],
        "report_seconds": times,
        "report_answer_bytes": answer_bytes,
        "fill_seconds": fill_s,
        "database_bytes_per_record": db_bytes as f64 / RECORDS as f64,
        "stored_bytes_per_record": stored_bytes,
    });
    eprintln!("usage report: {result}");
    Ok(result)
}

/// The mean stored size of a typical record (body and signature), sealed the same way.
async fn stored_record_bytes(work: &Path) -> anyhow::Result<f64> {
    let database = work.join("sizes.redb");
    let (store, _) = Store::open(&database)?;
    store.start_usage_log(&[7; 32]);
    let mut total = 0usize;
    let mut count = 0usize;
    let events = (0..1000).map(|i| Change::AppendUsage(EncodedEvent::of(&event(i, 0))));
    store.commit(events.collect()).await?;
    store.read_usage(|_, stored| {
        total += stored.len();
        count += 1;
    })?;
    Ok(total as f64 / count.max(1) as f64)
}

/// Event `i` of the filled log: user `i % 10` takes and gives back a seat; every tenth is a
/// denial.
fn event(i: u64, start_ms: u64) -> UsageEvent {
    let user = i % 10;
    let kind = match i % 10 {
        9 => UsageKind::Denial {
            reason: meter_core::reason::Reason::RuleMaxReached,
            rule: Some(3),
        },
        k if k % 2 == 0 => UsageKind::Grant,
        _ => UsageKind::Release,
    };
    UsageEvent {
        at_ms: start_ms + i * 1000,
        kind,
        product: ProductKey { firm: 10, code: 1 },
        handle: i / 2 + 1,
        user: Some(format!("user{user}")),
        machine: format!("ts{}", i % 3),
        session: Some(u32::try_from(user).unwrap_or(0) + 1),
        client_name: Some(format!("pc-{user}")),
        address: Some(format!("10.0.0.{user}")),
        in_use: u32::try_from(i % 7).unwrap_or(0),
        held_ms: (i % 2 == 1).then_some(1000),
    }
}

/// The mean of one figure over several level results.
/// Both daemons' rates turn by turn: the median, lowest and highest ratio.
fn turn_ratios(with: &[Value], without: &[Value]) -> Value {
    let mut ratios: Vec<f64> = with
        .iter()
        .zip(without)
        .filter_map(|(a, b)| {
            Some(a["pairs_per_second"].as_f64()? / b["pairs_per_second"].as_f64()?)
        })
        .collect();
    ratios.sort_by(f64::total_cmp);
    let median = match ratios.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => ratios[n / 2],
        n => (ratios[n / 2 - 1] + ratios[n / 2]) / 2.0,
    };
    json!({
        "median": median,
        "lowest": ratios.first(),
        "highest": ratios.last(),
    })
}

fn mean(results: &[Value], field: &str) -> f64 {
    let sum: f64 = results.iter().filter_map(|r| r[field].as_f64()).sum();
    sum / results.len().max(1) as f64
}
