"""Code or prose: does a model answer HumanEval's prompts with code? One forward pass per prompt,
no generation: the probability that the first token of the completion is indented — the body of
the function the prompt opens — against anything else (prose, a new top-level statement).
A few minutes per model where HumanEval's generations take hours: it tells a cut that stopped
writing code (every completion then runs to the token cap) before the generation sweep does.

    python benches/first_token.py DENSE_DIR SLICED_DIR... [--limit 164] [-o table.md]

Prints (or writes) a markdown table: per model, the mean probability of an indented first token,
the fraction of prompts whose greedy first token is indented, and the most common greedy token.
"""

from __future__ import annotations

import argparse
import collections
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

import dimcut
from dimcut.bench.report import markdown
from dimcut.evaluation.humaneval import load_problems


def indented_tokens(tokenizer) -> torch.Tensor:
    """A mask over the vocabulary: the tokens whose text starts with a space or a tab."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return torch.tensor([text[:1] in (" ", "\t") for text in texts])


@dataclass(frozen=True)
class FirstTokens:
    p_indented: float  # the mean probability of an indented first token
    greedy_indented: float  # the fraction of prompts whose most likely first token is indented
    most_common: str  # the most common greedy first token, and on how many prompts
    count: int


def measure(model_dir: str, prompts: list[str]) -> FirstTokens:
    model, tokenizer = dimcut.load(model_dir, dtype="bfloat16")
    mask = indented_tokens(tokenizer)
    p_indented, greedy = [], []
    with torch.no_grad():
        for prompt in tqdm(prompts, desc=Path(model_dir).name, unit="prompt"):
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            # The model's vocabulary may be padded past the tokenizer's: those rows are unused.
            probs = model(ids).logits[0, -1].float().softmax(-1)[: len(mask)]
            p_indented.append(probs[mask].sum().item())
            greedy.append(int(probs.argmax()))
    common, count = collections.Counter(greedy).most_common(1)[0]
    return FirstTokens(
        p_indented=sum(p_indented) / len(prompts),
        greedy_indented=sum(bool(mask[g]) for g in greedy) / len(prompts),
        most_common=tokenizer.decode([common]),
        count=count,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="model directories (dense or sliced)")
    parser.add_argument("--limit", type=int, default=164, help="the first N problems (164: all)")
    parser.add_argument("-o", "--output", type=Path, help="write the table here, not stdout")
    args = parser.parse_args(argv)
    prompts = [problem.prompt for problem in load_problems()[: args.limit]]
    header = ["model", "P(indented first token)", "greedy indented", "most common greedy token"]
    rows = []
    for model in args.models:
        found = measure(model, prompts)
        rows.append(
            [
                model,
                f"{found.p_indented:.4f}",
                f"{found.greedy_indented:.3f}",
                f"{found.most_common!r} ({found.count} of {len(prompts)})",
            ]
        )
    table = "\n".join(markdown(header, rows))
    if args.output:
        args.output.write_text(table + "\n", encoding="utf-8")
    else:
        print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
