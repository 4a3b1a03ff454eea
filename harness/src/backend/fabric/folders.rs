//! Machine folders, numbered in creation order across every driver: a machine's name never
//! becomes part of a path, so its socket paths stay short whatever the scenario calls it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Hands out `base/00`, `base/01`, …; clones share one sequence.
#[derive(Debug, Clone, Default)]
pub struct MachineFolders(Arc<AtomicUsize>);

impl MachineFolders {
    /// The next folder below `base` (not created).
    pub fn next_under(&self, base: &Path) -> PathBuf {
        base.join(format!("{:02}", self.0.fetch_add(1, Ordering::SeqCst)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_number_on_from_one_another() {
        let folders = MachineFolders::default();
        let copy = folders.clone();
        assert_eq!(folders.next_under(Path::new("/w/m")), Path::new("/w/m/00"));
        assert_eq!(copy.next_under(Path::new("/w/g")), Path::new("/w/g/01"));
    }
}
