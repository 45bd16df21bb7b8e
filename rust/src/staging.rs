//! The output directory while it is written: a temporary directory beside the target, under
//! the target's lock, renamed into place at the end (atomically where the OS allows) and
//! removed on error; temporary directories of dead runs are cleaned up.

use crate::error::{io_error, DimcutError, Result};
use crate::manifest::write_manifest;
use crate::shards::sync_dir;
use std::fs::File;
use std::path::{Path, PathBuf};

/// Temporary directories are `.<name>.dimcut-tmp-<pid>-<random>` beside the target.
const TMP_MARK: &str = ".dimcut-tmp-";

/// The output directory while it is being written. Holds the target's lock from creation to
/// commit, so two runs writing the same output never interleave: the second is refused.
pub struct Staging {
    dir: tempfile::TempDir,
    target: PathBuf,
    overwrite: bool,
    lock: OutputLock,
}

impl Staging {
    /// Checks `target` against `src_dir`, takes its lock, removes temporary directories that
    /// dead runs left beside it, and creates the temporary directory.
    pub fn new(src_dir: &Path, target: &Path, overwrite: bool) -> Result<Self> {
        let target = absolute(target)?;
        let parent = target.parent().ok_or_else(|| {
            DimcutError::InvalidArgument(format!(
                "{}: not a usable output directory",
                target.display()
            ))
        })?;
        let name = target.file_name().ok_or_else(|| {
            DimcutError::InvalidArgument(format!("{}: output path has no name", target.display()))
        })?;
        if !parent.is_dir() {
            return Err(DimcutError::MissingFile {
                path: parent.to_path_buf(),
                reason: "parent of the output directory does not exist".into(),
            });
        }
        // Compare real paths so symlinks and `..` cannot hide an overlap.
        let parent = parent.canonicalize().map_err(io_error(parent))?;
        let target = parent.join(name);
        let src = src_dir.canonicalize().map_err(io_error(src_dir))?;
        if target.starts_with(&src) {
            return Err(DimcutError::InvalidArgument(format!(
                "output directory {} is the source directory or inside it",
                target.display()
            )));
        }
        check_existing(&target, &src, overwrite)?;
        let name = name.to_string_lossy();
        let lock = OutputLock::acquire(&parent, &name, &target)?;
        check_existing(&target, &src, overwrite)?; // again, now that we hold the lock
        remove_stale(&parent, &name);
        let prefix = format!(".{name}{TMP_MARK}{}-", std::process::id());
        let dir = tempfile::Builder::new()
            .prefix(&prefix)
            .tempdir_in(&parent)
            .map_err(io_error(&parent))?;
        Ok(Self {
            dir,
            target,
            overwrite,
            lock,
        })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Records every file's SHA-256 in the manifest, syncs everything, and moves the finished
    /// directory into place, atomically replacing an old one where the OS allows.
    pub fn commit(self) -> Result<PathBuf> {
        write_manifest(self.dir.path())?;
        if self.target.exists() && !self.overwrite {
            return Err(DimcutError::OutputExists(self.target.clone()));
        }
        let staged = self.dir.keep();
        let result = replace_dir(&staged, &self.target);
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&staged);
        }
        if let Some(parent) = self.target.parent() {
            let _ = sync_dir(parent);
        }
        drop(self.lock);
        result.map(|()| self.target)
    }
}

fn check_existing(target: &Path, src: &Path, overwrite: bool) -> Result<()> {
    if target.exists() || target.is_symlink() {
        if !overwrite {
            return Err(DimcutError::OutputExists(target.to_path_buf()));
        }
        if src.starts_with(target) {
            return Err(DimcutError::InvalidArgument(format!(
                "overwriting {} would delete the source directory inside it",
                target.display()
            )));
        }
        if !target.is_dir() {
            return Err(DimcutError::InvalidArgument(format!(
                "{} exists and is not a directory",
                target.display()
            )));
        }
    }
    Ok(())
}

/// An exclusive lock on `.<name>.dimcut-lock` beside the target; the file is removed when the
/// lock is released (a killed run leaves an unlocked file, which the next run takes over).
struct OutputLock {
    path: PathBuf,
    file: File,
}

impl OutputLock {
    fn acquire(parent: &Path, name: &str, target: &Path) -> Result<Self> {
        let path = parent.join(format!(".{name}.dimcut-lock"));
        for _ in 0..100 {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(io_error(&path))?;
            match file.try_lock() {
                Ok(()) => {}
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(DimcutError::OutputBusy(target.to_path_buf()))
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(io_error(&path)(e)),
            }
            // The previous holder may have removed the file between our open and lock: only a
            // lock on the file that is still at `path` counts.
            if same_file(&file, &path) {
                return Ok(Self { path, file });
            }
        }
        Err(DimcutError::OutputBusy(target.to_path_buf()))
    }
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        let _ = self.file.unlock();
    }
}

#[cfg(unix)]
fn same_file(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(not(unix))]
fn same_file(_file: &File, path: &Path) -> bool {
    path.exists()
}

/// Whether a process id is alive; `true` when unknown, so nothing of a live run is removed.
fn process_alive(pid: u32) -> bool {
    #[cfg(unix)]
    {
        // SAFETY: signal 0 only checks that the process exists.
        let code = unsafe { libc::kill(pid as libc::pid_t, 0) };
        code == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
    }
    #[cfg(not(unix))]
    {
        let _ = pid;
        true
    }
}

/// Removes `.<name>.dimcut-tmp-<pid>-*` directories (and their `.old` siblings) of processes
/// that no longer exist: what a SIGKILLed or crashed run left behind. Best effort.
fn remove_stale(parent: &Path, name: &str) {
    let prefix = format!(".{name}{TMP_MARK}");
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(rest) = file_name.to_str().and_then(|n| n.strip_prefix(&prefix)) else {
            continue;
        };
        let pid = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(|pid| pid != std::process::id() && !process_alive(pid)) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

fn replace_dir(staged: &Path, target: &Path) -> Result<()> {
    if target.exists() {
        if exchange(staged, target)? {
            // `staged` now holds the old output.
            return std::fs::remove_dir_all(staged).map_err(io_error(staged));
        }
        // No atomic exchange here: move the old directory aside first so the target is never
        // half-deleted (a crash in between leaves the old output in `<staged>.old`).
        let mut aside = staged.as_os_str().to_owned();
        aside.push(".old");
        let aside = PathBuf::from(aside);
        std::fs::rename(target, &aside).map_err(io_error(target))?;
        std::fs::rename(staged, target).map_err(io_error(target))?;
        std::fs::remove_dir_all(&aside).map_err(io_error(&aside))
    } else {
        std::fs::rename(staged, target).map_err(|e| {
            if matches!(e.raw_os_error(), Some(code) if is_not_empty(code)) {
                DimcutError::OutputExists(target.to_path_buf())
            } else {
                io_error(target)(e)
            }
        })
    }
}

fn is_not_empty(code: i32) -> bool {
    #[cfg(unix)]
    {
        code == libc::ENOTEMPTY || code == libc::EEXIST
    }
    #[cfg(not(unix))]
    {
        let _ = code;
        false
    }
}

/// Atomically swaps two directories (Linux `renameat2(RENAME_EXCHANGE)`); `false` when the
/// OS or file system cannot.
fn exchange(a: &Path, b: &Path) -> Result<bool> {
    #[cfg(target_os = "linux")]
    {
        use std::ffi::CString;
        use std::os::unix::ffi::OsStrExt;
        let (Ok(ca), Ok(cb)) = (
            CString::new(a.as_os_str().as_bytes()),
            CString::new(b.as_os_str().as_bytes()),
        ) else {
            return Ok(false);
        };
        // SAFETY: two valid NUL-terminated paths; the syscall reads them only.
        let code = unsafe {
            libc::syscall(
                libc::SYS_renameat2,
                libc::AT_FDCWD,
                ca.as_ptr(),
                libc::AT_FDCWD,
                cb.as_ptr(),
                libc::RENAME_EXCHANGE,
            )
        };
        if code == 0 {
            return Ok(true);
        }
        let err = std::io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP) => Ok(false),
            _ => Err(io_error(b)(err)),
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (a, b);
        Ok(false)
    }
}

fn absolute(path: &Path) -> Result<PathBuf> {
    std::path::absolute(path).map_err(io_error(path))
}
