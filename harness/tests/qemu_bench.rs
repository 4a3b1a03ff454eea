//! `make bench-vm`: guest timings on this machine, with the accelerator used: the qemu
//! backend's into reports/bench/vm.json and, built with the `libvirt` feature, the libvirt
//! backend's beside the qemu backend's of the same run, with their ratios, into
//! reports/bench/libvirt-vm.json. Ignored by default (`cargo test -- --ignored` runs them);
//! skipped with a printed reason when QEMU, libvirt or the guest image is missing.

use std::path::{Path, PathBuf};
use std::time::Instant;

use vigil::backend::guest::hypervisor::Hypervisor;
use vigil::backend::guest::{GuestDriver, Timings};
use vigil::backend::{Backend, BackendKind, CloneIdentity, GuestSpec, HostSpec, Role, WorldConfig};
use vigil::identity::{IdentityMint, cpu_profile};

fn image_dir() -> PathBuf {
    std::env::var_os("VIGIL_IMAGE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/out"))
}

fn stats(values: &[f64]) -> serde_json::Value {
    if values.is_empty() {
        return serde_json::Value::Null;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    serde_json::json!({
        "runs_ms": values.iter().map(|v| (v * 10.0).round() / 10.0).collect::<Vec<_>>(),
        "min_ms": (sorted[0] * 10.0).round() / 10.0,
        "median_ms": (sorted[sorted.len() / 2] * 10.0).round() / 10.0,
    })
}

/// One guest's life on a backend: boots, snapshots and reverts, live migrations between two
/// hosts, a clone booted on the other host.
fn exercise<H: Hypervisor>(kind: BackendKind, rounds: usize) -> (Timings, serde_json::Value) {
    // `RUST_LOG=vigil=debug make bench-vm` shows each step's own timing.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    // SAFETY: set before any thread of this test reads the environment.
    unsafe { std::env::set_var("VIGIL_IMAGE_DIR", image_dir()) };
    let scratch = tempfile::tempdir().unwrap();
    let config = WorldConfig {
        runtime_bin: PathBuf::from(env!("CARGO_BIN_EXE_vigil"))
            .parent()
            .unwrap()
            .to_path_buf(),
        builtin_runtime: true,
        harness_exe: PathBuf::from(env!("CARGO_BIN_EXE_vigil")),
        work_dir: scratch.path().join("work"),
        log_dir: scratch.path().join("logs"),
        seed: 7,
        harness_root: None,
    };
    let started = Instant::now();
    let mut backend = vigil::backend::assemble(kind, config).expect("backend");
    let mint = IdentityMint::new(7);
    for (name, vendor, model) in [
        ("host-a", "GenuineIntel", "Xeon Gold 6248"),
        ("host-b", "GenuineIntel", "Xeon Gold 6348"),
    ] {
        backend
            .add_host(&HostSpec {
                name: name.into(),
                cpu: cpu_profile(vendor, model),
                identity: mint.host_identity(name),
                role: Role::Workstation,
            })
            .unwrap();
    }
    backend
        .add_guest(&GuestSpec {
            name: "vm1".into(),
            host: "host-a".into(),
            identity: mint.guest_identity("vm1"),
            role: Role::Workstation,
            hide_hypervisor: false,
        })
        .unwrap();
    backend.boot("vm1").expect("boot");
    for i in 0..rounds {
        backend.snapshot("vm1", &format!("s{i}")).expect("snapshot");
        backend.revert("vm1", &format!("s{i}")).expect("revert");
    }
    // With its snapshots: libvirt's metadata goes along with the guest.
    for i in 0..rounds {
        let host = if i % 2 == 0 { "host-b" } else { "host-a" };
        backend.migrate("vm1", host).expect("migrate");
    }
    backend
        .clone_guest("vm1", "vm2", "host-b", CloneIdentity::New)
        .expect("clone");
    backend.boot("vm2").expect("boot the clone");
    backend.shutdown("vm2").expect("shutdown the clone");
    backend.shutdown("vm1").expect("shutdown");
    backend.boot("vm1").expect("second boot");
    let driver = backend
        .driver_mut::<GuestDriver<H>>()
        .expect("guest driver");
    let timings = driver.timings().clone();
    let accelerator = driver.accelerator();
    let describe = backend.describe();
    backend.teardown().unwrap();
    let hypervisor_steps_run = hypervisor_steps(&scratch.path().join("logs"), kind);
    assert_eq!(timings.boot_ms.len(), 3, "three boots were timed");
    assert_eq!(timings.revert_ms.len(), rounds);
    assert_eq!(timings.migrate_ms.len(), rounds);
    (
        timings,
        serde_json::json!({
            "accelerator": accelerator,
            "describe": describe,
            "total_s": (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
            "hypervisor_steps": hypervisor_steps_run,
        }),
    )
}

/// The hypervisor's own steps in this run (libvirt's starts and destroys; none on the qemu
/// backend), as the backend wrote them beside its timings in `log_dir`.
fn hypervisor_steps(log_dir: &Path, kind: BackendKind) -> serde_json::Value {
    let file = log_dir.join(format!("{kind}-timings.json"));
    let written: serde_json::Value = std::fs::read(&file)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default();
    let steps = written["hypervisor_steps_ms"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    steps
        .into_iter()
        .map(|(step, runs)| {
            let ms: Vec<f64> = runs
                .as_array()
                .map(|runs| runs.iter().filter_map(serde_json::Value::as_f64).collect())
                .unwrap_or_default();
            (step, stats(&ms))
        })
        .collect()
}

/// `a / b` to two decimals (none when `b` is not positive).
fn ratio(a: f64, b: f64) -> Option<f64> {
    (b > 0.0).then(|| ((a / b) * 100.0).round() / 100.0)
}

fn median(values: &[f64]) -> Option<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied()
}

/// Each operation's timings, by the names the reports use.
fn operations(t: &Timings) -> [(&'static str, &[f64]); 6] {
    [
        ("boot_to_agent_ready", &t.boot_ms),
        ("snapshot", &t.snapshot_ms),
        ("revert_to_agent_ready", &t.revert_ms),
        ("clone_disk_copy", &t.clone_ms),
        ("live_migration", &t.migrate_ms),
        ("live_migration_downtime", &t.migrate_downtime_ms),
    ]
}

fn report_of(t: &Timings, run: serde_json::Value) -> serde_json::Value {
    let mut report = run;
    let fields = report.as_object_mut().unwrap();
    fields.insert(
        "cpus".into(),
        serde_json::json!(
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        ),
    );
    fields.insert(
        "load_average".into(),
        serde_json::json!(
            std::fs::read_to_string("/proc/loadavg")
                .unwrap_or_default()
                .trim()
        ),
    );
    for (name, values) in operations(t) {
        fields.insert(name.into(), stats(values));
    }
    report
}

fn write_report(file: &str, report: &serde_json::Value) {
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../reports/bench");
    std::fs::create_dir_all(&out).unwrap();
    let text = serde_json::to_string_pretty(report).unwrap();
    std::fs::write(out.join(file), &text).unwrap();
    println!("{text}");
}

#[test]
#[ignore = "boots real guests; run by `make bench-vm`"]
fn qemu_timings() {
    if let Some(why) = vigil::backend::qemu::vm::missing_prerequisite(&image_dir()) {
        println!("SKIPPED qemu benchmark: {why}");
        return;
    }
    let (t, run) = exercise::<vigil::backend::qemu::QemuHypervisor>(BackendKind::Qemu, 3);
    write_report("vm.json", &report_of(&t, run));
}

/// One quarter of the built-in suite on qemu (`vigil suite --shard 1/4`) with the guest kernel
/// `kernel`: its wall-clock seconds and its scenarios' verdicts.
fn suite_quarter(kernel: &str) -> serde_json::Value {
    let reports = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vigil"))
        .args([
            "suite",
            "--backend",
            "qemu",
            "--shard",
            "1/4",
            "--report-dir",
        ])
        .arg(reports.path())
        .env("VIGIL_IMAGE_DIR", image_dir())
        .env(vigil::backend::guest::image::KERNEL_VARIABLE, kernel)
        .output()
        .unwrap();
    let seconds = started.elapsed().as_secs_f64();
    // Each scenario's verdict line goes to stderr.
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let count = |word: &str| text.lines().filter(|l| l.starts_with(word)).count();
    serde_json::json!({
        "shard": "1/4",
        "exit_code": out.status.code(),
        "passed": count("PASS"),
        "failed": count("FAIL") + count("ERROR"),
        "seconds": (seconds * 10.0).round() / 10.0,
    })
}

/// The two guest kernels in one run (`make bench-vm`): boot to agent-ready, revert and a
/// quarter of the qemu suite with Debian's kernel and with the fast one
/// (scripts/build-kernel.sh), and the fast one's ratios, into reports/bench/guest-kernels.json.
#[test]
#[ignore = "boots real guests; run by `make bench-vm`"]
fn guest_kernels() {
    use vigil::backend::guest::image::{FAST_KERNEL, KERNEL_VARIABLE};
    if let Some(why) = vigil::backend::qemu::vm::missing_prerequisite(&image_dir()) {
        println!("SKIPPED guest kernel benchmark: {why}");
        return;
    }
    if !image_dir().join(FAST_KERNEL).is_file() {
        println!("SKIPPED guest kernel benchmark: no fast kernel (scripts/build-kernel.sh)");
        return;
    }
    let mut kernels = serde_json::Map::new();
    let mut medians = Vec::new();
    for kernel in ["debian", "fast"] {
        // SAFETY: set before any thread of this test reads the environment.
        unsafe { std::env::set_var(KERNEL_VARIABLE, kernel) };
        let (t, run) = exercise::<vigil::backend::qemu::QemuHypervisor>(BackendKind::Qemu, 5);
        let mut report = report_of(&t, run);
        report["suite_quarter"] = suite_quarter(kernel);
        medians.push((
            median(&t.boot_ms),
            median(&t.revert_ms),
            report["suite_quarter"]["seconds"].as_f64(),
        ));
        kernels.insert(kernel.into(), report);
    }
    // SAFETY: as above.
    unsafe { std::env::remove_var(KERNEL_VARIABLE) };
    let fast_to_debian =
        |fast: Option<f64>, debian: Option<f64>| fast.zip(debian).and_then(|(f, d)| ratio(f, d));
    let (debian, fast) = (medians[0], medians[1]);
    write_report(
        "guest-kernels.json",
        &serde_json::json!({
            "kernels": kernels,
            "fast_to_debian": {
                "boot_to_agent_ready": fast_to_debian(fast.0, debian.0),
                "revert_to_agent_ready": fast_to_debian(fast.1, debian.1),
                "suite_quarter_seconds": fast_to_debian(fast.2, debian.2),
            },
            "goal_tcg": "boot to agent-ready at most 2.5 s median, revert at most 1 s",
        }),
    );
}

/// The libvirt backend's timings and their ratios to the qemu backend's, measured in one run
/// (goal: at most 1.2 for each operation).
#[cfg(feature = "libvirt")]
#[test]
#[ignore = "boots real guests; run by `make bench-vm`"]
fn libvirt_timings_against_qemu() {
    use vigil::backend::libvirt::hypervisor::{LibvirtHypervisor, missing_prerequisite};
    if let Some(why) = missing_prerequisite(&image_dir()) {
        println!("SKIPPED libvirt benchmark: {why}");
        return;
    }
    let rounds = 5;
    let (qemu, qemu_run) =
        exercise::<vigil::backend::qemu::QemuHypervisor>(BackendKind::Qemu, rounds);
    let (libvirt, libvirt_run) = exercise::<LibvirtHypervisor>(BackendKind::Libvirt, rounds);
    let ratios: serde_json::Map<String, serde_json::Value> = operations(&libvirt)
        .into_iter()
        .zip(operations(&qemu))
        .filter_map(|((name, l), (_, q))| {
            let r = ratio(median(l)?, median(q)?)?;
            Some((name.to_string(), serde_json::json!(r)))
        })
        .collect();
    // What libvirt adds to a revert that the qemu backend does not do: waiting out its 200 ms
    // poll of the destroyed QEMU, and reading the new QEMU's CPU back feature by feature.
    let step = |name: &str| libvirt_run["hypervisor_steps"][name]["median_ms"].as_f64();
    let libvirt_own = step("destroy_wait")
        .zip(step("guest_cpu_check"))
        .map(|(d, c)| d + c);
    let revert_excess = median(&libvirt.revert_ms)
        .zip(median(&qemu.revert_ms))
        .map(|(l, q)| ((l - q) * 10.0).round() / 10.0);
    write_report(
        "libvirt-vm.json",
        &serde_json::json!({
            "libvirt": report_of(&libvirt, libvirt_run),
            "qemu": report_of(&qemu, qemu_run),
            "median_ratio_libvirt_to_qemu": ratios,
            "revert_excess_ms": revert_excess,
            "libvirt_destroy_wait_and_cpu_check_ms": libvirt_own,
            "goal": "each ratio at most 1.2",
        }),
    );
}
