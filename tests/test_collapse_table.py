"""benches/collapse_table.py: one row per sweep point, its collapse metrics measured again from the
completions, and the fraction of programs that do not compile."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from dimcut.evaluation.humaneval import load_problems

BENCH = Path(__file__).resolve().parents[1] / "benches" / "collapse_table.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("collapse_table", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_point(runs: Path, name: str, sparsity: float, completions: dict[str, str]) -> None:
    record = {
        "model": {"effective_sparsity": sparsity},
        "tasks": {
            "humaneval": {
                "headline": 0.25,
                "pass@1_stderr": 0.1,
                "n": len(completions),
                "finish": {"stop": len(completions) - 1, "length": 1},
            },
            "lambada_generate": {"headline": 0.5},
        },
    }
    (runs / f"{name}.json").write_text(json.dumps(record))
    rows = [{"task_id": t, "completion": c} for t, c in completions.items()]
    (runs / f"{name}.humaneval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_rows_count_programs_that_do_not_compile(tmp_path):
    problems = load_problems()
    solved = problems[0]
    runs = tmp_path / "sweep"
    runs.mkdir()
    write_point(
        runs,
        "s0.2",
        0.2,
        {
            solved.task_id: solved.canonical_solution,
            problems[1].task_id: "    return [x for x in (",  # cut at the token cap
            problems[2].task_id: "\n\n\n",  # the prompt's docstring is the body: compiles
            problems[3].task_id: "    return 0\n\x00",  # a NUL byte: compile() refuses it
        },
    )
    output = tmp_path / "collapse.md"
    assert load_bench().main(["tiny=" + str(runs), "-o", str(output)]) == 0

    header, _, row = output.read_text().splitlines()
    cells = dict(zip(header.strip("| ").split(" | "), row.strip("| ").split(" | ")))
    assert cells["cut"] == "tiny"
    assert cells["s"] == "0.2"
    assert cells["pass@1"] == "0.250 ± 0.100"
    assert cells["at the cap"] == "0.25"
    assert cells["does not compile"] == "0.50"
    assert cells["LAMBADA (generated)"] == "0.500"
