"""The sparsity laws of arXiv 2503.04377: fit them to evaluated models, plot them, predict with them.

The x-axis is the *effective* sparsity s = 1 − d/D (d the sliced hidden width, D the dense one).

* perplexity:      ln(PPL0)/ln(PPL) = a·s + b   (theory: a = −1, b = 1)
* accuracy (task): ln(acc/acc0)     = a·s + b   (the paper: a < 0, b ≈ 0)

PPL0 and acc0 are the dense model's values; acc is a task's headline metric. The dense record is a
measured point (s = 0, y = 1 for perplexity, y = 0 for accuracy) and takes part in free-intercept
fits. With a fixed intercept (b = 1 or b = 0) that point is the constraint itself, so it is left
out of the fit's n, RMSE and R² (it would only add a zero residual and a spurious degree of freedom).

Records are `dimcut.results/1` JSON files (docs/results-schema.md), grouped by `model.label` and
cut variant (`records.cut_variant`); the perplexity law is fitted per evaluation text.

Modules, each importing only those before it: `records` (loading, merging, grouping), `stats`
(least squares, Student's t), `fit` (the laws per model and variant, fit.json), `predict`,
`holdout` (predicted vs measured at held-out cuts), `plot` (matplotlib), `cli` (`dimcut fit`,
`dimcut predict`).
"""

from dimcut.laws.cli import add_commands
from dimcut.laws.fit import FitReport, MetricFit, ModelFit, fit_records
from dimcut.laws.holdout import HoldoutCheck, check_holdout
from dimcut.laws.plot import plot_fits
from dimcut.laws.predict import Prediction, max_sparsity, predict
from dimcut.laws.records import Record, group_by_model, load_records
from dimcut.laws.stats import LineFit, fit_line

__all__ = [
    "FitReport",
    "HoldoutCheck",
    "LineFit",
    "MetricFit",
    "ModelFit",
    "Prediction",
    "Record",
    "add_commands",
    "check_holdout",
    "fit_line",
    "fit_records",
    "group_by_model",
    "load_records",
    "max_sparsity",
    "plot_fits",
    "predict",
]
