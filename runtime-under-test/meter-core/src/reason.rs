//! Reason codes the runtime gives when it refuses, denies or revokes a licence.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Why the runtime said no; the kebab-case code is part of the runtime contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reason {
    /// Every unit of the item's quantity is in use.
    QuantityExhausted,
    /// No container on this runtime holds the product.
    UnknownProduct,
    /// The licence cannot be decrypted or parsed (e.g. bound to other hardware).
    LicenceCorrupt,
    /// The item's expiry time has passed.
    LicenceExpired,
    /// The item is locked (e.g. after a detected rollback).
    LicenceLocked,
    /// A pay-per-use item has no units left.
    UnitsExhausted,
    /// A local licence (quantity 0) was asked for from a terminal-server session.
    LocalLicenceTerminalServer,
    /// A local licence (quantity 0) was asked for over the network.
    LocalLicenceRemote,
    /// The vendor does not allow this item in a virtual machine.
    VmNotAllowed,
    /// The vendor does not allow this item on a terminal server.
    TerminalServerNotAllowed,
    /// The dongle is attached to several machines at once and is locked out.
    DongleShared,
    /// The dongle was rebound too often and is locked out for a while.
    DongleLockedOut,
    /// The dongle was bound by another runtime; this runtime lost it.
    BindingBroken,
    /// The dongle holding the licence was detached.
    DongleRemoved,
    /// The dongle holding the licence stopped answering while still attached.
    DongleUnresponsive,
    /// The network server holding the licence cannot be reached.
    ServerUnreachable,
    /// A rollback of time, units or machine state was detected.
    RollbackDetected,
    /// A licence file's signature does not verify against a trusted vendor key.
    SignatureInvalid,
    /// The handle or holder does not hold a licence.
    NotHeld,
    /// The network server refused this runtime's station (its id is bound to another key, or its
    /// address opened too many stations).
    StationRefused,
    /// The station already holds as many grants of this product as a server allows one station.
    GrantLimitReached,
    /// A metered item whose vendor requires a witness was asked for with no witness vouching
    /// for its receipts.
    WitnessUnreachable,
    /// An access rule of the runtime's administrator refuses this requester.
    RuleDenied,
    /// The requester's user, group or machine holds as many seats as an access rule allows.
    RuleMaxReached,
    /// The free seats are reserved by access rules for others.
    ReservedForOthers,
    /// The licence is issued for a server triad and serves only in that triad.
    TriadRequired,
}

impl Reason {
    /// Every reason, in declaration order.
    pub const ALL: [Reason; 26] = [
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
        Reason::NotHeld,
        Reason::StationRefused,
        Reason::GrantLimitReached,
        Reason::WitnessUnreachable,
        Reason::RuleDenied,
        Reason::RuleMaxReached,
        Reason::ReservedForOthers,
        Reason::TriadRequired,
    ];

    /// True for the refusals of an administrator's access rules.
    pub fn is_rule(&self) -> bool {
        matches!(
            self,
            Reason::RuleDenied | Reason::RuleMaxReached | Reason::ReservedForOthers
        )
    }

    /// The kebab-case code used in JSON output.
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
            Reason::NotHeld => "not-held",
            Reason::StationRefused => "station-refused",
            Reason::GrantLimitReached => "grant-limit-reached",
            Reason::WitnessUnreachable => "witness-unreachable",
            Reason::RuleDenied => "rule-denied",
            Reason::RuleMaxReached => "rule-max-reached",
            Reason::ReservedForOthers => "reserved-for-others",
            Reason::TriadRequired => "triad-required",
        }
    }

    /// A one-sentence explanation for humans (the `message` next to the code).
    pub fn message(&self) -> &'static str {
        match self {
            Reason::QuantityExhausted => "All licences of this product are in use",
            Reason::UnknownProduct => "No licence container holds this product",
            Reason::LicenceCorrupt => "The licence is corrupt or bound to other hardware",
            Reason::LicenceExpired => "The licence has expired",
            Reason::LicenceLocked => "The licence is locked",
            Reason::UnitsExhausted => "The licence has no units left",
            Reason::LocalLicenceTerminalServer => {
                "A local licence cannot be used in a terminal-server session"
            }
            Reason::LocalLicenceRemote => "A local licence cannot be used over the network",
            Reason::VmNotAllowed => "The vendor does not allow this licence in a virtual machine",
            Reason::TerminalServerNotAllowed => {
                "The vendor does not allow this licence on a terminal server"
            }
            Reason::DongleShared => "The dongle is shared between machines and is locked out",
            Reason::DongleLockedOut => "The dongle was reconnected too often and is locked out",
            Reason::BindingBroken => "Another runtime took over the dongle",
            Reason::DongleRemoved => "The dongle was removed",
            Reason::DongleUnresponsive => "The dongle stopped answering",
            Reason::ServerUnreachable => "The licence server cannot be reached",
            Reason::RollbackDetected => "A rollback of time or licence state was detected",
            Reason::SignatureInvalid => "The licence signature is not valid for a trusted vendor",
            Reason::NotHeld => "No such licence is held",
            Reason::StationRefused => "The licence server refused this station",
            Reason::GrantLimitReached => {
                "This station holds as many licences of this product as the server allows"
            }
            Reason::WitnessUnreachable => {
                "The vendor requires a witness for this licence's units and none vouches for them"
            }
            Reason::RuleDenied => "An access rule of this licence server refuses you",
            Reason::RuleMaxReached => "You hold as many of these licences as an access rule allows",
            Reason::ReservedForOthers => "The free licences are reserved for others",
            Reason::TriadRequired => {
                "The licence is issued for a server triad and serves only in that triad"
            }
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// A string that is not a known reason code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Unknown reason code {0:?}")]
pub struct UnknownReason(pub String);

impl FromStr for Reason {
    type Err = UnknownReason;

    fn from_str(code: &str) -> Result<Self, Self::Err> {
        Reason::ALL
            .into_iter()
            .find(|reason| reason.code() == code)
            .ok_or_else(|| UnknownReason(code.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serde_display_and_code_agree_for_every_reason() {
        for reason in Reason::ALL {
            let json = serde_json::to_string(&reason).unwrap();
            assert_eq!(json, format!("\"{}\"", reason.code()));
            assert_eq!(reason.to_string(), reason.code());
            assert_eq!(reason.code().parse::<Reason>().unwrap(), reason);
            let back: Reason = serde_json::from_str(&json).unwrap();
            assert_eq!(back, reason);
        }
    }

    #[test]
    fn codes_are_unique() {
        let mut codes: Vec<_> = Reason::ALL.iter().map(Reason::code).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), Reason::ALL.len());
    }

    #[test]
    fn unknown_code_is_an_error() {
        assert_eq!(
            "nope".parse::<Reason>(),
            Err(UnknownReason("nope".to_owned()))
        );
    }
}
