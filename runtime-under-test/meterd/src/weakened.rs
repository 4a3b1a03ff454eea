//! Test-only weakened runtimes: `METER_WEAKEN=<defence>` switches off one defence, so a test can
//! prove that the scenario guarding it fails. Only a build with the cargo feature `weakened`
//! honours the variable; every other build refuses to start when it is set.
//!
//! Each weakening is a bug a runtime developer could plausibly ship; see `docs/verdicts.md`.

use std::fmt;
use std::str::FromStr;

use meter_core::policy::{Allowance, Counting, ItemRules};

/// The environment variable naming the defence to switch off.
pub const VARIABLE: &str = "METER_WEAKEN";

/// A defence of the runtime that a weakened build can switch off (names as in the scenario language).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Defence {
    /// A licence whose binding does not open falls back to its clear catalogue.
    TraitBinding,
    /// The vendor's activation tool seals every licence at loose tolerance.
    BindingTolerance,
    /// The VM switch is ignored and activation requests claim a physical machine.
    VmActivationSwitch,
    /// Reconciliation trusts the local receipt chain and adopts none of the witness's receipts.
    RollbackReceipts,
    /// The vmgenid recorded with the metered state is never compared with the current one.
    RollbackVmgenid,
    /// A clock below the high-water mark is not noticed.
    RollbackClock,
    /// Receipts are never handed to the witness.
    RollbackWitness,
    /// The vendor's `witness: required` is ignored: units are spent with no witness.
    WitnessRequired,
    /// A licence file applied again is registered afresh: what was in use of it is forgotten.
    ReapplyKeepsCounts,
    /// Dongles are bound under one fixed runtime id shared by every runtime.
    DongleBinding,
    /// A shared-use lockout is treated as transient: the dongle stays open and grants stand.
    DongleSharedDetection,
    /// A dongle rebound elsewhere keeps its grants here.
    DongleRebindRelease,
    /// A too-many-rebinds lockout is treated as transient: the dongle stays open and grants stand.
    DongleRebindLockout,
    /// The grants of an unplugged or unresponsive dongle are kept until their holders end.
    DongleRemovalRelease,
    /// The server forgets remote grants in its count once answered.
    ServerQuantity,
    /// Station-share items are counted per access.
    StationShareCounting,
    /// User-limit items are counted per station.
    UserLimitCounting,
    /// Quantity 0 is read as an ordinary quantity of 1.
    LocalLicence,
    /// The vendor's terminal-server switch is ignored.
    TerminalServerSwitch,
    /// Process exits (pidfd) are not watched: crashed apps keep their licences.
    CrashRelease,
    /// Silent remote stations are kept past the keepalive window.
    KeepaliveRelease,
    /// A client runtime keeps forwarded grants after its lease on the server lapsed.
    LeaseRevocation,
    /// The server's revocations of remote grants are not sent to the client runtimes.
    RemoteRevocation,
    /// Client runtimes are taken at their word: any key may present any runtime id, and the
    /// machine name a client claims is its station.
    StationAuthentication,
    /// Network connections, hellos and grants per station are not bounded.
    ConnectionLimits,
    /// Any local user may release or watch any grant, and a watcher replaces the holder.
    HolderOwnership,
    /// Expiry dates are ignored.
    Expiry,
    /// Dongle units are counted in the runtime's own state, not inside the dongle.
    DongleCounters,
    /// A firm certificate is trusted when it verifies against the root it names: any root.
    VendorTrust,
    /// A process counts in its process session, which `setsid` leaves, not its login session.
    LoginSessions,
    /// A guest is recognised by the CPUID hypervisor bit alone.
    GuestDetection,
    /// The runtime id is the stored random part alone: a clone with the state is the same runtime.
    CloneRuntimeId,
    /// A terminal server is known by its session table alone, which root may delete.
    TerminalServerRole,
    /// The key a runtime proves to dongles is derived from its id alone.
    DongleRuntimeKey,
    /// Any linked server may reconcile a licence, not only the witness that keeps its chain.
    WitnessPinning,
    /// A witness keeps a chain per licence and receipt key: no other runtime starts or blocks a
    /// licence's chain.
    WitnessChainKeys,
    /// The administrator's access rules (deny, include lists, caps, reservations) are enforced.
    AccessRules,
    /// Seats reserved for others and not yet used by them are not free to the rest.
    RuleReservations,
    /// Every grant, denial, release, reclaim and revocation is recorded in the usage log.
    UsageLogRecords,
    /// Verifying the usage log checks its places, chain, signatures and head.
    UsageLogChain,
    /// A restarted server grants nothing new until the runtimes it knew re-claimed their seats.
    RestartGrace,
    /// A triad member serves client runtimes only while it leads, and answers a grant or a
    /// keepalive only once the triad committed it.
    TriadQuorum,
    /// The apps on a triad member's own machine take their seats in the triad's ledger.
    TriadMemberApps,
    /// A triad licence serves only in the triad of the three servers it names.
    TriadLicence,
    /// A triad member that starts again neither votes nor stands for election until its log
    /// holds what the other members applied, or for two lease windows; one whose machine is
    /// reverted (a new generation id) takes no part in the triad for two lease windows.
    TriadRestartQuarantine,
    /// The leader commits a member's forwarded seat commands only within the licence it holds
    /// (quantity, lease window).
    TriadForwardCheck,
    /// The leader commits a member's forwarded commands only on that member's own apps' seats
    /// and machine.
    TriadForwardHolder,
}

impl Defence {
    /// Every defence, in the scenario language's order.
    pub const ALL: [Defence; 47] = [
        Defence::TraitBinding,
        Defence::BindingTolerance,
        Defence::VmActivationSwitch,
        Defence::RollbackReceipts,
        Defence::RollbackVmgenid,
        Defence::RollbackClock,
        Defence::RollbackWitness,
        Defence::WitnessRequired,
        Defence::ReapplyKeepsCounts,
        Defence::DongleBinding,
        Defence::DongleSharedDetection,
        Defence::DongleRebindRelease,
        Defence::DongleRebindLockout,
        Defence::DongleRemovalRelease,
        Defence::ServerQuantity,
        Defence::StationShareCounting,
        Defence::UserLimitCounting,
        Defence::LocalLicence,
        Defence::TerminalServerSwitch,
        Defence::CrashRelease,
        Defence::KeepaliveRelease,
        Defence::LeaseRevocation,
        Defence::RemoteRevocation,
        Defence::StationAuthentication,
        Defence::ConnectionLimits,
        Defence::HolderOwnership,
        Defence::Expiry,
        Defence::DongleCounters,
        Defence::VendorTrust,
        Defence::LoginSessions,
        Defence::GuestDetection,
        Defence::CloneRuntimeId,
        Defence::TerminalServerRole,
        Defence::DongleRuntimeKey,
        Defence::WitnessPinning,
        Defence::WitnessChainKeys,
        Defence::AccessRules,
        Defence::RuleReservations,
        Defence::UsageLogRecords,
        Defence::UsageLogChain,
        Defence::RestartGrace,
        Defence::TriadQuorum,
        Defence::TriadMemberApps,
        Defence::TriadLicence,
        Defence::TriadRestartQuarantine,
        Defence::TriadForwardCheck,
        Defence::TriadForwardHolder,
    ];

    /// The kebab-case name used by `METER_WEAKEN` and the scenario language.
    pub fn name(&self) -> &'static str {
        match self {
            Defence::TraitBinding => "trait-binding",
            Defence::BindingTolerance => "binding-tolerance",
            Defence::VmActivationSwitch => "vm-activation-switch",
            Defence::RollbackReceipts => "rollback-receipts",
            Defence::RollbackVmgenid => "rollback-vmgenid",
            Defence::RollbackClock => "rollback-clock",
            Defence::RollbackWitness => "rollback-witness",
            Defence::WitnessRequired => "witness-required",
            Defence::ReapplyKeepsCounts => "reapply-keeps-counts",
            Defence::DongleBinding => "dongle-binding",
            Defence::DongleSharedDetection => "dongle-shared-detection",
            Defence::DongleRebindRelease => "dongle-rebind-release",
            Defence::DongleRebindLockout => "dongle-rebind-lockout",
            Defence::DongleRemovalRelease => "dongle-removal-release",
            Defence::ServerQuantity => "server-quantity",
            Defence::StationShareCounting => "station-share-counting",
            Defence::UserLimitCounting => "user-limit-counting",
            Defence::LocalLicence => "local-licence",
            Defence::TerminalServerSwitch => "terminal-server-switch",
            Defence::CrashRelease => "crash-release",
            Defence::KeepaliveRelease => "keepalive-release",
            Defence::LeaseRevocation => "lease-revocation",
            Defence::RemoteRevocation => "remote-revocation",
            Defence::StationAuthentication => "station-authentication",
            Defence::ConnectionLimits => "connection-limits",
            Defence::HolderOwnership => "holder-ownership",
            Defence::Expiry => "expiry",
            Defence::DongleCounters => "dongle-counters",
            Defence::VendorTrust => "vendor-trust",
            Defence::LoginSessions => "login-sessions",
            Defence::GuestDetection => "guest-detection",
            Defence::CloneRuntimeId => "clone-runtime-id",
            Defence::TerminalServerRole => "terminal-server-role",
            Defence::DongleRuntimeKey => "dongle-runtime-key",
            Defence::WitnessPinning => "witness-pinning",
            Defence::WitnessChainKeys => "witness-chain-keys",
            Defence::AccessRules => "access-rules",
            Defence::RuleReservations => "rule-reservations",
            Defence::UsageLogRecords => "usage-log-records",
            Defence::UsageLogChain => "usage-log-chain",
            Defence::RestartGrace => "restart-grace",
            Defence::TriadQuorum => "triad-quorum",
            Defence::TriadMemberApps => "triad-member-apps",
            Defence::TriadLicence => "triad-licence",
            Defence::TriadRestartQuarantine => "triad-restart-quarantine",
            Defence::TriadForwardCheck => "triad-forward-check",
            Defence::TriadForwardHolder => "triad-forward-holder",
        }
    }
}

impl Defence {
    /// The bug a weakened runtime ships for this defence, in words.
    pub fn weakening(&self) -> &'static str {
        match self {
            Defence::TraitBinding => {
                "a licence whose binding does not open is not marked corrupt: its clear catalogue is served (quantity 1, station-share)"
            }
            Defence::BindingTolerance => {
                "the vendor's activation tool seals every licence at loose tolerance, whatever the policy says"
            }
            Defence::VmActivationSwitch => {
                "no hypervisor detection: activation requests claim a physical machine, and the VM switch is ignored at use"
            }
            Defence::RollbackReceipts => {
                "reconciliation compares the local receipt chain with itself instead of adopting the witness's receipts"
            }
            Defence::RollbackVmgenid => {
                "the vmgenid is read once and cached: a snapshot revert is not noticed"
            }
            Defence::RollbackClock => {
                "the clock is trusted: a time below the high-water mark is taken as the high-water mark"
            }
            Defence::RollbackWitness => "receipts are never handed to the witness (network server)",
            Defence::WitnessRequired => {
                "the vendor's `witness: required` is ignored: units are spent with no witness vouching for them"
            }
            Defence::ReapplyKeepsCounts => {
                "a licence file applied again is registered afresh: what is in use of it and its spent units are forgotten"
            }
            Defence::DongleBinding => {
                "dongles are bound under one fixed runtime id, so the dongle cannot tell runtimes apart"
            }
            Defence::DongleSharedDetection => {
                "a shared-use lockout from the dongle is treated as transient: the session stays open and grants stand"
            }
            Defence::DongleRebindRelease => {
                "a binding-broken answer (dongle rebound elsewhere) is ignored: grants stay"
            }
            Defence::DongleRebindLockout => {
                "a too-many-rebinds lockout is treated as transient; the runtime cannot report it (the lockout itself lives in the dongle firmware, which the runtime cannot switch off)"
            }
            Defence::DongleRemovalRelease => {
                "an unplugged or unresponsive dongle's grants are kept until their holders end"
            }
            Defence::ServerQuantity => {
                "the server answers remote grants but drops them from its count"
            }
            Defence::StationShareCounting => "station-share items are counted per access",
            Defence::UserLimitCounting => "user-limit items are counted per station",
            Defence::LocalLicence => "quantity 0 is read as an ordinary quantity of 1",
            Defence::TerminalServerSwitch => "the vendor's terminal-server switch is ignored",
            Defence::CrashRelease => {
                "process exits (pidfd) are not watched: a crashed app keeps its licence"
            }
            Defence::KeepaliveRelease => {
                "a remote station silent past the keepalive window is kept (a closed connection still lapses at the window's end)"
            }
            Defence::LeaseRevocation => {
                "a client runtime cut off from its server keeps the grants it forwarded: its apps run on"
            }
            Defence::RemoteRevocation => {
                "the server takes remote grants back without telling the client runtimes"
            }
            Defence::StationAuthentication => {
                "the server takes a client's runtime id and machine name as it says, whatever key it presents"
            }
            Defence::ConnectionLimits => {
                "no bound on connections, idle handshakes, hellos or grants per station"
            }
            Defence::HolderOwnership => {
                "any local user may release or watch any grant, silently, and a watcher replaces the holder's listener"
            }
            Defence::Expiry => "expiry dates are ignored",
            Defence::DongleCounters => {
                "dongle units are counted in the runtime's own (revertible) state; the dongle only opens plain accesses"
            }
            Defence::VendorTrust => {
                "a firm certificate is checked against the root key it names, so a root the licensee made is trusted"
            }
            Defence::LoginSessions => {
                "a process counts in its process session: one that calls setsid leaves its terminal-server session and counts as the machine"
            }
            Defence::GuestDetection => {
                "a guest is recognised by the CPUID hypervisor bit alone, which the VM's owner can switch off"
            }
            Defence::CloneRuntimeId => {
                "the runtime id is kept in the state folder alone: a guest cloned with its state presents the original's id"
            }
            Defence::TerminalServerRole => {
                "a terminal server is known by its session table alone: with the table deleted it is a workstation and its users' login sessions count as the machine"
            }
            Defence::DongleRuntimeKey => {
                "the key a runtime proves to dongles is derived from its id alone: a runtime presenting another's id proves its key too"
            }
            Defence::WitnessPinning => {
                "any linked server may reconcile a licence: a reverted guest pointed at an empty server takes its empty chain as the truth"
            }
            Defence::WitnessChainKeys => {
                "a witness keeps one chain per licence id, owned by the first runtime to send receipts for it: another machine that claims a licence first locks its owner out of the witness"
            }
            Defence::AccessRules => {
                "access rules are kept and shown but never asked: excluded users, caps and reservations change nothing"
            }
            Defence::RuleReservations => {
                "reservations are not subtracted from the free seats: anyone takes the seats kept for a group"
            }
            Defence::UsageLogRecords => {
                "denials are not written to the usage log: reports show no one was ever refused"
            }
            Defence::UsageLogChain => {
                "`meter usage verify` counts the records and checks nothing: a removed or altered record goes unseen"
            }
            Defence::RestartGrace => {
                "a restarted server grants at once: the seats its linked stations held before a crash are free to anyone before they re-claim them"
            }
            Defence::TriadQuorum => {
                "a triad member serves without a quorum: a follower or a leader cut off from the others grants and renews on its own count"
            }
            Defence::TriadMemberApps => {
                "the apps on a triad member's own machine take no seat in the triad's ledger, so the three members' apps and the clients together hold more seats than the licence has"
            }
            Defence::TriadLicence => {
                "a triad licence serves wherever it opens: each of the three servers it was issued for serves its seats alone, outside any triad, three times over"
            }
            Defence::TriadRestartQuarantine => {
                "a triad member votes as soon as it starts again or its machine is reverted: one whose state was put back from an old copy (or whose whole machine went back to a snapshot) helps elect a leader that never saw the seats granted since, so they are handed out twice"
            }
            Defence::TriadForwardCheck => {
                "the leader commits whatever seat a member forwards: a member whose runtime its licensee modified takes seats for its apps as if the licence had more"
            }
            Defence::TriadForwardHolder => {
                "the leader commits a forwarded command on any member's apps' seats: a member whose runtime its licensee modified gives back the seats another member's apps hold, and a client takes them while those apps still run"
            }
        }
    }
}

impl fmt::Display for Defence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A `METER_WEAKEN` value this build cannot honour.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WeakenError {
    /// The variable is set but the build has no weakenings.
    #[error(
        "{VARIABLE}={0} is set but this runtime was built without the `weakened` feature: refusing to run a runtime that would claim a weakening it does not have"
    )]
    NotWeakenedBuild(String),
    /// The variable names no defence.
    #[error("{VARIABLE}={0} names no defence; known: {known}", known = known_names())]
    UnknownDefence(String),
}

fn known_names() -> String {
    Defence::ALL.map(|d| d.name()).join(", ")
}

impl FromStr for Defence {
    type Err = WeakenError;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Defence::ALL
            .into_iter()
            .find(|d| d.name() == name)
            .ok_or_else(|| WeakenError::UnknownDefence(name.to_owned()))
    }
}

/// Reads `METER_WEAKEN`: the defence to switch off, none, or why this build refuses the value.
pub fn from_environment() -> Result<Option<Defence>, WeakenError> {
    let value = match std::env::var(VARIABLE) {
        Ok(value) if !value.is_empty() => value,
        _ => return Ok(None),
    };
    if !cfg!(feature = "weakened") {
        return Err(WeakenError::NotWeakenedBuild(value));
    }
    value.parse().map(Some)
}

/// Checks `METER_WEAKEN` at start-up and says loudly which defence is off.
pub fn announce() -> Result<(), WeakenError> {
    if let Some(defence) = from_environment()? {
        tracing::warn!(%defence, "WEAKENED RUNTIME: this defence is switched off for testing");
    }
    Ok(())
}

/// True when this process runs with `defence` switched off (never in a normal build).
#[cfg(feature = "weakened")]
pub fn is(defence: Defence) -> bool {
    static CHOSEN: std::sync::OnceLock<Option<Defence>> = std::sync::OnceLock::new();
    *CHOSEN.get_or_init(|| from_environment().ok().flatten()) == Some(defence)
}

/// True when this process runs with `defence` switched off (never in a normal build).
#[cfg(not(feature = "weakened"))]
#[inline(always)]
pub fn is(_defence: Defence) -> bool {
    false
}

/// The counting rules as a weakened runtime reads them from a licence or dongle.
pub fn rules(mut rules: ItemRules) -> ItemRules {
    if is(Defence::StationShareCounting) && rules.counting == Counting::StationShare {
        rules.counting = Counting::UserLimit;
    }
    if is(Defence::UserLimitCounting) && rules.counting == Counting::UserLimit {
        rules.counting = Counting::StationShare;
    }
    if is(Defence::LocalLicence) && rules.quantity == 0 {
        rules.quantity = 1;
    }
    if is(Defence::TerminalServerSwitch) {
        rules.terminal_server = Allowance::Allow;
    }
    if is(Defence::VmActivationSwitch) {
        rules.virtual_machines = Allowance::Allow;
    }
    if is(Defence::Expiry) {
        rules.expires_at = None;
    }
    rules
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_contract_names_every_weakening() {
        let doc = include_str!("../../../docs/runtime-contract.md");
        let section = doc.split("\n## Defences\n").nth(1).unwrap();
        let section = &section[..section.find("\n## ").unwrap_or(section.len())];
        let documented: Vec<&str> = section
            .lines()
            .filter_map(|line| line.strip_prefix("| `"))
            .filter_map(|rest| rest.split('`').next())
            .collect();
        let runtime: Vec<&str> = Defence::ALL.iter().map(|d| d.name()).collect();
        assert_eq!(runtime, documented);
    }

    #[test]
    fn every_defence_round_trips_by_name() {
        for defence in Defence::ALL {
            assert_eq!(defence.name().parse::<Defence>(), Ok(defence));
        }
        assert!(matches!(
            "no-such".parse::<Defence>(),
            Err(WeakenError::UnknownDefence(_))
        ));
    }

    #[cfg(not(feature = "weakened"))]
    #[test]
    fn a_normal_build_weakens_nothing() {
        for defence in Defence::ALL {
            assert!(!is(defence));
        }
        let rules = ItemRules {
            quantity: 0,
            counting: Counting::StationShare,
            virtual_machines: Allowance::Deny,
            terminal_server: Allowance::Deny,
            expires_at: Some(5),
        };
        assert_eq!(super::rules(rules), rules);
    }
}
