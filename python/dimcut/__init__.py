"""dimcut: cut an LLM's hidden dimension (SliceGPT) out of core, and predict what the cut costs."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dimcut")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"

from dimcut._core import DimcutError
from dimcut.architectures import Architecture, load_architecture, sliced_width
from dimcut.calibration import Calibrated, calibrate, load_rotations, save_rotations
from dimcut.engine import TensorOp, inspect_checkpoint, rewrite_checkpoint, rewrite_tensors
from dimcut.evaluation import evaluate, perplexity
from dimcut.formats import count_parameters, load
from dimcut.laws import (
    FitReport,
    LineFit,
    MetricFit,
    ModelFit,
    Prediction,
    Record,
    fit_line,
    fit_records,
    group_by_model,
    load_records,
    max_sparsity,
    plot_fits,
    predict,
)
from dimcut.modeling_dimcut import register_auto_classes
from dimcut.slicing import SliceResult, slice_model, write_sliced_model

# `import dimcut` lets AutoModelForCausalLM load slicegpt-format outputs without remote code.
register_auto_classes()

__all__ = [
    "Architecture",
    "Calibrated",
    "DimcutError",
    "FitReport",
    "LineFit",
    "MetricFit",
    "ModelFit",
    "Prediction",
    "Record",
    "SliceResult",
    "TensorOp",
    "__version__",
    "calibrate",
    "count_parameters",
    "evaluate",
    "fit_line",
    "fit_records",
    "group_by_model",
    "inspect_checkpoint",
    "load",
    "load_architecture",
    "load_records",
    "load_rotations",
    "max_sparsity",
    "perplexity",
    "plot_fits",
    "predict",
    "rewrite_checkpoint",
    "rewrite_tensors",
    "save_rotations",
    "slice_model",
    "sliced_width",
    "write_sliced_model",
]
