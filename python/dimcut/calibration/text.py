"""Calibration text: the built-in corpus or any data source, sampled the way SliceGPT samples."""

from __future__ import annotations

import gzip
import hashlib
import random
from pathlib import Path

import torch

from dimcut import data_sources

BUILTIN_SOURCE = "builtin"
BUILTIN_CORPUS = Path(__file__).parent.parent / "data" / "calibration.txt.gz"


def source_name(source: str | None) -> str:
    """The canonical name of a calibration source, as calibration records store it."""
    if source in (None, BUILTIN_SOURCE):
        return BUILTIN_SOURCE
    return data_sources.source_key(source, "train")


def calibration_documents(source: str | None) -> tuple[list[str], str]:
    """Documents of a calibration source and a canonical name for the record."""
    if source in (None, BUILTIN_SOURCE):
        text = gzip.decompress(BUILTIN_CORPUS.read_bytes()).decode("utf-8")
        return data_sources.split_raw_text(text), BUILTIN_SOURCE
    return data_sources.load_documents(source, split="train"), source_name(source)


def sample_sequences(
    tokenizer, documents: list[str], nsamples: int, seqlen: int, seed: int
) -> torch.Tensor:
    """SliceGPT's sampling: from a seeded random document, join documents with "\\n\\n" until
    `seqlen` tokens, truncate; repeat `nsamples` times. Wraps around the end of the corpus."""
    if nsamples < 1 or seqlen < 2:
        raise ValueError(f"nsamples must be ≥ 1 and seqlen ≥ 2 (got {nsamples}, {seqlen})")
    documents = [d for d in documents if d.strip()]
    if not documents:
        raise ValueError("the calibration text is empty")
    rng = random.Random(seed)
    samples = []
    for _ in range(nsamples):
        start = rng.randrange(len(documents))
        count = 1
        while True:
            window = (documents[(start + i) % len(documents)] for i in range(count))
            ids = tokenizer("\n\n".join(window), add_special_tokens=True)["input_ids"]
            if len(ids) >= seqlen:
                break
            if count == len(documents):
                raise ValueError(
                    f"the calibration text has {len(ids)} tokens, shorter than one sequence of "
                    f"seqlen {seqlen}"
                )
            # Grow geometrically towards the estimated need, so long sequences cost O(n).
            count = min(len(documents), max(count + 1, int(count * 1.2 * seqlen / len(ids)) + 1))
        samples.append(ids[:seqlen])
    return torch.tensor(samples, dtype=torch.long)


def sampled_text(
    source: str | None, tokenizer, nsamples: int, seqlen: int, seed: int
) -> tuple[torch.Tensor, dict]:
    """`sample_sequences` of a source's documents, and the record that identifies them: source
    name, sampling options and the SHA-256 of the token ids."""
    documents, name = calibration_documents(source)
    tokens = sample_sequences(tokenizer, documents, nsamples, seqlen, seed)
    record = {
        "source": name,
        "nsamples": nsamples,
        "seqlen": seqlen,
        "seed": seed,
        "token_sha256": hashlib.sha256(tokens.numpy().tobytes()).hexdigest(),
    }
    return tokens, record
