//! The harness build: what only the harness's and the tests' runtimes may do.
//!
//! A harness build runs on simulated platforms (machine facts in plain files) and trusts the
//! root key of the harness's world (`METER_HARNESS_ROOT`) besides the production root. Only
//! builds with the cargo feature `simulated-platform` can switch it on, and the shipped `meterd`
//! binary never does, even where cargo unified the feature into its library.

use std::sync::atomic::{AtomicBool, Ordering};

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Makes this process a harness build (call first thing in `main`).
#[cfg(feature = "simulated-platform")]
pub fn enable() {
    ENABLED.store(true, Ordering::SeqCst);
}

/// Whether this process is a harness build.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::SeqCst)
}
