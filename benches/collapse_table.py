"""Collapse under slicing, as a table: for each sweep of generation records (`dimcut sweep ...
--tasks humaneval[,lambada_generate]`), one row per point with HumanEval's pass@1 and the
collapse metrics of its completions (rep-4: repeated 4-grams; distinct-2; the fraction of
completions that end in a loop; the fraction cut at the token cap; the fraction whose program —
prompt, completion and tests — does not compile, a failure of form rather than of logic; blank
lines compile, the prompt's docstring being a function body), and LAMBADA-by-generation accuracy
where measured. The collapse metrics are measured again from each record's samples file
(`<record>.humaneval.jsonl`, the completions) with today's definitions
(`dimcut.evaluation.collapse`), so records written before a definition changed stay comparable.

    python benches/collapse_table.py "SmolLM2 slicegpt=docs/results/generation/smollm2-slicegpt" \\
        "SmolLM2 slicegpt, healed 50=docs/results/generation/smollm2-slicegpt-healed50" -o OUT.md

A sweep directory without records yet is skipped with a note on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dimcut.evaluation.collapse import collapse_metrics
from dimcut.evaluation.humaneval import Problem, load_problems, program

COLUMNS = (
    "cut",
    "s",
    "pass@1",
    "rep-4",
    "distinct-2",
    "loops",
    "at the cap",
    "does not compile",
    "LAMBADA (generated)",
)


def _number(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _compiles(source: str) -> bool:
    try:
        compile(source, "<completion>", "exec")
    except (SyntaxError, ValueError, RecursionError, MemoryError):  # ValueError: a NUL byte
        return False
    return True


def _remeasured(record_file: Path, problems: dict[str, Problem]) -> dict:
    """The collapse metrics of the record's completions and the fraction of them that do not
    compile, or {} without its samples file."""
    samples = record_file.with_suffix(".humaneval.jsonl")
    if not samples.is_file():
        return {}
    by_task = {}
    for line in samples.read_text().splitlines():
        row = json.loads(line)
        by_task[row["task_id"]] = row["completion"]  # a resumed point may repeat a problem
    broken = sum(not _compiles(program(problems[t], c)) for t, c in by_task.items())
    return {**collapse_metrics(list(by_task.values())), "uncompilable": broken / len(by_task)}


def rows(label: str, runs: Path, problems: dict[str, Problem]) -> list[list[str]]:
    records = []
    for path in runs.glob("*.json"):
        record = json.loads(path.read_text())
        humaneval = (record.get("tasks") or {}).get("humaneval")
        if humaneval is None:
            continue
        records.append((record["model"].get("effective_sparsity") or 0.0, path, record))
    out = []
    for sparsity, path, record in sorted(records, key=lambda item: item[0]):
        humaneval = {**record["tasks"]["humaneval"], **_remeasured(path, problems)}
        lambada = record["tasks"].get("lambada_generate") or {}
        capped = humaneval["finish"].get("length", 0) / humaneval["n"] if humaneval["n"] else None
        out.append(
            [
                label,
                f"{sparsity:.3g}",
                f"{_number(humaneval['headline'])} ± {_number(humaneval['pass@1_stderr'])}",
                _number(humaneval["repetition_rate"]),
                _number(humaneval["distinct_2"]),
                _number(humaneval["loop_fraction"], 2),
                _number(capped, 2),
                _number(humaneval.get("uncompilable"), 2),
                _number(lambada.get("headline")),
            ]
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweeps", nargs="+", metavar="LABEL=DIR")
    parser.add_argument("-o", "--output", type=Path, required=True, help="markdown file")
    args = parser.parse_args(argv)
    problems = {problem.task_id: problem for problem in load_problems()}
    table = []
    for sweep in args.sweeps:
        label, _, directory = sweep.partition("=")
        if not directory:
            parser.error(f"{sweep!r}: expected LABEL=DIR")
        found = rows(label, Path(directory), problems)
        if not found:
            print(f"collapse_table.py: no HumanEval records in {directory}", file=sys.stderr)
        table += found
    lines = [
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
        *("| " + " | ".join(row) + " |" for row in table),
    ]
    args.output.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
