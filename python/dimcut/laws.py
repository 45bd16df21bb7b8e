"""The sparsity laws of arXiv 2503.04377: fit them to evaluated models, plot them, predict with them.

The x-axis is the *effective* sparsity s = 1 − d/D (d the sliced hidden width, D the dense one).

* perplexity:      ln(PPL0)/ln(PPL) = a·s + b   (theory: a = −1, b = 1)
* accuracy (task): ln(acc/acc0)     = a·s + b   (the paper: a < 0, b ≈ 0)

PPL0 and acc0 are the dense model's values; acc is a task's headline metric. The dense record is a
measured point (s = 0, y = 1 for perplexity, y = 0 for accuracy) and takes part in free-intercept
fits. With a fixed intercept (b = 1 or b = 0) that point is the constraint itself, so it is left
out of the fit's n, RMSE and R² (it would only add a zero residual and a spurious degree of freedom).

Records are `dimcut.results/1` JSON files (docs/results-schema.md), grouped by `model.label`.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

import numpy as np

from dimcut.evaluation import SCHEMA as RESULTS_SCHEMA

FIT_SCHEMA = "dimcut.fit/1"
PREDICTION_SCHEMA = "dimcut.prediction/1"
PERPLEXITY = "perplexity"  # the metric name of the perplexity law; every other metric is a task
X_AXIS = "effective sparsity s = 1 − d/D"
# How far beyond the largest fitted sparsity predictions are still made (as a fraction of it).
EXTRAPOLATION_MARGIN = 0.25
WIDTH_MULTIPLE = 8  # sliced widths are multiples of 8, as `dimcut slice` makes them
_BELOW_ONE = math.nextafter(1.0, 0.0)


# --------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Record:
    """One evaluated model (a `dimcut.results/1` file), reduced to what the laws need."""

    path: str
    label: str | None
    fingerprint: str | None
    effective_sparsity: float
    original_hidden_size: int | None  # D
    perplexity: float | None
    perplexity_setup: tuple | None  # (source, seqlen): all records of a model must share it
    tasks: dict[str, tuple[str, float]]  # task -> (headline metric name, value)

    @property
    def is_dense(self) -> bool:
        return self.effective_sparsity == 0.0

    @classmethod
    def from_json(cls, data: dict, path: str) -> Record:
        if data.get("schema") != RESULTS_SCHEMA:
            raise ValueError(f"{path}: schema {data.get('schema')!r}, expected {RESULTS_SCHEMA!r}")
        model = data.get("model") or {}
        sparsity = model.get("effective_sparsity")
        if sparsity is None and model.get("hidden_size") and model.get("original_hidden_size"):
            sparsity = 1 - model["hidden_size"] / model["original_hidden_size"]
        if sparsity is None:
            raise ValueError(f"{path}: model.effective_sparsity is missing")
        sparsity = _finite(sparsity, "model.effective_sparsity", path)
        if not 0 <= sparsity < 1:
            raise ValueError(f"{path}: model.effective_sparsity = {sparsity} is outside [0, 1)")

        ppl_block = data.get("perplexity")
        ppl = None
        if ppl_block and ppl_block.get("ppl") is not None:
            ppl = _finite(ppl_block["ppl"], "perplexity.ppl", path)
        tasks = {}
        for task, result in (data.get("tasks") or {}).items():
            if result and result.get("headline") is not None:
                value = _finite(result["headline"], f"tasks.{task}.headline", path)
                tasks[task] = (result.get("headline_metric") or "headline", value)
        return cls(
            path=path,
            label=model.get("label") or None,
            fingerprint=model.get("fingerprint"),
            effective_sparsity=sparsity,
            original_hidden_size=model.get("original_hidden_size"),
            perplexity=ppl,
            perplexity_setup=(
                (ppl_block.get("source"), ppl_block.get("seqlen")) if ppl is not None else None
            ),
            tasks=tasks,
        )


def _finite(value, what: str, path: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{path}: {what} = {value!r} is not a number") from None
    if not math.isfinite(number):
        raise ValueError(f"{path}: {what} = {value!r} is not finite")
    return number


def load_records(paths: Iterable[str | Path]) -> list[Record]:
    """Read results records from files and directories (searched recursively for `*.json`).

    Inside directories, JSON files of other kinds (configs, fit.json, ...) are skipped; a file
    named explicitly must be a results record. Files reached twice are read once.
    """
    records: list[Record] = []
    seen: set[Path] = set()
    paths = [Path(p) for p in paths]
    for path in paths:
        if path.is_dir():
            files, explicit = sorted(path.rglob("*.json")), False
        elif path.is_file():
            files, explicit = [path], True
        else:
            raise FileNotFoundError(f"{path}: no such file or directory")
        for file in files:
            if file.resolve() in seen:
                continue
            seen.add(file.resolve())
            data = _read_results_json(file, required=explicit)
            if data is not None:
                records.append(Record.from_json(data, str(file)))
    if not records:
        where = ", ".join(str(p) for p in paths) or "(no paths given)"
        raise ValueError(f"no {RESULTS_SCHEMA} records found in {where}")
    return records


def _read_results_json(file: Path, *, required: bool) -> dict | None:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        if required:
            raise ValueError(f"{file}: not valid JSON ({exc})") from None
        return None
    schema = data.get("schema") if isinstance(data, dict) else None
    if schema == RESULTS_SCHEMA:
        return data
    if isinstance(schema, str) and schema.startswith("dimcut.results/"):
        raise ValueError(
            f"{file}: unsupported schema {schema!r} (this dimcut reads {RESULTS_SCHEMA})"
        )
    if required:
        raise ValueError(f"{file}: not a {RESULTS_SCHEMA} record (schema {schema!r})")
    return None


@dataclass(frozen=True)
class ModelRuns:
    """The records of one dense model: its baseline (s = 0) and its sliced variants."""

    label: str
    dense: Record
    sliced: tuple[Record, ...]

    @property
    def hidden_size(self) -> int | None:
        """D, the dense model's hidden size, when the records give it."""
        return self.dense.original_hidden_size


def group_by_model(records: Iterable[Record]) -> dict[str, ModelRuns]:
    """Group records by model label and find each model's dense baseline; check they belong together."""
    records = list(records)
    unlabelled = [r.path for r in records if r.label is None]
    if unlabelled:
        raise ValueError(
            "records without model.label (the laws group records by the dense model's label, so "
            f"records of different models cannot be told apart): {', '.join(unlabelled)}"
        )
    by_label: dict[str, list[Record]] = {}
    for record in records:
        by_label.setdefault(record.label, []).append(record)
    return {label: _model_runs(label, group) for label, group in sorted(by_label.items())}


def _model_runs(label: str, records: list[Record]) -> ModelRuns:
    dense = [r for r in records if r.is_dense]
    if not dense:
        raise ValueError(
            f"model {label!r}: no dense baseline among its {len(records)} records (one with "
            "effective_sparsity 0); evaluate the dense model too and pass its record"
        )
    if len(dense) > 1:
        files = ", ".join(r.path for r in dense)
        if len({r.fingerprint for r in dense}) > 1:
            raise ValueError(
                f"model {label!r}: dense records of different models (fingerprints differ: "
                f"{files}); give each model its own label"
            )
        raise ValueError(f"model {label!r}: {len(dense)} dense records ({files}); pass only one")
    baseline = dense[0]
    sliced = tuple(
        sorted((r for r in records if not r.is_dense), key=lambda r: r.effective_sparsity)
    )

    D = baseline.original_hidden_size
    for record in sliced:
        if D and record.original_hidden_size and record.original_hidden_size != D:
            raise ValueError(
                f"model {label!r}: {record.path} was sliced from a model with D = "
                f"{record.original_hidden_size}, but the dense baseline {baseline.path} has D = {D}"
            )
    setups = {r.perplexity_setup for r in records if r.perplexity_setup is not None}
    if len(setups) > 1:
        raise ValueError(
            f"model {label!r}: perplexities were measured differently ((source, seqlen) = "
            f"{sorted(setups, key=str)}); they are not comparable"
        )
    for task in {t for r in records for t in r.tasks}:
        measures = {r.tasks[task][0] for r in records if task in r.tasks}
        if len(measures) > 1:
            raise ValueError(
                f"model {label!r}: task {task!r} has different headline metrics {sorted(measures)}"
            )
    return ModelRuns(label, baseline, sliced)


# ------------------------------------------------------------------------------------- the laws


@dataclass(frozen=True)
class Law:
    """How a measured value maps to the law's y and back."""

    formula: str
    y_label: str
    theory_intercept: float  # the b that --fixed-intercept imposes
    to_y: Callable[[float, float], float]  # (value, baseline) -> y
    from_y: Callable[[float, float], float]  # (y, baseline) -> value


def _ppl_from_y(y: float, ppl0: float) -> float:
    # y ≤ 0 means the law has run out: ln(PPL) = ln(PPL0)/y would be infinite or negative.
    return math.exp(math.log(ppl0) / y) if y > 0 else math.inf


PERPLEXITY_LAW = Law(
    formula="ln(PPL0)/ln(PPL) = a·s + b",
    y_label="ln PPL₀ / ln PPL",
    theory_intercept=1.0,
    to_y=lambda ppl, ppl0: math.log(ppl0) / math.log(ppl),
    from_y=_ppl_from_y,
)
ACCURACY_LAW = Law(
    formula="ln(acc/acc0) = a·s + b",
    y_label="ln(acc / acc₀)",
    theory_intercept=0.0,
    to_y=lambda acc, acc0: math.log(acc / acc0),
    from_y=lambda y, acc0: acc0 * math.exp(y),
)


def law_for(metric: str) -> Law:
    return PERPLEXITY_LAW if metric == PERPLEXITY else ACCURACY_LAW


# ------------------------------------------------------------------------------------ line fits


@dataclass(frozen=True)
class LineFit:
    """Ordinary least squares y = a·s + b through (s, y), or y − b = a·s with b fixed.

    RMSE is sqrt(mean residual²) (as in the paper's Table 3); standard errors and prediction
    intervals use the residual variance SS_res / dof, dof = n − (number of fitted parameters).
    R² = 1 − SS_res/SS_tot with SS_tot about the mean of y, also for a fixed intercept (where it
    can be negative); None when all y are equal.
    """

    s: tuple[float, ...]
    y: tuple[float, ...]
    a: float
    b: float
    fixed_intercept: bool
    se_a: float
    se_b: float | None  # None when b is fixed
    rmse: float
    r2: float | None

    @property
    def n(self) -> int:
        return len(self.s)

    @property
    def dof(self) -> int:
        return self.n - (1 if self.fixed_intercept else 2)

    @property
    def s_max(self) -> float:
        """The fitted range is [0, s_max]: s = 0 is measured (or imposed by a fixed intercept)."""
        return max(self.s)

    def rmse_of(self, a: float, b: float) -> float:
        """RMSE of another line over the same points (e.g. the theory a = −1, b = 1)."""
        s, y = np.asarray(self.s), np.asarray(self.y)
        return float(np.sqrt(np.mean((y - (a * s + b)) ** 2)))

    def prediction_interval(self, s: float, confidence: float) -> tuple[float, float, float]:
        """(ŷ, low, high): the OLS prediction interval for a new observation at s."""
        if not 0 < confidence < 1:
            raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
        points = np.asarray(self.s)
        residuals = np.asarray(self.y) - (self.a * points + self.b)
        sigma = math.sqrt(float(residuals @ residuals) / self.dof)
        if self.fixed_intercept:
            leverage = s**2 / float(points @ points)
        else:
            centred = points - points.mean()
            leverage = 1 / self.n + (s - points.mean()) ** 2 / float(centred @ centred)
        half = t_quantile((1 + confidence) / 2, self.dof) * sigma * math.sqrt(1 + leverage)
        y_hat = self.a * s + self.b
        return y_hat, y_hat - half, y_hat + half


def fit_line(s: Sequence[float], y: Sequence[float], *, intercept: float | None = None) -> LineFit:
    """Least-squares fit of y = a·s + b; with `intercept` given, b is fixed to it and only a is fitted.

    Needs enough points for standard errors: 3 with 2 distinct s (free intercept), or 2 with
    some s ≠ 0 (fixed intercept).
    """
    s_arr, y_arr = np.asarray(s, dtype=float), np.asarray(y, dtype=float)
    if s_arr.ndim != 1 or s_arr.shape != y_arr.shape:
        raise ValueError(f"s and y must be 1-D of one length, got {s_arr.shape} and {y_arr.shape}")
    if not (np.isfinite(s_arr).all() and np.isfinite(y_arr).all()):
        raise ValueError("s and y must be finite (no NaN or infinity)")
    n = len(s_arr)
    if intercept is None:
        if n < 3 or np.ptp(s_arr) == 0:
            raise ValueError(
                f"a free-intercept fit needs at least 3 points at 2 or more distinct s (2 to fit a "
                f"and b, 1 more for standard errors); got {n}"
            )
        centred = s_arr - s_arr.mean()
        sxx = float(centred @ centred)
        a = float(centred @ (y_arr - y_arr.mean())) / sxx
        b = float(y_arr.mean() - a * s_arr.mean())
        ss_res = float(np.sum((y_arr - (a * s_arr + b)) ** 2))
        sigma2 = ss_res / (n - 2)
        se_a = math.sqrt(sigma2 / sxx)
        se_b = math.sqrt(sigma2 * (1 / n + s_arr.mean() ** 2 / sxx))
    else:
        if n < 2 or not np.any(s_arr):
            raise ValueError(
                f"a fixed-intercept fit needs at least 2 points with s ≠ 0 (1 to fit a, 1 more "
                f"for its standard error); got {n}"
            )
        b = float(intercept)
        sss = float(s_arr @ s_arr)
        a = float(s_arr @ (y_arr - b)) / sss
        ss_res = float(np.sum((y_arr - (a * s_arr + b)) ** 2))
        se_a = math.sqrt(ss_res / (n - 1) / sss)
        se_b = None
    ss_tot = float(np.sum((y_arr - y_arr.mean()) ** 2))
    return LineFit(
        s=tuple(float(v) for v in s_arr),
        y=tuple(float(v) for v in y_arr),
        a=a,
        b=b,
        fixed_intercept=intercept is not None,
        se_a=se_a,
        se_b=se_b,
        rmse=math.sqrt(ss_res / n),
        r2=1 - ss_res / ss_tot if ss_tot > 0 else None,
    )


# ----------------------------------------------------------------------------- fits per model


@dataclass(frozen=True)
class MetricFit:
    """The law fitted for one metric of one model."""

    metric: str  # "perplexity" or a task name
    measure: str  # "ppl" or the task's headline metric, e.g. "acc_norm"
    baseline: float  # PPL0 or acc0: the dense model's value
    line: LineFit

    @property
    def law(self) -> Law:
        return law_for(self.metric)

    @property
    def theory_rmse(self) -> float | None:
        """RMSE of the theoretical perplexity line y = 1 − s (None for accuracy: no theory slope)."""
        return self.line.rmse_of(-1.0, 1.0) if self.metric == PERPLEXITY else None

    def to_dict(self) -> dict:
        line = self.line
        return {
            "metric": self.metric,
            "measure": self.measure,
            "law": self.law.formula,
            "baseline": self.baseline,
            "a": line.a,
            "b": line.b,
            "fixed_intercept": line.fixed_intercept,
            "rmse": line.rmse,
            "r2": line.r2,
            "se_a": line.se_a,
            "se_b": line.se_b,
            "n": line.n,
            "dof": line.dof,
            "theory_rmse": self.theory_rmse,
            "sparsity_range": [0.0, line.s_max],
            "points": [
                {"s": s, "y": y, "value": self.law.from_y(y, self.baseline)}
                for s, y in zip(line.s, line.y)
            ],
        }

    @classmethod
    def from_dict(cls, data: dict) -> MetricFit:
        # The coefficients are recomputed from the stored points: one source of truth.
        points = data["points"]
        intercept = data["b"] if data["fixed_intercept"] else None
        line = fit_line([p["s"] for p in points], [p["y"] for p in points], intercept=intercept)
        return cls(data["metric"], data["measure"], data["baseline"], line)


@dataclass(frozen=True)
class ModelFit:
    """The laws fitted for one dense model and its sliced variants."""

    label: str
    hidden_size: int | None  # D, when the records give it
    metrics: tuple[MetricFit, ...]

    def metric(self, name: str) -> MetricFit:
        for fit in self.metrics:
            if fit.metric == name:
                return fit
        known = ", ".join(f.metric for f in self.metrics)
        raise ValueError(f"model {self.label!r} has no fit for {name!r} (it has: {known})")

    def to_dict(self) -> dict:
        return {
            "label": self.label,
            "hidden_size": self.hidden_size,
            "fits": [fit.to_dict() for fit in self.metrics],
        }

    @classmethod
    def from_dict(cls, data: dict) -> ModelFit:
        metrics = tuple(MetricFit.from_dict(fit) for fit in data["fits"])
        return cls(data["label"], data.get("hidden_size"), metrics)


def fit_model(runs: ModelRuns, *, fixed_intercept: bool = False) -> ModelFit:
    """Fit the perplexity law and one accuracy law per task measured on the sliced models."""
    metrics = ([PERPLEXITY] if any(r.perplexity is not None for r in runs.sliced) else []) + sorted(
        {task for r in runs.sliced for task in r.tasks}
    )
    if not metrics:
        raise ValueError(f"model {runs.label!r}: its sliced records measure nothing to fit")
    return ModelFit(
        runs.label,
        runs.hidden_size,
        tuple(_fit_metric(runs, metric, fixed_intercept) for metric in metrics),
    )


def _measurement(record: Record, metric: str) -> tuple[str, float] | None:
    if metric == PERPLEXITY:
        return None if record.perplexity is None else ("ppl", record.perplexity)
    return record.tasks.get(metric)


def _fit_metric(runs: ModelRuns, metric: str, fixed_intercept: bool) -> MetricFit:
    where = f"model {runs.label!r}, {metric}"
    dense = _measurement(runs.dense, metric)
    if dense is None:
        raise ValueError(
            f"{where}: measured on sliced models but not on the dense baseline {runs.dense.path}"
        )
    measure, baseline = dense
    measured = [(r, m[1]) for r in runs.sliced if (m := _measurement(r, metric)) is not None]
    if len(measured) < 2:
        at = ", ".join(f"s = {r.effective_sparsity:.3g}" for r, _ in measured) or "none"
        raise ValueError(
            f"{where}: {len(measured)} sliced point(s) ({at}); the fit needs at least 2 sliced "
            "models besides the dense baseline (2 parameters plus 1 degree of freedom for "
            "standard errors)"
        )
    _check_domain(where, runs.dense.path, baseline, metric)
    for record, value in measured:
        _check_domain(where, record.path, value, metric)

    law = law_for(metric)
    points = [(r.effective_sparsity, law.to_y(value, baseline)) for r, value in measured]
    if not fixed_intercept:
        points.insert(0, (0.0, law.to_y(baseline, baseline)))
    s, y = zip(*points)
    line = fit_line(s, y, intercept=law.theory_intercept if fixed_intercept else None)
    return MetricFit(metric, measure, baseline, line)


def _check_domain(where: str, path: str, value: float, metric: str) -> None:
    if metric == PERPLEXITY and value <= 1:
        raise ValueError(
            f"{where}: PPL = {value} ≤ 1 in {path}; ln PPL ≤ 0 makes ln PPL0 / ln PPL meaningless"
        )
    if metric != PERPLEXITY and value <= 0:
        raise ValueError(f"{where}: accuracy = {value} in {path}; ln(acc/acc0) needs acc > 0")


_TABLE_HEADER = ["model", "metric", "a", "b", "RMSE", "R²", "SE(a)", "SE(b)", "n", "RMSE theory"]


def _aligned(rows: list[list[str]], *, left: int) -> str:
    """Rows as text columns under a rule; the first `left` columns left-aligned, the rest right."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            cell.ljust(width) if i < left else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths))
        ).rstrip()
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * width for width in widths).rstrip())
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class FitReport:
    """The fitted laws of several models; saved as fit.json (schema `dimcut.fit/1`)."""

    models: tuple[ModelFit, ...]
    fixed_intercept: bool
    sources: tuple[str, ...] = ()

    def model(self, label: str | None = None) -> ModelFit:
        """The fit of `label`; without a label, the only model."""
        labels = [m.label for m in self.models]
        if label is None:
            if len(self.models) == 1:
                return self.models[0]
            raise ValueError(f"the fit holds several models ({', '.join(labels)}); choose one")
        for model in self.models:
            if model.label == label:
                return model
        raise ValueError(f"no model {label!r} in the fit (it has: {', '.join(labels)})")

    def to_dict(self) -> dict:
        return {
            "schema": FIT_SCHEMA,
            "x": X_AXIS,
            "laws": {"perplexity": PERPLEXITY_LAW.formula, "accuracy": ACCURACY_LAW.formula},
            "intercept": "fixed" if self.fixed_intercept else "free",
            "notes": (
                "RMSE = sqrt(mean residual²); SEs from SS_res/dof. The dense model is the point "
                "s = 0 of free-intercept fits; with a fixed intercept it is the constraint and is "
                "not among the points. theory_rmse: the line a = −1, b = 1."
            ),
            "sources": list(self.sources),
            "models": [model.to_dict() for model in self.models],
        }

    @classmethod
    def from_dict(cls, data: dict) -> FitReport:
        if data.get("schema") != FIT_SCHEMA:
            raise ValueError(f"schema {data.get('schema')!r}, expected {FIT_SCHEMA!r}")
        models = tuple(ModelFit.from_dict(model) for model in data["models"])
        return cls(models, data["intercept"] == "fixed", tuple(data.get("sources", ())))

    def save(self, path: str | Path) -> None:
        text = json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"
        _write_atomically(Path(path), lambda f: f.write(text.encode()))

    @classmethod
    def load(cls, path: str | Path) -> FitReport:
        try:
            return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: not a readable {FIT_SCHEMA} file ({exc!r})") from None
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None

    def _rows(self) -> list[list[str]]:
        def num(value: float | None, digits: int = 3) -> str:
            return "—" if value is None else f"{value:.{digits}f}"

        rows = []
        for model in self.models:
            for fit in model.metrics:
                line = fit.line
                rows.append(
                    [
                        model.label,
                        f"{fit.metric} ({fit.measure})",
                        num(line.a),
                        num(line.b),
                        num(line.rmse),
                        num(line.r2),
                        num(line.se_a),
                        num(line.se_b),
                        str(line.n),
                        num(fit.theory_rmse),
                    ]
                )
        return rows

    def _caption(self) -> list[str]:
        if self.fixed_intercept:
            intercept = "Intercept b fixed to the theory (1 for perplexity, 0 for accuracy)"
        else:
            intercept = "Slope a and intercept b fitted; the dense model is the point s = 0"
        return [
            f"Sparsity laws y = a·s + b over the {X_AXIS}.",
            (
                f"Perplexity: {PERPLEXITY_LAW.formula}; accuracy (the task's headline metric): "
                f"{ACCURACY_LAW.formula}."
            ),
            f"{intercept}. RMSE theory: the line a = −1, b = 1.",
        ]

    def table(self) -> str:
        """A plain-text table shaped like the paper's Table 3."""
        caption = "\n".join(self._caption())
        return caption + "\n\n" + _aligned([_TABLE_HEADER, *self._rows()], left=2)

    def markdown(self) -> str:
        """The same table as Markdown."""
        lines = [
            "# Sparsity-law fits",
            "",
            "  \n".join(self._caption()),  # two trailing spaces: a Markdown line break
            "",
            "| " + " | ".join(_TABLE_HEADER) + " |",
            "|" + "|".join(["---"] * 2 + ["---:"] * (len(_TABLE_HEADER) - 2)) + "|",
            *("| " + " | ".join(row) + " |" for row in self._rows()),
        ]
        return "\n".join(lines) + "\n"


def fit_records(
    records: Iterable[Record],
    *,
    fixed_intercept: bool = False,
    labels: Iterable[str] | None = None,
) -> FitReport:
    """Fit the laws for every model among `records` (or only those in `labels`)."""
    records = list(records)
    groups = group_by_model(records)
    if labels:
        missing = [label for label in labels if label not in groups]
        if missing:
            raise ValueError(
                f"no records for model(s) {', '.join(map(repr, missing))} "
                f"(found: {', '.join(map(repr, groups))})"
            )
        groups = {label: groups[label] for label in labels}
    models = tuple(fit_model(runs, fixed_intercept=fixed_intercept) for runs in groups.values())
    sources = tuple(r.path for runs in groups.values() for r in (runs.dense, *runs.sliced))
    return FitReport(models, fixed_intercept, sources)


# ------------------------------------------------------------------------------------- predict


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


# ------------------------------------------------------------------ Student's t without scipy


@functools.lru_cache(maxsize=256)  # intervals ask for the same few quantiles over and over
def t_quantile(p: float, dof: int) -> float:
    """The p-quantile of Student's t distribution with `dof` degrees of freedom (bisection)."""
    if not 0 < p < 1 or dof < 1:
        raise ValueError(f"t_quantile needs 0 < p < 1 and dof ≥ 1, got p = {p}, dof = {dof}")
    if p < 0.5:
        return -t_quantile(1 - p, dof)
    high = 1.0
    while _t_cdf(high, dof) < p:
        high *= 2
    low = 0.0
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if _t_cdf(mid, dof) < p else (low, mid)
        if high - low <= 1e-13 * high:
            break
    return (low + high) / 2


def _t_cdf(t: float, dof: int) -> float:
    """P(T ≤ t) for t ≥ 0: 1 − I_x(dof/2, 1/2)/2 with x = dof/(dof + t²)."""
    return 1 - 0.5 * _betainc(dof / 2, 0.5, dof / (dof + t * t))


def _betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b) by its continued fraction."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast only below this point
        return 1 - _betainc(b, a, 1 - x)
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    return math.exp(log_front) * _beta_fraction(a, b, x) / a


def _beta_fraction(a: float, b: float, x: float) -> float:
    """Lentz's evaluation of the continued fraction for I_x(a, b) (Numerical Recipes §6.4)."""
    tiny = 1e-300

    def guard(v: float) -> float:
        return v if abs(v) > tiny else tiny

    c, d = 1.0, 1 / guard(1 - (a + b) * x / (a + 1))
    result = d
    for m in range(1, 500):
        even = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        odd = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        for term in (even, odd):
            d = 1 / guard(1 + term * d)
            c = guard(1 + term / c)
            result *= c * d
        if abs(c * d - 1) < 1e-15:
            break
    return result


# ----------------------------------------------------------------------------------------- plots


def plot_fits(report: FitReport, path: str | Path) -> list[Path]:
    """Draw the fits like the paper's Fig. 3: one panel per metric, every model in each panel.

    Writes both a PNG and an SVG: `path` may end in .png, .svg or have no suffix.
    Returns the files written.
    """
    from matplotlib.figure import Figure  # no pyplot: no global backend state; renders with Agg

    path = Path(path)
    if path.suffix.lower() not in ("", ".png", ".svg"):
        raise ValueError(f"{path}: plots are written as .png and .svg")
    metrics = list(dict.fromkeys(f.metric for m in report.models for f in m.metrics))
    metrics.sort(key=lambda name: (name != PERPLEXITY, name))
    columns = min(3, len(metrics))
    rows = math.ceil(len(metrics) / columns)
    figure = Figure(figsize=(4.8 * columns, 4.4 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    colours = [f"C{i % 10}" for i in range(len(report.models))]

    for ax, metric in zip(axes, metrics):
        law = law_for(metric)
        panel = [
            (model, fit, colour)
            for model, colour in zip(report.models, colours)
            for fit in model.metrics
            if fit.metric == metric
        ]
        grid = np.linspace(0, max(fit.line.s_max for _, fit, _ in panel) * 1.05, 50)
        for model, fit, colour in panel:
            line = fit.line
            ax.scatter(line.s, line.y, color=colour, s=22, zorder=3)
            ax.plot(
                grid,
                line.a * grid + line.b,
                color=colour,
                label=(
                    f"{model.label}: a = {line.a:.2f}, b = {line.b:.2f}"
                    f"{' (fixed)' if line.fixed_intercept else ''}, RMSE = {line.rmse:.3f}"
                ),
            )
        if metric == PERPLEXITY:
            ax.plot(grid, 1 - grid, color="0.4", linestyle="--", label="theory: 1 − s")
            title = f"perplexity: {law.formula}"
        else:
            measures = ", ".join(sorted({fit.measure for _, fit, _ in panel}))
            title = f"{metric} ({measures}): {law.formula}"
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("effective sparsity 1 − d/D")
        ax.set_ylabel(law.y_label)
        ax.grid(alpha=0.3)
        # Below the panel: inside, the long labels would hide measured points.
        ax.legend(fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.17), frameon=False)
    for ax in axes[len(metrics) :]:
        ax.set_visible(False)
    figure.suptitle(
        "Sparsity laws (arXiv 2503.04377): dots are measured, lines are least-squares fits"
    )

    written = []
    for suffix in (".png", ".svg"):
        target = path.with_suffix(suffix)
        _write_atomically(target, lambda f, fmt=suffix[1:]: figure.savefig(f, format=fmt, dpi=150))
        written.append(target)
    return written


# --------------------------------------------------------------------------------------- files


def _write_atomically(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write through a temporary file beside `path`, then rename: no half-written outputs."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as file:
            write(file)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------- CLI


def add_commands(subparsers) -> None:
    """Register `dimcut fit` and `dimcut predict`."""
    fit = subparsers.add_parser(
        "fit",
        help="fit the sparsity laws to evaluated models",
        description=(
            "Fit the laws of arXiv 2503.04377 to results records (dimcut.results/1): "
            f"{PERPLEXITY_LAW.formula} and, per task, {ACCURACY_LAW.formula}, with s = 1 − d/D "
            "the effective sparsity and acc the task's headline metric. Records are grouped by "
            "model label; each model needs its dense record (s = 0) and at least 2 sliced ones. "
            "The dense record is the fit's point s = 0 (y = 1 for perplexity, 0 for accuracy); "
            "with --fixed-intercept it fixes b instead. Prints a table like the paper's Table 3 "
            "(RMSE = root mean squared residual; SE = standard error)."
        ),
    )
    fit.add_argument(
        "runs",
        nargs="+",
        metavar="RUNS",
        help="results files, or directories searched recursively for them",
    )
    fit.add_argument("--out", metavar="FIT_JSON", help="write the fits as JSON (e.g. fit.json)")
    fit.add_argument("--markdown", metavar="FIT_MD", help="write the table as Markdown")
    fit.add_argument(
        "--plot",
        metavar="FIG",
        help="draw the fits like the paper's Fig. 3; writes FIG as .png and .svg",
    )
    fit.add_argument(
        "--fixed-intercept",
        action="store_true",
        help="fix b to the theory's value (1 for perplexity, 0 for accuracy) and fit only a",
    )
    fit.add_argument(
        "--label",
        action="append",
        metavar="NAME",
        help="fit only this model label (repeatable; default: every model found)",
    )
    fit.set_defaults(func=_run_fit)

    predict_parser = subparsers.add_parser(
        "predict",
        help="predict perplexity/accuracy at a sparsity, or the largest sparsity within a budget",
        description=(
            "Use a fit (from `dimcut fit --out`) to predict the metrics at an effective sparsity "
            "s = 1 − d/D, with prediction intervals, or invert it: the largest sparsity whose "
            "predicted perplexity/accuracy meets a budget. Predictions more than "
            f"{EXTRAPOLATION_MARGIN:.0%} beyond the fitted sparsity range are refused unless "
            "--allow-extrapolation; those beyond it but within the margin are flagged."
        ),
    )
    predict_parser.add_argument("--fit", required=True, metavar="FIT_JSON", help="a fit.json")
    target = predict_parser.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "--sparsity", type=float, metavar="S", help="predict every metric at effective sparsity S"
    )
    target.add_argument(
        "--max-ppl", type=float, metavar="X", help="largest sparsity with predicted PPL ≤ X"
    )
    target.add_argument(
        "--min-acc",
        metavar="TASK=Y",
        help="largest sparsity with predicted accuracy on TASK ≥ Y (e.g. arc_easy=0.6)",
    )
    predict_parser.add_argument(
        "--model", metavar="LABEL", help="the model to use when the fit holds several"
    )
    predict_parser.add_argument(
        "--hidden-size",
        type=int,
        metavar="D",
        help="the dense hidden size D (default: from the records), to report the width d",
    )
    predict_parser.add_argument(
        "--confidence",
        type=float,
        default=0.95,
        metavar="P",
        help="confidence level of the prediction intervals (default 0.95)",
    )
    predict_parser.add_argument(
        "--allow-extrapolation",
        action="store_true",
        # argparse %-formats help strings: "%%" prints the percent sign.
        help=f"predict even more than {EXTRAPOLATION_MARGIN:.0%}% beyond the fitted sparsity range",
    )
    predict_parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    predict_parser.set_defaults(func=_run_predict)


def _run_fit(args: argparse.Namespace) -> int:
    report = fit_records(
        load_records(args.runs), fixed_intercept=args.fixed_intercept, labels=args.label
    )
    print(report.table(), end="")
    if args.out:
        report.save(args.out)
        print(f"wrote {args.out}")
    if args.markdown:
        text = report.markdown()
        _write_atomically(Path(args.markdown), lambda f: f.write(text.encode()))
        print(f"wrote {args.markdown}")
    if args.plot:
        for written in plot_fits(report, args.plot):
            print(f"wrote {written}")
    return 0


def _run_predict(args: argparse.Namespace) -> int:
    model = FitReport.load(args.fit).model(args.model)
    options = {
        "confidence": args.confidence,
        "allow_extrapolation": args.allow_extrapolation,
        "hidden_size": args.hidden_size,
    }
    if args.sparsity is not None:
        predictions = predict(model, args.sparsity, **options)
    elif args.max_ppl is not None:
        predictions = [max_sparsity(model, PERPLEXITY, args.max_ppl, **options)]
    else:
        task, _, value = args.min_acc.rpartition("=")
        try:
            budget = float(value)
        except ValueError:
            raise ValueError(f"--min-acc wants TASK=Y, got {args.min_acc!r}") from None
        if not task:
            raise ValueError(f"--min-acc wants TASK=Y, got {args.min_acc!r}")
        predictions = [max_sparsity(model, task, budget, **options)]

    if args.json:
        document = {
            "schema": PREDICTION_SCHEMA,
            "x": X_AXIS,
            "predictions": [p.to_dict() for p in predictions],
        }
        print(json.dumps(document, indent=2, ensure_ascii=False))
    else:
        D = args.hidden_size or model.hidden_size
        print(_prediction_text(model, predictions, D), end="")
    return 0


def _prediction_text(model: ModelFit, predictions: list[Prediction], D: int | None) -> str:
    first = predictions[0]  # all share sparsity, width and budget
    lines = [f"model {model.label}"]
    if first.budget is not None:
        relation = "≤" if first.metric == PERPLEXITY else "≥"
        lines.append(
            f"largest {X_AXIS} with predicted {first.metric} {relation} {first.budget:g}: "
            f"{first.sparsity:.4f}"
        )
        if first.hidden_size is not None:
            lines.append(
                f"hidden width d = {first.hidden_size} of D = {D}: rounded up to a multiple of "
                f"{WIDTH_MULTIPLE} to stay within the budget"
            )
    else:
        lines.append(f"{X_AXIS} = {first.sparsity:.4f}")
        if first.hidden_size is not None:
            lines.append(
                f"hidden width d = {first.hidden_size} of D = {D} (effective sparsity "
                f"{1 - first.hidden_size / D:.4f}): floor((1 − s)·D) rounded down to a multiple "
                f"of {WIDTH_MULTIPLE}, as `dimcut slice` cuts"
            )
    if any(p.extrapolated for p in predictions):
        lines.append("note: beyond the fitted sparsity range; the flagged laws are extrapolated")

    def number(value: float) -> str:
        return "∞" if math.isinf(value) else f"{value:.4g}"

    rows = [["metric", "predicted", f"{first.confidence:.0%} prediction interval", ""]] + [
        [
            f"{p.metric} ({p.measure})",
            number(p.value),
            f"[{number(p.interval[0])}, {number(p.interval[1])}]",
            "extrapolated" if p.extrapolated else "",
        ]
        for p in predictions
    ]
    return "\n".join(lines) + "\n\n" + _aligned(rows, left=4)
