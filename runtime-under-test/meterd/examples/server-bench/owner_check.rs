//! The cost of the owner check (only a grant's own user releases or watches it) on local
//! access+release pairs: one build runs two daemons side by side, one with the check and one
//! with it switched off (`METER_WEAKEN=holder-ownership`, so both pay the same for the weakened
//! build's switch), and drives them in turns at each level so drifting load hits both alike.

use std::path::Path;

use serde_json::{Value, json};

use super::{Machine, end_to_end_level, install_licence};

/// Client counts measured.
const LEVELS: [usize; 2] = [16, 64];
/// Turns per level and daemon.
const TURNS: usize = 3;

/// Measures both daemons and writes reports/bench/owner-check.json.
pub async fn run(work: &Path, certificate: &[u8], licence_json: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        cfg!(feature = "weakened"),
        "--owner-check compares against a daemon without the check: build with --features weakened"
    );
    let checked = Machine::start(work.join("checked"), "checked", "127.0.0.1", &[])?;
    let unchecked = Machine::start_with_env(
        work.join("unchecked"),
        "unchecked",
        "127.0.0.1",
        &[],
        &[("METER_WEAKEN", "holder-ownership")],
    )?;
    for machine in [&checked, &unchecked] {
        install_licence(machine, certificate, licence_json).await?;
    }
    let mut levels = Vec::new();
    for clients in LEVELS {
        let mut with = Vec::new();
        let mut without = Vec::new();
        for _ in 0..TURNS {
            with.push(end_to_end_level(&checked.socket(), clients, &[checked.child.id()]).await?);
            without.push(
                end_to_end_level(&unchecked.socket(), clients, &[unchecked.child.id()]).await?,
            );
        }
        let rate_with = mean(&with, "pairs_per_second");
        let rate_without = mean(&without, "pairs_per_second");
        let level = json!({
            "clients": clients,
            "turns": TURNS,
            "with_check_pairs_per_second": rate_with,
            "without_check_pairs_per_second": rate_without,
            "ratio": rate_with / rate_without,
            "with_check_daemon_cpu_us_per_pair": mean(&with, "daemon_cpu_us_per_pair"),
            "without_check_daemon_cpu_us_per_pair": mean(&without, "daemon_cpu_us_per_pair"),
        });
        eprintln!("owner check: {level}");
        levels.push(level);
    }
    let report = json!({
        "what": "local access+release pairs per second on one daemon with the owner check and one with it switched off (holder-ownership weakened), same build, driven in turns",
        "machine": {"cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)},
        "levels": levels,
    });
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../reports/bench/owner-check.json");
    std::fs::create_dir_all(out.parent().expect("a parent"))?;
    std::fs::write(&out, serde_json::to_string_pretty(&report)?)?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

/// The mean of one figure over several level results.
fn mean(results: &[Value], field: &str) -> f64 {
    let sum: f64 = results.iter().filter_map(|r| r[field].as_f64()).sum();
    sum / results.len().max(1) as f64
}
