//! A guest of the image boots through a private libvirt daemon, from the domain XML the libvirt
//! backend writes: its agent answers over the virtio-serial channel, its runtime comes up, and
//! it sees the generation id the XML gave it.
#![cfg(feature = "libvirt")]

mod libvirt_common;

use std::time::{Duration, Instant};

use libvirt_common::{READY_FILE, guest_folder, guest_spec, image_dir_or_skip};
use vigil::backend::guest::agent::AgentClient;
use vigil::backend::libvirt::daemon::HostDaemon;
use vigil::backend::libvirt::domain_xml::DomainSpec;

#[test]
fn a_guest_boots_to_a_ready_runtime_through_libvirt() {
    let Some(images) = image_dir_or_skip() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let host = HostDaemon::start(
        &dir.path().join("host-a"),
        "6b1a4c1e-0f0e-4a3c-9d2b-0a0b0c0d0ea1",
    )
    .unwrap();
    let guest = guest_folder(&images, dir.path());
    let genid = "c5f2b3a1-0d4e-4f6a-8b7c-9d0e1f2a3b4c";
    let spec = DomainSpec {
        genid: Some(genid.into()),
        ..guest_spec(&images, &guest, "5e0b6a52-4c3d-4c43-9a52-2b6c1f0d9e01", "a")
    };
    let connection = host.connect().unwrap();
    let domain = connection.define_domain_xml(&spec.xml()).unwrap();
    let started = Instant::now();
    domain.create().unwrap();
    let mut agent = AgentClient::connect(&spec.agent_socket, Duration::from_secs(30)).unwrap();
    let seen = agent
        .wait_ready(READY_FILE, Duration::from_secs(120))
        .unwrap_or_else(|e| {
            let console = std::fs::read_to_string(&spec.serial_log).unwrap_or_default();
            panic!("not ready: {e}\n{console}")
        });
    eprintln!(
        "libvirt guest ready in {:.2} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(
        seen.map(|g| g.to_ascii_lowercase().replace('-', "")),
        Some(genid.replace('-', "")),
        "the guest sees the generation id of its domain"
    );
    domain.destroy().unwrap();
    drop(agent);
    drop(host);
}
