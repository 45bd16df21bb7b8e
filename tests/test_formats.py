"""Both output formats on tiny models of every family: logits, shapes, config, parameter
counts, loading with and without dimcut."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import dimcut
from dimcut.architectures import describe, sliced_width
from dimcut.plan import RotationNames
from dimcut.slicing import write_sliced_model
from helpers import tree_hash
from tiny_models import FAMILY_CONFIGS, VOCAB, random_orthogonal, save_tiny_model, tiny_logits

FAMILIES = sorted(FAMILY_CONFIGS)
TOKENS = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))


def per_layer_rotations(size: int, layers: int, seed: int = 1) -> dict[str, np.ndarray]:
    names = RotationNames.per_layer(layers)
    all_names = [names.embedding, *names.mid, *names.out]
    return {name: random_orthogonal(size, seed + i) for i, name in enumerate(all_names)}


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request, tmp_path_factory):
    path = save_tiny_model(request.param, tmp_path_factory.mktemp(request.param) / "dense")
    return request.param, path


@pytest.mark.parametrize("fmt", ["slicegpt", "plain"])
def test_full_rotation_reproduces_logits(family_model, fmt, tmp_path):
    family, dense = family_model
    before = tree_hash(dense)
    rotations = {"Q": random_orthogonal(64, 7)} if fmt == "plain" else per_layer_rotations(64, 2)
    out = tmp_path / "rotated"
    write_sliced_model(dense, out, fmt=fmt, rotations=rotations, width=64, progress=False)
    reference = tiny_logits(dense, TOKENS)
    rotated = tiny_logits(out, TOKENS)
    relative = (rotated - reference).abs().max() / reference.abs().max()
    assert relative < 1e-4, f"{family}/{fmt}: max relative logit error {relative:.2e}"
    assert tree_hash(dense) == before, "the input model was modified"


@pytest.mark.parametrize("fmt", ["slicegpt", "plain"])
def test_sliced_shapes_config_and_counts(family_model, fmt, tmp_path):
    family, dense = family_model
    width = sliced_width(64, 0.25)
    assert width == 48
    rotations = {"Q": random_orthogonal(64)} if fmt == "plain" else per_layer_rotations(64, 2)
    out = tmp_path / "sliced"
    write_sliced_model(dense, out, fmt=fmt, rotations=rotations, width=width, progress=False)
    config = json.loads((out / "config.json").read_text())
    arch = describe(json.loads((dense / "config.json").read_text()))
    tensors = dimcut.inspect_checkpoint(out)
    assert tensors["model.embed_tokens.weight"][1] == [VOCAB, width]
    last_width = width if fmt == "plain" else 64  # slicegpt leaves the head (and its input) at D
    assert tensors["model.layers.1.mlp.down_proj.weight"][1] == [last_width, arch.intermediate_size]
    assert tensors["model.layers.0.mlp.down_proj.weight"][1] == [width, arch.intermediate_size]
    assert config["dimcut"]["hidden_size"] == width
    assert config["dimcut"]["original_hidden_size"] == 64
    assert config["dimcut"]["effective_sparsity"] == pytest.approx(0.25)
    assert config["tie_word_embeddings"] is False
    dense_config = json.loads((dense / "config.json").read_text())
    dense_params = dimcut.count_parameters(dense)["total"]
    counts = dimcut.count_parameters(out)
    D, d, L, V, inter = 64, width, 2, VOCAB, arch.intermediate_size
    kv = arch.num_kv_heads * arch.head_dim
    attn_readers = arch.num_heads * arch.head_dim + 2 * kv
    bias = (attn_readers * L) if dense_config.get("attention_bias") or family == "qwen2" else 0
    if fmt == "plain":
        assert config["hidden_size"] == d and config["head_dim"] == arch.head_dim
        assert config["rms_norm_eps"] == pytest.approx(arch.rms_norm_eps * D / d)
        expected = V * d * 2 + L * (d * attn_readers + arch.num_heads * arch.head_dim * d)
        expected += L * (3 * d * inter) + (2 * L + 1) * d + bias
        assert counts["shortcuts"] == 0
    else:
        assert (
            config["model_type"] == "dimcut_sliced" and config["base_model_type"] == arch.model_type
        )
        assert config["mid_widths"] == [d, d] and config["out_widths"] == [d, D]  # head unsliced
        shortcuts = 2 * d * d + d * d + d * D  # attn d×d twice; mlp d×d, then d×D (head unsliced)
        expected = V * d + V * D + L * (d * attn_readers + d * arch.num_heads * arch.head_dim)
        expected += L * 2 * inter * d + inter * d + inter * D + bias + shortcuts
        assert counts["shortcuts"] == shortcuts
    assert counts["total"] == expected
    assert counts["without_shortcuts"] == counts["total"] - counts["shortcuts"]
    assert counts["total"] < dense_params or fmt == "slicegpt"

    model, tokenizer = dimcut.load(out)
    assert tokenizer is not None  # copied from the input
    with torch.no_grad():
        logits = model(TOKENS).logits
    assert logits.shape == (2, 12, VOCAB) and torch.isfinite(logits).all()
    generated = model.generate(TOKENS[:1], max_new_tokens=5, do_sample=False, use_cache=True)
    no_cache = model.generate(TOKENS[:1], max_new_tokens=5, do_sample=False, use_cache=False)
    assert generated.shape == (1, 17) and torch.equal(generated, no_cache)


def test_slicegpt_loads_without_dimcut_and_round_trips(tmp_path):
    dense = save_tiny_model("qwen2", tmp_path / "dense")
    out = tmp_path / "sliced"
    write_sliced_model(
        dense, out, fmt="slicegpt", rotations=per_layer_rotations(64, 2), width=40, progress=False
    )
    expected = tiny_logits(out, TOKENS)
    # (2) trust_remote_code in a fresh interpreter where dimcut cannot be imported.
    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.modules["dimcut"] = None  # importing dimcut now fails
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True, dtype=torch.float32)
        tokens = torch.tensor({TOKENS.tolist()})
        with torch.no_grad():
            torch.save(model(tokens).logits, {str(tmp_path / "remote.pt")!r})
        """
    )
    subprocess.run(
        [sys.executable, "-c", script],
        check=True,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    remote = torch.load(tmp_path / "remote.pt", weights_only=True)
    assert torch.equal(remote, expected)
    # save_pretrained of a loaded sliced model round-trips.
    model, _ = dimcut.load(out)
    model.save_pretrained(tmp_path / "resaved")
    assert torch.equal(tiny_logits(tmp_path / "resaved", TOKENS), expected)
