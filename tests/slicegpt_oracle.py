"""A compact in-memory SliceGPT in PyTorch (float64), written from docs/algorithm.md §1–3.

It is the test oracle for dimcut's streamed calibration: it holds the whole model, rotates it
in place and returns the rotations (embedding, then mid/out per layer) and the sliced model's
logits function.
"""

from __future__ import annotations

import torch
from torch import nn


def rmsn(x: torch.Tensor, original_width: int, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) / original_width + eps)


def pca(x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1])
    _, vectors = torch.linalg.eigh(flat.T @ flat)
    return vectors.flip(-1)


def _linears(module: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in module.named_children() if isinstance(m, nn.Linear)}


def slicegpt(model, tokens: torch.Tensor, width: int):
    """Slice `model` (a float64 HF causal LM) to `width`, head unsliced; returns (rotations, logits_fn)."""
    config = model.config
    D, eps = config.hidden_size, config.rms_norm_eps
    inner = model.model
    head = model.lm_head.weight.detach().clone() * inner.norm.weight  # untie + fold final norm
    rotary = inner.rotary_emb
    positions = torch.arange(tokens.shape[1])[None]
    cos, sin = rotary(torch.zeros(1, tokens.shape[1], 1, dtype=torch.float64), positions)

    def attention(layer, x):
        out, _ = layer.self_attn(
            hidden_states=rmsn(x, D, eps), position_embeddings=(cos, sin), attention_mask=None
        )
        return out

    def mlp(layer, x):
        return layer.mlp(rmsn(x, D, eps))

    with torch.no_grad():
        x = inner.embed_tokens(tokens).double()
        q = pca(x)
        embedding = inner.embed_tokens.weight @ q[:, :width]
        rotations = [q]
        x = (x @ q)[..., :width]
        layers = []
        for layer in inner.layers:
            attn_norm, mlp_norm = (
                layer.input_layernorm.weight,
                layer.post_attention_layernorm.weight,
            )
            readers_attn = {
                n: l.weight * attn_norm
                for n, l in _linears(layer.self_attn).items()
                if n != "o_proj"
            }
            readers_mlp = {
                n: l.weight * mlp_norm for n, l in _linears(layer.mlp).items() if n != "down_proj"
            }
            for name, w in readers_attn.items():
                getattr(layer.self_attn, name).weight = nn.Parameter(w @ q[:, :width])
            shortcut_attn = q.T[:width, :]
            mid = x @ shortcut_attn + attention(layer, x)
            q_mid = pca(mid)
            shortcut_attn = shortcut_attn @ q_mid[:, :width]
            o = layer.self_attn.o_proj
            o.weight = nn.Parameter((q_mid.T @ o.weight)[:width])
            if o.bias is not None:
                o.bias = nn.Parameter((q_mid.T @ o.bias)[:width])
            for name, w in readers_mlp.items():
                getattr(layer.mlp, name).weight = nn.Parameter(w @ q_mid[:, :width])
            shortcut_mlp = q_mid.T[:width, :]
            h = x @ shortcut_attn + attention(layer, x)  # "run the layer again", sliced attention
            out = h @ shortcut_mlp + mlp(layer, h)
            q = pca(out)
            is_last = layer is inner.layers[-1]
            width_out = D if is_last else width
            shortcut_mlp = (shortcut_mlp @ q)[:, :width_out]
            down = layer.mlp.down_proj
            down.weight = nn.Parameter((q.T @ down.weight)[:width_out])
            layers.append((layer, shortcut_attn, shortcut_mlp))
            rotations += [q_mid, q]
            x = (out @ q)[..., :width_out]
        head = head @ q

    def logits(input_ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            cos_, sin_ = rotary(
                torch.zeros(1, input_ids.shape[1], 1, dtype=torch.float64),
                torch.arange(input_ids.shape[1])[None],
            )
            h = embedding[input_ids]
            for layer, s_attn, s_mlp in layers:
                a, _ = layer.self_attn(
                    hidden_states=rmsn(h, D, eps),
                    position_embeddings=(cos_, sin_),
                    attention_mask=None,
                )
                h = h @ s_attn + a
                h = h @ s_mlp + layer.mlp(rmsn(h, D, eps))
            return rmsn(h, D, eps) @ head.T

    return rotations, logits
