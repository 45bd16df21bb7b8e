//! The plan: one op per output tensor (see docs/plan-format.md), and its validation against a
//! checkpoint and the named arrays. `resolve` checks everything before any byte is written.

use crate::checkpoint::{Checkpoint, TensorEntry};
use crate::error::{DimcutError, Result};
use crate::kernels::{FloatDtype, Real};
use rayon::prelude::*;
use safetensors::Dtype;
use std::collections::{HashMap, HashSet};
use std::ops::Range;

/// `(Q_aᵀ Q_b)[:keep_a, :keep_b]`, a residual shortcut between two rotations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shortcut {
    pub a: String,
    pub b: String,
    pub keep_a: usize,
    pub keep_b: usize,
}

/// One output tensor, as the plan describes it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TensorOp {
    pub name: String,
    pub source: Option<String>,
    pub col_scale: Option<String>,
    pub in_rotation: Option<String>,
    pub in_keep: Option<usize>,
    pub out_rotation: Option<String>,
    pub out_keep: Option<usize>,
    pub shortcut: Option<Shortcut>,
    pub literal: Option<String>,
    pub dtype: Option<FloatDtype>,
}

/// Borrowed values of a named array (rotations, literals).
#[derive(Clone, Copy, Debug)]
pub enum ArrayData<'a> {
    F32(&'a [f32]),
    F64(&'a [f64]),
}

/// What memory an array's values live in; it decides whether the engine may drop its pages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Backing {
    /// Ordinary (anonymous) memory: never released, dropping its pages would zero it.
    #[default]
    Memory,
    /// A read-only shared mapping of a file (numpy `mmap_mode="r"`): its pages can be dropped
    /// after use and are re-read unchanged from the file if touched again.
    ReadOnlyFileMap,
}

/// A borrowed row-major array with its shape.
#[derive(Clone, Debug)]
pub struct ArrayRef<'a> {
    pub data: ArrayData<'a>,
    pub shape: Vec<usize>,
    pub backing: Backing,
}

pub type Arrays<'a> = HashMap<String, ArrayRef<'a>>;

impl ArrayRef<'_> {
    pub fn dtype(&self) -> FloatDtype {
        match self.data {
            ArrayData::F32(_) => FloatDtype::F32,
            ArrayData::F64(_) => FloatDtype::F64,
        }
    }

    /// Drops this array's resident pages when it is a read-only file map (a no-op otherwise),
    /// so rotations stored as `.npy` files do not pile up in resident memory op after op.
    pub fn release(&self) {
        self.release_elements(0..self.len());
    }

    /// `release` for the values of `elements` only (a literal written chunk by chunk).
    pub fn release_elements(&self, elements: Range<usize>) {
        if self.backing != Backing::ReadOnlyFileMap {
            return;
        }
        let (start, element_size) = match self.data {
            ArrayData::F32(values) => (values.as_ptr() as usize, size_of::<f32>()),
            ArrayData::F64(values) => (values.as_ptr() as usize, size_of::<f64>()),
        };
        let bytes = start + elements.start * element_size..start + elements.end * element_size;
        // SAFETY: `Backing::ReadOnlyFileMap` promises the values are a read-only shared
        // mapping of a file, whose dropped pages read back unchanged from the file.
        unsafe { drop_file_pages(bytes) };
    }

    fn len(&self) -> usize {
        match self.data {
            ArrayData::F32(values) => values.len(),
            ArrayData::F64(values) => values.len(),
        }
    }

    /// `A[:, :keep]` of a 2-D array, contiguous and converted to the arithmetic precision.
    pub fn leading_columns<R: Real>(&self, keep: usize) -> Vec<R> {
        let (rows, cols) = (self.shape[0], self.shape[1]);
        assert!(keep <= cols, "leading_columns: keep > columns");
        let mut out = vec![R::default(); rows * keep];
        if keep == 0 {
            return out;
        }
        // A D×d rotation is tens of MB: convert rows in parallel (rayon's current pool).
        out.par_chunks_mut(keep).enumerate().for_each(|(row, out)| {
            let start = row * cols;
            match self.data {
                ArrayData::F32(values) => {
                    for (slot, &v) in out.iter_mut().zip(&values[start..start + keep]) {
                        *slot = R::from_f32(v);
                    }
                }
                ArrayData::F64(values) => {
                    for (slot, &v) in out.iter_mut().zip(&values[start..start + keep]) {
                        *slot = R::from_f64(v);
                    }
                }
            }
        });
        out
    }
}

/// Advises the kernel to drop the whole pages inside `bytes` (an address range) from this
/// process. Best effort: an error (or another OS) only leaves the pages resident.
///
/// # Safety
/// `bytes` must lie in a read-only `MAP_SHARED` mapping of a file. On anonymous or private
/// memory `MADV_DONTNEED` discards the contents (later reads see zeros).
unsafe fn drop_file_pages(bytes: Range<usize>) {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: sysconf has no preconditions.
        let page = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
            size if size > 0 => size as usize,
            _ => return,
        };
        // Only pages wholly inside the range: neighbours may hold other data.
        let start = bytes.start.div_ceil(page) * page;
        let end = bytes.end / page * page;
        if end > start {
            // SAFETY: page-aligned and inside the caller's read-only file mapping (see above).
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = bytes;
}

/// What happens on one side (input columns or output rows) of a matrix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Side {
    /// Left as is.
    All,
    /// The first `n` columns/rows are kept.
    Keep(usize),
    /// Rotated by `Q[:, :keep]` of the named array.
    Rotate { array: String, keep: usize },
}

impl Side {
    /// Width of this side after the op, given the width before.
    pub fn width(&self, before: usize) -> usize {
        match self {
            Side::All => before,
            Side::Keep(keep) | Side::Rotate { keep, .. } => *keep,
        }
    }
}

/// A computed tensor `out(Qₒᵀ · in(W · diag(α)))`, seen as a `rows × cols` matrix.
#[derive(Clone, Debug)]
pub struct Transform {
    pub source: TensorEntry,
    pub source_dtype: FloatDtype,
    pub rows: usize,
    pub cols: usize,
    pub col_scale: Option<TensorEntry>,
    pub input: Side,
    pub output: Side,
}

impl Transform {
    pub fn out_rows(&self) -> usize {
        self.output.width(self.rows)
    }

    pub fn out_cols(&self) -> usize {
        self.input.width(self.cols)
    }
}

#[derive(Clone, Debug)]
pub enum OpKind {
    /// Bytes copied verbatim.
    Copy(TensorEntry),
    Transform(Transform),
    Shortcut(Shortcut),
    Literal(String),
}

/// A validated op: the output tensor's name, dtype and shape are final.
#[derive(Clone, Debug)]
pub struct ResolvedOp {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub kind: OpKind,
}

impl ResolvedOp {
    pub fn nbytes(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.bitsize() / 8
    }

    /// The output dtype of a computed tensor (never called for copies).
    pub fn float_dtype(&self) -> FloatDtype {
        FloatDtype::from_safetensors(self.dtype).expect("computed tensors have float dtypes")
    }
}

/// Validates every op; `computed_dtype` is the default dtype of shortcuts (the precision's).
pub fn resolve(
    ops: &[TensorOp],
    checkpoint: &Checkpoint,
    arrays: &Arrays<'_>,
    computed_dtype: FloatDtype,
) -> Result<Vec<ResolvedOp>> {
    let mut names = HashSet::new();
    let mut resolved = Vec::with_capacity(ops.len());
    for op in ops {
        if op.name.is_empty() {
            return Err(DimcutError::InvalidPlan("an op has an empty name".into()));
        }
        if !names.insert(op.name.as_str()) {
            return Err(plan_error(
                op,
                "the output name appears twice in the plan".into(),
            ));
        }
        resolved.push(resolve_op(op, checkpoint, arrays, computed_dtype)?);
    }
    Ok(resolved)
}

fn plan_error(op: &TensorOp, message: String) -> DimcutError {
    DimcutError::InvalidPlan(format!("op {:?}: {message}", op.name))
}

fn resolve_op(
    op: &TensorOp,
    checkpoint: &Checkpoint,
    arrays: &Arrays<'_>,
    computed_dtype: FloatDtype,
) -> Result<ResolvedOp> {
    let origins = [
        op.source.is_some(),
        op.shortcut.is_some(),
        op.literal.is_some(),
    ];
    if origins.iter().filter(|&&set| set).count() != 1 {
        return Err(plan_error(
            op,
            "exactly one of source, shortcut, literal must be set".into(),
        ));
    }
    let (dtype, shape, kind) = if let Some(source) = &op.source {
        resolve_source(op, source, checkpoint, arrays)?
    } else if let Some(shortcut) = &op.shortcut {
        if op.has_input_ops() || op.has_output_ops() {
            return Err(plan_error(
                op,
                "a shortcut takes no scale, rotation or keep".into(),
            ));
        }
        let a = matrix_array(op, arrays, &shortcut.a, "shortcut")?;
        let b = matrix_array(op, arrays, &shortcut.b, "shortcut")?;
        if a.shape[0] != b.shape[0] {
            return Err(plan_error(
                op,
                format!(
                    "shortcut arrays {:?} {:?} and {:?} {:?} have different row counts",
                    shortcut.a, a.shape, shortcut.b, b.shape
                ),
            ));
        }
        for (array, keep, name) in [
            (a, shortcut.keep_a, &shortcut.a),
            (b, shortcut.keep_b, &shortcut.b),
        ] {
            check_keep(
                op,
                keep,
                array.shape[1],
                &format!("shortcut array {name:?}"),
            )?;
        }
        let dtype = op.dtype.unwrap_or(computed_dtype);
        let shape = vec![shortcut.keep_a, shortcut.keep_b];
        (
            dtype.to_safetensors(),
            shape,
            OpKind::Shortcut(shortcut.clone()),
        )
    } else {
        let name = op.literal.as_ref().expect("one origin is set");
        if op.has_input_ops() || op.has_output_ops() {
            return Err(plan_error(
                op,
                "a literal takes no scale, rotation or keep".into(),
            ));
        }
        let array = arrays
            .get(name)
            .ok_or_else(|| plan_error(op, format!("literal array {name:?} was not given")))?;
        let dtype = op.dtype.unwrap_or(array.dtype());
        let kind = OpKind::Literal(name.clone());
        (dtype.to_safetensors(), array.shape.clone(), kind)
    };
    Ok(ResolvedOp {
        name: op.name.clone(),
        dtype,
        shape,
        kind,
    })
}

impl TensorOp {
    fn has_input_ops(&self) -> bool {
        self.col_scale.is_some() || self.in_rotation.is_some() || self.in_keep.is_some()
    }

    fn has_output_ops(&self) -> bool {
        self.out_rotation.is_some() || self.out_keep.is_some()
    }
}

fn resolve_source(
    op: &TensorOp,
    source: &str,
    checkpoint: &Checkpoint,
    arrays: &Arrays<'_>,
) -> Result<(Dtype, Vec<usize>, OpKind)> {
    let entry = checkpoint.tensor(source).ok_or_else(|| {
        plan_error(
            op,
            format!(
                "source tensor {source:?} is not in the checkpoint {}",
                checkpoint.dir().display()
            ),
        )
    })?;
    let (has_in, has_out) = (op.has_input_ops(), op.has_output_ops());
    let same_dtype = op.dtype.is_none_or(|d| d.to_safetensors() == entry.dtype);
    if !has_in && !has_out && same_dtype {
        return Ok((
            entry.dtype,
            entry.shape.clone(),
            OpKind::Copy(entry.clone()),
        ));
    }
    let source_dtype = FloatDtype::from_safetensors(entry.dtype).ok_or_else(|| {
        plan_error(
            op,
            format!(
                "source tensor {source:?} has dtype {}: only F32, F16, BF16 and F64 tensors can \
                 be scaled, rotated, sliced or converted (other dtypes can only be copied)",
                entry.dtype
            ),
        )
    })?;
    let shape = &entry.shape;
    let (rows, cols) = match shape.len() {
        2 => (shape[0], shape[1]),
        1 if has_in && has_out => {
            return Err(plan_error(
                op,
                format!("1-D tensor {source:?} cannot take both input and output ops"),
            ))
        }
        1 if has_out => (shape[0], 1),
        1 => (1, shape[0]),
        _ if has_in || has_out => {
            return Err(plan_error(
                op,
                format!(
                    "scale/rotation/keep need a 1-D or 2-D tensor; {source:?} has shape {shape:?}"
                ),
            ))
        }
        // Dtype conversion only: any row-major view works; keep rows short for tiling.
        0 => (1, 1),
        _ => {
            let last = *shape.last().expect("ndim > 2");
            (entry.numel() / last.max(1), last)
        }
    };

    let col_scale = match &op.col_scale {
        None => None,
        Some(scale_name) => {
            let scale = checkpoint.tensor(scale_name).ok_or_else(|| {
                plan_error(
                    op,
                    format!("col_scale tensor {scale_name:?} is not in the checkpoint"),
                )
            })?;
            if FloatDtype::from_safetensors(scale.dtype).is_none() {
                return Err(plan_error(
                    op,
                    format!(
                        "col_scale tensor {scale_name:?} has non-float dtype {}",
                        scale.dtype
                    ),
                ));
            }
            if scale.shape != [cols] {
                return Err(plan_error(
                    op,
                    format!(
                        "col_scale tensor {scale_name:?} has shape {:?} but {source:?} (shape \
                         {shape:?}) has {cols} input columns",
                        scale.shape
                    ),
                ));
            }
            Some(scale.clone())
        }
    };
    let what = |side: &str| format!("{side} of {source:?} (shape {shape:?})");
    let input = resolve_side(
        op,
        arrays,
        &op.in_rotation,
        op.in_keep,
        cols,
        &what("input columns"),
        "in",
    )?;
    let output = resolve_side(
        op,
        arrays,
        &op.out_rotation,
        op.out_keep,
        rows,
        &what("output rows"),
        "out",
    )?;
    let transform = Transform {
        source: entry.clone(),
        source_dtype,
        rows,
        cols,
        col_scale,
        input,
        output,
    };
    let (out_rows, out_cols) = (transform.out_rows(), transform.out_cols());
    let out_shape = match shape.len() {
        2 => vec![out_rows, out_cols],
        1 => vec![out_rows * out_cols],
        _ => shape.clone(),
    };
    let dtype = op.dtype.unwrap_or(source_dtype).to_safetensors();
    Ok((dtype, out_shape, OpKind::Transform(transform)))
}

fn resolve_side(
    op: &TensorOp,
    arrays: &Arrays<'_>,
    rotation: &Option<String>,
    keep: Option<usize>,
    width: usize,
    what: &str,
    prefix: &str,
) -> Result<Side> {
    match (rotation, keep) {
        (None, None) => Ok(Side::All),
        (None, Some(keep)) => {
            check_keep(op, keep, width, what)?;
            Ok(Side::Keep(keep))
        }
        (Some(name), keep) => {
            let array = matrix_array(op, arrays, name, &format!("{prefix}_rotation"))?;
            if array.shape[0] != width {
                return Err(plan_error(
                    op,
                    format!(
                        "{prefix}_rotation {name:?} has shape {:?} but the {what} number {width}",
                        array.shape
                    ),
                ));
            }
            let keep = keep.unwrap_or(array.shape[1]);
            check_keep(
                op,
                keep,
                array.shape[1],
                &format!("{prefix}_rotation {name:?} columns"),
            )?;
            Ok(Side::Rotate {
                array: name.clone(),
                keep,
            })
        }
    }
}

fn check_keep(op: &TensorOp, keep: usize, available: usize, what: &str) -> Result<()> {
    if keep > available {
        return Err(plan_error(
            op,
            format!("keeps {keep} but the {what} number {available}"),
        ));
    }
    Ok(())
}

fn matrix_array<'r, 'a>(
    op: &TensorOp,
    arrays: &'r Arrays<'a>,
    name: &str,
    role: &str,
) -> Result<&'r ArrayRef<'a>> {
    let array = arrays
        .get(name)
        .ok_or_else(|| plan_error(op, format!("{role} array {name:?} was not given")))?;
    if array.shape.len() != 2 {
        return Err(plan_error(
            op,
            format!(
                "{role} array {name:?} must be 2-D, has shape {:?}",
                array.shape
            ),
        ));
    }
    Ok(array)
}
