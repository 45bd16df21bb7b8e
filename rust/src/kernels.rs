//! Numeric kernels: dtype conversion of tiles and matrix products via the `gemm` crate.
//!
//! Conversions run in parallel over rayon's *current* pool and `gemm` uses the same pool, so
//! the caller controls the thread count with one `ThreadPool::install` (no nested pools).

#[cfg(test)]
use half::bf16;
use half::f16;
use rayon::prelude::*;
use safetensors::Dtype;
use std::str::FromStr;

/// The floating-point dtypes the engine can compute on; every other dtype is copy-only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FloatDtype {
    F16,
    BF16,
    F32,
    F64,
}

impl FloatDtype {
    pub fn from_safetensors(dtype: Dtype) -> Option<Self> {
        match dtype {
            Dtype::F16 => Some(Self::F16),
            Dtype::BF16 => Some(Self::BF16),
            Dtype::F32 => Some(Self::F32),
            Dtype::F64 => Some(Self::F64),
            _ => None,
        }
    }

    pub fn to_safetensors(self) -> Dtype {
        match self {
            Self::F16 => Dtype::F16,
            Self::BF16 => Dtype::BF16,
            Self::F32 => Dtype::F32,
            Self::F64 => Dtype::F64,
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::F16 | Self::BF16 => 2,
            Self::F32 => 4,
            Self::F64 => 8,
        }
    }
}

impl FromStr for FloatDtype {
    type Err = String;
    fn from_str(name: &str) -> Result<Self, String> {
        match name {
            "F16" => Ok(Self::F16),
            "BF16" => Ok(Self::BF16),
            "F32" => Ok(Self::F32),
            "F64" => Ok(Self::F64),
            _ => Err(format!(
                "unknown dtype {name:?} (expected \"F32\", \"F16\", \"BF16\" or \"F64\")"
            )),
        }
    }
}

/// The arithmetic precision: `f32` or `f64`.
pub trait Real:
    Copy + Default + Send + Sync + PartialEq + std::fmt::Debug + std::ops::Mul<Output = Self> + 'static
{
    /// The dtype that stores this precision exactly.
    const DTYPE: FloatDtype;
    fn from_f32(value: f32) -> Self;
    fn from_f64(value: f64) -> Self;
    fn to_f64(self) -> f64;
    /// Rounds to bfloat16 (to nearest, ties to even) and returns the bits.
    fn to_bf16_bits(self) -> u16;
    /// Rounds to IEEE half (to nearest, ties to even) and returns the bits.
    fn to_f16_bits(self) -> u16;
    /// Rounds to f32 (to nearest, ties to even).
    fn to_f32(self) -> f32;
}

impl Real for f32 {
    const DTYPE: FloatDtype = FloatDtype::F32;
    fn from_f32(value: f32) -> Self {
        value
    }
    fn from_f64(value: f64) -> Self {
        value as f32
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn to_bf16_bits(self) -> u16 {
        bf16_bits_from_f32(self)
    }
    fn to_f16_bits(self) -> u16 {
        f16::from_f32(self).to_bits()
    }
    fn to_f32(self) -> f32 {
        self
    }
}

impl Real for f64 {
    const DTYPE: FloatDtype = FloatDtype::F64;
    fn from_f32(value: f32) -> Self {
        value as f64
    }
    fn from_f64(value: f64) -> Self {
        value
    }
    fn to_f64(self) -> f64 {
        self
    }
    // `half`'s f64 conversions drop the low 32 mantissa bits before rounding, which can break
    // ties wrongly; rounding to odd first keeps the final rounding correct (f32 has > 2 extra bits).
    fn to_bf16_bits(self) -> u16 {
        bf16_bits_from_f32(f32_round_to_odd(self))
    }
    fn to_f16_bits(self) -> u16 {
        f16::from_f32(f32_round_to_odd(self)).to_bits()
    }
    fn to_f32(self) -> f32 {
        self as f32
    }
}

/// f32 → bfloat16 bits, rounding to nearest even; NaNs stay (quiet) NaNs. Branch-light so the
/// compiler vectorises it; bit-identical to `half::bf16::from_f32`.
#[inline]
pub fn bf16_bits_from_f32(value: f32) -> u16 {
    let bits = value.to_bits();
    if bits & 0x7FFF_FFFF > 0x7F80_0000 {
        return ((bits >> 16) | 0x0040) as u16;
    }
    let lsb = (bits >> 16) & 1;
    (bits.wrapping_add(0x7FFF + lsb) >> 16) as u16
}

/// f64 → f32 rounding to odd: truncate toward zero, then set the last bit if anything was lost.
/// A later round-to-nearest-even to a format with ≥ 2 fewer bits is then correctly rounded.
pub fn f32_round_to_odd(value: f64) -> f32 {
    let nearest = value as f32;
    if !value.is_finite() || nearest as f64 == value {
        return nearest;
    }
    let truncated = if (nearest as f64).abs() > value.abs() {
        // One step toward zero (`nearest` is nonzero here since it overshoots |value|).
        f32::from_bits(nearest.to_bits() - 1)
    } else {
        nearest
    };
    f32::from_bits(truncated.to_bits() | 1)
}

fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// Rows converted per rayon task: big enough to amortise scheduling, small enough to balance.
const ELEMENTS_PER_TASK: usize = 1 << 14;

/// Decodes little-endian values of `dtype` into `out` (one element per `out` slot).
pub fn decode_into<R: Real>(dtype: FloatDtype, bytes: &[u8], out: &mut [R]) {
    let size = dtype.size();
    assert_eq!(
        bytes.len(),
        out.len() * size,
        "decode: byte length mismatch"
    );
    out.par_chunks_mut(ELEMENTS_PER_TASK)
        .zip(bytes.par_chunks(ELEMENTS_PER_TASK * size))
        .for_each(|(out, bytes)| decode_serial(dtype, bytes, out, None));
}

/// Decodes one run of elements, multiplying by `scale` element-wise when given.
fn decode_serial<R: Real>(dtype: FloatDtype, bytes: &[u8], out: &mut [R], scale: Option<&[R]>) {
    match dtype {
        FloatDtype::BF16 => {
            for (slot, chunk) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *slot = R::from_f32(bf16_to_f32(u16::from_le_bytes([chunk[0], chunk[1]])));
            }
        }
        FloatDtype::F16 => {
            for (slot, chunk) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *slot = R::from_f32(f16::from_le_bytes([chunk[0], chunk[1]]).to_f32());
            }
        }
        FloatDtype::F32 => {
            for (slot, chunk) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *slot = R::from_f32(f32::from_le_bytes(chunk.try_into().unwrap()));
            }
        }
        FloatDtype::F64 => {
            for (slot, chunk) in out.iter_mut().zip(bytes.chunks_exact(8)) {
                *slot = R::from_f64(f64::from_le_bytes(chunk.try_into().unwrap()));
            }
        }
    }
    if let Some(scale) = scale {
        for (slot, &factor) in out.iter_mut().zip(scale) {
            *slot = *slot * factor;
        }
    }
}

/// A rectangular block `rows × cols` of a row-major matrix stored as raw bytes.
#[derive(Clone, Debug)]
pub struct ByteBlock<'a> {
    pub bytes: &'a [u8],
    pub dtype: FloatDtype,
    /// Columns of the whole matrix (the row pitch).
    pub matrix_cols: usize,
    pub rows: std::ops::Range<usize>,
    pub cols: std::ops::Range<usize>,
}

/// Decodes `block` into `out` (row-major `rows × cols`), scaling column `j` by `col_scale[j]`
/// (indexed by the matrix column). Parallel over rows.
pub fn decode_block<R: Real>(block: ByteBlock<'_>, col_scale: Option<&[R]>, out: &mut [R]) {
    let width = block.cols.len();
    let size = block.dtype.size();
    assert_eq!(
        out.len(),
        block.rows.len() * width,
        "decode_block: output size"
    );
    if width == 0 {
        return;
    }
    let scale = col_scale.map(|scale| &scale[block.cols.clone()]);
    let rows_per_task = (ELEMENTS_PER_TASK / width).max(1);
    out.par_chunks_mut(rows_per_task * width)
        .enumerate()
        .for_each(|(task, out)| {
            let first_row = block.rows.start + task * rows_per_task;
            for (i, out_row) in out.chunks_exact_mut(width).enumerate() {
                let start = ((first_row + i) * block.matrix_cols + block.cols.start) * size;
                let bytes = &block.bytes[start..start + width * size];
                decode_serial(block.dtype, bytes, out_row, scale);
            }
        });
}

/// Encodes `values` as little-endian `dtype` into `out`, rounding to nearest even.
pub fn encode_into<R: Real>(values: &[R], dtype: FloatDtype, out: &mut [u8]) {
    let size = dtype.size();
    assert_eq!(
        out.len(),
        values.len() * size,
        "encode: byte length mismatch"
    );
    out.par_chunks_mut(ELEMENTS_PER_TASK * size)
        .zip(values.par_chunks(ELEMENTS_PER_TASK))
        .for_each(|(out, values)| encode_serial(values, dtype, out));
}

fn encode_serial<R: Real>(values: &[R], dtype: FloatDtype, out: &mut [u8]) {
    match dtype {
        FloatDtype::BF16 => {
            for (chunk, value) in out.chunks_exact_mut(2).zip(values) {
                chunk.copy_from_slice(&value.to_bf16_bits().to_le_bytes());
            }
        }
        FloatDtype::F16 => {
            for (chunk, value) in out.chunks_exact_mut(2).zip(values) {
                chunk.copy_from_slice(&value.to_f16_bits().to_le_bytes());
            }
        }
        FloatDtype::F32 => {
            for (chunk, value) in out.chunks_exact_mut(4).zip(values) {
                chunk.copy_from_slice(&value.to_f32().to_le_bytes());
            }
        }
        FloatDtype::F64 => {
            for (chunk, value) in out.chunks_exact_mut(8).zip(values) {
                chunk.copy_from_slice(&value.to_f64().to_le_bytes());
            }
        }
    }
}

/// Decodes a value that `encode_into` produced, for tests and the in-memory API.
pub fn decode_vec<R: Real>(dtype: FloatDtype, bytes: &[u8]) -> Vec<R> {
    let mut out = vec![R::default(); bytes.len() / dtype.size()];
    decode_into(dtype, bytes, &mut out);
    out
}

/// A strided read-only matrix view: element `(i, j)` is `data[i * row_stride + j * col_stride]`.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a, R> {
    data: &'a [R],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a, R> MatRef<'a, R> {
    /// A contiguous row-major `rows × cols` matrix.
    pub fn row_major(data: &'a [R], rows: usize, cols: usize) -> Self {
        assert_eq!(
            data.len(),
            rows * cols,
            "row_major: data length != rows × cols"
        );
        Self {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    pub fn transpose(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    /// The sub-matrix of rows `rows` and columns `cols`.
    pub fn block(self, rows: std::ops::Range<usize>, cols: std::ops::Range<usize>) -> Self {
        assert!(
            rows.end <= self.rows && cols.end <= self.cols,
            "block out of bounds"
        );
        let offset = rows.start * self.row_stride + cols.start * self.col_stride;
        let data = if rows.is_empty() || cols.is_empty() {
            &self.data[..0]
        } else {
            &self.data[offset..]
        };
        Self {
            data,
            rows: rows.len(),
            cols: cols.len(),
            ..self
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// True when every element the view names lies inside `data`.
    fn in_bounds(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride
                < self.data.len()
    }
}

/// `dst = lhs · rhs` (or `dst += lhs · rhs` when `accumulate`), `dst` row-major contiguous.
/// Returns the flop count (2·m·n·k). `gemm` parallelises over rayon's current pool.
pub fn matmul<R: Real>(
    dst: &mut [R],
    accumulate: bool,
    lhs: MatRef<'_, R>,
    rhs: MatRef<'_, R>,
) -> u64 {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    assert_eq!(rhs.rows, k, "matmul: inner dimensions differ");
    assert_eq!(dst.len(), m * n, "matmul: destination size");
    assert!(
        lhs.in_bounds() && rhs.in_bounds(),
        "matmul: view out of bounds"
    );
    if m == 0 || n == 0 {
        return 0;
    }
    if k == 0 {
        if !accumulate {
            dst.fill(R::default());
        }
        return 0;
    }
    let one = R::from_f32(1.0);
    // SAFETY: the views were checked to stay inside their slices, `dst` holds m·n elements
    // with row stride n, and `R` is f32 or f64, both supported by `gemm`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.data.as_ptr(),
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            one,
            one,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(0),
        );
    }
    2 * (m * n * k) as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn naive(a: &[f64], b: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|l| a[i * k + l] * b[l * n + j]).sum();
            }
        }
        c
    }

    #[test]
    fn every_bf16_round_trips_through_f32() {
        for bits in 0..=u16::MAX {
            let value = bf16_to_f32(bits);
            if value.is_nan() {
                assert!(bf16_to_f32(bf16_bits_from_f32(value)).is_nan());
            } else {
                assert_eq!(bf16_bits_from_f32(value), bits);
                assert_eq!((value as f64).to_bf16_bits(), bits);
            }
        }
    }

    #[test]
    fn every_f16_round_trips_through_f32_and_f64() {
        for bits in 0..=u16::MAX {
            let value = f16::from_bits(bits).to_f32();
            if !value.is_nan() {
                assert_eq!(value.to_f16_bits(), bits);
                assert_eq!((value as f64).to_f16_bits(), bits);
            }
        }
    }

    #[test]
    fn f64_ties_round_to_even_not_by_truncation() {
        // 1 + 2^-8 is a tie between bf16 1.0 and 1.0078125; a tiny excess must round up.
        let just_above_tie = 1.0 + 2f64.powi(-8) + 2f64.powi(-40);
        assert_eq!(
            just_above_tie.to_bf16_bits(),
            bf16::from_f32(1.0078125).to_bits()
        );
        assert_eq!((1.0 + 2f64.powi(-8)).to_bf16_bits(), bf16::ONE.to_bits());
    }

    #[test]
    fn matmul_of_transposed_blocks() {
        let a: Vec<f64> = (0..20).map(|x| x as f64 * 0.5 - 3.0).collect(); // 4 × 5
        let b: Vec<f64> = (0..15).map(|x| (x * x) as f64 * 0.1).collect(); // 5 × 3
        let mut c = vec![0.0; 12];
        matmul(
            &mut c,
            false,
            MatRef::row_major(&a, 4, 5),
            MatRef::row_major(&b, 5, 3),
        );
        for (got, want) in c.iter().zip(naive(&a, &b, 4, 5, 3)) {
            assert!((got - want).abs() < 1e-12, "{got} vs {want}");
        }

        // (aᵀ)[1..4, :] · a[:, 2..5] using strided views only.
        let at = MatRef::row_major(&a, 4, 5).transpose().block(1..4, 0..4);
        let right = MatRef::row_major(&a, 4, 5).block(0..4, 2..5);
        let mut d = vec![1.0; 9];
        matmul(&mut d, true, at, right);
        for i in 0..3 {
            for j in 0..3 {
                let expected: f64 = (0..4).map(|l| a[l * 5 + i + 1] * a[l * 5 + j + 2]).sum();
                assert!((d[i * 3 + j] - 1.0 - expected).abs() < 1e-9);
            }
        }
    }

    proptest! {
        #[test]
        fn bf16_from_f32_matches_half(bits in any::<u32>()) {
            let value = f32::from_bits(bits);
            prop_assert_eq!(bf16_bits_from_f32(value), bf16::from_f32(value).to_bits());
        }

        #[test]
        fn f64_to_bf16_is_correctly_rounded(value in -1e30f64..1e30) {
            let bits = value.to_bf16_bits();
            let rounded = bf16::from_bits(bits).to_f64();
            // The neighbours one bf16 step either side are never strictly closer, and a tie
            // goes to the even mantissa.
            for neighbour in [bits.wrapping_sub(1), bits.wrapping_add(1)] {
                let other = bf16::from_bits(neighbour).to_f64();
                if other.is_finite() && other.signum() == rounded.signum() {
                    let (d_self, d_other) = ((rounded - value).abs(), (other - value).abs());
                    prop_assert!(d_self < d_other || (d_self == d_other && bits % 2 == 0));
                }
            }
        }

        #[test]
        fn f64_to_f16_is_correctly_rounded(value in -60000f64..60000.0) {
            let bits = value.to_f16_bits();
            let rounded = f16::from_bits(bits).to_f64();
            for neighbour in [bits.wrapping_sub(1), bits.wrapping_add(1)] {
                let other = f16::from_bits(neighbour).to_f64();
                if other.is_finite() && other.signum() == rounded.signum() {
                    let (d_self, d_other) = ((rounded - value).abs(), (other - value).abs());
                    prop_assert!(d_self < d_other || (d_self == d_other && bits % 2 == 0));
                }
            }
        }

        #[test]
        fn encode_decode_round_trips(values in proptest::collection::vec(-1e4f32..1e4, 0..300)) {
            for dtype in [FloatDtype::BF16, FloatDtype::F16, FloatDtype::F32, FloatDtype::F64] {
                let mut bytes = vec![0u8; values.len() * dtype.size()];
                encode_into(&values, dtype, &mut bytes);
                let once: Vec<f32> = decode_vec(dtype, &bytes);
                let mut again = vec![0u8; bytes.len()];
                encode_into(&once, dtype, &mut again);
                prop_assert_eq!(&bytes, &again);
                if dtype == FloatDtype::BF16 {
                    let expected: Vec<f32> =
                        values.iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
                    prop_assert_eq!(once, expected);
                }
            }
        }

        #[test]
        fn decode_block_picks_the_right_elements(
            rows in 1usize..9, cols in 1usize..9, seed in any::<u64>()
        ) {
            let values: Vec<f32> = (0..rows * cols)
                .map(|i| ((i as u64 ^ seed) % 1000) as f32 - 500.0)
                .collect();
            let mut bytes = vec![0u8; values.len() * 2];
            encode_into(&values, FloatDtype::BF16, &mut bytes);
            let (r0, c0) = ((seed as usize) % rows, (seed as usize >> 8) % cols);
            let scale: Vec<f32> = (0..cols).map(|j| j as f32 + 1.0).collect();
            let block = ByteBlock {
                bytes: &bytes, dtype: FloatDtype::BF16, matrix_cols: cols,
                rows: r0..rows, cols: c0..cols,
            };
            let mut out = vec![0f32; (rows - r0) * (cols - c0)];
            decode_block(block, Some(&scale), &mut out);
            for i in r0..rows {
                for j in c0..cols {
                    let expected = bf16::from_f32(values[i * cols + j]).to_f32() * scale[j];
                    prop_assert_eq!(out[(i - r0) * (cols - c0) + (j - c0)], expected);
                }
            }
        }

        #[test]
        fn matmul_matches_naive(m in 1usize..40, k in 1usize..40, n in 1usize..40) {
            let a: Vec<f64> = (0..m * k).map(|i| ((i * 7) % 11) as f64 - 5.0).collect();
            let b: Vec<f64> = (0..k * n).map(|i| ((i * 3) % 13) as f64 - 6.0).collect();
            let mut c = vec![0.0; m * n];
            let flops = matmul(&mut c, false, MatRef::row_major(&a, m, k), MatRef::row_major(&b, k, n));
            prop_assert_eq!(c, naive(&a, &b, m, k, n));
            prop_assert_eq!(flops, 2 * (m * n * k) as u64);
        }
    }
}
