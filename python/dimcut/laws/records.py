"""Results records (`dimcut.results/1`, docs/results-schema.md) reduced to what the laws need,
and grouped by the dense model they belong to (`model.label`)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from dimcut.evaluation import SCHEMA as RESULTS_SCHEMA


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
