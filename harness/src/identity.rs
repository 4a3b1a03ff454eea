//! Deterministic hardware identities for simulated and real machines.
//!
//! A run's seed plus a machine's name always give the same UUID, serials and MACs, so a run can be
//! replayed; generation ids are fresh on every call, as a hypervisor's are.

use sha2::{Digest, Sha256};

use crate::backend::types::{CpuProfile, HardwareIdentity};

/// Mints identities from a run seed.
#[derive(Debug, Clone)]
pub struct IdentityMint {
    seed: u64,
    generation: u64,
}

impl IdentityMint {
    /// A mint for one run.
    pub fn new(seed: u64) -> IdentityMint {
        IdentityMint {
            seed,
            generation: 0,
        }
    }

    fn digest(&self, label: &str) -> [u8; 32] {
        let mut hasher = Sha256::new();
        hasher.update(self.seed.to_le_bytes());
        hasher.update(label.as_bytes());
        hasher.finalize().into()
    }

    /// A UUID in the usual textual form.
    pub fn uuid(&self, label: &str) -> String {
        let d = self.digest(label);
        let h = hex::encode(&d[..16]);
        format!(
            "{}-{}-4{}-8{}-{}",
            &h[0..8],
            &h[8..12],
            &h[13..16],
            &h[17..20],
            &h[20..32]
        )
    }

    /// A serial number with a prefix.
    pub fn serial(&self, prefix: &str, label: &str) -> String {
        let d = self.digest(label);
        format!("{prefix}{}", hex::encode_upper(&d[..6]))
    }

    /// A locally administered MAC address in QEMU's 52:54:00 range.
    pub fn mac(&self, label: &str) -> String {
        let d = self.digest(&format!("mac:{label}"));
        format!("52:54:00:{:02x}:{:02x}:{:02x}", d[0], d[1], d[2])
    }

    /// A fresh VM generation id (32 hex digits), different on every call.
    pub fn generation_id(&mut self) -> String {
        self.generation += 1;
        let mut entropy = [0u8; 16];
        if getrandom::fill(&mut entropy).is_err() {
            entropy = self.digest(&format!("vmgenid:{}", self.generation))[..16]
                .try_into()
                .expect("16 bytes");
        }
        hex::encode(entropy)
    }

    /// The identity of a physical machine.
    pub fn host_identity(&self, name: &str) -> HardwareIdentity {
        HardwareIdentity {
            product_uuid: self.uuid(&format!("host-uuid:{name}")),
            product_serial: self.serial("SYS", &format!("host-serial:{name}")),
            board_serial: self.serial("MB", &format!("host-board:{name}")),
            disk_serials: vec![self.serial("S4", &format!("host-disk:{name}"))],
            macs: vec![self.mac(&format!("host:{name}"))],
        }
    }

    /// The virtual identity of a guest.
    pub fn guest_identity(&self, name: &str) -> HardwareIdentity {
        HardwareIdentity {
            product_uuid: self.uuid(&format!("guest-uuid:{name}")),
            product_serial: self.serial("VM", &format!("guest-serial:{name}")),
            board_serial: self.serial("VB", &format!("guest-board:{name}")),
            disk_serials: vec![self.serial("QM", &format!("guest-disk:{name}"))],
            macs: vec![self.mac(&format!("guest:{name}"))],
        }
    }
}

/// Fills in a CPU profile from a vendor and model name; unknown models get stable made-up ids.
pub fn cpu_profile(vendor: &str, model_name: &str) -> CpuProfile {
    let known = KNOWN_CPUS
        .iter()
        .find(|c| c.1.eq_ignore_ascii_case(model_name));
    let (family, model, stepping, microcode) = match known {
        Some(&(_, _, family, model, stepping, microcode)) => {
            (family, model, stepping, microcode.to_string())
        }
        None => {
            let d: [u8; 32] = Sha256::digest(format!("{vendor}/{model_name}")).into();
            (
                6 + u32::from(d[0] % 20),
                u32::from(d[1]),
                u32::from(d[2] % 16),
                format!("0x{:08x}", u32::from_le_bytes([d[3], d[4], d[5], d[6]])),
            )
        }
    };
    let flags = hex::encode(&Sha256::digest(format!("flags:{vendor}/{model_name}"))[..8]);
    CpuProfile {
        vendor: vendor.to_string(),
        model_name: model_name.to_string(),
        family,
        model,
        stepping,
        microcode,
        flags,
    }
}

/// (vendor, model name, family, model, stepping, microcode) of CPUs commonly found in servers.
const KNOWN_CPUS: &[(&str, &str, u32, u32, u32, &str)] = &[
    ("GenuineIntel", "Xeon Gold 6248", 6, 85, 7, "0x5003604"),
    ("GenuineIntel", "Xeon Gold 6338", 6, 106, 6, "0xd0003a5"),
    ("GenuineIntel", "Xeon Platinum 8380", 6, 106, 6, "0xd0003b9"),
    ("GenuineIntel", "Xeon Silver 4314", 6, 106, 6, "0xd000389"),
    ("GenuineIntel", "Xeon E5-2690 v4", 6, 79, 1, "0xb000040"),
    ("GenuineIntel", "Core i7-12700", 6, 151, 2, "0x2c"),
    ("AuthenticAMD", "EPYC 7543", 25, 1, 1, "0xa0011d1"),
    ("AuthenticAMD", "EPYC 7763", 25, 1, 1, "0xa0011d3"),
    ("AuthenticAMD", "EPYC 9654", 25, 17, 1, "0xa101148"),
    ("AuthenticAMD", "EPYC 7302", 23, 49, 0, "0x830107a"),
    ("AuthenticAMD", "Ryzen 9 5950X", 25, 33, 0, "0xa201016"),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_are_stable_per_seed_and_distinct_per_name() {
        let a = IdentityMint::new(7);
        let b = IdentityMint::new(7);
        assert_eq!(a.guest_identity("vm1"), b.guest_identity("vm1"));
        assert_ne!(a.guest_identity("vm1"), a.guest_identity("vm2"));
        assert_ne!(
            IdentityMint::new(8).guest_identity("vm1"),
            a.guest_identity("vm1")
        );
    }

    #[test]
    fn generation_ids_differ_every_time() {
        let mut mint = IdentityMint::new(1);
        assert_ne!(mint.generation_id(), mint.generation_id());
    }

    #[test]
    fn known_cpu_keeps_its_ids_and_different_models_differ() {
        let gold = cpu_profile("GenuineIntel", "Xeon Gold 6248");
        assert_eq!((gold.family, gold.model, gold.stepping), (6, 85, 7));
        let epyc = cpu_profile("AuthenticAMD", "EPYC 7543");
        assert_ne!(gold.flags, epyc.flags);
    }
}
