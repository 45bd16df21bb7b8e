"""Held-out evaluation of a fit: predict the cuts it was not fitted on and compare with what
was measured there (`dimcut fit --holdout 0.25,0.3,0.4`).

A law is only worth using if it predicts points it has not seen. The fit leaves out the cuts
made at the held-out requested sparsities; each of their measurements is then predicted at its
effective sparsity, with the fit's prediction interval, and checked against the measurement.
Held-out points beyond the fitted range are extrapolations by design and are predicted anyway.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from dimcut.laws.fit import PERPLEXITY, FitReport, measurement, text_table
from dimcut.laws.predict import Prediction, predict_metric
from dimcut.laws.records import Record, group_by_model


@dataclass(frozen=True)
class HoldoutCheck:
    """One held-out measurement next to what the fit predicted for it."""

    prediction: Prediction
    measured: float
    measured_y: float  # the measurement on the law's axis (ln PPL0/ln PPL, or ln(acc/acc0))
    record: str  # the record(s) it was measured in

    @property
    def inside(self) -> bool:
        low, high = self.prediction.interval
        return low <= self.measured <= high

    @property
    def relative_error(self) -> float:
        """(predicted − measured) / measured."""
        return (self.prediction.value - self.measured) / self.measured

    def to_dict(self) -> dict:
        return {
            **self.prediction.to_dict(),
            "measured": self.measured,
            "measured_y": self.measured_y,
            "inside_interval": self.inside,
            "relative_error": self.relative_error if math.isfinite(self.relative_error) else None,
            "record": self.record,
        }


def check_holdout(
    report: FitReport, records: Iterable[Record], *, confidence: float = 0.95
) -> list[HoldoutCheck]:
    """Predict every measurement of the cuts `report` held out (`report.held_out`)."""
    if not report.held_out:
        raise ValueError("the fit holds no sparsity out (fit it with held_out=...)")
    groups = group_by_model(records)
    checks = []
    for model in report.models:
        runs = groups.get((model.label, model.variant))
        if runs is None:
            raise ValueError(f"no records of {model.name!r}, which the fit holds")
        held = [
            r
            for r in runs.sliced
            if any(math.isclose(r.sparsity, s, abs_tol=1e-9) for s in report.held_out)
        ]
        for record in held:
            for fit in model.metrics:
                found = measurement(record, fit.metric, fit.text)
                if found is None:
                    continue
                prediction = predict_metric(
                    model,
                    fit,
                    record.effective_sparsity,
                    confidence=confidence,
                    allow_extrapolation=True,  # held-out points lie beyond the fit by design
                    allow_unbounded=True,
                )
                measured_y = fit.law.to_y(found[1], fit.baseline)
                checks.append(HoldoutCheck(prediction, found[1], measured_y, record.path))
    if not checks:
        held = ", ".join(f"{s:g}" for s in report.held_out)
        raise ValueError(
            f"no records at the held-out sparsities {held} measure a fitted metric; "
            "sweep those points too"
        )
    return checks


_HEADER = [
    "model",
    "variant",
    "metric",
    "s",
    "measured",
    "predicted",
    "interval",
    "inside",
    "error",
    "y measured",
    "y predicted",
]


def _rows(checks: list[HoldoutCheck]) -> list[list[str]]:
    def number(value: float) -> str:
        return "∞" if math.isinf(value) else f"{value:.4g}"

    rows = []
    for check in checks:
        p = check.prediction
        rows.append(
            [
                p.label,
                p.variant or "—",
                p.metric_name,
                f"{p.sparsity:.3f}",
                number(check.measured),
                number(p.value),
                f"[{number(p.interval[0])}, {number(p.interval[1])}]",
                "yes" if check.inside else "no",
                f"{check.relative_error:+.1%}" if math.isfinite(check.relative_error) else "∞",
                f"{check.measured_y:.3f}",
                f"{p.y:.3f}",
            ]
        )
    return rows


def coverage(checks: list[HoldoutCheck]) -> dict[str, tuple[int, int]]:
    """Per metric kind ("perplexity", or "accuracy" for the tasks): (inside, total)."""
    counts: dict[str, tuple[int, int]] = {}
    for check in checks:
        kind = "perplexity" if check.prediction.metric == PERPLEXITY else "accuracy"
        inside, total = counts.get(kind, (0, 0))
        counts[kind] = (inside + check.inside, total + 1)
    return counts


def _summary(checks: list[HoldoutCheck]) -> str:
    confidence = checks[0].prediction.confidence
    parts = [
        f"{kind}: {inside} of {total} inside the {confidence:.0%} interval"
        for kind, (inside, total) in coverage(checks).items()
    ]
    return "Held-out coverage — " + "; ".join(parts) + "."


def holdout_table(checks: list[HoldoutCheck]) -> str:
    """Predicted vs measured at the held-out cuts, as text."""
    return text_table([_HEADER, *_rows(checks)], left=3) + _summary(checks) + "\n"


def holdout_markdown(checks: list[HoldoutCheck]) -> str:
    lines = [
        "| " + " | ".join(_HEADER) + " |",
        "|" + "|".join(["---"] * 3 + ["---:"] * (len(_HEADER) - 3)) + "|",
        *("| " + " | ".join(row) + " |" for row in _rows(checks)),
        "",
        _summary(checks),
    ]
    return "\n".join(lines) + "\n"
