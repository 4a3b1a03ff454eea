//! One user directory per world: every scenario user is one unprivileged account with the same
//! uid on every machine, whichever driver runs it, so a runtime tells users apart by the uid the
//! kernel reports, as it does on a real machine.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::backend::types::BackendError;

/// The first uid handed out: far above the ranges distributions and systemd hand out (people
/// from 1000, systemd's dynamic users 61184–65519, container ranges from 524288 in 65536
/// blocks up to 1878982656), and below 2³¹ for tools that keep uids signed.
pub const FIRST_UID: u32 = 1_900_000_000;

/// Most users one world may have.
pub const MAX_USERS: u32 = 4000;

/// The user the unattended console and apps outside any named session run as.
pub const CONSOLE_USER: &str = "operator";

/// Hands out the world's user ids by name; clones share one directory.
#[derive(Debug, Clone, Default)]
pub struct Accounts {
    uids: Arc<Mutex<BTreeMap<String, u32>>>,
}

impl Accounts {
    /// The uid of `user`, given at its first use; `user` must be an account name
    /// ([`crate::name::USER_PATTERN`]).
    pub fn uid(&self, user: &str) -> Result<u32, BackendError> {
        if !crate::name::is_user(user) {
            return Err(BackendError::BadAccount {
                name: user.to_string(),
                why: format!("account names match {}", crate::name::USER_PATTERN),
            });
        }
        let mut uids = self.uids.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(uid) = uids.get(user) {
            return Ok(*uid);
        }
        let count = u32::try_from(uids.len()).unwrap_or(u32::MAX);
        if count >= MAX_USERS {
            return Err(BackendError::BadAccount {
                name: user.to_string(),
                why: format!("a world has at most {MAX_USERS} users"),
            });
        }
        let uid = FIRST_UID + count;
        uids.insert(user.to_string(), uid);
        Ok(uid)
    }

    /// Every account so far, as the lines of a passwd file.
    pub fn passwd(&self) -> String {
        let uids = self.uids.lock().unwrap_or_else(|e| e.into_inner());
        uids.iter()
            .map(|(name, uid)| format!("{name}:x:{uid}:{uid}:{name}:/tmp:/bin/sh\n"))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_uid_per_name_shared_by_clones() {
        let a = Accounts::default();
        let b = a.clone();
        assert_eq!(a.uid("alice").unwrap(), FIRST_UID);
        assert_eq!(b.uid("bob").unwrap(), FIRST_UID + 1);
        assert_eq!(b.uid("alice").unwrap(), FIRST_UID);
    }

    #[test]
    fn names_that_would_break_a_passwd_file_are_refused() {
        let a = Accounts::default();
        for bad in ["", "Alice", "a:b", "a\nb", "1abc", "a b", &"a".repeat(33)] {
            assert!(a.uid(bad).is_err(), "{bad:?}");
        }
        assert!(a.uid("_svc-1").is_ok());
    }
}
