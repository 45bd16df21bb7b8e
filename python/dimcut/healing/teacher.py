"""The dense teacher of `dimcut heal`: is it the sliced model's parent, and what it predicts.

The teacher runs once, over every training sequence, before the student is loaded (so the two
never share memory), streamed half a layer at a time as calibration streams it; its top-k
next-token log-probabilities are kept in the heal state directory, where a resumed run finds
them.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch

from dimcut.architectures import read_config
from dimcut.healing.losses import topk_targets
from dimcut.runtime import Precision, atomic_write
from dimcut.tokenizers import load_tokenizer

TARGETS_FILE = "teacher-topk.safetensors"


def check_parent(sliced_dir: Path, teacher_dir: Path, sliced_tokenizer) -> dict:
    """Refuse a teacher that is not a dense model of the sliced model's family, width and
    vocabulary; returns the sliced model's "dimcut" provenance block."""
    sliced = read_config(sliced_dir)
    block = sliced.get("dimcut")
    if not isinstance(block, dict) or "original_hidden_size" not in block:
        raise ValueError(
            f'sliced model {sliced_dir}: config.json has no "dimcut" block, so it was not '
            "written by `dimcut slice` (heal takes a dimcut output and its dense parent)"
        )
    teacher = read_config(teacher_dir)
    if "dimcut" in teacher:
        raise ValueError(
            f"teacher {teacher_dir}: it is itself a dimcut-sliced model; the teacher is the "
            "dense model the sliced one was cut from"
        )
    family = sliced.get("base_model_type", sliced.get("model_type"))
    facts = {
        "model_type": (family, teacher.get("model_type")),
        "hidden_size": (block["original_hidden_size"], teacher.get("hidden_size")),
        "vocab_size": (sliced.get("vocab_size"), teacher.get("vocab_size")),
        "num_hidden_layers": (sliced.get("num_hidden_layers"), teacher.get("num_hidden_layers")),
    }
    for key, (want, found) in facts.items():
        if want != found:
            raise ValueError(
                f"teacher {teacher_dir}: {key} is {found!r}, but the sliced model {sliced_dir} "
                f"was cut from a model with {key} {want!r}: not its dense parent"
            )
    if _vocabulary_hash(sliced_tokenizer) != _vocabulary_hash(load_tokenizer(teacher_dir)):
        raise ValueError(
            f"teacher {teacher_dir}: its tokenizer's vocabulary differs from the sliced model's "
            f"({sliced_dir}): distillation needs the same token ids"
        )
    return block


def _vocabulary_hash(tokenizer) -> str:
    vocabulary = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocabulary).encode()).hexdigest()


def teacher_targets(
    teacher_dir: Path,
    tokens: torch.Tensor,
    topk: int,
    *,
    device: torch.device,
    dtype: Precision,
    progress: bool,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The teacher's top-k (log-probabilities, token ids) at every position but the last of
    `tokens` [N, L] (shapes [N, L − 1, k]), and the seconds it took. The teacher is streamed
    half a layer at a time (`calibration.streamed_logits`), never loaded whole."""
    from dimcut.calibration.procedures import streamed_logits

    started = time.perf_counter()
    count, seqlen = tokens.shape
    values = torch.empty(count * seqlen, topk, dtype=torch.float32)
    indices = torch.empty(count * seqlen, topk, dtype=torch.int32)

    def keep(rows: slice, logits: torch.Tensor) -> None:
        values[rows], indices[rows] = (t.cpu() for t in topk_targets(logits, topk))

    streamed_logits(teacher_dir, tokens, keep, device=str(device), dtype=dtype, progress=progress)
    shape = (count, seqlen, topk)
    values, indices = values.view(shape)[:, :-1], indices.view(shape)[:, :-1]
    return values.contiguous(), indices.contiguous(), time.perf_counter() - started


def save_targets(path: Path, values: torch.Tensor, indices: torch.Tensor, key: str) -> None:
    from safetensors.torch import save

    data = save({"values": values, "indices": indices}, metadata={"key": key})
    atomic_write(path, lambda handle: handle.write(data))


def load_targets(path: Path, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Saved targets made for `key` (the training tokens and k), or None."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as handle:
        if (handle.metadata() or {}).get("key") != key:
            return None
        return handle.get_tensor("values"), handle.get_tensor("indices")
