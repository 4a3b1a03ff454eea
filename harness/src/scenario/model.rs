//! The scenario model: what a scenario file says, as typed values.

use std::net::IpAddr;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::duration::{ClockSkew, Duration};
use super::located::Located;

/// A name written in a scenario (machine, app, session, dongle, snapshot), with its position.
pub type Name = Located<String>;

/// A product code written in a scenario, with its position.
pub type ProductCode = Located<u32>;

/// A whole scenario: the world, the vendor's policy and the ordered steps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
#[schemars(title = "Vigil scenario")]
pub struct Scenario {
    /// Scenario name; built-in scenarios use their file stem.
    pub name: Name,
    /// One sentence: what the scenario proves.
    #[serde(default)]
    pub description: String,
    /// Labels used to select scenarios (`vigil suite --tag smoke`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<Name>,
    /// The licence policy the vendor issues for this scenario.
    pub policy: Policy,
    /// Physical machines; always up.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<Host>,
    /// Virtual machines; start shut down.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub guests: Vec<Guest>,
    /// Licence dongles; start unplugged.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dongles: Vec<Dongle>,
    /// Defences of the runtime this scenario exercises.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub guards: Vec<Located<Defence>>,
    /// Holes this scenario shows open because its policy chose so (listed as undefended by
    /// policy in the verdicts, never as a defence).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_by_policy: Vec<AllowedByPolicy>,
    /// What happens, in order.
    pub steps: Vec<Located<Step>>,
    /// File name or built-in path the scenario was read from (not a YAML key).
    #[serde(skip)]
    #[schemars(skip)]
    pub origin: String,
}

/// A hole a scenario shows open on purpose: the vendor's policy for one product allows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct AllowedByPolicy {
    /// The product whose policy allows it.
    pub product: ProductCode,
    /// The product field and value that allow it, as `field: value` (e.g. `witness: optional`).
    pub policy: Located<String>,
    /// What the licensee gains, in one sentence.
    pub gains: String,
}

/// The vendor's licence policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Policy {
    /// Product items the vendor issues.
    pub products: Vec<Product>,
}

/// One product item of the policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Product {
    /// Product code, as apps ask for it.
    pub code: ProductCode,
    /// Product name, for reports.
    pub name: Name,
    /// Where the licence lives: a soft licence file or a dongle.
    pub container: Container,
    /// Licence quantity; 0 = local single-user licence.
    pub quantity: u32,
    /// How accesses are counted against the quantity.
    pub counting: Counting,
    /// How a soft licence is bound to its machine.
    #[serde(default)]
    pub binding: Binding,
    /// Whether the licence may be activated and used in virtual machines.
    #[serde(default)]
    pub virtual_machines: Permission,
    /// Whether the licence may be used in terminal-server sessions.
    #[serde(default)]
    pub terminal_server: Permission,
    /// Whether a triad licence of it may be activated for members in virtual machines.
    #[serde(default)]
    pub triad_in_guests: Permission,
    /// Expiry, as a duration from scenario start (absent = never expires).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<Duration>,
    /// Pay-per-use units; each grant spends one (absent = not metered).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub units: Option<u64>,
    /// What the runtime does when it detects a rollback of metered state.
    #[serde(default)]
    pub on_rollback: RollbackPolicy,
    /// Whether units may be spent with no witness vouching for them (soft items with units).
    #[serde(default)]
    pub witness: Located<WitnessPolicy>,
}

/// Where a product's licence lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Container {
    /// A soft licence file bound to the machine it is activated on.
    Soft,
    /// A licence dongle (see `dongles`).
    Dongle,
}

/// How accesses are counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Counting {
    /// Every access takes one licence.
    UserLimit,
    /// Every station takes one licence however many accesses it makes.
    StationShare,
    /// Accesses are not counted.
    NoCount,
}

/// How a soft licence is bound to its machine.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Binding {
    /// Binding scheme.
    #[serde(default)]
    pub scheme: BindingScheme,
    /// How many hardware traits may change (smartbind only).
    #[serde(default)]
    pub tolerance: Tolerance,
}

/// Soft licence binding scheme.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum BindingScheme {
    /// Bound cryptographically to weighted hardware traits.
    #[default]
    Smartbind,
    /// Bound to a random id stored at activation.
    Random,
    /// Bound to the machine's IP address.
    Ip,
}

/// How tolerant a smartbind binding is to changed traits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Tolerance {
    /// Survives many changes (including a move to other hardware).
    Loose,
    /// Survives one changed trait.
    #[default]
    Medium,
    /// Any change breaks the binding.
    Strict,
}

/// A vendor switch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Permission {
    /// Permitted.
    #[default]
    Allow,
    /// Refused.
    Deny,
}

/// What the runtime does when metered state is rolled back.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RollbackPolicy {
    /// Lock the metered items until a vendor update.
    #[default]
    Lock,
    /// Reconcile with a witness (network server or dongle) and carry on.
    Reconcile,
}

/// Whether metered units may be spent with no witness vouching for them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum WitnessPolicy {
    /// With a witness when one is reachable, without one otherwise: a state restore on a
    /// machine with no witness is not caught (undefended by this policy).
    #[default]
    Optional,
    /// Only with a witness that vouched for the receipts in this run and takes each new one.
    Required,
}

/// A physical machine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Host {
    /// Machine name.
    pub name: Name,
    /// CPU profile (guests on this host see it too).
    pub cpu: Cpu,
    /// Hardware identity; generated from the name when absent.
    #[serde(default, skip_serializing_if = "Identity::is_empty")]
    pub identity: Identity,
    /// Workstation (one interactive session) or terminal server (many).
    #[serde(default)]
    pub role: Role,
}

/// A CPU profile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Cpu {
    /// Vendor id string, e.g. GenuineIntel.
    pub vendor: String,
    /// Model name, e.g. "Xeon Gold 6248".
    pub model: String,
    /// CPU family number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub family: Option<u32>,
    /// Stepping number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stepping: Option<u32>,
    /// Microcode revision, e.g. "0x5003604".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub microcode: Option<String>,
}

/// Identity traits of a machine; absent values are generated from the machine name.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Identity {
    /// Board (baseboard) serial number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub board_serial: Option<String>,
    /// SMBIOS product UUID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub product_uuid: Option<String>,
    /// SMBIOS product serial number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub product_serial: Option<String>,
    /// Disk serial numbers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disk_serials: Vec<String>,
    /// NIC MAC addresses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub macs: Vec<Located<String>>,
}

impl Identity {
    /// Whether no trait is given.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// What kind of sessions a machine holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// One interactive session; RDP is remote desktop (same station as the console).
    #[default]
    Workstation,
    /// Many simultaneous sessions, each its own station.
    TerminalServer,
}

/// A virtual machine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Guest {
    /// Machine name.
    pub name: Name,
    /// The host it runs on.
    pub host: Name,
    /// Workstation or terminal server.
    #[serde(default)]
    pub role: Role,
    /// Virtual hardware identity; generated from the name when absent.
    #[serde(default, skip_serializing_if = "Identity::is_empty")]
    pub identity: Identity,
    /// An attack by the VM's owner: the CPUID hypervisor bit is switched off (qemu:
    /// `-cpu …,-hypervisor`); the virtual firmware and devices still show.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub hide_hypervisor: bool,
}

/// A licence dongle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Dongle {
    /// Name steps use.
    pub name: Name,
    /// Serial number; generated from the name when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// Codes of the dongle products programmed into it.
    pub products: Vec<ProductCode>,
    /// Rebind and lockout policy programmed into it.
    #[serde(default)]
    pub policy: DonglePolicy,
}

/// A dongle's rebind policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct DonglePolicy {
    /// Rebinds allowed within `window` before lockout.
    #[serde(default = "default_max_rebinds")]
    pub max_rebinds: u32,
    /// Window of dongle time in which rebinds are counted.
    #[serde(default = "default_rebind_window")]
    pub window: Duration,
    /// How long a lockout lasts, in dongle time.
    #[serde(default = "default_lockout")]
    pub lockout: Duration,
}

fn default_max_rebinds() -> u32 {
    3
}
fn default_rebind_window() -> Duration {
    Duration::from_secs(60)
}
fn default_lockout() -> Duration {
    Duration::from_secs(300)
}

impl Default for DonglePolicy {
    fn default() -> Self {
        Self {
            max_rebinds: default_max_rebinds(),
            window: default_rebind_window(),
            lockout: default_lockout(),
        }
    }
}

/// A defence of the licence runtime a scenario exercises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Defence {
    /// Soft licence key rebuilt only from enough matching hardware traits.
    TraitBinding,
    /// Binding tolerance (loose, medium, strict) decides what a change does.
    BindingTolerance,
    /// Vendor switch refusing activation in virtual machines.
    VmActivationSwitch,
    /// Signed, hash-chained receipts of unit use.
    RollbackReceipts,
    /// vmgenid recorded at each state write.
    RollbackVmgenid,
    /// Time high-water mark.
    RollbackClock,
    /// Reconciliation with a witness that stores chain heads.
    RollbackWitness,
    /// Applying a licence file again keeps what is in use of it and the units spent.
    ReapplyKeepsCounts,
    /// Units of a `witness: required` item are spent only with a witness vouching for them.
    WitnessRequired,
    /// Dongle session binds it to one runtime.
    DongleBinding,
    /// A dongle seen by two runtimes at once locks out.
    DongleSharedDetection,
    /// A rebind elsewhere releases the old holder's licences.
    DongleRebindRelease,
    /// Too many rebinds in the window lock the dongle out.
    DongleRebindLockout,
    /// An unplugged dongle's licences are released.
    DongleRemovalRelease,
    /// The network server counts stations against the quantity.
    ServerQuantity,
    /// Station-share counts one station per machine or terminal-server session.
    StationShareCounting,
    /// User-limit counts every access.
    UserLimitCounting,
    /// Quantity 0 licences stay on their own machine, out of terminal-server sessions.
    LocalLicence,
    /// Vendor switch refusing terminal-server sessions.
    TerminalServerSwitch,
    /// Crashed local apps are released at once (pidfd).
    CrashRelease,
    /// Silent remote stations are released after the keepalive window.
    KeepaliveRelease,
    /// A client runtime whose lease on a server lapsed revokes what it forwarded there.
    LeaseRevocation,
    /// The server's revocations of remote grants reach the client runtimes and their apps.
    RemoteRevocation,
    /// Runtime ids are bound to client keys; a station is named from the authenticated runtime.
    StationAuthentication,
    /// Connections, idle handshakes, hellos and grants per station are bounded.
    ConnectionLimits,
    /// Only a grant's own user releases or watches it, and its holder is told.
    HolderOwnership,
    /// Expiry enforced on the runtime's clock.
    Expiry,
    /// Units counted inside the dongle's secure element.
    DongleCounters,
    /// Vendors trusted only through a firm certificate from a root the runtime carries.
    VendorTrust,
    /// A process counts in its login session, which `setsid` cannot leave.
    LoginSessions,
    /// A guest is recognised by several signals, not the CPUID hypervisor bit alone.
    GuestDetection,
    /// A guest cloned with its runtime state is another runtime (its id names the machine).
    CloneRuntimeId,
    /// A terminal server is known by its live login sessions, not only by its session table.
    TerminalServerRole,
    /// Each runtime proves a key of its own to dongles: another's id without its key is another runtime.
    DongleRuntimeKey,
    /// A licence reconciles only with the witness that keeps its chain, not any server it is shown.
    WitnessPinning,
    /// A witness keeps a chain per licence and receipt key: no other runtime starts or blocks it.
    WitnessChainKeys,
    /// The administrator's access rules (exclusions, include lists, caps, reservations) hold.
    AccessRules,
    /// Seats reserved for others and still unused are not free to the rest.
    RuleReservations,
    /// The usage log records every grant, denial and end of a grant.
    UsageLogRecords,
    /// Verifying the usage log finds a removed, altered or reordered record.
    UsageLogChain,
    /// A restarted server grants nothing new until the runtimes it knew re-claimed their seats.
    RestartGrace,
    /// A triad member serves only while it leads and answers only what the triad committed.
    TriadQuorum,
    /// The apps on a triad member's own machine take their seats in the triad's ledger.
    TriadMemberApps,
    /// A triad licence serves only in the triad of the three servers it names.
    TriadLicence,
    /// A triad member that starts again, or whose machine is reverted, takes no part in
    /// elections until it has caught up or its lost leases ran out.
    TriadRestartQuarantine,
    /// A triad's leader commits another member's seats only within the licence it holds.
    TriadForwardCheck,
    /// A triad's leader commits a member's forwarded commands only on that member's own apps'
    /// seats and machine.
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

    /// Its name in scenarios, in the runtime contract and in `METER_WEAKEN`.
    pub fn name(self) -> &'static str {
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

    /// What the defence holds, in one line.
    pub fn summary(self) -> &'static str {
        match self {
            Defence::TraitBinding => {
                "Soft licence key rebuilt only from enough matching hardware traits."
            }
            Defence::BindingTolerance => {
                "Binding tolerance (loose, medium, strict) decides what a change does."
            }
            Defence::VmActivationSwitch => "Vendor switch refusing activation in virtual machines.",
            Defence::RollbackReceipts => "Signed, hash-chained receipts of unit use.",
            Defence::RollbackVmgenid => "vmgenid recorded at each state write.",
            Defence::RollbackClock => "Time high-water mark.",
            Defence::RollbackWitness => "Reconciliation with a witness that stores chain heads.",
            Defence::WitnessRequired => {
                "Units of a `witness: required` item are spent only with a witness vouching for them."
            }
            Defence::ReapplyKeepsCounts => {
                "Applying a licence file again keeps what is in use of it and the units spent."
            }
            Defence::DongleBinding => "Dongle session binds it to one runtime.",
            Defence::DongleSharedDetection => "A dongle seen by two runtimes at once locks out.",
            Defence::DongleRebindRelease => {
                "A rebind elsewhere releases the old holder's licences."
            }
            Defence::DongleRebindLockout => "Too many rebinds in the window lock the dongle out.",
            Defence::DongleRemovalRelease => "An unplugged dongle's licences are released.",
            Defence::ServerQuantity => "The network server counts stations against the quantity.",
            Defence::StationShareCounting => {
                "Station-share counts one station per machine or terminal-server session."
            }
            Defence::UserLimitCounting => "User-limit counts every access.",
            Defence::LocalLicence => {
                "Quantity 0 licences stay on their own machine, out of terminal-server sessions."
            }
            Defence::TerminalServerSwitch => "Vendor switch refusing terminal-server sessions.",
            Defence::CrashRelease => "Crashed local apps are released at once (pidfd).",
            Defence::KeepaliveRelease => {
                "Silent remote stations are released after the keepalive window."
            }
            Defence::LeaseRevocation => {
                "A client runtime whose lease on a server lapsed revokes what it forwarded there."
            }
            Defence::RemoteRevocation => {
                "The server's revocations of remote grants reach the client runtimes and their apps."
            }
            Defence::StationAuthentication => {
                "Runtime ids are bound to client keys; a station is named from the authenticated runtime."
            }
            Defence::ConnectionLimits => {
                "Connections, idle handshakes, hellos and grants per station are bounded."
            }
            Defence::HolderOwnership => {
                "Only a grant's own user releases or watches it, and its holder is told."
            }
            Defence::Expiry => "Expiry enforced on the runtime's clock.",
            Defence::DongleCounters => "Units counted inside the dongle's secure element.",
            Defence::VendorTrust => {
                "Vendors trusted only through a firm certificate from a root the runtime carries."
            }
            Defence::LoginSessions => {
                "A process counts in its login session, which `setsid` cannot leave."
            }
            Defence::GuestDetection => {
                "A guest is recognised by several signals, not the CPUID hypervisor bit alone."
            }
            Defence::CloneRuntimeId => {
                "A guest cloned with its runtime state is another runtime (its id names the machine)."
            }
            Defence::TerminalServerRole => {
                "A terminal server is known by its live login sessions, not only by its session table."
            }
            Defence::DongleRuntimeKey => {
                "Each runtime proves a key of its own to dongles: another's id without its key is another runtime."
            }
            Defence::WitnessPinning => {
                "A licence reconciles only with the witness that keeps its chain, not any server it is shown."
            }
            Defence::WitnessChainKeys => {
                "A witness keeps a chain per licence and receipt key: another machine cannot claim a licence's chain first."
            }
            Defence::AccessRules => {
                "The administrator's access rules hold: excluded users, caps per user or group, reservations."
            }
            Defence::RuleReservations => {
                "Seats reserved for a group and not yet used by it are not free to anyone else."
            }
            Defence::UsageLogRecords => {
                "The usage log records every grant, denial, release, reclaim and revocation."
            }
            Defence::UsageLogChain => {
                "Verifying the usage log finds a record removed, altered or moved by whoever edits the state."
            }
            Defence::RestartGrace => {
                "A restarted server grants nothing new until the stations it knew have re-claimed their seats or their leases ran out."
            }
            Defence::TriadQuorum => {
                "A triad member grants and renews only what two members committed: a member cut off from the others serves nobody."
            }
            Defence::TriadMemberApps => {
                "An app on a triad member's own machine takes a seat in the triad's ledger (through the leader), so the members' apps and the clients never hold more seats than the licence has."
            }
            Defence::TriadLicence => {
                "A licence issued for a server triad serves only in the triad of the three servers it names: its three copies never serve as three lone servers."
            }
            Defence::TriadRestartQuarantine => {
                "A triad member that starts again neither votes nor stands for election until its log holds what the other members applied (asked of the leader, or of both others), or for two lease windows; one whose machine's generation id changes (a hypervisor's revert: its Raft runs on from an old memory) takes no part in the triad at all for two lease windows, and makes no call while it still leads the term it went back to: a member whose state was put back from an old copy cannot help elect a leader that never saw the seats granted since."
            }
            Defence::TriadForwardCheck => {
                "A triad's leader commits the seats another member asks for its own apps only within the licence the leader holds: a grant counted against more seats than the licence has is refused and no lease runs longer than the leader's window, whatever a member's modified runtime claims."
            }
            Defence::TriadForwardHolder => {
                "A triad's leader commits what another member forwards only on that member's own apps' seats (their holder is named by the member's certificate pin, which its link to the leader proves) and its own machine: a member's modified runtime cannot give back the seats another member's apps hold for a client to take while those apps still run."
            }
        }
    }
}

/// One step of a scenario: exactly one key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum Step {
    /// Power on a guest.
    Boot(Name),
    /// Power off a guest (its apps and sessions end, its server stops).
    Shutdown(Name),
    /// Freeze a running guest.
    Pause(Name),
    /// Unfreeze a paused guest.
    Resume(Name),
    /// Take a named snapshot of a guest (disk, runtime state and power state).
    Snapshot(SnapshotStep),
    /// Return a guest to a snapshot (the hypervisor gives it a new vmgenid).
    Revert(RevertStep),
    /// Create a new guest from a guest's disk.
    Clone(CloneStep),
    /// Live-migrate a running guest to another host (identity kept).
    Migrate(MigrateStep),
    /// Cold-move a shut-down guest to a host (it boots with that host's CPU).
    Move(MoveStep),
    /// Replace a hardware part of a machine (new serial or MAC).
    ReplacePart(ReplacePartStep),
    /// Plug a dongle into one machine (exclusive) or several at once (shared).
    UsbAttach(UsbAttachStep),
    /// Unplug a dongle attached with usb-attach.
    UsbDetach(Name),
    /// Attach a dongle to a machine over USB/IP.
    UsbipAttach(UsbipAttachStep),
    /// Detach a USB/IP dongle cleanly.
    UsbipDetach(Name),
    /// Break a USB/IP connection (injected network fault).
    UsbipDisconnect(Name),
    /// Hang a dongle: it stays plugged in but stops answering, until it is unplugged everywhere.
    UsbHang(Name),
    /// Open a login session on a machine.
    SessionOpen(SessionOpenStep),
    /// Log a session off (its apps end).
    SessionClose(Name),
    /// Delete the runtime's session table on a running machine and keep it deleted while the
    /// machine runs (an attack: root hides who is logged in; the sessions stay open).
    DropSessionTable(Name),
    /// Activate a soft licence on a machine.
    Activate(ActivateStep),
    /// Activate one triad licence for three network servers: each gets its copy, bound to it
    /// and naming the three (it serves only once they form that triad).
    ActivateTriad(ActivateTriadStep),
    /// Copy a machine's licence file and state to another machine (an attack).
    CopyLicence(CopyLicenceStep),
    /// Apply a machine's licence file again, as it was issued (an attack on its counts).
    ApplyAgain(ApplyAgainStep),
    /// Mint a licence with a self-made vendor key and root, trust it and apply it (an attack).
    ForgeLicence(ForgeLicenceStep),
    /// One-shot probe: take a licence and give it back at once.
    Access(AccessStep),
    /// Start an app that takes a licence and holds it while it runs.
    StartApp(StartAppStep),
    /// The app gives its licence back and exits.
    Release(Name),
    /// The app crashes (SIGKILL).
    Kill(Name),
    /// Another process gives the app's licence back by its handle (an attack on the holder).
    ReleaseElsewhere(ReleaseElsewhereStep),
    /// Move every clock in the world forward.
    Advance(Located<Duration>),
    /// Set one machine's clock offset from world time (an attack).
    SetClock(SetClockStep),
    /// Cut the network between the listed machines.
    Partition(PartitionStep),
    /// Restore the network between the listed machines (all when none listed).
    Heal(HealStep),
    /// Start a network licence server on a machine; every other machine's runtime is told of it.
    ServerStart(ServerStartStep),
    /// Stop a machine's network licence server.
    ServerStop(Name),
    /// Kill a machine's network licence server (SIGKILL) and start it again (an attack: the
    /// licensee hopes the restarted server forgets the seats it granted).
    ServerCrash(Name),
    /// Freeze a machine's network server (SIGSTOP: its connections stay open and silent, its
    /// timers stand still), as a debugger, a swap storm or a frozen VM would.
    ServerPause(Name),
    /// Let a frozen server run on (SIGCONT), unaware of the time it lost.
    ServerResume(Name),
    /// Make the network servers of three machines one triad (2-of-3 redundancy): seats counted
    /// once across the three, the first listed leading while all are up; every other machine's
    /// runtime is pointed at the triad as one server.
    Triad(Vec<Name>),
    /// Let real time pass (keepalive windows and leases run in real time).
    Wait(Located<Duration>),
    /// Open many idle TCP connections from one machine to another's server (an attack).
    Flood(FloodStep),
    /// Make a machine's runtime present another machine's name and runtime id (an attack).
    Impersonate(ImpersonateStep),
    /// A machine's runtime hands the witnesses receipts of another machine's licence, signed
    /// with its own key, before the licence's owner sends any (an attack).
    ClaimWitness(ClaimWitnessStep),
    /// A triad member's runtime, modified by its licensee, asks the leader for its own apps'
    /// seats as if the licence had more (an attack).
    InflateSeats(InflateSeatsStep),
    /// A triad member's runtime, modified by its licensee, gives back through the leader the
    /// seats the other members' apps hold (an attack).
    ReleaseMemberSeats(Name),
    /// Put the administrator's access rules in force on a machine's runtime.
    Rules(RulesStep),
    /// Remove one record of a machine's usage log, as root editing the state can (an attack).
    TamperUsageLog(TamperUsageLogStep),
    /// Copy a machine's runtime state folder aside, as root can (an attack, with `state-restore`).
    StateSave(StateCopyStep),
    /// Put a saved copy of a machine's runtime state folder back (an attack: no snapshot, no
    /// new vmgenid).
    StateRestore(StateCopyStep),
    /// Check what the runtime did.
    Expect(Assertion),
}

impl Step {
    /// The step's key, as written in YAML (e.g. `usb-attach`).
    pub fn keyword(&self) -> &'static str {
        match self {
            Step::Boot(_) => "boot",
            Step::Shutdown(_) => "shutdown",
            Step::Pause(_) => "pause",
            Step::Resume(_) => "resume",
            Step::Snapshot(_) => "snapshot",
            Step::Revert(_) => "revert",
            Step::Clone(_) => "clone",
            Step::Migrate(_) => "migrate",
            Step::Move(_) => "move",
            Step::ReplacePart(_) => "replace-part",
            Step::UsbAttach(_) => "usb-attach",
            Step::UsbDetach(_) => "usb-detach",
            Step::UsbipAttach(_) => "usbip-attach",
            Step::UsbipDetach(_) => "usbip-detach",
            Step::UsbipDisconnect(_) => "usbip-disconnect",
            Step::UsbHang(_) => "usb-hang",
            Step::SessionOpen(_) => "session-open",
            Step::SessionClose(_) => "session-close",
            Step::DropSessionTable(_) => "drop-session-table",
            Step::Activate(_) => "activate",
            Step::ActivateTriad(_) => "activate-triad",
            Step::CopyLicence(_) => "copy-licence",
            Step::ApplyAgain(_) => "apply-again",
            Step::ForgeLicence(_) => "forge-licence",
            Step::Access(_) => "access",
            Step::StartApp(_) => "start-app",
            Step::Release(_) => "release",
            Step::Kill(_) => "kill",
            Step::ReleaseElsewhere(_) => "release-elsewhere",
            Step::Advance(_) => "advance",
            Step::SetClock(_) => "set-clock",
            Step::Partition(_) => "partition",
            Step::Heal(_) => "heal",
            Step::ServerStart(_) => "server-start",
            Step::ServerStop(_) => "server-stop",
            Step::ServerCrash(_) => "server-crash",
            Step::ServerPause(_) => "server-pause",
            Step::ServerResume(_) => "server-resume",
            Step::Triad(_) => "triad",
            Step::Wait(_) => "wait",
            Step::Flood(_) => "flood",
            Step::Impersonate(_) => "impersonate",
            Step::ClaimWitness(_) => "claim-witness",
            Step::InflateSeats(_) => "inflate-seats",
            Step::ReleaseMemberSeats(_) => "release-member-seats",
            Step::Rules(_) => "rules",
            Step::TamperUsageLog(_) => "tamper-usage-log",
            Step::StateSave(_) => "state-save",
            Step::StateRestore(_) => "state-restore",
            Step::Expect(_) => "expect",
        }
    }

    /// The machines the step names, in the order it names them (apps, sessions and dongles are
    /// not machines: a step naming only those names none).
    pub fn machines(&self) -> Vec<&str> {
        let names: Vec<&Name> = match self {
            Step::Boot(m)
            | Step::Shutdown(m)
            | Step::Pause(m)
            | Step::Resume(m)
            | Step::DropSessionTable(m)
            | Step::ServerStop(m)
            | Step::ServerCrash(m)
            | Step::ReleaseMemberSeats(m)
            | Step::ServerPause(m)
            | Step::ServerResume(m) => vec![m],
            Step::Snapshot(s) => vec![&s.machine],
            Step::StateSave(s) | Step::StateRestore(s) => vec![&s.machine],
            Step::Revert(s) => vec![&s.machine],
            Step::Clone(c) => std::iter::once(&c.from)
                .chain(std::iter::once(&c.to))
                .chain(c.host.iter())
                .collect(),
            Step::Migrate(m) => vec![&m.machine, &m.host],
            Step::Move(m) => vec![&m.machine, &m.host],
            Step::ReplacePart(r) => vec![&r.machine],
            Step::UsbAttach(u) => u.targets(),
            Step::UsbipAttach(u) => vec![&u.machine],
            Step::SessionOpen(s) => vec![&s.machine],
            Step::Activate(a) => vec![&a.machine],
            Step::ActivateTriad(a) => a.machines.iter().collect(),
            Step::CopyLicence(c) => vec![&c.from, &c.to],
            Step::ApplyAgain(a) => vec![&a.machine],
            Step::ForgeLicence(f) => vec![&f.machine],
            Step::Access(a) => vec![&a.machine],
            Step::StartApp(s) => vec![&s.machine],
            Step::SetClock(s) => vec![&s.machine],
            Step::Partition(p) => p.machines.iter().collect(),
            Step::Triad(members) => members.iter().collect(),
            Step::Heal(h) => h.machines.iter().collect(),
            Step::ServerStart(s) => vec![&s.machine],
            Step::Flood(f) => vec![&f.from, &f.to],
            Step::Impersonate(i) => vec![&i.machine, &i.victim],
            Step::ClaimWitness(c) => vec![&c.machine, &c.victim],
            Step::InflateSeats(i) => vec![&i.machine],
            Step::Rules(r) => vec![&r.machine],
            Step::TamperUsageLog(t) => vec![&t.machine],
            Step::UsbDetach(_)
            | Step::UsbipDetach(_)
            | Step::UsbipDisconnect(_)
            | Step::UsbHang(_)
            | Step::SessionClose(_)
            | Step::Release(_)
            | Step::Kill(_)
            | Step::ReleaseElsewhere(_)
            | Step::Advance(_)
            | Step::Wait(_)
            | Step::Expect(_) => vec![],
        };
        let mut machines: Vec<&str> = Vec::new();
        for name in names {
            if !machines.contains(&name.value.as_str()) {
                machines.push(&name.value);
            }
        }
        machines
    }

    /// Every step key, in declaration order.
    pub const KEYWORDS: [&'static str; 50] = [
        "boot",
        "shutdown",
        "pause",
        "resume",
        "snapshot",
        "revert",
        "clone",
        "migrate",
        "move",
        "replace-part",
        "usb-attach",
        "usb-detach",
        "usbip-attach",
        "usbip-detach",
        "usbip-disconnect",
        "usb-hang",
        "session-open",
        "session-close",
        "drop-session-table",
        "activate",
        "activate-triad",
        "copy-licence",
        "apply-again",
        "forge-licence",
        "access",
        "start-app",
        "release",
        "kill",
        "release-elsewhere",
        "advance",
        "set-clock",
        "partition",
        "heal",
        "server-start",
        "server-stop",
        "server-crash",
        "server-pause",
        "server-resume",
        "triad",
        "wait",
        "flood",
        "impersonate",
        "claim-witness",
        "inflate-seats",
        "release-member-seats",
        "rules",
        "tamper-usage-log",
        "state-save",
        "state-restore",
        "expect",
    ];
}

/// `snapshot`: take a named snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct SnapshotStep {
    /// The guest.
    pub machine: Name,
    /// Snapshot name, unique per guest.
    pub name: Name,
}

/// `state-save` / `state-restore`: a named copy of a machine's runtime state folder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct StateCopyStep {
    /// The machine (running; its runtime is stopped for the copy and started again).
    pub machine: Name,
    /// The copy's name, unique per machine.
    pub name: Name,
}

/// `revert`: return a guest to a snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RevertStep {
    /// The guest.
    pub machine: Name,
    /// A snapshot taken earlier of this guest.
    pub snapshot: Name,
}

/// `clone`: create a guest from another guest's disk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct CloneStep {
    /// The guest copied.
    pub from: Name,
    /// Name of the new guest (starts shut down).
    pub to: Name,
    /// Host of the new guest (default: the source's host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<Name>,
    /// New virtual identity, or a perfect copy of the source's.
    #[serde(default)]
    pub identity: CloneIdentity,
}

/// Identity of a clone.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum CloneIdentity {
    /// New SMBIOS UUID/serial, MAC, disk serial (what hypervisors do by default).
    #[default]
    New,
    /// Same virtual identity as the source (a copied VM).
    Perfect,
}

/// `migrate`: live migration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct MigrateStep {
    /// The running guest.
    pub machine: Name,
    /// Destination host.
    pub host: Name,
}

/// `move`: cold move.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct MoveStep {
    /// The shut-down guest.
    pub machine: Name,
    /// Destination host (may be its current host).
    pub host: Name,
}

/// `replace-part`: swap a hardware part.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ReplacePartStep {
    /// The machine.
    pub machine: Name,
    /// Which part.
    pub part: Part,
}

/// A replaceable hardware part.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Part {
    /// The first network card (new MAC).
    Nic,
    /// The first disk (new serial).
    Disk,
    /// The mainboard (new board serial and product UUID).
    Board,
}

/// `usb-attach`: plug a dongle in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct UsbAttachStep {
    /// The dongle.
    pub dongle: Name,
    /// The machine, for an exclusive attach.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<Name>,
    /// The machines, for a shared attach.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub machines: Vec<Name>,
    /// Exclusive (one machine) or shared (several at once).
    #[serde(default)]
    pub mode: UsbMode,
}

impl UsbAttachStep {
    /// Every machine the dongle is attached to.
    pub fn targets(&self) -> Vec<&Name> {
        self.machine.iter().chain(self.machines.iter()).collect()
    }
}

/// How a USB device is passed through.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum UsbMode {
    /// Passed through to one machine only.
    #[default]
    Exclusive,
    /// Visible to several machines at once.
    Shared,
}

/// `usbip-attach`: attach a dongle over USB/IP.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct UsbipAttachStep {
    /// The dongle.
    pub dongle: Name,
    /// The machine whose USB/IP client attaches it.
    pub machine: Name,
}

/// `session-open`: log in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct SessionOpenStep {
    /// The machine.
    pub machine: Name,
    /// Name steps use for this session.
    #[serde(rename = "as")]
    pub name: Name,
    /// Console or RDP.
    #[serde(default)]
    pub kind: SessionKind,
    /// User logged in: an account on the machine, with the same uid on every machine.
    #[schemars(regex(pattern = crate::name::USER_PATTERN))]
    pub user: Name,
    /// RDP client's machine name (rdp only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_name: Option<String>,
    /// RDP client's address (rdp only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ip: Option<IpAddr>,
}

/// `release-elsewhere`: another process gives an app's licence back by its handle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ReleaseElsewhereStep {
    /// The app whose licence is given back.
    pub app: Name,
    /// The login session (on the app's machine) the releasing process runs in, as that
    /// session's user; default: the app's own session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<Name>,
}

/// Kind of login session.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum SessionKind {
    /// Local console.
    #[default]
    Console,
    /// Remote desktop protocol.
    Rdp,
}

/// `activate`: soft licence activation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ActivateStep {
    /// The machine the licence is bound to.
    pub machine: Name,
    /// A soft product's code.
    pub product: ProductCode,
    /// Name for the outcome, to use in `expect: granted/denied` (an unnamed refusal fails the step).
    #[serde(default, rename = "as", skip_serializing_if = "Option::is_none")]
    pub name: Option<Name>,
}

/// `activate-triad`: one triad licence for three network servers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ActivateTriadStep {
    /// The three machines whose servers will form the triad.
    pub machines: Vec<Name>,
    /// A soft product's code.
    pub product: ProductCode,
    /// Name for the outcome, to use in `expect: granted/denied` (an unnamed refusal fails the step).
    #[serde(default, rename = "as", skip_serializing_if = "Option::is_none")]
    pub name: Option<Name>,
}

/// `copy-licence`: copy a licence to another machine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct CopyLicenceStep {
    /// A soft product's code.
    pub product: ProductCode,
    /// Machine the licence file and its state are copied from.
    pub from: Name,
    /// Machine they are copied to.
    pub to: Name,
}

/// `apply-again`: the licence file a machine was issued is applied to it once more.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ApplyAgainStep {
    /// The machine (running) the product was activated on.
    pub machine: Name,
    /// A soft product's code.
    pub product: ProductCode,
}

/// `forge-licence`: the licensee, root on a machine, makes a vendor key and a root of their own,
/// certifies the key for the vendor's firm, asks the runtime to trust it and applies a licence
/// for a soft product signed with it. Refusals are the runtime's defence, not the step's failure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ForgeLicenceStep {
    /// The machine (running) the licensee forges on.
    pub machine: Name,
    /// A soft product's code; the forged licence has the policy's item with `quantity`.
    pub product: ProductCode,
    /// The quantity the forged licence grants.
    pub quantity: Located<u32>,
}

/// Most seats a forged licence may name (`forge-licence: quantity`).
pub const MAX_FORGED_QUANTITY: u32 = 10_000;

/// `access`: one-shot probe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct AccessStep {
    /// The machine the probe runs on.
    pub machine: Name,
    /// Product code asked for.
    pub product: ProductCode,
    /// Session it runs in (default: the machine's console context).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<Name>,
    /// Name for the result, to use in `expect: granted/denied`.
    #[serde(default, rename = "as", skip_serializing_if = "Option::is_none")]
    pub name: Option<Name>,
    /// Probes in a row (default 1), stopping at the first denial; the result is the last answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub times: Option<Located<u32>>,
}

/// Most probes one `access` step may run (`times`).
pub const MAX_ACCESS_TIMES: u32 = 10_000;

/// `start-app`: start an app holding a licence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct StartAppStep {
    /// The machine the app runs on.
    pub machine: Name,
    /// Product code asked for.
    pub product: ProductCode,
    /// Session it runs in (default: the machine's console context).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<Name>,
    /// Name steps use for this app.
    #[serde(rename = "as")]
    pub name: Name,
    /// An attack: the app calls `setsid` as it starts, leaving its session's process session
    /// (it stays in the session's login session); needs `session`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leave_session: Option<Located<bool>>,
}

/// `set-clock`: skew a machine's clock.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct SetClockStep {
    /// The machine.
    pub machine: Name,
    /// Its clock's offset from world time from now on (replaces any earlier skew).
    pub skew: Located<ClockSkew>,
}

/// `partition`: cut network links.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct PartitionStep {
    /// Machines that can no longer reach one another (at least two).
    pub machines: Vec<Name>,
    /// What happens to the connections between them.
    #[serde(default)]
    pub mode: PartitionMode,
}

/// What a partition does to the connections it cuts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum PartitionMode {
    /// Delivery stops and nothing is lost or closed: after a heal, TCP delivers late.
    #[default]
    Cut,
    /// As `cut`, and every connection between them is reset at once (a NAT timeout, a rebooted
    /// switch): both ends must reconnect after the heal.
    Reset,
}

/// `heal`: restore network links.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct HealStep {
    /// Machines whose links come back; empty = every link.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub machines: Vec<Name>,
}

/// `server-start`: network licence server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ServerStartStep {
    /// The machine serving its licences.
    pub machine: Name,
    /// TCP port (default 22350).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Keepalive window for remote stations (default 10s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keepalive: Option<Duration>,
    /// Whether the server keeps its usage log (default true; false: its seats are leases it
    /// never writes to disk).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage_log: Option<bool>,
}

/// `flood`: idle TCP connections from an attacker machine to a server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct FloodStep {
    /// The machine the connections come from (its address).
    pub from: Name,
    /// The machine whose network server they go to.
    pub to: Name,
    /// How many connections (1 to 20000); they stay open, saying nothing, until the run ends.
    pub connections: Located<u32>,
}

/// `impersonate`: a machine's runtime claims another machine's identity to servers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ImpersonateStep {
    /// The impostor (its runtime restarts).
    pub machine: Name,
    /// The victim, whose machine name (and runtime id) the impostor presents.
    #[serde(rename = "as")]
    pub victim: Name,
    /// Also present the victim's runtime id (default), not only its machine name.
    #[serde(default = "yes")]
    pub runtime_id: bool,
}

fn yes() -> bool {
    true
}

/// `rules`: the administrator's access rules on a machine's runtime.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RulesStep {
    /// The machine whose runtime gets them (a network server's rules govern its clients too).
    pub machine: Name,
    /// The rules document, as `meter rules apply` takes it (docs/runtime-contract.md, Access
    /// rules): `groups`, `rules`, `default`.
    pub rules: serde_json::Map<String, serde_json::Value>,
}

/// `tamper-usage-log`: remove one record of a machine's usage log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct TamperUsageLogStep {
    /// The machine whose runtime keeps the log.
    pub machine: Name,
    /// The record's place in the log, from 1 (`meter usage verify` counts them).
    pub record: Located<u64>,
}

/// `claim-witness`: a machine claims another machine's licence at the witnesses first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ClaimWitnessStep {
    /// The claiming machine (its runtime must be linked to the victim's witness).
    pub machine: Name,
    /// The machine whose licence is claimed.
    pub victim: Name,
    /// The metered product whose soft licence on the victim is claimed.
    pub product: ProductCode,
}

/// `inflate-seats`: a triad member asks for its apps' seats as if the licence had `quantity`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct InflateSeatsStep {
    /// The member (a follower: the leader checks what followers forward).
    pub machine: Name,
    /// The quantity its runtime claims the licence has, from now until it restarts.
    pub quantity: Located<u32>,
}

/// Most connections one `flood` step may open.
pub const MAX_FLOOD_CONNECTIONS: u32 = 20_000;

/// Reason codes of the runtime contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Reason {
    /// Every licence of the quantity is in use.
    QuantityExhausted,
    /// No container holds this product.
    UnknownProduct,
    /// The soft licence cannot be decrypted on this machine.
    LicenceCorrupt,
    /// The licence has expired.
    LicenceExpired,
    /// The licence is locked.
    LicenceLocked,
    /// No pay-per-use units left.
    UnitsExhausted,
    /// A local licence in a terminal-server session.
    LocalLicenceTerminalServer,
    /// A local licence asked for over the network.
    LocalLicenceRemote,
    /// Refused in a virtual machine by the vendor.
    VmNotAllowed,
    /// Refused on a terminal server by the vendor.
    TerminalServerNotAllowed,
    /// The dongle is used by several runtimes at once.
    DongleShared,
    /// The dongle is locked out.
    DongleLockedOut,
    /// Another runtime bound the dongle.
    BindingBroken,
    /// The dongle was unplugged.
    DongleRemoved,
    /// The dongle stopped answering while plugged in.
    DongleUnresponsive,
    /// The network server cannot be reached.
    ServerUnreachable,
    /// A rollback of metered state was detected.
    RollbackDetected,
    /// A licence file's signature is invalid.
    SignatureInvalid,
    /// The network server refused the client runtime's station.
    StationRefused,
    /// The station holds as many grants of the product as the server allows.
    GrantLimitReached,
    /// A `witness: required` item was asked for with no witness vouching for its units.
    WitnessUnreachable,
    /// An access rule of the runtime's administrator refuses the requester.
    RuleDenied,
    /// The requester holds as many seats as an access rule allows.
    RuleMaxReached,
    /// The free seats are reserved by access rules for others.
    ReservedForOthers,
    /// The licence is issued for a server triad and serves only in that triad.
    TriadRequired,
}

impl Reason {
    /// The reason code as the runtime prints it.
    pub fn code(&self) -> &'static str {
        match self {
            Reason::QuantityExhausted => "quantity-exhausted",
            Reason::UnknownProduct => "unknown-product",
            Reason::LicenceCorrupt => "licence-corrupt",
            Reason::LicenceExpired => "licence-expired",
            Reason::LicenceLocked => "licence-locked",
            Reason::UnitsExhausted => "units-exhausted",
            Reason::LocalLicenceTerminalServer => "local-licence-terminal-server",
            Reason::LocalLicenceRemote => "local-licence-remote",
            Reason::VmNotAllowed => "vm-not-allowed",
            Reason::TerminalServerNotAllowed => "terminal-server-not-allowed",
            Reason::DongleShared => "dongle-shared",
            Reason::DongleLockedOut => "dongle-locked-out",
            Reason::BindingBroken => "binding-broken",
            Reason::DongleRemoved => "dongle-removed",
            Reason::DongleUnresponsive => "dongle-unresponsive",
            Reason::ServerUnreachable => "server-unreachable",
            Reason::RollbackDetected => "rollback-detected",
            Reason::SignatureInvalid => "signature-invalid",
            Reason::StationRefused => "station-refused",
            Reason::GrantLimitReached => "grant-limit-reached",
            Reason::WitnessUnreachable => "witness-unreachable",
            Reason::RuleDenied => "rule-denied",
            Reason::RuleMaxReached => "rule-max-reached",
            Reason::ReservedForOthers => "reserved-for-others",
            Reason::TriadRequired => "triad-required",
        }
    }
}

/// What an `expect` step checks: exactly one assertion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "ExpectKeys", into = "ExpectKeys")]
pub enum Assertion {
    /// The app, access or activation was granted.
    Granted {
        /// App, access or activation name.
        app: Name,
    },
    /// The app, access or activation was refused, for this reason.
    Denied {
        /// App, access or activation name.
        app: Name,
        /// Expected reason code.
        reason: Located<Reason>,
    },
    /// Licences in use for a product, as a runtime or server counts them.
    InUse(InUseAssertion),
    /// State of a product's licence on a machine.
    Licence(LicenceAssertion),
    /// Pay-per-use units left.
    Units(UnitsAssertion),
    /// A dongle's binding or lockout.
    Dongle(DongleAssertion),
    /// A killed app's licence was released within a time limit.
    ReleasedWithin(ReleasedWithinAssertion),
    /// An app's process state.
    App(AppAssertion),
    /// At no step so far did more apps hold a product at once than allowed.
    Holders(HoldersAssertion),
    /// A machine's runtime answers a status request promptly.
    Responsive(Name),
    /// Figures of a runtime's usage report (`meter usage report`).
    Usage(UsageAssertion),
    /// What verifying a runtime's usage log finds (`meter usage verify`).
    UsageLog(UsageLogAssertion),
    /// A triad's committed seat history never exceeded a quantity, and every app holding a
    /// seat has it there.
    SeatHistory(SeatHistoryAssertion),
}

impl Assertion {
    /// The assertion's key, as written in YAML (e.g. `in-use`).
    pub fn keyword(&self) -> &'static str {
        match self {
            Assertion::Granted { .. } => "granted",
            Assertion::Denied { .. } => "denied",
            Assertion::InUse(_) => "in-use",
            Assertion::Licence(_) => "licence",
            Assertion::Units(_) => "units",
            Assertion::Dongle(_) => "dongle",
            Assertion::ReleasedWithin(_) => "released-within",
            Assertion::App(_) => "app",
            Assertion::Holders(_) => "holders",
            Assertion::Responsive(_) => "responsive",
            Assertion::Usage(_) => "usage",
            Assertion::UsageLog(_) => "usage-log",
            Assertion::SeatHistory(_) => "seat-history",
        }
    }

    /// Every assertion key.
    pub const KEYWORDS: [&'static str; 13] = [
        "granted",
        "denied",
        "in-use",
        "licence",
        "units",
        "dongle",
        "released-within",
        "app",
        "holders",
        "responsive",
        "usage",
        "usage-log",
        "seat-history",
    ];
}

/// `usage`: figures of a runtime's usage report over the whole run, for one product and
/// optionally one user. Give at least one figure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct UsageAssertion {
    /// The machine whose runtime keeps the log (a network server logs its clients' accesses).
    pub machine: Name,
    /// Product code.
    pub product: ProductCode,
    /// Only this user's figures (a session's user; not with `peak`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<Name>,
    /// Grants made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grants: Option<u64>,
    /// Denials (of `reason` only, when given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub denials: Option<u64>,
    /// The reason the counted denials were given (with `denials`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<Located<Reason>>,
    /// Most grants of the product held at once in any hour.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak: Option<u32>,
    /// Time held, summed over the grants, on the machine's clock (`advance` moves it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held: Option<Duration>,
    /// How far `held` may be off (default 1m: apps take real time to start and stop).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerance: Option<Duration>,
}

/// How far a `usage` assertion's `held` may be off unless it says.
pub const DEFAULT_HELD_TOLERANCE: Duration = Duration::from_secs(60);

/// `usage-log`: what verifying a runtime's usage log finds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct UsageLogAssertion {
    /// The machine whose runtime keeps the log.
    pub machine: Name,
    /// True: every record in place, chained and signed; false: tampering found.
    pub intact: bool,
}

/// `holders`: the most apps that held a product at once, over every step so far.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct HoldersAssertion {
    /// Product code.
    pub product: ProductCode,
    /// Most apps (on every machine together) that may have held it at once.
    pub at_most: u32,
}

/// `seat-history`: the seats of a product over the whole run, as the triads' members committed
/// them and as each lone server's usage log recorded them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct SeatHistoryAssertion {
    /// Product code.
    pub product: ProductCode,
    /// Most seats the committed history may ever have had running at once.
    pub at_most: u32,
}

/// How long a `responsive` runtime may take to answer.
pub const RESPONSIVE_WITHIN: Duration = Duration::from_secs(2);

/// `in-use`: counts of a product in use.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct InUseAssertion {
    /// Product code.
    pub product: ProductCode,
    /// Machine whose runtime counts (default: the one running server).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<Name>,
    /// Stations holding the product.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stations: Option<u32>,
    /// Accesses holding the product.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accesses: Option<u32>,
}

/// `licence`: a licence's state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct LicenceAssertion {
    /// Machine holding the licence.
    pub machine: Name,
    /// Product code.
    pub product: ProductCode,
    /// Expected state.
    pub state: LicenceState,
}

/// State of a licence container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum LicenceState {
    /// Usable.
    Valid,
    /// Binding does not match this machine.
    Corrupt,
    /// Locked (e.g. after a rollback).
    Locked,
    /// Past its expiry.
    Expired,
}

/// `units`: pay-per-use units left.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct UnitsAssertion {
    /// Machine whose runtime reports the units.
    pub machine: Name,
    /// Product code (must have `units`).
    pub product: ProductCode,
    /// Units expected left.
    pub left: u64,
}

/// `dongle`: binding or lockout of a dongle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct DongleAssertion {
    /// The dongle.
    pub name: Name,
    /// The machine whose runtime holds the dongle's binding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bound_to: Option<Name>,
    /// Expected dongle state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<DongleState>,
    /// Remaining lockout, in dongle time, checked to within one second (locked-out only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<Duration>,
}

/// State of a dongle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum DongleState {
    /// Bound to one runtime.
    Bound,
    /// Bound to no runtime.
    Unbound,
    /// Locked out.
    LockedOut,
}

/// `released-within`: release delay after a kill.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ReleasedWithinAssertion {
    /// A killed app.
    pub app: Name,
    /// Maximum milliseconds from its kill to its licence being released.
    pub ms: u64,
}

/// `app`: an app's process state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct AppAssertion {
    /// The app.
    pub app: Name,
    /// Expected state.
    pub state: AppState,
    /// Expected revocation reason (revoked only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<Located<Reason>>,
}

/// State of an app process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum AppState {
    /// Running and holding its licence.
    Running,
    /// The runtime took its licence back and told it.
    Revoked,
    /// The process has ended.
    Exited,
}

/// The keys an `expect` mapping may hold (exactly one assertion; `reason` goes with `denied`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct ExpectKeys {
    /// The app or access was granted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    granted: Option<Name>,
    /// The app or access was denied (give `reason`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    denied: Option<Name>,
    /// Reason code expected with `denied`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reason: Option<Located<Reason>>,
    /// Licences in use for a product.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    in_use: Option<InUseAssertion>,
    /// State of a licence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    licence: Option<LicenceAssertion>,
    /// Pay-per-use units left.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    units: Option<UnitsAssertion>,
    /// A dongle's binding or lockout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    dongle: Option<DongleAssertion>,
    /// Release delay after a kill.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    released_within: Option<ReleasedWithinAssertion>,
    /// An app's process state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    app: Option<AppAssertion>,
    /// The most apps that held a product at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    holders: Option<HoldersAssertion>,
    /// A machine's runtime answers promptly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    responsive: Option<Name>,
    /// Figures of a usage report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    usage: Option<UsageAssertion>,
    /// What verifying a usage log finds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    usage_log: Option<UsageLogAssertion>,
    /// A triad's committed seat history.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    seat_history: Option<SeatHistoryAssertion>,
}

fn single_key_schema(key: &str, description: &str, value: schemars::Schema) -> schemars::Schema {
    schemars::json_schema!({
        "description": description,
        "type": "object",
        "properties": { key: value },
        "required": [key],
        "additionalProperties": false
    })
}

impl JsonSchema for Assertion {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Assertion".into()
    }

    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        let name = generator.subschema_for::<String>();
        let reason = generator.subschema_for::<Reason>();
        let denied = schemars::json_schema!({
            "description": "The app, access or activation was refused, for this reason.",
            "type": "object",
            "properties": {
                "denied": name.clone(),
                "reason": reason
            },
            "required": ["denied", "reason"],
            "additionalProperties": false
        });
        let variants = vec![
            single_key_schema(
                "granted",
                "The app, access or activation was granted.",
                name,
            ),
            denied,
            single_key_schema(
                "in-use",
                "Licences in use for a product.",
                generator.subschema_for::<InUseAssertion>(),
            ),
            single_key_schema(
                "licence",
                "State of a product's licence on a machine.",
                generator.subschema_for::<LicenceAssertion>(),
            ),
            single_key_schema(
                "units",
                "Pay-per-use units left.",
                generator.subschema_for::<UnitsAssertion>(),
            ),
            single_key_schema(
                "dongle",
                "A dongle's binding or lockout.",
                generator.subschema_for::<DongleAssertion>(),
            ),
            single_key_schema(
                "released-within",
                "A killed app's licence was released within a time limit.",
                generator.subschema_for::<ReleasedWithinAssertion>(),
            ),
            single_key_schema(
                "app",
                "An app's process state.",
                generator.subschema_for::<AppAssertion>(),
            ),
            single_key_schema(
                "holders",
                "At no step so far did more apps hold a product at once than allowed.",
                generator.subschema_for::<HoldersAssertion>(),
            ),
            single_key_schema(
                "responsive",
                "A machine's runtime answers a status request within 2 s.",
                generator.subschema_for::<String>(),
            ),
            single_key_schema(
                "usage",
                "Figures of a runtime's usage report (`meter usage report`).",
                generator.subschema_for::<UsageAssertion>(),
            ),
            single_key_schema(
                "seat-history",
                "A triad's committed seat history never exceeded a quantity, and every app holding a seat has it there.",
                generator.subschema_for::<SeatHistoryAssertion>(),
            ),
            single_key_schema(
                "usage-log",
                "What verifying a runtime's usage log finds (`meter usage verify`).",
                generator.subschema_for::<UsageLogAssertion>(),
            ),
        ];
        schemars::json_schema!({
            "description": "What an `expect` step checks: exactly one assertion.",
            "oneOf": variants
        })
    }
}

impl TryFrom<ExpectKeys> for Assertion {
    type Error = String;

    fn try_from(keys: ExpectKeys) -> Result<Self, String> {
        let ExpectKeys {
            granted,
            denied,
            reason,
            in_use,
            licence,
            units,
            dongle,
            released_within,
            app,
            holders,
            responsive,
            usage,
            usage_log,
            seat_history,
        } = keys;
        let mut found: Vec<Assertion> = Vec::new();
        if let Some(app) = granted {
            found.push(Assertion::Granted { app });
        }
        match (denied, reason) {
            (Some(app), Some(reason)) => found.push(Assertion::Denied { app, reason }),
            (Some(app), None) => {
                return Err(format!(
                    "`denied: {}` needs a `reason`: one of {}",
                    app.value,
                    reason_codes()
                ));
            }
            (None, Some(_)) => {
                return Err("`reason` goes with `denied: <app>`".to_owned());
            }
            (None, None) => {}
        }
        found.extend(in_use.map(Assertion::InUse));
        found.extend(licence.map(Assertion::Licence));
        found.extend(units.map(Assertion::Units));
        found.extend(dongle.map(Assertion::Dongle));
        found.extend(released_within.map(Assertion::ReleasedWithin));
        found.extend(app.map(Assertion::App));
        found.extend(holders.map(Assertion::Holders));
        found.extend(responsive.map(Assertion::Responsive));
        found.extend(usage.map(Assertion::Usage));
        found.extend(usage_log.map(Assertion::UsageLog));
        found.extend(seat_history.map(Assertion::SeatHistory));
        match found.len() {
            1 => Ok(found.remove(0)),
            0 => Err(format!(
                "an `expect` needs one assertion: {}",
                Assertion::KEYWORDS.join(", ")
            )),
            _ => Err(format!(
                "an `expect` holds one assertion, found {}: {}; write one `expect` step each",
                found.len(),
                found
                    .iter()
                    .map(Assertion::keyword)
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }
}

impl From<Assertion> for ExpectKeys {
    fn from(assertion: Assertion) -> Self {
        let mut keys = ExpectKeys::default();
        match assertion {
            Assertion::Granted { app } => keys.granted = Some(app),
            Assertion::Denied { app, reason } => {
                keys.denied = Some(app);
                keys.reason = Some(reason);
            }
            Assertion::InUse(a) => keys.in_use = Some(a),
            Assertion::Licence(a) => keys.licence = Some(a),
            Assertion::Units(a) => keys.units = Some(a),
            Assertion::Dongle(a) => keys.dongle = Some(a),
            Assertion::ReleasedWithin(a) => keys.released_within = Some(a),
            Assertion::App(a) => keys.app = Some(a),
            Assertion::Holders(a) => keys.holders = Some(a),
            Assertion::Responsive(m) => keys.responsive = Some(m),
            Assertion::Usage(a) => keys.usage = Some(a),
            Assertion::UsageLog(a) => keys.usage_log = Some(a),
            Assertion::SeatHistory(a) => keys.seat_history = Some(a),
        }
        keys
    }
}

/// Every reason code, comma-separated.
pub(crate) fn reason_codes() -> String {
    ALL_REASONS
        .iter()
        .map(Reason::code)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Every reason code of the runtime contract.
pub const ALL_REASONS: [Reason; 25] = [
    Reason::QuantityExhausted,
    Reason::UnknownProduct,
    Reason::LicenceCorrupt,
    Reason::LicenceExpired,
    Reason::LicenceLocked,
    Reason::UnitsExhausted,
    Reason::LocalLicenceTerminalServer,
    Reason::LocalLicenceRemote,
    Reason::VmNotAllowed,
    Reason::TerminalServerNotAllowed,
    Reason::DongleShared,
    Reason::DongleLockedOut,
    Reason::BindingBroken,
    Reason::DongleRemoved,
    Reason::DongleUnresponsive,
    Reason::ServerUnreachable,
    Reason::RollbackDetected,
    Reason::SignatureInvalid,
    Reason::StationRefused,
    Reason::GrantLimitReached,
    Reason::WitnessUnreachable,
    Reason::RuleDenied,
    Reason::RuleMaxReached,
    Reason::ReservedForOthers,
    Reason::TriadRequired,
];

#[cfg(test)]
mod tests {
    #[test]
    fn steps_name_their_machines_once_each_in_order() {
        let scenario = crate::scenario::parse_str(
            r#"
name: lanes
description: machines per step
policy: { products: [{ code: 1, name: a, container: soft, quantity: 1, counting: user-limit }] }
hosts: [{ name: host-a, cpu: { vendor: V, model: M } }, { name: host-b, cpu: { vendor: V, model: M } }]
guests: [{ name: vm1, host: host-a }]
steps:
  - boot: vm1
  - clone: { from: vm1, to: vm2, host: host-b }
  - migrate: { machine: vm1, host: host-b }
  - advance: 1h
"#,
            "lanes.yaml",
        )
        .unwrap();
        let machines: Vec<Vec<&str>> = scenario
            .steps
            .iter()
            .map(|step| step.value.machines())
            .collect();
        assert_eq!(
            machines,
            vec![
                vec!["vm1"],
                vec!["vm1", "vm2", "host-b"],
                vec!["vm1", "host-b"],
                vec![],
            ]
        );
    }
}
