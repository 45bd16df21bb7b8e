//! The one error type of the engine; the Python glue maps each variant to an exception.

use std::path::PathBuf;

/// Everything that can go wrong while reading a checkpoint, validating a plan or writing output.
#[derive(Debug, thiserror::Error)]
pub enum DimcutError {
    /// An operating-system error on a file or directory.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A file the checkpoint needs does not exist (`reason` says who needs it).
    #[error("{}: {reason}", path.display())]
    MissingFile { path: PathBuf, reason: String },

    /// A safetensors file or index that cannot be trusted: bad header, truncated data, ...
    #[error("{}: {reason}", path.display())]
    InvalidCheckpoint { path: PathBuf, reason: String },

    /// The plan (ops and arrays) does not fit the checkpoint.
    #[error("{0}")]
    InvalidPlan(String),

    /// An option or path argument is not acceptable (precision, out_dir inside src_dir, ...).
    #[error("{0}")]
    InvalidArgument(String),

    /// The output directory exists and `overwrite` was not given.
    #[error("{}: output directory exists (pass overwrite=True to replace it)", .0.display())]
    OutputExists(PathBuf),

    /// Another dimcut run holds the output's lock.
    #[error("{}: another dimcut run is writing this output right now; wait for it or choose another output", .0.display())]
    OutputBusy(PathBuf),

    /// A float tensor about to be written holds NaN or ±Inf.
    #[error("output tensor {tensor:?} would contain NaN or Inf (its source weights are not finite); refusing to write {}", path.display())]
    NonFinite { tensor: String, path: PathBuf },

    /// The progress callback asked to stop (e.g. it raised, or Ctrl-C was pressed).
    #[error("interrupted by the progress callback")]
    Interrupted,
}

pub type Result<T, E = DimcutError> = std::result::Result<T, E>;

/// Attaches a path to an `io::Error`, for `map_err`.
pub(crate) fn io_error(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> DimcutError {
    let path = path.into();
    move |source| DimcutError::Io { path, source }
}
