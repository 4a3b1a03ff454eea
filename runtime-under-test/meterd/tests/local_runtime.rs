//! One machine's meterd with real apps: counting rules, crash release, restart, tampered files.

mod common;

use std::time::{Duration, Instant};

use common::*;

#[test]
fn user_limit_quantity_two_denies_the_third_access() {
    let vendor = Vendor::new();
    let licence = vendor.issue(
        "ul",
        &["{ code: 1001, name: cad, quantity: 2, counting: user-limit }"],
    );
    let ws = Machine::new("ws1", "workstation", "127.0.1.10");
    let _daemon = ws.start(&[]);
    ws.install(&vendor, &licence);
    let first = ws.hold(1001, None);
    let second = ws.hold(1001, None);
    assert!(
        first.granted() && second.granted(),
        "{} {}",
        first.first,
        second.first
    );
    let third = ws.hold(1001, None);
    assert!(!third.granted());
    assert_eq!(third.reason(), "quantity-exhausted");
    let (code, _) = ws.meter(&["access", "--product", "1001"]);
    assert_eq!(code, 1);
}

#[test]
fn no_count_is_unlimited() {
    let vendor = Vendor::new();
    let licence = vendor.issue(
        "nc",
        &["{ code: 7, name: free, quantity: 1, counting: no-count }"],
    );
    let ws = Machine::new("ws1", "workstation", "127.0.1.11");
    let _daemon = ws.start(&[]);
    ws.install(&vendor, &licence);
    let holders: Vec<Holder> = (0..12).map(|_| ws.hold(7, None)).collect();
    assert!(holders.iter().all(Holder::granted));
    assert_eq!(allocations(&ws).len(), 12);
}

#[test]
fn local_licence_refused_in_terminal_server_session_allowed_on_workstation_remote_desktop() {
    let vendor = Vendor::new();
    let licence = vendor.issue(
        "local",
        &["{ code: 5, name: single, quantity: 0, counting: user-limit }"],
    );

    let ts = Machine::new("ts1", "terminal-server", "127.0.1.12");
    let _ts_daemon = ts.start(&[]);
    ts.install(&vendor, &licence);
    let in_session = ts.hold(5, Some("rdp"));
    assert!(!in_session.granted());
    assert_eq!(in_session.reason(), "local-licence-terminal-server");

    let ws = Machine::new("ws1", "workstation", "127.0.1.13");
    let _ws_daemon = ws.start(&[]);
    ws.install(&vendor, &licence);
    let remote_desktop = ws.hold(5, Some("rdp"));
    assert!(remote_desktop.granted(), "{}", remote_desktop.first);
    // Counted as one: a second use (outside the session) is refused.
    let service = ws.hold(5, None);
    assert!(!service.granted());
    assert_eq!(service.reason(), "quantity-exhausted");
}

#[test]
fn kill_9_of_a_holder_frees_its_licence_quickly() {
    let vendor = Vendor::new();
    let licence = vendor.issue(
        "one",
        &["{ code: 1, name: one, quantity: 1, counting: user-limit }"],
    );
    let ws = Machine::new("ws1", "workstation", "127.0.1.14");
    let _daemon = ws.start(&[]);
    ws.install(&vendor, &licence);
    let mut delays = Vec::new();
    for _ in 0..5 {
        let mut holder = ws.hold(1, None);
        assert!(holder.granted(), "{}", holder.first);
        let killed = Instant::now();
        holder.kill9();
        wait_until(Duration::from_secs(5), || allocations(&ws).is_empty())
            .expect("released after kill -9");
        delays.push(killed.elapsed());
        let (code, out) = ws.meter(&["access", "--product", "1"]);
        assert_eq!(code, 0, "{out}");
    }
    delays.sort();
    println!(
        "release after kill -9 (observed via meter list): median {:?}, max {:?}",
        delays[2], delays[4]
    );
    assert!(delays[2] < Duration::from_millis(500));
}

#[test]
fn daemon_restart_keeps_live_grants_releases_dead_ones_and_double_grants_none() {
    let vendor = Vendor::new();
    let licence = vendor.issue(
        "two",
        &["{ code: 2, name: two, quantity: 2, counting: user-limit }"],
    );
    let ws = Machine::new("ws1", "workstation", "127.0.1.15");
    let mut daemon = ws.start(&[]);
    ws.install(&vendor, &licence);
    let alive = ws.hold(2, None);
    let mut doomed = ws.hold(2, None);
    assert!(alive.granted() && doomed.granted());
    daemon.kill9();
    doomed.kill9(); // dies while the daemon is down
    let _daemon = ws.start(&[]);
    let held = allocations(&ws);
    assert_eq!(held.len(), 1, "{held:?}");
    assert_eq!(held[0]["handle"], alive.first["handle"]);
    let second = ws.hold(2, None);
    assert!(second.granted(), "{}", second.first);
    let third = ws.hold(2, None);
    assert_eq!(third.reason(), "quantity-exhausted");
    // The surviving holder is watched again: its death frees its licence.
    drop(alive);
    wait_until(Duration::from_secs(5), || allocations(&ws).len() == 1)
        .expect("re-watched holder released");
}

#[test]
fn tampered_and_foreign_licences_are_refused_and_state_is_kept() {
    let vendor = Vendor::new();
    let licence = vendor.issue(
        "ok",
        &["{ code: 3, name: three, quantity: 1, counting: user-limit }"],
    );
    let ws = Machine::new("ws1", "workstation", "127.0.1.16");
    let _daemon = ws.start(&[]);
    ws.install(&vendor, &licence);

    let text = std::fs::read_to_string(&licence).unwrap();
    let tampered = vendor.dir.path().join("tampered.json");
    std::fs::write(&tampered, text.replace("quantity\": 1", "quantity\": 99")).unwrap();
    let (code, out) = ws.meter(&["activate", "apply", tampered.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert_eq!(out["reason"], "signature-invalid");
    assert!(
        out["error"].as_str().unwrap().contains("tampered.json"),
        "{out}"
    );

    let other = Vendor::new();
    let foreign = other.issue(
        "foreign",
        &["{ code: 3, name: three, quantity: 50, counting: user-limit }"],
    );
    let (code, out) = ws.meter(&["activate", "apply", foreign.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert_eq!(out["reason"], "signature-invalid");
    assert!(
        out["error"].as_str().unwrap().contains("foreign.json"),
        "{out}"
    );

    // The good licence still counts with its own quantity.
    let first = ws.hold(3, None);
    assert!(first.granted());
    let second = ws.hold(3, None);
    assert_eq!(second.reason(), "quantity-exhausted");
}
