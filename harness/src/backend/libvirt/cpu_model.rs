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

/// libvirt's map of x86 CPU features.
const FEATURE_MAP: &str = "/usr/share/libvirt/cpu_map/x86_features.xml";
/// The MSR whose bits libvirt names as the arch-capabilities features.
const ARCH_CAPABILITIES_MSR: &str = "0x0000010a";
/// The arch-capabilities features of libvirt 11, should its map be unreadable.
const KNOWN_ARCH_CAPABILITIES: &[&str] = &[
    "rdctl-no",
    "ibrs-all",
    "rsba",
    "skip-l1dfl-vmentry",
    "ssb-no",
    "mds-no",
    "pschange-mc-no",
    "tsx-ctrl",
    "taa-no",
    "sbdr-ssdp-no",
    "fbsdp-no",
    "psdp-no",
    "fb-clear",
    "pbrsb-no",
    "gds-no",
    "rfds-no",
    "rfds-clear",
];

/// The features a guest under TCG is given without, named so that libvirt knows: TCG has no
/// arch-capabilities MSR, and libvirt marks the CPUID bit missing after a start but not the
/// MSR's features, which then fail its check of the guest CPU on a migration's destination
/// (models such as SapphireRapids list them).
pub fn tcg_disabled_features() -> Vec<String> {
    let mut features = vec!["arch-capabilities".to_string()];
    match std::fs::read_to_string(FEATURE_MAP) {
        Ok(map) => features.extend(msr_features(&map, ARCH_CAPABILITIES_MSR)),
        Err(_) => features.extend(KNOWN_ARCH_CAPABILITIES.iter().map(|f| f.to_string())),
    }
    features
}

/// The features of libvirt's feature map `map` that are bits of MSR `index`.
fn msr_features(map: &str, index: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut current: Option<&str> = None;
    for line in map.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("<feature name='") {
            current = rest.split('\'').next();
        } else if line.starts_with("</feature>") {
            current = None;
        } else if line.starts_with(&format!("<msr index='{index}'"))
            && let Some(name) = current
        {
            found.push(name.to_string());
        }
    }
    found
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

    #[test]
    fn the_arch_capabilities_features_are_read_from_libvirts_map() {
        let map = "<cpus>\n  <feature name='arch-capabilities'>\n    <cpuid eax_in='0x00000007' edx='0x20000000'/>\n  </feature>\n  <feature name='rdctl-no'>\n    <msr index='0x0000010a' edx='0x00000000' eax='0x00000001'/>\n  </feature>\n  <feature name='split-lock-detect'>\n    <msr index='0x000000cf' edx='0x00000000' eax='0x00000020'/>\n  </feature>\n  <feature name='mds-no'>\n    <msr index='0x0000010a' edx='0x00000000' eax='0x00000020'/>\n  </feature>\n</cpus>\n";
        assert_eq!(
            msr_features(map, ARCH_CAPABILITIES_MSR),
            ["rdctl-no", "mds-no"]
        );
        let features = tcg_disabled_features();
        assert_eq!(features[0], "arch-capabilities");
        assert!(features.iter().any(|f| f == "rdctl-no"), "{features:?}");
    }
}
