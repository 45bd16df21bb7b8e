"""Predictions from fitted laws: the metrics at a sparsity, or the largest sparsity in a budget."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, replace

from dimcut.laws.fit import PERPLEXITY, MetricFit, ModelFit
from dimcut.laws.stats import LineFit

PREDICTION_SCHEMA = "dimcut.prediction/1"
# How far beyond the largest fitted sparsity predictions are still made (as a fraction of it).
EXTRAPOLATION_MARGIN = 0.25
WIDTH_MULTIPLE = 8  # sliced widths are multiples of 8, as `dimcut slice` makes them
_BELOW_ONE = math.nextafter(1.0, 0.0)


@dataclass(frozen=True)
class Prediction:
    """A metric predicted by a fitted law at one sparsity."""

    label: str
    metric: str
    measure: str
    sparsity: float  # the effective sparsity the prediction is for
    value: float  # predicted PPL or accuracy
    interval: tuple[float, float]  # prediction interval (inf: unbounded perplexity)
    confidence: float
    y: float
    y_interval: tuple[float, float]
    hidden_size: int | None  # d, when D is known
    extrapolated: bool  # beyond the fitted range (but within the allowed margin)
    budget: float | None = None  # the budget of an inverse prediction

    def to_dict(self) -> dict:
        def bound(v: float) -> float | None:
            return v if math.isfinite(v) else None  # JSON has no infinity: null = unbounded

        return {
            "model": self.label,
            "metric": self.metric,
            "measure": self.measure,
            "sparsity": self.sparsity,
            "hidden_size": self.hidden_size,
            "value": self.value,
            "interval": [bound(v) for v in self.interval],
            "confidence": self.confidence,
            "y": self.y,
            "y_interval": list(self.y_interval),
            "extrapolated": self.extrapolated,
            "budget": self.budget,
        }


def predict(
    model: ModelFit,
    sparsity: float,
    *,
    metrics: Iterable[str] | None = None,
    confidence: float = 0.95,
    allow_extrapolation: bool = False,
    hidden_size: int | None = None,
) -> list[Prediction]:
    """Predict each metric (default: all) at effective sparsity `sparsity`.

    `hidden_size` (D) overrides the one from the records; with D known the prediction also gives
    d = floor((1 − s)·D) rounded down to a multiple of 8, the width `dimcut slice` would make.
    """
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must lie in [0, 1), got {sparsity}")
    D = hidden_size or model.hidden_size
    width = _round_down(math.floor((1 - sparsity) * D + 1e-9)) if D else None
    fits = [model.metric(name) for name in metrics] if metrics else list(model.metrics)
    return [
        _predict_metric(
            model.label,
            fit,
            sparsity,
            confidence=confidence,
            allow_extrapolation=allow_extrapolation,
            width=width,
        )
        for fit in fits
    ]


def max_sparsity(
    model: ModelFit,
    metric: str,
    budget: float,
    *,
    confidence: float = 0.95,
    allow_extrapolation: bool = False,
    hidden_size: int | None = None,
) -> Prediction:
    """The largest sparsity whose predicted metric meets `budget` (max PPL or min accuracy).

    Solves the fitted line for s and clips it below 1. With D known the width is rounded *up* to a
    multiple of 8 so that the cut stays within the budget, and the prediction is made at that
    width's effective sparsity 1 − d/D (≤ the solved s).
    """
    fit = model.metric(metric)
    if metric == PERPLEXITY and not budget > 1:
        raise ValueError(f"a perplexity budget must exceed 1, got {budget}")
    if metric != PERPLEXITY and not 0 < budget <= 1:
        raise ValueError(f"an accuracy budget must lie in (0, 1], got {budget}")
    a, b = fit.line.a, fit.line.b
    if a >= 0:
        raise ValueError(
            f"model {model.label!r}, {metric}: fitted slope a = {a:.3g} ≥ 0, so the law predicts "
            "no loss from sparsity and cannot bound it"
        )
    # Both laws are increasing in y (y up = better), so the budget is a lower bound on y.
    y_required = fit.law.to_y(budget, fit.baseline)
    solved = (y_required - b) / a
    if solved < 0:
        raise ValueError(
            f"model {model.label!r}, {metric}: no sparsity meets {budget}; the law predicts "
            f"{fit.law.from_y(b, fit.baseline):.4g} already at s = 0 (measured on the dense "
            f"model: {fit.baseline:.4g})"
        )
    solved = min(solved, _BELOW_ONE)
    D = hidden_size or model.hidden_size
    if D:
        width = min(D, max(WIDTH_MULTIPLE, _round_up(math.ceil((1 - solved) * D - 1e-9))))
        sparsity = 1 - width / D
    else:
        width, sparsity = None, solved
    _check_range(fit.line, solved, allow_extrapolation)
    # The width's sparsity is at most the solved one, which passed the range check.
    prediction = _predict_metric(
        model.label, fit, sparsity, confidence=confidence, allow_extrapolation=True, width=width
    )
    return replace(prediction, budget=budget)


def _predict_metric(
    label: str,
    fit: MetricFit,
    sparsity: float,
    *,
    confidence: float,
    allow_extrapolation: bool,
    width: int | None,
) -> Prediction:
    extrapolated = _check_range(fit.line, sparsity, allow_extrapolation)
    y, y_low, y_high = fit.line.prediction_interval(sparsity, confidence)
    law = fit.law
    if fit.metric == PERPLEXITY:
        if y <= 0:
            raise ValueError(
                f"model {label!r}: a·s + b = {y:.3g} ≤ 0 at s = {sparsity}; the perplexity law "
                "predicts an unbounded perplexity there"
            )
        interval = (law.from_y(y_high, fit.baseline), law.from_y(y_low, fit.baseline))
    else:
        # Accuracies are probabilities: clip the interval to [0, 1].
        interval = (law.from_y(y_low, fit.baseline), min(1.0, law.from_y(y_high, fit.baseline)))
    return Prediction(
        label=label,
        metric=fit.metric,
        measure=fit.measure,
        sparsity=sparsity,
        value=law.from_y(y, fit.baseline),
        interval=interval,
        confidence=confidence,
        y=y,
        y_interval=(y_low, y_high),
        hidden_size=width,
        extrapolated=extrapolated,
    )


def _check_range(line: LineFit, sparsity: float, allow_extrapolation: bool) -> bool:
    """Whether `sparsity` lies beyond the fitted range; refuse it beyond the margin."""
    limit = line.s_max * (1 + EXTRAPOLATION_MARGIN)
    if sparsity > limit and not allow_extrapolation:
        raise ValueError(
            f"s = {sparsity:.4g} lies beyond the fitted range s ∈ [0, {line.s_max:.4g}] by more "
            f"than {EXTRAPOLATION_MARGIN:.0%} of it (limit {limit:.4g}); the law was only "
            "measured inside that range. Pass --allow-extrapolation to predict anyway"
        )
    return sparsity > line.s_max


def _round_down(width: int) -> int:
    return width - width % WIDTH_MULTIPLE


def _round_up(width: int) -> int:
    return -(-width // WIDTH_MULTIPLE) * WIDTH_MULTIPLE
