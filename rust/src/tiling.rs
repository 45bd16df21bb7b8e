//! How a tensor is cut into tiles so that working memory stays within a byte budget.

use std::ops::Range;

/// Consecutive ranges of at most `block` covering `0..len` (the last one may be shorter).
pub fn blocks(len: usize, block: usize) -> impl Iterator<Item = Range<usize>> {
    let block = block.max(1);
    (0..len.div_ceil(block)).map(move |i| i * block..((i + 1) * block).min(len))
}

/// Rows per tile when each row costs `bytes_per_row` of working memory: as many as fit in
/// `budget`, at least one, at most `rows`.
pub fn rows_per_tile(budget: usize, bytes_per_row: usize, rows: usize) -> usize {
    (budget / bytes_per_row.max(1)).clamp(1, rows.max(1))
}

/// Tile shape for an output rotation `Y = Qᵀ W` computed one column block at a time: the
/// accumulator holds `out_rows × col_block` values and each step reads `row_block` rows of W.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ColumnTiling {
    pub col_block: usize,
    pub row_block: usize,
}

impl ColumnTiling {
    /// `elem` is the arithmetic element size; `full_row_cols` is how many columns of W a row
    /// step must decode besides the block (the whole width when an input rotation mixes
    /// columns, else 0); `source_row_bytes` the mapped source bytes of one row. Half the budget
    /// goes to the accumulator, the rest to the row steps.
    pub fn new(
        budget: usize,
        elem: usize,
        src_rows: usize,
        out_rows: usize,
        out_cols: usize,
        full_row_cols: usize,
        source_row_bytes: usize,
    ) -> Self {
        let col_block = (budget / 2 / (out_rows.max(1) * elem)).clamp(1, out_cols.max(1));
        let left = budget.saturating_sub(out_rows * col_block * elem);
        let per_row = (col_block + full_row_cols) * elem + source_row_bytes;
        let row_block = rows_per_tile(left, per_row, src_rows);
        Self {
            col_block,
            row_block,
        }
    }

    /// Working bytes this tiling needs.
    pub fn bytes(
        &self,
        elem: usize,
        out_rows: usize,
        full_row_cols: usize,
        source_row_bytes: usize,
    ) -> usize {
        (out_rows * self.col_block + self.row_block * (self.col_block + full_row_cols)) * elem
            + self.row_block * source_row_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn blocks_cover_exactly_once(len in 0usize..2000, block in 0usize..300) {
            let ranges: Vec<_> = blocks(len, block).collect();
            let mut next = 0;
            for range in &ranges {
                prop_assert_eq!(range.start, next);
                prop_assert!(!range.is_empty() && range.len() <= block.max(1));
                next = range.end;
            }
            prop_assert_eq!(next, len);
        }

        #[test]
        fn row_tiles_fit_the_budget(budget in 0usize..1 << 20, per_row in 1usize..5000, rows in 1usize..5000) {
            let tile = rows_per_tile(budget, per_row, rows);
            prop_assert!((1..=rows).contains(&tile));
            prop_assert!(tile * per_row <= budget || tile == 1);
            prop_assert!(tile == rows || (tile + 1) * per_row > budget);
        }

        #[test]
        fn column_tiles_fit_the_budget(
            budget in 0usize..1 << 22, src_rows in 1usize..3000, out_rows in 1usize..3000,
            out_cols in 1usize..3000, mixes in any::<bool>(),
        ) {
            let full = if mixes { out_cols + 7 } else { 0 };
            let row_bytes = out_cols * 2;
            let tiling =
                ColumnTiling::new(budget, 4, src_rows, out_rows, out_cols, full, row_bytes);
            prop_assert!((1..=out_cols).contains(&tiling.col_block));
            prop_assert!((1..=src_rows).contains(&tiling.row_block));
            let minimal = tiling.col_block == 1 || tiling.row_block == 1;
            prop_assert!(tiling.bytes(4, out_rows, full, row_bytes) <= budget || minimal);
        }
    }
}
