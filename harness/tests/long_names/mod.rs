//! Scenarios whose names are as long as names may be (socket paths must not grow with them).

/// `dongle-hop` with a 60-character scenario name and 64-character machine and dongle names.
pub fn dongle_hop() -> String {
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios/dongle-hop.yaml"),
    )
    .unwrap();
    let scenario = format!("dongle-hop-{}", "n".repeat(49));
    let vm1 = format!("vm1-{}", "a".repeat(60));
    let vm2 = format!("vm2-{}", "b".repeat(60));
    let dongle = format!("d1-{}", "c".repeat(61));
    assert_eq!((scenario.len(), vm1.len(), dongle.len()), (60, 64, 64));
    text.replace("name: dongle-hop", &format!("name: {scenario}"))
        .replace("vm1", &vm1)
        .replace("vm2", &vm2)
        .replace("d1", &dongle)
}
