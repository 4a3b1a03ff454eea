//! The runtime disk: a read-only ext4 image with the files of a runtime given by `--runtime`,
//! which the guest's init mounts and starts instead of the image's built-in runtime.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::backend::types::{BackendError, BackendKind};

/// The virtio-blk serial the guest's init looks for (`/sys/block/vd*/serial`).
pub use vigil_agent::protocol::RUNTIME_DISK_SERIAL as SERIAL;

/// Builds `<work_dir>/runtime.ext4` from the regular files of `runtime_dir` (symbolic links
/// followed; a file reached twice is stored once, hard-linked).
pub fn build(
    runtime_dir: &Path,
    work_dir: &Path,
    backend: BackendKind,
) -> Result<PathBuf, BackendError> {
    let unusable = |why: String| BackendError::Unsupported {
        backend,
        operation: "carry the runtime into its guests",
        why,
    };
    for name in crate::runtime::folder::FILES {
        let path = runtime_dir.join(name);
        if !path.is_file() {
            return Err(unusable(format!(
                "the runtime folder {} has no `{name}` (it needs `meter` and `meterd`, see docs/runtime-contract.md)",
                runtime_dir.display()
            )));
        }
    }
    let staging = work_dir.join("runtime-files");
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging)
        .map_err(BackendError::io(format!("create {}", staging.display())))?;
    let entries = std::fs::read_dir(runtime_dir)
        .map_err(BackendError::io(format!("read {}", runtime_dir.display())))?;
    let mut staged: Vec<(PathBuf, PathBuf)> = Vec::new();
    let mut total: u64 = 0;
    for entry in entries {
        let entry = entry.map_err(BackendError::io(format!("read {}", runtime_dir.display())))?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if crate::name::check(&name).is_err() {
            continue;
        }
        let source = entry.path();
        let Ok(real) = std::fs::canonicalize(&source) else {
            continue;
        };
        if !real.is_file() {
            continue;
        }
        let target = staging.join(&name);
        match staged.iter().find(|(r, _)| *r == real) {
            Some((_, first)) => std::fs::hard_link(first, &target)
                .map_err(BackendError::io(format!("link {}", target.display())))?,
            None => {
                total += std::fs::copy(&real, &target)
                    .map_err(BackendError::io(format!("copy {}", real.display())))?;
                staged.push((real, target));
            }
        }
    }
    let image = work_dir.join("runtime.ext4");
    let _ = std::fs::remove_file(&image);
    // Room for the files, their metadata and ext4's own: a quarter more and 8 MiB.
    let kib = (total + total / 4) / 1024 + 8 * 1024;
    let output = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-O", "^has_journal", "-L", SERIAL, "-d"])
        .arg(&staging)
        .arg(&image)
        .arg(format!("{kib}k"))
        .env("E2FSPROGS_FAKE_TIME", "1")
        .output()
        .map_err(|e| unusable(format!("cannot run mkfs.ext4 (install e2fsprogs): {e}")))?;
    let _ = std::fs::remove_dir_all(&staging);
    if !output.status.success() {
        return Err(unusable(format!(
            "mkfs.ext4 failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(image)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_folder_without_meterd_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("meter"), b"x").unwrap();
        let error = build(dir.path(), dir.path(), BackendKind::Qemu)
            .unwrap_err()
            .to_string();
        assert!(error.contains("has no `meterd`"), "{error}");
    }

    #[test]
    fn linked_files_are_stored_once() {
        let dir = tempfile::tempdir().unwrap();
        let runtime = dir.path().join("rt");
        std::fs::create_dir(&runtime).unwrap();
        let real = dir.path().join("multi-call");
        std::fs::write(&real, vec![7u8; 1 << 20]).unwrap();
        for name in ["meter", "meterd"] {
            std::os::unix::fs::symlink(&real, runtime.join(name)).unwrap();
        }
        let image = build(&runtime, dir.path(), BackendKind::Qemu).unwrap();
        let size = std::fs::metadata(image).unwrap().len();
        assert!(size < 10 << 20, "one 1 MiB file took {size} bytes");
    }
}
