//! The built-in scenarios, embedded in the binary from the repository's scenarios/ folder.

/// A scenario shipped with Vigil.
#[derive(Debug, Clone, Copy)]
pub struct BuiltinScenario {
    /// Name (the file stem).
    pub name: &'static str,
    /// Path relative to the repository root, used in diagnostics.
    pub path: &'static str,
    /// The YAML text.
    pub text: &'static str,
}

macro_rules! builtin {
    ($name:literal) => {
        BuiltinScenario {
            name: $name,
            path: concat!("scenarios/", $name, ".yaml"),
            text: include_str!(concat!("../../../scenarios/", $name, ".yaml")),
        }
    };
}

/// Every built-in scenario, in a stable order.
pub(crate) static BUILTINS: &[BuiltinScenario] = &[
    builtin!("clone-guest"),
    builtin!("clone-guest-loose"),
    builtin!("guest-move-same-host"),
    builtin!("guest-move-other-host"),
    builtin!("guest-live-migration"),
    builtin!("host-licence-in-guest"),
    builtin!("vm-activation-denied"),
    builtin!("snapshot-rollback-units"),
    builtin!("witness-empty-server"),
    builtin!("witness-claimed-first"),
    builtin!("snapshot-rollback-time"),
    builtin!("snapshot-rollback-many"),
    builtin!("state-restore"),
    builtin!("state-restore-unwitnessed"),
    builtin!("state-restore-dongle"),
    builtin!("licence-reapply"),
    builtin!("licence-forged"),
    builtin!("dongle-vm-denied"),
    builtin!("terminal-server-setsid"),
    builtin!("terminal-server-untabled"),
    builtin!("vm-hidden-hypervisor"),
    builtin!("dongle-hop-cloned-state"),
    builtin!("dongle-impersonated-runtime"),
    builtin!("trial-expiry"),
    builtin!("nic-replaced"),
    builtin!("stationshare-terminal-server"),
    builtin!("stationshare-ts-guest"),
    builtin!("stationshare-mixed"),
    builtin!("terminal-server-client"),
    builtin!("user-limit"),
    builtin!("no-count"),
    builtin!("local-licence"),
    builtin!("crash-release"),
    builtin!("holder-release"),
    builtin!("holder-other-user"),
    builtin!("access-rules"),
    builtin!("access-rules-network"),
    builtin!("usage-reserved-split"),
    builtin!("usage-log-tampered"),
    builtin!("server-keepalive"),
    builtin!("partition-short"),
    builtin!("partition-reset"),
    builtin!("remote-revocation"),
    builtin!("server-flood"),
    builtin!("server-crash"),
    builtin!("triad-failover"),
    builtin!("triad-split-brain"),
    builtin!("triad-member-apps"),
    builtin!("triad-licence"),
    builtin!("triad-in-guests"),
    builtin!("triad-paused-leader"),
    builtin!("triad-rejoin"),
    builtin!("triad-restored-member"),
    builtin!("triad-restored-pair"),
    builtin!("triad-guest-members"),
    builtin!("triad-reverted-member"),
    builtin!("triad-inflated-seats"),
    builtin!("triad-foreign-release"),
    builtin!("station-spoof"),
    builtin!("dongle-exclusive-guest"),
    builtin!("dongle-shared-lockout"),
    builtin!("dongle-hop"),
    builtin!("dongle-rebind"),
    builtin!("dongle-host-server"),
    builtin!("usb-over-ethernet"),
    builtin!("dongle-units"),
    builtin!("dongle-hang"),
];
