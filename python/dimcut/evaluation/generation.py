"""Greedy generation for the generative tasks: continuously batched, with the KV cache, on the
loaded model's forward pass; each row ends at its task's stop rule, at the end-of-sequence token,
or after `max_new_tokens`, and its place in the batch goes to the next prompt.

The tasks take any object with `check_fits` and `generate` (the `Generator` protocol), so their
scoring runs on injected completions as well as on a model.
"""

from __future__ import annotations

import enum
import math
import re
import string
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from dimcut.runtime import Choice


@enum.unique
class GenerativeTask(Choice):
    """Tasks dimcut scores itself from generated text (lm-eval's tasks are in `tasks.TASKS`)."""

    HUMANEVAL = "humaneval"  # greedy pass@1, completions run in `sandbox`
    LAMBADA_GENERATE = "lambada_generate"  # last word of a LAMBADA passage, exact match


class Finish(enum.Enum):
    """Why a row stopped."""

    STOP = "stop"  # the task's stop rule matched: the text is cut there
    EOS = "eos"  # the model's end-of-sequence token
    LENGTH = "length"  # max_new_tokens reached


class StopRule(Protocol):
    def end(self, text: str) -> int | None:
        """Where the completion ends in `text` (generated so far), or None to go on."""


@dataclass(frozen=True)
class StopSequences:
    """The completion ends before the first of these strings."""

    sequences: tuple[str, ...]

    def end(self, text: str) -> int | None:
        found = [i for i in (text.find(s) for s in self.sequences) if i >= 0]
        return min(found) if found else None


_WORD_BREAK = re.compile(rf"[\s{re.escape(string.punctuation)}]")


@dataclass(frozen=True)
class FirstWord:
    """The completion is its first word: leading whitespace skipped, the word ended by
    whitespace or punctuation (punctuation first makes an empty word)."""

    def end(self, text: str) -> int | None:
        start = len(text) - len(text.lstrip())
        found = _WORD_BREAK.search(text, start)
        return found.start() if found else None


@dataclass(frozen=True)
class Generation:
    text: str  # the completion, cut at the stop rule
    finish: Finish
    new_tokens: int  # tokens generated for this row (up to its end-of-sequence, if any)


class Progress(Protocol):
    """A progress bar (tqdm's)."""

    def update(self, n: int) -> object: ...


class Generator(Protocol):
    def check_fits(self, labels: Sequence[str], prompts: Sequence[str], new_tokens: int) -> None:
        """ValueError naming the first prompt that leaves no room for `new_tokens`."""

    def generate(
        self, prompts: Sequence[str], stop: StopRule, max_new_tokens: int
    ) -> Iterator[tuple[int, Generation]]:
        """One generation per prompt, yielded with the prompt's index as each finishes (not
        necessarily in order)."""


def generate_in_order(
    generator: Generator,
    prompts: Sequence[str],
    stop: StopRule,
    max_new_tokens: int,
    progress: Progress | None = None,
) -> list[Generation]:
    """`generator.generate`'s generations in prompt order; `progress.update(1)` as each ends."""
    found: dict[int, Generation] = {}
    for index, generation in generator.generate(prompts, stop, max_new_tokens):
        found[index] = generation
        if progress is not None:
            progress.update(1)
    return [found[index] for index in range(len(prompts))]


class GreedyGenerator:
    """Greedy decoding on a loaded causal LM with continuous batching: `batch_size` rows decode
    together, and a finished row's place goes at once to the next prompt, so no step is spent
    on rows that have ended (a static batch waits for its longest completion; HumanEval's
    lengths vary tenfold). Each prompt is prefilled alone and its KV cache joins the batch's,
    left-padded to a common width and masked."""

    def __init__(self, model, tokenizer, *, batch_size: int = 1):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.steps = 0  # batched decode steps run (prefills apart): what batching saves
        eos = model.generation_config.eos_token_id
        if eos is None:
            eos = tokenizer.eos_token_id
        self.eos = [eos] if isinstance(eos, int) else list(eos or [])
        self.context = getattr(model.config, "max_position_embeddings", None)

    def _encode(self, prompt: str) -> list[int]:
        # The tokenizer's own special tokens (its BOS, if it adds one), as for perplexity.
        return self.tokenizer(prompt).input_ids

    def check_fits(self, labels: Sequence[str], prompts: Sequence[str], new_tokens: int) -> None:
        if self.context is None:
            return
        for label, prompt in zip(labels, prompts, strict=True):
            needed = len(self._encode(prompt)) + new_tokens
            if needed > self.context:
                raise ValueError(
                    f"{label} needs {needed} tokens (prompt + {new_tokens} new), the model's "
                    f"context is {self.context}; lower --max-new-tokens"
                )

    def generate(
        self, prompts: Sequence[str], stop: StopRule, max_new_tokens: int
    ) -> Iterator[tuple[int, Generation]]:
        import torch

        waiting = list(enumerate(prompts))[::-1]  # popped from the end: prompt order
        batch = _Batch(self.model.device)
        with torch.no_grad():
            while waiting or batch.rows:
                while waiting and len(batch.rows) < self.batch_size:
                    index, prompt = waiting.pop()
                    row, cache = self._prefill(index, prompt)
                    if self._ended(row, stop, max_new_tokens):
                        yield row.index, self._finish(row.tokens, stop)
                    else:
                        batch.admit(row, cache)
                if not batch.rows:
                    continue
                batch.step(self.model)
                self.steps += 1
                ended = [row for row in batch.rows if self._ended(row, stop, max_new_tokens)]
                for row in ended:
                    yield row.index, self._finish(row.tokens, stop)
                batch.drop(ended)

    def _prefill(self, index: int, prompt: str):
        import torch
        from transformers import DynamicCache

        ids = torch.tensor([self._encode(prompt)], device=self.model.device)
        # A config-free cache keeps every token, even for sliding-window layers (their mask
        # still limits what is seen): the batch's caches must line up token for token.
        cache = DynamicCache()
        logits = _forward(self.model, ids, None, None, cache)
        return _Row(index, length=ids.shape[1], tokens=[int(logits[0].argmax())]), cache

    def _ended(self, row: _Row, stop: StopRule, max_new_tokens: int) -> bool:
        return (
            row.tokens[-1] in self.eos
            or len(row.tokens) >= max_new_tokens
            or stop.end(self.decode(row.tokens)) is not None
        )

    def decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _finish(self, tokens: list[int], stop: StopRule) -> Generation:
        ended = next((i for i, token in enumerate(tokens) if token in self.eos), None)
        kept = tokens if ended is None else tokens[:ended]
        text = self.decode(kept)
        end = stop.end(text)
        if end is not None:
            return Generation(text[:end], Finish.STOP, len(kept))
        return Generation(text, Finish.LENGTH if ended is None else Finish.EOS, len(kept))


@dataclass
class _Row:
    index: int  # the prompt's
    length: int  # tokens in the KV cache: the prompt, then all but the last generated one
    tokens: list[int]  # generated so far; the last is fed at the next step


def _forward(model, input_ids, mask, positions, cache):
    """The next-token logits [rows, vocab] of a forward pass that appends to `cache`. The cache
    goes fourth by position: transformers 5 renamed that argument (past_key_values → cache)."""
    output = model(input_ids, mask, positions, cache, use_cache=True, logits_to_keep=1)
    return output.logits[:, -1]


def _layers(cache) -> list[tuple]:
    """A DynamicCache's (keys, values) per layer, each [batch, heads, tokens, head_dim]."""
    return [(layer.keys, layer.values) for layer in cache.layers]


class _Batch:
    """The rows decoding together: their KV caches side by side in one DynamicCache, left-padded
    to one width, with the attention mask that hides the padding. The cache is rebuilt only when
    a row joins or leaves; a step appends to it in place."""

    def __init__(self, device):
        self.device = device
        self.rows: list[_Row] = []
        self.cache = None
        self.mask = None  # [rows, width], 1 where the cache holds a token

    def admit(self, row: _Row, cache) -> None:
        import torch
        from transformers import DynamicCache

        mask = torch.ones((1, row.length), dtype=torch.long, device=self.device)
        if not self.rows:
            self.rows, self.cache, self.mask = [row], cache, mask
            return
        width = max(self.mask.shape[1], row.length)
        self.mask = torch.cat([_left_pad(self.mask, width), _left_pad(mask, width)])
        layers = [
            tuple(
                torch.cat([_left_pad(old, width), _left_pad(new, width)]) for old, new in zip(*pair)
            )
            for pair in zip(_layers(self.cache), _layers(cache), strict=True)
        ]
        self.cache = DynamicCache(ddp_cache_data=layers)
        self.rows.append(row)

    def step(self, model) -> None:
        """One token for every row: feed each row's last token, append the greedy next one."""
        import torch

        last = torch.tensor([[row.tokens[-1]] for row in self.rows], device=self.device)
        positions = torch.tensor([[row.length] for row in self.rows], device=self.device)
        self.mask = torch.cat([self.mask, torch.ones_like(last)], dim=1)
        logits = _forward(model, last, self.mask, positions, self.cache)
        for row, token in zip(self.rows, logits.argmax(-1).tolist(), strict=True):
            row.length += 1
            row.tokens.append(token)

    def drop(self, ended: list[_Row]) -> None:
        """Remove the ended rows, and the columns that are padding in every row left."""
        from transformers import DynamicCache

        if not ended:
            return
        gone = {row.index for row in ended}
        keep = [i for i, row in enumerate(self.rows) if row.index not in gone]
        self.rows = [self.rows[i] for i in keep]
        if not self.rows:
            self.cache, self.mask = None, None
            return
        start = self.mask.shape[1] - max(row.length for row in self.rows)
        self.mask = self.mask[keep, start:]
        layers = [tuple(t[keep, :, start:] for t in pair) for pair in _layers(self.cache)]
        self.cache = DynamicCache(ddp_cache_data=layers)


def _left_pad(tensor, width: int):
    """`tensor` zero-padded on the left of its token axis (the last for a mask, else -2)."""
    import torch.nn.functional as F

    missing = width - tensor.shape[-1 if tensor.dim() == 2 else -2]
    if missing == 0:
        return tensor
    pad = (missing, 0) if tensor.dim() == 2 else (0, 0, missing, 0)
    return F.pad(tensor, pad)


def mean_stderr(rate: float | None, n: int) -> float | None:
    """lm-eval's standard error of a mean of 0/1 scores (sample standard deviation / √n)."""
    if rate is None or n < 2:
        return None
    return math.sqrt(rate * (1 - rate) / (n - 1))


def greedy_entry(
    metric: str, hits: int, n: int, *, rows: int, data: str, max_new_tokens: int
) -> dict:
    """The record's task entry of a generative task scored right or wrong per example: the
    rate as the headline metric, its standard error, the sizes and the decoding."""
    rate = hits / n if n else None
    return {
        "headline_metric": metric,
        "headline": rate,
        metric: rate,
        f"{metric}_stderr": mean_stderr(rate, n),
        "n": n,
        "rows": rows,
        "data": data,
        "split": "test",
        "decoding": "greedy",
        "max_new_tokens": max_new_tokens,
    }
