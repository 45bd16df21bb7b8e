"""LoRA adapters (through peft) on the sliced model's residual-facing linears, and the merge that
turns them back into ordinary weights.

Which linears get an adapter is the family's data (`architectures.FAMILIES`): every linear that
reads a norm and every linear that writes the residual — SliceGPT's RFT targets, the attention
and MLP projections. In the `slicegpt` format the shortcut matrices can be trained as well.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dimcut.architectures import FAMILIES, Family

SHORTCUTS = ("attn_shortcut", "mlp_shortcut")


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 32
    alpha: float = 64.0
    # Healing sees each sequence once, so there is no repeated data for dropout to keep the
    # adapters from memorising; each dropped-out input would also be a copy saved for the
    # backward (≈ 1/4 of the decoder's saved activations on Qwen-1.5B in bfloat16).
    dropout: float = 0.0

    def check(self) -> None:
        if self.rank < 1:
            raise ValueError(f"rank must be at least 1, got {self.rank}")
        if not self.alpha > 0:
            raise ValueError(f"alpha must be positive, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


def family_of(config: dict) -> Family:
    """The family of a sliced model's config (the slicegpt format names its base type)."""
    return FAMILIES[config.get("base_model_type", config["model_type"])]


def target_modules(family: Family) -> list[str]:
    """Module names, relative to a decoder layer, that get an adapter."""
    return [
        *family.attention_inputs,
        family.attention_output,
        *family.mlp_inputs,
        family.mlp_output,
    ]


def attach(model, family: Family, settings: LoraSettings, *, train_shortcuts: bool):
    """The peft-wrapped model: LoRA on `target_modules`, every other weight frozen (the
    shortcut matrices trainable with `train_shortcuts`)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=target_modules(family),
        bias="none",
    )
    wrapped = get_peft_model(model, config)
    for name, parameter in wrapped.named_parameters():
        if name.rsplit(".", 1)[-1] in SHORTCUTS:
            parameter.requires_grad_(train_shortcuts)
    return wrapped


@contextmanager
def computing_in(wrapped, dtype: torch.dtype, device: torch.device) -> Iterator[None]:
    """Run the adapters' matmuls in the model's `dtype` while their weights (and AdamW's state)
    stay float32: peft would otherwise cast each adapted linear's input to float32, a float32
    copy of it saved for the backward per adapter. Autocast casts the small adapter weights
    instead, and their gradients come back in float32."""
    if dtype == torch.float32:
        yield
        return
    from peft.helpers import disable_input_dtype_casting

    with torch.autocast(device.type, dtype=dtype), disable_input_dtype_casting(wrapped):
        yield


def trainable_state(wrapped) -> dict[str, torch.Tensor]:
    """What training changes (adapter matrices, trained shortcuts), by parameter name."""
    return {
        name: parameter.detach().clone()
        for name, parameter in wrapped.named_parameters()
        if parameter.requires_grad
    }


def restore_trainable_state(wrapped, state: dict[str, torch.Tensor]) -> None:
    parameters = dict(wrapped.named_parameters())
    missing = sorted(set(state) ^ {n for n, p in parameters.items() if p.requires_grad})
    if missing:
        raise ValueError(f"the heal checkpoint does not match the model: {missing[:3]} ...")
    with torch.no_grad():
        for name, value in state.items():
            parameters[name].copy_(value)


def merged_weights(
    wrapped,
    family: Family,
    num_layers: int,
    directory: Path,
    *,
    train_shortcuts: bool,
    release: Callable[[list[str]], None] = lambda _names: None,
) -> dict[str, np.ndarray]:
    """Every tensor that training changed, merged (W + (α/r)·B·A in the weight's own dtype, as
    peft's merge adds it), by checkpoint tensor name, as a read-only float32 memory map of a file
    in `directory`. The model is not modified (its frozen weights may be read-only file maps):
    each merged tensor is made, written and its base's pages handed to `release` one at a time,
    so memory holds one float32 tensor, not a float32 copy of every linear (3.9 GB for
    Qwen-1.5B at d = 1152), and the engine drops the maps' pages as it writes them."""
    model = wrapped.get_base_model()
    modules = [
        f"model.layers.{i}.{module}" for i in range(num_layers) for module in target_modules(family)
    ]
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {}

    def save(name: str, value: torch.Tensor) -> None:
        path = directory / f"{len(arrays)}.npy"
        np.save(path, value.detach().float().cpu().numpy())
        arrays[name] = np.load(path, mmap_mode="r")

    with torch.no_grad():
        for module_name in modules:
            lora = model.get_submodule(module_name)
            weight = lora.get_base_layer().weight
            merged = weight.clone()
            for adapter in lora.active_adapters:
                merged += lora.get_delta_weight(adapter).to(weight.dtype)
            save(f"{module_name}.weight", merged)
            release([f"{module_name}.weight"])
        if train_shortcuts:
            for i in range(num_layers):
                for shortcut in SHORTCUTS:
                    save(f"model.layers.{i}.{shortcut}", getattr(model.model.layers[i], shortcut))
    return arrays
