//! How far a triad member takes part in the triad now: whether it answers vote requests, and
//! whether it exchanges any Raft call at all. A member whose state may be an old copy is kept
//! out (see `TriadMember::quarantine` and `TriadMember::isolate`); several reasons may overlap,
//! each lifted on its own.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A member's part in the triad, shared by its Raft, its links and its server.
#[derive(Debug, Default)]
pub struct Standing {
    /// Reasons running to answer no vote request (and stand for no election).
    no_votes: AtomicUsize,
    /// Reasons running to answer no Raft call of another member.
    deaf: AtomicUsize,
    /// Reasons running to make no Raft call to another member.
    silent: AtomicUsize,
}

/// Which part of the triad a member is kept out of.
#[derive(Debug, Clone, Copy)]
enum Part {
    Votes,
    Listening,
    Talking,
}

/// One way a member is kept out; ends when dropped.
#[derive(Debug)]
pub struct Exclusion {
    standing: Arc<Standing>,
    part: Part,
}

impl Drop for Exclusion {
    fn drop(&mut self) {
        self.standing
            .counter(self.part)
            .fetch_sub(1, Ordering::SeqCst);
    }
}

impl Standing {
    /// Whether the member answers vote requests (and may stand for election).
    pub fn votes(&self) -> bool {
        self.no_votes.load(Ordering::SeqCst) == 0
    }

    /// Whether the member answers no Raft call of another member.
    pub fn deaf(&self) -> bool {
        self.deaf.load(Ordering::SeqCst) > 0
    }

    /// Whether the member makes no Raft call to another member.
    pub fn silent(&self) -> bool {
        self.silent.load(Ordering::SeqCst) > 0
    }

    /// Answers no vote request until the exclusion is dropped.
    pub fn refuse_votes(self: &Arc<Self>) -> Exclusion {
        self.enter(Part::Votes)
    }

    /// Answers no Raft call until the exclusion is dropped.
    pub fn stop_listening(self: &Arc<Self>) -> Exclusion {
        self.enter(Part::Listening)
    }

    /// Makes no Raft call until the exclusion is dropped.
    pub fn stop_talking(self: &Arc<Self>) -> Exclusion {
        self.enter(Part::Talking)
    }

    fn counter(&self, part: Part) -> &AtomicUsize {
        match part {
            Part::Votes => &self.no_votes,
            Part::Listening => &self.deaf,
            Part::Talking => &self.silent,
        }
    }

    fn enter(self: &Arc<Self>, part: Part) -> Exclusion {
        self.counter(part).fetch_add(1, Ordering::SeqCst);
        Exclusion {
            standing: Arc::clone(self),
            part,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_exclusions_end_each_on_its_own() {
        let standing = Arc::new(Standing::default());
        assert!(standing.votes() && !standing.deaf() && !standing.silent());
        let first = standing.refuse_votes();
        let second = standing.refuse_votes();
        let deaf = standing.stop_listening();
        drop(first);
        assert!(!standing.votes(), "one reason is still running");
        drop(second);
        assert!(standing.votes());
        assert!(standing.deaf() && !standing.silent());
        drop(deaf);
        let silent = standing.stop_talking();
        assert!(!standing.deaf() && standing.silent());
        drop(silent);
        assert!(!standing.silent());
    }
}
