//! Durable daemon state in redb, written by one thread that commits queued changes in batches.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::oneshot;

const GRANTS: TableDefinition<u64, &[u8]> = TableDefinition::new("grants");
const LICENCES: TableDefinition<&str, &[u8]> = TableDefinition::new("licences");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

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

/// The longest changes queued with [`Store::submit_eventually`] stay off the disk (in the page
/// cache, committed but not synced) when no durable commit comes first.
pub const EVENTUAL_SYNC: Duration = Duration::from_millis(20);

/// The state database and its writer thread.
#[derive(Debug)]
pub struct Store {
    queue: mpsc::Sender<Batch>,
    path: PathBuf,
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
            txn.open_table(META).map_err(db_error)?;
            txn.commit().map_err(db_error)?;
        }
        let snapshot = read_all(&db)?;
        let (queue, batches) = mpsc::channel::<Batch>();
        thread::Builder::new()
            .name("meterd-store".into())
            .spawn(move || write_loop(db, batches))
            .map_err(|e| StoreError::Database(redb::Error::Io(e)))?;
        Ok((
            Store {
                queue,
                path: path.to_owned(),
            },
            snapshot,
        ))
    }

    /// Queues changes; they are applied in queue order. Await the receiver for durability.
    pub fn submit(&self, changes: Vec<Change>) -> oneshot::Receiver<Result<(), String>> {
        let (done, receiver) = oneshot::channel();
        if let Err(mpsc::SendError(batch)) = self.queue.send(Batch {
            changes,
            done: Some(done),
        }) && let Some(done) = batch.done
        {
            let _ = done.send(Err("state writer stopped".into()));
        }
        receiver
    }

    /// Queues changes nobody waits for: applied in queue order, on disk within [`EVENTUAL_SYNC`]
    /// (or with the next durable commit), so a busy runtime syncs once per interval, not per change.
    pub fn submit_eventually(&self, changes: Vec<Change>) {
        if self
            .queue
            .send(Batch {
                changes,
                done: None,
            })
            .is_err()
        {
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

fn write_loop(db: Database, batches: mpsc::Receiver<Batch>) {
    // When changes were committed without a sync: the first such commit since the last sync.
    let mut unsynced_since: Option<Instant> = None;
    loop {
        let first = match unsynced_since {
            None => match batches.recv() {
                Ok(batch) => batch,
                Err(mpsc::RecvError) => return,
            },
            Some(since) => {
                match batches.recv_timeout(EVENTUAL_SYNC.saturating_sub(since.elapsed())) {
                    Ok(batch) => batch,
                    Err(timeout_or_gone) => {
                        if let Err(e) = sync(&db) {
                            tracing::error!(error = %e, "State sync failed");
                        }
                        unsynced_since = None;
                        if timeout_or_gone == mpsc::RecvTimeoutError::Disconnected {
                            return;
                        }
                        continue;
                    }
                }
            }
        };
        let mut group = vec![first];
        while let Ok(more) = batches.try_recv() {
            group.push(more);
            if group.len() >= 4096 {
                break;
            }
        }
        let someone_waits = group.iter().any(|batch| batch.done.is_some());
        let overdue = unsynced_since.is_some_and(|since| since.elapsed() >= EVENTUAL_SYNC);
        let durability = if someone_waits || overdue {
            Durability::Immediate
        } else {
            Durability::None
        };
        let result = apply(&db, &group, durability).map_err(|e| e.to_string());
        match (durability, &result) {
            (Durability::Immediate, Ok(())) => unsynced_since = None,
            _ => {
                unsynced_since.get_or_insert_with(Instant::now);
            }
        }
        for batch in group {
            if let Some(done) = batch.done {
                let _ = done.send(result.clone());
            }
        }
    }
}

/// Makes every earlier commit durable.
fn sync(db: &Database) -> Result<(), StoreError> {
    apply(db, &[], Durability::Immediate)
}

fn apply(db: &Database, group: &[Batch], durability: Durability) -> Result<(), StoreError> {
    let mut txn = db.begin_write().map_err(db_error)?;
    txn.set_durability(durability)
        .map_err(|e| StoreError::Database(redb::Error::Corrupted(e.to_string())))?;
    {
        let mut grants = txn.open_table(GRANTS).map_err(db_error)?;
        let mut licences = txn.open_table(LICENCES).map_err(db_error)?;
        let mut meta = txn.open_table(META).map_err(db_error)?;
        for change in group.iter().flat_map(|b| &b.changes) {
            match change {
                Change::PutGrant(handle, bytes) => {
                    grants.insert(handle, bytes.as_slice()).map_err(db_error)?;
                }
                Change::DeleteGrant(handle) => {
                    grants.remove(handle).map_err(db_error)?;
                }
                Change::PutLicence(id, bytes) => {
                    licences
                        .insert(id.as_str(), bytes.as_slice())
                        .map_err(db_error)?;
                }
                Change::DeleteLicence(id) => {
                    licences.remove(id.as_str()).map_err(db_error)?;
                }
                Change::PutMeta(key, bytes) => {
                    meta.insert(key.as_str(), bytes.as_slice())
                        .map_err(db_error)?;
                }
                Change::DeleteMeta(key) => {
                    meta.remove(key.as_str()).map_err(db_error)?;
                }
            }
        }
    }
    txn.commit().map_err(db_error)
}

#[cfg(test)]
mod tests {
    use super::*;

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
        // The writer thread owns the database; give it a moment to drop after the store is gone.
        let mut reopened = None;
        for _ in 0..100 {
            match Store::open(&path) {
                Ok(pair) => {
                    reopened = Some(pair);
                    break;
                }
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
            }
        }
        let (_store, snapshot) = reopened.expect("database reopens");
        assert_eq!(snapshot.grants.len(), 1);
        assert_eq!(snapshot.grants[&2], b"two");
        assert_eq!(snapshot.licences["lic-1"], b"{}");
        assert_eq!(snapshot.meta["next-handle"], 3u64.to_le_bytes());
    }

    async fn reopen(path: &Path) -> Snapshot {
        // The writer thread owns the database until it has drained its queue.
        for _ in 0..200 {
            if let Ok((_store, snapshot)) = Store::open(path) {
                return snapshot;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("database does not reopen");
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
