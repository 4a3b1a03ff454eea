//! The daemon's usage log: every grant, denial and end of a grant goes to the store with the
//! change it belongs to (so nothing is answered before it is logged), and is read back for
//! `meter usage verify` and `meter usage report`.

use std::collections::HashMap;
use std::sync::Arc;

use meter_core::allocation::ProductKey;
use meter_core::policy::Counting;
use meter_core::reason::Reason;
use meter_core::usage::{EncodedEvent, UsageEvent, UsageKind, Verification, read_record, verify};
use meter_core::usage_report::{self, Window};
use meter_core::usage_seats::seat_history;
use serde_json::{Value, json};

use crate::daemon::{Asker, GrantRecord, Holder, Runtime, State};
use crate::protocol::WireSession;
use crate::store::{self, Change};

/// A log failure the command line reports.
#[derive(Debug, thiserror::Error)]
pub enum UsageLogError {
    /// The runtime runs without a usage log.
    #[error("This runtime keeps no usage log (meterd --no-usage-log)")]
    Off,
    /// The store could not be read.
    #[error("Cannot read the usage log")]
    Store(#[source] store::StoreError),
    /// Not a harness build.
    #[error("Only a harness build stages log tampering")]
    NotHarnessBuild,
}

/// The address an event names: a client runtime's peer, else a remote desktop's client.
fn address_of(session: &WireSession, peer: Option<&str>) -> Option<String> {
    match (peer, session) {
        (Some(peer), _) => Some(
            crate::access_checks::peer_ip(peer)
                .map_or_else(|| peer.to_owned(), |ip| ip.to_string()),
        ),
        (None, WireSession::Rdp { client_ip, .. }) => Some(client_ip.clone()),
        (None, _) => None,
    }
}

fn client_name_of(session: &WireSession) -> Option<String> {
    match session {
        WireSession::Rdp { client_name, .. } => Some(client_name.clone()),
        _ => None,
    }
}

impl Runtime {
    /// The user holding a grant: a local holder's account, or the user a client runtime named.
    fn grant_user(&self, state: &State, handle: u64, record: &GrantRecord) -> Option<String> {
        match record.holder {
            Holder::Local { uid, .. } => self.user_of(uid),
            Holder::Remote { .. } => state.remote_users.get(&handle).cloned(),
        }
    }

    /// The log change recording `kind` for the grant `handle` at `at_ms` (none with the log
    /// off). Call it with the state as it is after the event.
    pub(crate) fn usage_change(
        &self,
        state: &State,
        kind: UsageKind,
        handle: u64,
        record: &GrantRecord,
        user: Option<String>,
        at_ms: u64,
    ) -> Option<Change> {
        self.usage_key?;
        let peer = match &record.holder {
            Holder::Remote { peer, .. } => Some(peer.as_str()),
            Holder::Local { .. } => None,
        };
        let held_ms = kind
            .ends_grant()
            .then(|| at_ms.saturating_sub(record.granted_at));
        Some(Change::AppendUsage(EncodedEvent::of(&UsageEvent {
            at_ms,
            kind,
            product: record.product,
            handle,
            user,
            machine: record.station.machine.clone(),
            session: record.station.session,
            client_name: client_name_of(&record.session),
            address: address_of(&record.session, peer),
            in_use: state.in_use(record.product),
            held_ms,
        })))
    }

    /// The log change for a grant just recorded under `handle`.
    pub(crate) fn usage_grant(&self, state: &State, handle: u64) -> Option<Change> {
        // With the log off, not even the holder's user is looked up.
        self.usage_key?;
        let record = state.grants.get(&handle)?;
        let user = self.grant_user(state, handle, record);
        self.usage_change(
            state,
            UsageKind::Grant,
            handle,
            record,
            user,
            record.granted_at,
        )
    }

    /// The user of a grant about to end (read before it is forgotten).
    pub(crate) fn usage_user(&self, state: &State, handle: u64) -> Option<String> {
        self.usage_key?;
        let record = state.grants.get(&handle)?;
        self.grant_user(state, handle, record)
    }

    /// Records a refused access and waits until it is written.
    pub(crate) async fn log_denial(
        &self,
        asker: Asker,
        product: ProductKey,
        reason: Reason,
        rule: Option<usize>,
    ) {
        if self.usage_key.is_none()
            || crate::weakened::is(crate::weakened::Defence::UsageLogRecords)
        {
            // Weakened: denials leave no record.
            return;
        }
        let at_ms = self.platform.now_ms().unwrap_or(0);
        let durable = {
            let state = self.lock();
            self.store
                .submit(vec![Change::AppendUsage(EncodedEvent::of(&UsageEvent {
                    at_ms,
                    kind: UsageKind::Denial {
                        reason,
                        rule: rule.and_then(|r| u32::try_from(r).ok()),
                    },
                    product,
                    handle: 0,
                    user: asker.user,
                    machine: asker.machine,
                    session: asker.session,
                    client_name: client_name_of(&asker.wire_session),
                    address: address_of(&asker.wire_session, asker.peer.as_deref()),
                    in_use: state.in_use(product),
                    held_ms: None,
                }))])
        };
        if let Err(e) = store::wait(durable).await {
            tracing::error!(error = %e, "Denial not logged");
        }
    }

    /// Checks the whole log: places, chain, tags, signatures and the head kept beside it.
    pub fn usage_verify(&self) -> Result<(Verification, [u8; 32]), UsageLogError> {
        let key = self.usage_key.ok_or(UsageLogError::Off)?;
        let mut rows = Vec::new();
        let kept = self
            .store
            .read_usage(|seq, stored| rows.push((seq, stored.to_vec())))
            .map_err(UsageLogError::Store)?;
        let mut found = verify(
            rows.iter().map(|(seq, stored)| (*seq, stored.as_slice())),
            &key,
            self.usage_tag_key.as_ref(),
            kept,
        );
        if crate::weakened::is(crate::weakened::Defence::UsageLogChain) {
            // Weakened: the records are counted, nothing is checked.
            found.problems.clear();
            found.problem_count = 0;
        }
        Ok((found, key))
    }

    /// `meter usage verify`'s answer.
    pub fn usage_verify_json(&self) -> Result<Value, UsageLogError> {
        let (found, key) = self.usage_verify()?;
        Ok(json!({
            "intact": found.intact(),
            "records": found.records,
            "head": found.head,
            "public-key": hex::encode(key),
            "problem-count": found.problem_count,
            "problems": found.problems,
        }))
    }

    /// Hands every readable event of the usage log to `each`, in order; how many records could
    /// not be read.
    fn each_usage_event(&self, mut each: impl FnMut(UsageEvent)) -> Result<u64, UsageLogError> {
        if self.usage_key.is_none() {
            return Err(UsageLogError::Off);
        }
        let mut unreadable = 0u64;
        self.store
            .read_usage(|_, stored| match read_record(stored) {
                Some(record) => each(record.event),
                None => unreadable += 1,
            })
            .map_err(UsageLogError::Store)?;
        Ok(unreadable)
    }

    /// A usage report over `[from, to)` (unix ms; `to` defaults to now), with the rules in
    /// force for reservations.
    pub fn usage_report_json(
        &self,
        from_ms: Option<u64>,
        to_ms: Option<u64>,
    ) -> Result<Value, UsageLogError> {
        let to_ms = to_ms.unwrap_or_else(|| self.platform.now_ms().unwrap_or(u64::MAX));
        let rules = self.lock_access().rules();
        let mut builder = usage_report::Builder::new(rules.as_deref(), Window { from_ms, to_ms });
        let unreadable = self.each_usage_event(|event| builder.add(&event))?;
        let mut report = serde_json::to_value(builder.finish()).unwrap_or(Value::Null);
        report["unreadable-records"] = json!(unreadable);
        Ok(report)
    }

    /// The seats the usage log shows (`meter usage seats`): each product counted as this
    /// runtime's licence items count it (a product no item has any more: a seat per grant).
    pub fn usage_seats_json(&self) -> Result<Value, UsageLogError> {
        let counting: HashMap<ProductKey, Counting> = self
            .lock()
            .table
            .items()
            .into_iter()
            .map(|item| (item.entry.product, item.entry.rules.counting))
            .collect();
        let mut events = Vec::new();
        let unreadable = self.each_usage_event(|event| events.push(event))?;
        let history = seat_history(events, |product| {
            counting
                .get(&product)
                .copied()
                .unwrap_or(Counting::UserLimit)
        });
        Ok(json!({"history": history, "unreadable-records": unreadable}))
    }

    /// An attack (harness builds): removes the usage record `seq` as root editing the database
    /// would, leaving the head kept beside the log.
    pub async fn tamper_usage(self: &Arc<Self>, seq: u64) -> Result<Value, UsageLogError> {
        if !crate::harness_build::enabled() {
            return Err(UsageLogError::NotHarnessBuild);
        }
        store::wait(self.store.submit(vec![Change::RemoveUsage(seq)]))
            .await
            .map_err(UsageLogError::Store)?;
        tracing::warn!(seq, "Usage record removed (a staged attack)");
        Ok(json!({"removed": seq}))
    }
}
