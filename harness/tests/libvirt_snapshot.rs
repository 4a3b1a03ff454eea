//! An internal snapshot of a running guest and a revert to it, through a private libvirt
//! daemon: the guest runs again from the snapshot and sees a new generation id, which libvirt
//! makes at every revert (what the runtime's rollback defence watches for).
#![cfg(feature = "libvirt")]

mod libvirt_common;

use std::time::{Duration, Instant};

use libvirt_common::{READY_FILE, guest_folder, guest_spec, image_dir_or_skip};
use vigil::backend::guest::agent::AgentClient;
use vigil::backend::libvirt::daemon::HostDaemon;

#[test]
fn a_revert_runs_the_snapshot_with_a_new_generation_id() {
    let Some(images) = image_dir_or_skip() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let host = HostDaemon::start(
        &dir.path().join("host-a"),
        "6b1a4c1e-0f0e-4a3c-9d2b-0a0b0c0d0ec1",
    )
    .unwrap();
    let guest = guest_folder(&images, dir.path());
    // No generation id given: libvirt makes one, and a new one at the revert.
    let spec = guest_spec(&images, &guest, "5e0b6a52-4c3d-4c43-9a52-2b6c1f0d9e03", "a");
    let connection = host.connect().unwrap();
    let domain = connection.define_domain_xml(&spec.xml()).unwrap();
    domain.create().unwrap();
    let mut agent = AgentClient::connect(&spec.agent_socket, Duration::from_secs(30)).unwrap();
    let before = agent
        .wait_ready(READY_FILE, Duration::from_secs(120))
        .unwrap()
        .expect("the guest has a generation id");
    drop(agent);

    let started = Instant::now();
    let snapshot = domain
        .create_snapshot_xml("<domainsnapshot><name>s0</name></domainsnapshot>", 0)
        .unwrap_or_else(|e| panic!("libvirt refused the snapshot: {e}"));
    eprintln!("snapshot took {:.2} s", started.elapsed().as_secs_f64());
    let started = Instant::now();
    snapshot
        .revert(0)
        .unwrap_or_else(|e| panic!("libvirt refused the revert: {e}"));
    let mut agent = AgentClient::connect(&spec.agent_socket, Duration::from_secs(30)).unwrap();
    let after = agent
        .wait_ready(READY_FILE, Duration::from_secs(60))
        .unwrap()
        .expect("the guest has a generation id");
    eprintln!(
        "revert to a ready runtime took {:.2} s",
        started.elapsed().as_secs_f64()
    );
    assert!(
        domain.is_active().unwrap(),
        "the snapshot was taken running"
    );
    assert_ne!(
        before, after,
        "a revert gives the guest a new generation id"
    );
    domain.destroy().unwrap();
}
