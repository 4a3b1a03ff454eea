//! Activation: sealed requests, vendor answers and refusals, end to end.

use meter_core::activation::{
    ActivationAnswer, ActivationError, ActivationRequest, SealedRequest, TriadAnswer, answer,
    answer_triad,
};
use meter_core::licence::{VendorKey, open_products};
use meter_core::policy::ProductPolicy;
use meter_core::reason::Reason;
use meter_core::traits::{MachineKind, MachineTraits, names};
use rstest::rstest;

const NOW: u64 = 1_800_000_000_000;

fn vendor() -> VendorKey {
    VendorKey::from_seeds([21; 32], [22; 32])
}

fn policy(vms: &str) -> ProductPolicy {
    ProductPolicy::from_yaml(&format!(
        "firm: 10\nproducts:\n  - {{ code: 1001, name: cad-pro, virtual-machines: {vms} }}\n  - {{ code: 2001, name: dongle-only, container: dongle }}\n"
    ))
    .unwrap()
}

fn guest(host_cpu: &str, uuid: &str) -> MachineTraits {
    MachineTraits::new()
        .with(names::CPU_VENDOR, "GenuineIntel")
        .with(names::CPU_MODEL_NAME, host_cpu)
        .with(names::CPU_FAMILY, "6")
        .with(names::CPU_MODEL, "85")
        .with(names::CPU_STEPPING, "7")
        .with(names::CPU_MICROCODE, "0x5003604")
        .with(names::CPU_FLAGS, "9f2c0e")
        .with(names::PRODUCT_UUID, uuid)
        .with(names::PRODUCT_SERIAL, "vm-serial-1")
        .with(names::DISK_SERIAL, ["QM00001"])
        .with(names::NIC_MAC, ["52:54:00:12:34:56"])
}

fn request(kind: MachineKind, products: Vec<u32>) -> ActivationRequest {
    ActivationRequest {
        firm: 10,
        products,
        kind,
        traits: guest("Intel(R) Xeon(R) Gold 6248", "uuid-vm1"),
        runtime_key: "cd".repeat(32),
        requested_at: NOW,
        server_pin: None,
    }
}

/// A triad member's request: its own machine and server certificate pin.
fn member_request(number: u8) -> ActivationRequest {
    ActivationRequest {
        traits: MachineTraits::new()
            .with(names::CPU_VENDOR, "GenuineIntel")
            .with(names::CPU_MODEL_NAME, format!("Xeon {number}"))
            .with(names::PRODUCT_UUID, format!("uuid-srv{number}"))
            .with(names::PRODUCT_SERIAL, format!("serial-{number}"))
            .with(names::DISK_SERIAL, vec![format!("disk-{number}")])
            .with(names::NIC_MAC, vec![format!("52:54:00:00:00:0{number}")]),
        server_pin: Some(format!("{number:02x}").repeat(32)),
        ..request(MachineKind::Physical, vec![1001])
    }
}

#[test]
fn a_triad_licence_is_one_licence_whose_copies_are_bound_each_to_its_member() {
    let requests: Vec<ActivationRequest> =
        (1..=3).map(|n| through_files(&member_request(n))).collect();
    let seeds = [[1; 32], [2; 32], [3; 32], [4; 32]];
    let answered = answer_triad(&requests, &policy("allow"), &vendor(), NOW, &seeds).unwrap();
    let TriadAnswer::Licences(licences) = answered else {
        panic!("refused: {answered:?}");
    };
    assert_eq!(licences.len(), 3);
    let pins: Vec<String> = requests
        .iter()
        .filter_map(|r| r.server_pin.clone())
        .collect();
    let mut triad_ids = Vec::new();
    for (licence, request) in licences.iter().zip(&requests) {
        let body = licence.verify(&vendor().public()).unwrap();
        let triad = body
            .triad
            .as_ref()
            .expect("a triad licence names its triad");
        assert_eq!(triad.members, pins);
        triad_ids.push(triad.id.clone());
        // Bound to its own member, not to the others.
        assert!(open_products(body, &request.traits).is_ok());
        let other = &requests[(requests.iter().position(|r| r == request).unwrap() + 1) % 3];
        assert!(open_products(body, &other.traits).is_err());
    }
    triad_ids.dedup();
    assert_eq!(triad_ids.len(), 1, "one licence, counted once");
}

#[rstest]
#[case::no_pin(None, "names no server certificate")]
#[case::same_pin(Some("01".repeat(32)), "twice")]
fn a_triad_licence_needs_three_servers_naming_their_certificates(
    #[case] third_pin: Option<String>,
    #[case] message: &str,
) {
    let mut requests: Vec<ActivationRequest> = (1..=3).map(member_request).collect();
    requests[2].server_pin = third_pin;
    let seeds = [[1; 32], [2; 32], [3; 32], [4; 32]];
    let answered = answer_triad(&requests, &policy("allow"), &vendor(), NOW, &seeds).unwrap();
    let TriadAnswer::Refused {
        reason,
        message: text,
    } = answered
    else {
        panic!("answered: {answered:?}");
    };
    assert_eq!(reason, Reason::TriadRequired);
    assert!(text.contains(message), "{text}");
}

/// Seals, writes, reads and opens a request as the runtime and vendor tools do.
fn through_files(request: &ActivationRequest) -> ActivationRequest {
    let file = request.seal(&vendor().public(), [5; 32]).unwrap().to_json();
    SealedRequest::from_json(file.as_bytes(), "vm1.req")
        .unwrap()
        .open(&vendor())
        .unwrap()
}

#[test]
fn a_guest_activation_yields_a_licence_that_opens_only_in_that_guest() {
    let req = request(MachineKind::Guest, vec![1001]);
    let opened = through_files(&req);
    assert_eq!(opened, req);

    let reply = answer(&opened, &policy("allow"), &vendor(), NOW, [6; 32]).unwrap();
    let file = reply.to_json();
    let ActivationAnswer::Licence(licence) =
        ActivationAnswer::from_json(file.as_bytes(), "vm1.lic").unwrap()
    else {
        panic!("refused: {file}");
    };
    assert_eq!(licence.source, "vm1.lic");
    let body = licence.verify(&vendor().public()).unwrap();
    assert_eq!(body.runtime_key.as_deref(), Some(req.runtime_key.as_str()));
    assert_eq!(body.issued_at, NOW);

    let items = open_products(body, &req.traits).unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0].code, 1001);

    // The same guest cloned onto a host with another CPU: the key cannot be rebuilt.
    let clone = guest("AMD EPYC 7543", "uuid-vm1-copy");
    let error = open_products(body, &clone).unwrap_err();
    assert_eq!(error.reason(), Reason::LicenceCorrupt);
}

#[test]
fn the_request_file_does_not_reveal_the_traits() {
    let file = request(MachineKind::Guest, vec![1001])
        .seal(&vendor().public(), [5; 32])
        .unwrap()
        .to_json();
    assert!(!file.contains("52:54:00") && !file.contains("Xeon"));
}

#[test]
fn vm_activation_denied_by_policy_is_refused_with_a_clear_message() {
    let reply = answer(
        &request(MachineKind::Guest, vec![1001]),
        &policy("deny"),
        &vendor(),
        NOW,
        [6; 32],
    )
    .unwrap();
    let ActivationAnswer::Refused { reason, message } = reply else {
        panic!("not refused");
    };
    assert_eq!(reason, Reason::VmNotAllowed);
    assert!(message.contains("1001 (cad-pro)"), "{message}");
    assert!(message.contains("virtual machine"), "{message}");
}

#[test]
fn a_physical_machine_is_activated_when_vms_are_denied() {
    let mut req = request(MachineKind::Physical, vec![1001]);
    req.traits = req
        .traits
        .with(names::BOARD_SERIAL, "BRD-1")
        .with(names::PRODUCT_UUID, "uuid-host");
    let reply = answer(&req, &policy("deny"), &vendor(), NOW, [6; 32]).unwrap();
    assert!(matches!(reply, ActivationAnswer::Licence(_)));
}

#[rstest]
#[case::unknown_code(10, vec![4242], "4242 is not in")]
#[case::dongle_item(10, vec![2001], "dongles only")]
#[case::other_firm(11, vec![1001], "firm 11")]
fn requests_for_products_the_vendor_cannot_activate_are_refused(
    #[case] firm: u32,
    #[case] products: Vec<u32>,
    #[case] says: &str,
) {
    let mut req = request(MachineKind::Guest, products);
    req.firm = firm;
    let reply = answer(&req, &policy("allow"), &vendor(), NOW, [6; 32]).unwrap();
    let ActivationAnswer::Refused { reason, message } = reply else {
        panic!("not refused");
    };
    assert_eq!(reason, Reason::UnknownProduct);
    assert!(message.contains(says), "{message}");
}

#[test]
fn an_empty_product_list_asks_for_every_soft_item() {
    let reply = answer(
        &request(MachineKind::Guest, vec![]),
        &policy("allow"),
        &vendor(),
        NOW,
        [6; 32],
    )
    .unwrap();
    let ActivationAnswer::Licence(licence) = reply else {
        panic!("refused");
    };
    let codes: Vec<u32> = licence.body.catalogue.iter().map(|c| c.code).collect();
    assert_eq!(codes, [1001]);
}

#[test]
fn a_request_for_another_vendor_is_named() {
    let sealed = request(MachineKind::Guest, vec![1001])
        .seal(&VendorKey::from_seeds([1; 32], [2; 32]).public(), [5; 32])
        .unwrap();
    let mut sealed = SealedRequest::from_json(sealed.to_json().as_bytes(), "vm1.req").unwrap();
    let error = sealed.open(&vendor()).unwrap_err();
    assert!(
        matches!(error, ActivationError::WrongVendor { .. }),
        "{error:?}"
    );
    assert!(error.to_string().contains("vm1.req"));

    // Relabelled to the right key id, it still does not decrypt.
    sealed.vendor_key_id = vendor().public().key_id();
    let error = sealed.open(&vendor()).unwrap_err();
    assert!(
        matches!(error, ActivationError::Undecryptable { .. }),
        "{error:?}"
    );
}

#[test]
fn a_damaged_request_does_not_decrypt() {
    let mut sealed = request(MachineKind::Guest, vec![1001])
        .seal(&vendor().public(), [5; 32])
        .unwrap();
    let mut bytes = hex::decode(&sealed.ciphertext).unwrap();
    bytes[10] ^= 0x80;
    sealed.ciphertext = hex::encode(bytes);
    assert!(matches!(
        sealed.open(&vendor()),
        Err(ActivationError::Undecryptable { .. })
    ));
    // A changed firm in the clear header breaks the authentication too.
    let mut relabelled = request(MachineKind::Guest, vec![1001])
        .seal(&vendor().public(), [5; 32])
        .unwrap();
    relabelled.firm = 11;
    assert!(matches!(
        relabelled.open(&vendor()),
        Err(ActivationError::Undecryptable { .. })
    ));
}

#[test]
fn a_truncated_answer_is_malformed() {
    let reply = answer(
        &request(MachineKind::Guest, vec![1001]),
        &policy("allow"),
        &vendor(),
        NOW,
        [6; 32],
    )
    .unwrap()
    .to_json();
    let error =
        ActivationAnswer::from_json(&reply.as_bytes()[..reply.len() - 3], "vm1.lic").unwrap_err();
    assert_eq!(error.to_string(), "Activation file vm1.lic is malformed");
}

#[test]
fn a_refusal_round_trips_through_its_file() {
    let refusal = ActivationAnswer::Refused {
        reason: Reason::VmNotAllowed,
        message: "no".to_owned(),
    };
    let text = refusal.to_json();
    assert!(text.contains("\"vm-not-allowed\""), "{text}");
    assert_eq!(
        ActivationAnswer::from_json(text.as_bytes(), "x").unwrap(),
        refusal
    );
}

#[test]
fn the_vendor_may_keep_triad_members_off_virtual_machines() {
    let policy = ProductPolicy::from_yaml(
        "firm: 10\nproducts:\n  - { code: 1001, name: cad-pro, triad-in-guests: deny }\n",
    )
    .unwrap();
    let seeds = [[1; 32], [2; 32], [3; 32], [4; 32]];
    let physical: Vec<ActivationRequest> = (1..=3).map(member_request).collect();
    let issued = answer_triad(&physical, &policy, &vendor(), NOW, &seeds).unwrap();
    assert!(matches!(issued, TriadAnswer::Licences(_)), "{issued:?}");
    let mut one_guest = physical;
    one_guest[1].kind = MachineKind::Guest;
    let refused = answer_triad(&one_guest, &policy, &vendor(), NOW, &seeds).unwrap();
    let TriadAnswer::Refused { reason, message } = refused else {
        panic!("issued: {refused:?}");
    };
    assert_eq!(reason, Reason::VmNotAllowed);
    assert!(message.contains("triad-in-guests: deny"), "{message}");
}
