//! What the suites of built-in scenarios on guests share: the scenarios with a guest, and
//! running one through the real `vigil` binary on a backend, expecting the sim verdict (pass).

use std::path::{Path, PathBuf};
use std::process::Command;

/// The guest image folder.
pub fn image_dir() -> PathBuf {
    std::env::var_os("VIGIL_IMAGE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/out"))
}

/// The path of the scenario file `name`.yaml in tests/fixtures (named `name` inside).
pub fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/{name}.yaml", env!("CARGO_MANIFEST_DIR"))
}

/// Runs `scenario` (a built-in name or a file) whose scenario name is `name` on `backend`; its
/// exit code, report and output.
pub fn run_scenario_file(
    backend: &str,
    scenario: &str,
    name: &str,
) -> (Option<i32>, serde_json::Value, String) {
    let reports = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_vigil"))
        .args(["scenario", scenario, "--backend", backend, "--report-dir"])
        .arg(reports.path())
        .env("VIGIL_IMAGE_DIR", image_dir())
        .output()
        .unwrap();
    let text = std::fs::read_to_string(reports.path().join("latest").join("report.json"))
        .unwrap_or_else(|e| {
            panic!(
                "{name}: no report ({e}); stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let report: serde_json::Value = serde_json::from_str(&text).unwrap();
    let logs = reports.path().join("latest").join("logs").join(name);
    // Keep the guests' consoles and runtime logs where a failing CI run can show them.
    if let Some(keep) = std::env::var_os("VIGIL_QEMU_TEST_LOGS") {
        let target = Path::new(&keep).join(backend).join(name);
        let _ = std::fs::create_dir_all(&target);
        let _ = Command::new("cp")
            .arg("-r")
            .arg(&logs)
            .arg(&target)
            .status();
    }
    (
        out.status.code(),
        report,
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// Scenarios that run alone in a suite: their member guests must elect within a second, which
/// two TCG scenarios at once on two cores starve.
const RUN_ALONE: &[&str] = &["triad-guest-members", "triad-reverted-member"];

/// Held shared by every guest run of a suite, exclusively by the scenarios that run alone.
static SUITE: std::sync::RwLock<()> = std::sync::RwLock::new(());

/// A test's turn to run guests (held until dropped): the whole suite for a scenario that
/// runs alone, else a share of it.
pub struct Turn {
    _alone: Option<std::sync::RwLockWriteGuard<'static, ()>>,
    _shared: Option<std::sync::RwLockReadGuard<'static, ()>>,
}

/// Waits for the turn of scenario `name` (any other name, or none, shares the suite).
pub fn turn(name: &str) -> Turn {
    if RUN_ALONE.contains(&name) {
        Turn {
            _alone: Some(SUITE.write().unwrap_or_else(|e| e.into_inner())),
            _shared: None,
        }
    } else {
        Turn {
            _alone: None,
            _shared: Some(SUITE.read().unwrap_or_else(|e| e.into_inner())),
        }
    }
}

/// Asserts that `scenario` (named `name`) passes on `backend`, as it does on sim.
pub fn scenario_file_passes(backend: &str, scenario: &str, name: &str) {
    let _turn = turn(name);
    let (code, report, output) = run_scenario_file(backend, scenario, name);
    let scenario = &report["scenarios"][0];
    assert_eq!(
        (code, scenario["verdict"].as_str()),
        (Some(0), Some("pass")),
        "{name} on {backend}: {}\n{output}",
        scenario["error"]
    );
    assert_eq!(report["events"][0]["backend"], backend, "{report}");
}

/// A scenario named `name` that expects a clone on other hardware to keep a medium-bound
/// licence, which it must not: a run of it must fail (exit 1).
pub fn wrong_expectation(name: &str) -> String {
    format!(
        r#"name: {name}
description: Expects a clone on other hardware to keep a medium-bound licence, which it must not.
policy:
  products:
    - {{ code: 1001, name: cad-pro, container: soft, quantity: 1, counting: station-share,
        binding: {{ scheme: smartbind, tolerance: medium }} }}
hosts:
  - {{ name: host-a, cpu: {{ vendor: GenuineIntel, model: "Xeon Gold 6248" }} }}
  - {{ name: host-b, cpu: {{ vendor: AuthenticAMD, model: "EPYC 7543" }} }}
guests:
  - {{ name: vm1, host: host-a }}
steps:
  - boot: vm1
  - activate: {{ machine: vm1, product: 1001 }}
  - clone: {{ from: vm1, to: vm1-copy, host: host-b }}
  - boot: vm1-copy
  - access: {{ machine: vm1-copy, product: 1001, as: copied }}
  - expect: {{ granted: copied }}
"#
    )
}

/// A test `$test(name)` per built-in scenario with a guest (dongles reach guests over usbredir
/// and USB/IP), calling `$run(name)`; the host-only ones run the same machines as on sim and
/// stay in the sim suite.
///
/// The two triad scenarios whose members are guests run alone ([`RUN_ALONE`]): beside another
/// TCG scenario on two cores their members' elections churned. The three whose clients (guests)
/// must find a new leader of sim members within a 4 s lease (`triad-failover`, `triad-rejoin`,
/// `triad-paused-leader`) pass alone too (measured in the suite), but would add four minutes
/// run alone to every CI run: they run on guests nightly (`vigil suite`, every scenario).
#[macro_export]
macro_rules! guest_scenarios {
    ($test:ident, $run:path) => {
        #[rstest::rstest]
        #[case::clone_guest("clone-guest")]
        #[case::clone_guest_loose("clone-guest-loose")]
        #[case::guest_move_same_host("guest-move-same-host")]
        #[case::guest_move_other_host("guest-move-other-host")]
        #[case::guest_live_migration("guest-live-migration")]
        #[case::host_licence_in_guest("host-licence-in-guest")]
        #[case::vm_activation_denied("vm-activation-denied")]
        #[case::vm_hidden_hypervisor("vm-hidden-hypervisor")]
        #[case::snapshot_rollback_units("snapshot-rollback-units")]
        #[case::witness_empty_server("witness-empty-server")]
        #[case::witness_claimed_first("witness-claimed-first")]
        #[case::snapshot_rollback_time("snapshot-rollback-time")]
        #[case::snapshot_rollback_many("snapshot-rollback-many")]
        #[case::state_restore("state-restore")]
        #[case::state_restore_dongle("state-restore-dongle")]
        #[case::licence_reapply("licence-reapply")]
        #[case::licence_forged("licence-forged")]
        #[case::trial_expiry("trial-expiry")]
        #[case::stationshare_ts_guest("stationshare-ts-guest")]
        #[case::terminal_server_setsid("terminal-server-setsid")]
        #[case::terminal_server_untabled("terminal-server-untabled")]
        #[case::stationshare_mixed("stationshare-mixed")]
        #[case::crash_release("crash-release")]
        #[case::holder_release("holder-release")]
        #[case::holder_other_user("holder-other-user")]
        #[case::access_rules("access-rules")]
        #[case::access_rules_network("access-rules-network")]
        #[case::usage_log_tampered("usage-log-tampered")]
        #[case::server_keepalive("server-keepalive")]
        #[case::partition_short("partition-short")]
        #[case::partition_reset("partition-reset")]
        #[case::remote_revocation("remote-revocation")]
        #[case::server_flood("server-flood")]
        #[case::server_crash("server-crash")]
        #[case::triad_split_brain("triad-split-brain")]
        #[case::triad_member_apps("triad-member-apps")]
        #[case::triad_inflated_seats("triad-inflated-seats")]
        #[case::triad_foreign_release("triad-foreign-release")]
        #[case::triad_licence("triad-licence")]
        #[case::triad_in_guests("triad-in-guests")]
        #[case::triad_guest_members("triad-guest-members")]
        #[case::triad_reverted_member("triad-reverted-member")]
        #[case::station_spoof("station-spoof")]
        #[case::dongle_host_server("dongle-host-server")]
        #[case::dongle_exclusive_guest("dongle-exclusive-guest")]
        #[case::dongle_vm_denied("dongle-vm-denied")]
        #[case::dongle_shared_lockout("dongle-shared-lockout")]
        #[case::dongle_hop("dongle-hop")]
        #[case::dongle_hop_cloned_state("dongle-hop-cloned-state")]
        #[case::dongle_impersonated_runtime("dongle-impersonated-runtime")]
        #[case::dongle_units("dongle-units")]
        #[case::dongle_rebind("dongle-rebind")]
        #[case::usb_over_ethernet("usb-over-ethernet")]
        #[case::dongle_hang("dongle-hang")]
        fn $test(#[case] name: &str) {
            $run(name);
        }
    };
}
