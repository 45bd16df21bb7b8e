"""`dimcut slice --method`: other ways to cut, each checked against an oracle of its own.

- `channels`: Q selects the residual channels of largest unit-RMS energy; at d = D the cut is a
  permutation (the dense logits), at d < D it is the dense model with the dropped channels of the
  residual stream zeroed (embedding columns, o_proj and down_proj rows).
- `random`: a seeded random rotation; a full one keeps the dense logits.
- `layers`: ShortGPT's block influence against transformers' hidden states, the output against
  the dense model with those layers deleted from its ModuleList.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import dimcut
from dimcut import depth
from dimcut.architectures import describe, load_architecture
from dimcut.calibration import calibration_documents, sample_sequences
from dimcut.evaluation.record import model_facts
from dimcut.laws.records import cut_variant
from helpers import SLICE, refuse, run_cli, tree_hash
from tiny_models import VOCAB, random_orthogonal, save_tiny_model, tiny_config, tiny_logits

CALIB = {"nsamples": 4, "seqlen": 32, "seed": 3, "progress": False}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return save_tiny_model("llama", tmp_path_factory.mktemp("llama") / "dense")


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """A 4-layer tiny Llama: depth cuts need layers to choose from."""
    return save_tiny_model("llama", tmp_path_factory.mktemp("deep") / "dense", layers=4)


def calibration_tokens(model_dir: Path) -> torch.Tensor:
    """The token ids calibration samples with CALIB (the same sampler, the same text)."""
    from transformers import AutoTokenizer

    docs, _ = calibration_documents(None)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return sample_sequences(tokenizer, docs, CALIB["nsamples"], CALIB["seqlen"], CALIB["seed"])


def probe_tokens(n: int = 2, length: int = 24) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(11))


def dense_model(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours - reference).abs().max() / reference.abs().max())


def provenance(out: Path) -> dict:
    return json.loads((out / "config.json").read_text())["dimcut"]


# ------------------------------------------------------------------------------------ channels


def unit_rms_channel_energy(model_dir: Path, tokens: torch.Tensor) -> np.ndarray:
    """Σ over the residual signals (embedding output, after attention and after the MLP of every
    layer) and tokens of (x_j / rms(x))², from hooks on the dense transformers model."""
    model = dense_model(model_dir)
    signals = []

    def keep(x: torch.Tensor) -> None:
        signals.append(x.detach().reshape(-1, x.shape[-1]).double())

    hooks = [model.model.embed_tokens.register_forward_hook(lambda _m, _a, out: keep(out))]
    for layer in model.model.layers:
        hooks.append(  # the residual after attention is the second norm's input
            layer.post_attention_layernorm.register_forward_pre_hook(lambda _m, a: keep(a[0]))
        )
        hooks.append(
            layer.register_forward_hook(
                lambda _m, _a, out: keep(out[0] if isinstance(out, tuple) else out)
            )
        )
    with torch.no_grad():
        model(tokens)
    for hook in hooks:
        hook.remove()
    energy = torch.zeros(model.config.hidden_size, dtype=torch.float64)
    for x in signals:
        energy += (x / x.pow(2).mean(-1, keepdim=True).sqrt()).pow(2).sum(0)
    return energy.numpy()


def test_channel_ranking_is_the_unit_rms_energy_of_the_dense_activations(llama):
    energy = unit_rms_channel_energy(llama, calibration_tokens(llama))
    calibrated = dimcut.calibrate(llama, fmt="plain", width=48, method="channels", **CALIB)
    q = np.asarray(calibrated.rotations["Q"])
    assert set(np.unique(q)) == {0.0, 1.0} and (q.sum(0) == 1).all(), "Q is not a selection"
    order = q.argmax(0)
    assert list(order) == list(np.argsort(-energy, kind="stable"))
    np.testing.assert_allclose(calibrated.eigenvalues["Q"], energy[order], rtol=1e-5)
    assert calibrated.record["method"] == "channels" and calibrated.record["weighting"] == "rms"


def test_channels_at_full_width_is_a_permutation(llama, tmp_path):
    before = tree_hash(llama)
    out = tmp_path / "out"
    result = dimcut.slice_model(llama, 0.0, out, fmt="plain", method="channels", **CALIB)
    assert result.hidden_size == 64 and result.method == "channels"
    tokens = probe_tokens()
    assert relative_error(tiny_logits(out, tokens), tiny_logits(llama, tokens)) < 1e-5
    assert provenance(out)["calibration"]["method"] == "channels"
    assert cut_variant(model_facts(out)) == "plain/channels"
    assert tree_hash(llama) == before, "the input model was modified"


def test_channels_cut_is_the_dense_model_with_the_dropped_channels_zeroed(llama, tmp_path):
    out = tmp_path / "out"
    dimcut.slice_model(llama, 0.25, out, fmt="plain", method="channels", **CALIB)
    assert json.loads((out / "config.json").read_text())["hidden_size"] == 48
    energy = unit_rms_channel_energy(llama, calibration_tokens(llama))
    dropped = torch.from_numpy(np.argsort(-energy, kind="stable")[48:].copy())
    # The residual stream confined to the kept channels: nothing writes into a dropped one, and
    # every norm (divisor D) sees zeros there — the plain format's RMSN_D on the kept d.
    reference = dense_model(llama)
    with torch.no_grad():
        reference.model.embed_tokens.weight[:, dropped] = 0
        for layer in reference.model.layers:
            layer.self_attn.o_proj.weight[dropped, :] = 0
            layer.mlp.down_proj.weight[dropped, :] = 0
        tokens = probe_tokens()
        expected = reference(tokens).logits
    assert relative_error(tiny_logits(out, tokens), expected) < 1e-4


# -------------------------------------------------------------------------------------- random


def test_random_at_full_width_reproduces_dense_logits_without_calibrating(
    llama, tmp_path, monkeypatch
):
    def no_calibration(*_args, **_kwargs):
        raise AssertionError("method random calibrated")

    monkeypatch.setattr(dimcut.calibration, "calibrate", no_calibration)
    monkeypatch.setattr(dimcut.calibration, "block_influence", no_calibration)
    out = tmp_path / "out"
    dimcut.slice_model(llama, 0.0, out, fmt="plain", method="random", seed=5, progress=False)
    tokens = probe_tokens()
    assert relative_error(tiny_logits(out, tokens), tiny_logits(llama, tokens)) < 1e-4
    record = provenance(out)
    assert record["calibration"]["method"] == "random" and record["calibration"]["seed"] == 5
    assert record["rotation_source"] == "seed"
    assert cut_variant(model_facts(out)) == "plain/random"


def test_random_basis_is_reproducible_by_seed_and_differs_across_seeds(llama, tmp_path):
    q = dimcut.calibration.random_basis(64, 2, seed=5).rotations["Q"]
    np.testing.assert_allclose(q.T @ q, np.eye(64), atol=1e-12)
    np.testing.assert_array_equal(q, random_orthogonal(64, 5))  # QR with the sign fix
    other = dimcut.calibration.random_basis(64, 2, seed=6).rotations["Q"]
    assert np.abs(q - other).max() > 0.1
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        dimcut.slice_model(
            llama, 0.25, tmp_path / name, fmt="plain", method="random", seed=seed, progress=False
        )
    weights = {name: tree_hash(tmp_path / name)["model.safetensors"] for name in "abc"}
    assert weights["a"] == weights["b"] != weights["c"]


# -------------------------------------------------------------------------------------- layers


def test_block_influence_matches_transformers_hidden_states(deep):
    influence, record, _timings = dimcut.calibration.block_influence(deep, **CALIB)
    model = dense_model(deep)
    last = []
    model.model.layers[-1].register_forward_hook(
        lambda _m, _a, out: last.append(out[0] if isinstance(out, tuple) else out)
    )
    with torch.no_grad():
        states = model(calibration_tokens(deep), output_hidden_states=True).hidden_states
    # hidden_states[i] is layer i's input; the last entry has the final norm applied, so the
    # last layer's output comes from its hook.
    outputs = [*states[1:-1], last[0]]
    expected = [
        1 - torch.nn.functional.cosine_similarity(x.double(), y.double(), dim=-1).mean().item()
        for x, y in zip(states[:-1], outputs, strict=True)
    ]
    np.testing.assert_allclose(influence, expected, atol=1e-5)
    assert record["method"] == "layers" and record["token_sha256"]


def test_layers_cut_is_the_dense_model_with_those_layers_deleted(deep, tmp_path, capsys):
    before = tree_hash(deep)
    out = tmp_path / "out"
    result = dimcut.slice_model(deep, 0.5, out, fmt="plain", method="layers", **CALIB)
    influence = result.block_influence
    assert result.removed_layers == sorted(np.argsort(influence)[:2].tolist())
    assert result.effective_sparsity == 0.5 and result.layers == (2, 4)
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and config["hidden_size"] == 64
    record = config["dimcut"]
    assert record["removed_layers"] == result.removed_layers
    assert record["block_influence"] == influence and record["effective_sparsity"] == 0.5
    assert cut_variant(model_facts(out)) == "plain/layers"

    reference = dense_model(deep)
    kept = [
        layer
        for i, layer in enumerate(reference.model.layers)
        if i not in set(result.removed_layers)
    ]
    reference.model.layers = torch.nn.ModuleList(kept)
    reference.config.num_hidden_layers = len(kept)
    tokens = probe_tokens()
    with torch.no_grad():  # no cache: the kept layers still carry their old layer_idx
        expected = reference(tokens, use_cache=False).logits
    ours = tiny_logits(out, tokens)  # stock AutoModelForCausalLM.from_pretrained
    assert (ours - expected).abs().max() < 1e-5
    assert dimcut.count_parameters(out)["total"] == result.parameters["total"]
    code, output = run_cli(["verify", out], capsys)
    assert code == 0, output
    assert tree_hash(deep) == before, "the input model was modified"


def test_layers_budget_keeps_the_most_layers_that_fit(deep, tmp_path):
    dense = dimcut.count_parameters(deep)["total"]
    out = tmp_path / "out"
    result = dimcut.slice_model(
        deep, None, out, target_params=dense - 1, fmt="plain", method="layers", **CALIB
    )
    assert result.layers == (3, 4) and result.next_width_parameters == dense
    assert dimcut.count_parameters(out)["total"] <= dense - 1
    with pytest.raises(ValueError, match="target_params"):
        dimcut.slice_model(
            deep, None, tmp_path / "none", target_params=1000, fmt="plain", method="layers", **CALIB
        )


def test_a_depth_cut_keeps_the_per_layer_config_of_the_kept_layers():
    config = tiny_config("qwen2", layers=4).to_dict()
    config["layer_types"] = ["full_attention", "sliding_attention", "full_attention", "x"]
    config["max_window_layers"] = 2
    arch = describe(config)
    pruned = depth.pruned_config(arch, [1, 3], {"removed_layers": [1, 3]})
    assert pruned["num_hidden_layers"] == 2
    assert pruned["layer_types"] == ["full_attention", "full_attention"]
    assert pruned["max_window_layers"] == 1  # of the kept layers 0 and 2, only 0 is below 2
    assert pruned["eos_token_id"] == config["eos_token_id"]


def test_depth_cut_renumbers_the_kept_layers(deep):
    arch = load_architecture(deep)
    ops = depth.pruned_ops(arch, dimcut.inspect_checkpoint(deep), [0, 2])
    renamed = {op.source: op.name for op in ops}
    assert renamed["model.layers.1.mlp.down_proj.weight"] == "model.layers.0.mlp.down_proj.weight"
    assert renamed["model.layers.3.mlp.down_proj.weight"] == "model.layers.1.mlp.down_proj.weight"
    assert not any(".layers.0." in source or ".layers.2." in source for source in renamed)
    assert renamed["model.embed_tokens.weight"] == "model.embed_tokens.weight"
    assert all(op.col_scale is None and op.in_rotation is None for op in ops)  # plain copies


@pytest.mark.parametrize(("sparsity", "kept"), [(0.0, 4), (0.25, 3), (0.3, 2), (0.9, 1)])
def test_layers_kept_are_rounded_down_and_at_least_one(sparsity, kept):
    assert depth.kept_layer_count(4, sparsity) == kept


# ------------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--method", "channels"], r"method channels.*--format plain.*not format slicegpt"),
        (["--method", "random", "--format", "slicegpt"], r"method random.*--format plain"),
        (["--method", "layers"], r"method layers.*--format plain"),
        (["--method", "random", "--format", "plain", "--resume"], r"method random.*--resume"),
        (["--method", "layers", "--format", "plain", "--save-rotations", "R"], r"--save-rotations"),
        (["--method", "channels", "--format", "plain", "--weighting", "raw"], r"weighting raw"),
        (["--method", "layers", "--format", "plain", "--widths", "variance"], r"widths variance"),
    ],
)
def test_bad_method_combinations_are_refused(extra, expected, llama, tmp_path, capsys):
    args = ["slice", llama, "-o", tmp_path / "out", *SLICE, *extra]
    message = refuse(args, capsys, expected, inputs=(llama,))
    assert len(message.strip().splitlines()) == 1, message


def test_rotations_of_another_method_are_refused(llama, tmp_path, capsys):
    saved = tmp_path / "rotations"
    calibrated = dimcut.calibrate(llama, fmt="plain", width=0, **CALIB)
    dimcut.save_rotations(saved, calibrated)
    calibrated.close()
    args = ["slice", llama, "-o", tmp_path / "out", *SLICE, "--format", "plain"]
    refuse(
        [*args, "--method", "channels", "--rotations", saved],
        capsys,
        r"made by method 'pca', not 'channels'",
        inputs=(llama, saved),
    )
