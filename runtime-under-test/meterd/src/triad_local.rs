//! A triad whose members all run in this process on loopback (real TLS, real storage): for
//! tests and benchmarks of the triad itself.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;

use crate::tls::{Identity, TlsError};
use crate::triad::{TriadError, TriadMember, TriadTiming};
use crate::triad_types::{Member, MemberId};

/// Why a loopback triad could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LoopbackTriadError {
    /// A member's identity could not be made.
    #[error("Cannot make a member's identity")]
    Identity(#[source] TlsError),
    /// A loopback port or the storage folder could not be had.
    #[error("Cannot listen on loopback or make the storage folder")]
    Listen(#[source] std::io::Error),
    /// A member did not start.
    #[error("Member {id} did not start")]
    Member {
        /// The member.
        id: MemberId,
        /// Why.
        #[source]
        source: TriadError,
    },
    /// The running members agreed on no leader in time.
    #[error("No agreed leader within {0:?}")]
    NoLeader(Duration),
    /// A member did not apply the leader's log in time.
    #[error("Member {0} lags behind the leader")]
    Lagging(MemberId),
}

/// `size` members on loopback with their storage in `dir`, stopped and restarted at will.
pub struct LoopbackTriad {
    dir: PathBuf,
    timing: TriadTiming,
    identities: BTreeMap<MemberId, Arc<Identity>>,
    members: BTreeMap<MemberId, Member>,
    running: BTreeMap<MemberId, TriadMember>,
    /// Listeners bound when the ports were chosen, kept until their member first starts (a
    /// port let go in between could be taken by another test).
    bound: BTreeMap<MemberId, std::net::TcpListener>,
}

impl LoopbackTriad {
    /// Starts members 1..=`size` with their storage under `dir`.
    pub async fn start(
        dir: PathBuf,
        size: u64,
        timing: TriadTiming,
    ) -> Result<LoopbackTriad, LoopbackTriadError> {
        std::fs::create_dir_all(&dir).map_err(LoopbackTriadError::Listen)?;
        let mut identities = BTreeMap::new();
        let mut members = BTreeMap::new();
        let mut bound = BTreeMap::new();
        for id in 1..=size {
            let identity = Arc::new(Identity::generate().map_err(LoopbackTriadError::Identity)?);
            let listener =
                std::net::TcpListener::bind("127.0.0.1:0").map_err(LoopbackTriadError::Listen)?;
            let port = listener
                .local_addr()
                .map_err(LoopbackTriadError::Listen)?
                .port();
            bound.insert(id, listener);
            members.insert(
                id,
                Member {
                    addr: format!("127.0.0.1:{port}"),
                    pin: identity.fingerprint(),
                },
            );
            identities.insert(id, identity);
        }
        let mut triad = LoopbackTriad {
            dir,
            timing,
            identities,
            members,
            running: BTreeMap::new(),
            bound,
        };
        for id in 1..=size {
            triad.start_member(id).await?;
        }
        Ok(triad)
    }

    /// Starts (or restarts, from its storage) member `id`.
    pub async fn start_member(&mut self, id: MemberId) -> Result<(), LoopbackTriadError> {
        let listener = match self.bound.remove(&id) {
            Some(listener) => listener
                .set_nonblocking(true)
                .and_then(|()| TcpListener::from_std(listener)),
            None => TcpListener::bind(&self.members[&id].addr).await,
        }
        .map_err(LoopbackTriadError::Listen)?;
        let member = TriadMember::start(
            id,
            self.members.clone(),
            listener,
            Arc::clone(&self.identities[&id]),
            &self.dir.join(format!("member-{id}.redb")),
            self.timing,
            true,
            crate::triad::forward_anything(),
        )
        .await
        .map_err(|source| LoopbackTriadError::Member { id, source })?;
        self.running.insert(id, member);
        Ok(())
    }

    /// Stops member `id` (its storage stays).
    pub async fn stop_member(&mut self, id: MemberId) {
        if let Some(member) = self.running.remove(&id) {
            member.stop().await;
        }
    }

    /// Stops every member.
    pub async fn stop(mut self) {
        let ids: Vec<MemberId> = self.running.keys().copied().collect();
        for id in ids {
            self.stop_member(id).await;
        }
    }

    /// The members as their peers know them.
    pub fn members(&self) -> &BTreeMap<MemberId, Member> {
        &self.members
    }

    /// The running members.
    pub fn running(&self) -> &BTreeMap<MemberId, TriadMember> {
        &self.running
    }

    /// A running member.
    pub fn member(&self, id: MemberId) -> Option<&TriadMember> {
        self.running.get(&id)
    }

    /// The one leader every running member agrees on, waiting up to `within`.
    pub async fn leader(&self, within: Duration) -> Result<MemberId, LoopbackTriadError> {
        let deadline = Instant::now() + within;
        loop {
            let leaders: Vec<MemberId> = self
                .running
                .values()
                .filter(|m| m.leads())
                .map(TriadMember::id)
                .collect();
            if let [leader] = leaders[..]
                && self.running.values().all(|m| m.leader() == Some(leader))
            {
                return Ok(leader);
            }
            if Instant::now() > deadline {
                return Err(LoopbackTriadError::NoLeader(within));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until every running member applied what the leader has.
    pub async fn settle(&self, within: Duration) -> Result<(), LoopbackTriadError> {
        let leader = self.leader(within).await?;
        let index = self.running[&leader].applied_index().unwrap_or_default();
        for member in self.running.values() {
            if !member.wait_applied(index, within).await {
                return Err(LoopbackTriadError::Lagging(member.id()));
            }
        }
        Ok(())
    }
}
