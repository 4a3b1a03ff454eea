//! `vigil bench`: wall time of the built-in suite on sim and of a generated large station-share
//! scenario; harness overhead per step. Results are written as JSON.

use std::fmt::Write;
use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use serde_json::json;

use crate::engine::{self, LoadedScenario, RunOptions};
use crate::report::{Event, Verdict};

/// A station-share scenario with `guests` terminal-server guests of `sessions` RDP sessions each,
/// every session running one app against the host's network server.
pub fn station_share_scenario(guests: usize, sessions: usize) -> String {
    let total = guests * sessions;
    let mut y = String::new();
    let _ = writeln!(y, "name: stationshare-{guests}x{sessions}");
    let _ = writeln!(
        y,
        "description: {guests} terminal-server guests with {sessions} RDP sessions each share one station-share licence of quantity {total} on the host's server."
    );
    let _ = writeln!(y, "tags: [bench]");
    let _ = writeln!(y, "policy:\n  products:");
    let _ = writeln!(
        y,
        "    - {{ code: 1001, name: cad-pro, container: soft, quantity: {total}, counting: station-share, binding: {{ scheme: random }} }}"
    );
    let _ = writeln!(
        y,
        "hosts:\n  - {{ name: host-a, cpu: {{ vendor: GenuineIntel, model: \"Xeon Gold 6248\" }} }}"
    );
    let _ = writeln!(y, "guests:");
    for g in 0..guests {
        let _ = writeln!(
            y,
            "  - {{ name: ts{g}, host: host-a, role: terminal-server }}"
        );
    }
    let _ = writeln!(y, "steps:");
    let _ = writeln!(y, "  - activate: {{ machine: host-a, product: 1001 }}");
    let _ = writeln!(y, "  - server-start: {{ machine: host-a }}");
    for g in 0..guests {
        let _ = writeln!(y, "  - boot: ts{g}");
        for s in 0..sessions {
            let _ = writeln!(
                y,
                "  - session-open: {{ machine: ts{g}, as: ts{g}-s{s}, kind: rdp, user: user{s}, client-name: pc{s}, client-ip: 10.1.{g}.{} }}",
                s + 1
            );
            let _ = writeln!(
                y,
                "  - start-app: {{ machine: ts{g}, product: 1001, session: ts{g}-s{s}, as: app-{g}-{s} }}"
            );
        }
    }
    let _ = writeln!(
        y,
        "  - expect: {{ in-use: {{ product: 1001, machine: host-a, stations: {total} }} }}"
    );
    y
}

fn step_stats(events: &[Event]) -> (usize, f64) {
    let mut count = 0;
    let mut total = 0.0;
    for e in events {
        if let Event::Step { elapsed_ms, .. } | Event::Assertion { elapsed_ms, .. } = e {
            count += 1;
            total += elapsed_ms;
        }
    }
    (count, total)
}

/// Runs the harness benchmarks and writes `harness.json` into `out`.
pub fn run(out: &Path, guests: usize, sessions: usize) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let scratch = tempfile_dir()?;
    let options = RunOptions {
        backend: crate::backend::BackendKind::Sim,
        report_root: scratch.join("reports"),
        fail_fast: false,
        runtime_bin: None,
        keep: false,
        verbose: false,
    };

    let suite = engine::builtin_scenarios(&[])?;
    let started = Instant::now();
    let outcome = engine::run_scenarios(suite, &options)?;
    let suite_wall = started.elapsed().as_secs_f64();
    let per_scenario: Vec<serde_json::Value> = crate::report::scenario_results(&outcome.events)
        .iter()
        .map(
            |r| json!({"scenario": r.name, "verdict": r.verdict, "seconds": r.elapsed_ms / 1000.0}),
        )
        .collect();

    let text = station_share_scenario(guests, sessions);
    let path = scratch.join("stationshare-large.yaml");
    std::fs::write(&path, &text)?;
    let scenario = crate::scenario::load(&path)
        .map_err(|e| anyhow::anyhow!("{:?}", miette::Report::new(e)))?;
    let started = Instant::now();
    let cpu_before = own_cpu_ms();
    let large = engine::run_scenarios(
        vec![LoadedScenario {
            source: path.display().to_string(),
            scenario,
        }],
        &options,
    )?;
    let large_wall = started.elapsed().as_secs_f64();
    let harness_cpu_ms = own_cpu_ms() - cpu_before;
    let (steps, step_ms) = step_stats(&large.events);
    let per_step = |ms: f64| if steps > 0 { ms / steps as f64 } else { 0.0 };

    let result = json!({
        "benchmark": "harness",
        "machine": {"cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)},
        "suite": {
            "backend": "sim",
            "scenarios": per_scenario.len(),
            "verdict": outcome.verdict,
            "wall_seconds": suite_wall,
            "per_scenario": per_scenario,
        },
        "station_share_large": {
            "guests": guests,
            "sessions_per_guest": sessions,
            "verdict": large.verdict,
            "wall_seconds": large_wall,
            "steps": steps,
            "mean_step_ms": per_step(step_ms),
            "harness_cpu_ms": harness_cpu_ms,
            "harness_cpu_ms_per_step": per_step(harness_cpu_ms),
            "note": "mean_step_ms is wall time per step, the runtime's work included (daemon start, app start, grant); harness_cpu_ms_per_step is the CPU time of the harness process itself (engine, backend, relays; not its children)",
        },
        "targets": {
            "typical_scenario_seconds": 1.0,
            "station_share_100x10_seconds": 20.0,
            "harness_overhead_ms_per_step": 5.0,
        },
    });
    let file = out.join("harness.json");
    std::fs::write(&file, serde_json::to_vec_pretty(&result)?)?;
    eprintln!(
        "bench: suite {suite_wall:.2} s ({} scenarios, {}), {guests}x{sessions} station-share {large_wall:.2} s ({}, harness {:.2} ms CPU per step); {}",
        per_scenario.len(),
        outcome.verdict.label(),
        large.verdict.label(),
        per_step(harness_cpu_ms),
        file.display()
    );
    let _ = std::fs::remove_dir_all(&scratch);
    if outcome.verdict != Verdict::Pass || large.verdict != Verdict::Pass {
        anyhow::bail!("a benchmarked scenario did not pass; figures are not meaningful");
    }
    Ok(())
}

/// CPU time (user + system) this process has used so far, in milliseconds (children excluded).
fn own_cpu_ms() -> f64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct we own.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) } != 0 {
        return 0.0;
    }
    // SAFETY: getrusage succeeded, so the struct is initialised.
    let usage = unsafe { usage.assume_init() };
    let ms = |t: libc::timeval| t.tv_sec as f64 * 1000.0 + t.tv_usec as f64 / 1000.0;
    ms(usage.ru_utime) + ms(usage.ru_stime)
}

fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("vigil-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
