"""The two sliced-model formats: their config.json, their loading, and parameter accounting.

- `slicegpt`: per-layer rotations with shortcut matrices; model_type `dimcut_sliced`, modeling
  code in `modeling_dimcut.py` (copied into the output, registered by `import dimcut`).
- `plain`: one rotation for every layer, no shortcuts: a stock config with `hidden_size = d`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path

from dimcut import modeling_dimcut
from dimcut.architectures import Architecture
from dimcut.plan import Format, Widths
from dimcut.runtime import Precision

MODELING_FILE = "modeling_dimcut.py"
SHORTCUT_MARK = "_shortcut"


def slicegpt_config(arch: Architecture, widths: Widths, provenance: dict) -> dict:
    base = {k: v for k, v in arch.config.items() if k not in ("architectures", "auto_map")}
    return {
        **base,
        "model_type": modeling_dimcut.MODEL_TYPE,
        "base_model_type": arch.model_type,
        "architectures": ["DimcutSlicedForCausalLM"],
        "auto_map": {
            "AutoConfig": "modeling_dimcut.DimcutSlicedConfig",
            "AutoModelForCausalLM": "modeling_dimcut.DimcutSlicedForCausalLM",
        },
        "original_hidden_size": arch.hidden_size,
        "embedding_width": widths.embedding,
        "mid_widths": list(widths.mid),
        "out_widths": list(widths.out),
        "head_dim": arch.head_dim,
        "tie_word_embeddings": False,
        "dimcut": provenance,
    }


def plain_config(arch: Architecture, width: int, provenance: dict) -> dict:
    # RMSN_D(x) on a d-vector = RMSNorm_d(x)·√(D/d) with eps·D/d; the √(D/d) lives in the readers.
    return {
        **arch.config,
        "hidden_size": width,
        "head_dim": arch.head_dim,
        "rms_norm_eps": arch.rms_norm_eps * arch.hidden_size / width,
        "tie_word_embeddings": False,
        "dimcut": provenance,
    }


def stock_width(arch: Architecture, width: int, round_to: int) -> int:
    """The largest width ≤ `width`, a multiple of `round_to`, that the family's stock config
    accepts as its hidden size (the plain format is a stock model: transformers' LlamaConfig,
    for one, requires hidden_size to be a multiple of num_attention_heads even with an explicit
    head_dim)."""
    for candidate in range(width, 0, -round_to):
        if stock_config_accepts(arch, candidate):
            return candidate
    raise ValueError(
        f"no hidden size ≤ {width} that is a multiple of round_to={round_to} makes a valid "
        f"stock {arch.model_type} config; use the slicegpt format"
    )


def stock_config_accepts(arch: Architecture, width: int) -> bool:
    """Whether the family's stock config takes `width` as its hidden size."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    try:
        AutoConfig.for_model(**plain_config(arch, width, {}))
    except (ValueError, StrictDataclassError):
        return False
    return True


def output_config(arch: Architecture, fmt, widths: Widths, provenance: dict) -> dict:
    """config.json of an output of `arch` with these widths (uniform for `plain`)."""
    if Format.parse(fmt) is Format.PLAIN:
        return plain_config(arch, widths.embedding, provenance)
    return slicegpt_config(arch, widths, provenance)


def skeleton(config: dict):
    """The model a config.json dict describes, on the meta device (no memory, no weights),
    built from local classes only."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {k: v for k, v in config.items() if k not in ("auto_map",)}
    built = AutoConfig.for_model(**fields)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(built, trust_remote_code=False)


def planned_parameters(arch: Architecture, fmt, widths: Widths) -> dict:
    """{"total", "shortcuts", "without_shortcuts"} of the output these widths would make: the
    parameters of the very classes that load it (the outputs never tie the head)."""
    model = skeleton(output_config(arch, fmt, widths, {}))
    return split_shortcuts((name, p.numel()) for name, p in model.state_dict().items())


def output_files(config: dict, fmt: str) -> dict[str, bytes]:
    files = {"config.json": (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()}
    if fmt == "slicegpt":
        files[MODELING_FILE] = Path(modeling_dimcut.__file__).read_bytes()
    return files


def split_shortcuts(sizes: Iterable[tuple[str, int]]) -> dict:
    """{"total", "shortcuts", "without_shortcuts"} of (tensor name, element count) pairs."""
    total = shortcuts = 0
    for name, size in sizes:
        total += size
        if SHORTCUT_MARK in name:
            shortcuts += size
    return {"total": total, "shortcuts": shortcuts, "without_shortcuts": total - shortcuts}


def count_parameters(model_dir: str | Path) -> dict:
    """Parameters of a checkpoint (dense or sliced), read from its safetensors headers.

    Returns {"total", "shortcuts", "without_shortcuts"} and, for dimcut outputs, the sliced facts
    recorded in config.json ("hidden_size" d, "original_hidden_size" D, "effective_sparsity").
    """
    from dimcut.engine import inspect_checkpoint

    tensors = inspect_checkpoint(model_dir)
    counts = split_shortcuts((name, math.prod(shape)) for name, (_, shape, _) in tensors.items())
    config_path = Path(model_dir) / "config.json"
    if config_path.is_file():
        facts = json.loads(config_path.read_text()).get("dimcut") or {}
        for key in ("hidden_size", "original_hidden_size", "effective_sparsity"):
            if key in facts:
                counts[key] = facts[key]
    return counts


def load(
    model_dir: str | Path, *, device: str = "cpu", dtype: Precision | str | None = Precision.FLOAT32
):
    """Load a dense or dimcut-sliced checkpoint (either format); returns (model, tokenizer).

    The tokenizer is None when the directory holds no tokenizer files.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    torch_dtype = Precision.parse(dtype, "dtype").torch if dtype else None
    # Safetensors only: never unpickle a `pytorch_model.bin`; remote code stays off (the dimcut
    # model class is registered locally: importing modeling_dimcut registers it).
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch_dtype, use_safetensors=True, trust_remote_code=False
    )
    model.to(device).eval()
    has_tokenizer = any(
        (model_dir / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")
    )
    tokenizer = (
        AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False) if has_tokenizer else None
    )
    return model, tokenizer
