//! Sharded safetensors output. All headers are computed before any data: each shard file is
//! created at its final size, its header written, and tensors then land at known offsets with
//! positioned writes, tile by tile. Everything goes to a temporary directory beside the target,
//! renamed into place at the end and removed on error.

use crate::checkpoint::{INDEX_FILE, SINGLE_FILE};
use crate::error::{io_error, DimcutError, Result};
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::Dtype;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;

/// What the layout needs to know about an output tensor.
#[derive(Clone, Debug)]
pub struct OutputTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
}

impl OutputTensor {
    pub fn nbytes(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.bitsize() / 8
    }
}

/// One output file: its header bytes and where each of its tensors starts.
#[derive(Clone, Debug)]
pub struct ShardLayout {
    pub file_name: String,
    /// The 8-byte length prefix followed by the JSON header, padded to 8 bytes.
    pub header: Vec<u8>,
    /// `(index into the tensor list, absolute byte offset in the file)`.
    pub placements: Vec<(usize, usize)>,
    /// Every tensor's `[start, end)` bytes in the file with its name and dtype, by start.
    pub extents: Vec<Extent>,
    pub file_len: usize,
}

/// Where one tensor's bytes lie in a shard file.
#[derive(Clone, Debug)]
pub struct Extent {
    pub start: usize,
    pub end: usize,
    pub name: String,
    pub dtype: Dtype,
}

/// Where every tensor goes.
#[derive(Clone, Debug)]
pub struct Layout {
    pub shards: Vec<ShardLayout>,
    /// For tensor `i`: `(shard, absolute offset)`.
    pub location: Vec<(usize, usize)>,
    pub total_size: usize,
}

/// Splits `tensors` (in order) into shards of at most `max_shard_size` data bytes (a tensor
/// larger than that gets a shard of its own) and computes each shard's header.
pub fn plan_layout(tensors: &[OutputTensor], max_shard_size: usize) -> Result<Layout> {
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut current_size = 0;
    for (index, tensor) in tensors.iter().enumerate() {
        let size = tensor.nbytes();
        match groups.last_mut() {
            Some(group) if current_size + size <= max_shard_size => group.push(index),
            _ => {
                groups.push(vec![index]);
                current_size = 0;
            }
        }
        current_size += size;
    }
    if groups.is_empty() {
        groups.push(Vec::new());
    }

    let count = groups.len();
    let mut shards = Vec::with_capacity(count);
    let mut location = vec![(0, 0); tensors.len()];
    for (shard_index, mut group) in groups.into_iter().enumerate() {
        // Like safetensors' own writer: widest dtype first, so every tensor is aligned to its
        // element size (the data section starts 8-aligned).
        group.sort_by_key(|&i| std::cmp::Reverse(tensors[i].dtype.bitsize()));
        let mut offset = 0;
        let mut infos = Vec::with_capacity(group.len());
        let mut relative = Vec::with_capacity(group.len());
        for &i in &group {
            let tensor = &tensors[i];
            let end = offset + tensor.nbytes();
            infos.push((
                tensor.name.clone(),
                TensorInfo {
                    dtype: tensor.dtype,
                    shape: tensor.shape.clone(),
                    data_offsets: (offset, end),
                },
            ));
            relative.push((i, offset));
            offset = end;
        }
        let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
        let header = encode_header(Metadata::new(Some(metadata), infos).map_err(|e| {
            DimcutError::InvalidPlan(format!("cannot build a safetensors header: {e}"))
        })?)?;
        let placements: Vec<_> = relative
            .into_iter()
            .map(|(i, offset)| (i, header.len() + offset))
            .collect();
        for &(i, at) in &placements {
            location[i] = (shard_index, at);
        }
        let extents = placements
            .iter()
            .map(|&(i, at)| Extent {
                start: at,
                end: at + tensors[i].nbytes(),
                name: tensors[i].name.clone(),
                dtype: tensors[i].dtype,
            })
            .collect();
        shards.push(ShardLayout {
            file_name: shard_file_name(shard_index, count),
            file_len: header.len() + offset,
            header,
            placements,
            extents,
        });
    }
    let total_size = tensors.iter().map(OutputTensor::nbytes).sum();
    Ok(Layout {
        shards,
        location,
        total_size,
    })
}

fn encode_header(metadata: Metadata) -> Result<Vec<u8>> {
    let mut json = serde_json::to_vec(&metadata)
        .map_err(|e| DimcutError::InvalidPlan(format!("cannot serialize a header: {e}")))?;
    json.resize(json.len().next_multiple_of(8), b' ');
    let mut header = (json.len() as u64).to_le_bytes().to_vec();
    header.extend_from_slice(&json);
    Ok(header)
}

/// `model.safetensors`, or the Hugging Face name `model-00001-of-00003.safetensors`.
pub fn shard_file_name(index: usize, count: usize) -> String {
    if count == 1 {
        SINGLE_FILE.to_string()
    } else {
        format!("model-{:05}-of-{:05}.safetensors", index + 1, count)
    }
}

/// The `model.safetensors.index.json` text for a multi-shard layout.
pub fn index_json(layout: &Layout, tensors: &[OutputTensor]) -> String {
    let weight_map: serde_json::Map<String, serde_json::Value> = layout
        .shards
        .iter()
        .flat_map(|shard| {
            shard
                .placements
                .iter()
                .map(|&(i, _)| (tensors[i].name.clone(), shard.file_name.clone().into()))
        })
        .collect();
    let index = serde_json::json!({
        "metadata": {"total_size": layout.total_size},
        "weight_map": weight_map,
    });
    serde_json::to_string_pretty(&index).expect("JSON values always serialize")
}

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

/// Chunks queued for the writer thread beyond the one it writes and the one being filled.
const QUEUE_DEPTH: usize = 2;

/// Bytes of chunk buffers `write_in_background` may hold at once with chunks of `chunk` bytes.
pub fn background_buffer_bytes(chunk: usize) -> usize {
    (QUEUE_DEPTH + 2) * chunk
}

/// Bytes for one shard at one offset.
struct Chunk {
    shard: usize,
    offset: usize,
    bytes: Vec<u8>,
}

/// The producer side of `write_in_background`: coalesces contiguous writes into chunks of at
/// most `chunk` bytes and hands them to the writer thread (blocking while its queue is full).
pub struct Writes {
    sender: mpsc::SyncSender<Chunk>,
    recycled: mpsc::Receiver<Vec<u8>>,
    pending: Option<Chunk>,
    chunk: usize,
}

impl Writes {
    /// Queues `bytes` for absolute `offset` of shard `shard`.
    pub fn write(&mut self, shard: usize, mut offset: usize, mut bytes: &[u8]) -> Result<()> {
        while !bytes.is_empty() {
            let extends_pending = self.pending.as_ref().is_some_and(|p| {
                p.shard == shard && p.offset + p.bytes.len() == offset && p.bytes.len() < self.chunk
            });
            if !extends_pending {
                self.flush()?;
                let mut buffer = self
                    .recycled
                    .try_recv()
                    .unwrap_or_else(|_| Vec::with_capacity(self.chunk));
                buffer.clear();
                self.pending = Some(Chunk {
                    shard,
                    offset,
                    bytes: buffer,
                });
            }
            let pending = self.pending.as_mut().expect("a pending chunk exists");
            let take = (self.chunk - pending.bytes.len()).min(bytes.len());
            pending.bytes.extend_from_slice(&bytes[..take]);
            (bytes, offset) = (&bytes[take..], offset + take);
            if pending.bytes.len() >= self.chunk {
                self.flush()?;
            }
        }
        Ok(())
    }

    /// Hands the pending chunk to the writer thread.
    fn flush(&mut self) -> Result<()> {
        match self.pending.take() {
            Some(chunk) if !chunk.bytes.is_empty() => {
                self.sender.send(chunk).map_err(|_| DimcutError::Io {
                    path: PathBuf::new(),
                    source: std::io::Error::other("the output writer thread stopped"),
                })
            }
            _ => Ok(()),
        }
    }
}

/// Runs `work` while a dedicated thread performs its writes to `files`, so disk I/O (page-cache
/// copies, writeback) overlaps the arithmetic instead of alternating with it. Buffers in flight
/// stay within `background_buffer_bytes(chunk)`. A write error stops the run and is returned.
pub fn write_in_background<T>(
    files: &ShardFiles,
    chunk: usize,
    work: impl FnOnce(&mut Writes) -> Result<T>,
) -> Result<T> {
    std::thread::scope(|scope| {
        let (sender, receiver) = mpsc::sync_channel::<Chunk>(QUEUE_DEPTH);
        let (recycle, recycled) = mpsc::channel::<Vec<u8>>();
        let writer = scope.spawn(move || -> Result<()> {
            for chunk in receiver {
                files.write(chunk.shard, chunk.offset, &chunk.bytes)?;
                let _ = recycle.send(chunk.bytes);
            }
            Ok(())
        });
        let mut writes = Writes {
            sender,
            recycled,
            pending: None,
            chunk: chunk.max(1),
        };
        let result = work(&mut writes).and_then(|value| writes.flush().map(|()| value));
        drop(writes); // closes the queue: the writer drains it and stops
        let written = writer
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        // A failed write explains a failed hand-over, so it is the error to report.
        written?;
        result
    })
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
fn write_at(file: &File, bytes: &[u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::write_all_at(file, bytes, offset)
}

#[cfg(windows)]
fn write_at(file: &File, mut bytes: &[u8], mut offset: u64) -> std::io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !bytes.is_empty() {
        let written = file.seek_write(bytes, offset)?;
        bytes = &bytes[written..];
        offset += written as u64;
    }
    Ok(())
}

/// The manifest dimcut writes into every output: each file's size and SHA-256.
pub const MANIFEST_FILE: &str = "dimcut-manifest.json";
pub const MANIFEST_SCHEMA: &str = "dimcut.manifest/1";
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

/// Hashes every regular file of `dir` and writes the manifest (sorted by file name).
fn write_manifest(dir: &Path) -> Result<()> {
    use rayon::prelude::*;
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_error(dir))? {
        let entry = entry.map_err(io_error(dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name != MANIFEST_FILE && entry.file_type().map_err(io_error(dir))?.is_file() {
            names.push(name);
        }
    }
    names.sort();
    let hashed: Vec<(String, u64, String)> = names
        .into_par_iter()
        .map(|name| {
            let path = dir.join(&name);
            let (size, sha) = hash_file(&path).map_err(io_error(&path))?;
            Ok((name, size, sha))
        })
        .collect::<Result<_>>()?;
    let files: serde_json::Map<String, serde_json::Value> = hashed
        .into_iter()
        .map(|(name, size, sha)| (name, serde_json::json!({"size": size, "sha256": sha})))
        .collect();
    let manifest = serde_json::json!({"schema": MANIFEST_SCHEMA, "files": files});
    let path = dir.join(MANIFEST_FILE);
    let text = serde_json::to_string_pretty(&manifest).expect("JSON values always serialize");
    let file = File::create(&path).map_err(io_error(&path))?;
    write_at(&file, text.as_bytes(), 0).map_err(io_error(&path))?;
    file.sync_all().map_err(io_error(&path))?;
    sync_dir(dir)
}

/// Size and hex SHA-256 of a file; also syncs it to disk.
pub fn hash_file(path: &Path) -> std::io::Result<(u64, String)> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
        size += n as u64;
    }
    file.sync_all()?;
    let digest = hasher.finalize();
    Ok((size, digest.iter().map(|b| format!("{b:02x}")).collect()))
}

fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error(dir))?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
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

/// Writes the index when there are several shards.
pub fn write_index(dir: &Path, layout: &Layout, tensors: &[OutputTensor]) -> Result<()> {
    if layout.shards.len() > 1 {
        let path = dir.join(INDEX_FILE);
        std::fs::write(&path, index_json(layout, tensors)).map_err(io_error(&path))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use safetensors::SafeTensors;

    fn tensor(name: &str, dtype: Dtype, shape: &[usize]) -> OutputTensor {
        OutputTensor {
            name: name.into(),
            dtype,
            shape: shape.to_vec(),
        }
    }

    #[test]
    fn one_shard_is_named_model_safetensors() {
        let tensors = [
            tensor("a", Dtype::BF16, &[3, 5]),
            tensor("b", Dtype::F32, &[2]),
        ];
        let layout = plan_layout(&tensors, 1 << 20).unwrap();
        assert_eq!(layout.shards.len(), 1);
        assert_eq!(layout.shards[0].file_name, "model.safetensors");
        assert_eq!(layout.total_size, 30 + 8);
    }

    #[test]
    fn empty_plan_writes_one_empty_shard() {
        let layout = plan_layout(&[], 100).unwrap();
        assert_eq!(layout.shards.len(), 1);
        let file = layout.shards[0].header.clone();
        SafeTensors::read_metadata(&file).unwrap();
    }

    #[test]
    fn background_writes_land_at_their_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let tensors = [
            tensor("a", Dtype::U8, &[100]),
            tensor("b", Dtype::U8, &[60]),
        ];
        let layout = plan_layout(&tensors, 100).unwrap();
        let files = ShardFiles::create(dir.path(), &layout, None).unwrap();
        let data: Vec<u8> = (0..160u8).collect();
        // Contiguous and out-of-order pieces, longer and shorter than a 7-byte chunk.
        let pieces = [(0, 30), (50, 100), (30, 50), (100, 103), (103, 160)];
        write_in_background(&files, 7, |writes| {
            for &(start, end) in &pieces {
                let (shard, base, first) = if start < 100 {
                    (layout.location[0].0, layout.location[0].1, 0)
                } else {
                    (layout.location[1].0, layout.location[1].1, 100)
                };
                writes.write(shard, base + start - first, &data[start..end])?;
            }
            Ok(())
        })
        .unwrap();
        files.finish().unwrap();
        for (i, shard) in layout.shards.iter().enumerate() {
            let bytes = std::fs::read(dir.path().join(&shard.file_name)).unwrap();
            let (n, _) = SafeTensors::read_metadata(&bytes).unwrap();
            let expected = if i == 0 { &data[..100] } else { &data[100..] };
            assert_eq!(&bytes[n + 8..], expected);
        }
    }

    proptest! {
        #[test]
        fn layouts_are_valid_safetensors(
            sizes in proptest::collection::vec((0usize..40, 0usize..4), 1..30),
            max_shard in 1usize..400,
        ) {
            let dtypes = [Dtype::BF16, Dtype::F32, Dtype::F64, Dtype::U8];
            let tensors: Vec<_> = sizes
                .iter()
                .enumerate()
                .map(|(i, &(n, d))| tensor(&format!("t{i}"), dtypes[d], &[n, 3]))
                .collect();
            let layout = plan_layout(&tensors, max_shard).unwrap();
            prop_assert_eq!(layout.total_size, tensors.iter().map(|t| t.nbytes()).sum::<usize>());

            let mut seen = vec![false; tensors.len()];
            let mut previous_last = None;
            for (s, shard) in layout.shards.iter().enumerate() {
                // A zero-filled file of the right size must parse with the safetensors crate
                // and agree with our placements.
                let mut file = shard.header.clone();
                file.resize(shard.file_len, 0);
                let (n, metadata) = SafeTensors::read_metadata(&file).unwrap();
                prop_assert_eq!(n + 8, shard.header.len());
                prop_assert_eq!(metadata.metadata().as_ref().unwrap()["format"].as_str(), "pt");
                let data: usize = shard.placements.iter().map(|&(i, _)| tensors[i].nbytes()).sum();
                prop_assert!(data <= max_shard || shard.placements.len() == 1);
                for &(i, at) in &shard.placements {
                    let info = metadata.info(&tensors[i].name).unwrap();
                    prop_assert_eq!(info.data_offsets.0 + n + 8, at);
                    prop_assert_eq!(at % (tensors[i].dtype.bitsize() / 8), 0);
                    prop_assert_eq!(layout.location[i], (s, at));
                    seen[i] = true;
                }
                // Shards hold consecutive runs of the plan order.
                let first = shard.placements.iter().map(|p| p.0).min().unwrap();
                let last = shard.placements.iter().map(|p| p.0).max().unwrap();
                prop_assert_eq!(last - first + 1, shard.placements.len());
                prop_assert_eq!(first, previous_last.map_or(0, |l: usize| l + 1));
                previous_last = Some(last);
            }
            prop_assert!(seen.iter().all(|&s| s));
            if layout.shards.len() > 1 {
                let index: serde_json::Value =
                    serde_json::from_str(&index_json(&layout, &tensors)).unwrap();
                prop_assert_eq!(index["metadata"]["total_size"].as_u64().unwrap() as usize, layout.total_size);
                prop_assert_eq!(index["weight_map"].as_object().unwrap().len(), tensors.len());
            }
        }
    }
}
