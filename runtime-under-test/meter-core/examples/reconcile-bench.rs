//! Reconcile benchmark: how long a runtime takes to reconcile a receipt chain of 10,000 uses with
//! its witness after a revert, next to the floor of that work (verifying the witness's chain).
//!
//! Run: `cargo run --release -p meter-core --example reconcile-bench [-- <receipts> [<out.json>]]`.
//! Writes `reports/bench/reconcile.json` under the workspace root unless told otherwise.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use meter_core::rollback::{MeteredState, ReceiptSigner, WitnessLog, verify_chain};
use serde_json::json;

const LICENCE: &str = "bench-licence";
const PRODUCT: u32 = 3001;
const T0: u64 = 1_800_000_000_000;
const ROUNDS: usize = 5;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let receipts: u64 = match args.get(1) {
        Some(n) => n.parse()?,
        None => 10_000,
    };
    let out = args.get(2).map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../reports/bench/reconcile.json")
    });
    let signer = ReceiptSigner::from_bytes(&[7; 32]);
    let verifier = signer.verifier();
    let mut state = MeteredState::new(
        LICENCE,
        BTreeMap::from([(PRODUCT, receipts * 2)]),
        T0,
        Some("gen-a"),
    );
    let mut witness = WitnessLog::new(LICENCE);
    for i in 0..receipts {
        let receipt = state.spend(PRODUCT, 1, T0 + 1 + i, Some("gen-a"), &signer)?;
        witness.accept(&receipt, &verifier)?;
    }
    // The guest goes back to a snapshot taken halfway: half the chain is gone here.
    let mut reverted = state.clone();
    reverted
        .receipts
        .truncate(usize::try_from(receipts / 2).unwrap_or(usize::MAX));
    let now = T0 + receipts + 10;

    let mut reconcile = Vec::new();
    let mut floor = Vec::new();
    for _ in 0..ROUNDS {
        let mut local = reverted.clone();
        let started = Instant::now();
        let done = local.reconcile(&witness, now, Some("gen-b"), &signer)?;
        reconcile.push(started.elapsed());
        anyhow::ensure!(
            done.adopted as u64 == receipts - receipts / 2
                && local.remaining(PRODUCT) == Some(receipts),
            "reconcile adopted {} receipts, {:?} left",
            done.adopted,
            local.remaining(PRODUCT)
        );
        let started = Instant::now();
        verify_chain(witness.genesis, &witness.receipts, &verifier)?;
        floor.push(started.elapsed());
    }
    let median = |times: &mut Vec<Duration>| {
        times.sort();
        times[times.len() / 2].as_secs_f64() * 1000.0
    };
    let reconcile_ms = median(&mut reconcile);
    let floor_ms = median(&mut floor);
    let report = json!({
        "bench": "reconcile",
        "receipts": receipts,
        "reverted_to": receipts / 2,
        "rounds": ROUNDS,
        "reconcile_ms_median": reconcile_ms,
        "verify_witness_chain_ms_median": floor_ms,
        "ratio_to_verifying_the_chain": reconcile_ms / floor_ms,
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&out, serde_json::to_string_pretty(&report)? + "\n")?;
    Ok(())
}
