"""Greedy generation for the generative tasks: batched, left-padded, with the KV cache, through
transformers' `generate` on the loaded model; each row ends at its task's stop rule, at the
end-of-sequence token, or after `max_new_tokens`.

The tasks take any object with `check_fits` and `generate` (the `Generator` protocol), so their
scoring runs on injected completions as well as on a model.
"""

from __future__ import annotations

import enum
import math
import re
import string
from collections.abc import Sequence
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
        self,
        prompts: Sequence[str],
        stop: StopRule,
        max_new_tokens: int,
        progress: Progress | None = None,
    ) -> list[Generation]:
        """One generation per prompt; `progress.update(n)` as each n prompts finish."""


class GreedyGenerator:
    """Greedy decoding on a loaded causal LM, `batch_size` prompts at a time."""

    def __init__(self, model, tokenizer, *, batch_size: int = 1):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        eos = model.generation_config.eos_token_id
        if eos is None:
            eos = tokenizer.eos_token_id
        self.eos = [eos] if isinstance(eos, int) else list(eos or [])
        # Padding is masked out; an end-of-sequence id also marks rows that finished early.
        self.pad = self.eos[0] if self.eos else tokenizer.pad_token_id
        if self.pad is None:
            raise ValueError("the tokenizer has neither an end-of-sequence nor a padding token")
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
        self,
        prompts: Sequence[str],
        stop: StopRule,
        max_new_tokens: int,
        progress: Progress | None = None,
    ) -> list[Generation]:
        results = []
        for start in range(0, len(prompts), self.batch_size):
            batch = prompts[start : start + self.batch_size]
            results += self._batch(batch, stop, max_new_tokens)
            if progress is not None:
                progress.update(len(batch))
        return results

    def _batch(self, prompts: Sequence[str], stop: StopRule, max_new_tokens: int):
        import torch
        from transformers import GenerationConfig, StoppingCriteriaList

        encoded = [self._encode(prompt) for prompt in prompts]
        width = max(map(len, encoded))
        device = self.model.device
        input_ids = torch.full((len(encoded), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, ids in enumerate(encoded):  # left padding: every row's next token is last
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            mask[row, width - len(ids) :] = 1
        config = GenerationConfig(  # not the checkpoint's: its sampling settings must not apply
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            use_cache=True,
            eos_token_id=self.eos or None,
            pad_token_id=self.pad,
        )
        with torch.no_grad():
            output = self.model.generate(
                input_ids=input_ids.to(device),
                attention_mask=mask.to(device),
                generation_config=config,
                stopping_criteria=StoppingCriteriaList([_stop_criterion(self, stop, width)]),
            )
        return [self._finish(row[width:].tolist(), stop) for row in output.cpu()]

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


def _stop_criterion(generator: GreedyGenerator, stop: StopRule, prompt_width: int):
    """A per-row stopping criterion: a row is done once its decoded continuation ends."""
    import torch
    from transformers import StoppingCriteria

    class _Stop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            done = [
                stop.end(generator.decode(row[prompt_width:].tolist())) is not None
                for row in input_ids
            ]
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    return _Stop()


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
