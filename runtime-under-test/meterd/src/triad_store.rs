//! A triad member's Raft log and seat ledger, kept in its own redb file: the log entries, the
//! vote, the purged position and the latest snapshot are durable (on disk before openraft is
//! told); the ledger itself lives in memory and is rebuilt at start from the snapshot and the
//! committed entries after it.

use std::fmt::Debug;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::Arc;

use meter_core::seat_ledger::{LedgerOutcome, SeatEvent, SeatLedger};
use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    EntryPayload, LogId, OptionalSend, RaftLogReader, RaftSnapshotBuilder, SnapshotMeta,
    StorageIOError, StoredMembership, Vote,
};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use crate::triad_types::{Member, MemberId, TriadConfig, TriadEntry, TriadStorageError};

/// Log entries by index (JSON).
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("triad-log");
/// Vote, positions and the snapshot (JSON).
const STATE: TableDefinition<&str, &[u8]> = TableDefinition::new("triad-state");

const VOTE: &str = "vote";
const PURGED: &str = "purged";
const COMMITTED: &str = "committed";
const SNAPSHOT: &str = "snapshot";

/// Why the store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum TriadStoreError {
    /// redb refused.
    #[error("Cannot open the triad's database {path}")]
    Open {
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: redb::Error,
    },
    /// A stored value does not decode.
    #[error("The triad's stored {what} is damaged")]
    Damaged {
        /// What.
        what: &'static str,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
}

/// The ledger as applied so far, with where it stands in the log.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Applied {
    last_applied: Option<LogId<MemberId>>,
    membership: StoredMembership<MemberId, Member>,
    ledger: SeatLedger,
}

/// A snapshot as kept: its meta and the serialised [`Applied`].
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<MemberId, Member>,
    data: Vec<u8>,
}

/// The log half of a member's storage.
#[derive(Clone)]
pub struct TriadLog {
    db: Arc<Database>,
    /// Serialises writes (openraft requires them in order).
    writes: Arc<Mutex<()>>,
}

/// The state machine half: the seat ledger.
#[derive(Clone)]
pub struct TriadLedger {
    db: Arc<Database>,
    applied: Arc<Mutex<Applied>>,
    /// What happened to seats, as this member applied the log (a run's history).
    events: Arc<std::sync::Mutex<Vec<SeatEvent>>>,
    /// The members that said they run in a virtual machine, as of the last entry applied.
    guests: Arc<std::sync::Mutex<Vec<u64>>>,
}

fn io_write(e: impl std::error::Error + 'static) -> TriadStorageError {
    StorageIOError::write(&e).into()
}

fn io_read(e: impl std::error::Error + 'static) -> TriadStorageError {
    StorageIOError::read(&e).into()
}

/// Opens (or creates) a member's storage in `path`.
pub fn open(path: &Path) -> Result<(TriadLog, TriadLedger), TriadStoreError> {
    let open_error = |source: redb::Error| TriadStoreError::Open {
        path: path.to_owned(),
        source,
    };
    let db = Database::create(path).map_err(|e| open_error(e.into()))?;
    {
        let txn = db.begin_write().map_err(|e| open_error(e.into()))?;
        txn.open_table(LOG).map_err(|e| open_error(e.into()))?;
        txn.open_table(STATE).map_err(|e| open_error(e.into()))?;
        txn.commit().map_err(|e| open_error(e.into()))?;
    }
    let db = Arc::new(db);
    let mut applied = Applied::default();
    if let Some(bytes) = read_state(&db, SNAPSHOT).map_err(open_error)? {
        let snapshot: StoredSnapshot =
            serde_json::from_slice(&bytes).map_err(|source| TriadStoreError::Damaged {
                what: "snapshot",
                source,
            })?;
        applied =
            serde_json::from_slice(&snapshot.data).map_err(|source| TriadStoreError::Damaged {
                what: "snapshot's ledger",
                source,
            })?;
    }
    Ok((
        TriadLog {
            db: Arc::clone(&db),
            writes: Arc::new(Mutex::new(())),
        },
        TriadLedger {
            db,
            guests: Arc::new(std::sync::Mutex::new(applied.ledger.members_in_guests())),
            applied: Arc::new(Mutex::new(applied)),
            events: Arc::default(),
        },
    ))
}

fn read_state(db: &Database, key: &str) -> Result<Option<Vec<u8>>, redb::Error> {
    let txn = db.begin_read()?;
    let table = txn.open_table(STATE)?;
    Ok(table.get(key)?.map(|v| v.value().to_vec()))
}

fn write_state(
    db: &Database,
    key: &str,
    value: &[u8],
    durability: Durability,
) -> Result<(), redb::Error> {
    let mut txn = db.begin_write()?;
    txn.set_durability(durability)?;
    txn.open_table(STATE)?.insert(key, value)?;
    txn.commit()?;
    Ok(())
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, TriadStorageError> {
    serde_json::from_slice(bytes).map_err(io_read)
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, TriadStorageError> {
    serde_json::to_vec(value).map_err(io_write)
}

impl TriadLog {
    fn state<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<T>, TriadStorageError> {
        read_state(&self.db, key)
            .map_err(io_read)?
            .map(|bytes| decode(&bytes))
            .transpose()
    }

    /// Whether this log holds the entry `id` names (the same index written in the same term
    /// by the same leader), or has compacted the log past it (compacted entries were
    /// committed, and committed entries are the same on every member).
    pub fn holds(&self, id: &LogId<MemberId>) -> Result<bool, TriadStorageError> {
        let txn = self.db.begin_read().map_err(io_read)?;
        let table = txn.open_table(LOG).map_err(io_read)?;
        if let Some(value) = table.get(id.index).map_err(io_read)? {
            return Ok(decode::<TriadEntry>(value.value())?.log_id == *id);
        }
        let purged: Option<LogId<MemberId>> = self.state(PURGED)?;
        Ok(purged.is_some_and(|purged| purged.index >= id.index))
    }

    fn last_entry_id(&self) -> Result<Option<LogId<MemberId>>, TriadStorageError> {
        let txn = self.db.begin_read().map_err(io_read)?;
        let table = txn.open_table(LOG).map_err(io_read)?;
        let last = table.last().map_err(io_read)?;
        last.map(|(_, v)| decode::<TriadEntry>(v.value()).map(|e| e.log_id))
            .transpose()
    }
}

impl RaftLogReader<TriadConfig> for TriadLog {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<TriadEntry>, TriadStorageError> {
        let start = match range.start_bound() {
            Bound::Included(s) => *s,
            Bound::Excluded(s) => s.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let txn = self.db.begin_read().map_err(io_read)?;
        let table = txn.open_table(LOG).map_err(io_read)?;
        let mut entries = Vec::new();
        for item in table.range(start..).map_err(io_read)? {
            let (index, value) = item.map_err(io_read)?;
            if !range.contains(&index.value()) {
                break;
            }
            entries.push(decode(value.value())?);
        }
        Ok(entries)
    }
}

impl RaftLogStorage<TriadConfig> for TriadLog {
    type LogReader = TriadLog;

    async fn get_log_state(&mut self) -> Result<LogState<TriadConfig>, TriadStorageError> {
        let last_purged_log_id: Option<LogId<MemberId>> = self.state(PURGED)?;
        let last_log_id = self.last_entry_id()?.or(last_purged_log_id);
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<MemberId>) -> Result<(), TriadStorageError> {
        let _order = self.writes.lock().await;
        write_state(&self.db, VOTE, &encode(vote)?, Durability::Immediate).map_err(io_write)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<MemberId>>, TriadStorageError> {
        // Read once, at start: a member does not resume a leadership it held before it stopped
        // (the others may have elected another meanwhile, and a stale leader's term only
        // delays the election); it stands for election again like any member.
        Ok(self.state::<Vote<MemberId>>(VOTE)?.map(|mut vote| {
            vote.committed = false;
            vote
        }))
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<MemberId>>,
    ) -> Result<(), TriadStorageError> {
        // Not synced on its own: the committed position only saves re-applying entries after a
        // restart, and goes to disk with the next synced write.
        let _order = self.writes.lock().await;
        write_state(&self.db, COMMITTED, &encode(&committed)?, Durability::None).map_err(io_write)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<MemberId>>, TriadStorageError> {
        Ok(self.state::<Option<LogId<MemberId>>>(COMMITTED)?.flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TriadConfig>,
    ) -> Result<(), TriadStorageError>
    where
        I: IntoIterator<Item = TriadEntry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let _order = self.writes.lock().await;
        let mut txn = self.db.begin_write().map_err(io_write)?;
        // openraft 0.9 waits for each append before the next: one synced commit each (a
        // batch of commands is one entry, so concurrent askers share it).
        txn.set_durability(Durability::Immediate)
            .map_err(io_write)?;
        {
            let mut table = txn.open_table(LOG).map_err(io_write)?;
            for entry in entries {
                table
                    .insert(entry.log_id.index, encode(&entry)?.as_slice())
                    .map_err(io_write)?;
            }
        }
        txn.commit().map_err(io_write)?;
        // Durable now: the commit above waited for the disk.
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<MemberId>) -> Result<(), TriadStorageError> {
        let _order = self.writes.lock().await;
        let mut txn = self.db.begin_write().map_err(io_write)?;
        txn.set_durability(Durability::Immediate)
            .map_err(io_write)?;
        txn.open_table(LOG)
            .map_err(io_write)?
            .retain_in(log_id.index.., |_, _| false)
            .map_err(io_write)?;
        txn.commit().map_err(io_write)
    }

    async fn purge(&mut self, log_id: LogId<MemberId>) -> Result<(), TriadStorageError> {
        let _order = self.writes.lock().await;
        let mut txn = self.db.begin_write().map_err(io_write)?;
        txn.set_durability(Durability::Immediate)
            .map_err(io_write)?;
        txn.open_table(STATE)
            .map_err(io_write)?
            .insert(PURGED, encode(&Some(log_id))?.as_slice())
            .map_err(io_write)?;
        txn.open_table(LOG)
            .map_err(io_write)?
            .retain_in(..=log_id.index, |_, _| false)
            .map_err(io_write)?;
        txn.commit().map_err(io_write)
    }
}

impl TriadLedger {
    /// Seats of `product` held now on this member's copy of the ledger.
    pub async fn in_use(&self, product: u64) -> u32 {
        self.applied.lock().await.ledger.in_use(product)
    }

    /// How many seats `holder` holds on this member's copy of the ledger.
    pub async fn held_by(&self, holder: &str) -> usize {
        self.applied
            .lock()
            .await
            .ledger
            .leases()
            .values()
            .filter(|lease| lease.holder == holder)
            .count()
    }

    /// Every lease on this member's copy of the ledger, by number, with its holder.
    pub async fn lease_holders(&self) -> Vec<(u64, String)> {
        self.applied
            .lock()
            .await
            .ledger
            .leases()
            .iter()
            .map(|(lease, held)| (*lease, held.holder.clone()))
            .collect()
    }

    /// The log position of the last entry this member's ledger applied.
    pub async fn applied(&self) -> u64 {
        self.applied.lock().await.ledger.applied()
    }

    /// The latest time this member's ledger has seen.
    pub async fn now_ms(&self) -> u64 {
        self.applied.lock().await.ledger.now_ms()
    }

    /// What happened to seats so far, as this member applied the log.
    pub fn events(&self) -> Vec<SeatEvent> {
        self.events.lock().map(|e| e.clone()).unwrap_or_default()
    }

    /// The members that said they run in a virtual machine (as this member's ledger knows).
    pub fn members_in_guests(&self) -> Vec<u64> {
        self.guests.lock().map(|g| g.clone()).unwrap_or_default()
    }

    fn publish_guests(&self, ledger: &SeatLedger) {
        if let Ok(mut guests) = self.guests.lock() {
            *guests = ledger.members_in_guests();
        }
    }
}

impl RaftSnapshotBuilder<TriadConfig> for TriadLedger {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TriadConfig>, TriadStorageError> {
        // Held until the snapshot is stored: an installed snapshot cannot land in between and
        // be overwritten by this older one.
        let guard = self.applied.lock().await;
        let applied = guard.clone();
        let data = encode(&applied)?;
        let snapshot_id = match applied.last_applied {
            Some(last) => format!("{}-{}", last.leader_id, last.index),
            None => "empty".to_owned(),
        };
        let meta = SnapshotMeta {
            last_log_id: applied.last_applied,
            last_membership: applied.membership.clone(),
            snapshot_id,
        };
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: data.clone(),
        };
        write_state(&self.db, SNAPSHOT, &encode(&stored)?, Durability::Immediate)
            .map_err(io_write)?;
        drop(guard);
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TriadConfig> for TriadLedger {
    type SnapshotBuilder = TriadLedger;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<MemberId>>, StoredMembership<MemberId, Member>), TriadStorageError>
    {
        let applied = self.applied.lock().await;
        Ok((applied.last_applied, applied.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<LedgerOutcome>, TriadStorageError>
    where
        I: IntoIterator<Item = TriadEntry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut applied = self.applied.lock().await;
        let mut answers = Vec::new();
        let mut happened = Vec::new();
        for entry in entries {
            applied.last_applied = Some(entry.log_id);
            match entry.payload {
                EntryPayload::Blank => answers.push(LedgerOutcome::Nothing),
                EntryPayload::Normal(command) => {
                    let (outcome, events) = applied.ledger.apply_at(entry.log_id.index, &command);
                    happened.extend(events);
                    answers.push(outcome);
                }
                EntryPayload::Membership(membership) => {
                    applied.membership = StoredMembership::new(Some(entry.log_id), membership);
                    answers.push(LedgerOutcome::Nothing);
                }
            }
        }
        if let Ok(mut events) = self.events.lock() {
            events.extend(happened);
        }
        self.publish_guests(&applied.ledger);
        Ok(answers)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, TriadStorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<MemberId, Member>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), TriadStorageError> {
        let data = snapshot.into_inner();
        let mut installed: Applied = decode(&data)?;
        installed.last_applied = meta.last_log_id;
        installed.membership = meta.last_membership.clone();
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: encode(&installed)?,
        };
        let mut applied = self.applied.lock().await;
        write_state(&self.db, SNAPSHOT, &encode(&stored)?, Durability::Immediate)
            .map_err(io_write)?;
        *applied = installed;
        self.publish_guests(&applied.ledger);
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TriadConfig>>, TriadStorageError> {
        let Some(bytes) = read_state(&self.db, SNAPSHOT).map_err(io_read)? else {
            return Ok(None);
        };
        let stored: StoredSnapshot = decode(&bytes)?;
        Ok(Some(Snapshot {
            meta: stored.meta,
            snapshot: Box::new(Cursor::new(stored.data)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, EntryPayload};

    use super::*;

    fn id(term: u64, index: u64) -> LogId<MemberId> {
        LogId::new(CommittedLeaderId::new(term, 1), index)
    }

    #[tokio::test]
    async fn a_log_holds_an_entry_only_as_written_in_the_same_term() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _ledger) = open(&dir.path().join("triad.redb")).unwrap();
        let txn = log.db.begin_write().unwrap();
        {
            let mut table = txn.open_table(LOG).unwrap();
            for log_id in [id(1, 1), id(1, 2), id(2, 3)] {
                let entry = TriadEntry {
                    log_id,
                    payload: EntryPayload::Blank,
                };
                table
                    .insert(log_id.index, encode(&entry).unwrap().as_slice())
                    .unwrap();
            }
        }
        txn.commit().unwrap();
        assert!(log.holds(&id(2, 3)).unwrap());
        // An old copy's entry at the position another term's entry was committed at.
        assert!(!log.holds(&id(3, 3)).unwrap());
        assert!(!log.holds(&id(3, 4)).unwrap(), "past its end");
        log.purge(id(1, 2)).await.unwrap();
        assert!(
            log.holds(&id(1, 1)).unwrap(),
            "compacted: committed, the same everywhere"
        );
        assert!(log.holds(&id(2, 3)).unwrap());
    }
}
