"""Depth pruning, the contrast to cutting the width (`dimcut slice --method layers`, ShortGPT).

The block influence of decoder layer i, BI_i = 1 − mean over calibration tokens of
cos(x_in, x_out) (`calibration.block_influence`), says how much the layer changes the residual
stream; the layers of lowest BI are removed and the others renumbered consecutively. The output
is a stock checkpoint with fewer layers: every kept tensor is copied byte for byte by the engine
(streamed, out of core), the config says `num_hidden_layers = k` and keeps its per-layer lists
for the kept layers only.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path

from dimcut import formats
from dimcut.architectures import Architecture
from dimcut.engine import TensorOp, rewrite_checkpoint
from dimcut.plan import Format
from dimcut.runtime import DEFAULT_MEMORY_BUDGET, engine_budget

# A decoder layer's tensors: model.layers.<index>.<rest> (`Architecture.layer`).
_LAYER_TENSOR = re.compile(r"model\.layers\.(\d+)\.(.+)")
# Config fields with one entry per decoder layer, filtered to the kept layers.
PER_LAYER_LISTS = ("layer_types",)
# Config fields counting leading layers (Qwen2: the first `max_window_layers` attend fully),
# recounted over the kept layers.
LEADING_LAYER_COUNTS = ("max_window_layers",)


def kept_layer_count(num_layers: int, sparsity: float) -> int:
    """k = ⌊(1 − s)·L⌋ layers kept — rounded down as the width d is — and at least one."""
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    return max(1, math.floor((1 - sparsity) * num_layers + 1e-9))


def removed_layers(influence: Sequence[float], keep: int) -> list[int]:
    """The indices (ascending) of the len(influence) − keep layers of lowest block influence;
    of equal ones, the earlier layer goes first."""
    lowest = sorted(range(len(influence)), key=lambda i: (influence[i], i))
    return sorted(lowest[: len(influence) - keep])


def kept_layers(num_layers: int, removed: Sequence[int]) -> list[int]:
    gone = set(removed)
    return [i for i in range(num_layers) if i not in gone]


def _layer_of(name: str) -> tuple[int, str] | None:
    match = _LAYER_TENSOR.fullmatch(name)
    return (int(match[1]), match[2]) if match else None


def pruned_ops(arch: Architecture, tensors: dict, removed: Sequence[int]) -> list[TensorOp]:
    """Copies of every tensor outside the removed layers, the kept layers renumbered 0…k−1."""
    renumbered = {old: new for new, old in enumerate(kept_layers(arch.num_layers, removed))}
    ops = []
    for name in tensors:
        layer = _layer_of(name)
        if layer is None:
            ops.append(TensorOp(name, name))
        elif layer[0] in renumbered:
            ops.append(TensorOp(arch.layer(renumbered[layer[0]], layer[1]), name))
    return ops


def pruned_config(arch: Architecture, removed: Sequence[int], provenance: dict) -> dict:
    """config.json of the checkpoint without the `removed` layers."""
    config = arch.config
    kept = kept_layers(arch.num_layers, removed)
    out = {**config, "num_hidden_layers": len(kept), "dimcut": provenance}
    for key in PER_LAYER_LISTS:
        if isinstance(config.get(key), list) and len(config[key]) == arch.num_layers:
            out[key] = [config[key][i] for i in kept]
    for key in LEADING_LAYER_COUNTS:
        if isinstance(config.get(key), int):
            out[key] = sum(1 for i in kept if i < config[key])
    return out


def layer_parameters(arch: Architecture, tensors: dict) -> tuple[int, list[int]]:
    """Parameters outside the decoder layers, and those of each layer, from the headers."""
    outside, layers = 0, [0] * arch.num_layers
    for name, (_dtype, shape, _file) in tensors.items():
        layer = _layer_of(name)
        if layer is None:
            outside += math.prod(shape)
        else:
            layers[layer[0]] += math.prod(shape)
    return outside, layers


def budget_layers(arch: Architecture, tensors: dict, budget: int) -> tuple[int, int | None]:
    """The most layers k whose output has at most `budget` parameters whichever layers go
    (counted with the k largest: the supported families' layers are all one size), and the
    count with one layer more (None when all are kept)."""
    outside, layers = layer_parameters(arch, tensors)
    largest = sorted(layers, reverse=True)
    counts = [outside + sum(largest[:k]) for k in range(1, arch.num_layers + 1)]
    if counts[0] > budget:
        raise ValueError(
            f"target_params: {budget:,} parameters is below the smallest layers output of this "
            f"model ({counts[0]:,} with one layer): the embedding and head alone need more"
        )
    keep = max(k for k, count in enumerate(counts, start=1) if count <= budget)
    return keep, counts[keep] if keep < arch.num_layers else None


def write_pruned_model(
    model_dir: str | Path,
    out_dir: str | Path,
    arch: Architecture,
    tensors: dict,
    removed: Sequence[int],
    provenance: dict,
    *,
    overwrite: bool = False,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    progress: bool = True,
) -> dict:
    """Write `model_dir` without the `removed` layers into `out_dir` (the engine's rewrite:
    tensors copied verbatim, other files copied, config.json replaced)."""
    config = pruned_config(arch, removed, provenance)
    return rewrite_checkpoint(
        model_dir,
        out_dir,
        pruned_ops(arch, tensors, removed),
        extra_files=formats.output_files(config, Format.PLAIN.value),
        memory_budget=engine_budget(memory_budget),
        overwrite=overwrite,
        progress=progress,
    )
