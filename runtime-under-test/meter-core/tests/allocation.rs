//! Counting rules and denial reasons of the allocation table.

use meter_core::allocation::{
    AccessRequest, AllocationTable, ContainerClass, ContainerId, HolderId, ItemEntry, ItemState,
    Origin, ProductKey, Usage,
};
use meter_core::policy::{Allowance, Counting, ItemRules};
use meter_core::reason::Reason;
use meter_core::station::{MachineRole, SessionKind, StationId};
use rstest::rstest;

const PRODUCT: ProductKey = ProductKey {
    firm: 10,
    code: 1001,
};
const NOW: u64 = 1_800_000_000_000;

fn rules(quantity: u32, counting: Counting) -> ItemRules {
    ItemRules {
        quantity,
        counting,
        virtual_machines: Allowance::Allow,
        terminal_server: Allowance::Allow,
        expires_at: None,
    }
}

fn soft() -> ContainerId {
    ContainerId::new(ContainerClass::Soft, "lic-1")
}

fn table_with(rules: ItemRules) -> AllocationTable {
    let mut table = AllocationTable::new();
    table.upsert_item(ItemEntry {
        container: soft(),
        product: PRODUCT,
        name: "cad-pro".to_owned(),
        rules,
        state: ItemState::Valid,
        units_left: None,
    });
    table
}

fn rdp() -> SessionKind {
    SessionKind::Rdp {
        client_name: "pc-7".to_owned(),
        client_ip: "10.0.0.7".to_owned(),
    }
}

/// A process on a workstation's console asking its own runtime.
fn local(machine: &str, pid: u32) -> AccessRequest {
    AccessRequest {
        product: PRODUCT,
        station: StationId::machine(machine),
        holder: HolderId::Local { pid },
        origin: Origin::Local,
        role: MachineRole::Workstation,
        session: SessionKind::Console,
        is_guest: false,
    }
}

/// An access forwarded to a network server by the runtime of `machine`, session `session`.
fn remote_from(machine: &str, role: MachineRole, session: u32, kind: SessionKind) -> AccessRequest {
    let station = StationId::for_session(machine, role, session, &kind);
    AccessRequest {
        product: PRODUCT,
        station: station.clone(),
        holder: HolderId::Remote {
            peer: format!("127.0.1.{}:40000", machine.len()),
            station,
        },
        origin: Origin::Remote,
        role,
        session: kind,
        is_guest: false,
    }
}

fn ts_session(machine: &str, session: u32) -> AccessRequest {
    remote_from(machine, MachineRole::TerminalServer, session, rdp())
}

#[test]
fn user_limit_quantity_two_denies_the_third_access_until_one_is_released() {
    let mut table = table_with(rules(2, Counting::UserLimit));
    let first = table.access(local("ws1", 100), NOW).unwrap();
    let second = table.access(local("ws1", 101), NOW).unwrap();
    assert!(first.counted && second.counted);
    assert_eq!(
        table.access(local("ws1", 102), NOW),
        Err(Reason::QuantityExhausted)
    );
    assert_eq!(
        table.usage(PRODUCT),
        Usage {
            stations: 1,
            accesses: 2
        }
    );
    table.release(first.handle).unwrap();
    assert!(table.access(local("ws1", 102), NOW).is_ok());
}

#[test]
fn station_share_three_counts_stations_of_two_terminal_servers() {
    let mut table = table_with(rules(3, Counting::StationShare));
    let sessions = [("ts1", 1), ("ts1", 2), ("ts2", 1), ("ts2", 2), ("ts1", 3)];
    let outcomes: Vec<_> = sessions
        .iter()
        .map(|(machine, session)| table.access(ts_session(machine, *session), NOW))
        .collect();
    let granted: Vec<String> = outcomes
        .iter()
        .filter_map(|outcome| outcome.as_ref().ok())
        .map(|grant| grant.station.to_string())
        .collect();
    assert_eq!(granted, ["ts1/s1", "ts1/s2", "ts2/s1"]);
    assert_eq!(outcomes[3], Err(Reason::QuantityExhausted));
    assert_eq!(outcomes[4], Err(Reason::QuantityExhausted));

    // Repeated accesses inside a counted station are granted and count once.
    for _ in 0..4 {
        let again = table.access(ts_session("ts1", 2), NOW).unwrap();
        assert!(!again.counted);
    }
    assert_eq!(
        table.usage(PRODUCT),
        Usage {
            stations: 3,
            accesses: 7
        }
    );

    // When a station lets go of all its accesses, another station gets its place.
    let ts2 = ts_session("ts2", 1);
    let released = table.release_holder(&ts2.holder);
    assert_eq!(released.len(), 1);
    assert!(table.access(ts_session("ts2", 2), NOW).unwrap().counted);
}

#[test]
fn station_share_counts_a_workstation_console_and_its_rdp_session_once() {
    let mut table = table_with(rules(1, Counting::StationShare));
    table.access(local("ws1", 1), NOW).unwrap();
    let mut from_rdp = local("ws1", 2);
    from_rdp.station = StationId::for_session("ws1", MachineRole::Workstation, 2, &rdp());
    from_rdp.session = rdp();
    assert!(!table.access(from_rdp, NOW).unwrap().counted);
    assert_eq!(
        table.access(local("ws2", 3), NOW),
        Err(Reason::QuantityExhausted)
    );
}

#[rstest]
#[case::user_limit(Counting::UserLimit)]
#[case::station_share(Counting::StationShare)]
fn quantity_counted_elsewhere_refuses_none_but_counts_all(#[case] counting: Counting) {
    let mut table = table_with(rules(1, counting));
    table.count_quantity_elsewhere(true);
    let first = table.access(
        remote_from("ws1", MachineRole::Workstation, 1, SessionKind::Console),
        NOW,
    );
    let second = table.access(
        remote_from("ws22", MachineRole::Workstation, 1, SessionKind::Console),
        NOW,
    );
    assert!(first.unwrap().counted && second.unwrap().counted);
    assert_eq!(
        table.usage(PRODUCT),
        Usage {
            stations: 2,
            accesses: 2
        }
    );
    // Counted here again, the quantity is this table's to refuse.
    table.count_quantity_elsewhere(false);
    assert_eq!(
        table.access(local("ws3", 7), NOW).map(|_| ()),
        Err(Reason::QuantityExhausted)
    );
}

#[test]
fn no_count_is_unlimited() {
    let mut table = table_with(rules(1, Counting::NoCount));
    for session in 0..50 {
        let grant = table.access(ts_session("ts1", session), NOW).unwrap();
        assert!(!grant.counted);
    }
    assert_eq!(table.usage(PRODUCT).accesses, 50);
}

#[rstest]
#[case::workstation_console(local("ws1", 1), Ok(()))]
#[case::workstation_rdp({
    let mut r = local("ws1", 1);
    r.session = rdp();
    r
}, Ok(()))]
#[case::terminal_server_rdp_session({
    let mut r = local("ts1", 1);
    r.role = MachineRole::TerminalServer;
    r.session = rdp();
    r.station = StationId::for_session("ts1", MachineRole::TerminalServer, 4, &r.session);
    r
}, Err(Reason::LocalLicenceTerminalServer))]
#[case::terminal_server_console_session({
    let mut r = local("ts1", 1);
    r.role = MachineRole::TerminalServer;
    r.station = StationId::for_session("ts1", MachineRole::TerminalServer, 1, &r.session);
    r
}, Err(Reason::LocalLicenceTerminalServer))]
#[case::terminal_server_service({
    let mut r = local("ts1", 1);
    r.role = MachineRole::TerminalServer;
    r.session = SessionKind::Service;
    r
}, Ok(()))]
#[case::over_the_network(
    remote_from("ws2", MachineRole::Workstation, 1, SessionKind::Console),
    Err(Reason::LocalLicenceRemote)
)]
fn local_licence_quantity_zero(
    #[case] request: AccessRequest,
    #[case] expected: Result<(), Reason>,
    #[values(Counting::UserLimit, Counting::StationShare)] counting: Counting,
) {
    let mut table = table_with(rules(0, counting));
    assert_eq!(table.access(request, NOW).map(|_| ()), expected);
}

#[rstest]
#[case::user_limit(Counting::UserLimit, Err(Reason::QuantityExhausted))]
#[case::station_share(Counting::StationShare, Ok(()))]
fn local_licence_counts_as_one(#[case] counting: Counting, #[case] second: Result<(), Reason>) {
    let mut table = table_with(rules(0, counting));
    table.access(local("ws1", 1), NOW).unwrap();
    assert_eq!(table.access(local("ws1", 2), NOW).map(|_| ()), second);
    assert_eq!(
        table.access(local("ws2", 3), NOW).map(|_| ()),
        Err(Reason::QuantityExhausted)
    );
}

/// One row per reason the allocation table can give.
#[rstest]
#[case::quantity_exhausted(|t: &mut AllocationTable| { t.access(local("ws0", 9), NOW).unwrap(); }, local("ws1", 1), Reason::QuantityExhausted)]
#[case::unknown_product(|_: &mut AllocationTable| {}, AccessRequest { product: ProductKey { firm: 10, code: 9 }, ..local("ws1", 1) }, Reason::UnknownProduct)]
#[case::other_firm(|_: &mut AllocationTable| {}, AccessRequest { product: ProductKey { firm: 11, code: 1001 }, ..local("ws1", 1) }, Reason::UnknownProduct)]
#[case::corrupt(|t: &mut AllocationTable| t.set_state(&soft(), PRODUCT, ItemState::Corrupt).unwrap(), local("ws1", 1), Reason::LicenceCorrupt)]
#[case::locked(|t: &mut AllocationTable| t.set_state(&soft(), PRODUCT, ItemState::Locked).unwrap(), local("ws1", 1), Reason::LicenceLocked)]
#[case::expired_state(|t: &mut AllocationTable| t.set_state(&soft(), PRODUCT, ItemState::Expired).unwrap(), local("ws1", 1), Reason::LicenceExpired)]
#[case::expired_by_time(|t: &mut AllocationTable| t.upsert_item(ItemEntry { rules: ItemRules { expires_at: Some(NOW), ..rules(1, Counting::StationShare) }, ..entry() }), local("ws1", 1), Reason::LicenceExpired)]
#[case::units_exhausted(|t: &mut AllocationTable| t.set_units_left(&soft(), PRODUCT, Some(0)).unwrap(), local("ws1", 1), Reason::UnitsExhausted)]
#[case::local_licence_terminal_server(|t: &mut AllocationTable| t.upsert_item(ItemEntry { rules: rules(0, Counting::StationShare), ..entry() }), ts_local(), Reason::LocalLicenceTerminalServer)]
#[case::local_licence_remote(|t: &mut AllocationTable| t.upsert_item(ItemEntry { rules: rules(0, Counting::StationShare), ..entry() }), ts_session("ts1", 2), Reason::LocalLicenceRemote)]
#[case::vm_not_allowed(|t: &mut AllocationTable| t.upsert_item(ItemEntry { rules: ItemRules { virtual_machines: Allowance::Deny, ..rules(1, Counting::StationShare) }, ..entry() }), AccessRequest { is_guest: true, ..local("vm1", 1) }, Reason::VmNotAllowed)]
#[case::terminal_server_not_allowed(|t: &mut AllocationTable| t.upsert_item(ItemEntry { rules: ItemRules { terminal_server: Allowance::Deny, ..rules(1, Counting::StationShare) }, ..entry() }), ts_session("ts1", 2), Reason::TerminalServerNotAllowed)]
fn every_denial_reason(
    #[case] prepare: fn(&mut AllocationTable),
    #[case] request: AccessRequest,
    #[case] expected: Reason,
) {
    let mut table = table_with(rules(1, Counting::StationShare));
    prepare(&mut table);
    assert_eq!(table.access(request, NOW), Err(expected));
    assert_eq!(
        table.usage(PRODUCT).accesses,
        u32::from(expected == Reason::QuantityExhausted)
    );
}

fn entry() -> ItemEntry {
    ItemEntry {
        container: soft(),
        product: PRODUCT,
        name: "cad-pro".to_owned(),
        rules: rules(1, Counting::StationShare),
        state: ItemState::Valid,
        units_left: None,
    }
}

fn ts_local() -> AccessRequest {
    let session = rdp();
    AccessRequest {
        station: StationId::for_session("ts1", MachineRole::TerminalServer, 3, &session),
        role: MachineRole::TerminalServer,
        session,
        ..local("ts1", 1)
    }
}

#[test]
fn expiry_is_checked_against_now() {
    let mut table = table_with(ItemRules {
        expires_at: Some(NOW + 1),
        ..rules(5, Counting::UserLimit)
    });
    let grant = table.access(local("ws1", 1), NOW).unwrap();
    assert_eq!(
        table.access(local("ws1", 2), NOW + 1),
        Err(Reason::LicenceExpired)
    );
    let revoked = table.revoke_unusable(NOW + 1);
    assert_eq!(revoked.len(), 1);
    assert_eq!(revoked[0].0.handle, grant.handle);
    assert_eq!(revoked[0].1, Reason::LicenceExpired);
    assert_eq!(table.release(grant.handle), Err(Reason::NotHeld));
}

#[test]
fn locking_an_item_revokes_its_holders() {
    let mut table = table_with(rules(5, Counting::UserLimit));
    table.access(local("ws1", 1), NOW).unwrap();
    table.access(local("ws1", 2), NOW).unwrap();
    assert!(table.revoke_unusable(NOW).is_empty());
    table
        .set_state(&soft(), PRODUCT, ItemState::Locked)
        .unwrap();
    let revoked = table.revoke_unusable(NOW);
    assert_eq!(revoked.len(), 2);
    assert!(
        revoked
            .iter()
            .all(|(_, reason)| *reason == Reason::LicenceLocked)
    );
    assert_eq!(table.usage(PRODUCT), Usage::default());
}

#[test]
fn every_access_to_a_metered_item_takes_a_unit() {
    let mut table = table_with(rules(1, Counting::StationShare));
    table.set_units_left(&soft(), PRODUCT, Some(2)).unwrap();
    assert_eq!(
        table.access(local("ws1", 1), NOW).unwrap().units_left,
        Some(1)
    );
    assert_eq!(
        table.access(local("ws1", 2), NOW).unwrap().units_left,
        Some(0)
    );
    assert_eq!(
        table.access(local("ws1", 3), NOW),
        Err(Reason::UnitsExhausted)
    );
    assert_eq!(table.items()[0].entry.units_left, Some(0));
}

#[test]
fn release_by_handle_holder_and_remote_peer() {
    let mut table = table_with(rules(10, Counting::UserLimit));
    let a = table.access(local("ws1", 1), NOW).unwrap();
    table.access(local("ws1", 2), NOW).unwrap();
    table.access(local("ws1", 2), NOW).unwrap();
    let r1 = table.access(ts_session("ts1", 1), NOW).unwrap();
    let r2 = table.access(ts_session("ts1", 2), NOW).unwrap();
    let other_peer = table.access(ts_session("tsx2", 1), NOW).unwrap();

    assert_eq!(
        table.release(a.handle).unwrap().holder,
        HolderId::Local { pid: 1 }
    );
    assert_eq!(table.release(a.handle), Err(Reason::NotHeld));
    assert_eq!(table.release_holder(&HolderId::Local { pid: 2 }).len(), 2);
    assert!(table.release_holder(&HolderId::Local { pid: 2 }).is_empty());

    let mut released = table.release_station_remote("127.0.1.3:40000");
    released.sort_unstable();
    assert_eq!(released, vec![r1.handle, r2.handle]);
    assert_eq!(
        table.release_station_remote("127.0.1.4"),
        vec![other_peer.handle]
    );
    assert_eq!(table.usage(PRODUCT), Usage::default());
}

#[test]
fn handles_are_never_reused() {
    let mut table = table_with(rules(1, Counting::UserLimit));
    let first = table.access(local("ws1", 1), NOW).unwrap().handle;
    table.release(first).unwrap();
    let second = table.access(local("ws1", 1), NOW).unwrap().handle;
    assert_ne!(first, second);
}

#[test]
fn a_full_container_falls_over_to_the_next_one() {
    let mut table = table_with(rules(1, Counting::StationShare));
    let dongle = ContainerId::new(ContainerClass::Dongle, "3-1234");
    table.upsert_item(ItemEntry {
        container: dongle.clone(),
        ..entry()
    });
    assert_eq!(
        table.access(local("ws1", 1), NOW).unwrap().container,
        soft()
    );
    assert_eq!(
        table.access(local("ws2", 2), NOW).unwrap().container,
        dongle
    );
    assert_eq!(
        table.access(local("ws3", 3), NOW),
        Err(Reason::QuantityExhausted)
    );
    let removed = table.remove_container(&dongle);
    assert_eq!(removed.len(), 1);
    assert_eq!(removed[0].station, StationId::machine("ws2"));
    assert_eq!(table.items().len(), 1);
}

#[test]
fn a_corrupt_container_does_not_hide_a_valid_one() {
    let mut table = table_with(rules(1, Counting::StationShare));
    table
        .set_state(&soft(), PRODUCT, ItemState::Corrupt)
        .unwrap();
    let dongle = ContainerId::new(ContainerClass::Dongle, "3-1234");
    table.upsert_item(ItemEntry {
        container: dongle.clone(),
        ..entry()
    });
    assert_eq!(
        table.access(local("ws1", 1), NOW).unwrap().container,
        dongle
    );
    assert_eq!(
        table.access(local("ws2", 2), NOW),
        Err(Reason::LicenceCorrupt)
    );
}

#[test]
fn remote_access_from_a_guest_is_allowed_when_vms_are_denied() {
    let mut table = table_with(ItemRules {
        virtual_machines: Allowance::Deny,
        ..rules(1, Counting::StationShare)
    });
    let mut request = remote_from("vm1", MachineRole::Workstation, 1, SessionKind::Console);
    request.is_guest = true;
    assert!(table.access(request, NOW).is_ok());
}

#[test]
fn the_table_survives_serialization() {
    let mut table = table_with(rules(3, Counting::StationShare));
    table.access(local("ws1", 1), NOW).unwrap();
    table.access(ts_session("ts1", 4), NOW).unwrap();
    let json = serde_json::to_string(&table).unwrap();
    let mut restored: AllocationTable = serde_json::from_str(&json).unwrap();
    assert_eq!(restored, table);
    let bytes = postcard::to_stdvec(&table).unwrap();
    assert_eq!(
        postcard::from_bytes::<AllocationTable>(&bytes).unwrap(),
        table
    );
    let next = restored.access(local("ws2", 2), NOW).unwrap();
    assert_eq!(next.handle, 3);
}
