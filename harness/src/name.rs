//! The rule for names that may become file or socket names: scenarios, machines, snapshots,
//! dongles, apps and sessions.

use std::path::{Path, PathBuf};

/// The longest name allowed, in bytes (every allowed character is one byte).
pub const NAME_MAX_LEN: usize = 64;

/// The allowed names as a regular expression (also in the JSON Schema and the docs).
pub const NAME_PATTERN: &str = "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$";

/// Why a name is not allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The name is empty or only blanks.
    #[error("The name is empty")]
    Empty,
    /// The name is longer than [`NAME_MAX_LEN`].
    #[error("The name is {len} characters long; at most {NAME_MAX_LEN} are allowed")]
    TooLong {
        /// Its length in characters.
        len: usize,
    },
    /// The name does not start with a letter or digit.
    #[error("The name starts with `{0}`; it must start with a letter or a digit")]
    BadStart(char),
    /// The name holds a character outside letters, digits, `.`, `_` and `-`.
    #[error("The name holds `{}`; only letters, digits, `.`, `_` and `-` are allowed", .0.escape_default())]
    BadCharacter(char),
}

/// Checks `name` against [`NAME_PATTERN`].
pub fn check(name: &str) -> Result<(), NameError> {
    let mut chars = name.chars();
    let Some(first) = chars.next() else {
        return Err(NameError::Empty);
    };
    if name.trim().is_empty() {
        return Err(NameError::Empty);
    }
    let len = name.chars().count();
    if len > NAME_MAX_LEN {
        return Err(NameError::TooLong { len });
    }
    if !first.is_ascii_alphanumeric() {
        return Err(NameError::BadStart(first));
    }
    match chars.find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        Some(bad) => Err(NameError::BadCharacter(bad)),
        None => Ok(()),
    }
}

/// The allowed user account names as a regular expression (also in the docs): a user becomes an
/// account in a guest's `/etc/passwd`, so only what `useradd` takes everywhere is allowed.
pub const USER_PATTERN: &str = "^[a-z_][a-z0-9_-]{0,31}$";

/// Whether `user` matches [`USER_PATTERN`].
pub fn is_user(user: &str) -> bool {
    vigil_agent::accounts::is_account_name(user)
}

/// `dir/name` for a checked `name`: the result is always directly inside `dir`.
pub fn child(dir: &Path, name: &str) -> Result<PathBuf, NameError> {
    check(name)?;
    Ok(dir.join(name))
}

#[cfg(test)]
mod tests {
    use rstest::rstest;

    use super::*;

    #[rstest]
    #[case("ws1", None)]
    #[case("guest-1.clone_2", None)]
    #[case("A", None)]
    #[case(&"a".repeat(64), None)]
    #[case("", Some(NameError::Empty))]
    #[case("   ", Some(NameError::Empty))]
    #[case(&"a".repeat(65), Some(NameError::TooLong { len: 65 }))]
    #[case("..", Some(NameError::BadStart('.')))]
    #[case(".hidden", Some(NameError::BadStart('.')))]
    #[case("-rf", Some(NameError::BadStart('-')))]
    #[case("/some/dir", Some(NameError::BadStart('/')))]
    #[case("a/../b", Some(NameError::BadCharacter('/')))]
    #[case("a b", Some(NameError::BadCharacter(' ')))]
    #[case("new\nline", Some(NameError::BadCharacter('\n')))]
    #[case("ünïcode", Some(NameError::BadStart('ü')))]
    fn names_follow_the_pattern(#[case] name: &str, #[case] expected: Option<NameError>) {
        assert_eq!(check(name).err(), expected);
    }

    #[test]
    fn a_child_stays_inside_its_folder() {
        let dir = Path::new("/run/x");
        assert_eq!(child(dir, "vm1").unwrap(), Path::new("/run/x/vm1"));
        assert!(child(dir, "../etc").is_err());
        assert!(child(dir, "/etc").is_err());
    }

    #[test]
    fn the_pattern_names_the_same_bound() {
        assert!(NAME_PATTERN.contains(&format!("{{0,{}}}", NAME_MAX_LEN - 1)));
    }
}
