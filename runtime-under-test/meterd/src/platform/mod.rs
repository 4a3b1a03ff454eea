//! Where the runtime learns about its machine: the real Linux host or a simulated folder.

mod facts;
pub mod guest_signals;
pub mod host;
pub mod sim;

use std::sync::Arc;

pub use facts::{Platform, PlatformError, SessionInfo, UsbEndpoint};
pub use host::{
    HIDRAW_CLASS, HOST_SESSION_TABLE, HOST_VMGENID_FILE, HostPlatform, ProcessSession,
    process_session_and_start,
};
pub use sim::SimPlatform;

/// Builds the platform named by a `--platform` argument (`host` or `sim:<dir>`, the latter
/// only in a harness build, see [`crate::harness_build`]).
pub fn from_spec(spec: &str) -> Result<Arc<dyn Platform>, PlatformError> {
    if spec == "host" {
        Ok(Arc::new(HostPlatform::new()))
    } else if let Some(dir) = spec.strip_prefix("sim:") {
        if !crate::harness_build::enabled() {
            return Err(PlatformError::SimulatedRefused);
        }
        Ok(Arc::new(SimPlatform::new(dir)))
    } else {
        Err(PlatformError::UnknownSpec(spec.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::facts::*;
    use super::host::*;
    use super::sim::*;
    use crate::os_sources::wall_clock_ms as real_now_ms;
    use meter_core::station::{MachineRole, SessionKind};
    use meter_core::traits::{MachineKind, names};
    use std::fs;

    #[test]
    fn proc_stat_with_spaces_in_command_parses() {
        let line = "1234 (my (odd) app) S 1 1234 777 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 98765 1000 10";
        assert_eq!(parse_proc_stat(line), Some((777, 98765)));
    }

    #[test]
    fn own_process_session_matches_getsid() {
        let ProcessSession {
            id: session,
            login,
            start,
        } = process_session_and_start(std::process::id()).unwrap();
        if login {
            // Counted in our login session: nothing to compare with getsid.
            return;
        }
        // The session leader may live outside our pid namespace (CI containers): then both say 0.
        let expected = nix::unistd::getsid(None).unwrap().as_raw() as u32;
        assert_eq!(session, expected);
        assert!(start > 0);
    }

    #[test]
    fn sim_platform_reads_machine_sessions_clock_and_usb() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("machine.json"),
            r#"{"kind":"guest","name":"ts1","address":"127.0.1.3",
               "traits":{"cpu.vendor":"GenuineIntel","nic.mac":["52:54:00:00:00:01"]}}"#,
        )
        .unwrap();
        fs::write(
            dir.path().join("sessions.json"),
            r#"{"4":{"kind":"rdp","user":"alice","client_name":"pc-7","client_ip":"10.0.0.7"},
               "1":{"kind":"console"}}"#,
        )
        .unwrap();
        fs::write(dir.path().join("clock"), "-60000\n").unwrap();
        fs::write(
            dir.path().join("vmgenid"),
            "00112233445566778899AABBCCDDEEFF",
        )
        .unwrap();
        fs::create_dir(dir.path().join("usb")).unwrap();
        fs::write(dir.path().join("usb/D-42.sock"), "").unwrap();

        let sim = SimPlatform::new(dir.path());
        assert_eq!(sim.machine_name().unwrap(), "ts1");
        assert_eq!(sim.kind().unwrap(), MachineKind::Guest);
        assert_eq!(sim.role().unwrap(), MachineRole::TerminalServer);
        let traits = sim.traits().unwrap();
        assert_eq!(traits.one(names::CPU_VENDOR), Some("GenuineIntel"));
        assert_eq!(traits.one(names::NET_IP), Some("127.0.1.3"));
        let rdp = sim.session(4).unwrap().unwrap();
        assert!(rdp.kind.is_remote_desktop());
        assert_eq!(rdp.user.as_deref(), Some("alice"));
        assert_eq!(sim.session(1).unwrap().unwrap().kind, SessionKind::Console);
        assert_eq!(sim.session(9).unwrap(), None);
        let skew = real_now_ms() as i64 - sim.now_ms().unwrap() as i64;
        assert!((59_000..61_000).contains(&skew), "skew {skew}");
        assert_eq!(
            sim.vmgenid().unwrap().as_deref(),
            Some("00112233445566778899aabbccddeeff")
        );
        assert_eq!(sim.usb_endpoints().unwrap()[0].serial, "D-42");
    }

    #[test]
    fn sim_platform_sees_an_atomically_replaced_machine_file() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str| {
            let tmp = dir.path().join("machine.json.tmp");
            fs::write(&tmp, format!(r#"{{"kind":"physical","name":"{name}"}}"#)).unwrap();
            fs::rename(&tmp, dir.path().join("machine.json")).unwrap();
        };
        write("a");
        let sim = SimPlatform::new(dir.path());
        assert_eq!(sim.machine_name().unwrap(), "a");
        write("b");
        assert_eq!(sim.machine_name().unwrap(), "b");
    }

    #[test]
    fn sim_platform_sees_every_change_made_before_a_look() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("usb")).unwrap();
        let sim = SimPlatform::new(dir.path());
        assert!(sim.watch.is_some());
        for round in 0..20i64 {
            let offset = -1_000_000 * (round + 1);
            let tmp = dir.path().join("clock.tmp");
            fs::write(&tmp, offset.to_string()).unwrap();
            fs::rename(&tmp, dir.path().join("clock")).unwrap();
            let skew = real_now_ms() as i64 - sim.now_ms().unwrap() as i64;
            assert!(
                (-offset - 1000..-offset + 1000).contains(&skew),
                "skew {skew}"
            );
            fs::write(dir.path().join("vmgenid"), format!("{round:032x}")).unwrap();
            assert_eq!(sim.vmgenid().unwrap(), Some(format!("{round:032x}")));
            let socket = dir.path().join(format!("usb/D-{round}.sock"));
            fs::write(&socket, "").unwrap();
            assert!(
                sim.usb_endpoints()
                    .unwrap()
                    .iter()
                    .any(|e| e.path == socket)
            );
            fs::remove_file(&socket).unwrap();
            assert!(sim.usb_endpoints().unwrap().is_empty());
        }
        fs::remove_file(dir.path().join("clock")).unwrap();
        let skew = real_now_ms() as i64 - sim.now_ms().unwrap() as i64;
        assert!(skew.abs() < 1000, "skew {skew}");
        // usb/ replaced by a new folder: watched again.
        fs::remove_dir(dir.path().join("usb")).unwrap();
        assert!(sim.usb_endpoints().unwrap().is_empty());
        fs::create_dir(dir.path().join("usb")).unwrap();
        assert!(sim.usb_endpoints().unwrap().is_empty());
        fs::write(dir.path().join("usb/D-9.sock"), "").unwrap();
        assert_eq!(sim.usb_endpoints().unwrap()[0].serial, "D-9");
    }

    #[test]
    fn malformed_clock_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("clock"), "soon").unwrap();
        let err = SimPlatform::new(dir.path()).now_ms().unwrap_err();
        assert!(err.to_string().contains("clock"), "{err}");
    }

    fn hid_uevent(id: &str, uniq: Option<&str>) -> String {
        let mut text = format!("DRIVER=hid-generic\nHID_ID={id}\nHID_NAME=meter dongle\n");
        if let Some(uniq) = uniq {
            text.push_str(&format!("HID_UNIQ={uniq}\n"));
        }
        text.push_str("MODALIAS=hid:b0003g0001v00001209p00004D54\n");
        text
    }

    const DONGLE_ID: &str = "0003:00001209:00004D54";

    #[rstest::rstest]
    #[case::matching_device(vec![("hidraw0", hid_uevent(DONGLE_ID, Some("4711")))], vec![("4711", "hidraw0")])]
    #[case::lower_case_hex(vec![("hidraw5", hid_uevent("0003:00001209:00004d54", Some("9")))], vec![("9", "hidraw5")])]
    #[case::other_vendor(vec![("hidraw0", hid_uevent("0003:0000046D:00004D54", Some("4711")))], vec![])]
    #[case::other_product(vec![("hidraw0", hid_uevent("0003:00001209:00000001", Some("4711")))], vec![])]
    #[case::other_bus(vec![("hidraw0", hid_uevent("0005:00001209:00004D54", Some("4711")))], vec![])]
    #[case::missing_uniq(vec![("hidraw0", hid_uevent(DONGLE_ID, None))], vec![])]
    #[case::empty_uniq(vec![("hidraw0", hid_uevent(DONGLE_ID, Some("")))], vec![])]
    #[case::several_dongles(
        vec![
            ("hidraw11", hid_uevent(DONGLE_ID, Some("B-2"))),
            ("hidraw2", hid_uevent("0003:0000046D:0000C52B", Some("mouse"))),
            ("hidraw3", hid_uevent(DONGLE_ID, Some("A-1"))),
            ("hidraw10", hid_uevent(DONGLE_ID, Some("C-3"))),
        ],
        vec![("A-1", "hidraw3"), ("B-2", "hidraw11"), ("C-3", "hidraw10")],
    )]
    #[case::one_serial_on_two_nodes_keeps_the_lowest(
        vec![
            ("hidraw12", hid_uevent(DONGLE_ID, Some("7"))),
            ("hidraw9", hid_uevent(DONGLE_ID, Some("7"))),
        ],
        vec![("7", "hidraw9")],
    )]
    #[case::no_hidraw_class(vec![], vec![])]
    fn host_platform_finds_dongles_among_hidraw_devices(
        #[case] devices: Vec<(&str, String)>,
        #[case] expected: Vec<(&str, &str)>,
    ) {
        let root = tempfile::tempdir().unwrap();
        for (name, uevent) in &devices {
            let device = root.path().join(format!("sys/devices/hid/{name}"));
            fs::create_dir_all(&device).unwrap();
            fs::write(device.join("uevent"), uevent).unwrap();
            let class = root.path().join(format!("sys/class/hidraw/{name}"));
            fs::create_dir_all(&class).unwrap();
            // As in sysfs, `device` is a link to the HID device.
            std::os::unix::fs::symlink(&device, class.join("device")).unwrap();
        }
        let host = HostPlatform::with_root(root.path());
        let found = host.usb_endpoints().unwrap();
        let expected: Vec<UsbEndpoint> = expected
            .into_iter()
            .map(|(serial, node)| UsbEndpoint {
                serial: serial.to_owned(),
                path: root.path().join("dev").join(node),
            })
            .collect();
        assert_eq!(found, expected);
    }

    #[test]
    fn host_platform_reads_cpu_traits() {
        let host = HostPlatform::new();
        let traits = host.traits().unwrap();
        assert!(traits.one(names::CPU_VENDOR).is_some());
        assert!(!host.machine_name().unwrap().is_empty());
    }
}
