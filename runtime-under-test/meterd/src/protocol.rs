//! Messages on the local socket (apps and admins ↔ meterd) and on the server link (meterd ↔ meterd).

use meter_core::allocation::ProductKey;
use meter_core::reason::Reason;
use meter_core::rollback::{ChainHead, Receipt, WitnessLog};
use meter_core::station::{MachineRole, SessionKind, StationId};
use serde::{Deserialize, Serialize};

/// A request from a local app or admin.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum LocalRequest {
    /// Take a licence for the calling process.
    Access {
        /// Vendor firm code; `None` = any firm that has the product.
        firm: Option<u32>,
        /// Product code.
        product: u32,
    },
    /// Give a licence back.
    Release {
        /// The handle from the grant.
        handle: u64,
    },
    /// Machine, containers and server state (JSON).
    Status,
    /// Every allocation (JSON).
    List,
    /// Add a network server to forward to.
    ServersAdd {
        /// `addr:port`.
        addr: String,
        /// SHA-256 of its certificate, hex.
        pin: String,
    },
    /// Stop forwarding to a network server.
    ServersRemove {
        /// `addr:port`.
        addr: String,
    },
    /// Put access rules in force (administrators only).
    RulesApply {
        /// Where they came from (named in errors).
        source_name: String,
        /// The rules document (YAML or JSON).
        bytes: Vec<u8>,
    },
    /// Show the access rules in force.
    RulesShow,
    /// Join a licence server triad (administrators only; network servers only).
    TriadJoin {
        /// The three members in the triad's order: where this member reaches each (its own
        /// entry: where it listens for the others) and each one's certificate pin.
        members: Vec<crate::triad_types::Member>,
    },
    /// This member's view of its triad.
    TriadStatus {
        /// With the seat events its ledger applied.
        history: bool,
    },
    /// An attack (harness builds, administrators only): from now on, ask the triad's leader
    /// for this member's apps' seats as if the licence had `quantity` seats.
    InflateSeats {
        /// The quantity claimed.
        quantity: u32,
    },
    /// An attack (harness builds, administrators only): give back, through the triad's leader,
    /// every seat the other members' apps hold.
    ReleaseMemberSeats,
    /// Check the usage log (administrators only).
    UsageVerify,
    /// A usage report (administrators only).
    UsageReport {
        /// Start of the window, unix ms (default: the first record).
        from_ms: Option<u64>,
        /// End of the window, unix ms (default: now).
        to_ms: Option<u64>,
    },
    /// An attack (harness builds, administrators only): remove one usage record.
    TamperUsage {
        /// The record's place.
        seq: u64,
    },
    /// An attack (harness builds, administrators only): hand the witnesses receipts of another
    /// machine's licence, signed with this runtime's key.
    ClaimWitness {
        /// The licence id.
        licence: String,
    },
    /// Trust a vendor: install its firm certificate.
    Trust {
        /// Where it came from (named in errors).
        source_name: String,
        /// The certificate file's contents.
        bytes: Vec<u8>,
    },
    /// Install a signed licence file.
    InstallLicence {
        /// Where it came from (named in errors).
        source_name: String,
        /// The file's contents.
        bytes: Vec<u8>,
    },
    /// The machine's identity and traits for an activation request (JSON).
    MachineInfo,
    /// Send revocations of this handle to this connection (a holder that reconnected).
    Watch {
        /// The handle to watch.
        handle: u64,
    },
    /// An activation request for this machine, sealed to the vendor (JSON text of the file).
    ActivationRequest {
        /// Vendor firm code.
        firm: u32,
        /// Product codes to activate (empty = every soft item of the vendor's policy).
        products: Vec<u32>,
        /// The vendor's public key file; `None` = the key trusted for the firm.
        vendor: Option<Vec<u8>>,
        /// Ask for a triad licence: the request names this server's certificate pin.
        #[serde(default)]
        triad_member: bool,
    },
    /// The seats the usage log shows, as they began and ended (administrators only).
    UsageSeats,
}

/// A reply (or, on a holding connection, an event) from meterd.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum LocalReply {
    /// The licence is granted.
    Granted {
        /// Handle to release it with.
        handle: u64,
        /// Product code.
        product: u32,
        /// Container that granted it (`soft:…`, `dongle:…`, `remote:…`).
        container: String,
        /// Station it counts for.
        station: String,
    },
    /// The licence is denied.
    Denied {
        /// Why.
        reason: Reason,
        /// For humans.
        message: String,
    },
    /// The licence was given back.
    Released,
    /// The runtime took a licence back (sent on the connection that took it).
    Revoked {
        /// The handle taken back.
        handle: u64,
        /// Why.
        reason: Reason,
    },
    /// A JSON document (status, list, machine info).
    Json(String),
    /// Done.
    Ok,
    /// The request failed.
    Error {
        /// What went wrong.
        message: String,
        /// A reason code, when the runtime said no.
        reason: Option<Reason>,
    },
}

/// The session kind in a form every wire format can carry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WireSession {
    /// Local console.
    Console,
    /// Remote desktop.
    Rdp {
        /// Client computer name.
        client_name: String,
        /// Client computer address.
        client_ip: String,
    },
    /// No interactive session.
    Service,
}

impl From<&SessionKind> for WireSession {
    fn from(kind: &SessionKind) -> Self {
        match kind {
            SessionKind::Console => WireSession::Console,
            SessionKind::Rdp {
                client_name,
                client_ip,
            } => WireSession::Rdp {
                client_name: client_name.clone(),
                client_ip: client_ip.clone(),
            },
            SessionKind::Service => WireSession::Service,
        }
    }
}

impl From<&WireSession> for SessionKind {
    fn from(kind: &WireSession) -> Self {
        match kind {
            WireSession::Console => SessionKind::Console,
            WireSession::Rdp {
                client_name,
                client_ip,
            } => SessionKind::Rdp {
                client_name: client_name.clone(),
                client_ip: client_ip.clone(),
            },
            WireSession::Service => SessionKind::Service,
        }
    }
}

/// Who asks for a licence, as a client runtime tells a server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    /// The client runtime's handle for this access (stable across reconnects).
    pub client_handle: u64,
    /// The product.
    pub product: ProductKey,
    /// The station the access comes from.
    pub station: StationId,
    /// The session the app runs in.
    pub session: WireSession,
    /// The client machine's role.
    pub role: MachineRole,
    /// True when the client machine is a virtual machine.
    pub guest: bool,
    /// The user the app runs as, as the client runtime knows it (access rules name users).
    #[serde(default)]
    pub user: Option<String>,
}

/// A frame from a client runtime to a network server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToServer {
    /// First frame: who the client runtime is and which grants it still holds.
    Hello {
        /// The client runtime's persistent random id.
        runtime: String,
        /// The client machine's name.
        machine: String,
        /// Grants the client holds from this server (empty on first connect).
        claims: Vec<Claim>,
    },
    /// Take a licence.
    Access {
        /// Request id echoed in the answer.
        request: u64,
        /// Who asks.
        claim: Claim,
    },
    /// Give a licence back.
    Release {
        /// Request id echoed in the answer.
        request: u64,
        /// The server's handle.
        handle: u64,
    },
    /// The client is alive; the server answers with `KeepaliveAck` (which renews the lease).
    Keepalive {
        /// Sequence number echoed in the answer.
        seq: u64,
    },
    /// Receipts of units spent from one of the client's licences, for the server to witness.
    WitnessReceipts {
        /// Request id echoed in the answer.
        request: u64,
        /// Licence id.
        licence: String,
        /// The client runtime's receipt public key.
        key: [u8; 32],
        /// Receipts in chain order.
        receipts: Vec<Receipt>,
    },
    /// A page of the chain the server witnessed for one of the client's licences.
    WitnessFetch {
        /// Request id echoed in the answer.
        request: u64,
        /// Licence id.
        licence: String,
        /// The client's receipt public key (Ed25519): the chain of the licence signed with it.
        key: [u8; 32],
        /// The first receipt wanted (0-based); the answer holds at most a frame's worth.
        from: u64,
    },
}

/// A frame from a network server to a client runtime.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FromServer {
    /// Answer to `Hello` when the server will not serve this runtime (its id is bound to another
    /// key, or its peer address made too many); the connection closes after it.
    Refused {
        /// Why.
        reason: Reason,
    },
    /// Answer to `Keepalive`.
    KeepaliveAck {
        /// The keepalive's sequence number.
        seq: u64,
    },
    /// Answer to `Hello`.
    Welcome {
        /// Claims still granted: (client handle, server handle).
        restored: Vec<(u64, u64)>,
        /// Claims no longer granted: (client handle, reason).
        lost: Vec<(u64, Reason)>,
        /// The window in which the client must send a frame, milliseconds.
        keepalive_ms: u64,
    },
    /// Access granted.
    Granted {
        /// Request id.
        request: u64,
        /// The server's handle.
        handle: u64,
        /// The server's container.
        container: String,
    },
    /// Access denied.
    Denied {
        /// Request id.
        request: u64,
        /// Why.
        reason: Reason,
    },
    /// Release done (or nothing was held).
    Released {
        /// Request id.
        request: u64,
    },
    /// The server took a grant back.
    Revoked {
        /// The server's handle.
        handle: u64,
        /// Why.
        reason: Reason,
    },
    /// Answer to `WitnessReceipts`: the witnessed head, and why receipts were refused.
    Witnessed {
        /// Request id.
        request: u64,
        /// The witnessed chain's head after the receipts.
        head: ChainHead,
        /// Why a receipt was not accepted (a fork or a gap), if one was not.
        refused: Option<String>,
    },
    /// Answer to `WitnessFetch`: a page of the witnessed chain.
    WitnessChain {
        /// Request id.
        request: u64,
        /// The chain's genesis and its receipts from `from` on (at most a frame's worth);
        /// `None` when the server has seen no receipt of the licence.
        log: Option<WitnessLog>,
        /// How many receipts the whole chain holds.
        total: u64,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame;

    #[test]
    fn server_frames_round_trip_through_postcard() {
        let claim = Claim {
            client_handle: 7,
            product: ProductKey {
                firm: 10,
                code: 1001,
            },
            station: StationId {
                machine: "ts1".into(),
                session: Some(4),
            },
            session: WireSession::Rdp {
                client_name: "pc-7".into(),
                client_ip: "10.0.0.7".into(),
            },
            role: MachineRole::TerminalServer,
            guest: true,
            user: None,
        };
        let message = ToServer::Access { request: 1, claim };
        let bytes = frame::encode(&message).unwrap();
        assert_eq!(frame::decode::<ToServer>(&bytes).unwrap(), message);
        assert!(frame::decode::<ToServer>(&[0xff, 0xff, 0xff]).is_err());
    }
}
