//! Runtime folders: the `meter` and `meterd` a runtime under test is run from (runtime contract).

use std::path::{Path, PathBuf};

/// The files every runtime folder holds.
pub const FILES: [&str; 2] = ["meter", "meterd"];

/// A runtime folder could not be made.
#[derive(Debug, thiserror::Error)]
#[error("Cannot make the runtime folder entry {path}")]
pub struct FolderError {
    /// The entry that failed.
    pub path: PathBuf,
    /// What the OS said.
    #[source]
    pub source: std::io::Error,
}

/// Makes `dir` a runtime folder whose `meter` and `meterd` are links to one multi-call `binary`.
pub fn link_multi_call(binary: &Path, dir: &Path) -> Result<(), FolderError> {
    std::fs::create_dir_all(dir).map_err(|source| FolderError {
        path: dir.to_owned(),
        source,
    })?;
    for name in FILES {
        let link = dir.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(binary, &link)
            .map_err(|source| FolderError { path: link, source })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_names_lead_to_the_binary_and_a_second_call_replaces_them() {
        let dir = tempfile::tempdir().unwrap();
        let binary = dir.path().join("multi");
        std::fs::write(&binary, b"x").unwrap();
        let folder = dir.path().join("rt");
        link_multi_call(&binary, &folder).unwrap();
        link_multi_call(&binary, &folder).unwrap();
        for name in FILES {
            assert_eq!(std::fs::read_link(folder.join(name)).unwrap(), binary);
        }
    }
}
