//! Licence files: signing, tamper detection, and sealed product content.

use meter_core::licence::{LicenceBody, LicenceError, SignedLicence, VendorKey, open_products};
use meter_core::policy::ProductPolicy;
use meter_core::reason::Reason;
use meter_core::traits::{MachineKind, MachineTraits, names};
use rstest::rstest;

const ISSUED_AT: u64 = 1_800_000_000_000;
const FILE: &str = "cad.lic";

fn policy() -> ProductPolicy {
    ProductPolicy::from_yaml(
        "firm: 10\nfirm-name: Acme\nproducts:\n  - { code: 1001, name: cad-pro, quantity: 3 }\n  - { code: 1002, name: cad-view, counting: no-count }\n",
    )
    .unwrap()
}

fn vendor() -> VendorKey {
    VendorKey::from_seeds([11; 32], [12; 32])
}

fn workstation() -> MachineTraits {
    MachineTraits::new()
        .with(names::CPU_VENDOR, "GenuineIntel")
        .with(names::CPU_MODEL_NAME, "Intel(R) Xeon(R) Gold 6248")
        .with(names::CPU_FAMILY, "6")
        .with(names::CPU_MODEL, "85")
        .with(names::BOARD_SERIAL, "BRD-1234")
        .with(names::PRODUCT_UUID, "4c4c4544-0042-3510-8052-b4c04f4e4a32")
        .with(names::DISK_SERIAL, ["S3Z9NB0K123456"])
        .with(names::NIC_MAC, ["3c:ec:ef:01:02:03"])
}

fn other_machine() -> MachineTraits {
    MachineTraits::new()
        .with(names::CPU_VENDOR, "AuthenticAMD")
        .with(names::CPU_MODEL_NAME, "AMD EPYC 7543")
        .with(names::CPU_FAMILY, "25")
        .with(names::CPU_MODEL, "1")
        .with(names::BOARD_SERIAL, "BRD-9999")
        .with(names::PRODUCT_UUID, "00000000-1111-2222-3333-444444444444")
        .with(names::DISK_SERIAL, ["WD-0000001"])
        .with(names::NIC_MAC, ["3c:ec:ef:09:09:09"])
}

fn unbound_file() -> String {
    vendor()
        .sign_licence(LicenceBody::unbound(&policy(), ISSUED_AT, [1; 32]))
        .to_json()
}

fn bound_licence(traits: &MachineTraits) -> SignedLicence {
    let policy = policy();
    let body = LicenceBody::bound(
        &policy,
        policy.products.clone(),
        traits,
        MachineKind::Physical,
        Some("ab".repeat(32)),
        ISSUED_AT,
        [2; 32],
    )
    .unwrap();
    vendor().sign_licence(body)
}

#[test]
fn an_unbound_licence_verifies_and_carries_its_items_in_the_clear() {
    let licence = SignedLicence::from_json(unbound_file().as_bytes(), FILE).unwrap();
    let body = licence.verify(&vendor().public()).unwrap();
    assert!(!body.is_bound());
    assert_eq!(body.firm, 10);
    let items = open_products(body, &MachineTraits::new()).unwrap();
    assert_eq!(items, policy().products);
    assert_eq!(body.catalogue.len(), 2);
}

#[test]
fn a_bound_licence_opens_only_with_the_machine_traits() {
    let file = bound_licence(&workstation()).to_json();
    assert!(!file.contains("\"quantity\"") && !file.contains("station-share"));
    let licence = SignedLicence::from_json(file.as_bytes(), FILE).unwrap();
    let body = licence.verify(&vendor().public()).unwrap();
    assert!(body.is_bound() && body.products.is_empty());
    assert_eq!(body.catalogue[0].name, "cad-pro");

    assert_eq!(
        open_products(body, &workstation()).unwrap(),
        policy().products
    );

    let error = open_products(body, &other_machine()).unwrap_err();
    assert!(matches!(error, LicenceError::Binding { .. }), "{error:?}");
    assert_eq!(error.reason(), Reason::LicenceCorrupt);
    assert!(error.to_string().contains(&body.licence_id));
}

#[test]
fn swapping_sealed_content_between_licences_is_detected() {
    let first = bound_licence(&workstation());
    let policy = policy();
    let mut second = LicenceBody::bound(
        &policy,
        vec![policy.products[1].clone()],
        &workstation(),
        MachineKind::Physical,
        None,
        ISSUED_AT,
        [3; 32],
    )
    .unwrap();
    second.sealed = first.body.sealed.clone();
    let error = open_products(&second, &workstation()).unwrap_err();
    assert!(
        matches!(error, LicenceError::ContentCorrupt { .. }),
        "{error:?}"
    );
}

#[test]
fn items_with_different_binding_policies_need_separate_licences() {
    let mut policy = policy();
    policy.products[1].binding.tolerance = meter_core::policy::Tolerance::Strict;
    let error = LicenceBody::bound(
        &policy,
        policy.products.clone(),
        &workstation(),
        MachineKind::Physical,
        None,
        ISSUED_AT,
        [4; 32],
    )
    .unwrap_err();
    assert!(error.to_string().contains("1001 and 1002"), "{error}");
}

#[rstest]
#[case::quantity("\"quantity\": 3", "\"quantity\": 9")]
#[case::firm("\"firm\": 10", "\"firm\": 11")]
#[case::issued_at("\"issued-at\": 1800000000000", "\"issued-at\": 1900000000000")]
#[case::counting("\"counting\": \"no-count\"", "\"counting\": \"user-limit\"")]
fn an_edited_value_is_named_as_tampering(#[case] from: &str, #[case] to: &str) {
    let file = unbound_file();
    assert!(file.contains(from), "{from} not in {file}");
    let edited = file.replacen(from, to, 1);
    let licence = SignedLicence::from_json(edited.as_bytes(), FILE).unwrap();
    let error = licence.verify(&vendor().public()).unwrap_err();
    assert!(matches!(error, LicenceError::Tampered { .. }), "{error:?}");
    assert_eq!(error.reason(), Reason::SignatureInvalid);
    assert_eq!(
        error.to_string(),
        "Licence file cad.lic was tampered with: its signature does not match its content"
    );
}

/// Flipping any single byte of the file is caught: the file no longer parses, or no longer verifies.
#[test]
fn every_single_byte_flip_is_detected() {
    let file = bound_licence(&workstation()).to_json().into_bytes();
    let public = vendor().public();
    for index in (0..file.len()).step_by(7) {
        let mut flipped = file.clone();
        flipped[index] ^= 0x01;
        let outcome =
            SignedLicence::from_json(&flipped, FILE).and_then(|l| l.verify(&public).cloned());
        match outcome {
            Err(
                LicenceError::Malformed { .. }
                | LicenceError::Tampered { .. }
                | LicenceError::ForeignSigner { .. },
            ) => {}
            // Whitespace flips that keep the JSON and its meaning identical are no change at all.
            Ok(body) => assert_eq!(&body, &bound_licence(&workstation()).body, "byte {index}"),
            Err(other) => panic!("byte {index}: unexpected {other:?}"),
        }
    }
}

#[test]
fn a_foreign_signer_is_named() {
    let forged = VendorKey::from_seeds([99; 32], [12; 32])
        .sign_licence(LicenceBody::unbound(&policy(), ISSUED_AT, [1; 32]))
        .to_json();
    let licence = SignedLicence::from_json(forged.as_bytes(), FILE).unwrap();
    let error = licence.verify(&vendor().public()).unwrap_err();
    let LicenceError::ForeignSigner {
        file,
        signer,
        trusted,
    } = &error
    else {
        panic!("{error:?}");
    };
    assert_eq!(file, FILE);
    assert_ne!(signer, trusted);
    assert_eq!(error.reason(), Reason::SignatureInvalid);
    assert!(error.to_string().contains("foreign key"));
}

#[test]
fn a_foreign_signature_under_the_trusted_key_id_is_tampering() {
    let genuine = vendor().sign_licence(LicenceBody::unbound(&policy(), ISSUED_AT, [1; 32]));
    let forged = VendorKey::from_seeds([99; 32], [12; 32]).sign_licence(LicenceBody::unbound(
        &policy(),
        ISSUED_AT,
        [1; 32],
    ));
    let mut mixed = forged;
    mixed.signer = genuine.signer.clone();
    let error = mixed.verify(&vendor().public()).unwrap_err();
    assert!(matches!(error, LicenceError::Tampered { .. }), "{error:?}");
}

#[rstest]
#[case::truncated(|f: &str| f[..f.len() / 2].to_owned())]
#[case::empty(|_: &str| String::new())]
#[case::not_json(|_: &str| "licence".to_owned())]
#[case::unknown_field(|f: &str| f.replacen("\"signer\"", "\"extra\": 1, \"signer\"", 1))]
#[case::missing_signature(|f: &str| {
    let mut v: serde_json::Value = serde_json::from_str(f).unwrap();
    v.as_object_mut().unwrap().remove("signature");
    v.to_string()
})]
fn a_malformed_file_is_named(#[case] damage: fn(&str) -> String) {
    let damaged = damage(&unbound_file());
    let error = SignedLicence::from_json(damaged.as_bytes(), FILE).unwrap_err();
    assert!(matches!(error, LicenceError::Malformed { .. }), "{error:?}");
    assert_eq!(error.to_string(), "Licence file cad.lic is malformed");
    assert!(std::error::Error::source(&error).is_some());
    assert_eq!(error.reason(), Reason::LicenceCorrupt);
}

#[test]
fn a_signed_licence_survives_a_round_trip_through_its_file() {
    let licence = bound_licence(&workstation());
    let back = SignedLicence::from_json(licence.to_json().as_bytes(), FILE).unwrap();
    assert_eq!(back.body, licence.body);
    assert_eq!(back.source, FILE);
    back.verify(&vendor().public()).unwrap();
}

/// Pins the on-disk format of an unbound licence file (signature included: Ed25519 is deterministic).
#[test]
fn the_unbound_licence_file_format() {
    insta::assert_snapshot!(unbound_file());
}
