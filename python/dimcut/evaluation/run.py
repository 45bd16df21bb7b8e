"""`evaluate(model_dir)`: perplexity, zero-shot tasks and generative tasks of one checkpoint, as a
results record.

Every input is checked before the model is loaded (the perplexity text is tokenized and cut
into windows, the task data read and checked against the prompts' fields, the tokenizer
loaded), and every task example is checked to fit the model's context before the model runs.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from dimcut import data_sources
from dimcut.evaluation import humaneval, lambada
from dimcut.evaluation.generation import GenerativeTask, GreedyGenerator
from dimcut.evaluation.humaneval import DEFAULT_MAX_NEW_TOKENS, SamplesFile, generation_key
from dimcut.evaluation.perplexity import cut_windows, score_windows
from dimcut.evaluation.record import (
    SCHEMA,
    checkpoint_fingerprint,
    count_parameters,
    model_facts,
    overlaps_calibration,
    text_sources,
    versions,
)
from dimcut.evaluation.sandbox import DEFAULT_LIMITS, Limits
from dimcut.evaluation.tasks import DEFAULT_TASKS, TaskRun, TaskScorer, prepare_tasks
from dimcut.runtime import Precision, torch_device
from dimcut.tokenizers import load_tokenizer

DEFAULT_PPL_SOURCE = data_sources.WIKI_OFFLINE


def evaluate(
    model_dir: str | Path,
    *,
    ppl: str | Sequence[str] | None = DEFAULT_PPL_SOURCE,
    ppl_split: str = "test",
    seqlen: int = 2048,
    ppl_windows: int | None = None,
    tasks: list[str] | tuple[str, ...] = DEFAULT_TASKS,
    task_data: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 1,
    device: str = "auto",
    dtype: Precision | str = Precision.FLOAT32,
    seed: int = 1234,
    label: str | None = None,
    scorer: TaskScorer | str = TaskScorer.SHARED_PREFIX,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    exec_timeout: float = DEFAULT_LIMITS.timeout,
    samples: str | Path | None = None,
) -> dict:
    """Evaluate a dense or dimcut-sliced checkpoint; returns a `dimcut.results/1` record.

    `ppl` is a text source (`dimcut.data_sources`), several (each measured; the first is the
    record's `perplexity`, all are in `perplexities`) or None, cut into windows of `seqlen` tokens
    (at most `ppl_windows` of them); `tasks` are names from `TASKS`, run on `task_data` (see
    `prepare_tasks`), at most `limit` examples each, scored by `scorer` (`TaskScorer`).
    `tasks` may also name `GenerativeTask`s: humaneval (greedy, at most `max_new_tokens` new
    tokens, each program run in the sandbox for at most `exec_timeout` seconds, problems kept in
    and resumed from the JSONL file `samples` when given) and lambada_generate.
    """
    import torch

    from dimcut import formats

    started = time.perf_counter()
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a model directory (no config.json)")
    dtype = Precision.parse(dtype, "dtype")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    scorer = TaskScorer(scorer)
    generative = [GenerativeTask(t) for t in tasks if t in GenerativeTask.values()]
    tasks = [t for t in tasks if t not in GenerativeTask.values()]
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if not exec_timeout > 0:
        raise ValueError(f"exec_timeout must be positive, got {exec_timeout}")
    limits = Limits(timeout=exec_timeout)
    problems = humaneval.load_problems() if GenerativeTask.HUMANEVAL in generative else []
    passages = lambada.load_passages() if GenerativeTask.LAMBADA_GENERATE in generative else []
    device = str(torch_device(device))
    facts = model_facts(model_dir)
    tokenizer = load_tokenizer(model_dir)
    sources = text_sources(ppl)
    keys = [data_sources.source_key(source, ppl_split) for source in sources]
    if len(set(keys)) < len(keys):
        raise ValueError(f"ppl names one text twice: {', '.join(sources)}")
    texts = {  # every text is read and cut before the model loads
        key: cut_windows(
            tokenizer, data_sources.load_documents(source, ppl_split), seqlen, ppl_windows
        )
        for key, source in zip(keys, sources, strict=True)
    }
    wall = {"load": None, "perplexity": None, "tasks": None, "total": None}

    with tempfile.TemporaryDirectory(prefix="dimcut-tasks-") as config_dir:
        prepared = prepare_tasks(list(tasks), task_data, config_dir) if tasks else []

        torch.manual_seed(seed)
        clock = time.perf_counter()
        model, _ = formats.load(model_dir, device=device, dtype=dtype)
        wall["load"] = time.perf_counter() - clock

        generator = None
        if generative:  # every prompt is checked to fit before the model runs
            generator = GreedyGenerator(model, tokenizer, batch_size=batch_size)
            humaneval.check_fits(generator, problems[:limit], max_new_tokens)
            lambada.check_fits(generator, passages[:limit])

        task_run = None
        if prepared:
            clock = time.perf_counter()
            task_run = TaskRun(
                model,
                tokenizer,
                prepared,
                config_dir,
                limit=limit,
                batch_size=batch_size,
                seed=seed,
                scorer=scorer,
            )
            wall["tasks"] = time.perf_counter() - clock

        perplexities = []
        if texts:
            clock = time.perf_counter()
            perplexities = [
                {
                    "source": key,
                    **score_windows(model, windows, batch_size),
                    "overlaps_calibration": overlaps_calibration(facts, key),
                }
                for key, windows in texts.items()
            ]
            wall["perplexity"] = time.perf_counter() - clock

        task_entries = {}
        if task_run is not None:
            clock = time.perf_counter()
            task_entries = task_run.run()
            wall["tasks"] += time.perf_counter() - clock

        if generator is not None:
            clock = time.perf_counter()
            if problems:
                key = generation_key(
                    _model_key(model_dir, facts), dtype.value, max_new_tokens, generator.eos
                )
                task_entries["humaneval"] = humaneval.evaluate_humaneval(
                    generator,
                    problems,
                    limit=limit,
                    max_new_tokens=max_new_tokens,
                    limits=limits,
                    samples=SamplesFile(samples, key),
                )
            if passages:
                task_entries["lambada_generate"] = lambada.evaluate_lambada(
                    generator, passages, limit=limit
                )
            wall["generation"] = time.perf_counter() - clock  # only when generative tasks ran

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
            "widths": facts["widths"],
            "heal": facts["heal"],
        },
        "perplexity": perplexities[0] if perplexities else None,
        "perplexities": perplexities,
        "tasks": task_entries,
        "versions": versions(),
        "seed": seed,
        "limit": limit,
        "ppl_windows": ppl_windows,
        "num_fewshot": 0,
        "batch_size": batch_size,
        "device": device,
        "dtype": dtype.value,
        "wall_seconds": wall,
    }


def _model_key(model_dir: Path, facts: dict) -> str:
    """What identifies the model behind cached generations (as `record.describes` does, less the
    precision): the tensors' fingerprint, the calibration and the healing."""
    identity = [checkpoint_fingerprint(model_dir), facts["calibration"], facts["heal"]]
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
