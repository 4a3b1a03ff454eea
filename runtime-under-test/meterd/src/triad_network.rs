//! Member-to-member traffic of a triad: Raft's calls over mutual TLS, each side pinned to the
//! other members' certificates, one length-prefixed JSON frame per call and per answer; and
//! the ledger commands a member that does not lead forwards to the leader (its own apps'
//! seats).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use meter_core::seat_ledger::{LedgerCommand, LedgerOutcome};
use openraft::error::{InstallSnapshotError, NetworkError, RemoteError, Unreachable};
use openraft::network::RPCOption;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{LogId, RaftNetwork, RaftNetworkFactory};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::codec::{Framed, LengthDelimitedCodec};

use crate::tls::{self, Identity};
use crate::triad_standing::Standing;
use crate::triad_types::{Member, MemberId, TriadConfig, TriadRaft, TriadRaftError, TriadRpcError};

/// The largest frame a member sends or takes (a snapshot chunk or a batch of entries).
const MAX_FRAME: usize = 16 * 1024 * 1024;
/// How long a connection to another member may take to open.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// A call of one member's Raft to another's.
#[derive(Debug, Serialize, Deserialize)]
enum Call {
    Append(AppendEntriesRequest<TriadConfig>),
    Vote(VoteRequest<MemberId>),
    Snapshot(InstallSnapshotRequest<TriadConfig>),
    /// A ledger command for the leader to commit (from a member that does not lead).
    Submit(LedgerCommand),
    /// How far the member has applied its log (asked by a member in quarantine).
    Applied,
}

/// Why the leader did not commit a forwarded command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ForwardRefusal {
    /// The member asked does not lead (any more).
    #[error("The member asked does not lead the triad")]
    NotLeader,
    /// No quorum answered in time.
    #[error("No quorum of the triad answered")]
    NoQuorum,
    /// Only a member's own seats are forwarded (grants, renewals, reclaims, releases).
    #[error("A member may not forward this command")]
    NotForwardable,
    /// The command names another member's apps' seats, or another member's machine.
    #[error("A member forwards only what is its own")]
    NotItsOwn,
    /// The command asks for more than the leader's licence allows (a seat beyond its quantity,
    /// a lease beyond its window).
    #[error("The licence does not allow it: {0}")]
    BeyondLicence(String),
    /// The leader failed otherwise.
    #[error("The leader failed: {0}")]
    Failed(String),
}

/// A forwarded command, with where its answer goes.
pub type Forwarded = (
    LedgerCommand,
    tokio::sync::oneshot::Sender<Result<LedgerOutcome, ForwardRefusal>>,
);

/// The answer to a [`Call`].
#[derive(Debug, Serialize, Deserialize)]
enum Answer {
    Append(Result<AppendEntriesResponse<MemberId>, TriadRaftError>),
    Vote(Result<VoteResponse<MemberId>, TriadRaftError>),
    Snapshot(Result<InstallSnapshotResponse<MemberId>, TriadRaftError<InstallSnapshotError>>),
    Submit(Result<LedgerOutcome, ForwardRefusal>),
    /// The last log entry the member applied (none yet: `None`).
    Applied(Option<LogId<MemberId>>),
}

type Link = Framed<tokio_rustls::client::TlsStream<TcpStream>, LengthDelimitedCodec>;

fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .max_frame_length(MAX_FRAME)
        .new_codec()
}

/// A link could not carry a call.
#[derive(Debug, thiserror::Error)]
enum LinkError {
    #[error("Cannot reach member {addr}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Member {addr} has no valid pin: {pin:?}")]
    Pin { addr: String, pin: String },
    #[error("The TLS setup for member {addr} failed")]
    Tls {
        addr: String,
        #[source]
        source: tls::TlsError,
    },
    #[error("The link to member {addr} broke")]
    Broken {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Member {addr} answered something else")]
    Garbled { addr: String },
    #[error("This member makes no call to member {addr} now (its state may be an old copy)")]
    Silent { addr: String },
    #[error("Cannot encode or decode a call to member {addr}")]
    Codec {
        addr: String,
        #[source]
        source: serde_json::Error,
    },
}

/// Opens links to the other members with this member's identity.
#[derive(Clone)]
pub struct MemberLinks {
    identity: Arc<Identity>,
    /// Where this member reaches each other member (its own view: members may reach one
    /// another by different routes); the membership's address otherwise.
    addresses: BTreeMap<MemberId, String>,
    /// Whether this member makes Raft calls now.
    standing: Arc<Standing>,
}

impl MemberLinks {
    /// Links that authenticate as `identity`, reaching members at `addresses`, making Raft
    /// calls while `standing` allows.
    pub fn new(
        identity: Arc<Identity>,
        addresses: BTreeMap<MemberId, String>,
        standing: Arc<Standing>,
    ) -> MemberLinks {
        MemberLinks {
            identity,
            addresses,
            standing,
        }
    }
}

/// The link to one other member, opened at its first call and again after a break.
pub struct MemberLink {
    target: MemberId,
    member: Member,
    identity: Arc<Identity>,
    link: Option<Link>,
    standing: Arc<Standing>,
}

impl MemberLinks {
    /// A link to member `target` (at this member's address for it, else `node`'s).
    pub fn link(&self, target: MemberId, node: &Member) -> MemberLink {
        let mut member = node.clone();
        if let Some(addr) = self.addresses.get(&target) {
            member.addr = addr.clone();
        }
        MemberLink {
            target,
            member,
            identity: Arc::clone(&self.identity),
            link: None,
            standing: Arc::clone(&self.standing),
        }
    }
}

/// A forwarded command could not be answered.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// The leader was not reached, or its answer was lost.
    #[error("The triad's leader was not reached")]
    Link(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The leader refused.
    #[error(transparent)]
    Refused(ForwardRefusal),
}

impl MemberLink {
    /// The member this link reaches.
    pub fn target(&self) -> MemberId {
        self.target
    }

    /// Asks this member (the leader) to commit `command`; its answer.
    pub async fn forward(&mut self, command: LedgerCommand) -> Result<LedgerOutcome, ForwardError> {
        match self.ask(&Call::Submit(command)).await? {
            Answer::Submit(Ok(outcome)) => Ok(outcome),
            Answer::Submit(Err(refusal)) => Err(ForwardError::Refused(refusal)),
            _ => Err(self.answered_another_call()),
        }
    }

    /// The last log entry this member has applied.
    pub async fn applied(&mut self) -> Result<Option<LogId<MemberId>>, ForwardError> {
        match self.ask(&Call::Applied).await? {
            Answer::Applied(applied) => Ok(applied),
            _ => Err(self.answered_another_call()),
        }
    }

    /// Makes `call`; a broken link is dropped (opened again at the next call).
    async fn ask(&mut self, call: &Call) -> Result<Answer, ForwardError> {
        self.call(call).await.map_err(|e| {
            self.link = None;
            ForwardError::Link(Box::new(e))
        })
    }

    /// Drops a link whose member answered another call than the one made.
    fn answered_another_call(&mut self) -> ForwardError {
        self.link = None;
        ForwardError::Link(format!("member {} answered another call", self.member.addr).into())
    }
}

impl RaftNetworkFactory<TriadConfig> for MemberLinks {
    type Network = MemberLink;

    async fn new_client(&mut self, target: MemberId, node: &Member) -> MemberLink {
        self.link(target, node)
    }
}

impl MemberLink {
    async fn open(&self) -> Result<Link, LinkError> {
        let addr = self.member.addr.clone();
        let pin = tls::parse_pin(&self.member.pin).map_err(|_| LinkError::Pin {
            addr: addr.clone(),
            pin: self.member.pin.clone(),
        })?;
        let config = tls::client_config(pin, &self.identity).map_err(|source| LinkError::Tls {
            addr: addr.clone(),
            source,
        })?;
        let connect = async {
            let tcp = TcpStream::connect(&addr).await?;
            tcp.set_nodelay(true)?;
            TlsConnector::from(config)
                .connect(tls::server_name(), tcp)
                .await
        };
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
            .map_err(|source| LinkError::Connect {
                addr: addr.clone(),
                source,
            })?;
        Ok(Framed::new(stream, codec()))
    }

    /// Sends a call and waits for its answer. The link is out of `self` meanwhile: a call
    /// abandoned half way (openraft times calls out by dropping them) leaves no link whose next
    /// answer would be this call's, and the next call opens a fresh one.
    async fn call(&mut self, call: &Call) -> Result<Answer, LinkError> {
        let addr = self.member.addr.clone();
        let mut link = match self.link.take() {
            Some(link) => link,
            None => self.open().await?,
        };
        let frame = serde_json::to_vec(call).map_err(|source| LinkError::Codec {
            addr: addr.clone(),
            source,
        })?;
        let exchange = async {
            link.send(bytes::Bytes::from(frame)).await?;
            match link.next().await {
                Some(answer) => answer,
                None => Err(std::io::ErrorKind::UnexpectedEof.into()),
            }
        };
        let bytes = exchange.await.map_err(|source| LinkError::Broken {
            addr: addr.clone(),
            source,
        })?;
        let answer =
            serde_json::from_slice(&bytes).map_err(|source| LinkError::Codec { addr, source })?;
        // The answer was this call's: the link is in step for the next one.
        self.link = Some(link);
        Ok(answer)
    }

    fn failed<E: std::error::Error>(&mut self, e: LinkError) -> TriadRpcError<E> {
        // A link that carried something unexpected is out of step: start afresh.
        self.link = None;
        match e {
            LinkError::Connect { .. } | LinkError::Silent { .. } => {
                openraft::error::RPCError::Unreachable(Unreachable::new(&e))
            }
            _ => openraft::error::RPCError::Network(NetworkError::new(&e)),
        }
    }
}

impl MemberLink {
    /// Makes `call` and takes its answer out with `pick` (none: the member answered another
    /// call's kind).
    async fn rpc<T, E: std::error::Error>(
        &mut self,
        call: Call,
        pick: fn(Answer) -> Option<Result<T, TriadRaftError<E>>>,
    ) -> Result<T, TriadRpcError<E>> {
        if self.standing.silent() {
            return Err(self.failed(LinkError::Silent {
                addr: self.member.addr.clone(),
            }));
        }
        match self.call(&call).await.map(pick) {
            Ok(Some(Ok(answer))) => Ok(answer),
            Ok(Some(Err(e))) => Err(openraft::error::RPCError::RemoteError(RemoteError::new(
                self.target,
                e,
            ))),
            Ok(None) => Err(self.failed(LinkError::Garbled {
                addr: self.member.addr.clone(),
            })),
            Err(e) => Err(self.failed(e)),
        }
    }
}

impl RaftNetwork<TriadConfig> for MemberLink {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TriadConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<MemberId>, TriadRpcError> {
        self.rpc(Call::Append(rpc), |answer| match answer {
            Answer::Append(result) => Some(result),
            _ => None,
        })
        .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<MemberId>,
        _option: RPCOption,
    ) -> Result<VoteResponse<MemberId>, TriadRpcError> {
        self.rpc(Call::Vote(rpc), |answer| match answer {
            Answer::Vote(result) => Some(result),
            _ => None,
        })
        .await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TriadConfig>,
        _option: RPCOption,
    ) -> Result<InstallSnapshotResponse<MemberId>, TriadRpcError<InstallSnapshotError>> {
        self.rpc(Call::Snapshot(rpc), |answer| match answer {
            Answer::Snapshot(result) => Some(result),
            _ => None,
        })
        .await
    }
}

/// The suffix of the ledger holder under which a member's own apps hold their seats.
pub const MEMBER_APPS_SUFFIX: &str = "/apps";

/// The ledger holder of the seats of the apps on the member whose certificate pin is `pin`:
/// named by what its link to the leader proves, so no member can name another's (and apart
/// from the seats the member's runtime may hold as a client of its own triad, as its runtime
/// id, which its keepalives' reclaims name and would otherwise end).
pub fn member_apps_holder(pin: &str) -> String {
    format!("{pin}{MEMBER_APPS_SUFFIX}")
}

/// Whether member `member`, whose certificate pin is `pin`, may forward `command` to the
/// leader: what concerns its own apps' seats (a holder [`member_apps_holder`] of its pin) and
/// what machine it runs on, only. Client runtimes' seats are the leader's to commit, and a
/// grace, or a batch that could carry one, is the leader's alone.
fn forwardable(command: &LedgerCommand, member: MemberId, pin: &str) -> Result<(), ForwardRefusal> {
    let its_own = match command {
        LedgerCommand::MemberMachine { member: named, .. } => *named == member,
        LedgerCommand::Grant { holder, .. }
        | LedgerCommand::Renew { holder, .. }
        | LedgerCommand::Reclaim { holder, .. }
        | LedgerCommand::Release { holder, .. } => {
            if !holder.ends_with(MEMBER_APPS_SUFFIX) {
                return Err(ForwardRefusal::NotForwardable);
            }
            *holder == member_apps_holder(pin)
        }
        LedgerCommand::Grace { .. } | LedgerCommand::Batch(_) => {
            return Err(ForwardRefusal::NotForwardable);
        }
    };
    // Weakened: any member's apps' seats, any member's machine, from any member.
    if its_own || crate::weakened::is(crate::weakened::Defence::TriadForwardHolder) {
        Ok(())
    } else {
        Err(ForwardRefusal::NotItsOwn)
    }
}

/// Serves the other members' calls to `raft` on `listener`, and their forwarded commands to
/// `forwarded`: only a peer that proves it holds the key of one of `peers` (certificate pins,
/// with their member numbers) is answered; no vote request is while `standing` refuses votes, and no Raft call while it
/// is deaf. Dropping the future ends every connection it accepted.
pub async fn serve(
    listener: TcpListener,
    identity: &Identity,
    raft: TriadRaft,
    peers: BTreeMap<String, MemberId>,
    forwarded: tokio::sync::mpsc::Sender<Forwarded>,
    standing: Arc<Standing>,
) -> Result<(), tls::TlsError> {
    let acceptor = TlsAcceptor::from(tls::server_config(identity)?);
    let peers = Arc::new(peers);
    // The connections end with the server (they hold its Raft, and so its storage).
    let mut connections = tokio::task::JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let (tcp, from) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of descriptors, say: wait rather than spin.
                tracing::warn!(error = %e, "Triad member cannot accept a peer");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let raft = raft.clone();
        let peers = Arc::clone(&peers);
        let forwarded = forwarded.clone();
        let standing = Arc::clone(&standing);
        connections.spawn(async move {
            let _ = tcp.set_nodelay(true);
            let Ok(Ok(stream)) = tokio::time::timeout(CONNECT_TIMEOUT, acceptor.accept(tcp)).await
            else {
                tracing::debug!(%from, "Triad peer failed the TLS handshake");
                return;
            };
            let peer = tls::client_fingerprint(stream.get_ref().1)
                .and_then(|pin| Some((*peers.get(&pin)?, pin)));
            let Some((member, pin)) = peer else {
                tracing::warn!(%from, "Refused a triad peer whose certificate is no member's");
                return;
            };
            let mut link = Framed::new(stream, codec());
            while let Some(Ok(frame)) = link.next().await {
                let Ok(call) = serde_json::from_slice::<Call>(&frame) else {
                    tracing::warn!(%from, "Dropped a triad peer that sent a garbled call");
                    return;
                };
                let answer = match call {
                    // Kept out, this member answers as if it were down.
                    Call::Append(_) | Call::Vote(_) | Call::Snapshot(_) if standing.deaf() => {
                        tracing::debug!(%from, "Raft call left unanswered (isolated)");
                        return;
                    }
                    Call::Vote(_) if !standing.votes() => {
                        tracing::debug!(%from, "Vote request left unanswered (quarantine)");
                        return;
                    }
                    Call::Append(rpc) => Answer::Append(raft.append_entries(rpc).await),
                    Call::Applied => Answer::Applied(raft.metrics().borrow().last_applied),
                    Call::Vote(rpc) => Answer::Vote(raft.vote(rpc).await),
                    Call::Snapshot(rpc) => Answer::Snapshot(raft.install_snapshot(rpc).await),
                    Call::Submit(command) => match forwardable(&command, member, &pin) {
                        Err(refusal) => {
                            tracing::warn!(%from, member, %refusal, "Refused a forwarded command");
                            Answer::Submit(Err(refusal))
                        }
                        Ok(()) => {
                            let (answer, answered) = tokio::sync::oneshot::channel();
                            let outcome = match forwarded.send((command, answer)).await {
                                Ok(()) => answered.await.unwrap_or_else(|_| {
                                    Err(ForwardRefusal::Failed("the member stopped".into()))
                                }),
                                Err(_) => Err(ForwardRefusal::Failed("the member stopped".into())),
                            };
                            Answer::Submit(outcome)
                        }
                    },
                };
                let Ok(bytes) = serde_json::to_vec(&answer) else {
                    return;
                };
                if link.send(bytes::Bytes::from(bytes)).await.is_err() {
                    return;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PIN: &str = "4f30ade0bafddc24";

    fn grant(holder: &str) -> LedgerCommand {
        LedgerCommand::Grant {
            request: 1,
            product: 1,
            quantity: 1,
            holder: holder.into(),
            lease_ms: 1,
        }
    }

    #[test]
    fn a_member_forwards_its_own_apps_seats_commands_but_never_a_grace_or_a_clients() {
        let own = member_apps_holder(PIN);
        assert_eq!(forwardable(&grant(&own), 2, PIN), Ok(()));
        let renew = LedgerCommand::Renew {
            holder: own.clone(),
            lease_ms: 1,
        };
        assert_eq!(forwardable(&renew, 2, PIN), Ok(()));
        let grace = LedgerCommand::Grace { lease_ms: 1 };
        assert_eq!(
            forwardable(&grace, 2, PIN),
            Err(ForwardRefusal::NotForwardable)
        );
        // A client runtime's seats are the leader's to commit.
        let client = LedgerCommand::Reclaim {
            holder: PIN.into(),
            requests: vec![],
            lease_ms: 1,
            as_of: None,
        };
        assert_eq!(
            forwardable(&client, 2, PIN),
            Err(ForwardRefusal::NotForwardable)
        );
        let batch = LedgerCommand::Batch(vec![LedgerCommand::Grace { lease_ms: 1 }]);
        assert_eq!(
            forwardable(&batch, 2, PIN),
            Err(ForwardRefusal::NotForwardable)
        );
        // Its machine's kind is its own to tell.
        let machine = LedgerCommand::MemberMachine {
            member: 2,
            guest: true,
        };
        assert_eq!(forwardable(&machine, 2, PIN), Ok(()));
    }

    #[test]
    fn a_member_forwards_nothing_of_another_members() {
        let others = member_apps_holder("9c1d00aa77e2b3f0");
        let release = LedgerCommand::Release {
            lease: 5,
            holder: others.clone(),
        };
        assert_eq!(
            forwardable(&release, 2, PIN),
            Err(ForwardRefusal::NotItsOwn)
        );
        assert_eq!(
            forwardable(&grant(&others), 2, PIN),
            Err(ForwardRefusal::NotItsOwn)
        );
        let machine = LedgerCommand::MemberMachine {
            member: 3,
            guest: false,
        };
        assert_eq!(
            forwardable(&machine, 2, PIN),
            Err(ForwardRefusal::NotItsOwn)
        );
    }
}
