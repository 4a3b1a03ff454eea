//! User accounts inside the guest: the agent creates the account of a session's user (a line in
//! `/etc/passwd` and one in `/etc/group`, as `useradd` would) before the session starts.

use std::path::Path;

/// Why an account cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    /// The name could break the account files.
    #[error("`{0}` is not an account name")]
    BadName(String),
    /// The name or uid is taken by another account.
    #[error("Account `{name}` cannot have uid {uid}: {clash}")]
    Clash {
        /// The name asked for.
        name: String,
        /// The uid asked for.
        uid: u32,
        /// The line in the way.
        clash: String,
    },
    /// Reading or writing an account file failed.
    #[error("Cannot update {path}")]
    Io {
        /// The file.
        path: String,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
}

/// Whether `name` is a portable account name (`[a-z_][a-z0-9_-]{0,31}`).
pub fn is_account_name(name: &str) -> bool {
    let mut chars = name.chars();
    let Some(first) = chars.next() else {
        return false;
    };
    name.len() <= 32
        && (first.is_ascii_lowercase() || first == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

/// Serialises account changes: the agent serves requests on several threads.
static ACCOUNT_FILES: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Makes sure the account `name` with `uid` (and its group, same number) exists under `etc`;
/// a no-op when it does.
pub fn ensure(etc: &Path, name: &str, uid: u32) -> Result<(), AccountError> {
    if !is_account_name(name) {
        return Err(AccountError::BadName(name.to_string()));
    }
    let _one_at_a_time = ACCOUNT_FILES.lock().unwrap_or_else(|e| e.into_inner());
    let passwd = format!("{name}:x:{uid}:{uid}:{name}:/tmp:/bin/sh");
    let group = format!("{name}:x:{uid}:");
    ensure_line(&etc.join("passwd"), name, uid, &passwd)?;
    ensure_line(&etc.join("group"), name, uid, &group)?;
    Ok(())
}

/// Appends `line` to an account file unless an entry with the same name and number is there;
/// an entry sharing only one of the two is a clash.
fn ensure_line(path: &Path, name: &str, id: u32, line: &str) -> Result<(), AccountError> {
    let io = |source| AccountError::Io {
        path: path.display().to_string(),
        source,
    };
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(io(e)),
    };
    for existing in text.lines() {
        let mut fields = existing.split(':');
        let other_name = fields.next().unwrap_or_default();
        let other_id = fields.nth(1).and_then(|f| f.parse::<u32>().ok());
        match (other_name == name, other_id == Some(id)) {
            (true, true) => return Ok(()),
            (false, false) => {}
            _ => {
                return Err(AccountError::Clash {
                    name: name.to_string(),
                    uid: id,
                    clash: existing.to_string(),
                });
            }
        }
    }
    let mut new = text;
    if !new.is_empty() && !new.ends_with('\n') {
        new.push('\n');
    }
    new.push_str(line);
    new.push('\n');
    let tmp = path.with_extension(format!("vigil-new-{}", std::process::id()));
    std::fs::write(&tmp, new).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accounts_are_added_once_and_clashes_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
        ensure(dir.path(), "alice", 61000).unwrap();
        ensure(dir.path(), "alice", 61000).unwrap();
        let passwd = std::fs::read_to_string(dir.path().join("passwd")).unwrap();
        assert_eq!(
            passwd,
            "root:x:0:0:root:/root:/bin/sh\nalice:x:61000:61000:alice:/tmp:/bin/sh\n"
        );
        let group = std::fs::read_to_string(dir.path().join("group")).unwrap();
        assert_eq!(group, "alice:x:61000:\n");
        assert!(matches!(
            ensure(dir.path(), "alice", 61001),
            Err(AccountError::Clash { .. })
        ));
        assert!(matches!(
            ensure(dir.path(), "bob", 0),
            Err(AccountError::Clash { .. })
        ));
        assert!(matches!(
            ensure(dir.path(), "a:b", 61002),
            Err(AccountError::BadName(_))
        ));
    }
}
