"""Greedy generation for HumanEval: dimcut's continuous batching against a static batch through
transformers' `generate`, side by side.

The static contender is what `dimcut eval` ran before continuous batching: `--batch-size` prompts
left-padded into one `generate` call with a per-row stopping criterion, so a batch decodes until
its longest row ends. Each contender runs in its own process (its peak RSS is its own) on the same
first `--problems` problems; the report gives wall time, generated tokens, forward passes, the
completions both produce identically and the problems each passes (dimcut's sandbox).

    python benches/generation_batching.py smollm2 --problems 40 --reference-dtype float32 --out benches/results/generation-batching-smollm2.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import dimcut
from dimcut import zoo
from dimcut.evaluation.generation import GreedyGenerator, StopSequences, generate_in_order
from dimcut.evaluation.humaneval import STOP_SEQUENCES, load_problems, program
from dimcut.evaluation.sandbox import DEFAULT_LIMITS, run_program
from dimcut.runtime import atomic_write_text

CONTENDERS = ("static", "continuous")


class StaticGenerator(GreedyGenerator):
    """The baseline: `batch_size` prompts at a time, left-padded, through `model.generate`."""

    def generate(self, prompts, stop, max_new_tokens):
        for start in range(0, len(prompts), self.batch_size):
            batch = prompts[start : start + self.batch_size]
            for offset, generation in enumerate(self._batch(batch, stop, max_new_tokens)):
                yield start + offset, generation

    def _batch(self, prompts, stop, max_new_tokens):
        import torch
        from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

        pad = self.eos[0]
        encoded = [self._encode(prompt) for prompt in prompts]
        width = max(map(len, encoded))
        input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, ids in enumerate(encoded):
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            mask[row, width - len(ids) :] = 1
        generator = self

        class Stop(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                rows = [generator.decode(row[width:].tolist()) for row in input_ids]
                return torch.tensor([stop.end(text) is not None for text in rows])

        config = GenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
            eos_token_id=self.eos, pad_token_id=pad,
        )  # fmt: skip
        with torch.no_grad():
            output = self.model.generate(
                input_ids=input_ids, attention_mask=mask, generation_config=config,
                stopping_criteria=StoppingCriteriaList([Stop()]),
            )  # fmt: skip
        self.steps += output.shape[1] - width - 1  # the first token comes from the prefill
        return [self._finish(row[width:].tolist(), stop) for row in output]


def run_contender(args) -> dict:
    model, tokenizer = dimcut.load(zoo.resolve_model(args.model), dtype=args.dtype)
    kind = StaticGenerator if args.contender == "static" else GreedyGenerator
    generator = kind(model, tokenizer, batch_size=args.batch_size)
    problems = load_problems()[: args.problems]
    stop = StopSequences(STOP_SEQUENCES)
    clock = time.perf_counter()
    generations = generate_in_order(
        generator, [p.prompt for p in problems], stop, args.max_new_tokens
    )
    seconds = time.perf_counter() - clock
    passed = [
        run_program(program(problem, g.text), DEFAULT_LIMITS).passed
        for problem, g in zip(problems, generations, strict=True)
    ]
    return {
        "seconds": round(seconds, 1),
        "new_tokens": sum(g.new_tokens for g in generations),
        "decode_steps": generator.steps,
        "passed": sum(passed),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "completions": [g.text for g in generations],
    }


def _same(ours: list[str], theirs: list[str]) -> int:
    return sum(a == b for a, b in zip(ours, theirs, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="checkpoint directory or zoo alias")
    parser.add_argument("--problems", type=int, default=40, help="the first N HumanEval problems")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument(
        "--reference-dtype",
        help="also run the continuous contender in this dtype (float32): how many completions "
        "of each contender equal it (bfloat16 rounding under padding changes some)",
    )
    parser.add_argument("--out", help="JSON report")
    parser.add_argument("--contender", choices=CONTENDERS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.contender:  # a child: one contender, its result as JSON on stdout
        print(json.dumps(run_contender(args)))
        return
    runs = [(contender, args.dtype) for contender in CONTENDERS]
    if args.reference_dtype:
        runs.append(("continuous", args.reference_dtype))
    results = {}
    for contender, dtype in runs:
        child = [sys.executable, __file__, args.model, "--problems", str(args.problems),
                 "--batch-size", str(args.batch_size), "--max-new-tokens", str(args.max_new_tokens),
                 "--dtype", dtype, "--contender", contender]  # fmt: skip
        done = subprocess.run(child, check=True, stdout=subprocess.PIPE, text=True)
        name = contender if dtype == args.dtype else f"reference ({contender}, {dtype})"
        results[name] = json.loads(done.stdout.splitlines()[-1])
        shown = {k: v for k, v in results[name].items() if k != "completions"}
        print(name, json.dumps(shown), file=sys.stderr)
    static, continuous = (results[c] for c in CONTENDERS)
    reference = results.get(f"reference (continuous, {args.reference_dtype})")
    for result in results.values():
        if reference is not None:
            result["identical_to_reference"] = _same(
                result["completions"], reference["completions"]
            )
    same = _same(static["completions"], continuous["completions"])
    report = {
        "model": args.model,
        "problems": args.problems,
        "batch_size": args.batch_size,
        "dtype": args.dtype,
        "max_new_tokens": args.max_new_tokens,
        "threads": os.environ.get("OMP_NUM_THREADS"),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "platform": platform.platform(),
        "contenders": {
            c: {k: v for k, v in r.items() if k != "completions"} for c, r in results.items()
        },
        "speedup": round(static["seconds"] / continuous["seconds"], 2),
        "identical_completions": same,
    }
    print(json.dumps(report, indent=2))
    if args.out:
        atomic_write_text(Path(args.out), json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
