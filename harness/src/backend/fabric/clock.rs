//! The world clock: how far the scenario moved time past real time, shared by every driver and
//! by the dongles' firmware threads.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

/// The world's offset from real time, in milliseconds; clones share it.
#[derive(Debug, Clone, Default)]
pub struct WorldClock(Arc<AtomicI64>);

impl WorldClock {
    /// The offset now.
    pub fn offset_ms(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }

    /// Moves the world to `offset_ms` past real time.
    pub fn set_offset_ms(&self, offset_ms: i64) {
        self.0.store(offset_ms, Ordering::SeqCst);
    }

    /// The shared cell itself, for threads that read it on their own (the dongles' firmware).
    pub fn cell(&self) -> Arc<AtomicI64> {
        Arc::clone(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_and_cells_see_one_offset() {
        let clock = WorldClock::default();
        let copy = clock.clone();
        let cell = clock.cell();
        copy.set_offset_ms(-5_000);
        assert_eq!(clock.offset_ms(), -5_000);
        assert_eq!(cell.load(Ordering::SeqCst), -5_000);
    }
}
