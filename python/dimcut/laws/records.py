"""Results records (`dimcut.results/1`, docs/results-schema.md) reduced to what the laws need,
and grouped by the dense model they belong to (`model.label`)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

from dimcut.evaluation import SCHEMA as RESULTS_SCHEMA

DENSE = "dense"  # the variant of an unsliced model


class Perplexity(NamedTuple):
    ppl: float
    seqlen: int | None  # the window: perplexities of other windows are not comparable
    dtype: str  # the evaluation precision (float32 before records held it)


class Accuracy(NamedTuple):
    metric: str  # the task's headline metric name
    value: float
    dtype: str


def cut_variant(model: dict) -> str:
    """How a record's model was cut, as the laws group it: the format, then what departs from a
    uniform un-healed cut (e.g. `slicegpt`, `plain/rms`, `slicegpt/widths=variance`,
    `slicegpt/healed-kd-200`; a plain cut made by another `--method` than pca is named by it
    instead of its weighting: `plain/channels`, `plain/random`, `plain/layers`). Records older
    than a setting read as its default then."""
    fmt = model.get("format") or "slicegpt"
    if fmt == DENSE:
        return DENSE
    calibration = model.get("calibration") or {}
    parts = [fmt]
    method = calibration.get("method", "pca")  # PCA records name no method
    if fmt == "plain":
        # raw was the only weighting before there were others
        parts.append(calibration.get("weighting", "raw") if method == "pca" else method)
    widths = model.get("widths") or ("schedule" if calibration.get("widths") else "uniform")
    if widths != "uniform":
        parts.append(f"widths={widths if widths == 'variance' else Path(widths).stem}")
    heal = model.get("heal")
    if heal:
        parts.append(f"healed-{heal.get('loss')}-{heal.get('steps')}")
    return "/".join(parts)


@dataclass(frozen=True)
class Record:
    """One evaluated model (a `dimcut.results/1` file, or several of one model merged), reduced
    to what the laws need."""

    path: str
    label: str | None
    fingerprint: str | None
    variant: str  # `cut_variant`: the laws fit each variant of a model apart
    sparsity: float  # the requested s (the effective one when not recorded)
    effective_sparsity: float
    original_hidden_size: int | None  # D
    perplexities: dict[str, Perplexity]  # by text, the headline text first
    tasks: dict[str, Accuracy]  # by task
    calibration: str | None = None  # the calibration text's hash: cuts made alike share it

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

        entries = data.get("perplexities")
        where = "perplexities[{}].ppl"
        if entries is None:  # records from before several texts could be measured
            entries, where = (
                [data["perplexity"]] if data.get("perplexity") else [],
                "perplexity.ppl",
            )
        # Records keep the precision they were evaluated in (float32 before it was recorded): a
        # merged record may hold perplexities of one and accuracies of another.
        dtype = data.get("dtype") or "float32"
        perplexities = {}
        for i, entry in enumerate(entries):
            if entry and entry.get("ppl") is not None:
                value = _finite(entry["ppl"], where.format(i), path)
                perplexities[str(entry.get("source"))] = Perplexity(
                    value, entry.get("seqlen"), dtype
                )
        tasks = {}
        for task, result in (data.get("tasks") or {}).items():
            if result and result.get("headline") is not None:
                value = _finite(result["headline"], f"tasks.{task}.headline", path)
                tasks[task] = Accuracy(result.get("headline_metric") or "headline", value, dtype)
        requested = model.get("sparsity")
        return cls(
            path=path,
            label=model.get("label") or None,
            fingerprint=model.get("fingerprint"),
            variant=cut_variant(model),
            sparsity=sparsity if requested is None else float(requested),
            effective_sparsity=sparsity,
            original_hidden_size=model.get("original_hidden_size"),
            perplexities=perplexities,
            tasks=tasks,
            calibration=(model.get("calibration") or {}).get("token_sha256"),
        )

    def merged(self, other: Record) -> Record:
        """One record with the measurements of both (the same model, measured in several runs:
        e.g. one file per text); a measurement both hold must agree."""

        def disagree(name: str, mine: tuple, theirs: tuple) -> None:
            raise ValueError(
                f"{self.path} and {other.path} are the same model ({self.label!r}, "
                f"{self.variant}, s = {self.effective_sparsity:.4g}) but disagree on "
                f"{name}: {mine} vs {theirs}"
            )

        # A measurement both hold must agree in value and in how it was made (window, metric,
        # precision).
        for text, theirs in other.perplexities.items():
            mine = self.perplexities.get(text)
            if mine and (
                (mine.seqlen, mine.dtype) != (theirs.seqlen, theirs.dtype)
                or not math.isclose(mine.ppl, theirs.ppl, rel_tol=1e-6)
            ):
                disagree(f"perplexity on {text}", mine, theirs)
        for task, theirs in other.tasks.items():
            mine = self.tasks.get(task)
            if mine and (
                (mine.metric, mine.dtype) != (theirs.metric, theirs.dtype)
                or not math.isclose(mine.value, theirs.value, rel_tol=1e-6)
            ):
                disagree(f"task {task}", mine, theirs)
        return replace(
            self,
            path=f"{self.path} + {other.path}",
            perplexities={**self.perplexities, **other.perplexities},
            tasks={**self.tasks, **other.tasks},
        )

    @property
    def identity(self) -> tuple:
        """What makes two records measurements of the same model (their files may differ)."""
        return (
            self.label,
            self.variant,
            self.fingerprint,
            self.effective_sparsity,
            self.calibration,
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
    """The records of one variant of one dense model: its baseline (s = 0) and its cuts."""

    label: str
    variant: str
    dense: Record
    sliced: tuple[Record, ...]

    @property
    def hidden_size(self) -> int | None:
        """D, the dense model's hidden size, when the records give it."""
        return self.dense.original_hidden_size

    @property
    def name(self) -> str:
        return f"{self.label} [{self.variant}]"


def merge_measurements(records: Iterable[Record]) -> list[Record]:
    """Records of one model measured in several runs (one file per text, say) as one record."""
    merged: dict[tuple, Record] = {}
    for record in records:
        key = record.identity
        merged[key] = merged[key].merged(record) if key in merged else record
    return list(merged.values())


def group_by_model(records: Iterable[Record]) -> dict[tuple[str, str], ModelRuns]:
    """Group records by (model label, cut variant), each group with the model's dense baseline;
    check they belong together. Records of one model from several files are merged first."""
    records = merge_measurements(records)
    unlabelled = [r.path for r in records if r.label is None]
    if unlabelled:
        raise ValueError(
            "records without model.label (the laws group records by the dense model's label, so "
            f"records of different models cannot be told apart): {', '.join(unlabelled)}"
        )
    by_label: dict[str, list[Record]] = {}
    for record in records:
        by_label.setdefault(record.label, []).append(record)
    groups = {}
    for label, group in sorted(by_label.items()):
        dense = _dense_baseline(label, group)
        variants = sorted({r.variant for r in group if not r.is_dense})
        for variant in variants or [DENSE]:
            sliced = [r for r in group if not r.is_dense and r.variant == variant]
            groups[label, variant] = _model_runs(label, variant, dense, sliced)
    return groups


def _dense_baseline(label: str, records: list[Record]) -> Record:
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
    return dense[0]


def _model_runs(label: str, variant: str, baseline: Record, sliced: list[Record]) -> ModelRuns:
    runs = ModelRuns(
        label, variant, baseline, tuple(sorted(sliced, key=lambda r: r.effective_sparsity))
    )
    name = f"model {runs.name!r}"
    D = baseline.original_hidden_size
    for record in sliced:
        if D and record.original_hidden_size and record.original_hidden_size != D:
            raise ValueError(
                f"{name}: {record.path} was sliced from a model with D = "
                f"{record.original_hidden_size}, but the dense baseline {baseline.path} has D = {D}"
            )
    records = [baseline, *runs.sliced]
    for text in {t for r in records for t in r.perplexities}:
        measured = [r.perplexities[text] for r in records if text in r.perplexities]
        seqlens = {m.seqlen for m in measured}
        if len(seqlens) > 1:
            raise ValueError(
                f"{name}: perplexities on {text} were measured with different windows "
                f"(seqlen {sorted(seqlens, key=str)}); they are not comparable"
            )
        _one_precision(f"{name}: perplexities on {text}", {m.dtype for m in measured})
    for task in {t for r in records for t in r.tasks}:
        measured = [r.tasks[task] for r in records if task in r.tasks]
        measures = {m.metric for m in measured}
        if len(measures) > 1:
            raise ValueError(
                f"{name}: task {task!r} has different headline metrics {sorted(measures)}"
            )
        _one_precision(f"{name}: accuracies on task {task!r}", {m.dtype for m in measured})
    return runs


def _one_precision(what: str, dtypes: set[str]) -> None:
    """A law compares a metric across cuts: every point must be measured in one precision."""
    if len(dtypes) > 1:
        raise ValueError(
            f"{what} were measured in different precisions ({', '.join(sorted(dtypes))}); "
            "evaluate every point, the dense model included, with the same --dtype"
        )
