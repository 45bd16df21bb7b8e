"""lm-eval task scoring: dimcut's shared-prefix scorer against lm-eval's HF model, side by side.

One model load; each task is scored by both scorers in turn (alternating which goes first, so
neither gets the warm caches), the wall time of each and whether every metric is identical.

    python benches/task_scoring.py smollm2 --tasks arc_easy,arc_challenge,piqa,winogrande,hellaswag --limit 100 --out benches/results/task-scoring-smollm2.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import dimcut
from dimcut import zoo
from dimcut.evaluation import TASKS, TaskScorer, evaluate_tasks
from dimcut.runtime import atomic_write_text

METRICS = ("acc", "acc_norm", "acc_stderr", "acc_norm_stderr", "n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    model, tokenizer = dimcut.load(zoo.resolve_model(args.model), dtype=args.dtype)
    rows = []
    for turn, task in enumerate(args.tasks.split(",")):
        scorers = [TaskScorer.LM_EVAL, TaskScorer.SHARED_PREFIX]
        if turn % 2:
            scorers.reverse()
        entries, seconds = {}, {}
        for scorer in scorers:
            clock = time.perf_counter()
            entries[scorer] = evaluate_tasks(
                model, tokenizer, [task], limit=args.limit, batch_size=args.batch_size,
                scorer=scorer,
            )[task]  # fmt: skip
            seconds[scorer.value] = round(time.perf_counter() - clock, 1)
        stock, shared = entries[TaskScorer.LM_EVAL], entries[TaskScorer.SHARED_PREFIX]
        row = {
            "task": task,
            "rows": stock["n"],
            "seconds": seconds,
            "speedup": round(seconds["lm-eval"] / seconds["shared-prefix"], 2),
            "identical": all(stock[m] == shared[m] for m in METRICS),
            "headline": {"lm-eval": stock["headline"], "shared-prefix": shared["headline"]},
        }
        rows.append(row)
        print(json.dumps(row))
    total = {s.value: sum(r["seconds"][s.value] for r in rows) for s in TaskScorer}
    report = {
        "model": args.model,
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "limit": args.limit,
        "tasks": rows,
        "total_seconds": total,
        "speedup": round(total["lm-eval"] / total["shared-prefix"], 2),
        "command": f"python benches/task_scoring.py {args.model} --tasks {args.tasks} "
        f"--limit {args.limit} --batch-size {args.batch_size} --dtype {args.dtype} "
        f"--out {args.out}",
    }
    atomic_write_text(Path(args.out), json.dumps(report, indent=1) + "\n")
    print(f"total {total}, speedup {report['speedup']}×")


if __name__ == "__main__":
    main()
