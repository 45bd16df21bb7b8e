"""dimcut: cut an LLM's hidden dimension (SliceGPT) out of core, and predict what the cut costs."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dimcut")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"

from dimcut._core import DimcutError
from dimcut.architectures import Architecture, load_architecture, sliced_width
from dimcut.calibration import Calibrated, calibrate, load_rotations, save_rotations
from dimcut.formats import count_parameters, load
from dimcut.modeling_dimcut import register_auto_classes
from dimcut.slicing import SliceResult, slice_model, write_sliced_model
from dimcut.evaluation import evaluate, perplexity
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

# `import dimcut` lets AutoModelForCausalLM load slicegpt-format outputs without remote code.
register_auto_classes()

__all__ = [
    "Architecture",
    "Calibrated",
    "DimcutError",
    "SliceResult",
    "calibrate",
    "count_parameters",
    "load",
    "load_architecture",
    "load_rotations",
    "save_rotations",
    "slice_model",
    "sliced_width",
    "write_sliced_model",
    "FitReport",
    "LineFit",
    "MetricFit",
    "ModelFit",
    "Prediction",
    "Record",
    "__version__",
    "evaluate",
    "fit_line",
    "fit_records",
    "group_by_model",
    "load_records",
    "max_sparsity",
    "perplexity",
    "plot_fits",
    "predict",
]
