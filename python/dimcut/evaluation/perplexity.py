"""Perplexity by the GPTQ/SparseGPT/SliceGPT protocol.

Documents are joined with "\\n\\n" and tokenized once (the tokenizer adds its BOS at the start
only if it does so by default); the tokens are cut into non-overlapping windows of `seqlen`, the
remainder is dropped, and PPL = exp(mean NLL over every predicted token, i.e. `seqlen - 1` per
window). Cutting the windows needs only the tokenizer, so a text too short for one window is
reported before a model is loaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Windows:
    ids: object  # torch.LongTensor [windows, seqlen]
    text_tokens: int  # tokens in the whole text, before the remainder was dropped
    max_windows: int | None  # the cap asked for (recorded: quick runs are not the full protocol)

    @property
    def count(self) -> int:
        return self.ids.shape[0]

    @property
    def seqlen(self) -> int:
        return self.ids.shape[1]


def cut_windows(
    tokenizer, documents: list[str], seqlen: int = 2048, max_windows: int | None = None
) -> Windows:
    """Tokenize the joined documents and cut them into windows; `max_windows` keeps the first."""
    if seqlen < 2:
        raise ValueError(f"seqlen must be at least 2, got {seqlen}")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be at least 1, got {max_windows}")
    # verbose=False: the joined text is meant to exceed the tokenizer's model_max_length.
    ids = tokenizer("\n\n".join(documents), return_tensors="pt", verbose=False).input_ids[0]
    count = ids.numel() // seqlen
    if count == 0:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    if max_windows is not None:
        count = min(count, max_windows)
    return Windows(ids[: count * seqlen].view(count, seqlen), ids.numel(), max_windows)


HEAD_CHUNK_TOKENS = 1024


def score_windows(model, windows: Windows, batch_size: int = 1) -> dict:
    """Run the model over the windows (on the model's device); the perplexity entry."""
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    device = next(model.parameters()).device
    head = model.get_output_embeddings()
    total_nll = 0.0  # a Python float (double) so thousands of windows add up exactly enough
    with torch.inference_mode(), tqdm(total=windows.count, desc="perplexity", unit="window") as bar:
        for start in range(0, windows.count, batch_size):
            batch = windows.ids[start : start + batch_size].to(device)
            hidden = model.base_model(input_ids=batch, use_cache=False).last_hidden_state
            hidden, targets = hidden[:, :-1].flatten(0, 1), batch[:, 1:].flatten()
            # The head and its log-softmax a slice of positions at a time: whole, the logits
            # of 4 × 2048 tokens over Qwen's 151,936-token vocabulary are 5 GB, and 3 copies.
            for first in range(0, len(targets), HEAD_CHUNK_TOKENS):
                rows = slice(first, first + HEAD_CHUNK_TOKENS)
                logits = head(hidden[rows]).float()
                total_nll += F.cross_entropy(logits, targets[rows], reduction="sum").item()
            bar.update(batch.shape[0])

    tokens = windows.count * windows.seqlen
    predicted = windows.count * (windows.seqlen - 1)
    mean_nll = total_nll / predicted
    return {
        "seqlen": windows.seqlen,
        "windows": windows.count,
        "tokens": tokens,
        "predicted_tokens": predicted,
        "dropped_tokens": windows.text_tokens - tokens,
        "max_windows": windows.max_windows,
        "mean_nll": mean_nll,
        "ppl": math.exp(mean_nll),
    }


def perplexity(
    model,
    tokenizer,
    documents: list[str],
    seqlen: int = 2048,
    batch_size: int = 1,
    max_windows: int | None = None,
) -> dict:
    """Perplexity of `model` on `documents` by the protocol above (see `score_windows`)."""
    return score_windows(model, cut_windows(tokenizer, documents, seqlen, max_windows), batch_size)
