//! The domain XML a libvirt daemon defines a guest from: direct kernel boot of the guest image,
//! the guest's SMBIOS identity, MAC, disk serial and generation id, the agent's virtio-serial
//! channel, the serial console in a file, a USB controller with the dongles passed through over
//! usbredir, and the host's CPU as the closest named model, in plain libvirt XML (no
//! `qemu:commandline`, which would taint the domain).

use std::fmt::Write as _;
use std::path::PathBuf;

use crate::backend::guest::usb_plug::UsbRedirPlug;

/// Everything a guest's domain is made of.
#[derive(Debug, Clone)]
pub struct DomainSpec {
    /// Domain name (the machine's name).
    pub name: String,
    /// The machine's SMBIOS system UUID, also the domain's UUID.
    pub uuid: String,
    /// SMBIOS system serial.
    pub system_serial: String,
    /// SMBIOS base board serial.
    pub board_serial: String,
    /// The NIC's MAC.
    pub mac: Option<String>,
    /// The data disk's serial (at most 20 characters reach the guest).
    pub disk_serial: Option<String>,
    /// The virtual machine generation id, `8-4-4-4-12`; none: libvirt makes one, and a new one
    /// at every revert to a snapshot.
    pub genid: Option<String>,
    /// Memory, MiB.
    pub memory_mib: u32,
    /// `kvm` when the machine can run guests with KVM, else `qemu` (TCG).
    pub domain_type: &'static str,
    /// The named CPU model libvirt gives the guest.
    pub cpu_model: String,
    /// The CPUID vendor the guest sees (12 characters), when set.
    pub cpu_vendor_id: Option<String>,
    /// The CPUID hypervisor bit is switched off (an attack by the VM's owner).
    pub hide_hypervisor: bool,
    /// Features of the model the guest is given without (those the accelerator lacks).
    pub disabled_features: Vec<String>,
    /// The guest kernel.
    pub kernel: PathBuf,
    /// The guest's initramfs.
    pub initrd: PathBuf,
    /// The kernel command line.
    pub cmdline: String,
    /// The data disk (qcow2).
    pub disk: PathBuf,
    /// The agent's Unix socket on the harness machine.
    pub agent_socket: PathBuf,
    /// The serial console's log file.
    pub serial_log: PathBuf,
    /// A read-only raw disk with the runtime under test, when it is not the image's own.
    pub runtime_disk: Option<PathBuf>,
    /// Dongles plugged in from the start.
    pub usb: Vec<UsbRedirPlug>,
}

/// The libvirt alias of a usbredir device (user aliases start with `ua-`).
pub fn redirdev_alias(plug: &UsbRedirPlug) -> String {
    let safe: String = plug
        .id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("ua-{safe}")
}

/// A usbredir device on the xhci controller that connects to its server on 127.0.0.1 and
/// reconnects when the connection breaks (a restored guest finds it broken, unplugs the device
/// and plugs it afresh once connected, as the qemu backend's guests do).
pub fn redirdev_xml(plug: &UsbRedirPlug) -> String {
    format!(
        "<redirdev bus='usb' type='tcp'>\n\
         \x20 <source mode='connect' host='127.0.0.1' service='{}'>\n\
         \x20   <reconnect enabled='yes' timeout='1'/>\n\
         \x20 </source>\n\
         \x20 <alias name='{}'/>\n\
         \x20 <address type='usb' bus='0' port='{}'/>\n\
         </redirdev>\n",
        plug.port,
        escape(&redirdev_alias(plug)),
        plug.xhci_port
    )
}

/// The generation id of a domain's XML as 32 lower-case hex digits (libvirt writes a GUID).
pub fn genid_of(xml: &str) -> Option<String> {
    let start = xml.find("<genid>")? + "<genid>".len();
    let end = start + xml[start..].find("</genid>")?;
    let hex: String = xml[start..end]
        .chars()
        .filter(char::is_ascii_hexdigit)
        .collect();
    (hex.len() == 32).then(|| hex.to_ascii_lowercase())
}

/// `text` with the five XML special characters escaped.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

fn path(p: &std::path::Path) -> String {
    escape(&p.display().to_string())
}

impl DomainSpec {
    /// The domain's `<cpu>` element (indented as in [`DomainSpec::xml`]).
    pub fn cpu_xml(&self) -> String {
        let mut x = String::new();
        x.push_str("  <cpu mode='custom' match='exact' check='none'>\n");
        match &self.cpu_vendor_id {
            Some(vendor) => {
                let _ = writeln!(
                    x,
                    "    <model fallback='allow' vendor_id='{}'>{}</model>",
                    escape(vendor),
                    escape(&self.cpu_model)
                );
            }
            None => {
                let _ = writeln!(
                    x,
                    "    <model fallback='allow'>{}</model>",
                    escape(&self.cpu_model)
                );
            }
        }
        for feature in &self.disabled_features {
            let _ = writeln!(
                x,
                "    <feature policy='disable' name='{}'/>",
                escape(feature)
            );
        }
        if self.hide_hypervisor {
            x.push_str("    <feature policy='disable' name='hypervisor'/>\n");
        }
        x.push_str("  </cpu>\n");
        x
    }

    /// The domain's XML.
    pub fn xml(&self) -> String {
        let mut x = String::new();
        let _ = writeln!(x, "<domain type='{}'>", self.domain_type);
        let _ = writeln!(x, "  <name>{}</name>", escape(&self.name));
        let _ = writeln!(x, "  <uuid>{}</uuid>", escape(&self.uuid));
        match &self.genid {
            Some(genid) => {
                let _ = writeln!(x, "  <genid>{}</genid>", escape(genid));
            }
            None => x.push_str("  <genid/>\n"),
        }
        let _ = writeln!(x, "  <memory unit='MiB'>{}</memory>", self.memory_mib);
        x.push_str("  <vcpu>1</vcpu>\n");
        x.push_str("  <sysinfo type='smbios'>\n    <system>\n");
        x.push_str("      <entry name='manufacturer'>QEMU</entry>\n");
        x.push_str("      <entry name='product'>Standard PC</entry>\n");
        let _ = writeln!(
            x,
            "      <entry name='serial'>{}</entry>",
            escape(&self.system_serial)
        );
        let _ = writeln!(x, "      <entry name='uuid'>{}</entry>", escape(&self.uuid));
        x.push_str("    </system>\n    <baseBoard>\n");
        let _ = writeln!(
            x,
            "      <entry name='serial'>{}</entry>",
            escape(&self.board_serial)
        );
        x.push_str("    </baseBoard>\n  </sysinfo>\n");
        x.push_str("  <os>\n    <type arch='x86_64' machine='q35'>hvm</type>\n");
        let _ = writeln!(x, "    <kernel>{}</kernel>", path(&self.kernel));
        let _ = writeln!(x, "    <initrd>{}</initrd>", path(&self.initrd));
        let _ = writeln!(x, "    <cmdline>{}</cmdline>", escape(&self.cmdline));
        x.push_str("    <smbios mode='sysinfo'/>\n  </os>\n");
        x.push_str("  <features>\n    <acpi/>\n  </features>\n");
        x.push_str(&self.cpu_xml());
        x.push_str("  <on_poweroff>destroy</on_poweroff>\n");
        x.push_str("  <on_reboot>destroy</on_reboot>\n");
        x.push_str("  <on_crash>destroy</on_crash>\n");
        x.push_str("  <devices>\n");
        x.push_str("    <disk type='file' device='disk'>\n");
        x.push_str("      <driver name='qemu' type='qcow2' cache='unsafe'/>\n");
        let _ = writeln!(x, "      <source file='{}'/>", path(&self.disk));
        x.push_str("      <target dev='vda' bus='virtio'/>\n");
        if let Some(serial) = &self.disk_serial {
            let serial: String = serial.chars().take(20).collect();
            let _ = writeln!(x, "      <serial>{}</serial>", escape(&serial));
        }
        x.push_str("    </disk>\n");
        if let Some(disk) = &self.runtime_disk {
            x.push_str("    <disk type='file' device='disk'>\n");
            x.push_str("      <driver name='qemu' type='raw'/>\n");
            let _ = writeln!(x, "      <source file='{}'/>", path(disk));
            x.push_str("      <target dev='vdb' bus='virtio'/>\n      <readonly/>\n");
            let _ = writeln!(
                x,
                "      <serial>{}</serial>",
                vigil_agent::protocol::RUNTIME_DISK_SERIAL
            );
            x.push_str("    </disk>\n");
        }
        x.push_str("    <interface type='user'>\n");
        if let Some(mac) = &self.mac {
            let _ = writeln!(x, "      <mac address='{}'/>", escape(mac));
        }
        x.push_str("      <model type='virtio'/>\n      <rom enabled='no'/>\n    </interface>\n");
        x.push_str("    <controller type='usb' model='qemu-xhci'/>\n");
        x.push_str("    <controller type='virtio-serial' index='0'/>\n");
        x.push_str("    <channel type='unix'>\n");
        let _ = writeln!(
            x,
            "      <source mode='bind' path='{}'/>",
            path(&self.agent_socket)
        );
        x.push_str("      <target type='virtio' name='vigil'/>\n    </channel>\n");
        x.push_str("    <serial type='file'>\n");
        let _ = writeln!(
            x,
            "      <source path='{}' append='on'/>",
            path(&self.serial_log)
        );
        x.push_str("      <target port='0'/>\n    </serial>\n");
        x.push_str("    <rng model='virtio'>\n      <backend model='random'>/dev/urandom</backend>\n    </rng>\n");
        for plug in &self.usb {
            for line in redirdev_xml(plug).lines() {
                let _ = writeln!(x, "    {line}");
            }
        }
        x.push_str("    <memballoon model='none'/>\n");
        x.push_str("  </devices>\n</domain>\n");
        x
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> DomainSpec {
        DomainSpec {
            name: "vm1".into(),
            uuid: "5e0b6a52-4c3d-4c43-9a52-2b6c1f0d9e01".into(),
            system_serial: "VMW-1234 <&>".into(),
            board_serial: "BRD-77".into(),
            mac: Some("52:54:00:12:34:56".into()),
            disk_serial: Some("DISK-0123456789abcdefXYZ".into()),
            genid: Some("c5f2b3a1-0d4e-4f6a-8b7c-9d0e1f2a3b4c".into()),
            memory_mib: 384,
            domain_type: "qemu",
            cpu_model: "Cascadelake-Server".into(),
            cpu_vendor_id: Some("GenuineIntel".into()),
            hide_hypervisor: true,
            disabled_features: vec!["arch-capabilities".into(), "rdctl-no".into()],
            kernel: "/images/vmlinux".into(),
            initrd: "/images/initramfs.cpio".into(),
            cmdline: "console=ttyS0 vigil.name=vm1".into(),
            disk: "/guests/01/disk.qcow2".into(),
            agent_socket: "/guests/01/run/agent.sock".into(),
            serial_log: "/logs/vm1/serial.log".into(),
            runtime_disk: Some("/work/runtime.ext4".into()),
            usb: vec![UsbRedirPlug {
                id: "usb-key.1-3".into(),
                port: 40123,
                xhci_port: 2,
            }],
        }
    }

    #[test]
    fn the_domain_xml_carries_the_guests_identity() {
        insta::assert_snapshot!(spec().xml());
    }

    #[test]
    fn without_a_generation_id_libvirt_makes_one() {
        let spec = DomainSpec {
            genid: None,
            ..spec()
        };
        assert!(spec.xml().contains("  <genid/>\n"));
    }

    #[test]
    fn values_are_escaped() {
        let xml = spec().xml();
        assert!(xml.contains("VMW-1234 &lt;&amp;&gt;"), "{xml}");
        // A disk serial is cut to what virtio-blk passes on.
        assert!(
            xml.contains("<serial>DISK-0123456789abcde</serial>"),
            "{xml}"
        );
    }
}
