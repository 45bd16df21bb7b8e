//! Runs a validated plan: streams every output tensor tile by tile from the memory-mapped
//! checkpoint into shard files (or into memory), keeping working memory within the budget.

use crate::background::{background_buffer_bytes, write_in_background};
use crate::checkpoint::{is_plain_file_name, Checkpoint, TensorEntry};
use crate::error::{io_error, DimcutError, Result};
use crate::kernels::{
    decode_block, decode_vec, encode_into, matmul, ByteBlock, FloatDtype, MatRef, Real,
};
use crate::layout::{plan_layout, write_index, OutputTensor};
use crate::plan::{
    resolve, ArrayData, ArrayRef, Arrays, OpKind, ResolvedOp, Side, TensorOp, Transform,
};
use crate::shards::ShardFiles;
use crate::staging::Staging;
use crate::tiling::{blocks, rows_per_tile, ColumnTiling};
use safetensors::Dtype;
use std::path::Path;
use std::str::FromStr;
use std::time::Instant;

/// Arithmetic precision of the tiles.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precision {
    #[default]
    F32,
    F64,
}

impl Precision {
    fn dtype(self) -> FloatDtype {
        match self {
            Self::F32 => FloatDtype::F32,
            Self::F64 => FloatDtype::F64,
        }
    }
}

impl FromStr for Precision {
    type Err = DimcutError;
    fn from_str(name: &str) -> Result<Self> {
        match name {
            "f32" => Ok(Self::F32),
            "f64" => Ok(Self::F64),
            _ => Err(DimcutError::InvalidArgument(format!(
                "precision must be \"f32\" or \"f64\", got {name:?}"
            ))),
        }
    }
}

/// Options of `rewrite_checkpoint`.
#[derive(Clone, Debug)]
pub struct Options {
    /// Bytes of tensor data per output shard.
    pub max_shard_size: usize,
    /// Bytes of working memory for tiles (rotations included).
    pub memory_budget: usize,
    pub precision: Precision,
    pub overwrite: bool,
    /// Worker threads; `None` uses every core.
    pub threads: Option<usize>,
    /// Test hook: every shard write fails with "no space left on device" once this many bytes
    /// of tensor data were written, as on a full disk. Always `None` outside fault tests.
    pub fail_writes_after: Option<u64>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            max_shard_size: 5 << 30,
            memory_budget: 512 << 20,
            precision: Precision::F32,
            overwrite: false,
            threads: None,
            fail_writes_after: None,
        }
    }
}

/// What a run did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Stats {
    pub tensors: usize,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub flops: u64,
    pub seconds: f64,
    pub shards: usize,
    /// Where the time went (wall seconds, summed over tiles): matrix products, dtype
    /// conversions (decode, scale, encode), positioned writes, and the final fsync.
    pub matmul_seconds: f64,
    pub convert_seconds: f64,
    pub write_seconds: f64,
    pub sync_seconds: f64,
}

/// Runs `work`, adding its wall time to `slot`.
fn timed<T>(slot: &mut f64, work: impl FnOnce() -> T) -> T {
    let start = Instant::now();
    let result = work();
    *slot += start.elapsed().as_secs_f64();
    result
}

/// Called with `(output bytes done, output bytes total)` after every tile; an error stops the run.
pub type Progress<'a> = &'a mut (dyn FnMut(u64, u64) -> Result<()> + Send);

/// Writes the checkpoint the plan describes into `out_dir` (see docs/plan-format.md).
pub fn rewrite_checkpoint(
    src_dir: &Path,
    out_dir: &Path,
    ops: &[TensorOp],
    arrays: &Arrays<'_>,
    extra_files: &[(String, Vec<u8>)],
    options: &Options,
    progress: Progress<'_>,
) -> Result<Stats> {
    let start = Instant::now();
    let checkpoint = Checkpoint::open(src_dir)?;
    let resolved = resolve(ops, &checkpoint, arrays, options.precision.dtype())?;
    for (name, _) in extra_files {
        if !is_plain_file_name(name) || is_weight_file(name) {
            return Err(DimcutError::InvalidArgument(format!(
                "extra file {name:?} must be a plain file name and not a weight file"
            )));
        }
    }
    if options.max_shard_size == 0 {
        return Err(DimcutError::InvalidArgument(
            "max_shard_size must be positive".into(),
        ));
    }
    let staging = Staging::new(src_dir, out_dir, options.overwrite)?;

    let outputs: Vec<OutputTensor> = resolved
        .iter()
        .map(|op| OutputTensor {
            name: op.name.clone(),
            dtype: op.dtype,
            shape: op.shape.clone(),
        })
        .collect();
    let layout = plan_layout(&outputs, options.max_shard_size)?;
    let files = ShardFiles::create(staging.path(), &layout, options.fail_writes_after)?;
    // A slice of the budget buffers output on its way to the writer thread.
    let chunk = (options.memory_budget / 16).clamp(1 << 16, MAX_COPY_CHUNK);
    let tile_budget = options
        .memory_budget
        .saturating_sub(background_buffer_bytes(chunk));
    let mut executor = Executor::new(&checkpoint, arrays, tile_budget, progress);
    executor.total = layout.total_size as u64;
    write_in_background(&files, chunk, |writes| {
        in_pool(options.threads, || {
            for (op, &(shard, offset)) in resolved.iter().zip(&layout.location) {
                let mut sink = |at: usize, bytes: &[u8]| writes.write(shard, offset + at, bytes);
                executor.run(op, options.precision, &mut sink)?;
            }
            Ok(())
        })?
    })?;
    let mut sync_seconds = 0.0;
    timed(&mut sync_seconds, || files.finish())?;
    write_index(staging.path(), &layout, &outputs)?;
    copy_side_files(src_dir, staging.path(), extra_files)?;
    staging.commit()?;

    let mut stats = executor.stats;
    stats.shards = layout.shards.len();
    stats.sync_seconds = sync_seconds;
    stats.seconds = start.elapsed().as_secs_f64();
    Ok(stats)
}

/// Values of an in-memory output tensor, in the arithmetic precision.
#[derive(Clone, Debug, PartialEq)]
pub enum TensorValues {
    F32(Vec<f32>),
    F64(Vec<f64>),
}

/// One output tensor computed in memory.
#[derive(Clone, Debug, PartialEq)]
pub struct OutputValues {
    pub name: String,
    pub shape: Vec<usize>,
    pub values: TensorValues,
}

/// Computes the plan's tensors in memory. Values are rounded to each op's output dtype (so they
/// equal what `rewrite_checkpoint` writes) and returned as f32, or f64 when `precision` is f64.
/// `progress` is called after every tile, as by `rewrite_checkpoint` (an error stops the run).
pub fn rewrite_tensors(
    src_dir: &Path,
    ops: &[TensorOp],
    arrays: &Arrays<'_>,
    precision: Precision,
    memory_budget: usize,
    threads: Option<usize>,
    progress: Progress<'_>,
) -> Result<Vec<OutputValues>> {
    let checkpoint = Checkpoint::open(src_dir)?;
    let resolved = resolve(ops, &checkpoint, arrays, precision.dtype())?;
    if let Some(op) = resolved
        .iter()
        .find(|op| FloatDtype::from_safetensors(op.dtype).is_none())
    {
        return Err(DimcutError::InvalidPlan(format!(
            "op {:?}: a {} tensor cannot be returned as floats",
            op.name, op.dtype
        )));
    }
    let mut executor = Executor::new(&checkpoint, arrays, memory_budget, progress);
    executor.total = resolved.iter().map(|op| op.nbytes() as u64).sum();
    in_pool(threads, || {
        resolved
            .iter()
            .map(|op| {
                let mut bytes = vec![0u8; op.nbytes()];
                let mut sink = |at: usize, chunk: &[u8]| {
                    bytes[at..at + chunk.len()].copy_from_slice(chunk);
                    Ok(())
                };
                executor.run(op, precision, &mut sink)?;
                let dtype = op.float_dtype();
                let values = match precision {
                    Precision::F32 => TensorValues::F32(decode_vec(dtype, &bytes)),
                    Precision::F64 => TensorValues::F64(decode_vec(dtype, &bytes)),
                };
                Ok(OutputValues {
                    name: op.name.clone(),
                    shape: op.shape.clone(),
                    values,
                })
            })
            .collect()
    })?
}

/// One tensor of a checkpoint, as `inspect_checkpoint` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSummary {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub shard: String,
}

/// Every tensor of the checkpoint (all headers validated), sorted by name.
pub fn inspect_checkpoint(src_dir: &Path) -> Result<Vec<TensorSummary>> {
    let checkpoint = Checkpoint::open(src_dir)?;
    let mut tensors: Vec<_> = checkpoint
        .tensors()
        .map(|(name, entry)| TensorSummary {
            name: name.to_string(),
            dtype: entry.dtype,
            shape: entry.shape.clone(),
            shard: checkpoint.shard_file_name(entry).to_string(),
        })
        .collect();
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(tensors)
}

/// Runs `work` on a rayon pool of `threads` workers; kernels inherit it (one level of threads).
fn in_pool<T: Send>(threads: Option<usize>, work: impl FnOnce() -> T + Send) -> Result<T> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads.unwrap_or(0))
        .build()
        .map_err(|e| {
            DimcutError::InvalidArgument(format!("cannot start {threads:?} threads: {e}"))
        })?;
    Ok(pool.install(work))
}

/// Names of weight files (safetensors, their index, other formats): an output never gets one
/// it did not write, and `dimcut verify` refuses one its manifest does not list.
pub const WEIGHT_SUFFIXES: [&str; 9] = [
    ".safetensors",
    ".index.json",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".h5",
    ".msgpack",
    ".gguf",
];

/// Other weight formats would hold the unsliced weights: never copy them.
fn is_weight_file(name: &str) -> bool {
    WEIGHT_SUFFIXES.iter().any(|suffix| name.ends_with(suffix))
}

/// Copies the non-weight files of `src_dir` (config, tokenizer, ...), then writes `extra_files`.
fn copy_side_files(
    src_dir: &Path,
    out_dir: &Path,
    extra_files: &[(String, Vec<u8>)],
) -> Result<()> {
    for entry in std::fs::read_dir(src_dir).map_err(io_error(src_dir))? {
        let entry = entry.map_err(io_error(src_dir))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if is_weight_file(name) || !entry.path().is_file() {
            continue;
        }
        let target = out_dir.join(name);
        std::fs::copy(entry.path(), &target).map_err(io_error(&target))?;
    }
    for (name, contents) in extra_files {
        let target = out_dir.join(name);
        std::fs::write(&target, contents).map_err(io_error(&target))?;
    }
    Ok(())
}

/// Receives a tensor's output bytes at offsets relative to the tensor's start.
type Sink<'s> = dyn FnMut(usize, &[u8]) -> Result<()> + 's;

/// Largest piece of a verbatim copy or literal handled at once.
const MAX_COPY_CHUNK: usize = 64 << 20;

struct Executor<'a, 'p> {
    checkpoint: &'a Checkpoint,
    arrays: &'a Arrays<'a>,
    budget: usize,
    progress: Progress<'p>,
    stats: Stats,
    done: u64,
    total: u64,
}

impl<'a, 'p> Executor<'a, 'p> {
    fn new(
        checkpoint: &'a Checkpoint,
        arrays: &'a Arrays<'a>,
        budget: usize,
        progress: Progress<'p>,
    ) -> Self {
        Self {
            checkpoint,
            arrays,
            budget,
            progress,
            stats: Stats::default(),
            done: 0,
            total: 0,
        }
    }

    fn run(&mut self, op: &ResolvedOp, precision: Precision, sink: &mut Sink<'_>) -> Result<()> {
        match (&op.kind, precision) {
            (OpKind::Copy(entry), _) => self.copy(entry, sink)?,
            (OpKind::Literal(name), _) => {
                self.literal(&self.arrays[name], op.float_dtype(), sink)?
            }
            (OpKind::Shortcut(shortcut), Precision::F32) => {
                self.shortcut::<f32>(op, shortcut, sink)?
            }
            (OpKind::Shortcut(shortcut), Precision::F64) => {
                self.shortcut::<f64>(op, shortcut, sink)?
            }
            (OpKind::Transform(t), Precision::F32) => {
                self.transform::<f32>(t, op.float_dtype(), sink)?
            }
            (OpKind::Transform(t), Precision::F64) => {
                self.transform::<f64>(t, op.float_dtype(), sink)?
            }
        }
        self.stats.tensors += 1;
        self.report()
    }

    fn emit(&mut self, sink: &mut Sink<'_>, offset: usize, bytes: &[u8]) -> Result<()> {
        timed(&mut self.stats.write_seconds, || sink(offset, bytes))?;
        self.stats.bytes_written += bytes.len() as u64;
        self.done += bytes.len() as u64;
        Ok(())
    }

    fn report(&mut self) -> Result<()> {
        (self.progress)(self.done, self.total)
    }

    fn chunk_bytes(&self) -> usize {
        self.budget.clamp(1 << 16, MAX_COPY_CHUNK)
    }

    fn copy(&mut self, entry: &TensorEntry, sink: &mut Sink<'_>) -> Result<()> {
        let bytes = self.checkpoint.bytes(entry);
        for range in blocks(bytes.len(), self.chunk_bytes()) {
            self.emit(sink, range.start, &bytes[range.clone()])?;
            self.stats.bytes_read += range.len() as u64;
            self.checkpoint.release(entry, range);
            self.report()?;
        }
        Ok(())
    }

    fn literal(
        &mut self,
        array: &ArrayRef<'_>,
        dtype: FloatDtype,
        sink: &mut Sink<'_>,
    ) -> Result<()> {
        match array.data {
            ArrayData::F32(values) => self.encode_chunks(values, Some(array), dtype, sink),
            ArrayData::F64(values) => self.encode_chunks(values, Some(array), dtype, sink),
        }
    }

    /// Encodes `values` chunk by chunk; the pages of each chunk of `array` (the values' owner,
    /// when they are a caller's array) are released once encoded.
    fn encode_chunks<R: Real>(
        &mut self,
        values: &[R],
        array: Option<&ArrayRef<'_>>,
        dtype: FloatDtype,
        sink: &mut Sink<'_>,
    ) -> Result<()> {
        let per_chunk = self.chunk_bytes() / dtype.size();
        let mut bytes = vec![0u8; per_chunk.min(values.len()) * dtype.size()];
        for range in blocks(values.len(), per_chunk) {
            let out = &mut bytes[..range.len() * dtype.size()];
            timed(&mut self.stats.convert_seconds, || {
                encode_into(&values[range.clone()], dtype, out)
            });
            if let Some(array) = array {
                array.release_elements(range.clone());
            }
            self.emit(sink, range.start * dtype.size(), out)?;
        }
        Ok(())
    }

    fn shortcut<R: Real>(
        &mut self,
        op: &ResolvedOp,
        shortcut: &crate::plan::Shortcut,
        sink: &mut Sink<'_>,
    ) -> Result<()> {
        let (a, b) = (&self.arrays[&shortcut.a], &self.arrays[&shortcut.b]);
        let rows = a.shape[0];
        let qa = a.leading_columns::<R>(shortcut.keep_a);
        let qb = b.leading_columns::<R>(shortcut.keep_b);
        a.release();
        b.release();
        let mut product = vec![R::default(); shortcut.keep_a * shortcut.keep_b];
        self.stats.flops += timed(&mut self.stats.matmul_seconds, || {
            matmul(
                &mut product,
                false,
                MatRef::row_major(&qa, rows, shortcut.keep_a).transpose(),
                MatRef::row_major(&qb, rows, shortcut.keep_b),
            )
        });
        self.encode_chunks(&product, None, op.float_dtype(), sink)
    }

    fn transform<R: Real>(
        &mut self,
        t: &Transform,
        dtype: FloatDtype,
        sink: &mut Sink<'_>,
    ) -> Result<()> {
        let scale = t.col_scale.as_ref().map(|entry| {
            let dtype = FloatDtype::from_safetensors(entry.dtype).expect("validated float");
            decode_vec::<R>(dtype, self.checkpoint.bytes(entry))
        });
        // Q[:, :keep], converted once per op; the caller's Q is not read again by this op.
        let rotation = |side: &Side| match side {
            Side::Rotate { array, keep } => {
                let array = &self.arrays[array];
                let kept = array.leading_columns::<R>(*keep);
                array.release();
                Some(kept)
            }
            _ => None,
        };
        let (in_rotation, out_rotation) = (rotation(&t.input), rotation(&t.output));
        let fixed = [&scale, &in_rotation, &out_rotation]
            .iter()
            .map(|v| v.as_ref().map_or(0, Vec::len) * size_of::<R>())
            .sum::<usize>();
        let tiles = Tiles {
            t,
            dtype,
            budget: self.budget.saturating_sub(fixed),
            scale: scale.as_deref(),
            in_rotation: in_rotation.as_deref(),
        };
        match &out_rotation {
            None => self.stream_rows(&tiles, sink),
            Some(q) => self.stream_columns(&tiles, q, sink),
        }
    }

    /// Output rows depend on the same source rows only: stream row blocks of W.
    fn stream_rows<R: Real>(&mut self, tiles: &Tiles<'_, R>, sink: &mut Sink<'_>) -> Result<()> {
        let t = tiles.t;
        let (out_rows, out_cols) = (t.out_rows(), t.out_cols());
        let (elem, out_size, in_size) = (size_of::<R>(), tiles.dtype.size(), t.source_dtype.size());
        // Without an input rotation only the kept leading columns are read.
        let read_cols = if tiles.in_rotation.is_some() {
            t.cols
        } else {
            out_cols
        };
        let product_cols = if tiles.in_rotation.is_some() {
            out_cols
        } else {
            0
        };
        // Each row costs its tile values, its encoded output and its mapped source pages.
        let per_row = (read_cols + product_cols) * elem + out_cols * out_size + t.cols * in_size;
        let tile_rows = rows_per_tile(tiles.budget, per_row, out_rows);
        let capacity = tile_rows.min(out_rows);
        let mut tile = vec![R::default(); capacity * read_cols];
        let mut product = vec![R::default(); capacity * product_cols];
        let mut bytes = vec![0u8; capacity * out_cols * out_size];
        let source = self.checkpoint.bytes(&t.source);
        let row_bytes = t.cols * in_size;
        let checkpoint = self.checkpoint;
        let prefetch = |rows: std::ops::Range<usize>| {
            let rows = rows.start.min(out_rows)..rows.end.min(out_rows);
            checkpoint.prefetch(&t.source, rows.start * row_bytes..rows.end * row_bytes);
        };
        prefetch(0..tile_rows);

        for rows in blocks(out_rows, tile_rows) {
            prefetch(rows.end..rows.end + tile_rows);
            let n = rows.len();
            let tile = &mut tile[..n * read_cols];
            let block = ByteBlock {
                bytes: source,
                dtype: t.source_dtype,
                matrix_cols: t.cols,
                rows: rows.clone(),
                cols: 0..read_cols,
            };
            timed(&mut self.stats.convert_seconds, || {
                decode_block(block, tiles.scale, tile)
            });
            let result: &[R] = match tiles.in_rotation {
                Some(q) => {
                    let product = &mut product[..n * out_cols];
                    self.stats.flops += timed(&mut self.stats.matmul_seconds, || {
                        matmul(
                            product,
                            false,
                            MatRef::row_major(tile, n, t.cols),
                            MatRef::row_major(q, t.cols, out_cols),
                        )
                    });
                    product
                }
                None => tile,
            };
            let bytes = &mut bytes[..n * out_cols * out_size];
            timed(&mut self.stats.convert_seconds, || {
                encode_into(result, tiles.dtype, bytes)
            });
            self.emit(sink, rows.start * out_cols * out_size, bytes)?;
            self.stats.bytes_read += (n * read_cols * in_size) as u64;
            self.checkpoint
                .release(&t.source, rows.start * row_bytes..rows.end * row_bytes);
            self.report()?;
        }
        Ok(())
    }

    /// An output rotation mixes all rows: stream column blocks of the output, each accumulated
    /// over row blocks of W as `Y[:, block] += Q[rows, :k]ᵀ · Z[rows, block]`.
    fn stream_columns<R: Real>(
        &mut self,
        tiles: &Tiles<'_, R>,
        out_rotation: &[R],
        sink: &mut Sink<'_>,
    ) -> Result<()> {
        let t = tiles.t;
        let (out_rows, out_cols) = (t.out_rows(), t.out_cols());
        let (out_size, in_size) = (tiles.dtype.size(), t.source_dtype.size());
        let full_row_cols = if tiles.in_rotation.is_some() {
            t.cols
        } else {
            0
        };
        let tiling = ColumnTiling::new(
            tiles.budget,
            size_of::<R>(),
            t.rows,
            out_rows,
            out_cols,
            full_row_cols,
            t.cols * in_size,
        );
        let (col_block, row_block) = (tiling.col_block, tiling.row_block.min(t.rows));
        let mut accumulator = vec![R::default(); out_rows * col_block];
        let mut z = vec![R::default(); row_block * col_block];
        let mut wide = vec![R::default(); row_block * full_row_cols];
        let mut row_bytes = vec![0u8; col_block * out_size];
        let source = self.checkpoint.bytes(&t.source);
        let q_out = MatRef::row_major(out_rotation, t.rows, out_rows);

        let source_row = t.cols * in_size;
        let checkpoint = self.checkpoint;
        let prefetch = |rows: std::ops::Range<usize>| {
            let rows = rows.start.min(t.rows)..rows.end.min(t.rows);
            checkpoint.prefetch(&t.source, rows.start * source_row..rows.end * source_row);
        };

        for cols in blocks(out_cols, col_block) {
            let width = cols.len();
            let accumulator = &mut accumulator[..out_rows * width];
            accumulator.fill(R::default());
            prefetch(0..row_block);
            for rows in blocks(t.rows, row_block) {
                prefetch(rows.end..rows.end + row_block);
                let n = rows.len();
                let z = &mut z[..n * width];
                match tiles.in_rotation {
                    Some(q_in) => {
                        let wide = &mut wide[..n * t.cols];
                        let block = ByteBlock {
                            bytes: source,
                            dtype: t.source_dtype,
                            matrix_cols: t.cols,
                            rows: rows.clone(),
                            cols: 0..t.cols,
                        };
                        timed(&mut self.stats.convert_seconds, || {
                            decode_block(block, tiles.scale, wide)
                        });
                        let q_in = MatRef::row_major(q_in, t.cols, out_cols)
                            .block(0..t.cols, cols.clone());
                        self.stats.flops += timed(&mut self.stats.matmul_seconds, || {
                            matmul(z, false, MatRef::row_major(wide, n, t.cols), q_in)
                        });
                        self.stats.bytes_read += (n * t.cols * in_size) as u64;
                    }
                    None => {
                        let block = ByteBlock {
                            bytes: source,
                            dtype: t.source_dtype,
                            matrix_cols: t.cols,
                            rows: rows.clone(),
                            cols: cols.clone(),
                        };
                        timed(&mut self.stats.convert_seconds, || {
                            decode_block(block, tiles.scale, z)
                        });
                        self.stats.bytes_read += (n * width * in_size) as u64;
                    }
                }
                let q_rows = q_out.block(rows.clone(), 0..out_rows).transpose();
                self.stats.flops += timed(&mut self.stats.matmul_seconds, || {
                    matmul(accumulator, true, q_rows, MatRef::row_major(z, n, width))
                });
                let touched = rows.start * source_row..rows.end * source_row;
                self.checkpoint.release(&t.source, touched);
            }
            let row_bytes = &mut row_bytes[..width * out_size];
            for (i, values) in accumulator.chunks_exact(width).enumerate() {
                timed(&mut self.stats.convert_seconds, || {
                    encode_into(values, tiles.dtype, row_bytes)
                });
                self.emit(sink, (i * out_cols + cols.start) * out_size, row_bytes)?;
            }
            self.report()?;
        }
        Ok(())
    }
}

/// What both streaming strategies share for one transform.
struct Tiles<'t, R> {
    t: &'t Transform,
    /// Output dtype.
    dtype: FloatDtype,
    /// Bytes left for tile buffers after the rotations and scale.
    budget: usize,
    scale: Option<&'t [R]>,
    in_rotation: Option<&'t [R]>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{Backing, Shortcut};
    use safetensors::tensor::TensorView;
    use std::collections::HashMap;

    /// A deterministic pseudo-random f32 sequence.
    fn values(seed: u64, n: usize) -> Vec<f32> {
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn write_checkpoint(dir: &Path, tensors: &[(&str, Vec<usize>, Vec<f32>)]) {
        let bytes: Vec<Vec<u8>> = tensors
            .iter()
            .map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
            .collect();
        let views: Vec<_> = tensors
            .iter()
            .zip(&bytes)
            .map(|((name, shape, _), b)| {
                (
                    *name,
                    TensorView::new(Dtype::F32, shape.clone(), b).unwrap(),
                )
            })
            .collect();
        safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
        std::fs::write(dir.join("config.json"), b"{}").unwrap();
    }

    /// `A · B` in f64 for row-major slices.
    fn product(a: &[f64], b: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
        (0..m * n)
            .map(|ij| (0..k).map(|l| a[ij / n * k + l] * b[l * n + ij % n]).sum())
            .collect()
    }

    fn to_f64(v: &[f32]) -> Vec<f64> {
        v.iter().map(|&x| x as f64).collect()
    }

    fn assert_close(actual: &TensorValues, expected: &[f64], tolerance: f64) {
        let TensorValues::F64(actual) = actual else {
            panic!("expected f64 output")
        };
        assert_eq!(actual.len(), expected.len());
        for (a, e) in actual.iter().zip(expected) {
            assert!((a - e).abs() <= tolerance, "{a} vs {e}");
        }
    }

    #[test]
    fn tiled_transforms_match_a_dense_reference() {
        let dir = tempfile::tempdir().unwrap();
        let (rows, cols, keep) = (37, 29, 11);
        let w = values(1, rows * cols);
        let bias = values(2, rows);
        let alpha = values(3, cols);
        write_checkpoint(
            dir.path(),
            &[
                ("w", vec![rows, cols], w.clone()),
                ("b", vec![rows], bias.clone()),
                ("alpha", vec![cols], alpha.clone()),
            ],
        );
        let q_in: Vec<f64> = values(4, cols * cols).iter().map(|&x| x as f64).collect();
        let q_out: Vec<f64> = values(5, rows * rows).iter().map(|&x| x as f64).collect();
        let arrays: Arrays = HashMap::from([
            (
                "qi".to_string(),
                ArrayRef {
                    data: ArrayData::F64(&q_in),
                    shape: vec![cols, cols],
                    backing: Backing::Memory,
                },
            ),
            (
                "qo".to_string(),
                ArrayRef {
                    data: ArrayData::F64(&q_out),
                    shape: vec![rows, rows],
                    backing: Backing::Memory,
                },
            ),
        ]);
        let op = |name: &str| TensorOp {
            name: name.into(),
            source: Some("w".into()),
            dtype: Some(FloatDtype::F64),
            ..Default::default()
        };
        let ops = vec![
            TensorOp {
                col_scale: Some("alpha".into()),
                in_rotation: Some("qi".into()),
                in_keep: Some(keep),
                ..op("in")
            },
            TensorOp {
                out_rotation: Some("qo".into()),
                out_keep: Some(keep),
                ..op("out")
            },
            TensorOp {
                in_rotation: Some("qi".into()),
                in_keep: Some(keep),
                out_rotation: Some("qo".into()),
                ..op("both")
            },
            TensorOp {
                source: Some("b".into()),
                out_rotation: Some("qo".into()),
                out_keep: Some(keep),
                ..op("bias")
            },
            TensorOp {
                in_keep: Some(5),
                out_keep: Some(7),
                ..op("slice")
            },
            TensorOp {
                source: None,
                shortcut: Some(Shortcut {
                    a: "qo".into(),
                    b: "qo".into(),
                    keep_a: 4,
                    keep_b: 6,
                }),
                ..op("shortcut")
            },
        ];

        let scaled: Vec<f64> = (0..rows * cols)
            .map(|i| w[i] as f64 * alpha[i % cols] as f64)
            .collect();
        let q_in_kept: Vec<f64> = (0..cols * keep)
            .map(|i| q_in[i / keep * cols + i % keep])
            .collect();
        let q_out_t: Vec<f64> = (0..rows * rows)
            .map(|i| q_out[i % rows * rows + i / rows])
            .collect();
        let q_out_kept_t = &q_out_t[..keep * rows];
        let w64 = to_f64(&w);
        let rotated_in = product(&w64, &q_in, rows, cols, cols);
        let expected_in = product(&scaled, &q_in_kept, rows, cols, keep);
        let expected_out = product(q_out_kept_t, &w64, keep, rows, cols);
        let expected_both = product(&q_out_t, &rotated_in, rows, rows, cols)
            .chunks(cols)
            .flat_map(|row| row[..keep].to_vec())
            .collect::<Vec<_>>();
        let expected_bias = product(q_out_kept_t, &to_f64(&bias), keep, rows, 1);
        let expected_slice: Vec<f64> = (0..7 * 5).map(|i| w64[i / 5 * cols + i % 5]).collect();
        let expected_shortcut = product(&q_out_t[..4 * rows], &q_out, 4, rows, rows)
            .chunks(rows)
            .flat_map(|row| row[..6].to_vec())
            .collect::<Vec<_>>();

        // A failing progress callback stops the run after its first tile.
        let mut calls = 0;
        let mut stop = |_: u64, _: u64| {
            calls += 1;
            Err(DimcutError::Interrupted)
        };
        let stopped = rewrite_tensors(
            dir.path(),
            &ops,
            &arrays,
            Precision::F64,
            0,
            None,
            &mut stop,
        );
        assert!(matches!(stopped, Err(DimcutError::Interrupted)));
        assert_eq!(calls, 1);

        // Budgets from "one row/column at a time" to "everything at once".
        let mut ignore = |_: u64, _: u64| Ok(());
        for budget in [0, 700, 5_000, 1 << 20] {
            let outputs = rewrite_tensors(
                dir.path(),
                &ops,
                &arrays,
                Precision::F64,
                budget,
                Some(2),
                &mut ignore,
            )
            .unwrap();
            let shapes: Vec<_> = outputs.iter().map(|o| o.shape.clone()).collect();
            assert_eq!(
                shapes,
                [
                    vec![rows, keep],
                    vec![keep, cols],
                    vec![rows, keep],
                    vec![keep],
                    vec![7, 5],
                    vec![4, 6]
                ]
            );
            assert_close(&outputs[0].values, &expected_in, 1e-9);
            assert_close(&outputs[1].values, &expected_out, 1e-9);
            assert_close(&outputs[2].values, &expected_both, 1e-9);
            assert_close(&outputs[3].values, &expected_bias, 1e-9);
            assert_close(&outputs[4].values, &expected_slice, 0.0);
            assert_close(&outputs[5].values, &expected_shortcut, 1e-9);
        }
    }

    #[test]
    fn released_file_mapped_arrays_give_the_same_results_and_stay_intact() {
        let dir = tempfile::tempdir().unwrap();
        let (rows, cols) = (700, 600);
        write_checkpoint(
            dir.path(),
            &[("w", vec![rows, cols], values(1, rows * cols))],
        );
        // Rotations of several pages each, stored in a file and mapped read-only.
        let q_in = to_f64(&values(2, cols * cols));
        let q_out = to_f64(&values(3, rows * rows));
        let path = dir.path().join("rotations.bin");
        let stored: Vec<u8> = q_in
            .iter()
            .chain(&q_out)
            .flat_map(|x| x.to_le_bytes())
            .collect();
        std::fs::write(&path, &stored).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        // SAFETY: the test's own file, never written while mapped.
        let map = unsafe { memmap2::Mmap::map(&file) }.unwrap();
        let mapped: &[f64] = bytemuck::cast_slice(&map[..]);
        let arrays = |q_in, q_out, backing| -> Arrays<'_> {
            HashMap::from([
                (
                    "qi".to_string(),
                    ArrayRef {
                        data: ArrayData::F64(q_in),
                        shape: vec![cols, cols],
                        backing,
                    },
                ),
                (
                    "qo".to_string(),
                    ArrayRef {
                        data: ArrayData::F64(q_out),
                        shape: vec![rows, rows],
                        backing,
                    },
                ),
            ])
        };
        let ops = vec![
            TensorOp {
                name: "both".into(),
                source: Some("w".into()),
                in_rotation: Some("qi".into()),
                out_rotation: Some("qo".into()),
                out_keep: Some(300),
                ..Default::default()
            },
            TensorOp {
                name: "shortcut".into(),
                shortcut: Some(Shortcut {
                    a: "qo".into(),
                    b: "qo".into(),
                    keep_a: 5,
                    keep_b: 9,
                }),
                ..Default::default()
            },
            TensorOp {
                name: "literal".into(),
                literal: Some("qi".into()),
                ..Default::default()
            },
        ];
        let run = |arrays: &Arrays<'_>| {
            let mut ignore = |_: u64, _: u64| Ok(());
            rewrite_tensors(
                dir.path(),
                &ops,
                arrays,
                Precision::F64,
                1 << 20,
                Some(2),
                &mut ignore,
            )
            .unwrap()
        };
        let expected = run(&arrays(&q_in, &q_out, Backing::Memory));
        let (in_file, out_file) = mapped.split_at(cols * cols);
        let file_arrays = arrays(in_file, out_file, Backing::ReadOnlyFileMap);
        // Twice: pages dropped by the first run read back unchanged in the second.
        assert_eq!(run(&file_arrays), expected);
        assert_eq!(run(&file_arrays), expected);
        assert_eq!(&map[..], &stored[..]);
    }

    #[test]
    fn checkpoint_round_trip_copies_bytes_and_refuses_bad_targets() {
        let root = tempfile::tempdir().unwrap();
        let src = root.path().join("src");
        std::fs::create_dir(&src).unwrap();
        let tensors: Vec<(&str, Vec<usize>, Vec<f32>)> = (0..5)
            .map(|i| {
                (
                    ["a", "b", "c", "d", "e"][i],
                    vec![10, 3],
                    values(i as u64, 30),
                )
            })
            .collect();
        write_checkpoint(&src, &tensors);
        let ops: Vec<_> = tensors
            .iter()
            .map(|(name, _, _)| TensorOp {
                name: name.to_string(),
                source: Some(name.to_string()),
                ..Default::default()
            })
            .collect();
        let out = root.path().join("out");
        let options = Options {
            max_shard_size: 250,
            ..Options::default()
        };
        let mut calls = 0;
        let mut progress = |done: u64, total: u64| {
            assert!(done <= total);
            calls += 1;
            Ok(())
        };
        let extra = [("config.json".to_string(), b"{\"x\": 1}".to_vec())];
        let stats = rewrite_checkpoint(
            &src,
            &out,
            &ops,
            &Arrays::new(),
            &extra,
            &options,
            &mut progress,
        )
        .unwrap();
        assert_eq!(
            (stats.tensors, stats.shards, stats.bytes_written),
            (5, 3, 600)
        );
        assert!(calls >= 5);
        assert_eq!(
            std::fs::read(out.join("config.json")).unwrap(),
            b"{\"x\": 1}"
        );
        let copy = Checkpoint::open(&out).unwrap();
        let original = Checkpoint::open(&src).unwrap();
        for (name, entry) in original.tensors() {
            assert_eq!(
                copy.bytes(copy.tensor(name).unwrap()),
                original.bytes(entry)
            );
        }

        let mut ignore = |_: u64, _: u64| Ok(());
        let again =
            rewrite_checkpoint(&src, &out, &ops, &Arrays::new(), &[], &options, &mut ignore);
        assert!(matches!(again, Err(DimcutError::OutputExists(_))));
        let inside = rewrite_checkpoint(
            &src,
            &src.join("x"),
            &ops,
            &Arrays::new(),
            &[],
            &options,
            &mut ignore,
        );
        assert!(matches!(inside, Err(DimcutError::InvalidArgument(_))));
        let replaced = Options {
            overwrite: true,
            ..options.clone()
        };
        rewrite_checkpoint(
            &src,
            &out,
            &ops[..1],
            &Arrays::new(),
            &[],
            &replaced,
            &mut ignore,
        )
        .unwrap();
        assert_eq!(inspect_checkpoint(&out).unwrap().len(), 1);
        let leftovers: Vec<_> = std::fs::read_dir(root.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers.len(), 2, "{leftovers:?}");
    }
}
