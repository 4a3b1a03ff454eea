//! The session table the runtime reads (`/run/meter/sessions.json`): session id → who and how.

use std::collections::BTreeMap;
use std::path::Path;

use crate::protocol::SessionKind;

/// The login sessions open on this machine, by session id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionTable {
    entries: BTreeMap<i32, SessionKind>,
    /// The licensee deleted the file and keeps it from being written (until the machine stops).
    dropped: bool,
}

impl SessionTable {
    /// Records a session.
    pub fn insert(&mut self, sid: i32, kind: SessionKind) {
        self.entries.insert(sid, kind);
    }

    /// Whether a session is recorded under this key.
    pub fn contains(&self, sid: i32) -> bool {
        self.entries.contains_key(&sid)
    }

    /// Forgets a session.
    pub fn remove(&mut self, sid: i32) {
        self.entries.remove(&sid);
    }

    /// Forgets every session (the machine went down); a dropped table is written again.
    pub fn clear(&mut self) {
        self.entries.clear();
        self.dropped = false;
    }

    /// The login sessions recorded, by key.
    pub fn keys(&self) -> impl Iterator<Item = i32> + '_ {
        self.entries.keys().copied()
    }

    /// Deletes the table file at `path` and writes it no more, as a licensee who is root can
    /// (an attack on the runtime's view of sessions); the sessions are still tracked.
    pub fn drop_file(&mut self, path: &Path) -> std::io::Result<()> {
        self.dropped = true;
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// The table in the runtime's format: `{"<sid>": {"kind": …, "user": …}}`.
    pub fn to_json(&self) -> serde_json::Value {
        let map: serde_json::Map<String, serde_json::Value> = self
            .entries
            .iter()
            .map(|(sid, kind)| {
                (
                    sid.to_string(),
                    serde_json::to_value(kind).unwrap_or_default(),
                )
            })
            .collect();
        serde_json::Value::Object(map)
    }

    /// Replaces the table file atomically (write + rename); nothing once it was dropped.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        if self.dropped {
            return Ok(());
        }
        let text = serde_json::to_vec_pretty(&self.to_json()).map_err(std::io::Error::other)?;
        write_atomic(path, &text)
    }
}

/// Replaces a file atomically, creating its folder.
pub fn write_atomic(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, contents)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_the_runtime_format() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/meter/sessions.json");
        let mut table = SessionTable::default();
        table.insert(
            41,
            SessionKind::Console {
                user: "operator".into(),
            },
        );
        table.insert(
            57,
            SessionKind::Rdp {
                user: "bob".into(),
                client_name: "pc-2".into(),
                client_ip: "10.0.0.12".into(),
            },
        );
        table.remove(41);
        table.write(&path).unwrap();
        let written: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(
            written,
            serde_json::json!({"57": {"kind": "rdp", "user": "bob", "client_name": "pc-2", "client_ip": "10.0.0.12"}})
        );
    }

    #[test]
    fn a_dropped_table_stays_deleted_until_cleared() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sessions.json");
        let mut table = SessionTable::default();
        table.write(&path).unwrap();
        table.drop_file(&path).unwrap();
        table.insert(3, SessionKind::Console { user: "a".into() });
        table.write(&path).unwrap();
        assert!(!path.exists());
        assert_eq!(table.keys().collect::<Vec<_>>(), vec![3]);
        table.clear();
        table.write(&path).unwrap();
        assert!(path.exists());
    }
}
