//! One libvirt daemon per simulated host: two run side by side on one machine, each with its own
//! host UUID, and stopping them leaves no process behind; what a killed harness left, the next
//! run stops.
#![cfg(feature = "libvirt")]

use std::path::Path;

use vigil::backend::libvirt::daemon::{self, HostDaemon};

/// Whether the libvirt suite must run (CI): a skip is then a failure.
fn required() -> bool {
    std::env::var_os("VIGIL_REQUIRE_LIBVIRT").is_some_and(|v| v == "1")
}

/// Whether libvirtd and root are here; a skip (said on stderr) fails when the suite is required.
fn can_run() -> bool {
    if daemon::installed() && nix::unistd::Uid::effective().is_root() {
        return true;
    }
    assert!(
        !required(),
        "VIGIL_REQUIRE_LIBVIRT=1 but libvirtd or root is missing"
    );
    eprintln!("skipped: needs libvirtd (make deps) and root");
    false
}

/// Processes whose command line mentions `dir` (a daemon or guest of that host).
fn processes_under(dir: &Path) -> Vec<String> {
    let needle = dir.display().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(&needle))
        .collect()
}

#[test]
fn two_hosts_run_their_own_daemons_and_leave_nothing_behind() {
    if !can_run() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let uuids = [
        "6b1a4c1e-0f0e-4a3c-9d2b-0a0b0c0d0e01",
        "6b1a4c1e-0f0e-4a3c-9d2b-0a0b0c0d0e02",
    ];
    let mut daemons: Vec<HostDaemon> = uuids
        .iter()
        .enumerate()
        .map(|(i, uuid)| HostDaemon::start(&dir.path().join(format!("host-{i}")), uuid).unwrap())
        .collect();
    for (daemon, uuid) in daemons.iter().zip(uuids) {
        let connection = daemon.connect().unwrap();
        let capabilities = connection.capabilities().unwrap();
        assert!(
            capabilities.contains(&format!("<uuid>{uuid}</uuid>")),
            "{capabilities}"
        );
        assert!(
            connection.hyp_version().unwrap() >= 10_000_000,
            "QEMU 10 or later"
        );
    }
    assert_ne!(daemons[0].pid(), daemons[1].pid());
    for daemon in &mut daemons {
        daemon.stop().unwrap();
    }
    assert_eq!(processes_under(dir.path()), Vec::<String>::new());
    // Dropped without stop: the same.
    let again = HostDaemon::start(&dir.path().join("host-0"), uuids[0]).unwrap();
    drop(again);
    assert_eq!(processes_under(dir.path()), Vec::<String>::new());
}

/// Set in the child that plays a harness killed while its daemon runs: the host folder.
const KILLED_HARNESS_DIR: &str = "VIGIL_TEST_KILLED_HARNESS_DIR";

#[test]
fn a_daemon_a_killed_harness_left_is_stopped_by_the_next_run() {
    if let Some(dir) = std::env::var_os(KILLED_HARNESS_DIR) {
        // The child: starts a daemon, says so, and waits to be killed.
        let daemon =
            HostDaemon::start(Path::new(&dir), "6b1a4c1e-0f0e-4a3c-9d2b-0a0b0c0d0e09").unwrap();
        println!("ready {}", daemon.pid().unwrap());
        std::thread::sleep(std::time::Duration::from_secs(120));
        return;
    }
    if !can_run() {
        return;
    }
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let host = dir.path().join("host-killed");
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_daemon_a_killed_harness_left_is_stopped_by_the_next_run",
            "--nocapture",
        ])
        .env(KILLED_HARNESS_DIR, &host)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let pid: i32 = loop {
        let line = lines.next().expect("the child said nothing").unwrap();
        if let Some(pid) = line.strip_prefix("ready ") {
            break pid.parse().unwrap();
        }
    };
    // The harness dies outright: its daemon runs on.
    child.kill().unwrap();
    child.wait().unwrap();
    let alive = || nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok();
    assert!(alive(), "the daemon died with its harness");

    let swept =
        vigil::backend::libvirt::leftovers::sweep(&vigil::backend::libvirt::leftovers::registry());
    assert!(swept.daemons >= 1, "{swept:?}");
    // Reaped by init once killed (it is no child of this process).
    let gone = (0..200).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(25));
        !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|stat| !stat.contains(") Z "))
    });
    assert!(gone, "libvirtd {pid} still runs");
}
