"""The slicing plan without files: widths, rotation names and arrays, and the engine ops of a
whole checkpoint, on tiny_models' 2-layer Llama (hidden 64) sliced to 48."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dimcut import DimcutError
from dimcut.architectures import describe
from dimcut.engine import TensorOp
from dimcut.plan import (
    Format,
    RotationNames,
    Widths,
    model_ops,
    plan_rotation_names,
    plan_widths,
    rotation_arrays,
)
from helpers import checkpoint_tensors
from tiny_models import random_orthogonal

WIDTH = 48


@pytest.fixture
def arch(tiny_llama_config):
    return describe(tiny_llama_config)


def ops_of(arch, fmt: Format, tensors: dict | None = None, slice_head: bool = False) -> dict:
    """The plan's ops by output name (names are unique: the engine refuses duplicates)."""
    widths = plan_widths(arch, fmt, WIDTH, slice_head)
    names = plan_rotation_names(fmt, arch.num_layers)
    ops = model_ops(
        arch, fmt, names, widths, checkpoint_tensors(arch) if tensors is None else tensors
    )
    by_name = {op.name: op for op in ops}
    assert len(by_name) == len(ops)
    return by_name


# ---------------------------------------------------------------------------- widths and names


def test_widths_keep_the_head_at_full_width_only_in_slicegpt(arch):
    assert plan_widths(arch, Format.SLICEGPT, WIDTH, slice_head=False) == Widths(
        48, (48, 48), (48, 64)
    )
    assert plan_widths(arch, Format.SLICEGPT, WIDTH, slice_head=True) == Widths(
        48, (48, 48), (48, 48)
    )
    plain = plan_widths(arch, Format.PLAIN, WIDTH, slice_head=False)  # a stock model of width d
    assert plain == Widths(48, (48, 48), (48, 48)) and plain.head == 48
    assert plan_widths(arch, "slicegpt", WIDTH, False).layer_input(1) == 48


def test_rotation_names_per_layer_or_shared():
    assert plan_rotation_names(Format.SLICEGPT, 2) == RotationNames(
        "Q.embedding", ("Q.0.mid", "Q.1.mid"), ("Q.0.out", "Q.1.out")
    )
    assert plan_rotation_names(Format.PLAIN, 2) == RotationNames("Q", ("Q", "Q"), ("Q", "Q"))
    with pytest.raises(ValueError, match="format must be one of slicegpt, plain, got 'slicgpt'"):
        plan_rotation_names("slicgpt", 2)


def test_plain_arrays_scale_the_readers_rotation(arch):
    q = random_orthogonal(64, 3)
    widths = plan_widths(arch, Format.PLAIN, WIDTH, slice_head=True)
    names, arrays = rotation_arrays(Format.PLAIN, {"Q": q}, widths, arch)
    assert names.embedding == "Q" and set(arrays) == {"Q", "Q.norm_readers", "ones"}
    np.testing.assert_array_equal(arrays["Q"], q[:, :48])
    np.testing.assert_allclose(arrays["Q.norm_readers"], q[:, :48] * math.sqrt(64 / 48))
    np.testing.assert_array_equal(arrays["ones"], np.ones(48))


def test_per_layer_arrays_pass_through_and_must_all_be_there(arch):
    names = plan_rotation_names(Format.SLICEGPT, 2)
    all_names = [names.embedding, *names.mid, *names.out]
    rotations = {name: random_orthogonal(64, i) for i, name in enumerate(all_names)}
    widths = plan_widths(arch, Format.SLICEGPT, WIDTH, slice_head=False)
    _, arrays = rotation_arrays(Format.SLICEGPT, rotations, widths, arch)
    assert list(arrays) == all_names
    assert all(arrays[name] is rotations[name] for name in all_names)  # no copies: maps stay maps
    del rotations["Q.1.out"]
    with pytest.raises(ValueError, match="rotations lack Q.1.out for a 2-layer model"):
        rotation_arrays(Format.SLICEGPT, rotations, widths, arch)


# ------------------------------------------------------------------------------------ the ops


def test_slicegpt_ops_of_a_two_layer_llama(arch):
    ops = ops_of(arch, Format.SLICEGPT)
    # embedding + per layer (q, k, v, o, gate, up, down, two shortcuts) + head; norms folded away
    assert len(ops) == 1 + 2 * 9 + 1
    assert not any("layernorm" in name or name == "model.norm.weight" for name in ops)
    assert ops["model.embed_tokens.weight"] == TensorOp(
        "model.embed_tokens.weight",
        source="model.embed_tokens.weight",
        in_rotation="Q.embedding",
        in_keep=48,
    )
    assert ops["model.layers.1.self_attn.k_proj.weight"] == TensorOp(
        "model.layers.1.self_attn.k_proj.weight",
        source="model.layers.1.self_attn.k_proj.weight",
        col_scale="model.layers.1.input_layernorm.weight",
        in_rotation="Q.0.out",
        in_keep=48,
    )
    assert ops["model.layers.0.mlp.up_proj.weight"].in_rotation == "Q.0.mid"
    assert ops["model.layers.0.self_attn.o_proj.weight"] == TensorOp(
        "model.layers.0.self_attn.o_proj.weight",
        source="model.layers.0.self_attn.o_proj.weight",
        out_rotation="Q.0.mid",
        out_keep=48,
    )
    # The last writer and the head stay at D = 64: slicegpt does not slice the head by default.
    assert ops["model.layers.1.mlp.down_proj.weight"].out_keep == 64
    assert ops["model.layers.1.mlp_shortcut"] == TensorOp(
        "model.layers.1.mlp_shortcut", shortcut=("Q.1.mid", "Q.1.out", 48, 64), dtype="F32"
    )
    assert ops["model.layers.0.attn_shortcut"].shortcut == ("Q.embedding", "Q.0.mid", 48, 48)
    assert ops["lm_head.weight"] == TensorOp(
        "lm_head.weight",
        source="lm_head.weight",
        col_scale="model.norm.weight",
        in_rotation="Q.1.out",
        in_keep=64,
    )
    assert ops_of(arch, Format.SLICEGPT, slice_head=True)["lm_head.weight"].in_keep == 48


def test_plain_ops_keep_stock_norms_of_ones(arch):
    ops = ops_of(arch, Format.PLAIN)
    # embedding + per layer (q, k, v, o, gate, up, down, two norms) + head + final norm
    assert len(ops) == 1 + 2 * 9 + 2
    readers = [op for op in ops.values() if op.col_scale is not None]
    assert len(readers) == 2 * 5 + 1
    assert {op.in_rotation for op in readers} == {"Q.norm_readers"} and ops[
        "lm_head.weight"
    ].in_keep == 48
    for norm in ("model.layers.1.post_attention_layernorm.weight", "model.norm.weight"):
        assert ops[norm] == TensorOp(norm, literal="ones", dtype="F32")
    assert ops["model.layers.1.mlp.down_proj.weight"].out_rotation == "Q"


def test_a_tied_head_is_untied_from_the_embedding(tiny_llama_config):
    tied = describe({**tiny_llama_config, "tie_word_embeddings": True})
    head = ops_of(tied, Format.SLICEGPT)["lm_head.weight"]
    assert head.source == "model.embed_tokens.weight" and head.col_scale == "model.norm.weight"


def test_biases_follow_their_weights(tiny_llama_config):
    """Qwen2's q/k/v biases are outputs of an input rotation (kept); a writer's bias rotates."""
    arch = describe({**tiny_llama_config, "model_type": "qwen2"})
    tensors = checkpoint_tensors(arch)
    for name in ("self_attn.k_proj", "self_attn.o_proj"):
        rows = tensors[f"model.layers.0.{name}.weight"][1][0]
        tensors[f"model.layers.0.{name}.bias"] = ("F32", [rows], "model.safetensors")
    ops = ops_of(arch, Format.SLICEGPT, tensors)
    assert len(ops) == 20 + 2
    k_bias = "model.layers.0.self_attn.k_proj.bias"
    o_bias = "model.layers.0.self_attn.o_proj.bias"
    assert ops[k_bias] == TensorOp(k_bias, source=k_bias)
    assert ops[o_bias] == TensorOp(o_bias, source=o_bias, out_rotation="Q.0.mid", out_keep=48)


# ------------------------------------------------------------------------------------ coverage


def test_a_tensor_the_architecture_does_not_explain_is_refused(arch):
    tensors = checkpoint_tensors(arch) | {"model.adapter.weight": ("F32", [64, 64], "x")}
    with pytest.raises(DimcutError) as refused:
        ops_of(arch, Format.SLICEGPT, tensors)
    assert str(refused.value) == (
        "the checkpoint has tensors dimcut does not know how to slice for model_type 'llama': "
        "model.adapter.weight"
    )
    # Rotary frequencies some checkpoints carry are recomputed by the model: ignored.
    inv_freq = "model.layers.0.self_attn.rotary_emb.inv_freq"
    assert inv_freq not in ops_of(
        arch, Format.PLAIN, checkpoint_tensors(arch) | {inv_freq: ("F32", [8], "x")}
    )


def test_a_missing_tensor_is_named(arch):
    tensors = checkpoint_tensors(arch)
    del tensors["model.layers.1.post_attention_layernorm.weight"]
    with pytest.raises(
        DimcutError,
        match="lacks tensors a llama model with 2 layers needs: "
        "model.layers.1.post_attention_layernorm.weight$",
    ):
        ops_of(arch, Format.SLICEGPT, tensors)
    del tensors["model.embed_tokens.weight"]
    with pytest.raises(DimcutError, match="has no model.embed_tokens.weight; is it a llama model"):
        ops_of(arch, Format.PLAIN, tensors)
