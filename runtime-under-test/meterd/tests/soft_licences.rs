//! Soft licences end to end: activation on a simulated machine, copies, tampering, the VM switch,
//! traits changing under a running daemon, and rollback of the state folder.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Daemon, METER, Machine, Vendor, server_endpoint, wait_linked, wait_until};
use serde_json::{Value, json};

/// A guest on an Intel host, or the host itself, with a full set of traits.
fn machine_json(name: &str, kind: &str, cpu_model: &str, address: &str) -> Value {
    json!({
        "kind": kind, "name": name, "address": address,
        "traits": {
            "cpu.vendor": "GenuineIntel", "cpu.model-name": cpu_model, "cpu.family": "6",
            "cpu.model": "85", "cpu.stepping": "7", "cpu.microcode": "0x5003604",
            "cpu.flags": format!("flags-{cpu_model}"), "board.serial": format!("board-{name}"),
            "product.uuid": format!("uuid-{name}"), "product.serial": format!("serial-{name}"),
            "disk.serial": [format!("disk-{name}")], "nic.mac": [format!("52:54:00:00:00:{:02x}", name.len())],
        },
    })
}

fn set_machine(machine: &Machine, description: &Value) {
    let path = machine.platform().join("machine.json");
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, description.to_string()).unwrap();
    std::fs::rename(tmp, path).unwrap();
}

fn set_vmgenid(machine: &Machine, id: &str) {
    std::fs::write(machine.platform().join("vmgenid"), id).unwrap();
}

fn write_policy(vendor: &Vendor, name: &str, products: &[&str]) -> PathBuf {
    let policy = vendor.dir.path().join(format!("{name}.yaml"));
    let mut yaml = String::from("firm: 10\nfirm-name: acme\nproducts:\n");
    for p in products {
        yaml.push_str(&format!("  - {p}\n"));
    }
    std::fs::write(&policy, yaml).unwrap();
    policy
}

/// The policy of one metered product `name` (`code`) of `units` that reconciles after a rollback.
fn reconciled_credits(vendor: &Vendor, name: &str, code: u32, units: u64) -> PathBuf {
    let product = format!(
        "{{ code: {code}, name: {name}, container: soft, quantity: 1, counting: user-limit, units: {units}, on-rollback: reconcile }}"
    );
    write_policy(vendor, name, &[&product])
}

/// Spends `uses` units of `product` on `machine`, each granted.
fn spend(machine: &Machine, product: u32, uses: u64) {
    for _ in 0..uses {
        let (code, answer) = access(machine, product);
        assert_eq!(code, 0, "{answer}");
    }
}

fn meter_json(args: &[&str]) -> (i32, Value) {
    let out = Command::new(METER)
        .arg("--json")
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let value = stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or(Value::Null);
    (out.status.code().unwrap_or(-1), value)
}

/// Runs the activation flow; returns the vendor's exit code and JSON, and the licence file.
fn activate(
    machine: &Machine,
    vendor: &Vendor,
    policy: &Path,
    product: u32,
) -> (i32, Value, PathBuf) {
    let (code, out) = machine.meter(&["trust", vendor.certificate().to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    let request = machine.dir.path().join(format!("{product}.request"));
    let (code, out) = machine.meter(&[
        "activate",
        "request",
        "--firm",
        "10",
        "--product",
        &product.to_string(),
        "--out",
        request.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}");
    let licence = vendor
        .dir
        .path()
        .join(format!("{}-{product}.licence", machine.name));
    let key = vendor.dir.path().join("vendor.key");
    let (code, answer) = meter_json(&[
        "vendor",
        "activate",
        "--request",
        request.to_str().unwrap(),
        "--policy",
        policy.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
        "--out",
        licence.to_str().unwrap(),
    ]);
    (code, answer, licence)
}

fn apply(machine: &Machine, licence: &Path) -> (i32, Value) {
    machine.meter(&["activate", "apply", licence.to_str().unwrap()])
}

fn product_status(machine: &Machine, code: u64) -> Value {
    let (rc, status) = machine.meter(&["status"]);
    assert_eq!(rc, 0, "{status}");
    status["containers"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|c| c["products"].as_array().cloned().unwrap_or_default())
        .find(|p| p["code"] == code)
        .unwrap_or(Value::Null)
}

fn access(machine: &Machine, product: u32) -> (i32, Value) {
    machine.meter(&["access", "--product", &product.to_string(), "--firm", "10"])
}

#[test]
fn activated_licence_is_valid_here_corrupt_when_copied_and_refused_when_tampered() {
    let vendor = Vendor::new();
    let policy = write_policy(
        &vendor,
        "medium",
        &[
            "{ code: 1001, name: cad-pro, container: soft, quantity: 1, binding: { scheme: smartbind, tolerance: medium } }",
        ],
    );
    let vm1 = Machine::new("vm1", "workstation", "127.0.0.1");
    set_machine(
        &vm1,
        &machine_json("vm1", "guest", "Xeon Gold 6248", "127.0.0.1"),
    );
    let _d1 = vm1.start(&[]);
    let started = Instant::now();
    let (code, answer, licence) = activate(&vm1, &vendor, &policy, 1001);
    assert_eq!(code, 0, "{answer}");
    let (code, installed) = apply(&vm1, &licence);
    let activation = started.elapsed();
    assert_eq!(code, 0, "{installed}");
    assert_eq!(installed["state"], "valid", "{installed}");
    eprintln!(
        "activation: request + vendor answer + apply {activation:?} (vendor answer alone {} ms)",
        answer["elapsed_ms"]
    );
    let (code, granted) = access(&vm1, 1001);
    assert_eq!(code, 0, "{granted}");
    let status = vm1.meter(&["status"]).1;
    assert!(status["machine"]["runtime_id"].is_string(), "{status}");

    // The same file copied to a guest on another host: installed, but corrupt.
    let vm2 = Machine::new("vm2", "workstation", "127.0.0.1");
    set_machine(
        &vm2,
        &machine_json("vm2", "guest", "Xeon Gold 6348", "127.0.0.1"),
    );
    let _d2 = vm2.start(&[]);
    vm2.install_trust(&vendor);
    let (code, copied) = apply(&vm2, &licence);
    assert_eq!(code, 0, "{copied}");
    assert_eq!(copied["state"], "corrupt", "{copied}");
    assert_eq!(copied["reason"], "licence-corrupt", "{copied}");
    assert_eq!(product_status(&vm2, 1001)["state"], "corrupt");
    let (code, denied) = access(&vm2, 1001);
    assert_eq!(
        (code, denied["reason"].as_str()),
        (1, Some("licence-corrupt")),
        "{denied}"
    );

    // A tampered file is refused and the state stays as it was.
    let before = vm1.meter(&["status"]).1["containers"].clone();
    let text = std::fs::read_to_string(&licence).unwrap();
    let tampered_path = vendor.dir.path().join("tampered.json");
    std::fs::write(&tampered_path, text.replacen("cad-pro", "cad-max", 1)).unwrap();
    let (code, refused) = apply(&vm1, &tampered_path);
    assert_eq!(code, 1, "{refused}");
    assert_eq!(refused["reason"], "signature-invalid", "{refused}");
    assert_eq!(vm1.meter(&["status"]).1["containers"], before);
}

trait TrustVendor {
    fn install_trust(&self, vendor: &Vendor);
}

impl TrustVendor for Machine {
    fn install_trust(&self, vendor: &Vendor) {
        let (code, out) = self.meter(&["trust", vendor.certificate().to_str().unwrap()]);
        assert_eq!(code, 0, "{out}");
        // Trusting the same key again is fine.
        let (code, out) = self.meter(&["trust", vendor.certificate().to_str().unwrap()]);
        assert_eq!(code, 0, "{out}");
    }
}

#[test]
fn vendor_denying_virtual_machines_refuses_guests_and_copies_into_guests() {
    let vendor = Vendor::new();
    let policy = write_policy(
        &vendor,
        "no-vm",
        &["{ code: 1001, name: cad-pro, container: soft, quantity: 1, virtual-machines: deny }"],
    );
    let guest = Machine::new("vm1", "workstation", "127.0.0.1");
    set_machine(
        &guest,
        &machine_json("vm1", "guest", "Xeon Gold 6248", "127.0.0.1"),
    );
    let _dg = guest.start(&[]);
    let (code, refused, _) = activate(&guest, &vendor, &policy, 1001);
    assert_eq!(code, 1, "{refused}");
    assert_eq!(refused["reason"], "vm-not-allowed", "{refused}");

    let host = Machine::new("host-a", "workstation", "127.0.0.1");
    set_machine(
        &host,
        &machine_json("host-a", "physical", "Xeon Gold 6248", "127.0.0.1"),
    );
    let _dh = host.start(&[]);
    let (code, answer, licence) = activate(&host, &vendor, &policy, 1001);
    assert_eq!(code, 0, "{answer}");
    assert_eq!(apply(&host, &licence).1["state"], "valid");
    assert_eq!(access(&host, 1001).0, 0);

    let (code, copied) = apply(&guest, &licence);
    assert_eq!(code, 0, "{copied}");
    let (code, denied) = access(&guest, 1001);
    assert_eq!(
        (code, denied["reason"].as_str()),
        (1, Some("vm-not-allowed")),
        "{denied}"
    );
}

#[test]
fn a_running_daemon_notices_its_machine_changing() {
    let vendor = Vendor::new();
    let policy = write_policy(
        &vendor,
        "strict",
        &[
            "{ code: 1001, name: cad-pro, container: soft, quantity: 1, binding: { scheme: smartbind, tolerance: strict } }",
        ],
    );
    let ws = Machine::new("ws1", "workstation", "127.0.0.1");
    set_machine(
        &ws,
        &machine_json("ws1", "physical", "Core i7", "127.0.0.1"),
    );
    let _d = ws.start(&[]);
    let (code, answer, licence) = activate(&ws, &vendor, &policy, 1001);
    assert_eq!(code, 0, "{answer}");
    assert_eq!(apply(&ws, &licence).1["state"], "valid");
    let holder = ws.hold(1001, None);
    assert!(holder.granted(), "{}", holder.first);

    // A new network card under strict tolerance: corrupt, and the holder loses its licence.
    let mut changed = machine_json("ws1", "physical", "Core i7", "127.0.0.1");
    changed["traits"]["nic.mac"] = json!(["a4:bb:6d:99:99:99"]);
    set_machine(&ws, &changed);
    assert_eq!(product_status(&ws, 1001)["state"], "corrupt");
    assert_eq!(product_status(&ws, 1001)["in_use"]["accesses"], 0);
    assert_eq!(access(&ws, 1001).1["reason"], "licence-corrupt");

    // The old card back: valid again.
    set_machine(
        &ws,
        &machine_json("ws1", "physical", "Core i7", "127.0.0.1"),
    );
    assert_eq!(product_status(&ws, 1001)["state"], "valid");
    assert_eq!(access(&ws, 1001).0, 0);
}

/// Copies a state folder (the daemon stopped), as a snapshot does.
fn copy_dir(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

fn units_left(machine: &Machine, product: u64) -> Option<u64> {
    product_status(machine, product)["units_left"].as_u64()
}

#[test]
fn reverting_the_state_with_a_new_vmgenid_locks_metered_items() {
    let vendor = Vendor::new();
    let policy = write_policy(
        &vendor,
        "units",
        &[
            "{ code: 3002, name: export-credits, container: soft, quantity: 1, counting: user-limit, units: 5, on-rollback: lock }",
        ],
    );
    let vm = Machine::new("vm1", "workstation", "127.0.0.1");
    set_machine(
        &vm,
        &machine_json("vm1", "guest", "Xeon Gold 6248", "127.0.0.1"),
    );
    set_vmgenid(&vm, "0123456789abcdef0123456789abcdef");
    let daemon = vm.start(&[]);
    let (code, answer, licence) = activate(&vm, &vendor, &policy, 3002);
    assert_eq!(code, 0, "{answer}");
    assert_eq!(apply(&vm, &licence).1["state"], "valid");
    assert_eq!(units_left(&vm, 3002), Some(5));
    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    drop(daemon);
    let snapshot = vm.dir.path().join("snapshot");
    copy_dir(&vm.state(), &snapshot);

    let daemon = vm.start(&[]);
    assert_eq!(access(&vm, 3002).0, 0);
    assert_eq!(access(&vm, 3002).0, 0);
    assert_eq!(units_left(&vm, 3002), Some(3));
    drop(daemon);

    // Revert: the old state folder, and the hypervisor hands out a new vmgenid.
    copy_dir(&snapshot, &vm.state());
    set_vmgenid(&vm, "fedcba9876543210fedcba9876543210");
    let _daemon = vm.start(&[]);
    assert_eq!(product_status(&vm, 3002)["state"], "locked");
    let (code, denied) = access(&vm, 3002);
    assert_eq!(
        (code, denied["reason"].as_str()),
        (1, Some("rollback-detected")),
        "{denied}"
    );
}

/// A guest `vm1` whose runtime has a licence of `product` activated and applied, linked to the
/// witness server `host-a`, stopped; a copy of its state taken then (the snapshot to revert to).
struct WitnessedGuest {
    _server: Machine,
    _server_daemon: Daemon,
    vm: Machine,
    remote: Vec<String>,
    snapshot: PathBuf,
}

impl WitnessedGuest {
    fn new(vendor: &Vendor, policy: &Path, product: u32) -> Self {
        let server = Machine::new("host-a", "workstation", "127.0.0.1");
        set_machine(
            &server,
            &machine_json("host-a", "physical", "Xeon Gold 6248", "127.0.0.1"),
        );
        let server_daemon = server.start(&["--server", "--listen", "127.0.0.1:0"]);
        let (addr, pin) = server_endpoint(&server);
        let vm = Machine::new("vm1", "workstation", "127.0.0.1");
        set_machine(
            &vm,
            &machine_json("vm1", "guest", "Xeon Gold 6248", "127.0.0.1"),
        );
        set_vmgenid(&vm, "0123456789abcdef0123456789abcdef");
        let remote = vec!["--remote".to_owned(), addr, "--pin".to_owned(), pin];
        let guest = WitnessedGuest {
            _server: server,
            _server_daemon: server_daemon,
            vm,
            remote,
            snapshot: PathBuf::new(),
        };
        let daemon = guest.start();
        let (code, answer, licence) = activate(&guest.vm, vendor, policy, product);
        assert_eq!(code, 0, "{answer}");
        assert_eq!(apply(&guest.vm, &licence).1["state"], "valid");
        drop(daemon);
        let snapshot = guest.vm.dir.path().join("snapshot");
        copy_dir(&guest.vm.state(), &snapshot);
        WitnessedGuest { snapshot, ..guest }
    }

    fn start(&self) -> Daemon {
        let args: Vec<&str> = self.remote.iter().map(String::as_str).collect();
        self.vm.start(&args)
    }

    /// Puts the snapshot's state back, as a revert does, with the new vmgenid a revert brings.
    fn revert(&self) {
        copy_dir(&self.snapshot, &self.vm.state());
        set_vmgenid(&self.vm, "fedcba9876543210fedcba9876543210");
    }
}

#[test]
fn reverting_the_state_reconciles_units_with_the_server_witness() {
    let vendor = Vendor::new();
    let policy = reconciled_credits(&vendor, "render-credits", 3001, 10);
    let guest = WitnessedGuest::new(&vendor, &policy, 3001);
    let vm = &guest.vm;
    let daemon = guest.start();
    spend(vm, 3001, 3);
    assert_eq!(units_left(vm, 3001), Some(7));
    drop(daemon);

    guest.revert();
    let _daemon = guest.start();
    // No units come back: the witness knows three were spent.
    assert!(
        wait_until(Duration::from_secs(5), || units_left(vm, 3001) == Some(7)).is_some(),
        "{}",
        product_status(vm, 3001)
    );
    assert_eq!(product_status(vm, 3001)["state"], "valid");
    assert_eq!(access(vm, 3001).0, 0);
    assert_eq!(units_left(vm, 3001), Some(6));
}

#[test]
fn a_restored_state_folder_gives_no_unit_back() {
    let vendor = Vendor::new();
    let policy = reconciled_credits(&vendor, "few-credits", 3003, 3);
    let guest = WitnessedGuest::new(&vendor, &policy, 3003);
    let vm = &guest.vm;
    let daemon = guest.start();
    spend(vm, 3003, 3);
    assert_eq!(units_left(vm, 3003), Some(0));
    drop(daemon);
    // The licensee copies the state folder saved before the spends back: a file copy on the
    // same machine, so no vmgenid change and no clock turned back tell of it.
    copy_dir(&guest.snapshot, &vm.state());
    let _daemon = guest.start();
    let (code, denied) = access(vm, 3003);
    assert_eq!(
        (code, denied["reason"].as_str()),
        (1, Some("units-exhausted")),
        "the first spend after the restore: {denied}"
    );
    assert_eq!(units_left(vm, 3003), Some(0));
    assert_eq!(product_status(vm, 3003)["state"], "valid");
}

#[test]
fn a_required_witness_is_asked_for_every_unit() {
    let vendor = Vendor::new();
    let product = "{ code: 3005, name: audited-credits, container: soft, quantity: 1, counting: user-limit, units: 5, on-rollback: reconcile, witness: required }";
    let policy = write_policy(&vendor, "audited-credits", &[product]);
    let guest = WitnessedGuest::new(&vendor, &policy, 3005);
    let vm = &guest.vm;
    // With its witness linked, units are spent as usual.
    let daemon = guest.start();
    wait_linked(vm);
    spend(vm, 3005, 2);
    assert_eq!(units_left(vm, 3005), Some(3));
    drop(daemon);
    // Started without a server, the runtime spends nothing: no witness vouches for what it
    // loaded from the disk, and none would take the receipt.
    let _daemon = vm.start(&[]);
    for _ in 0..2 {
        let (code, denied) = access(vm, 3005);
        assert_eq!(
            (code, denied["reason"].as_str()),
            (1, Some("witness-unreachable")),
            "{denied}"
        );
    }
    assert_eq!(units_left(vm, 3005), Some(3));
    // Each grant was withdrawn after the table gave it: the log shows the denials the app got.
    let (code, report) = vm.meter(&["usage", "report"]);
    assert_eq!(code, 0, "{report}");
    let denied: u64 = report["denials"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["reason"] == "witness-unreachable")
        .map(|d| d["count"].as_u64().unwrap())
        .sum();
    assert_eq!(denied, 2, "{report}");
}

#[test]
fn a_reverted_guest_pointed_at_an_empty_server_stays_locked() {
    let vendor = Vendor::new();
    let policy = reconciled_credits(&vendor, "render-credits", 3001, 10);
    let guest = WitnessedGuest::new(&vendor, &policy, 3001);
    let vm = &guest.vm;
    let daemon = guest.start();
    assert_eq!(access(vm, 3001).0, 0);
    drop(daemon);
    // The snapshot to go back to holds one receipt; two more units are spent after it.
    let snapshot = vm.dir.path().join("snapshot-after-one");
    copy_dir(&vm.state(), &snapshot);
    let daemon = guest.start();
    spend(vm, 3001, 2);
    assert_eq!(units_left(vm, 3001), Some(7));
    drop(daemon);

    copy_dir(&snapshot, &vm.state());
    set_vmgenid(vm, "fedcba9876543210fedcba9876543210");
    // A fresh server has seen none of the guest's receipts, so it cannot vouch for the revert.
    let empty = Machine::new("host-b", "workstation", "127.0.0.1");
    let _empty_daemon = empty.start(&["--server", "--listen", "127.0.0.1:0"]);
    let (addr, pin) = server_endpoint(&empty);
    let daemon = vm.start(&["--remote", &addr, "--pin", &pin]);
    wait_linked(vm);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(product_status(vm, 3001)["state"], "locked");
    // Asking again changes nothing: the empty server was not handed the guest's chain.
    for _ in 0..2 {
        let (code, denied) = access(vm, 3001);
        assert_eq!(
            (code, denied["reason"].as_str()),
            (1, Some("rollback-detected")),
            "{denied}"
        );
    }
    assert_eq!(product_status(vm, 3001)["state"], "locked");
    drop(daemon);
    // Its own witness unlocks it, with the two later units still spent.
    let _daemon = guest.start();
    assert!(
        wait_until(Duration::from_secs(5), || units_left(vm, 3001) == Some(7)).is_some(),
        "{}",
        product_status(vm, 3001)
    );
    assert_eq!(product_status(vm, 3001)["state"], "valid");
}

#[test]
fn a_thousand_uses_reconcile_with_the_witness_page_by_page() {
    const USES: u64 = 1000;
    let vendor = Vendor::new();
    let policy = reconciled_credits(&vendor, "many-credits", 3002, 5000);
    let guest = WitnessedGuest::new(&vendor, &policy, 3002);
    let vm = &guest.vm;
    let daemon = guest.start();
    spend(vm, 3002, USES);
    assert_eq!(units_left(vm, 3002), Some(5000 - USES));
    drop(daemon);

    guest.revert();
    let started = Instant::now();
    let _daemon = guest.start();
    // The witness's chain of a thousand receipts is far over one frame: it comes in pages.
    assert!(
        wait_until(Duration::from_secs(20), || units_left(vm, 3002)
            == Some(5000 - USES))
        .is_some(),
        "{}",
        product_status(vm, 3002)
    );
    println!(
        "{USES} receipts reconciled {:?} after the restart",
        started.elapsed()
    );
    assert_eq!(product_status(vm, 3002)["state"], "valid");
}

/// `machine`'s activation request for product 1001, naming its server certificate when
/// `triad_member`.
fn request_1001(machine: &Machine, triad_member: bool) -> PathBuf {
    let file = if triad_member {
        "1001-triad.request"
    } else {
        "1001.request"
    };
    let request = machine.dir.path().join(file);
    let mut args = vec![
        "activate",
        "request",
        "--firm",
        "10",
        "--product",
        "1001",
        "--out",
        request.to_str().unwrap(),
    ];
    if triad_member {
        args.push("--triad-member");
    }
    let (code, out) = machine.meter(&args);
    assert_eq!(code, 0, "{out}");
    assert_eq!(out["triad_member"], triad_member, "{out}");
    request
}

#[test]
fn a_triad_licence_serves_nothing_outside_its_triad_and_needs_three_named_servers() {
    let vendor = Vendor::new();
    let policy = write_policy(
        &vendor,
        "triad",
        &["{ code: 1001, name: cad-pro, container: soft, quantity: 2 }"],
    );
    let key = vendor.dir.path().join("vendor.key");
    let members: Vec<Machine> = (1..=3)
        .map(|n| {
            let name = format!("srv-{n}");
            let machine = Machine::new(&name, "workstation", "127.0.0.1");
            let cpu = format!("Xeon Gold 62{n}8");
            set_machine(
                &machine,
                &machine_json(&name, "physical", &cpu, "127.0.0.1"),
            );
            machine
        })
        .collect();
    let _daemons: Vec<_> = members.iter().map(|m| m.start(&[])).collect();
    let mut requests = Vec::new();
    for member in &members {
        member.install_trust(&vendor);
        requests.push(request_1001(member, true));
    }
    let outs: Vec<PathBuf> = (1..=3)
        .map(|n| vendor.dir.path().join(format!("srv-{n}.licence")))
        .collect();
    let answer = |requests: &[PathBuf]| {
        let mut args = vec!["vendor".to_owned(), "activate-triad".to_owned()];
        for request in requests {
            args.extend(["--request".to_owned(), request.display().to_string()]);
        }
        for out in &outs {
            args.extend(["--out".to_owned(), out.display().to_string()]);
        }
        args.extend(["--policy".to_owned(), policy.display().to_string()]);
        args.extend(["--key".to_owned(), key.display().to_string()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        meter_json(&args)
    };

    // A request that names no server certificate cannot be part of a triad licence.
    let plain = request_1001(&members[2], false);
    let (code, refused) = answer(&[requests[0].clone(), requests[1].clone(), plain]);
    assert_eq!(
        (code, refused["reason"].as_str()),
        (1, Some("triad-required")),
        "{refused}"
    );
    assert!(!outs[0].exists(), "a refusal writes nothing");

    let (code, issued) = answer(&requests);
    assert_eq!(code, 0, "{issued}");
    let copies: Vec<Value> = outs
        .iter()
        .map(|out| serde_json::from_str(&std::fs::read_to_string(out).unwrap()).unwrap())
        .collect();
    assert_eq!(copies[0]["body"]["triad"], copies[2]["body"]["triad"]);
    assert_eq!(
        copies[0]["body"]["triad"]["id"], issued["triad"],
        "{issued}"
    );
    for (member, out) in members.iter().zip(&outs) {
        let (code, installed) = apply(member, out);
        assert_eq!(code, 0, "{installed}");
        // Served by a lone server, it grants nothing.
        assert_eq!(product_status(member, 1001)["state"], "outside-triad");
        let (code, denied) = access(member, 1001);
        assert_eq!(
            (code, denied["reason"].as_str()),
            (1, Some("triad-required")),
            "{denied}"
        );
    }
    // Another member's copy does not open here.
    let (code, foreign) = apply(&members[0], &outs[1]);
    assert_eq!(
        (code, foreign["state"].as_str()),
        (0, Some("corrupt")),
        "{foreign}"
    );
}
