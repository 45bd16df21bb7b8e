"""Streaming the model: one half of one decoder layer resident at a time.

Calibration runs the *stock* decoder layer of the family at full width D, with the weights read
from the safetensors shards through the engine (one implementation of the reading and dtype
conversion, pages released as they are read). A sliced stage is computed on the projection of
its input onto the kept subspace, P·x with P = Q_k Q_kᵀ, which equals the sliced layer applied
to Q_kᵀ·x (docs/algorithm.md §3), so no weight is ever rotated during calibration.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from dimcut._core import DimcutError
from dimcut.architectures import EMBEDDING, FINAL_NORM, LM_HEAD, Architecture
from dimcut.engine import TensorOp, rewrite_tensors
from dimcut.runtime import Precision

# Rows of a head or embedding matrix read at once (8 MiB of float32 at 8B's width of 4096).
HEAD_ROWS = 512

# What the decoder blocks may compute in during calibration. The residual stream, the
# activations between layers and the covariances stay float32/float64 either way: only each
# block's f(x) is computed in this precision (SliceGPT's reference calibrates in float16).
# On a CPU with AVX-512 BF16, bfloat16 calibrated Qwen-1.5B 1.6× faster (README).
BLOCK_PRECISIONS = (Precision.FLOAT32, Precision.BFLOAT16)


def block_precision(value: Precision | str) -> Precision:
    """A calibration `dtype` option, parsed (one of `BLOCK_PRECISIONS`)."""
    return Precision.parse(value, "dtype", BLOCK_PRECISIONS)


class Block(str, enum.Enum):
    """The two halves of a pre-norm decoder layer, each a residual branch."""

    ATTENTION = "attention"
    MLP = "mlp"


def block_tensors(arch: Architecture, index: int, block: Block, tensors: dict) -> list[str]:
    """Checkpoint tensors of one half-layer: its norm, the linears reading it, the writer."""
    family = arch.family
    if block is Block.ATTENTION:
        readers, writer = arch.attention_input_weights(index), family.attention_output
    else:
        readers, writer = arch.mlp_input_weights(index), family.mlp_output
    weights = [*readers, arch.layer(index, writer) + ".weight"]
    names = [arch.norm_weight(index, block.value)]
    for weight in weights:
        names.append(weight)
        bias = weight.removesuffix(".weight") + ".bias"
        if bias in tensors:
            names.append(bias)
    return names


class LayerRunner:
    """Builds one stock decoder layer of the family at a time and runs its halves on a device."""

    def __init__(
        self,
        model_dir: Path,
        arch: Architecture,
        device: torch.device,
        seqlen: int,
        budget: int,
        dtype: Precision = Precision.FLOAT32,
    ):
        import transformers
        from transformers import AutoConfig
        from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

        self.model_dir = model_dir
        self.arch = arch
        self.device = device
        self.engine_budget = budget
        self.dtype = dtype.torch
        self.config = AutoConfig.for_model(**arch.config)
        self.config._attn_implementation = "sdpa"
        base_class = getattr(transformers, MODEL_MAPPING_NAMES[arch.model_type])
        with torch.device("meta"):
            skeleton = base_class(self.config)
        self.layer_class = type(skeleton.layers[0])
        self.norm_class = type(skeleton.norm)
        rotary = type(skeleton.rotary_emb)(config=self.config).to(device)
        positions = torch.arange(seqlen, device=device)[None]
        probe = torch.zeros(1, seqlen, 1, device=device, dtype=self.dtype)
        self.position_embeddings = rotary(probe, positions)

    def read(self, names: list[str]) -> dict[str, np.ndarray]:
        """Float32 copies of checkpoint tensors, refusing non-finite values."""
        ops = [TensorOp(name=name, source=name, dtype="F32") for name in names]
        weights = rewrite_tensors(self.model_dir, ops, memory_budget=self.engine_budget)
        for name, values in weights.items():
            if not np.isfinite(values).all():
                raise DimcutError(
                    f"{self.model_dir}: tensor {name!r} contains NaN or Inf; dimcut refuses "
                    "non-finite weights"
                )
        return weights

    def block(self, index: int, block: Block, tensors: dict) -> torch.nn.Module:
        """Decoder layer `index` with only `block`'s weights loaded (the rest stays on `meta`)."""
        with torch.device("meta"):
            layer = self.layer_class(self.config, index)
        prefix = f"model.layers.{index}."
        state = {
            name.removeprefix(prefix): torch.from_numpy(values).to(self.device, self.dtype)
            for name, values in self.read(block_tensors(self.arch, index, block, tensors)).items()
        }
        # assign=True makes the parameters these tensors (no second copy of the weights).
        unexpected = layer.load_state_dict(state, strict=False, assign=True).unexpected_keys
        if unexpected:
            raise DimcutError(f"layer {index}: unexpected tensors {unexpected}")
        return layer.eval()

    def run(self, layer: torch.nn.Module, block: Block, x: torch.Tensor) -> torch.Tensor:
        """The block's residual branch f(x) (x: [sequences, seqlen, D], or tokens for the MLP),
        computed in the runner's dtype and returned in float32."""
        x = x.to(self.dtype)
        if block is Block.MLP:
            return layer.mlp(layer.post_attention_layernorm(x)).float()
        cos, sin = self.position_embeddings
        batch = x.shape[0]
        out, _ = layer.self_attn(
            hidden_states=layer.input_layernorm(x),
            position_embeddings=(cos.expand(batch, -1, -1), sin.expand(batch, -1, -1)),
            attention_mask=None,  # full-length sequences: SDPA applies the causal mask
        )
        return out.float()

    def final_norm(self) -> torch.nn.Module:
        """The final norm (the stock class) in the runner's dtype."""
        norm = self.norm_class(self.arch.hidden_size, eps=self.config.rms_norm_eps)
        weight = self.read([FINAL_NORM])[FINAL_NORM]
        norm.weight = torch.nn.Parameter(torch.from_numpy(weight).to(self.device, self.dtype))
        norm.weight.requires_grad_(False)
        return norm

    def head_blocks(
        self, tensors: dict, rows_per_block: int = HEAD_ROWS
    ) -> Iterator[tuple[slice, torch.Tensor]]:
        """The head matrix (the embedding when tied) `rows_per_block` vocabulary rows at a time,
        read from the shard on every pass, in the runner's dtype on its device: (rows, block)."""
        name = EMBEDDING if self.arch.tie_word_embeddings else LM_HEAD
        for start in range(0, self.arch.vocab_size, rows_per_block):
            rows = slice(start, min(start + rows_per_block, self.arch.vocab_size))
            yield rows, read_rows(self.model_dir, name, rows, tensors).to(self.device, self.dtype)

    def final_norm_and_head(self, tensors: dict) -> tuple[torch.nn.Module, torch.Tensor]:
        """The final norm and the whole head matrix in the runner's dtype. The head is converted
        a block of rows at a time, so no float32 copy of it is ever whole unless float32 is the
        runner's dtype (an 8B head is 2.1 GB in float32)."""
        head = torch.empty(self.arch.vocab_size, self.arch.hidden_size, dtype=self.dtype)
        for rows, block in self.head_blocks(tensors):
            head[rows] = block.cpu()
        return self.final_norm(), head.to(self.device)


def read_rows(model_dir: Path, name: str, rows: slice, tensors: dict) -> torch.Tensor:
    """Rows of a checkpoint matrix as float32, refusing NaN or Inf; the shard is mapped only
    while they are read."""
    from safetensors import safe_open

    _dtype, _shape, file = tensors[name]
    with safe_open(str(model_dir / file), framework="pt") as handle:
        values = handle.get_slice(name)[rows.start : rows.stop].float()
    if not torch.isfinite(values).all():
        raise DimcutError(
            f"{model_dir / file}: tensor {name!r} contains NaN or Inf; dimcut refuses "
            "non-finite weights"
        )
    return values


def embed(model_dir: Path, tokens: torch.Tensor, tensors: dict) -> torch.Tensor:
    """Embedding rows of `tokens` (float32), read row by row from the shard."""
    from safetensors import safe_open

    _dtype, _shape, file = tensors[EMBEDDING]
    with safe_open(str(model_dir / file), framework="pt") as handle:
        table = handle.get_slice(EMBEDDING)
        unique, inverse = torch.unique(tokens, return_inverse=True)
        rows = torch.stack([table[int(i) : int(i) + 1][0] for i in unique]).float()
    if not torch.isfinite(rows).all():
        raise DimcutError(
            f"{model_dir / file}: tensor {EMBEDDING!r} has NaN or Inf in the rows of the "
            "calibration tokens; dimcut refuses non-finite weights"
        )
    return rows[inverse]
