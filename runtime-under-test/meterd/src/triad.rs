//! One member of a licence server triad: three servers whose seat ledger is one, replicated
//! with Raft so that any two keep serving and none counts a seat twice. The leader stamps every
//! command with its clock; the ledger applies the committed log on every member alike.
//! Without a quorum nothing new is granted: a write that cannot reach two members ends in
//! [`TriadError::NoQuorum`].

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use meter_core::seat_ledger::{LedgerCommand, LedgerEntry, LedgerOutcome};
use openraft::error::{ClientWriteError, InitializeError, RaftError};
use openraft::{Config, ServerState};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::tls::Identity;
use crate::triad_network::{
    ForwardError, ForwardRefusal, Forwarded, MemberLink, MemberLinks, serve,
};
use crate::triad_standing::Standing;
use crate::triad_store::{self, TriadLedger, TriadLog, TriadStoreError};
use crate::triad_types::{Member, MemberId, TriadRaft};

/// How fast members notice each other and elect (milliseconds), and how long a write may wait.
#[derive(Debug, Clone, Copy)]
pub struct TriadTiming {
    /// Leader heartbeat period (also each append call's timeout).
    pub heartbeat_ms: u64,
    /// Shortest election timeout.
    pub election_min_ms: u64,
    /// Longest election timeout (also the leader's lease).
    pub election_max_ms: u64,
    /// How long a write may wait for a quorum before the asker is told there is none.
    pub write_timeout: Duration,
    /// The grace a new leader gives every running lease before anything expires: one lease
    /// (keepalive) window, milliseconds.
    pub lease_grace_ms: u64,
}

impl Default for TriadTiming {
    /// For members on one LAN: a follower takes over within about
    /// `election_max_ms + election_min_ms..election_max_ms` of its leader's last heartbeat
    /// (openraft's leader lease is the longest election timeout).
    fn default() -> TriadTiming {
        TriadTiming {
            heartbeat_ms: 100,
            election_min_ms: 400,
            election_max_ms: 800,
            write_timeout: Duration::from_secs(3),
            lease_grace_ms: 30_000,
        }
    }
}

/// Why a triad member could not start or answer.
#[derive(Debug, thiserror::Error)]
pub enum TriadError {
    /// The member's storage failed to open.
    #[error("Cannot open the triad member's storage")]
    Store(#[source] TriadStoreError),
    /// The Raft settings are inconsistent.
    #[error("Invalid triad timing")]
    Timing(#[source] openraft::ConfigError),
    /// Raft could not start or stopped.
    #[error("The triad member stopped: {0}")]
    Stopped(String),
    /// The member list does not name this member.
    #[error("Member {id} is not one of the triad's members {members:?}")]
    NotAMember {
        /// This member.
        id: MemberId,
        /// The members given.
        members: Vec<MemberId>,
    },
    /// Another member leads: ask it (unknown during an election).
    #[error("This member does not lead the triad; ask {}", leader.as_ref().map_or("again after the election", |m| m.addr.as_str()))]
    NotLeader {
        /// The leader, when known.
        leader: Option<Member>,
    },
    /// No two members agreed in time: nothing new is granted without a quorum.
    #[error("No quorum of the triad answered within {0:?}")]
    NoQuorum(Duration),
    /// The leader refused a forwarded command that asks for more than its licence allows.
    #[error("The leader refused the command: {0}")]
    BeyondLicence(String),
    /// The leader refused a forwarded command on what is not the forwarding member's own.
    #[error("The leader refused the command: it is not this member's own")]
    NotItsOwn,
}

/// What the leader makes of a command another member forwards before it commits it: the
/// command to commit, or what it asks for that the leader's licence does not allow.
pub type ForwardCheck = Arc<dyn Fn(LedgerCommand) -> Result<LedgerCommand, String> + Send + Sync>;

/// A check that lets every forwarded command through as it came (a triad without licences:
/// tests and benchmarks).
pub fn forward_anything() -> ForwardCheck {
    Arc::new(Ok)
}

/// Opens a member's storage; a member stopped a moment ago may still be letting go of it (its
/// Raft's tasks end after its shutdown returns), so a file still open is waited for a while.
async fn open_store(db: &Path) -> Result<(TriadLog, TriadLedger), TriadError> {
    const LET_GO: Duration = Duration::from_secs(5);
    let started = std::time::Instant::now();
    loop {
        match triad_store::open(db) {
            Err(TriadStoreError::Open {
                source: redb::Error::DatabaseAlreadyOpen,
                ..
            }) if started.elapsed() < LET_GO => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => return other.map_err(TriadError::Store),
        }
    }
}

/// Milliseconds since the epoch on this machine's wall clock.
fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or_default()
}

/// Where the answer to a command waiting for the next entry goes.
type Answer = tokio::sync::oneshot::Sender<Result<LedgerOutcome, TriadError>>;

/// Commits `batch` as one entry stamped `at_ms` (a lone command as itself) and answers each.
async fn write_entry(
    raft: &TriadRaft,
    timeout: Duration,
    at_ms: u64,
    mut batch: Vec<(LedgerCommand, Answer)>,
) {
    let (command, lone) = if batch.len() == 1 {
        (batch[0].0.clone(), true)
    } else {
        let commands = batch.iter().map(|(command, _)| command.clone()).collect();
        (LedgerCommand::Batch(commands), false)
    };
    let written = match tokio::time::timeout(
        timeout,
        raft.client_write(LedgerEntry { at_ms, command }),
    )
    .await
    {
        Err(_) => Err(TriadError::NoQuorum(timeout)),
        Ok(Ok(response)) => Ok(response.data),
        Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(forward)))) => {
            Err(TriadError::NotLeader {
                leader: forward.leader_node,
            })
        }
        Ok(Err(e)) => Err(TriadError::Stopped(e.to_string())),
    };
    match written {
        Ok(outcome) if lone => {
            if let Some((_, answer)) = batch.pop() {
                let _ = answer.send(Ok(outcome));
            }
        }
        Ok(LedgerOutcome::Batch(outcomes)) if outcomes.len() == batch.len() => {
            for ((_, answer), outcome) in batch.into_iter().zip(outcomes) {
                let _ = answer.send(Ok(outcome));
            }
        }
        Ok(other) => {
            for (_, answer) in batch {
                let _ = answer.send(Err(TriadError::Stopped(format!(
                    "unexpected answer to a batch {other:?}"
                ))));
            }
        }
        Err(e) => {
            for (_, answer) in batch {
                let _ = answer.send(Err(e.same()));
            }
        }
    }
}

impl TriadError {
    /// The same error for another asker (a batch's commands share their entry's fate).
    fn same(&self) -> TriadError {
        match self {
            TriadError::NoQuorum(timeout) => TriadError::NoQuorum(*timeout),
            TriadError::NotLeader { leader } => TriadError::NotLeader {
                leader: leader.clone(),
            },
            TriadError::NotAMember { id, members } => TriadError::NotAMember {
                id: *id,
                members: members.clone(),
            },
            other => TriadError::Stopped(other.to_string()),
        }
    }
}

/// What commits commands stamped with the leader's clock: the member's, shared with the task
/// that answers the commands other members forward.
struct Writer {
    id: MemberId,
    raft: TriadRaft,
    timing: TriadTiming,
    /// The last term whose grace this member committed as its leader.
    graced_term: tokio::sync::Mutex<u64>,
    /// The wall-clock time and the instant this member's lead began: within a term entries
    /// are stamped from the monotonic clock, so a step of the leader's wall clock (root can
    /// set it) cannot expire leases early.
    stamp_base: std::sync::Mutex<Option<(u64, std::time::Instant)>>,
    /// Commands waiting for the next entry.
    waiting: std::sync::Mutex<Vec<(LedgerCommand, Answer)>>,
    /// Held while one entry is written: the commands asked for meanwhile gather, and go in
    /// the next entry together.
    pen: Arc<tokio::sync::Mutex<()>>,
}

/// A running member (its number, Raft and timing are its writer's).
pub struct TriadMember {
    ledger: TriadLedger,
    server: JoinHandle<()>,
    /// Answers the commands other members forward.
    forwarder: JoinHandle<()>,
    writer: Arc<Writer>,
    /// The members, and the links to reach them, for forwarding to the leader.
    members: BTreeMap<MemberId, Member>,
    links: MemberLinks,
    /// The link to the leader this member forwards to.
    leader_link: tokio::sync::Mutex<Option<MemberLink>>,
    /// How far this member takes part now (see [`TriadMember::quarantine`] and
    /// [`TriadMember::isolate`]).
    standing: Arc<Standing>,
    /// Its own log, read by the quarantine.
    log: TriadLog,
}

impl Writer {
    /// Commits `command` stamped with this member's clock (it must lead), with the next entry
    /// another command is written in if one is within `linger`; its answer. The first command
    /// a member commits in a term it leads is preceded by the grace of
    /// [`TriadTiming::lease_grace_ms`]: leases end only when entries apply, so nothing can
    /// expire before it.
    async fn submit_within(
        &self,
        command: LedgerCommand,
        linger: Duration,
    ) -> Result<LedgerOutcome, TriadError> {
        let (leads, term) = {
            let metrics = self.raft.metrics();
            let metrics = metrics.borrow();
            (metrics.state == ServerState::Leader, metrics.current_term)
        };
        if leads {
            let mut graced = self.graced_term.lock().await;
            if *graced < term {
                *self.stamp_base.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some((wall_ms(), std::time::Instant::now()));
                let lease_ms = self.timing.lease_grace_ms;
                self.write(LedgerCommand::Grace { lease_ms }, Duration::ZERO)
                    .await?;
                tracing::info!(
                    member = self.id,
                    term,
                    lease_ms,
                    "New leader's grace committed"
                );
                *graced = term;
            }
        }
        self.write(command, linger).await
    }

    /// Commits one command stamped with this member's clock: the wall clock at the start of
    /// its lead, plus the monotonic time since. Commands asked for while an entry is being
    /// written go in the next entry together (one replication and one sync for all of them);
    /// a command waits up to `linger` for another to write it along.
    async fn write(
        &self,
        command: LedgerCommand,
        linger: Duration,
    ) -> Result<LedgerOutcome, TriadError> {
        let (answer, mut answered) = tokio::sync::oneshot::channel();
        self.waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((command, answer));
        if !linger.is_zero()
            && let Ok(result) = tokio::time::timeout(linger, &mut answered).await
        {
            return result
                .unwrap_or_else(|_| Err(TriadError::Stopped("the write was abandoned".into())));
        }
        // One bound for the whole write: the entry being written when it was asked for (its
        // turn), then its own entry, each within `write_timeout`.
        let timeout = self.timing.write_timeout.saturating_mul(2);
        match tokio::time::timeout(timeout, self.write_waiting(&mut answered)).await {
            Ok(result) => result,
            Err(_) => Err(TriadError::NoQuorum(timeout)),
        }
    }

    /// Waits for the pen, unless the command waiting for `answered` is written meanwhile, and
    /// writes every command waiting then in one entry.
    async fn write_waiting(
        &self,
        answered: &mut tokio::sync::oneshot::Receiver<Result<LedgerOutcome, TriadError>>,
    ) -> Result<LedgerOutcome, TriadError> {
        let pen = Arc::clone(&self.pen).lock_owned().await;
        // Written meanwhile by the one who held the pen?
        if let Ok(result) = answered.try_recv() {
            return result;
        }
        let mut batch =
            std::mem::take(&mut *self.waiting.lock().unwrap_or_else(|e| e.into_inner()));
        // A command whose asker gave up is not written (a grant's seat would go to nobody).
        batch.retain(|(_, answer)| !answer.is_closed());
        // A new leader's grace comes before anything else, whenever the others were asked.
        batch.sort_by_key(|(command, _)| !matches!(command, LedgerCommand::Grace { .. }));
        if batch.is_empty() {
            // Ours is in the entry being written (its writer answers before it lets go).
            drop(pen);
            return answered
                .await
                .unwrap_or_else(|_| Err(TriadError::Stopped("the write was abandoned".into())));
        }
        let base = *self.stamp_base.lock().unwrap_or_else(|e| e.into_inner());
        let at_ms = match base {
            Some((wall, since)) => {
                wall.saturating_add(u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX))
            }
            None => wall_ms(),
        };
        // Written by a task of its own: an asker that gives up does not abandon the others.
        let (raft, timeout) = (self.raft.clone(), self.timing.write_timeout);
        tokio::spawn(async move {
            write_entry(&raft, timeout, at_ms, batch).await;
            drop(pen);
        });
        answered
            .await
            .unwrap_or_else(|_| Err(TriadError::Stopped("the write was abandoned".into())))
    }
}

/// Commits the commands other members forward while this member leads (each in a task of its
/// own, so they share entries as local ones do) and `check` passes them; refuses them otherwise.
async fn answer_forwarded(
    writer: Arc<Writer>,
    check: ForwardCheck,
    mut forwarded: tokio::sync::mpsc::Receiver<Forwarded>,
) {
    while let Some((command, answer)) = forwarded.recv().await {
        let writer = Arc::clone(&writer);
        let checked = check(command);
        tokio::spawn(async move {
            let leads = writer.raft.metrics().borrow().state == ServerState::Leader;
            let outcome = match checked {
                Err(beyond) => {
                    tracing::warn!(reason = %beyond, "Refused a forwarded command beyond the licence");
                    Err(ForwardRefusal::BeyondLicence(beyond))
                }
                Ok(command) if leads => writer
                    .submit_within(command, Duration::ZERO)
                    .await
                    .map_err(|e| match e {
                        TriadError::NotLeader { .. } => ForwardRefusal::NotLeader,
                        TriadError::NoQuorum(_) => ForwardRefusal::NoQuorum,
                        other => ForwardRefusal::Failed(other.to_string()),
                    }),
                Ok(_) => Err(ForwardRefusal::NotLeader),
            };
            let _ = answer.send(outcome);
        });
    }
}

impl TriadMember {
    /// Starts member `id` of `members`, serving the others on `listener` with `identity`
    /// (whose pin `members` lists), its log and ledger in the redb file `db`. A member that
    /// `proposes` and starts for the first time proposes the membership (and stands for
    /// election at once); one that restarts, or does not propose, learns it from the leader.
    /// While it leads, the commands other members forward are committed only if `check` passes
    /// them.
    #[allow(clippy::too_many_arguments)]
    pub async fn start(
        id: MemberId,
        members: BTreeMap<MemberId, Member>,
        listener: TcpListener,
        identity: Arc<Identity>,
        db: &Path,
        timing: TriadTiming,
        proposes: bool,
        check: ForwardCheck,
    ) -> Result<TriadMember, TriadError> {
        if !members.contains_key(&id) {
            return Err(TriadError::NotAMember {
                id,
                members: members.keys().copied().collect(),
            });
        }
        let config = Config {
            cluster_name: "meter-triad".into(),
            heartbeat_interval: timing.heartbeat_ms,
            election_timeout_min: timing.election_min_ms,
            election_timeout_max: timing.election_max_ms,
            install_snapshot_timeout: 5_000,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(1_000),
            ..Default::default()
        }
        .validate()
        .map_err(TriadError::Timing)?;
        let (log, ledger) = open_store(db).await?;
        let standing = Arc::new(Standing::default());
        let links = MemberLinks::new(
            Arc::clone(&identity),
            members
                .iter()
                .map(|(id, m)| (*id, m.addr.clone()))
                .collect(),
            Arc::clone(&standing),
        );
        let own_log = log.clone();
        let raft = TriadRaft::new(id, Arc::new(config), links.clone(), log, ledger.clone())
            .await
            .map_err(|e| TriadError::Stopped(e.to_string()))?;
        let peers: BTreeMap<String, MemberId> = members
            .iter()
            .filter(|(member, _)| **member != id)
            .map(|(member, m)| (m.pin.clone(), *member))
            .collect();
        let writer = Arc::new(Writer {
            id,
            raft: raft.clone(),
            timing,
            graced_term: tokio::sync::Mutex::new(0),
            stamp_base: std::sync::Mutex::new(None),
            waiting: std::sync::Mutex::default(),
            pen: Arc::default(),
        });
        let (forwarded, to_answer) = tokio::sync::mpsc::channel(64);
        let forwarder = tokio::spawn(answer_forwarded(Arc::clone(&writer), check, to_answer));
        let served = raft.clone();
        let served_standing = Arc::clone(&standing);
        let server = tokio::spawn(async move {
            if let Err(e) = serve(
                listener,
                &identity,
                served,
                peers,
                forwarded,
                served_standing,
            )
            .await
            {
                tracing::error!(error = %e, "Triad member stopped serving its peers");
            }
        });
        // Proposers propose the same membership; one already initialised refuses, fine.
        let proposed = if proposes {
            raft.initialize(members.clone()).await
        } else {
            Ok(())
        };
        match proposed {
            Ok(()) | Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {}
            Err(e) => {
                server.abort();
                forwarder.abort();
                let _ = server.await;
                let _ = raft.shutdown().await;
                return Err(TriadError::Stopped(e.to_string()));
            }
        }
        Ok(TriadMember {
            ledger,
            server,
            forwarder,
            writer,
            members,
            links,
            leader_link: tokio::sync::Mutex::new(None),
            standing,
            log: own_log,
        })
    }

    /// This member's number.
    pub fn id(&self) -> MemberId {
        self.writer.id
    }

    /// Commits `command` stamped with this member's clock (it must lead); its answer. The
    /// first command a member commits in a term it leads is preceded by the grace of
    /// [`TriadTiming::lease_grace_ms`]: leases end only when entries apply, so nothing can
    /// expire before it.
    pub async fn submit(&self, command: LedgerCommand) -> Result<LedgerOutcome, TriadError> {
        self.writer.submit_within(command, Duration::ZERO).await
    }

    /// Commits `command` as [`TriadMember::submit`] does, but with the next entry another
    /// command is written in, if one is within `linger` (it needs no entry of its own).
    pub async fn submit_within(
        &self,
        command: LedgerCommand,
        linger: Duration,
    ) -> Result<LedgerOutcome, TriadError> {
        self.writer.submit_within(command, linger).await
    }

    /// Commits `command` through whichever member leads: itself, or the leader it forwards
    /// the command to over the members' link (a member's own apps' seats).
    pub async fn submit_anywhere(
        &self,
        command: LedgerCommand,
    ) -> Result<LedgerOutcome, TriadError> {
        if self.leads() {
            return self.submit(command).await;
        }
        let Some(leader) = self.leader().filter(|leader| *leader != self.writer.id) else {
            return Err(TriadError::NotLeader { leader: None });
        };
        let Some(node) = self.members.get(&leader) else {
            return Err(TriadError::NotLeader { leader: None });
        };
        let mut link = self.leader_link.lock().await;
        let link = match &mut *link {
            Some(link) if link.target() == leader => link,
            other => other.insert(self.links.link(leader, node)),
        };
        // The leader's own bound on the write, and a connection's setup.
        let timeout = self
            .writer
            .timing
            .write_timeout
            .saturating_mul(2)
            .saturating_add(Duration::from_secs(2));
        match tokio::time::timeout(timeout, link.forward(command)).await {
            Err(_) => Err(TriadError::NoQuorum(timeout)),
            Ok(Ok(outcome)) => Ok(outcome),
            Ok(Err(ForwardError::Refused(ForwardRefusal::NoQuorum))) => {
                Err(TriadError::NoQuorum(self.writer.timing.write_timeout))
            }
            Ok(Err(ForwardError::Refused(ForwardRefusal::BeyondLicence(beyond)))) => {
                Err(TriadError::BeyondLicence(beyond))
            }
            Ok(Err(ForwardError::Refused(ForwardRefusal::NotItsOwn))) => Err(TriadError::NotItsOwn),
            Ok(
                Err(ForwardError::Refused(ForwardRefusal::NotLeader)) | Err(ForwardError::Link(_)),
            ) => Err(TriadError::NotLeader { leader: None }),
            Ok(Err(e)) => Err(TriadError::Stopped(e.to_string())),
        }
    }

    /// How long a write may wait for a quorum.
    pub fn write_timeout(&self) -> Duration {
        self.writer.timing.write_timeout
    }

    /// The member that leads, as this member knows.
    pub fn leader(&self) -> Option<MemberId> {
        self.writer.raft.metrics().borrow().current_leader
    }

    /// Whether this member leads now.
    pub fn leads(&self) -> bool {
        self.writer.raft.metrics().borrow().state == ServerState::Leader
    }

    /// Waits until this member knows a leader; which.
    pub async fn wait_for_leader(&self, within: Duration) -> Option<MemberId> {
        self.writer
            .raft
            .wait(Some(within))
            .metrics(|m| m.current_leader.is_some(), "a leader is known")
            .await
            .ok()
            .and_then(|m| m.current_leader)
    }

    /// Waits until this member's ledger has applied the log up to `index`.
    pub async fn wait_applied(&self, index: u64, within: Duration) -> bool {
        self.writer
            .raft
            .wait(Some(within))
            .applied_index_at_least(Some(index), "applied")
            .await
            .is_ok()
    }

    /// The last log index this member has applied.
    pub fn applied_index(&self) -> Option<u64> {
        self.writer
            .raft
            .metrics()
            .borrow()
            .last_applied
            .map(|log_id| log_id.index)
    }

    /// Holds this member back from standing for election (it still votes and follows) until it
    /// has known a leader, or for `at_most` without one.
    pub fn hold_elections(&self, at_most: Duration) {
        let raft = self.writer.raft.clone();
        raft.runtime_config().elect(false);
        let id = self.writer.id;
        tokio::spawn(async move {
            let known = raft
                .wait(Some(at_most))
                .metrics(|m| m.current_leader.is_some(), "a leader is known")
                .await
                .is_ok();
            raft.runtime_config().elect(true);
            tracing::debug!(
                member = id,
                leader_known = known,
                "Triad member stands for election"
            );
        });
    }

    /// Keeps a member that started again out of every election, as a voter and as a candidate
    /// (it still follows and acknowledges a leader's entries), until its log holds the entry
    /// both other members (or a leader other than itself) said they had applied last (same
    /// position, same term), asked after this member started; or for `at_most`. Its state may have been put
    /// back from an old copy: a log missing entries it had acknowledged, which with its vote
    /// could elect a leader that never saw them. Caught up so, its log holds every entry
    /// committed before it started; `at_most` (longer than a lease) lets every lease
    /// granted in the entries it may have lost run out first, so that forgetting them hands
    /// no seat out twice. A triad that lost a member and restarts another is without a leader
    /// until then.
    pub fn quarantine(&self, at_most: Duration) {
        let raft = self.writer.raft.clone();
        let standing = Arc::clone(&self.standing);
        // Taken before this returns: no vote request is answered from now on.
        let refusing = standing.refuse_votes();
        raft.runtime_config().elect(false);
        let id = self.writer.id;
        let links = self.links.clone();
        let members = self.members.clone();
        let log = self.log.clone();
        tokio::spawn(async move {
            let until = tokio::time::Instant::now() + at_most;
            let caught_up = tokio::time::timeout_at(until, async {
                loop {
                    let leader = raft.metrics().borrow().current_leader;
                    // Whom to ask: the leader, or (none known) both others, whose logs hold
                    // between them every entry committed with this member's help.
                    let asked: Vec<MemberId> = match leader.filter(|leader| *leader != id) {
                        Some(leader) => vec![leader],
                        None => members.keys().copied().filter(|m| *m != id).collect(),
                    };
                    // The furthest entry they applied (`Some(None)`: none yet); `None`: one
                    // could not be asked.
                    let mut target = Some(None::<openraft::LogId<MemberId>>);
                    for member in &asked {
                        let Some(node) = members.get(member) else {
                            target = None;
                            break;
                        };
                        target = match links.link(*member, node).applied().await {
                            Ok(applied) => target
                                .map(|t| std::cmp::max_by_key(t, applied, |a| a.map(|a| a.index))),
                            Err(_) => None,
                        };
                        if target.is_none() {
                            break;
                        }
                    }
                    if let Some(applied) = target {
                        let index = applied.map_or(0, |a| a.index);
                        let left = until.saturating_duration_since(tokio::time::Instant::now());
                        let reached = raft
                            .wait(Some(left))
                            .metrics(
                                // Held in its log is enough (a restarted member applies
                                // its entries only once a leader says they committed).
                                |m| m.last_log_index.is_some_and(|i| i >= index),
                                "holds as much as the others applied",
                            )
                            .await;
                        // The same entry, not only as long a log: an old copy may hold
                        // entries of an older term at those positions, which a leader it
                        // helped elect would make the others' committed ones give way to.
                        let same = reached.is_ok()
                            && applied.is_none_or(|id| log.holds(&id).unwrap_or(false));
                        tracing::debug!(
                            member = id,
                            ?asked,
                            ?applied,
                            reached = reached.is_ok(),
                            same,
                            "Quarantined member catching up"
                        );
                        if same {
                            return;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
            .await
            .is_ok();
            drop(refusing);
            if standing.votes() {
                raft.runtime_config().elect(true);
            }
            tracing::info!(member = id, caught_up, "Triad member out of quarantine");
        });
    }

    /// Keeps a member whose whole machine went back to an older state (its hypervisor
    /// reverted it: its memory and disk are an old copy, and its Raft runs on from there
    /// without starting again) out of the triad for `window`: it makes and answers no Raft call
    /// and stands for no election, as if it were down, so every lease granted in the entries
    /// it lost runs out first (forgetting them then hands no seat out twice). It may have
    /// led in the term it went back to, with a log that lacks entries the others hold in that
    /// very term: it stays silent while it believes it leads that term, until a leader of a
    /// later term is heard of, so it never appends an entry at a position the others hold.
    pub fn isolate(&self, window: Duration) {
        let raft = self.writer.raft.clone();
        let standing = Arc::clone(&self.standing);
        let refusing = standing.refuse_votes();
        let deaf = standing.stop_listening();
        let silent = standing.stop_talking();
        raft.runtime_config().elect(false);
        let id = self.writer.id;
        let term = raft.metrics().borrow().current_term;
        tracing::warn!(member = id, term, "Machine reverted: triad member isolated");
        tokio::spawn(async move {
            tokio::time::sleep(window).await;
            drop(deaf);
            drop(refusing);
            if standing.votes() {
                raft.runtime_config().elect(true);
            }
            let _ = raft
                .wait(None)
                .metrics(
                    |m| !(m.current_leader == Some(id) && m.current_term == term),
                    "leads no longer in the term it went back to",
                )
                .await;
            drop(silent);
            tracing::info!(member = id, "Triad member out of isolation");
        });
    }

    /// This member's Raft state as it changes.
    pub fn metrics(&self) -> tokio::sync::watch::Receiver<openraft::RaftMetrics<MemberId, Member>> {
        self.writer.raft.metrics()
    }

    /// This member's copy of the seat ledger.
    pub fn ledger(&self) -> &TriadLedger {
        &self.ledger
    }

    /// Stops the member (its storage keeps what it committed).
    pub async fn stop(self) {
        self.server.abort();
        self.forwarder.abort();
        let _ = self.server.await;
        let _ = self.writer.raft.shutdown().await;
    }
}
