//! Runtime folders for `--runtime`: real copies (not links) of the reference runtime's binaries.

use std::path::{Path, PathBuf};

/// A binary built beside `vigil` in the target folder.
fn built(name: &str, how: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_BIN_EXE_vigil")).with_file_name(name);
    assert!(
        path.is_file(),
        "{} is missing: build it with `{how}` (`make test` does)",
        path.display()
    );
    path
}

fn copy_as(binary: &Path, dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    for name in ["meter", "meterd"] {
        std::fs::copy(binary, dir.join(name)).unwrap();
    }
    dir.to_path_buf()
}

/// `dir` holding copies of the reference runtime's harness build (`meterd-sim`, which runs on
/// simulated machines) as `meterd` and `meter` (it answers to both).
pub fn reference(dir: &Path) -> PathBuf {
    copy_as(
        &built(
            "meterd-sim",
            "cargo build -p meterd --features simulated-platform --bin meterd-sim",
        ),
        dir,
    )
}

/// `dir` holding copies of the weakened runtime as `meterd` and `meter`.
pub fn weakened(dir: &Path) -> PathBuf {
    copy_as(&built("meter-weakened", "make weakened"), dir)
}
