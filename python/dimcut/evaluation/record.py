"""The results record (docs/results-schema.md): model facts, fingerprint, parameter counts,
versions; writing it and summarising it for a terminal."""

from __future__ import annotations

import hashlib
import json
import platform
from collections.abc import Sequence
from pathlib import Path

from dimcut.hub import model_label
from dimcut.runtime import atomic_write_text

SCHEMA = "dimcut.results/1"


def model_facts(model_dir: Path) -> dict:
    """Slicing facts from config.json's "dimcut" block; a checkpoint without one is dense."""
    config = json.loads((model_dir / "config.json").read_text())
    block = config.get("dimcut")
    if block is None:
        width = config["hidden_size"]
        return {
            "label": model_label(model_dir),
            "format": "dense",
            "sparsity": 0.0,
            "effective_sparsity": 0.0,
            "hidden_size": width,
            "original_hidden_size": width,
            "calibration": None,
            "widths": None,
            "heal": None,
        }
    source_model = block.get("source_model")
    return {
        # The laws group results by the dense model a cut came from.
        "label": model_label(source_model or model_dir),
        "format": block["format"],
        "sparsity": block.get("sparsity"),
        "effective_sparsity": block["effective_sparsity"],
        "hidden_size": block["hidden_size"],
        "original_hidden_size": block["original_hidden_size"],
        "calibration": block.get("calibration"),
        "widths": block.get("widths"),  # uniform, variance or a schedule file
        "heal": _heal_facts(block.get("heal")),
    }


def _heal_facts(heal: dict | None) -> dict | None:
    """What a results record keeps of a `dimcut heal` provenance block."""
    if heal is None:
        return None
    keys = ("loss", "steps", "batch_size", "lr", "topk", "train_shortcuts", "final_loss")
    facts = {"data": heal.get("data"), **{key: heal.get(key) for key in keys}}
    if heal.get("train_shortcuts"):  # the shortcuts' own rate shapes the model only then
        facts["shortcut_lr"] = heal.get("shortcut_lr")
    return facts


def overlaps_calibration(facts: dict, source_key: str) -> bool | None:
    """Whether the perplexity text is text the model was calibrated (or healed) on; None when
    the calibration is unknown.

    The calibration and heal records name their text by `data_sources.source_key`, as
    `source_key` does.
    """
    if facts["format"] == "dense":
        return False
    healed_on = ((facts.get("heal") or {}).get("data") or {}).get("source")
    if healed_on == source_key:
        return True
    calibrated_on = (facts["calibration"] or {}).get("source")
    return None if calibrated_on is None else calibrated_on == source_key


def count_parameters(model) -> dict:
    """Parameters of the loaded model (tied tensors once), shortcut matrices counted apart."""
    from dimcut.formats import split_shortcuts  # imports torch: only when a model is counted

    unique = {}  # tied tensors share storage: count each once
    for name, tensor in model.state_dict().items():
        unique.setdefault(tensor.data_ptr(), (name, tensor.numel()))
    return split_shortcuts(unique.values())


def checkpoint_fingerprint(model_dir: Path) -> str | None:
    """sha256 over each safetensors file's name, size and header (cheap: no weight bytes read)."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        with file.open("rb") as fh:
            header = fh.read(int.from_bytes(fh.read(8), "little"))
        digest.update(f"{file.name}\0{file.stat().st_size}\0".encode())
        digest.update(header)
    return digest.hexdigest()


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    def installed(package: str) -> str | None:
        try:
            return version(package)
        except PackageNotFoundError:
            return None

    return {
        "dimcut": installed("dimcut"),
        "torch": installed("torch"),
        "transformers": installed("transformers"),
        "lm_eval": installed("lm_eval"),
        "datasets": installed("datasets"),
        "python": platform.python_version(),
    }


def write_results(record: dict, path: str | Path) -> None:
    """Write a record as JSON atomically (readers see the old file or the whole new one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")


def format_summary(record: dict) -> str:
    model = record["model"]
    params = model["parameters"]
    width = f"hidden {model['hidden_size']}/{model['original_hidden_size']}"
    sparsity = f"effective sparsity {model['effective_sparsity']:.3f}"
    lines = [f"model  {model['label']}  ({model['format']}, {width}, {sparsity})"]
    lines.append(f"params {params['total']:,} ({params['without_shortcuts']:,} w/o shortcuts)")
    entries = record.get("perplexities")
    if entries is None:  # records from before several texts could be measured
        entries = [record["perplexity"]] if record["perplexity"] else []
    for ppl in entries:
        lines.append(
            f"ppl    {ppl['ppl']:.3f}  on {ppl['source']}  "
            f"({ppl['windows']} windows x {ppl['seqlen']} tokens)"
        )
    if record["tasks"]:
        lines.append(f"{'task':<15}{'metric':<10}{'value':>8}{'stderr':>9}{'n':>7}")
        for name, entry in record["tasks"].items():
            stderr = entry[f"{entry['headline_metric']}_stderr"]
            lines.append(
                f"{name:<15}{entry['headline_metric']:<10}{entry['headline']:>8.4f}"
                f"{(f'{stderr:.4f}' if stderr is not None else '-'):>9}{entry['n']:>7}"
            )
    wall = record["wall_seconds"]
    lines.append(
        "wall   "
        + "  ".join(f"{key} {value:.1f}s" for key, value in wall.items() if value is not None)
    )
    return "\n".join(lines)


def text_sources(ppl: str | Sequence[str] | None) -> list[str]:
    """`evaluate`'s `ppl`: one text source, several, or none, as a list."""
    return [ppl] if isinstance(ppl, str) else list(ppl or ())


def missing_measurements(record: dict | None, options: dict) -> dict:
    """What of `evaluate(**options)`'s perplexity texts and tasks `record` lacks, as the
    `ppl`/`tasks` options that would measure only that (everything when there is no record).
    A humaneval result counts only if made with the options' `max_new_tokens` and
    `exec_timeout` (when they are given)."""
    from dimcut import data_sources

    sources = text_sources(options.get("ppl"))
    tasks = list(options.get("tasks") or [])
    if record is None or record.get("dtype") != options.get("dtype", "float32"):
        return {"ppl": sources, "tasks": tasks}  # a record of another precision is redone
    split = options.get("ppl_split", "test")
    seqlen = options.get("seqlen", 2048)
    measured = set()
    if record.get("ppl_windows", "unrecorded") == options.get("ppl_windows"):
        entries = record.get("perplexities") or []
        measured = {e["source"] for e in entries if e["seqlen"] == seqlen}
    same_limit = record.get("limit") == options.get("limit")
    have_tasks = set(record.get("tasks") or {}) if same_limit else set()
    if not _same_generation(record, options):
        have_tasks.discard("humaneval")
    return {
        "ppl": [s for s in sources if data_sources.source_key(s, split) not in measured],
        "tasks": [t for t in tasks if t not in have_tasks],
    }


def _same_generation(record: dict, options: dict) -> bool:
    """Whether the record's humaneval entry was generated with the options' token cap and run
    under their timeout, where the options give them (pass@1 depends on both; the samples file
    keeps the completions, so another timeout only re-executes them)."""
    entry = (record.get("tasks") or {}).get("humaneval") or {}
    settings = (("max_new_tokens", "max_new_tokens"), ("exec_timeout", "timeout"))
    return all(
        entry.get(recorded) == options[option]
        for option, recorded in settings
        if options.get(option) is not None
    )


def _measured_on(record: dict) -> tuple:
    """What a record's numbers depend on besides the texts and tasks: the tensors
    (fingerprint), the calibration and healing (a re-made cut of the same shapes is another
    model), and the precision."""
    model = record["model"]
    return (model.get("fingerprint"), model.get("calibration"), model.get("heal"), record["dtype"])


def describes(record: dict, model_dir: str | Path, dtype: str) -> bool:
    """Whether `record` was measured on the checkpoint now in `model_dir`, in `dtype`."""
    model_dir = Path(model_dir)
    facts = model_facts(model_dir)
    now = (checkpoint_fingerprint(model_dir), facts["calibration"], facts["heal"], dtype)
    return _measured_on(record) == now


def merge_results(old: dict, new: dict) -> dict:
    """`old` with the measurements of `new` (the same checkpoint, measured later) added."""
    if _measured_on(old) != _measured_on(new):
        raise ValueError(
            f"cannot merge results of different checkpoints or precisions "
            f"({old['model']['path']} and {new['model']['path']})"
        )
    merged = {**old, "versions": new["versions"]}
    if new["perplexities"]:
        merged["perplexities"] = [*(old.get("perplexities") or []), *new["perplexities"]]
        merged["perplexity"] = merged["perplexities"][0]
        merged["ppl_windows"] = new["ppl_windows"]
    if new["tasks"]:
        same_limit = old.get("limit") == new["limit"]
        merged["tasks"] = {**(old["tasks"] if same_limit else {}), **new["tasks"]}
        merged["limit"] = new["limit"]
    wall = dict(old["wall_seconds"])
    for key, value in new["wall_seconds"].items():
        if value is not None:
            wall[key] = (wall.get(key) or 0) + value
    merged["wall_seconds"] = wall
    return merged
