//! Random access/release sequences never break the counting rules.

use meter_core::allocation::{
    AccessRequest, AllocationTable, ContainerClass, ContainerId, HolderId, ItemEntry, ItemState,
    Origin, ProductKey,
};
use meter_core::policy::{Allowance, Counting, ItemRules};
use meter_core::reason::Reason;
use meter_core::station::{MachineRole, SessionKind, StationId};
use proptest::prelude::*;

const PRODUCT: ProductKey = ProductKey { firm: 10, code: 7 };

#[derive(Debug, Clone)]
enum Op {
    Access { station: u32, pid: u32 },
    Release { pick: usize },
    Exit { pid: u32 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..6u32, 0..5u32).prop_map(|(station, pid)| Op::Access { station, pid }),
        1 => any::<usize>().prop_map(|pick| Op::Release { pick }),
        1 => (0..5u32).prop_map(|pid| Op::Exit { pid }),
    ]
}

fn counting() -> impl Strategy<Value = Counting> {
    prop_oneof![
        Just(Counting::UserLimit),
        Just(Counting::StationShare),
        Just(Counting::NoCount)
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn counting_rules_hold_after_every_step(
        quantity in 0..4u32,
        counting in counting(),
        ops in prop::collection::vec(op(), 1..40),
    ) {
        let rules = ItemRules {
            quantity,
            counting,
            virtual_machines: Allowance::Allow,
            terminal_server: Allowance::Allow,
            expires_at: None,
        };
        let mut table = AllocationTable::new();
        table.upsert_item(ItemEntry {
            container: ContainerId::new(ContainerClass::Dongle, "d1"),
            product: PRODUCT,
            name: "p".to_owned(),
            rules,
            state: ItemState::Valid,
            units_left: None,
        });
        let capacity = quantity.max(1);
        for op in ops {
            match op {
                Op::Access { station, pid } => {
                    let station = StationId {
                        machine: "ts1".to_owned(),
                        session: Some(station),
                    };
                    let before = table.usage(PRODUCT);
                    let station_held = table.allocations().any(|a| a.station == station);
                    let outcome = table.access(AccessRequest {
                        product: PRODUCT,
                        station: station.clone(),
                        holder: HolderId::Local { pid },
                        origin: Origin::Local,
                        role: MachineRole::Workstation,
                        session: SessionKind::Console,
                        is_guest: false,
                    }, 0);
                    let full = match counting {
                        Counting::UserLimit => before.accesses >= capacity,
                        Counting::StationShare => !station_held && before.stations >= capacity,
                        Counting::NoCount => false,
                    };
                    if full {
                        prop_assert_eq!(outcome, Err(Reason::QuantityExhausted));
                    } else {
                        let grant = outcome.unwrap();
                        let counted = match counting {
                            Counting::UserLimit => true,
                            Counting::StationShare => !station_held,
                            Counting::NoCount => false,
                        };
                        prop_assert_eq!(grant.counted, counted);
                    }
                }
                Op::Release { pick } => {
                    let handles: Vec<_> = table.allocations().map(|a| a.handle).collect();
                    if !handles.is_empty() {
                        let handle = handles[pick % handles.len()];
                        prop_assert!(table.release(handle).is_ok());
                        prop_assert_eq!(table.release(handle), Err(Reason::NotHeld));
                    }
                }
                Op::Exit { pid } => {
                    table.release_holder(&HolderId::Local { pid });
                    let gone = HolderId::Local { pid };
                    prop_assert!(table.allocations().all(|a| a.holder != gone));
                }
            }
            let usage = table.usage(PRODUCT);
            match counting {
                Counting::UserLimit => prop_assert!(usage.accesses <= capacity),
                Counting::StationShare => prop_assert!(usage.stations <= capacity),
                Counting::NoCount => {}
            }
            prop_assert!(usage.stations <= usage.accesses);
        }
    }
}
