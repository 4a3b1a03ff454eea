//! The host's CPU profile as libvirt can give it to a guest: libvirt's CPU XML names a model
//! and a CPUID vendor but has no family, model, stepping, model name or microcode of its own,
//! so a guest gets the named model closest to its host's profile (same vendor, nearest
//! family, model and stepping) with the profile's vendor id. Hosts with different profiles
//! mostly get different models; two profiles close to one named model look alike to guests.

use crate::backend::types::CpuProfile;

/// (libvirt model, vendor, family, model, stepping) of the models QEMU defines.
const NAMED_MODELS: &[(&str, &str, u32, u32, u32)] = &[
    ("Nehalem", "GenuineIntel", 6, 26, 3),
    ("Westmere", "GenuineIntel", 6, 44, 1),
    ("SandyBridge", "GenuineIntel", 6, 42, 1),
    ("IvyBridge", "GenuineIntel", 6, 58, 9),
    ("Haswell", "GenuineIntel", 6, 60, 4),
    ("Broadwell", "GenuineIntel", 6, 61, 2),
    ("Skylake-Client", "GenuineIntel", 6, 94, 3),
    ("Skylake-Server", "GenuineIntel", 6, 85, 4),
    ("Cascadelake-Server", "GenuineIntel", 6, 85, 6),
    ("Cooperlake", "GenuineIntel", 6, 85, 10),
    ("Icelake-Server", "GenuineIntel", 6, 134, 0),
    ("SapphireRapids", "GenuineIntel", 6, 143, 4),
    ("Opteron_G3", "AuthenticAMD", 16, 2, 3),
    ("Opteron_G4", "AuthenticAMD", 21, 1, 2),
    ("Opteron_G5", "AuthenticAMD", 21, 2, 0),
    ("EPYC", "AuthenticAMD", 23, 1, 2),
    ("EPYC-Rome", "AuthenticAMD", 23, 49, 0),
    ("EPYC-Milan", "AuthenticAMD", 25, 1, 1),
    ("EPYC-Genoa", "AuthenticAMD", 25, 17, 0),
];

/// The model for a vendor libvirt has no named model of.
const GENERIC_MODEL: &str = "qemu64";

/// The named model closest to `cpu`: same vendor, then nearest family, model and stepping.
pub fn named_model(cpu: &CpuProfile) -> &'static str {
    NAMED_MODELS
        .iter()
        .filter(|m| m.1 == cpu.vendor)
        .min_by_key(|m| {
            (
                m.2.abs_diff(cpu.family),
                m.3.abs_diff(cpu.model),
                m.4.abs_diff(cpu.stepping),
            )
        })
        .map_or(GENERIC_MODEL, |m| m.0)
}

/// The CPUID vendor id libvirt can set (exactly 12 characters), if the profile's is one.
pub fn vendor_id(cpu: &CpuProfile) -> Option<String> {
    (cpu.vendor.len() == 12 && cpu.vendor.bytes().all(|b| b.is_ascii_alphanumeric()))
        .then(|| cpu.vendor.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::cpu_profile;

    #[rstest::rstest]
    #[case("GenuineIntel", "Xeon Gold 6248", "Cascadelake-Server")]
    #[case("AuthenticAMD", "EPYC 7543", "EPYC-Milan")]
    #[case("CentaurHauls", "Nano", "qemu64")]
    fn a_profile_gets_the_closest_model_of_its_vendor(
        #[case] vendor: &str,
        #[case] model: &str,
        #[case] expected: &str,
    ) {
        assert_eq!(named_model(&cpu_profile(vendor, model)), expected);
    }

    #[test]
    fn hosts_with_other_vendors_get_other_models() {
        let intel = named_model(&cpu_profile("GenuineIntel", "Xeon Gold 6248"));
        let amd = named_model(&cpu_profile("AuthenticAMD", "EPYC 7543"));
        assert_ne!(intel, amd);
    }

    #[test]
    fn only_twelve_character_vendors_are_set() {
        assert_eq!(
            vendor_id(&cpu_profile("GenuineIntel", "x")).as_deref(),
            Some("GenuineIntel")
        );
        assert_eq!(vendor_id(&cpu_profile("Intel", "x")), None);
    }
}
