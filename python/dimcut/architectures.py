"""Architecture descriptions, read from a model's config.json.

A family is described by data: which tensors feed from each RMSNorm (their input columns are
rotated) and which write into the residual stream (their output rows are rotated). Supporting a
new pre-norm RMSNorm decoder means adding one `Family` row, never subclassing per model.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from dimcut._core import DimcutError


@dataclass(frozen=True)
class Family:
    """Module names of one pre-norm decoder family, relative to `model.layers.{i}.`."""

    attention_inputs: tuple[str, ...]
    attention_output: str
    mlp_inputs: tuple[str, ...]
    mlp_output: str
    attention_norm: str = "input_layernorm"
    mlp_norm: str = "post_attention_layernorm"


_SEPARATE_PROJECTIONS = Family(
    attention_inputs=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    attention_output="self_attn.o_proj",
    mlp_inputs=("mlp.gate_proj", "mlp.up_proj"),
    mlp_output="mlp.down_proj",
)

FAMILIES: dict[str, Family] = {
    "llama": _SEPARATE_PROJECTIONS,
    "mistral": _SEPARATE_PROJECTIONS,
    "qwen2": _SEPARATE_PROJECTIONS,
    "phi3": Family(
        attention_inputs=("self_attn.qkv_proj",),
        attention_output="self_attn.o_proj",
        mlp_inputs=("mlp.gate_up_proj",),
        mlp_output="mlp.down_proj",
    ),
}

# Config keys whose presence means the model is not a dense pre-norm decoder we can rotate.
_REFUSED_CONFIG_KEYS = {
    "num_local_experts": "mixture-of-experts layers",
    "num_experts": "mixture-of-experts layers",
    "n_routed_experts": "mixture-of-experts layers",
}

EMBEDDING = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"


@dataclass(frozen=True)
class Architecture:
    """Everything the plan needs to know about one checkpoint's structure."""

    model_type: str
    family: Family
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    dtype: str
    config: dict

    def layer(self, index: int, module: str) -> str:
        return f"model.layers.{index}.{module}"

    def attention_input_weights(self, index: int) -> list[str]:
        return [self.layer(index, m) + ".weight" for m in self.family.attention_inputs]

    def mlp_input_weights(self, index: int) -> list[str]:
        return [self.layer(index, m) + ".weight" for m in self.family.mlp_inputs]

    def norm_weight(self, index: int, which: str) -> str:
        module = self.family.attention_norm if which == "attention" else self.family.mlp_norm
        return self.layer(index, module) + ".weight"


def supported_model_types() -> list[str]:
    return sorted(FAMILIES)


def read_config(model_dir: str | Path) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no config.json in the model directory")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DimcutError(f"{path}: config.json is not valid JSON ({exc})") from None


def describe(config: dict, source: str = "config.json") -> Architecture:
    """Build the Architecture of a config dict, refusing anything we cannot slice correctly."""
    model_type = config.get("model_type")
    supported = ", ".join(supported_model_types())
    if model_type not in FAMILIES:
        raise DimcutError(
            f"{source}: model_type {model_type!r} is not supported; dimcut slices the pre-norm "
            f"RMSNorm decoder families {supported}"
        )
    for key, what in _REFUSED_CONFIG_KEYS.items():
        if config.get(key):
            raise DimcutError(
                f"{source}: model_type {model_type!r} with {key}={config[key]} has {what}, "
                f"which dimcut does not slice (supported: dense {supported})"
            )
    try:
        hidden = int(config["hidden_size"])
        heads = int(config["num_attention_heads"])
        arch = Architecture(
            model_type=model_type,
            family=FAMILIES[model_type],
            hidden_size=hidden,
            num_layers=int(config["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            intermediate_size=int(config["intermediate_size"]),
            vocab_size=int(config["vocab_size"]),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            dtype=str(config.get("dtype") or config.get("torch_dtype") or "float32"),
            config=config,
        )
    except KeyError as exc:
        raise DimcutError(f"{source}: config lacks the field {exc.args[0]!r}") from None
    if not math.isfinite(arch.rms_norm_eps) or arch.rms_norm_eps < 0:
        raise DimcutError(f"{source}: rms_norm_eps={arch.rms_norm_eps} is not a valid epsilon")
    return arch


def load_architecture(model_dir: str | Path) -> Architecture:
    return describe(read_config(model_dir), source=str(Path(model_dir) / "config.json"))


def sliced_width(hidden_size: int, sparsity: float, round_to: int = 8) -> int:
    """d = floor((1 - s)·D) rounded down to a multiple of `round_to` (SliceGPT's convention)."""
    if not (isinstance(sparsity, (int, float)) and math.isfinite(sparsity)) or not (
        0 <= sparsity < 1
    ):
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if round_to < 1:
        raise ValueError(f"round_to must be a positive integer, got {round_to}")
    width = math.floor((1 - sparsity) * hidden_size + 1e-9)  # 0.7·10 must give 7, not 6
    width -= width % round_to
    if width <= 0:
        raise ValueError(
            f"sparsity {sparsity} leaves width {width} of hidden size {hidden_size} after "
            f"rounding down to a multiple of {round_to}; choose a smaller sparsity"
        )
    return width


def expected_shapes(arch: Architecture) -> dict[str, tuple[int, ...]]:
    """The shape config.json implies for every weight of a dense checkpoint of `arch`."""
    d, heads, kv, hd = arch.hidden_size, arch.num_heads, arch.num_kv_heads, arch.head_dim
    inter = arch.intermediate_size
    projection_rows = {
        "self_attn.q_proj": heads * hd,
        "self_attn.k_proj": kv * hd,
        "self_attn.v_proj": kv * hd,
        "self_attn.qkv_proj": (heads + 2 * kv) * hd,
        "mlp.gate_proj": inter,
        "mlp.up_proj": inter,
        "mlp.gate_up_proj": 2 * inter,
    }
    shapes: dict[str, tuple[int, ...]] = {EMBEDDING: (arch.vocab_size, d), FINAL_NORM: (d,)}
    if not arch.tie_word_embeddings:
        shapes[LM_HEAD] = (arch.vocab_size, d)
    family = arch.family
    for i in range(arch.num_layers):
        for module in (*family.attention_inputs, *family.mlp_inputs):
            shapes[arch.layer(i, module) + ".weight"] = (projection_rows[module], d)
        shapes[arch.layer(i, family.attention_output) + ".weight"] = (d, heads * hd)
        shapes[arch.layer(i, family.mlp_output) + ".weight"] = (d, inter)
        for which in ("attention", "mlp"):
            shapes[arch.norm_weight(i, which)] = (d,)
    return shapes


def check_weights(arch: Architecture, tensors: dict, model_dir: str | Path) -> None:
    """Refuse a config.json whose sizes disagree with the checkpoint's tensors (name, shape and
    shard file of the first disagreement in the message)."""
    config = Path(model_dir) / "config.json"
    for name, shape in expected_shapes(arch).items():
        if name not in tensors:
            if name == LM_HEAD:
                continue  # some checkpoints tie the head without saying so
            raise DimcutError(
                f"{config}: the config implies tensor {name!r} of shape {list(shape)}, but the "
                "checkpoint has no such tensor"
            )
        _dtype, found, file = tensors[name]
        if tuple(found) != shape:
            raise DimcutError(
                f"{config} disagrees with the weights: tensor {name!r} in {file} has shape "
                f"{list(found)}, but the config (hidden_size={arch.hidden_size}, "
                f"num_attention_heads={arch.num_heads}, num_key_value_heads={arch.num_kv_heads}, "
                f"intermediate_size={arch.intermediate_size}, vocab_size={arch.vocab_size}) "
                f"implies {list(shape)}"
            )
    for name, (_dtype, found, file) in tensors.items():
        if name.endswith(".bias") and name.removesuffix(".bias") + ".weight" in tensors:
            rows = tensors[name.removesuffix(".bias") + ".weight"][1][0]
            if list(found) != [rows]:
                raise DimcutError(
                    f"{file}: bias {name!r} has shape {list(found)}, its weight has {rows} rows"
                )
        parts = name.split(".")
        layer = parts[2] if name.startswith("model.layers.") and len(parts) > 2 else ""
        if layer.isdigit() and int(layer) >= arch.num_layers:
            raise DimcutError(
                f"{config} says num_hidden_layers={arch.num_layers}, but the checkpoint has "
                f"tensor {name!r} in {file}"
            )
