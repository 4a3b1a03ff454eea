//! Durable daemon state in redb, written by one thread that commits queued changes in batches.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use meter_core::usage::{EncodedEvent, LogHead, Seal, TagKey, UsageSealer, record_hash};
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
};
use tokio::sync::oneshot;

const GRANTS: TableDefinition<u64, &[u8]> = TableDefinition::new("grants");
const LICENCES: TableDefinition<&str, &[u8]> = TableDefinition::new("licences");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// The usage log's records, but for the newest few.
const USAGE: TableDefinition<u64, &[u8]> = TableDefinition::new("usage");
/// The usage log's newest records (up to [`TAIL_RECORDS`] before they move to [`USAGE`]) and
/// its head: a table of one page, so that a commit appending records writes that page, not the
/// path from the root of a deep table to its last leaf.
const USAGE_TAIL: TableDefinition<u64, &[u8]> = TableDefinition::new("usage-tail");

/// Records the tail holds before they move to [`USAGE`] together.
const TAIL_RECORDS: u64 = 32;

/// Metadata key of the usage log's secret key.
pub const USAGE_KEY_KEY: &str = "usage-key";

/// Metadata key where older states kept the usage log's head (moved to [`HEAD_ROW`] at open).
const OLD_USAGE_HEAD_KEY: &str = "usage-head";

/// The tail's row that keeps the log's head beside the records (see `meter_core::usage`): the
/// last key, on the page the records are appended to.
const HEAD_ROW: u64 = u64::MAX;

/// A failure of the state database.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database file could not be opened or created.
    #[error("Cannot open state database {path}")]
    Open {
        /// The database file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: redb::DatabaseError,
    },
    /// A read or write failed.
    #[error("State database error")]
    Database(#[source] redb::Error),
    /// The writer thread is gone.
    #[error("State writer stopped")]
    WriterGone,
    /// The usage log has no place left for another record.
    #[error("Usage log full")]
    UsageLogFull,
}

fn db_error(e: impl Into<redb::Error>) -> StoreError {
    StoreError::Database(e.into())
}

/// One change to the durable state.
#[derive(Debug, Clone)]
pub enum Change {
    /// Stores a grant record under its handle.
    PutGrant(u64, Vec<u8>),
    /// Removes a grant record.
    DeleteGrant(u64),
    /// Stores an installed licence file under its id.
    PutLicence(String, Vec<u8>),
    /// Removes an installed licence.
    DeleteLicence(String),
    /// Stores a metadata value.
    PutMeta(String, Vec<u8>),
    /// Removes a metadata value.
    DeleteMeta(String),
    /// Appends an event to the usage log: sealed (placed, chained, tagged or signed) as it is
    /// written.
    AppendUsage(EncodedEvent),
    /// Removes a usage record, leaving the head: only a harness build's log-tamper attack.
    RemoveUsage(u64),
}

/// Everything stored, as read at start-up.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Grant records by handle.
    pub grants: BTreeMap<u64, Vec<u8>>,
    /// Installed licence files by id.
    pub licences: BTreeMap<String, Vec<u8>>,
    /// Metadata values by key.
    pub meta: BTreeMap<String, Vec<u8>>,
}

struct Batch {
    changes: Vec<Change>,
    done: Option<oneshot::Sender<Result<(), String>>>,
}

/// The longest changes queued with [`Store::submit_eventually`] wait before they are written,
/// when no change someone waits for comes after them.
pub const EVENTUAL_SYNC: Duration = Duration::from_millis(20);

/// Most batches written in one commit.
const MAX_GROUP: usize = 4096;

/// The longest a change someone waits for is held back for the changes announced with
/// [`Store::expect_change`] that are still being prepared, so they share its commit and sync.
pub const GATHER_FOR_ANNOUNCED: Duration = Duration::from_micros(500);

/// The longest the usage log goes without a signature while records are written: the tag every
/// commit ends with costs a microsecond, a signature tens, so only one commit in this interval
/// (and the last one before a stop) is signed.
pub const SIGN_USAGE_EVERY: Duration = Duration::from_secs(1);

/// The state database and its writer thread.
#[derive(Debug)]
pub struct Store {
    queue: Arc<Queue>,
    path: PathBuf,
    db: Arc<Database>,
    /// Seals usage events; none until [`Store::start_usage_log`] (events are then dropped).
    sealer: Arc<Mutex<Option<UsageSealer>>>,
    /// The usage log's head when the store was opened.
    opened_head: LogHead,
    /// The writer thread (joined when the store is dropped).
    writer: Option<thread::JoinHandle<()>>,
}

/// Batches on their way to the writer thread.
#[derive(Default)]
struct Queue {
    state: Mutex<QueueState>,
    /// Wakes the writer: a batch someone waits for, a first batch, or the store closing.
    wake: Condvar,
}

#[derive(Default)]
struct QueueState {
    batches: Vec<Batch>,
    /// Set when the store is dropped: the writer writes what is queued and stops.
    closed: bool,
    /// The writer is gone (it panicked): batches are refused.
    writer_gone: bool,
    /// Changes announced and not yet queued (see [`Store::expect_change`]).
    announced: usize,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue").finish_non_exhaustive()
    }
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a batch; gives it back if the writer is gone.
    fn push(&self, batch: Batch) -> Result<(), Batch> {
        let mut state = self.lock();
        if state.writer_gone {
            return Err(batch);
        }
        // A batch nobody waits for behind others needs no wake-up: the writer comes for it
        // within EVENTUAL_SYNC anyway, and one wake-up fewer per change is the point.
        let wake = batch.done.is_some() || state.batches.is_empty();
        state.batches.push(batch);
        drop(state);
        if wake {
            self.wake.notify_one();
        }
        Ok(())
    }
}

/// A change being prepared; while it lives, the writer holds a waited commit back a little for it.
#[derive(Debug)]
pub struct AnnouncedChange {
    queue: Arc<Queue>,
}

impl Drop for AnnouncedChange {
    fn drop(&mut self) {
        let mut state = self.queue.lock();
        state.announced = state.announced.saturating_sub(1);
        let last = state.announced == 0;
        drop(state);
        if last {
            self.queue.wake.notify_one();
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.queue.lock().closed = true;
        self.queue.wake.notify_one();
        // What is queued is written and the database closed before the store is gone, so it
        // can be opened again at once.
        if let Some(writer) = self.writer.take()
            && writer.thread().id() != thread::current().id()
        {
            let _ = writer.join();
        }
    }
}

impl Store {
    /// Opens (or creates) the database and returns it with its current contents.
    pub fn open(path: &Path) -> Result<(Store, Snapshot), StoreError> {
        let db = Database::create(path).map_err(|source| StoreError::Open {
            path: path.to_owned(),
            source,
        })?;
        {
            let txn = db.begin_write().map_err(db_error)?;
            txn.open_table(GRANTS).map_err(db_error)?;
            txn.open_table(LICENCES).map_err(db_error)?;
            txn.open_table(USAGE).map_err(db_error)?;
            let mut meta = txn.open_table(META).map_err(db_error)?;
            let mut tail = txn.open_table(USAGE_TAIL).map_err(db_error)?;
            move_old_head(&mut meta, &mut tail)?;
            drop((meta, tail));
            txn.commit().map_err(db_error)?;
        }
        let snapshot = read_all(&db)?;
        let opened_head = usage_head(&db)?;
        let db = Arc::new(db);
        let queue = Arc::new(Queue::default());
        let sealer = Arc::new(Mutex::new(None));
        let writer = Writer {
            db: Arc::clone(&db),
            sealer: Arc::clone(&sealer),
            last_signed: std::cell::Cell::new(None),
        };
        let writer_queue = Arc::clone(&queue);
        let writer = thread::Builder::new()
            .name("meterd-store".into())
            .spawn(move || write_loop(&writer, &writer_queue))
            .map_err(|e| StoreError::Database(redb::Error::Io(e)))?;
        Ok((
            Store {
                queue,
                path: path.to_owned(),
                db,
                sealer,
                opened_head,
                writer: Some(writer),
            },
            snapshot,
        ))
    }

    /// Starts sealing usage events with the 32-byte secret key; returns its public key and the
    /// key its tags check under.
    pub fn start_usage_log(&self, secret: &[u8; 32]) -> ([u8; 32], TagKey) {
        let mut sealer = self.sealer.lock().unwrap_or_else(|e| e.into_inner());
        let head = sealer.as_ref().map_or(self.opened_head, UsageSealer::head);
        let started = UsageSealer::new(secret, head);
        let keys = (started.public_key(), started.tag_key());
        *sealer = Some(started);
        keys
    }

    /// Reads the usage log as committed: each record (place, stored form) in place order, then
    /// the head kept beside it.
    pub fn read_usage(
        &self,
        mut each: impl FnMut(u64, &[u8]),
    ) -> Result<Option<LogHead>, StoreError> {
        let txn = self.db.begin_read().map_err(db_error)?;
        let usage = txn.open_table(USAGE).map_err(db_error)?;
        let tail = txn.open_table(USAGE_TAIL).map_err(db_error)?;
        for table in [&usage, &tail] {
            for row in table.range(..HEAD_ROW).map_err(db_error)? {
                let (k, v) = row.map_err(db_error)?;
                each(k.value(), v.value());
            }
        }
        let kept = tail
            .get(HEAD_ROW)
            .map_err(db_error)?
            .and_then(|v| LogHead::from_bytes(v.value()));
        Ok(kept)
    }

    /// Queues changes; they are applied in queue order. Await the receiver for durability.
    pub fn submit(&self, changes: Vec<Change>) -> oneshot::Receiver<Result<(), String>> {
        let (done, receiver) = oneshot::channel();
        if let Err(batch) = self.queue.push(Batch {
            changes,
            done: Some(done),
        }) && let Some(done) = batch.done
        {
            let _ = done.send(Err("state writer stopped".into()));
        }
        receiver
    }

    /// Announces a change about to be submitted (a request being handled): until the returned
    /// value is dropped (after its submit, or when it turns out to change nothing), a commit
    /// someone waits for is held back up to [`GATHER_FOR_ANNOUNCED`] so both share one sync.
    /// Under concurrent load that turns one sync per request into one per group; alone, a
    /// request announces nothing beside its own submit and waits no longer.
    pub fn expect_change(&self) -> AnnouncedChange {
        self.queue.lock().announced += 1;
        AnnouncedChange {
            queue: Arc::clone(&self.queue),
        }
    }

    /// Queues changes nobody waits for: applied in queue order, on disk within [`EVENTUAL_SYNC`]
    /// (sooner when changes someone waits for follow), so a busy runtime commits and syncs once
    /// per interval, not once per change.
    pub fn submit_eventually(&self, changes: Vec<Change>) {
        let batch = Batch {
            changes,
            done: None,
        };
        if self.queue.push(batch).is_err() {
            tracing::error!("State writer stopped: changes not recorded");
        }
    }

    /// Queues changes and waits until they are on disk.
    pub async fn commit(&self, changes: Vec<Change>) -> Result<(), StoreError> {
        wait(self.submit(changes)).await
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Waits for a submitted batch to be durable.
pub async fn wait(receiver: oneshot::Receiver<Result<(), String>>) -> Result<(), StoreError> {
    match receiver.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(message)) => {
            tracing::error!(%message, "State commit failed");
            Err(StoreError::WriterGone)
        }
        Err(_) => Err(StoreError::WriterGone),
    }
}

fn read_all(db: &Database) -> Result<Snapshot, StoreError> {
    let txn = db.begin_read().map_err(db_error)?;
    let mut snapshot = Snapshot::default();
    for row in txn
        .open_table(GRANTS)
        .map_err(db_error)?
        .iter()
        .map_err(db_error)?
    {
        let (k, v) = row.map_err(db_error)?;
        snapshot.grants.insert(k.value(), v.value().to_vec());
    }
    for row in txn
        .open_table(LICENCES)
        .map_err(db_error)?
        .iter()
        .map_err(db_error)?
    {
        let (k, v) = row.map_err(db_error)?;
        snapshot
            .licences
            .insert(k.value().to_owned(), v.value().to_vec());
    }
    for row in txn
        .open_table(META)
        .map_err(db_error)?
        .iter()
        .map_err(db_error)?
    {
        let (k, v) = row.map_err(db_error)?;
        snapshot
            .meta
            .insert(k.value().to_owned(), v.value().to_vec());
    }
    Ok(snapshot)
}

/// A usage table as the writer opens it.
type UsageTable<'t> = redb::Table<'t, u64, &'static [u8]>;

/// Moves the head an older state kept in the metadata to the tail's [`HEAD_ROW`].
fn move_old_head(
    meta: &mut redb::Table<'_, &'static str, &'static [u8]>,
    tail: &mut UsageTable<'_>,
) -> Result<(), StoreError> {
    let Some(old) = meta.remove(OLD_USAGE_HEAD_KEY).map_err(db_error)? else {
        return Ok(());
    };
    let old = old.value().to_vec();
    if tail.get(HEAD_ROW).map_err(db_error)?.is_none() {
        tail.insert(HEAD_ROW, old.as_slice()).map_err(db_error)?;
    }
    Ok(())
}

/// Moves the tail's records to the rest of the log.
fn move_tail(tail: &mut UsageTable<'_>, usage: &mut UsageTable<'_>) -> Result<(), StoreError> {
    let mut moved = Vec::new();
    for row in tail.range(..HEAD_ROW).map_err(db_error)? {
        let (k, v) = row.map_err(db_error)?;
        moved.push((k.value(), v.value().to_vec()));
    }
    for (seq, stored) in &moved {
        usage.insert(seq, stored.as_slice()).map_err(db_error)?;
        tail.remove(seq).map_err(db_error)?;
    }
    Ok(())
}

/// Where the log goes on: the head kept beside it, or its last record when none is kept.
fn usage_head(db: &Database) -> Result<LogHead, StoreError> {
    let txn = db.begin_read().map_err(db_error)?;
    let tail = txn.open_table(USAGE_TAIL).map_err(db_error)?;
    if let Some(head) = tail
        .get(HEAD_ROW)
        .map_err(db_error)?
        .and_then(|v| LogHead::from_bytes(v.value()))
    {
        return Ok(head);
    }
    let mut last = tail.range(..HEAD_ROW).map_err(db_error)?.next_back();
    if last.is_none() {
        let usage = txn.open_table(USAGE).map_err(db_error)?;
        last = usage.range(..HEAD_ROW).map_err(db_error)?.next_back();
    }
    Ok(match last.transpose().map_err(db_error)? {
        Some((k, v)) => LogHead {
            seq: k.value(),
            hash: record_hash(v.value()),
        },
        None => LogHead::default(),
    })
}

/// What the writer thread writes with.
struct Writer {
    db: Arc<Database>,
    sealer: Arc<Mutex<Option<UsageSealer>>>,
    /// When the writer last signed a usage record (none yet: the first commit signs).
    last_signed: std::cell::Cell<Option<Instant>>,
}

fn write_loop(writer: &Writer, queue: &Queue) {
    /// Marks the queue when the writer stops, even by a panic, so no one waits on it forever.
    struct Gone<'q>(&'q Queue);
    impl Drop for Gone<'_> {
        fn drop(&mut self) {
            let mut state = self.0.lock();
            state.writer_gone = true;
            for batch in state.batches.drain(..) {
                if let Some(done) = batch.done {
                    let _ = done.send(Err("state writer stopped".into()));
                }
            }
        }
    }
    let _gone = Gone(queue);
    // Batches nobody waits for gather for up to EVENTUAL_SYNC and go to disk in one commit (and
    // one sync); a batch someone waits for is written at once with everything queued before it.
    // A waited batch is held back up to GATHER_FOR_ANNOUNCED while announced changes are still
    // on their way, so that concurrent requests share one commit.
    let mut oldest_unwritten: Option<Instant> = None;
    let mut first_waited: Option<Instant> = None;
    loop {
        let (group, stopping) = {
            let mut state = queue.lock();
            loop {
                if state.closed {
                    break;
                }
                if !state.batches.is_empty() {
                    let since = *oldest_unwritten.get_or_insert_with(Instant::now);
                    let someone_waits = state.batches.iter().any(|b| b.done.is_some());
                    let left = EVENTUAL_SYNC.saturating_sub(since.elapsed());
                    if state.batches.len() >= MAX_GROUP || left.is_zero() {
                        break;
                    }
                    // Someone waits: only announced changes still on their way hold it back.
                    let timeout = if someone_waits {
                        let waited = *first_waited.get_or_insert_with(Instant::now);
                        let gather = GATHER_FOR_ANNOUNCED.saturating_sub(waited.elapsed());
                        if state.announced == 0 || gather.is_zero() {
                            break;
                        }
                        gather
                    } else {
                        left
                    };
                    state = queue
                        .wake
                        .wait_timeout(state, timeout)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                } else {
                    state = queue.wake.wait(state).unwrap_or_else(|e| e.into_inner());
                }
            }
            (std::mem::take(&mut state.batches), state.closed)
        };
        oldest_unwritten = None;
        first_waited = None;
        if !group.is_empty() {
            let result = writer.apply(&group, stopping).map_err(|e| e.to_string());
            if let Err(message) = &result {
                tracing::error!(%message, "State commit failed");
            }
            for batch in group {
                if let Some(done) = batch.done {
                    let _ = done.send(result.clone());
                }
            }
        }
        if stopping {
            return;
        }
    }
}

/// The net effect of a group of changes: the last value (`None` = removed) of every key it
/// touches. One commit makes the whole group visible at once, so the states in between (a grant
/// stored and released within the same commit) never need to reach the disk.
#[derive(Default)]
struct NetChanges<'a> {
    grants: BTreeMap<u64, Option<&'a [u8]>>,
    licences: BTreeMap<&'a str, Option<&'a [u8]>>,
    meta: BTreeMap<&'a str, Option<&'a [u8]>>,
    /// Usage events to append, in queue order.
    usage: Vec<&'a EncodedEvent>,
    /// Usage records to remove (a tamper attack).
    usage_removed: Vec<u64>,
}

impl<'a> NetChanges<'a> {
    fn of(group: &'a [Batch]) -> Self {
        let mut net = NetChanges::default();
        for change in group.iter().flat_map(|b| &b.changes) {
            match change {
                Change::PutGrant(handle, bytes) => {
                    net.grants.insert(*handle, Some(bytes));
                }
                Change::DeleteGrant(handle) => {
                    net.grants.insert(*handle, None);
                }
                Change::PutLicence(id, bytes) => {
                    net.licences.insert(id, Some(bytes));
                }
                Change::DeleteLicence(id) => {
                    net.licences.insert(id, None);
                }
                Change::PutMeta(key, bytes) => {
                    net.meta.insert(key, Some(bytes));
                }
                Change::DeleteMeta(key) => {
                    net.meta.insert(key, None);
                }
                Change::AppendUsage(event) => net.usage.push(event),
                Change::RemoveUsage(seq) => net.usage_removed.push(*seq),
            }
        }
        net
    }
}

impl Writer {
    /// Writes a group in one commit; usage events are sealed here, in commit order. The last
    /// record is signed when the last signature is [`SIGN_USAGE_EVERY`] old, or the writer is
    /// stopping; tagged otherwise.
    fn apply(&self, group: &[Batch], stopping: bool) -> Result<(), StoreError> {
        let net = NetChanges::of(group);
        let mut sealer = self.sealer.lock().unwrap_or_else(|e| e.into_inner());
        let head_before = sealer.as_ref().map(UsageSealer::head);
        let sign = stopping
            || self
                .last_signed
                .get()
                .is_none_or(|at| at.elapsed() >= SIGN_USAGE_EVERY);
        let last_seal = if sign { Seal::Signed } else { Seal::Tagged };
        let result = apply(&self.db, &net, sealer.as_mut(), last_seal);
        match &result {
            Err(_) => {
                if let (Some(sealer), Some(head)) = (sealer.as_mut(), head_before) {
                    // Nothing of the group was written: the next record follows the last one.
                    sealer.rewind(head);
                }
            }
            Ok(()) if sign && sealer.is_some() && !net.usage.is_empty() => {
                self.last_signed.set(Some(Instant::now()));
            }
            Ok(()) => {}
        }
        result
    }
}

fn apply(
    db: &Database,
    net: &NetChanges<'_>,
    sealer: Option<&mut UsageSealer>,
    last_seal: Seal,
) -> Result<(), StoreError> {
    let mut txn = db.begin_write().map_err(db_error)?;
    txn.set_durability(Durability::Immediate)
        .map_err(|e| StoreError::Database(redb::Error::Corrupted(e.to_string())))?;
    {
        let mut grants = txn.open_table(GRANTS).map_err(db_error)?;
        for (handle, value) in &net.grants {
            match value {
                Some(bytes) => grants.insert(handle, *bytes).map(drop),
                None => grants.remove(handle).map(drop),
            }
            .map_err(db_error)?;
        }
        let mut licences = txn.open_table(LICENCES).map_err(db_error)?;
        for (id, value) in &net.licences {
            match value {
                Some(bytes) => licences.insert(*id, *bytes).map(drop),
                None => licences.remove(*id).map(drop),
            }
            .map_err(db_error)?;
        }
        let mut meta = txn.open_table(META).map_err(db_error)?;
        for (key, value) in &net.meta {
            match value {
                Some(bytes) => meta.insert(*key, *bytes).map(drop),
                None => meta.remove(*key).map(drop),
            }
            .map_err(db_error)?;
        }
        let mut usage = txn.open_table(USAGE).map_err(db_error)?;
        let mut tail = txn.open_table(USAGE_TAIL).map_err(db_error)?;
        for seq in &net.usage_removed {
            usage.remove(seq).map_err(db_error)?;
            tail.remove(seq).map_err(db_error)?;
        }
        match sealer {
            Some(sealer) if !net.usage.is_empty() => {
                // A commit of more records than the tail holds writes them to the rest at once.
                let past_tail = net.usage.len() as u64 >= TAIL_RECORDS;
                if past_tail {
                    move_tail(&mut tail, &mut usage)?;
                }
                let last = net.usage.len() - 1;
                for (i, event) in net.usage.iter().enumerate() {
                    // The last record of the commit is sealed; the chain covers the rest.
                    let seal = if i == last { last_seal } else { Seal::Chained };
                    let (seq, stored) = sealer.seal(event, seal);
                    if seq == HEAD_ROW {
                        return Err(StoreError::UsageLogFull);
                    }
                    if past_tail { &mut usage } else { &mut tail }
                        .insert(seq, stored.as_slice())
                        .map_err(db_error)?;
                }
                tail.insert(HEAD_ROW, sealer.head().to_bytes().as_slice())
                    .map_err(db_error)?;
                // The head's row and the records.
                if tail.len().map_err(db_error)? > TAIL_RECORDS {
                    move_tail(&mut tail, &mut usage)?;
                }
            }
            Some(_) => {}
            None if !net.usage.is_empty() => {
                tracing::warn!(
                    events = net.usage.len(),
                    "Usage log off: events not recorded"
                );
            }
            None => {}
        }
    }
    txn.commit().map_err(db_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_group_commits_the_last_value_of_every_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meterd.redb");
        {
            let (store, _) = Store::open(&path).unwrap();
            store
                .commit(vec![Change::PutGrant(7, b"old".to_vec())])
                .await
                .unwrap();
            // Nobody waits for these: they gather into one group with the waited batch below.
            store.submit_eventually(vec![
                Change::PutGrant(1, b"one".to_vec()),
                Change::PutMeta("next-handle".into(), 2u64.to_le_bytes().to_vec()),
            ]);
            store.submit_eventually(vec![
                Change::PutGrant(2, b"two".to_vec()),
                Change::PutMeta("next-handle".into(), 3u64.to_le_bytes().to_vec()),
            ]);
            store.submit_eventually(vec![Change::DeleteGrant(1), Change::DeleteGrant(7)]);
            store.submit_eventually(vec![Change::PutGrant(7, b"new".to_vec())]);
            store
                .commit(vec![
                    Change::PutMeta("x".into(), b"y".to_vec()),
                    Change::DeleteMeta("x".into()),
                ])
                .await
                .unwrap();
        }
        let snapshot = reopen(&path).await;
        assert_eq!(snapshot.grants.keys().copied().collect::<Vec<_>>(), [2, 7]);
        assert_eq!(snapshot.grants[&7], b"new");
        assert_eq!(snapshot.meta["next-handle"], 3u64.to_le_bytes());
        assert!(!snapshot.meta.contains_key("x"));
    }

    fn usage_event(n: u64) -> Change {
        Change::AppendUsage(EncodedEvent::of(&meter_core::usage::UsageEvent {
            at_ms: n,
            kind: meter_core::usage::UsageKind::Grant,
            product: meter_core::allocation::ProductKey { firm: 1, code: 2 },
            handle: n,
            user: None,
            machine: "m".into(),
            session: None,
            client_name: None,
            address: None,
            in_use: 1,
            held_ms: None,
        }))
    }

    /// Verifies the store's usage log with the public key alone, or also the tags.
    fn verify_usage(
        store: &Store,
        public: &[u8; 32],
        tag: Option<&TagKey>,
    ) -> meter_core::usage::Verification {
        let mut rows = Vec::new();
        let kept = store
            .read_usage(|seq, stored| rows.push((seq, stored.to_vec())))
            .unwrap();
        meter_core::usage::verify(
            rows.iter().map(|(k, v)| (*k, v.as_slice())),
            public,
            tag,
            kept,
        )
    }

    #[tokio::test]
    async fn commits_are_tagged_the_first_and_the_last_before_a_stop_signed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meterd.redb");
        let (public, tag) = {
            let (store, _) = Store::open(&path).unwrap();
            let (public, tag) = store.start_usage_log(&[5; 32]);
            store
                .commit(vec![usage_event(1), usage_event(2)])
                .await
                .unwrap();
            store.commit(vec![usage_event(3)]).await.unwrap();
            store.commit(vec![usage_event(4)]).await.unwrap();
            // Records 3 and 4 end commits within a second of the signed one: tagged only.
            assert!(verify_usage(&store, &public, Some(&tag)).intact());
            assert_eq!(
                verify_usage(&store, &public, None).problems,
                [meter_core::usage::LogProblem::UnsignedTail { from: 3 }]
            );
            // Queued when the store stops: written in a signed commit.
            store.submit_eventually(vec![usage_event(5)]);
            (public, tag)
        };
        let (store, _) = open_again(&path).await;
        let found = verify_usage(&store, &public, None);
        assert!(found.intact(), "{found:?}");
        assert_eq!(found.records, 5);
        assert!(verify_usage(&store, &public, Some(&tag)).intact());
    }

    #[tokio::test]
    async fn a_log_longer_than_its_tail_reads_in_order_and_goes_on_after_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meterd.redb");
        let (public, tag) = {
            let (store, _) = Store::open(&path).unwrap();
            let keys = store.start_usage_log(&[7; 32]);
            for first in (1..=100).step_by(5) {
                store
                    .commit((first..first + 5).map(usage_event).collect())
                    .await
                    .unwrap();
            }
            // More than the tail holds, in one commit.
            store
                .commit((101..=140).map(usage_event).collect())
                .await
                .unwrap();
            keys
        };
        let (store, _) = open_again(&path).await;
        store.start_usage_log(&[7; 32]);
        store.commit(vec![usage_event(141)]).await.unwrap();
        let mut places = Vec::new();
        let kept = store.read_usage(|seq, _| places.push(seq)).unwrap();
        assert_eq!(places, (1..=141).collect::<Vec<_>>());
        assert_eq!(kept.map(|h| h.seq), Some(141));
        let found = verify_usage(&store, &public, Some(&tag));
        assert!(found.intact(), "{found:?}");
        // A record removed from the moved part, and the last from the tail: both found.
        store
            .commit(vec![Change::RemoveUsage(10), Change::RemoveUsage(141)])
            .await
            .unwrap();
        let found = verify_usage(&store, &public, Some(&tag));
        assert_eq!(found.records, 139);
        use meter_core::usage::LogProblem::Missing;
        assert!(
            found.problems.contains(&Missing { from: 10, to: 11 }),
            "{found:?}"
        );
        assert!(
            found
                .problems
                .iter()
                .any(|p| matches!(p, meter_core::usage::LogProblem::HeadMismatch { .. })),
            "{found:?}"
        );
    }

    #[tokio::test]
    async fn an_older_state_keeps_its_log_head_and_goes_on_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meterd.redb");
        let (public, tag) = {
            let (store, _) = Store::open(&path).unwrap();
            let keys = store.start_usage_log(&[6; 32]);
            store
                .commit(vec![usage_event(1), usage_event(2)])
                .await
                .unwrap();
            keys
        };
        let (store, _) = open_again(&path).await;
        let head = store.read_usage(|_, _| {}).unwrap().expect("a head");
        assert_eq!(head.seq, 2);
        drop(store);
        // As older states kept it: the head in the metadata, no head row.
        loop {
            let Ok(db) = Database::create(&path) else {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            };
            let txn = db.begin_write().unwrap();
            txn.open_table(USAGE_TAIL)
                .unwrap()
                .remove(HEAD_ROW)
                .unwrap();
            txn.open_table(META)
                .unwrap()
                .insert(OLD_USAGE_HEAD_KEY, head.to_bytes().as_slice())
                .unwrap();
            txn.commit().unwrap();
            break;
        }
        let (store, snapshot) = Store::open(&path).unwrap();
        assert!(!snapshot.meta.contains_key(OLD_USAGE_HEAD_KEY));
        store.start_usage_log(&[6; 32]);
        store.commit(vec![usage_event(3)]).await.unwrap();
        let mut places = Vec::new();
        let kept = store.read_usage(|seq, _| places.push(seq)).unwrap();
        assert_eq!(places, [1, 2, 3]);
        assert_eq!(kept.map(|h| h.seq), Some(3));
        let found = verify_usage(&store, &public, Some(&tag));
        assert!(found.intact(), "{found:?}");
    }

    #[tokio::test]
    async fn changes_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meterd.redb");
        {
            let (store, snapshot) = Store::open(&path).unwrap();
            assert!(snapshot.grants.is_empty());
            store
                .commit(vec![
                    Change::PutGrant(1, b"one".to_vec()),
                    Change::PutGrant(2, b"two".to_vec()),
                    Change::PutLicence("lic-1".into(), b"{}".to_vec()),
                    Change::PutMeta("next-handle".into(), 3u64.to_le_bytes().to_vec()),
                ])
                .await
                .unwrap();
            store.commit(vec![Change::DeleteGrant(1)]).await.unwrap();
        }
        let (_store, snapshot) = open_again(&path).await;
        assert_eq!(snapshot.grants.len(), 1);
        assert_eq!(snapshot.grants[&2], b"two");
        assert_eq!(snapshot.licences["lic-1"], b"{}");
        assert_eq!(snapshot.meta["next-handle"], 3u64.to_le_bytes());
    }

    /// Opens the database again once the last store's writer thread let go of it (it owns
    /// the database until it has drained its queue).
    async fn open_again(path: &Path) -> (Store, Snapshot) {
        for _ in 0..200 {
            if let Ok(pair) = Store::open(path) {
                return pair;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("database does not reopen");
    }

    async fn reopen(path: &Path) -> Snapshot {
        open_again(path).await.1
    }

    #[tokio::test]
    async fn changes_nobody_waits_for_are_kept_in_queue_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meterd.redb");
        {
            let (store, _) = Store::open(&path).unwrap();
            store.submit_eventually(vec![Change::PutGrant(1, b"one".to_vec())]);
            store.submit_eventually(vec![Change::PutGrant(2, b"two".to_vec())]);
            store.commit(vec![Change::DeleteGrant(1)]).await.unwrap();
            store.submit_eventually(vec![Change::PutGrant(3, b"three".to_vec())]);
        }
        let snapshot = reopen(&path).await;
        assert_eq!(
            snapshot.grants,
            BTreeMap::from([(2, b"two".to_vec()), (3, b"three".to_vec())])
        );
    }
}
