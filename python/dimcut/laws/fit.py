"""The laws, fitted per model and metric, and the fit report (fit.json, Table 3 of the paper)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from dimcut.laws.records import ModelRuns, Record, group_by_model
from dimcut.laws.stats import LineFit, fit_line
from dimcut.runtime import atomic_write_text

FIT_SCHEMA = "dimcut.fit/1"
PERPLEXITY = "perplexity"  # the metric name of the perplexity law; every other metric is a task
X_AXIS = "effective sparsity s = 1 − d/D"


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


@dataclass(frozen=True)
class MetricFit:
    """The law fitted for one metric of one model."""

    metric: str  # "perplexity" or a task name
    measure: str  # "ppl" or the task's headline metric, e.g. "acc_norm"
    baseline: float  # PPL0 or acc0: the dense model's value
    line: LineFit
    text: str | None = None  # the perplexity's evaluation text (None for tasks)

    @property
    def name(self) -> str:
        """The metric as tables show it: a task, or the perplexity with its text."""
        return f"{self.metric} on {self.text}" if self.text else self.metric

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
            "text": self.text,
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
        return cls(data["metric"], data["measure"], data["baseline"], line, data.get("text"))


@dataclass(frozen=True)
class ModelFit:
    """The laws fitted for one dense model and its sliced variants."""

    label: str
    hidden_size: int | None  # D, when the records give it
    metrics: tuple[MetricFit, ...]
    variant: str | None = None  # how the model was cut (`records.cut_variant`); None: unknown

    @property
    def name(self) -> str:
        return self.label if self.variant is None else f"{self.label} [{self.variant}]"

    def metric(self, name: str, text: str | None = None) -> MetricFit:
        """The fit of a task, or of the perplexity on `text` (default: the headline text, the
        first one measured)."""
        for fit in self.metrics:
            if fit.metric == name and (text is None or fit.text == text):
                return fit
        known = ", ".join(f.name for f in self.metrics)
        wanted = f"{name} on {text}" if text else name
        raise ValueError(f"model {self.name!r} has no fit for {wanted!r} (it has: {known})")

    def to_dict(self) -> dict:
        return {
            "label": self.label,
            "variant": self.variant,
            "hidden_size": self.hidden_size,
            "fits": [fit.to_dict() for fit in self.metrics],
        }

    @classmethod
    def from_dict(cls, data: dict) -> ModelFit:
        metrics = tuple(MetricFit.from_dict(fit) for fit in data["fits"])
        return cls(data["label"], data.get("hidden_size"), metrics, data.get("variant"))


def fit_model(
    runs: ModelRuns, *, fixed_intercept: bool = False, exclude: Iterable[float] = ()
) -> ModelFit:
    """Fit the perplexity law on every text and one accuracy law per task measured on the sliced
    models, leaving out the cuts at the requested sparsities `exclude` (held out)."""
    kept = [r for r in runs.sliced if not _held_out(r, exclude)]
    texts = list(dict.fromkeys(t for r in [runs.dense, *kept] for t in r.perplexities))
    metrics = [(PERPLEXITY, t) for t in texts if any(t in r.perplexities for r in kept)]
    metrics += [(task, None) for task in sorted({task for r in kept for task in r.tasks})]
    if not metrics:
        raise ValueError(f"model {runs.name!r}: its sliced records measure nothing to fit")
    return ModelFit(
        runs.label,
        runs.hidden_size,
        tuple(_fit_metric(runs, kept, m, t, fixed_intercept) for m, t in metrics),
        runs.variant,
    )


def _held_out(record: Record, sparsities: Iterable[float]) -> bool:
    return any(math.isclose(record.sparsity, s, abs_tol=1e-9) for s in sparsities)


def measurement(record: Record, metric: str, text: str | None) -> tuple[str, float] | None:
    """(measure, value) of `metric` (on `text`, for the perplexity) in `record`, if measured."""
    if metric == PERPLEXITY:
        found = record.perplexities.get(text)
        return None if found is None else ("ppl", found.ppl)
    found = record.tasks.get(metric)
    return None if found is None else (found.metric, found.value)


def _fit_metric(
    runs: ModelRuns, kept: list[Record], metric: str, text: str | None, fixed_intercept: bool
) -> MetricFit:
    where = f"model {runs.name!r}, {metric}" + (f" on {text}" if text else "")
    dense = measurement(runs.dense, metric, text)
    if dense is None:
        raise ValueError(
            f"{where}: measured on sliced models but not on the dense baseline {runs.dense.path}"
        )
    measure, baseline = dense
    measured = [(r, m[1]) for r in kept if (m := measurement(r, metric, text)) is not None]
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
    return MetricFit(metric, measure, baseline, line, text)


def _check_domain(where: str, path: str, value: float, metric: str) -> None:
    if metric == PERPLEXITY and value <= 1:
        raise ValueError(
            f"{where}: PPL = {value} ≤ 1 in {path}; ln PPL ≤ 0 makes ln PPL0 / ln PPL meaningless"
        )
    if metric != PERPLEXITY and value <= 0:
        raise ValueError(f"{where}: accuracy = {value} in {path}; ln(acc/acc0) needs acc > 0")


_TABLE_HEADER = [
    "model",
    "variant",
    "metric",
    "a",
    "b",
    "RMSE",
    "R²",
    "SE(a)",
    "SE(b)",
    "n",
    "RMSE theory",
]


def text_table(rows: list[list[str]], *, left: int) -> str:
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
    held_out: tuple[float, ...] = ()  # requested sparsities left out of the fits

    def model(self, label: str | None = None, variant: str | None = None) -> ModelFit:
        """The fit of `label` cut as `variant`; either may be omitted when only one matches."""
        found = [
            m
            for m in self.models
            if (label is None or m.label == label) and (variant is None or m.variant == variant)
        ]
        if len(found) == 1:
            return found[0]
        names = ", ".join(m.name for m in self.models)
        if not found:
            wanted = " ".join(filter(None, [label and repr(label), variant and f"[{variant}]"]))
            raise ValueError(f"no model {wanted} in the fit (it has: {names})")
        raise ValueError(
            f"the fit holds several models ({names}); choose one with a label and a variant"
        )

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
            "held_out": list(self.held_out),
            "models": [model.to_dict() for model in self.models],
        }

    @classmethod
    def from_dict(cls, data: dict) -> FitReport:
        if data.get("schema") != FIT_SCHEMA:
            raise ValueError(f"schema {data.get('schema')!r}, expected {FIT_SCHEMA!r}")
        models = tuple(ModelFit.from_dict(model) for model in data["models"])
        return cls(
            models,
            data["intercept"] == "fixed",
            tuple(data.get("sources", ())),
            tuple(data.get("held_out", ())),
        )

    def save(self, path: str | Path, extra: dict | None = None) -> None:
        """Write fit.json atomically; `extra` adds top-level sections (e.g. `holdout`)."""
        text = json.dumps({**self.to_dict(), **(extra or {})}, indent=2, ensure_ascii=False) + "\n"
        atomic_write_text(path, text)

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
                        model.variant or "—",
                        f"{fit.name} ({fit.measure})",
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
        return caption + "\n\n" + text_table([_TABLE_HEADER, *self._rows()], left=3)

    def markdown(self) -> str:
        """The same table as Markdown."""
        lines = [
            "# Sparsity-law fits",
            "",
            "  \n".join(self._caption()),  # two trailing spaces: a Markdown line break
            "",
            "| " + " | ".join(_TABLE_HEADER) + " |",
            "|" + "|".join(["---"] * 3 + ["---:"] * (len(_TABLE_HEADER) - 3)) + "|",
            *("| " + " | ".join(row) + " |" for row in self._rows()),
        ]
        return "\n".join(lines) + "\n"


def _only(groups: dict, part: int, wanted: Iterable[str] | None, what: str) -> dict:
    """The groups whose key's `part` (0: label, 1: variant) is wanted; all without a wish."""
    if not wanted:
        return groups
    found = {key[part] for key in groups}
    missing = [name for name in wanted if name not in found]
    if missing:
        raise ValueError(
            f"no records {what} {', '.join(map(repr, missing))} "
            f"(found: {', '.join(map(repr, sorted(found)))})"
        )
    return {key: runs for key, runs in groups.items() if key[part] in wanted}


def fit_records(
    records: Iterable[Record],
    *,
    fixed_intercept: bool = False,
    labels: Iterable[str] | None = None,
    variants: Iterable[str] | None = None,
    held_out: Iterable[float] = (),
) -> FitReport:
    """Fit the laws for every model and cut variant among `records` (or only the models in
    `labels` and the variants in `variants`), leaving out the cuts at the requested sparsities
    `held_out`."""
    groups = group_by_model(records)
    groups = _only(groups, 0, labels, "for model(s)")
    groups = _only(groups, 1, variants, "of cut variant(s)")
    held_out = tuple(sorted(set(held_out)))
    models = tuple(
        fit_model(runs, fixed_intercept=fixed_intercept, exclude=held_out)
        for runs in groups.values()
    )
    sources = tuple(
        dict.fromkeys(r.path for runs in groups.values() for r in (runs.dense, *runs.sliced))
    )
    return FitReport(models, fixed_intercept, sources, held_out)
