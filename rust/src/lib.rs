//! dimcut engine: rewrites a safetensors checkpoint by a plan of per-tensor ops (column scaling,
//! rotation and slicing of inputs/outputs, shortcuts, literals), out of core and tile by tile.
//!
//! The modules know nothing of Python; `python` (feature `python`) is the only pyo3 glue.

pub mod background;
pub mod checkpoint;
pub mod engine;
pub mod error;
pub mod kernels;
pub mod layout;
pub mod manifest;
pub mod plan;
pub mod shards;
pub mod staging;
pub mod tiling;

#[cfg(feature = "python")]
mod python;

pub use engine::{
    inspect_checkpoint, rewrite_checkpoint, rewrite_tensors, Options, OutputValues, Precision,
    Stats, TensorSummary, TensorValues,
};
pub use error::{DimcutError, Result};
pub use kernels::FloatDtype;
pub use plan::{ArrayData, ArrayRef, Arrays, Backing, Shortcut, TensorOp};
