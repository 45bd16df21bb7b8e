"""Modeling code of dimcut's `slicegpt` format: a stock decoder whose residual stream is sliced.

This file is self-contained (torch and transformers only): dimcut copies it into every
`slicegpt`-format output, so `from_pretrained(out, trust_remote_code=True)` works on a machine
without dimcut. `import dimcut` registers the same classes with the Auto classes instead.

The model is the family's own base model (LlamaModel, Qwen2Model, ...) after surgery:
- every norm is the weightless RMSN with the original-width divisor D (its scale was folded into
  the following linears);
- each decoder layer keeps its attention and MLP modules, with input columns and output rows cut
  to the per-layer widths, and adds two shortcut matrices that carry the residual from one
  rotation basis into the next: h ← h·S_attn + Attn(RMSN(h)); h ← h·S_mlp + MLP(RMSN(h)).
"""

from __future__ import annotations

import functools

import torch
import transformers
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.generation import GenerationMixin
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

MODEL_TYPE = "dimcut_sliced"


class RMSN(nn.Module):
    """Weightless RMSNorm dividing by the original width D, whatever the input's width."""

    def __init__(self, original_width: int, eps: float):
        super().__init__()
        self.original_width = original_width
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        mean_square = x32.pow(2).sum(-1, keepdim=True) / self.original_width
        return (x32 * torch.rsqrt(mean_square + self.eps)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"D={self.original_width}, eps={self.eps}"


class DimcutSlicedConfig(PretrainedConfig):
    """The base model's config plus the sliced widths.

    `embedding_width` is the width of the embedding output (layer 0's input); layer i reads
    width `out_widths[i-1]` (or `embedding_width`), its attention writes `mid_widths[i]` and its
    MLP writes `out_widths[i]`; the head reads `out_widths[-1]`.
    """

    model_type = MODEL_TYPE

    def __init__(
        self,
        base_model_type: str = "llama",
        original_hidden_size: int = 0,
        embedding_width: int = 0,
        mid_widths: list[int] | None = None,
        out_widths: list[int] | None = None,
        **kwargs,
    ):
        self.base_model_type = base_model_type
        self.original_hidden_size = original_hidden_size
        self.embedding_width = embedding_width
        self.mid_widths = list(mid_widths or [])
        self.out_widths = list(out_widths or [])
        kwargs["tie_word_embeddings"] = False  # the head and embedding get different rotations
        super().__init__(**kwargs)

    def base_config(self) -> PretrainedConfig:
        fields = {k: v for k, v in self.to_dict().items() if k not in _SLICED_FIELDS}
        fields.pop("model_type", None)
        base = CONFIG_MAPPING[self.base_model_type](**fields)
        base._attn_implementation = self._attn_implementation
        return base


_SLICED_FIELDS = {
    "base_model_type",
    "original_hidden_size",
    "embedding_width",
    "mid_widths",
    "out_widths",
    "auto_map",
    "architectures",
    "dimcut",
}


def _resize_linear(linear: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    if (linear.in_features, linear.out_features) == (in_features, out_features):
        return linear
    return nn.Linear(
        in_features,
        out_features,
        bias=linear.bias is not None,
        device=linear.weight.device,
        dtype=linear.weight.dtype,
    )


def _set_module(root: nn.Module, dotted: str, module: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def _sliced_layer_forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    residual = hidden_states if self.attn_shortcut is None else hidden_states @ self.attn_shortcut
    attention, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)
    hidden_states = residual + attention
    residual = hidden_states if self.mlp_shortcut is None else hidden_states @ self.mlp_shortcut
    return residual + self.mlp(self.post_attention_layernorm(hidden_states))


@functools.cache
def _sliced_class(stock: type) -> type:
    """The stock decoder layer class with the shortcut-aware forward (one per family)."""
    return type(f"Sliced{stock.__name__}", (stock,), {"forward": _sliced_layer_forward})


def slice_decoder_layer(
    layer: nn.Module,
    linears: dict[str, tuple[int, int]],
    original_width: int,
    eps: float,
    shortcuts: dict[str, tuple[int, int] | None],
) -> nn.Module:
    """Turn a stock decoder layer into a sliced one, in place (its class gets a sliced forward).

    `linears` maps a module path inside the layer to its new (in_features, out_features);
    `shortcuts` maps "attn"/"mlp" to the shape of its shortcut matrix, or None for identity.
    """
    for name, (in_features, out_features) in linears.items():
        _set_module(
            layer, name, _resize_linear(layer.get_submodule(name), in_features, out_features)
        )
    layer.input_layernorm = RMSN(original_width, eps)
    layer.post_attention_layernorm = RMSN(original_width, eps)
    dtype = next(layer.parameters()).dtype
    device = next(layer.parameters()).device
    for which, shape in shortcuts.items():
        value = (
            None if shape is None else nn.Parameter(torch.empty(shape, dtype=dtype, device=device))
        )
        setattr(layer, f"{which}_shortcut", value)
    if type(layer).forward is not _sliced_layer_forward:
        layer.__class__ = _sliced_class(type(layer))
    return layer


def layer_linear_shapes(layer: nn.Module, width_in: int, width_mid: int, width_out: int):
    """New (in, out) features of every residual-facing linear of a stock decoder layer.

    Linears fed by a norm read the residual (their input width changes); the two that write into
    the residual (attention output, MLP down projection) change their output width.
    """
    attn, mlp = layer.self_attn, layer.mlp
    writers = {"self_attn.o_proj": width_mid, "mlp.down_proj": width_out}
    shapes = {}
    for prefix, module, width_read in (("self_attn", attn, width_in), ("mlp", mlp, width_mid)):
        for child_name, child in module.named_children():
            if not isinstance(child, nn.Linear):
                continue
            path = f"{prefix}.{child_name}"
            if path in writers:
                shapes[path] = (child.in_features, writers[path])
            else:
                shapes[path] = (width_read, child.out_features)
    return shapes


class DimcutSlicedForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = DimcutSlicedConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False

    def __init__(self, config: DimcutSlicedConfig):
        super().__init__(config)
        base_config = config.base_config()
        base_class = getattr(transformers, MODEL_MAPPING_NAMES[config.base_model_type])
        self.model = base_class(base_config)
        eps = base_config.rms_norm_eps
        original = config.original_hidden_size
        self.model.embed_tokens = nn.Embedding(
            base_config.vocab_size, config.embedding_width, base_config.pad_token_id
        )
        width_in = config.embedding_width
        for layer, width_mid, width_out in zip(
            self.model.layers, config.mid_widths, config.out_widths, strict=True
        ):
            slice_decoder_layer(
                layer,
                layer_linear_shapes(layer, width_in, width_mid, width_out),
                original,
                eps,
                {"attn": (width_in, width_mid), "mlp": (width_mid, width_out)},
            )
            width_in = width_out
        self.model.norm = RMSN(original, eps)
        self.lm_head = nn.Linear(width_in, base_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def _init_weights(self, module: nn.Module) -> None:
        # Sliced weights always come from a checkpoint; fresh shortcuts start as identity-like.
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        for name in ("attn_shortcut", "mlp_shortcut"):
            shortcut = getattr(module, name, None)
            if isinstance(shortcut, nn.Parameter):
                with torch.no_grad():
                    shortcut.zero_()
                    shortcut.fill_diagonal_(1.0)

    # The causal-LM forward is the same for every supported family: run self.model, apply
    # self.lm_head, compute the loss. Borrow the stock one to stay in step with transformers.
    forward = transformers.LlamaForCausalLM.forward


def register_auto_classes() -> None:
    """Let AutoConfig / AutoModelForCausalLM load `slicegpt`-format outputs without remote code."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        AutoConfig.register(MODEL_TYPE, DimcutSlicedConfig)
        AutoModelForCausalLM.register(DimcutSlicedConfig, DimcutSlicedForCausalLM)
    except ValueError:
        pass  # already registered (e.g. the module was imported twice)


if __name__ == "dimcut.modeling_dimcut":  # part of dimcut, not the copy loaded as remote code
    register_auto_classes()
