"""dimcut: cut an LLM's hidden dimension (SliceGPT) out of core, and predict what the cut costs.

Importing dimcut is cheap: every public name below is imported from its module on first use
(PEP 562), so `dimcut --help`, `dimcut fit` and `dimcut predict` never import torch.
"""

from __future__ import annotations

import importlib

from dimcut import _register
from dimcut._core import DimcutError
from dimcut.runtime import package_version

__version__ = package_version()

# Public name -> the module that defines it.
_EXPORTS = {
    "Architecture": "dimcut.architectures",
    "load_architecture": "dimcut.architectures",
    "sliced_width": "dimcut.architectures",
    "Format": "dimcut.plan",
    "Method": "dimcut.plan",
    "Calibrated": "dimcut.calibration",
    "Weighting": "dimcut.calibration",
    "calibrate": "dimcut.calibration",
    "load_rotations": "dimcut.calibration",
    "save_rotations": "dimcut.calibration",
    "TensorOp": "dimcut.engine",
    "inspect_checkpoint": "dimcut.engine",
    "rewrite_checkpoint": "dimcut.engine",
    "rewrite_tensors": "dimcut.engine",
    "evaluate": "dimcut.evaluation",
    "perplexity": "dimcut.evaluation",
    "count_parameters": "dimcut.formats",
    "load": "dimcut.formats",
    "HealOptions": "dimcut.healing",
    "HealResult": "dimcut.healing",
    "LoraSettings": "dimcut.healing",
    "heal": "dimcut.healing",
    "FitReport": "dimcut.laws",
    "HoldoutCheck": "dimcut.laws",
    "check_holdout": "dimcut.laws",
    "LineFit": "dimcut.laws",
    "MetricFit": "dimcut.laws",
    "ModelFit": "dimcut.laws",
    "Prediction": "dimcut.laws",
    "Record": "dimcut.laws",
    "fit_line": "dimcut.laws",
    "fit_records": "dimcut.laws",
    "group_by_model": "dimcut.laws",
    "load_records": "dimcut.laws",
    "max_sparsity": "dimcut.laws",
    "plot_fits": "dimcut.laws",
    "predict": "dimcut.laws",
    "SliceResult": "dimcut.slicing",
    "slice_model": "dimcut.slicing",
    "write_sliced_model": "dimcut.slicing",
}

__all__ = [
    "Architecture",
    "Calibrated",
    "DimcutError",
    "FitReport",
    "Format",
    "HealOptions",
    "HealResult",
    "HoldoutCheck",
    "LineFit",
    "LoraSettings",
    "Method",
    "MetricFit",
    "ModelFit",
    "Prediction",
    "Record",
    "SliceResult",
    "TensorOp",
    "Weighting",
    "__version__",
    "calibrate",
    "check_holdout",
    "count_parameters",
    "evaluate",
    "fit_line",
    "fit_records",
    "group_by_model",
    "heal",
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


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dimcut' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


# `import dimcut` lets AutoModelForCausalLM load slicegpt-format outputs without remote code.
_register.install()
