"""Model families as data: describing a config, refusing what cannot be sliced, the shapes a
config implies and the check of a checkpoint against them, and the sliced width."""

from __future__ import annotations

import json

import numpy as np
import pytest

import dimcut
from dimcut.architectures import (
    FAMILIES,
    check_weights,
    describe,
    expected_shapes,
    load_architecture,
    sliced_width,
)
from dimcut.slicing import write_sliced_model
from helpers import checkpoint_tensors

# ---------------------------------------------------------------------------------- describe


def test_a_llama_config_is_described(tiny_llama_config):
    arch = describe(tiny_llama_config)
    assert arch.family is FAMILIES["llama"]
    assert (arch.hidden_size, arch.num_layers, arch.num_heads, arch.num_kv_heads) == (64, 2, 4, 2)
    assert (arch.head_dim, arch.intermediate_size, arch.vocab_size) == (16, 144, 384)
    assert arch.rms_norm_eps == 1e-5 and arch.tie_word_embeddings is False
    assert arch.dtype == "float32"
    assert arch.attention_input_weights(1) == [
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.1.self_attn.k_proj.weight",
        "model.layers.1.self_attn.v_proj.weight",
    ]
    assert arch.mlp_input_weights(0) == [
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.0.mlp.up_proj.weight",
    ]
    assert arch.norm_weight(0, "attention") == "model.layers.0.input_layernorm.weight"
    assert arch.norm_weight(1, "mlp") == "model.layers.1.post_attention_layernorm.weight"


def test_phi3_reads_its_norms_through_fused_projections(tiny_llama_config):
    arch = describe({**tiny_llama_config, "model_type": "phi3"})
    assert arch.attention_input_weights(0) == ["model.layers.0.self_attn.qkv_proj.weight"]
    assert arch.mlp_input_weights(0) == ["model.layers.0.mlp.gate_up_proj.weight"]


def test_head_count_defaults_follow_the_config(tiny_llama_config):
    """No num_key_value_heads: multi-head attention; no head_dim: hidden / heads."""
    config = {
        k: v for k, v in tiny_llama_config.items() if k not in ("num_key_value_heads", "head_dim")
    }
    arch = describe({**config, "num_attention_heads": 8})
    assert (arch.num_kv_heads, arch.head_dim) == (8, 8)
    assert describe({**tiny_llama_config, "head_dim": 32}).head_dim == 32


def test_unsupported_model_type_names_the_supported_ones(tiny_llama_config):
    with pytest.raises(dimcut.DimcutError) as refused:
        describe({**tiny_llama_config, "model_type": "gpt2"}, source="m/config.json")
    assert str(refused.value) == (
        "m/config.json: model_type 'gpt2' is not supported; dimcut slices the pre-norm RMSNorm "
        "decoder families llama, mistral, phi3, qwen2"
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"intermediate_size": None}, "config lacks the field 'intermediate_size'"),
        ({"rms_norm_eps": float("nan")}, "rms_norm_eps=nan is not a valid epsilon"),
        ({"rms_norm_eps": -1e-6}, "rms_norm_eps=-1e-06 is not a valid epsilon"),
        ({"num_experts": 4}, "num_experts=4 has mixture-of-experts layers"),
    ],
    ids=["no_intermediate_size", "nan_epsilon", "negative_epsilon", "experts"],
)
def test_configs_that_cannot_be_sliced_are_refused(change, message, tiny_llama_config):
    config = {k: v for k, v in {**tiny_llama_config, **change}.items() if v is not None}
    with pytest.raises(dimcut.DimcutError, match=message):
        describe(config)


def test_config_json_is_read_from_the_model_directory(tmp_path, tiny_llama_config):
    with pytest.raises(FileNotFoundError, match="no config.json in the model directory"):
        load_architecture(tmp_path)
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(dimcut.DimcutError, match="config.json is not valid JSON"):
        load_architecture(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(tiny_llama_config))
    assert load_architecture(tmp_path).hidden_size == 64


# ------------------------------------------------------------------ expected shapes and check


def test_expected_shapes_of_the_tiny_llama(tiny_llama_config):
    shapes = expected_shapes(describe(tiny_llama_config))
    # embedding, final norm, head + per layer: q, k, v, o, gate, up, down and two norms
    assert len(shapes) == 3 + 2 * 9
    assert shapes["model.embed_tokens.weight"] == shapes["lm_head.weight"] == (384, 64)
    assert shapes["model.norm.weight"] == (64,)
    assert shapes["model.layers.1.self_attn.q_proj.weight"] == (64, 64)
    assert shapes["model.layers.1.self_attn.k_proj.weight"] == (32, 64)  # 2 kv heads × 16
    assert shapes["model.layers.0.self_attn.o_proj.weight"] == (64, 64)
    assert shapes["model.layers.0.mlp.gate_proj.weight"] == (144, 64)
    assert shapes["model.layers.0.mlp.down_proj.weight"] == (64, 144)
    assert shapes["model.layers.1.post_attention_layernorm.weight"] == (64,)


def test_expected_shapes_of_tied_and_fused_families(tiny_llama_config):
    tied = expected_shapes(describe({**tiny_llama_config, "tie_word_embeddings": True}))
    assert len(tied) == 2 + 2 * 9 and "lm_head.weight" not in tied
    phi3 = expected_shapes(describe({**tiny_llama_config, "model_type": "phi3"}))
    assert len(phi3) == 3 + 2 * 6
    assert phi3["model.layers.0.self_attn.qkv_proj.weight"] == (128, 64)  # (4 + 2·2) × 16
    assert phi3["model.layers.0.mlp.gate_up_proj.weight"] == (288, 64)


def test_check_weights_accepts_the_expected_tensors_and_an_unsaid_tied_head(tiny_llama_config):
    arch = describe(tiny_llama_config)
    tensors = checkpoint_tensors(arch)
    check_weights(arch, tensors, "m")
    del tensors["lm_head.weight"]
    check_weights(arch, tensors, "m")


def test_check_weights_refuses_what_the_config_does_not_describe(tiny_llama_config):
    arch = describe(tiny_llama_config)
    k_proj = "model.layers.0.self_attn.k_proj.weight"

    missing = checkpoint_tensors(arch)
    del missing[k_proj]
    with pytest.raises(dimcut.DimcutError, match=rf"implies tensor '{k_proj}' of shape \[32, 64\]"):
        check_weights(arch, missing, "m")

    wrong = checkpoint_tensors(arch) | {k_proj: ("F32", [64, 64], "model-2.safetensors")}
    with pytest.raises(dimcut.DimcutError) as refused:
        check_weights(arch, wrong, "m")
    assert f"tensor '{k_proj}' in model-2.safetensors has shape [64, 64]" in str(refused.value)
    assert "num_key_value_heads=2" in str(refused.value)
    assert str(refused.value).endswith("implies [32, 64]")

    bias = checkpoint_tensors(arch) | {k_proj[:-6] + "bias": ("F32", [64], "b.safetensors")}
    with pytest.raises(
        dimcut.DimcutError,
        match=r"b.safetensors: bias .* has shape \[64\], its weight has 32 rows",
    ):
        check_weights(arch, bias, "m")

    extra = checkpoint_tensors(arch) | {
        "model.layers.2.mlp.up_proj.weight": ("F32", [144, 64], "x")
    }
    with pytest.raises(dimcut.DimcutError, match="num_hidden_layers=2, but the checkpoint has"):
        check_weights(arch, extra, "m")


# ------------------------------------------------------------------ refusal and sliced width


def test_unsupported_family_is_refused_and_nothing_written(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50)).save_pretrained(
        tmp_path / "gpt2"
    )
    with pytest.raises(dimcut.DimcutError, match=r"model_type 'gpt2' is not supported.*llama"):
        write_sliced_model(
            tmp_path / "gpt2", tmp_path / "out", fmt="plain", rotations={"Q": np.eye(32)}, width=32
        )
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2"]


def test_moe_config_is_refused():
    config = {"model_type": "mistral", "num_local_experts": 8, "hidden_size": 64}
    with pytest.raises(dimcut.DimcutError, match="mixture-of-experts"):
        describe(config)


@pytest.mark.parametrize(
    ("sparsity", "expected"), [(0.0, 576), (0.1, 512), (0.25, 432), (0.3, 400), (0.5, 288)]
)
def test_width_rounding(sparsity, expected):
    assert sliced_width(576, sparsity) == expected


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, float("nan"), 0.999])
def test_bad_sparsity(sparsity):
    with pytest.raises(ValueError, match="sparsity"):
        sliced_width(576, sparsity)
