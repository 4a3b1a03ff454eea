//! Whether a machine is a virtual machine, from several signals: its owner can hide the CPUID
//! hypervisor bit, but the virtual firmware and the paravirtual devices still tell.

use serde::{Deserialize, Serialize};

/// What a machine shows of its hardware that a hypervisor would give away.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct GuestSignals {
    /// The CPUID hypervisor-present bit.
    #[serde(default)]
    pub cpuid_hypervisor: bool,
    /// DMI system vendor (`/sys/class/dmi/id/sys_vendor`).
    #[serde(default)]
    pub dmi_vendor: Option<String>,
    /// DMI product name (`/sys/class/dmi/id/product_name`).
    #[serde(default)]
    pub dmi_product: Option<String>,
    /// The hypervisor the kernel reports (`/sys/hypervisor/type`).
    #[serde(default)]
    pub sys_hypervisor: Option<String>,
    /// PCI vendor ids of the machine's devices.
    #[serde(default)]
    pub pci_vendors: Vec<u16>,
}

/// Firmware vendor or product names only virtual machines carry (matched case-insensitively).
const HYPERVISOR_FIRMWARE: [&str; 12] = [
    "qemu",
    "kvm",
    "vmware",
    "virtualbox",
    "innotek",
    "xen",
    "bochs",
    "bhyve",
    "parallels",
    "virtual machine",
    "openstack",
    "google compute engine",
];

/// PCI vendor ids of paravirtual and emulated devices only virtual machines have: virtio
/// (0x1af4), QEMU (0x1b36, 0x1234), VMware (0x15ad), VirtualBox (0x80ee), Hyper-V (0x1414),
/// Xen (0x5853), Parallels (0x1ab8).
const HYPERVISOR_PCI_VENDORS: [u16; 8] = [
    0x1af4, 0x1b36, 0x1234, 0x15ad, 0x80ee, 0x1414, 0x5853, 0x1ab8,
];

impl GuestSignals {
    /// The signals that say "virtual machine", by name.
    pub fn evidence(&self) -> Vec<&'static str> {
        let mut evidence = Vec::new();
        if self.cpuid_hypervisor {
            evidence.push("cpuid-hypervisor");
        }
        let firmware = |text: &Option<String>| {
            text.as_deref().is_some_and(|t| {
                let t = t.to_ascii_lowercase();
                HYPERVISOR_FIRMWARE.iter().any(|marker| t.contains(marker))
            })
        };
        if firmware(&self.dmi_vendor) || firmware(&self.dmi_product) {
            evidence.push("dmi");
        }
        if self
            .sys_hypervisor
            .as_deref()
            .is_some_and(|t| !t.trim().is_empty())
        {
            evidence.push("sys-hypervisor");
        }
        if self
            .pci_vendors
            .iter()
            .any(|v| HYPERVISOR_PCI_VENDORS.contains(v))
        {
            evidence.push("pci");
        }
        evidence
    }

    /// Whether the machine is a virtual machine: any signal says so.
    pub fn is_guest(&self) -> bool {
        if crate::weakened::is(crate::weakened::Defence::GuestDetection) {
            // Weakened: the hypervisor bit alone decides, and a VM's owner can switch it off.
            return self.cpuid_hypervisor;
        }
        !self.evidence().is_empty()
    }
}

/// Parses a PCI vendor id as sysfs writes it (`0x1af4`).
pub fn parse_pci_vendor(text: &str) -> Option<u16> {
    u16::from_str_radix(text.trim().trim_start_matches("0x"), 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    fn physical() -> GuestSignals {
        GuestSignals {
            cpuid_hypervisor: false,
            dmi_vendor: Some("Dell Inc.".into()),
            dmi_product: Some("PowerEdge R650".into()),
            sys_hypervisor: None,
            pci_vendors: vec![0x8086, 0x14e4],
        }
    }

    #[test]
    fn a_physical_machine_shows_nothing() {
        assert!(physical().evidence().is_empty());
        assert!(!physical().is_guest());
    }

    #[rstest]
    #[case::hypervisor_bit(GuestSignals { cpuid_hypervisor: true, ..physical() }, "cpuid-hypervisor")]
    #[case::qemu_firmware(GuestSignals { dmi_vendor: Some("QEMU".into()), ..physical() }, "dmi")]
    #[case::hyper_v(GuestSignals { dmi_vendor: Some("Microsoft Corporation".into()), dmi_product: Some("Virtual Machine".into()), ..physical() }, "dmi")]
    #[case::xen(GuestSignals { sys_hypervisor: Some("xen".into()), ..physical() }, "sys-hypervisor")]
    #[case::virtio_device(GuestSignals { pci_vendors: vec![0x8086, 0x1af4], ..physical() }, "pci")]
    fn any_signal_gives_a_guest_away(#[case] signals: GuestSignals, #[case] named: &str) {
        assert_eq!(signals.evidence(), vec![named]);
        assert!(signals.is_guest());
    }

    #[test]
    fn a_hidden_hypervisor_bit_is_not_enough() {
        let hidden = GuestSignals {
            cpuid_hypervisor: false,
            dmi_vendor: Some("QEMU".into()),
            dmi_product: Some("Standard PC (i440FX + PIIX, 1996)".into()),
            sys_hypervisor: None,
            pci_vendors: vec![0x8086, 0x1af4],
        };
        assert_eq!(hidden.evidence(), vec!["dmi", "pci"]);
        assert!(hidden.is_guest());
    }

    #[test]
    fn sysfs_vendor_ids_parse() {
        assert_eq!(parse_pci_vendor("0x1af4\n"), Some(0x1af4));
        assert_eq!(parse_pci_vendor("zz"), None);
    }
}
