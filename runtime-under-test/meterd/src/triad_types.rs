//! What the members of a licence server triad replicate with Raft (openraft): the seat ledger's
//! stamped commands as the log's entries, its answers as their responses, and each member's
//! address and certificate pin as its node.

use std::io::Cursor;

use meter_core::seat_ledger::{LedgerEntry, LedgerOutcome};
use serde::{Deserialize, Serialize};

/// A triad member as the others reach it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// `host:port` of its member-to-member listener.
    pub addr: String,
    /// SHA-256 of its TLS certificate, hex: the only certificate accepted from it.
    pub pin: String,
}

openraft::declare_raft_types!(
    /// The triad's Raft types.
    pub TriadConfig:
        D = LedgerEntry,
        R = LedgerOutcome,
        NodeId = u64,
        Node = Member,
        SnapshotData = Cursor<Vec<u8>>,
);

/// A member's number in its triad.
pub type MemberId = u64;
/// One member's Raft.
pub type TriadRaft = openraft::Raft<TriadConfig>;
/// A log entry.
pub type TriadEntry = openraft::Entry<TriadConfig>;
/// A storage failure, as openraft takes it.
pub type TriadStorageError = openraft::StorageError<MemberId>;
/// A Raft error with its API error.
pub type TriadRaftError<E = openraft::error::Infallible> = openraft::error::RaftError<MemberId, E>;
/// An RPC failure to another member.
pub type TriadRpcError<E = openraft::error::Infallible> =
    openraft::error::RPCError<MemberId, Member, TriadRaftError<E>>;
