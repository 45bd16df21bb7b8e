"""Collapse metrics of generated text: does a pruned model repeat itself or fall into loops?

All three count whitespace-separated words, not model tokens: a completion's words are the
same whatever tokenizer produced it, so a dense model and its cuts (and models of other
families) are measured alike, and cached completions need no tokenizer to be re-measured.

- `repetition_rate` (rep-4): 1 − unique 4-grams / 4-grams of one sample, the fraction of its
  4-grams that repeat one seen earlier;
- `distinct_2`: unique bigrams / bigrams of one sample;
- `loops`: a sample's last `LOOP_WINDOW` words (all of them when fewer) are one n-gram of at most
  `LOOP_MAX_PERIOD` words repeated at least `LOOP_MIN_REPEATS` times, i.e. the window is periodic
  with a period p ≤ 8 and holds ≥ 4 p words — or its last `LOOP_WINDOW` characters are one
  string of at most `LOOP_MAX_PERIOD` characters repeated: the loops that have no words to
  repeat (a run of newlines, "000…") are counted too.

`collapse_metrics` averages the first two over the samples long enough to have one n-gram (a
sample of blank lines has none: rep-4 and distinct-2 do not see it, the loop fraction does) and
reports the fraction of all samples that loop.
"""

from __future__ import annotations

from collections.abc import Sequence

REPETITION_N = 4
DISTINCT_N = 2
LOOP_WINDOW = 64
LOOP_MAX_PERIOD = 8
LOOP_MIN_REPEATS = 4


def words(text: str) -> list[str]:
    return text.split()


def _ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def repetition_rate(tokens: Sequence[str], n: int = REPETITION_N) -> float | None:
    """Fraction of the n-grams that repeat an earlier one; None without any n-gram."""
    grams = _ngrams(tokens, n)
    return 1 - len(set(grams)) / len(grams) if grams else None


def distinct_n(tokens: Sequence[str], n: int = DISTINCT_N) -> float | None:
    """Unique n-grams / n-grams; None without any n-gram."""
    grams = _ngrams(tokens, n)
    return len(set(grams)) / len(grams) if grams else None


def _periodic(tail: Sequence[str]) -> bool:
    """Whether `tail` is one unit of at most LOOP_MAX_PERIOD items repeated ≥ LOOP_MIN_REPEATS
    times."""
    for period in range(1, LOOP_MAX_PERIOD + 1):
        if len(tail) < LOOP_MIN_REPEATS * period:
            break
        if all(tail[i] == tail[i + period] for i in range(len(tail) - period)):
            return True
    return False


def loops(text: str) -> bool:
    """Whether the text ends in a loop of words or of characters (see the module docstring)."""
    chars = text[-LOOP_WINDOW:]
    return _periodic(words(text)[-LOOP_WINDOW:]) or (len(chars) == LOOP_WINDOW and _periodic(chars))


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def collapse_metrics(texts: Sequence[str]) -> dict:
    """The record's collapse fields for a set of generated texts (null when not measurable)."""
    samples = [words(text) for text in texts]
    return {
        "repetition_rate": _mean([repetition_rate(s) for s in samples]),
        "distinct_2": _mean([distinct_n(s) for s in samples]),
        "loop_fraction": sum(map(loops, texts)) / len(texts) if texts else None,
        "collapse_unit": "whitespace words; loops also characters",
    }
