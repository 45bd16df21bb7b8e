//! The output shard files: created at their final size with their headers in place, then
//! filled by positioned writes (from any thread) that refuse non-finite floats and start
//! writeback early.

use crate::error::{io_error, DimcutError, Result};
use crate::layout::{Extent, Layout};
use safetensors::Dtype;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Bytes written to a shard between two requests to start writing it back to disk.
const WRITEBACK_STEP: u64 = 32 << 20;

/// Shard files being written inside the staging directory.
pub struct ShardFiles {
    files: Vec<(PathBuf, File, Vec<Extent>)>,
    written: AtomicU64,
    /// Test hook (`Options::fail_writes_after`): writes fail as on a full disk past this.
    fail_after: Option<u64>,
    /// Bytes written to each shard since its writeback was last started.
    unflushed: Vec<AtomicU64>,
}

impl ShardFiles {
    /// Creates each shard at its final size (space reserved up front where the file system
    /// can, so a full disk is reported before any work) with its header in place.
    /// `fail_after` is the test hook `Options::fail_writes_after`.
    pub fn create(dir: &Path, layout: &Layout, fail_after: Option<u64>) -> Result<Self> {
        let mut files = Vec::with_capacity(layout.shards.len());
        for shard in &layout.shards {
            let path = dir.join(&shard.file_name);
            let file = File::create(&path).map_err(io_error(&path))?;
            reserve(&file, shard.file_len as u64).map_err(io_error(&path))?;
            write_at(&file, &shard.header, 0).map_err(io_error(&path))?;
            files.push((path, file, shard.extents.clone()));
        }
        let unflushed = files.iter().map(|_| AtomicU64::new(0)).collect();
        Ok(Self {
            files,
            written: AtomicU64::new(0),
            fail_after,
            unflushed,
        })
    }

    /// Writes `bytes` at absolute `offset` of shard `shard`, refusing non-finite floats.
    pub fn write(&self, shard: usize, offset: usize, bytes: &[u8]) -> Result<()> {
        let (path, file, extents) = &self.files[shard];
        check_finite(extents, offset, bytes, path)?;
        let before = self
            .written
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        if let Some(limit) = self.fail_after {
            if before + bytes.len() as u64 > limit {
                #[cfg(unix)]
                let full = std::io::Error::from_raw_os_error(libc::ENOSPC);
                #[cfg(not(unix))]
                let full = std::io::Error::from(std::io::ErrorKind::StorageFull);
                return Err(io_error(path)(full));
            }
        }
        write_at(file, bytes, offset as u64).map_err(io_error(path))?;
        let pending = self.unflushed[shard].fetch_add(bytes.len() as u64, Ordering::Relaxed);
        if pending + bytes.len() as u64 >= WRITEBACK_STEP {
            self.unflushed[shard].store(0, Ordering::Relaxed);
            start_writeback(file);
        }
        Ok(())
    }

    /// Flushes and closes every shard.
    pub fn finish(self) -> Result<()> {
        for (path, file, _) in self.files {
            file.sync_all().map_err(io_error(&path))?;
        }
        Ok(())
    }
}

/// Sets the file's length, allocating its blocks when the file system supports it.
fn reserve(file: &File, len: u64) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    if len > 0 {
        use std::os::fd::AsRawFd;
        // SAFETY: a plain syscall on an open descriptor we own.
        let code = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len as libc::off_t) };
        match code {
            0 => return Ok(()),
            libc::EOPNOTSUPP | libc::EINVAL | libc::ENOSYS => {} // fall back to a sparse file
            code => return Err(std::io::Error::from_raw_os_error(code)),
        }
    }
    file.set_len(len)
}

/// Refuses NaN and ±Inf in the float tensors a write touches: such weights would silently
/// poison every output they are rotated into. Only whole elements are checked.
fn check_finite(extents: &[Extent], offset: usize, bytes: &[u8], shard: &Path) -> Result<()> {
    let end = offset + bytes.len();
    let first = extents.partition_point(|e| e.end <= offset);
    for extent in extents[first..].iter().take_while(|e| e.start < end) {
        let size = extent.dtype.bitsize() / 8;
        let non_finite: fn(&[u8]) -> bool = match extent.dtype {
            Dtype::F32 => {
                |c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) & 0x7F80_0000 == 0x7F80_0000
            }
            Dtype::F64 => |c| {
                u64::from_le_bytes(c.try_into().expect("8 bytes")) & 0x7FF0_0000_0000_0000
                    == 0x7FF0_0000_0000_0000
            },
            Dtype::BF16 => |c| u16::from_le_bytes([c[0], c[1]]) & 0x7F80 == 0x7F80,
            Dtype::F16 => |c| u16::from_le_bytes([c[0], c[1]]) & 0x7C00 == 0x7C00,
            _ => continue,
        };
        // Element-aligned part of this write inside the tensor.
        let lo = offset.max(extent.start);
        let lo = extent.start + (lo - extent.start).next_multiple_of(size);
        let hi = end.min(extent.end);
        if lo >= hi {
            continue;
        }
        let hi = lo + (hi - lo) / size * size;
        let chunk = &bytes[lo - offset..hi - offset];
        if chunk
            .chunks_exact(size)
            .fold(false, |bad, c| bad | non_finite(c))
        {
            return Err(DimcutError::NonFinite {
                tensor: extent.name.clone(),
                path: shard.to_path_buf(),
            });
        }
    }
    Ok(())
}

/// Starts writing the file's dirty pages to disk without waiting, so the final fsync finds
/// little left to do and disk writes overlap the arithmetic. Best effort, Linux only.
#[cfg(target_os = "linux")]
fn start_writeback(file: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid open descriptor; offset 0 and length 0 mean "the whole file".
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
    }
}

#[cfg(not(target_os = "linux"))]
fn start_writeback(_file: &File) {}

#[cfg(unix)]
pub(crate) fn write_at(file: &File, bytes: &[u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::write_all_at(file, bytes, offset)
}

#[cfg(windows)]
pub(crate) fn write_at(file: &File, mut bytes: &[u8], mut offset: u64) -> std::io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !bytes.is_empty() {
        let written = file.seek_write(bytes, offset)?;
        bytes = &bytes[written..];
        offset += written as u64;
    }
    Ok(())
}

/// Makes a directory's entries (new files, renames) durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error(dir))?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}
