//! `make bench-vm`: QEMU timings on this machine, with the accelerator used, into
//! reports/bench/vm.json. Ignored by default (`cargo test -- --ignored` runs it); skips with a
//! printed reason when QEMU or the guest image is missing.

use std::path::{Path, PathBuf};
use std::time::Instant;

use vigil::backend::qemu::QemuDriver;
use vigil::backend::{Backend, CloneIdentity, GuestSpec, HostSpec, Role, WorldConfig};
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

#[test]
#[ignore = "boots real guests; run by `make bench-vm`"]
fn qemu_timings() {
    let image = image_dir();
    if let Some(why) = vigil::backend::qemu::vm::missing_prerequisite(&image) {
        println!("SKIPPED qemu benchmark: {why}");
        return;
    }
    // SAFETY: set before any thread of this test reads the environment.
    unsafe { std::env::set_var("VIGIL_IMAGE_DIR", &image) };
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
    let mut backend =
        vigil::backend::assemble(vigil::backend::BackendKind::Qemu, config).expect("qemu backend");
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
    let rounds = 3;
    backend.boot("vm1").expect("boot");
    for i in 0..rounds {
        backend.snapshot("vm1", &format!("s{i}")).expect("snapshot");
        backend.revert("vm1", &format!("s{i}")).expect("revert");
    }
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
    let t = backend
        .driver_mut::<QemuDriver>()
        .expect("qemu driver")
        .timings()
        .clone();
    backend.teardown().unwrap();
    let report = serde_json::json!({
        "accelerator": backend.driver_mut::<QemuDriver>().expect("qemu driver").accelerator(),
        "describe": backend.describe(),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "load_average": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
        "boot_to_agent_ready": stats(&t.boot_ms),
        "snapshot_savevm": stats(&t.snapshot_ms),
        "revert_to_agent_ready": stats(&t.revert_ms),
        "clone_disk_copy": stats(&t.clone_ms),
        "live_migration": stats(&t.migrate_ms),
        "live_migration_downtime": stats(&t.migrate_downtime_ms),
        "total_s": (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
    });
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../reports/bench");
    std::fs::create_dir_all(&out).unwrap();
    let text = serde_json::to_string_pretty(&report).unwrap();
    std::fs::write(out.join("vm.json"), &text).unwrap();
    println!("{text}");
    assert_eq!(t.boot_ms.len(), 3, "three boots were timed");
    assert_eq!(t.revert_ms.len(), rounds);
    assert_eq!(t.migrate_ms.len(), rounds);
}
