"""LAMBADA last-word accuracy by generation (`lambada_generate`): the passage without its last
word is the context; the greedy continuation's first word (`generation.FirstWord`) must equal
the target exactly (case-sensitive). The passages are `lambada-offline`'s, in file order.

Unlike lm-eval's `lambada_*` tasks, which score the target's log-likelihood, the model has to
produce the word, so a model that knows the word but would go on differently fails here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from dimcut import data_sources
from dimcut.evaluation.generation import FirstWord, Generator, generate_in_order, greedy_entry

# A target is one word (the stop rule ends the row at its end); more tokens than this without
# a word break is a miss whatever follows.
MAX_NEW_TOKENS = 16


@dataclass(frozen=True)
class Passage:
    context: str
    target: str


def load_passages() -> list[Passage]:
    # lambada-offline's documents are `query + " " + target`, the target one word.
    documents = data_sources.lambada_offline_documents()
    return [Passage(*document.rsplit(" ", 1)) for document in documents]


def check_fits(generator: Generator, passages: Sequence[Passage]) -> None:
    labels = [f"lambada_generate passage {i}" for i in range(len(passages))]
    generator.check_fits(labels, [passage.context for passage in passages], MAX_NEW_TOKENS)


def evaluate_lambada(
    generator: Generator, passages: Sequence[Passage], *, limit: int | None = None
) -> dict:
    """Exact-match accuracy of the generated last words of the first `limit` passages; the
    record's task entry."""
    from tqdm.auto import tqdm

    rows = len(passages)
    passages = passages[:limit]
    check_fits(generator, passages)
    contexts = [passage.context for passage in passages]
    with tqdm(total=len(contexts), desc="lambada_generate", unit="passage") as bar:
        generations = generate_in_order(generator, contexts, FirstWord(), MAX_NEW_TOKENS, bar)
    words = [g.text.strip() for g in generations]
    hits = sum(word == passage.target for word, passage in zip(words, passages, strict=True))
    return greedy_entry(
        "exact_match",
        hits,
        len(passages),
        rows=rows,
        data=data_sources.LAMBADA_OFFLINE,
        max_new_tokens=MAX_NEW_TOKENS,
    )
