//! The daemon's side of witnessing: taking client receipts in as a server, handing chains out,
//! sending its own receipts to a witness and reconciling with it after a rollback.

use std::sync::Arc;
use std::time::Duration;

use meter_core::rollback::{ChainHead, LockReason, Receipt, WitnessLog};

use crate::daemon::Runtime;
use crate::protocol::{FromServer, ToServer};
use crate::store;
use crate::witness::{RECEIPTS_PER_FRAME, head_at};

/// How long the first spend after a start waits for a configured witness to link.
const WITNESS_LINK_WAIT: Duration = Duration::from_secs(3);

impl Runtime {
    // ----- witness (server) side -----

    /// A client runtime hands over receipts of one of its licences.
    pub async fn witness_receipts_in(
        self: &Arc<Self>,
        request: u64,
        runtime: &str,
        licence: &str,
        key: [u8; 32],
        receipts: Vec<Receipt>,
    ) -> FromServer {
        let (head, refused, change) = self.lock_licences().witnesses.accept(
            licence,
            runtime,
            key,
            &receipts,
            witness_rules(),
        );
        if let Some(change) = change
            && let Err(e) = self.store.commit(vec![change]).await
        {
            tracing::error!(licence, error = %e, "Witnessed chain not recorded");
        }
        if let Some(why) = &refused {
            tracing::warn!(licence, head = head.seq, why, "Witness refused receipts");
        } else {
            tracing::debug!(licence, head = head.seq, "Receipts witnessed");
        }
        FromServer::Witnessed {
            request,
            head,
            refused,
        }
    }

    /// A client runtime asks for the chain this server witnessed for one of its licences.
    pub fn witness_chain_out(
        &self,
        request: u64,
        runtime: &str,
        licence: &str,
        key: &[u8; 32],
        from: u64,
    ) -> FromServer {
        let log = self
            .lock_licences()
            .witnesses
            .log(licence, key, runtime, witness_rules());
        let total = log.as_ref().map_or(0, |l| l.receipts.len() as u64);
        let log = log.map(|log| {
            let start = usize::try_from(from)
                .unwrap_or(usize::MAX)
                .min(log.receipts.len());
            let end = start
                .saturating_add(RECEIPTS_PER_FRAME)
                .min(log.receipts.len());
            WitnessLog {
                genesis: log.genesis,
                receipts: log.receipts[start..end].to_vec(),
            }
        });
        FromServer::WitnessChain {
            request,
            log,
            total,
        }
    }

    /// The whole chain one witness holds for a licence, fetched page by page; `None` when the
    /// witness cannot be asked, an empty log when it has seen no receipt of the licence.
    async fn fetch_witnessed_chain(&self, server: &str, licence: &str) -> Option<WitnessLog> {
        let key = self.lock_licences().verifier()?.to_bytes();
        let mut whole: Option<WitnessLog> = None;
        loop {
            let from = whole.as_ref().map_or(0, |l| l.receipts.len() as u64);
            let answer = self
                .remotes
                .ask(server, |request| ToServer::WitnessFetch {
                    request,
                    licence: licence.to_owned(),
                    key,
                    from,
                })
                .await?;
            let FromServer::WitnessChain { log, total, .. } = answer else {
                return None;
            };
            let Some(page) = log else {
                return Some(WitnessLog::new(licence));
            };
            let done = page.receipts.is_empty();
            match &mut whole {
                Some(log) => log.receipts.extend(page.receipts),
                None => whole = Some(page),
            }
            let have = whole.as_ref().map_or(0, |l| l.receipts.len() as u64);
            if have >= total || done {
                return whole;
            }
        }
    }

    // ----- client side -----

    /// The chain the licence's witness holds for it: the pinned server's, or where none was
    /// chosen yet the first linked server's that answers.
    async fn chain_from_a_witness(&self, licence: &str) -> Option<WitnessLog> {
        let pin = self
            .lock_licences()
            .metering
            .witness_pin(licence)
            .map(str::to_owned)
            .filter(|_| !crate::weakened::is(crate::weakened::Defence::WitnessPinning));
        for (server, server_pin) in self.remotes.connected_pins() {
            if pin.as_ref().is_some_and(|pin| *pin != server_pin) {
                tracing::debug!(licence, server, "Not this licence's witness");
                continue;
            }
            if let Some(chain) = self.fetch_witnessed_chain(&server, licence).await {
                return Some(chain);
            }
        }
        None
    }

    /// Makes `pin` the witness of `licence` unless it has one.
    async fn pin_witness_of(self: &Arc<Self>, licence: &str, pin: &str) {
        let change = self.lock_licences().metering.pin_witness(licence, pin);
        if let Some(change) = change {
            let _ = store::wait(self.store.submit(vec![change])).await;
        }
    }

    /// Waits up to [`WITNESS_LINK_WAIT`] for a configured server to link, as one does within
    /// moments of the daemon's start.
    pub(crate) async fn wait_for_a_link(&self) {
        let deadline = tokio::time::Instant::now() + WITNESS_LINK_WAIT;
        while self.remotes.connected().is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Chooses a witness for every metered licence that has none: the first server linked
    /// (waiting a moment for a configured server to link).
    pub async fn pin_witnesses(self: &Arc<Self>) {
        if self.remotes.is_empty() {
            return;
        }
        self.wait_for_a_link().await;
        let Some((_, pin)) = self.remotes.connected_pins().into_iter().next() else {
            tracing::info!("No server linked: licences choose their witness at their first spend");
            return;
        };
        let changes: Vec<_> = {
            let mut licences = self.lock_licences();
            licences
                .metering
                .licences()
                .iter()
                .filter_map(|licence| licences.metering.pin_witness(licence, &pin))
                .collect()
        };
        if !changes.is_empty() {
            let _ = store::wait(self.store.submit(changes)).await;
        }
    }

    /// Hands new receipts of a licence to every reachable witness; a witness whose chain does
    /// not lead to ours (a fork: the state was rolled back or copied) locks the licence. True
    /// when at least one witness took them.
    pub async fn witness_receipts(self: &Arc<Self>, licence: &str, receipts: Vec<Receipt>) -> bool {
        if crate::weakened::is(crate::weakened::Defence::RollbackWitness) {
            // Weakened: receipts stay on this machine; the witness never hears of them.
            return false;
        }
        self.tell_dongle_witnesses().await;
        let Some(verifier) = self.lock_licences().verifier() else {
            return false;
        };
        let key = verifier.to_bytes();
        let answers = self
            .remotes
            .ask_all(|request| ToServer::WitnessReceipts {
                request,
                licence: licence.to_owned(),
                key,
                receipts: receipts.clone(),
            })
            .await;
        let mut taken = false;
        for (server, answer) in answers {
            let FromServer::Witnessed { head, refused, .. } = answer else {
                continue;
            };
            let Some(why) = refused else {
                if !taken
                    && let Some((_, pin)) = self
                        .remotes
                        .connected_pins()
                        .into_iter()
                        .find(|(addr, _)| *addr == server)
                {
                    // The first witness to take a licence's receipts keeps its chain.
                    self.pin_witness_of(licence, &pin).await;
                }
                taken = true;
                continue;
            };
            let local = self.lock_licences().metering.receipts(licence);
            if head_at(licence, &local, head.seq) == Some(head) {
                // The witness missed some of our receipts (it was unreachable): catch it up.
                let tail = local[usize::try_from(head.seq).unwrap_or(usize::MAX)..].to_vec();
                let mut caught_up = true;
                for chunk in tail.chunks(RECEIPTS_PER_FRAME) {
                    let answers = self
                        .remotes
                        .ask_all(|request| ToServer::WitnessReceipts {
                            request,
                            licence: licence.to_owned(),
                            key,
                            receipts: chunk.to_vec(),
                        })
                        .await;
                    caught_up &= answers
                        .iter()
                        .any(|(_, a)| matches!(a, FromServer::Witnessed { refused: None, .. }));
                }
                taken |= caught_up;
                continue;
            }
            tracing::warn!(licence, server, why, "Witness holds another chain");
            let local_head = head_at(licence, &local, local.len() as u64);
            self.lock_forked(licence, local_head.unwrap_or(head), head)
                .await;
        }
        taken
    }

    /// Locks a licence's metered items: its witness holds another chain than this runtime.
    async fn lock_forked(self: &Arc<Self>, licence: &str, local: ChainHead, witness: ChainHead) {
        let change = {
            let mut state = self.lock();
            let mut licences = self.lock_licences();
            let change = licences
                .metering
                .lock(licence, LockReason::ChainForked { local, witness });
            let now = self.platform.now_ms().unwrap_or(0);
            licences.metering.overlay(&mut state.table, now);
            change
        };
        if let Some(change) = change {
            let _ = store::wait(self.store.submit(vec![change])).await;
        }
    }

    /// Before the first spend of `product` from a licence loaded from the disk (the state may
    /// be a restored copy), compares the licence's chain with a witness: one that holds
    /// receipts this state lacks locks it (and reconciles it, as the policy says), so the units
    /// a restore gave back are never spent. Without a reachable witness the spend goes ahead.
    pub async fn witness_before_first_spend(self: &Arc<Self>, product: u32) {
        if crate::weakened::is(crate::weakened::Defence::RollbackWitness) {
            return;
        }
        let pending = self.lock_licences().metering.unverified_holding(product);
        if pending.is_empty() {
            return;
        }
        self.ask_dongle_witnesses().await;
        if self.remotes.is_empty() {
            return;
        }
        if self.lock_licences().metering.first_wait_for_witness() {
            self.wait_for_a_link().await;
        }
        for licence in pending {
            let locked = self.lock_licences().metering.is_locked(&licence);
            if locked {
                // Nothing is spent from it; only a reconciliation may unlock it.
                continue;
            }
            let Some(witness) = self.chain_from_a_witness(&licence).await else {
                tracing::info!(licence, "No witness reachable before the first spend");
                continue;
            };
            let local = self.lock_licences().metering.receipts(&licence);
            let seen = witness.receipts.len();
            if seen <= local.len() && local[..seen] == witness.receipts[..] {
                self.lock_licences().metering.vouched_for(&licence);
                // The witness missed our last receipts (it was unreachable): catch it up.
                for chunk in local[seen..].chunks(RECEIPTS_PER_FRAME) {
                    let _ = self.witness_receipts(&licence, chunk.to_vec()).await;
                }
                continue;
            }
            tracing::warn!(
                licence,
                local = local.len(),
                witnessed = seen,
                "The witness saw receipts this state lacks: it was restored"
            );
            let witness_head = head_at(&licence, &witness.receipts, seen as u64);
            let local_head = head_at(&licence, &local, local.len() as u64);
            if let (Some(local), Some(witness_head)) = (local_head, witness_head) {
                self.lock_forked(&licence, local, witness_head).await;
            }
            let now = self.platform.now_ms().unwrap_or(0);
            let vmgenid = self.platform.vmgenid().ok().flatten();
            // The chain just fetched is the one to reconcile with: no second fetch.
            self.reconcile_with_chain(&licence, witness, now, vmgenid.as_deref())
                .await;
            self.lock_licences().metering.vouched_for(&licence);
        }
    }

    /// Compares this runtime's receipt chains with the head each open dongle keeps for it: a
    /// dongle that saw receipts this state lacks (a restored state folder) locks every metered
    /// licence, since a dongle keeps one head for all of them. A network witness may then
    /// reconcile them, as after any lock.
    async fn ask_dongle_witnesses(self: &Arc<Self>) {
        let Some(runtime) = crate::dongles::bind_id(self.as_ref()) else {
            return;
        };
        let local = self.lock_licences().metering.combined_head();
        if let Some(fork) = crate::dongle_witness::find_fork(&self.dongles, &runtime, local).await {
            self.lock_for_dongle(local, fork).await;
        } else {
            // The dongles agree or were away for some spends: bring them up to date.
            self.tell_dongle_witnesses().await;
        }
    }

    /// Hands this runtime's combined chain head to every open dongle; one that keeps a longer
    /// or different chain locks every metered licence.
    async fn tell_dongle_witnesses(self: &Arc<Self>) {
        let local = self.lock_licences().metering.combined_head();
        if local.sequence == 0 {
            return;
        }
        if let Some(fork) = crate::dongle_witness::store(&self.dongles, local).await {
            self.lock_for_dongle(local, fork).await;
        }
    }

    /// Locks every metered licence: the dongle `serial` keeps another chain head (`stored`)
    /// than this runtime's (`local`): the state was restored or copied.
    async fn lock_for_dongle(
        self: &Arc<Self>,
        local: dongle::WitnessHead,
        (serial, stored): (String, dongle::WitnessHead),
    ) {
        tracing::warn!(
            serial,
            local = local.sequence,
            dongle = stored.sequence,
            "A dongle keeps another receipt chain for this runtime: state restored or copied"
        );
        let head = |h: dongle::WitnessHead| ChainHead {
            seq: h.sequence,
            hash: meter_core::rollback::ChainHash(h.head),
        };
        let licences = self.lock_licences().metering.licences();
        for licence in licences {
            self.lock_forked(&licence, head(local), head(stored)).await;
        }
    }

    /// Reconciles a locked licence with the chain a reachable witness holds: spent units are
    /// taken over (none regained), uses spent twice are refused, the lock is lifted.
    pub async fn reconcile_with_witness(
        self: &Arc<Self>,
        licence: &str,
        now: u64,
        vmgenid: Option<&str>,
    ) {
        let Some(witness) = self.chain_from_a_witness(licence).await else {
            tracing::debug!(licence, "No witness reachable: metered items stay locked");
            return;
        };
        self.reconcile_with_chain(licence, witness, now, vmgenid)
            .await;
    }

    /// Reconciles a locked licence with `witness`, the chain a witness answered.
    async fn reconcile_with_chain(
        self: &Arc<Self>,
        licence: &str,
        witness: WitnessLog,
        now: u64,
        vmgenid: Option<&str>,
    ) {
        let outcome = {
            let mut state = self.lock();
            let mut licences = self.lock_licences();
            let Some(signer) = licences.signer() else {
                return;
            };
            let witness = if crate::weakened::is(crate::weakened::Defence::RollbackReceipts) {
                // Weakened: the local receipt chain is taken as the truth and compared with itself.
                WitnessLog {
                    receipts: licences.metering.receipts(licence),
                    ..witness
                }
            } else {
                witness
            };
            let outcome = licences
                .metering
                .reconcile(licence, &witness, now, vmgenid, &signer);
            licences.metering.overlay(&mut state.table, now);
            outcome
        };
        match outcome {
            Some(Ok((done, change))) => {
                if let Err(e) = self.store.commit(vec![change]).await {
                    tracing::error!(licence, error = %e, "Reconciliation not recorded");
                }
                tracing::info!(
                    licence,
                    adopted = done.adopted,
                    refused = done.refused.len(),
                    still_locked = ?done.lock.as_ref().map(LockReason::code),
                    "Reconciled with the witness"
                );
                if !done.to_witness.is_empty() {
                    let _ = self.witness_receipts(licence, done.to_witness).await;
                }
            }
            Some(Err(e)) => tracing::warn!(licence, error = %e, "Reconciliation failed"),
            None => {}
        }
    }
}

/// How this build's witness keeps chains apart (weakened builds may not).
fn witness_rules() -> crate::witness::WitnessRules {
    crate::witness::WitnessRules {
        bind_to_runtime: !crate::weakened::is(crate::weakened::Defence::StationAuthentication),
        limit_chains: !crate::weakened::is(crate::weakened::Defence::ConnectionLimits),
        key_chains: !crate::weakened::is(crate::weakened::Defence::WitnessChainKeys),
    }
}
