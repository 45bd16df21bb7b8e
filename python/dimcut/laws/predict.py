"""Predictions from fitted laws: the metrics at a sparsity, or the largest sparsity in a budget.

With D known, a prediction also gives the hidden width d. The width a sparsity s gives is the one
`dimcut slice --sparsity s` writes: `sliced_width(D, s, m)`, floor((1 − s)·D) rounded down to a
multiple m. The records do not say which m their cuts used (`--round-to`, and for the plain
format also the step the stock config forces: SmolLM2's 9 heads make its plain widths multiples
of 72), so m is inferred as the gcd of the measured sliced widths d = (1 − s)·D of the fit's
points. That gcd is the true m unless all measured widths share a larger factor (sliced widths
1536 and 1024 alone would give 512, not 8): sweep sparsities whose widths do not. When the points
are not whole widths (records not cut by `dimcut slice`) or D is unknown, m is `dimcut slice`'s
default --round-to.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, replace

from dimcut.architectures import sliced_width
from dimcut.laws.fit import PERPLEXITY, MetricFit, ModelFit
from dimcut.laws.stats import LineFit

PREDICTION_SCHEMA = "dimcut.prediction/1"
DEFAULT_ROUND_TO = 8  # `dimcut slice --round-to`'s default: m when the fit gives no widths
# How far beyond the largest fitted sparsity predictions are still made (as a fraction of it).
EXTRAPOLATION_MARGIN = 0.25
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
    width_multiple: int | None = None  # the multiple d is rounded to, when D is known
    text: str | None = None  # the perplexity's evaluation text
    variant: str | None = None  # how the model was cut

    @property
    def metric_name(self) -> str:
        return f"{self.metric} on {self.text}" if self.text else self.metric

    def to_dict(self) -> dict:
        def bound(v: float) -> float | None:
            return v if math.isfinite(v) else None  # JSON has no infinity: null = unbounded

        return {
            "model": self.label,
            "variant": self.variant,
            "metric": self.metric,
            "text": self.text,
            "measure": self.measure,
            "sparsity": self.sparsity,
            "hidden_size": self.hidden_size,
            "width_multiple": self.width_multiple,
            "value": self.value,
            "interval": [bound(v) for v in self.interval],
            "confidence": self.confidence,
            "y": self.y,
            "y_interval": list(self.y_interval),
            "extrapolated": self.extrapolated,
            "budget": self.budget,
        }


def measured_width_multiple(model: ModelFit) -> int | None:
    """The gcd of the sliced widths d = (1 − s)·D of the fit's points (the module docstring says
    why); None when D is unknown or some point's width is not a whole number."""
    D = model.hidden_size
    if not D:
        return None
    widths = [(1 - s) * D for fit in model.metrics for s in fit.line.s if s > 0]
    if not widths or any(abs(width - round(width)) > 1e-6 for width in widths):
        return None
    return math.gcd(*(round(width) for width in widths))


def width_multiple(model: ModelFit) -> int:
    """The multiple m that widths predicted for `model` are rounded to."""
    return measured_width_multiple(model) or DEFAULT_ROUND_TO


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
    d = `sliced_width(D, s, m)`, the width `dimcut slice --sparsity s` writes (m: the module
    docstring).
    """
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must lie in [0, 1), got {sparsity}")
    fits = [model.metric(name) for name in metrics] if metrics else list(model.metrics)
    predictions = [
        predict_metric(
            model,
            fit,
            sparsity,
            confidence=confidence,
            allow_extrapolation=allow_extrapolation,
        )
        for fit in fits
    ]
    D = hidden_size or model.hidden_size
    if not D:
        return predictions
    multiple = width_multiple(model)
    width = sliced_width(D, sparsity, multiple)
    return [replace(p, hidden_size=width, width_multiple=multiple) for p in predictions]


def max_sparsity(
    model: ModelFit,
    metric: str,
    budget: float,
    *,
    text: str | None = None,
    confidence: float = 0.95,
    allow_extrapolation: bool = False,
    hidden_size: int | None = None,
) -> Prediction:
    """The largest sparsity whose predicted metric meets `budget` (max PPL or min accuracy).

    Solves the fitted line for s and clips it below 1. With D known the width is (1 − s)·D rounded
    *up* to the multiple m of the module docstring, so that the cut stays within the budget, and
    the prediction is made at that width's effective sparsity 1 − d/D (≤ the solved s): the
    sparsity from which `sliced_width`, and so `dimcut slice`, cuts exactly d.
    `text` picks the perplexity's evaluation text (default: the headline one).
    """
    fit = model.metric(metric, text)
    if metric == PERPLEXITY and not budget > 1:
        raise ValueError(f"a perplexity budget must exceed 1, got {budget}")
    if metric != PERPLEXITY and not 0 < budget <= 1:
        raise ValueError(f"an accuracy budget must lie in (0, 1], got {budget}")
    a, b = fit.line.a, fit.line.b
    if a >= 0:
        raise ValueError(
            f"model {model.name!r}, {fit.name}: fitted slope a = {a:.3g} ≥ 0, so the law predicts "
            "no loss from sparsity and cannot bound it"
        )
    # Both laws are increasing in y (y up = better), so the budget is a lower bound on y.
    y_required = fit.law.to_y(budget, fit.baseline)
    solved = (y_required - b) / a
    if solved < 0:
        raise ValueError(
            f"model {model.name!r}, {fit.name}: no sparsity meets {budget}; the law predicts "
            f"{fit.law.from_y(b, fit.baseline):.4g} already at s = 0 (measured on the dense "
            f"model: {fit.baseline:.4g})"
        )
    solved = min(solved, _BELOW_ONE)
    D = hidden_size or model.hidden_size
    if D:
        multiple = width_multiple(model)
        needed = math.ceil((1 - solved) * D - 1e-9)
        width = min(D, max(multiple, -(-needed // multiple) * multiple))
        sparsity = 1 - width / D
    else:
        multiple, width, sparsity = None, None, solved
    _check_range(fit.line, solved, allow_extrapolation)
    # The width's sparsity is at most the solved one, which passed the range check.
    prediction = predict_metric(
        model, fit, sparsity, confidence=confidence, allow_extrapolation=True
    )
    return replace(prediction, budget=budget, hidden_size=width, width_multiple=multiple)


def predict_metric(
    model: ModelFit,
    fit: MetricFit,
    sparsity: float,
    *,
    confidence: float,
    allow_extrapolation: bool,
    allow_unbounded: bool = False,
) -> Prediction:
    """One metric of `model` (its fit `fit`) predicted at `sparsity`, without a width. Where
    the perplexity law has run out (a·s + b ≤ 0) that is an error, or with `allow_unbounded`
    an infinite prediction."""
    extrapolated = _check_range(fit.line, sparsity, allow_extrapolation)
    y, y_low, y_high = fit.line.prediction_interval(sparsity, confidence)
    law = fit.law
    if fit.metric == PERPLEXITY:
        if y <= 0 and not allow_unbounded:
            raise ValueError(
                f"model {model.name!r}: a·s + b = {y:.3g} ≤ 0 at s = {sparsity}; the perplexity law "
                "predicts an unbounded perplexity there"
            )
        interval = (law.from_y(y_high, fit.baseline), law.from_y(y_low, fit.baseline))
    else:
        # Accuracies are probabilities: clip the interval to [0, 1].
        interval = (law.from_y(y_low, fit.baseline), min(1.0, law.from_y(y_high, fit.baseline)))
    return Prediction(
        label=model.label,
        metric=fit.metric,
        measure=fit.measure,
        sparsity=sparsity,
        value=law.from_y(y, fit.baseline),
        interval=interval,
        confidence=confidence,
        y=y,
        y_interval=(y_low, y_high),
        hidden_size=None,
        extrapolated=extrapolated,
        text=fit.text,
        variant=model.variant,
    )


def _check_range(line: LineFit, sparsity: float, allow_extrapolation: bool) -> bool:
    """Whether `sparsity` lies beyond the fitted range; refuse it beyond the margin."""
    limit = line.s_max * (1 + EXTRAPOLATION_MARGIN)
    if sparsity > limit and not allow_extrapolation:
        raise ValueError(
            f"s = {sparsity:.4g} lies beyond the fitted range s ∈ [0, {line.s_max:.4g}] by more "
            f"than {EXTRAPOLATION_MARGIN:.0%} of it (limit {limit:.4g}); the law was only "
            "measured inside that range. Pass allow_extrapolation=True (--allow-extrapolation) to "
            "predict anyway"
        )
    return sparsity > line.s_max
