"""Results records for the sparsity-law tests, following the laws exactly or with given residuals."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from dimcut.laws import FitReport, fit_records, load_records

D = 4096


def record(
    label: str | None,
    s: float,
    *,
    ppl: float | None = None,
    tasks: dict[str, float] | None = None,
    fingerprint: str | None = None,
    original_hidden_size: int = D,
    fmt: str = "slicegpt",
    texts: dict[str, float] | None = None,
) -> dict:
    """A `dimcut.results/1` record as `dimcut eval` writes it: `ppl` on wikitext2, or `texts`
    (text -> PPL, the first the headline) in `perplexities`; sliced models in format `fmt`."""
    if texts is not None:
        entries = [{"source": t, "seqlen": 2048, "windows": 4, "ppl": v} for t, v in texts.items()]
        return {
            **record(
                label,
                s,
                tasks=tasks,
                fingerprint=fingerprint,
                fmt=fmt,
                original_hidden_size=original_hidden_size,
            ),
            "perplexity": entries[0] if entries else None,
            "perplexities": entries,
        }
    return {
        "schema": "dimcut.results/1",
        "model": {
            "path": f"/models/{label}-{s}",
            "label": label,
            "fingerprint": fingerprint or f"{label}@{s}",
            "format": "dense" if s == 0 else fmt,
            "sparsity": s,
            "effective_sparsity": s,
            "hidden_size": round((1 - s) * original_hidden_size),
            "original_hidden_size": original_hidden_size,
        },
        "perplexity": None
        if ppl is None
        else {"source": "wikitext2", "seqlen": 2048, "windows": 10, "ppl": ppl},
        "tasks": {
            task: {"headline_metric": "acc_norm", "headline": acc, "acc_norm": acc}
            for task, acc in (tasks or {}).items()
        },
    }


def write(directory: Path, records: list[dict]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for i, rec in enumerate(records):
        (directory / f"results-{i:03d}.json").write_text(json.dumps(rec))
    return directory


def law_records(
    label: str,
    sparsities,
    *,
    ppl0: float = 8.0,
    a: float = -1.1,
    b: float = 0.97,
    acc0: float = 0.7,
    acc_a: float = -2.0,
    acc_b: float = 0.03,
    residuals=None,
    acc_residuals=None,
    original_hidden_size: int = D,
) -> list[dict]:
    """A dense record plus sliced ones whose y follow the laws plus the given residuals."""
    residuals = np.zeros(len(sparsities)) if residuals is None else residuals
    acc_residuals = np.zeros(len(sparsities)) if acc_residuals is None else acc_residuals
    size = {"original_hidden_size": original_hidden_size}
    records = [record(label, 0.0, ppl=ppl0, tasks={"arc_easy": acc0}, **size)]
    for s, r, r_acc in zip(sparsities, residuals, acc_residuals):
        ppl = ppl0 ** (1 / (a * s + b + r))
        acc = acc0 * math.exp(acc_a * s + acc_b + r_acc)
        records.append(record(label, float(s), ppl=ppl, tasks={"arc_easy": acc}, **size))
    return records


def fit_of(tmp_path: Path, records: list[dict], **options) -> FitReport:
    return fit_records(load_records([write(tmp_path / "runs", records)]), **options)


def sweep_records(label: str, widths: list[int], hidden_size: int) -> list[dict]:
    """Records of a sweep whose cuts have the sliced widths d: s = 1 − d/D, as `dimcut slice`
    records it (the fixtures above use round sparsities, which are not whole widths)."""
    sparsities = [1 - width / hidden_size for width in widths]
    return law_records(label, sparsities, original_hidden_size=hidden_size)
