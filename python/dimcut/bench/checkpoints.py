"""Synthetic bf16 Llama checkpoints of a real model's shape, built once and reused.

Weights are random (N(0, 0.02²) matrices, norms near 1): every suite measures time and memory,
which depend on the shapes alone. The end-to-end suite also needs a tokenizer whose ids fit the
vocabulary; it is trained here on dimcut's built-in calibration corpus (no download).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

# The slicing suites keep this fraction of the hidden size (sparsity 0.25).
KEEP_FRACTION = 0.75
META_VERSION = 3
BOS, EOS, UNK = "<s>", "</s>", "<unk>"


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    layers: int
    vocab: int

    @property
    def kept(self) -> int:
        return int(self.hidden * KEEP_FRACTION) // 8 * 8

    @property
    def kv_width(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    def checkpoint_bytes(self) -> int:
        d, inter, kv = self.hidden, self.intermediate, self.kv_width
        layer = 2 * d * d + 2 * kv * d + 3 * inter * d + 2 * d
        return 2 * (2 * self.vocab * d + self.layers * layer + d)

    def with_overrides(self, **fields: int | None) -> Shape:
        """This shape with the fields that are not None replaced."""
        return replace(self, **{k: v for k, v in fields.items() if v is not None})


PRESETS = {
    # Llama-3-8B per-layer shapes, 2 of its 32 layers, its full embedding and head (2.97 GB).
    "8b": Shape(hidden=4096, intermediate=14336, heads=32, kv_heads=8, layers=2, vocab=128256),
    # Llama-3-8B whole: 32 layers (16.1 GB).
    "8b-full": Shape(
        hidden=4096, intermediate=14336, heads=32, kv_heads=8, layers=32, vocab=128256
    ),
    "3b": Shape(hidden=3072, intermediate=8192, heads=24, kv_heads=8, layers=28, vocab=128256),
    "1b": Shape(hidden=2048, intermediate=8192, heads=32, kv_heads=8, layers=16, vocab=128256),
    "small": Shape(hidden=512, intermediate=1792, heads=8, kv_heads=2, layers=2, vocab=8000),
    "tiny": Shape(hidden=64, intermediate=160, heads=4, kv_heads=2, layers=2, vocab=256),
}


def layer_matrices(shape: Shape, layer: int) -> dict[str, tuple[int, int]]:
    prefix = f"model.layers.{layer}"
    d, kv, inter = shape.hidden, shape.kv_width, shape.intermediate
    return {
        f"{prefix}.self_attn.q_proj.weight": (d, d),
        f"{prefix}.self_attn.k_proj.weight": (kv, d),
        f"{prefix}.self_attn.v_proj.weight": (kv, d),
        f"{prefix}.self_attn.o_proj.weight": (d, d),
        f"{prefix}.mlp.gate_proj.weight": (inter, d),
        f"{prefix}.mlp.up_proj.weight": (inter, d),
        f"{prefix}.mlp.down_proj.weight": (d, inter),
    }


def tensor_shapes(shape: Shape) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, kind) in Hugging Face order; kind is "matrix" or "norm"."""
    out = [("model.embed_tokens.weight", (shape.vocab, shape.hidden), "matrix")]
    for layer in range(shape.layers):
        out += [(n, dims, "matrix") for n, dims in layer_matrices(shape, layer).items()]
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out.append((f"model.layers.{layer}.{norm}.weight", (shape.hidden,), "norm"))
    out.append(("model.norm.weight", (shape.hidden,), "norm"))
    out.append(("lm_head.weight", (shape.vocab, shape.hidden), "matrix"))
    return out


def llama_config(shape: Shape, token_ids: dict[str, int] | None = None) -> dict:
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "num_hidden_layers": shape.layers,
        "vocab_size": shape.vocab,
        "head_dim": shape.hidden // shape.heads,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        **(token_ids or {}),
    }


def write_weights(directory: Path, shape: Shape, shard_size: int, seed: int = 0) -> int:
    """Writes the bf16 weights one shard at a time (memory ≈ one shard); returns their bytes."""
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)

    def make(dims: tuple[int, ...], kind: str) -> torch.Tensor:
        if kind == "norm":
            return (1 + 0.1 * torch.randn(*dims, generator=generator)).to(torch.bfloat16)
        out = torch.empty(dims, dtype=torch.bfloat16)
        for rows in range(0, dims[0], 8192):  # bounded f32 temporaries
            block = torch.randn(min(8192, dims[0] - rows), dims[1], generator=generator)
            out[rows : rows + block.shape[0]] = block.mul_(0.02)
        return out

    groups: list[list[tuple[str, tuple[int, ...], str]]] = [[]]
    size = 0
    for name, dims, kind in tensor_shapes(shape):
        nbytes = 2 * int(torch.tensor(dims).prod())
        if groups[-1] and size + nbytes > shard_size:
            groups.append([])
            size = 0
        groups[-1].append((name, dims, kind))
        size += nbytes
    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        file_name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {name: make(dims, kind) for name, dims, kind in group}
        save_file(tensors, str(directory / file_name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file_name))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return total


def write_tokenizer(directory: Path, vocab_size: int) -> dict[str, int]:
    """A BPE tokenizer trained on the built-in calibration corpus with at most `vocab_size`
    tokens (so every id fits the embedding), adding one BOS like Llama's; returns the config's
    token ids. Characters left out of its alphabet become <unk>: only the ids matter here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from dimcut.calibration import calibration_documents

    documents, _ = calibration_documents(None)
    backend = Tokenizer(models.BPE(unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[UNK, BOS, EOS],
        limit_alphabet=min(1000, vocab_size // 2),
        show_progress=False,
    )
    backend.train_from_iterator(documents, trainer)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, backend.token_to_id(BOS))]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS, eos_token=EOS, unk_token=UNK
    )
    tokenizer.save_pretrained(directory)
    return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}


def ensure_checkpoint(
    directory: Path, shape: Shape, shard_size: int, *, tokenizer: bool = False
) -> dict:
    """Builds the checkpoint in `directory`, or reuses it when it was built with the same
    arguments (recorded in `<directory>.json` beside it, so the model directory holds only model
    files). Returns that record: the arguments, bytes, shard sizes and build seconds."""
    meta_path = directory.with_name(directory.name + ".json")
    wanted = {
        "shape": asdict(shape),
        "shard_size": shard_size,
        "tokenizer": tokenizer,
        "version": META_VERSION,
    }
    if meta_path.is_file() and (directory / "config.json").is_file():
        meta = json.loads(meta_path.read_text())
        if {k: meta.get(k) for k in wanted} == wanted:
            return meta
    meta_path.unlink(missing_ok=True)
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    started = time.perf_counter()
    input_bytes = write_weights(directory, shape, shard_size)
    token_ids = write_tokenizer(directory, shape.vocab) if tokenizer else None
    (directory / "config.json").write_text(json.dumps(llama_config(shape, token_ids), indent=2))
    meta = {
        **wanted,
        "input_bytes": input_bytes,
        "shards": [p.stat().st_size for p in sorted(directory.glob("*.safetensors"))],
        "build_seconds": time.perf_counter() - started,
    }
    # Written last: an interrupted build leaves no record and is rebuilt.
    meta_path.write_text(json.dumps(meta, indent=2))
    return meta
