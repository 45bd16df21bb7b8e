"""Calibration PCA and `dimcut slice`, end to end on tiny models."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
import torch

import dimcut
from dimcut.calibration import calibration_documents, sample_sequences
from helpers import tree_hash as dir_digest
from slicegpt_oracle import slicegpt
from tiny_models import FAMILY_CONFIGS, save_tiny_model, tiny_config, tiny_logits

CALIB = {"nsamples": 4, "seqlen": 32, "seed": 3, "progress": False}
# 64 tokens: one forward batch under any memory budget (the smallest batch is 64 tokens), so the
# float64 covariance sums run in the same order and only where the activations live differs.
ONE_BATCH = {**CALIB, "nsamples": 2}
# The CUDA path cannot run on CPU-only machines: the same tests run there when CUDA is present.
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here"),
    ),
]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return save_tiny_model("llama", tmp_path_factory.mktemp("llama") / "dense")


def token_batch(model_dir, n=2, length=24):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    docs, _ = calibration_documents(None)
    return sample_sequences(tokenizer, docs[500:], n, length, seed=11)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
@pytest.mark.parametrize("fmt", ["slicegpt", "plain"])
def test_zero_sparsity_reproduces_dense_logits(family, fmt, device, tmp_path):
    dense = save_tiny_model(family, tmp_path / "dense")
    result = dimcut.slice_model(dense, 0.0, tmp_path / "out", fmt=fmt, device=device, **CALIB)
    assert result.hidden_size == 64 and result.effective_sparsity == 0
    tokens = token_batch(dense)
    reference = tiny_logits(dense, tokens)
    error = (tiny_logits(tmp_path / "out", tokens) - reference).abs().max() / reference.abs().max()
    assert error < 1e-4, f"{family}/{fmt}: relative logit error {error:.2e}"


@pytest.mark.parametrize("device", DEVICES)
def test_streamed_calibration_matches_in_memory_oracle(llama, device, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    width = 40
    calibrated = dimcut.calibrate(llama, fmt="slicegpt", width=width, device=device, **CALIB)
    tokenizer = AutoTokenizer.from_pretrained(llama)
    docs, _ = calibration_documents(None)
    tokens = sample_sequences(tokenizer, docs, CALIB["nsamples"], CALIB["seqlen"], CALIB["seed"])
    model = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float64)
    oracle_rotations, oracle_logits = slicegpt(model, tokens, width)
    names = ["Q.embedding"] + [f"Q.{i}.{p}" for i in range(2) for p in ("mid", "out")]
    for name, expected in zip(names, oracle_rotations, strict=True):
        kept = expected.shape[0] if name == "Q.1.out" else width
        alignment = np.abs(
            np.sum(calibrated.rotations[name][:, :kept] * expected[:, :kept].numpy(), axis=0)
        )
        assert alignment.min() > 0.999, (
            f"{name}: columns differ beyond sign ({alignment.min():.5f})"
        )
    dimcut.write_sliced_model(
        llama,
        tmp_path / "out",
        fmt="slicegpt",
        rotations=calibrated.rotations,
        width=width,
        progress=False,
    )
    probe = token_batch(llama)
    ours = tiny_logits(tmp_path / "out", probe).double()
    theirs = oracle_logits(probe)
    assert (ours - theirs).abs().max() / theirs.abs().max() < 1e-3


def test_pca_beats_random_rotation_on_low_rank_stream(tmp_path):
    """Embedding rows confined to a 16-dim subspace: PCA at width 16 loses almost nothing."""
    from safetensors.torch import load_file, save_file

    dense = save_tiny_model("llama", tmp_path / "dense", shard=None)
    weights = load_file(dense / "model.safetensors")
    generator = torch.Generator().manual_seed(5)
    basis = torch.linalg.qr(torch.randn(64, 16, generator=generator))[0]
    weights["model.embed_tokens.weight"] = torch.randn(384, 16, generator=generator) @ basis.T
    for name in list(weights):  # layers write nothing back: the residual stays in the subspace
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            weights[name] = torch.zeros_like(weights[name])
    save_file(weights, dense / "model.safetensors", metadata={"format": "pt"})
    tokens = token_batch(dense)
    reference = tiny_logits(dense, tokens)
    pca_out = tmp_path / "pca"
    dimcut.slice_model(dense, 0.75, pca_out, fmt="plain", round_to=8, **CALIB)
    pca_error = (tiny_logits(pca_out, tokens) - reference).abs().max().item()
    from tiny_models import random_orthogonal

    dimcut.write_sliced_model(
        dense,
        tmp_path / "random",
        fmt="plain",
        rotations={"Q": random_orthogonal(64, 9)},
        width=16,
        progress=False,
    )
    random_error = (tiny_logits(tmp_path / "random", tokens) - reference).abs().max().item()
    assert pca_error < 1e-3 * reference.abs().max().item()
    assert random_error > 100 * pca_error


def test_same_seed_gives_byte_identical_output(llama, tmp_path):
    for name in ("a", "b"):
        dimcut.slice_model(llama, 0.25, tmp_path / name, **CALIB)
    assert dir_digest(tmp_path / "a") == dir_digest(tmp_path / "b")


def test_saved_rotations_are_reused_and_checked(llama, tmp_path):
    rotations = tmp_path / "rotations"
    dimcut.slice_model(llama, 0.25, tmp_path / "a", fmt="plain", save_rotations=rotations, **CALIB)
    dimcut.slice_model(
        llama, 0.5, tmp_path / "b", fmt="plain", rotations_file=rotations, progress=False
    )
    assert dimcut.count_parameters(tmp_path / "b")["hidden_size"] == 32
    with pytest.raises(dimcut.DimcutError, match="format 'plain', not 'slicegpt'"):
        dimcut.slice_model(llama, 0.25, tmp_path / "c", fmt="slicegpt", rotations_file=rotations)
    assert not (tmp_path / "c").exists()


def test_perplexity_rises_with_sparsity(trained_llama, tmp_path):
    from dimcut.evaluation import perplexity

    docs, _ = calibration_documents(None)
    held_out = docs[-40:]
    values = []
    for sparsity in (0.0, 0.25, 0.5, 0.75):
        out = tmp_path / f"s{sparsity}"
        dimcut.slice_model(trained_llama, sparsity, out, **{**CALIB, "nsamples": 16})
        model, tokenizer = dimcut.load(out)
        values.append(perplexity(model, tokenizer, held_out, seqlen=64)["ppl"])
    assert values == sorted(values) and values[-1] > values[0] * 1.01, values


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"sparsity": 1.0}, ValueError, "sparsity"),
        ({"sparsity": -0.2}, ValueError, "sparsity"),
        ({"sparsity": 0.99}, ValueError, "width 0"),
        ({"sparsity": 0.25, "seqlen": 10**7}, ValueError, "shorter than one sequence"),
        ({"sparsity": 0.25, "device": "cuda"}, ValueError, "CUDA"),
    ],
)
def test_bad_input_writes_nothing(llama, tmp_path, kwargs, error, match):
    if kwargs.get("device") == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    before = dir_digest(llama)
    options = {**CALIB, **kwargs}
    sparsity = options.pop("sparsity")
    with pytest.raises(error, match=match):
        dimcut.slice_model(llama, sparsity, tmp_path / "out", **options)
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []
    assert dir_digest(llama) == before


def test_missing_weights_or_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        dimcut.slice_model(tmp_path / "empty", 0.25, tmp_path / "out", **CALIB)
    assert not (tmp_path / "out").exists()


def test_calibration_sampling_is_seeded_and_sized(llama):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama)
    docs, source = calibration_documents(None)
    assert source == "builtin" and len(docs) > 900
    a = sample_sequences(tokenizer, docs, 3, 50, seed=1)
    b = sample_sequences(tokenizer, docs, 3, 50, seed=1)
    assert a.shape == (3, 50) and torch.equal(a, b)
    assert (
        hashlib.sha256(a.numpy().tobytes()).digest()
        != hashlib.sha256(
            sample_sequences(tokenizer, docs, 3, 50, seed=2).numpy().tobytes()
        ).digest()
    )
    assert math.isclose(float((a == tokenizer.bos_token_id).sum()), 3)  # one BOS per sequence


def test_activations_spill_to_disk_with_identical_rotations(llama):
    in_memory = dimcut.calibrate(llama, fmt="slicegpt", width=40, **ONE_BATCH)
    spilled = dimcut.calibrate(llama, fmt="slicegpt", width=40, memory_budget=1024, **ONE_BATCH)
    assert not in_memory.activations_on_disk and spilled.activations_on_disk
    assert in_memory.record == spilled.record  # where activations lived is not provenance
    for name, rotation in in_memory.rotations.items():
        np.testing.assert_array_equal(rotation, spilled.rotations[name])


def test_plain_width_is_one_the_stock_config_accepts(llama, tmp_path):
    """0.66·64 = 42 is a multiple of --round-to 2 but not of Llama's 4 heads, which
    transformers' LlamaConfig requires of hidden_size: the plain format rounds down to 40."""
    result = dimcut.slice_model(llama, 0.34, tmp_path / "out", fmt="plain", round_to=2, **CALIB)
    assert result.hidden_size == 40
    model, _ = dimcut.load(tmp_path / "out")
    assert model.config.hidden_size == 40
    sliced = dimcut.slice_model(llama, 0.34, tmp_path / "faithful", round_to=2, **CALIB)
    assert sliced.hidden_size == 42  # the slicegpt format has no such constraint


def test_rotations_leave_memory_as_leading_columns(llama, tmp_path):
    """The rewrite reads Q[:, :d] only, so that is all a rotation store keeps on disk (the head
    rotation keeps D when the head is not sliced); the temporary store is gone afterwards."""
    calibrated = dimcut.calibrate(llama, fmt="slicegpt", width=40, rotations_dir=tmp_path, **CALIB)
    store = calibrated.rotations
    assert isinstance(store, dimcut.calibration.RotationStore)
    assert store.directory.parent == tmp_path
    shapes = {name: store[name].shape for name in store}
    assert shapes == {
        "Q.embedding": (64, 40),
        "Q.0.mid": (64, 40),
        "Q.0.out": (64, 40),
        "Q.1.mid": (64, 40),
        "Q.1.out": (64, 64),
    }
    assert all(isinstance(store[name], np.memmap) for name in store)
    calibrated.close()
    assert list(tmp_path.iterdir()) == []
    plain = dimcut.calibrate(llama, fmt="plain", width=40, rotations_dir=tmp_path, **CALIB)
    assert {name: plain.rotations[name].shape for name in plain.rotations} == {"Q": (64, 64)}
    plain.close()
    dimcut.slice_model(llama, 0.25, tmp_path / "out", **CALIB)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_format_typo_fails_before_any_work(llama, tmp_path, monkeypatch):
    from dimcut.calibration import procedures

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the format was checked")

    monkeypatch.setattr(procedures, "_open_stream", no_work)
    with pytest.raises(ValueError, match="format must be one of slicegpt, plain, got 'slicgpt'"):
        dimcut.calibrate(llama, fmt="slicgpt", width=40)
    with pytest.raises(ValueError, match="got 'plian'"):
        dimcut.slice_model(llama, 0.25, tmp_path / "out", fmt="plian")
    assert list(tmp_path.iterdir()) == []


def test_memory_budget_reaches_the_engine(llama, tmp_path, monkeypatch):
    from dimcut import slicing

    seen = {}
    rewrite = slicing.rewrite_checkpoint

    def spy(*args, **kwargs):
        seen["budget"] = kwargs["memory_budget"]
        return rewrite(*args, **kwargs)

    monkeypatch.setattr(slicing, "rewrite_checkpoint", spy)
    dimcut.slice_model(llama, 0.25, tmp_path / "out", memory_budget=64 * 2**20, **CALIB)
    assert seen["budget"] == 16 * 2**20


def test_resume_does_not_depend_on_the_memory_budget(llama, tmp_path, monkeypatch):
    """A resumable calibration interrupted after layer 1 continues under another memory budget
    (where the activations live is not part of what the calibration is) and gives the same
    rotations as an uninterrupted run."""
    from dimcut import _hooks
    from dimcut.calibration import procedures

    reference = dimcut.calibrate(llama, fmt="slicegpt", width=40, **ONE_BATCH)
    state = tmp_path / "state"

    def stop_after_layer_one(point, value):
        if point == "calibration" and value >= 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(_hooks, "reached", stop_after_layer_one)
    with pytest.raises(KeyboardInterrupt):
        dimcut.calibrate(llama, fmt="slicegpt", width=40, resume_dir=state, **ONE_BATCH)
    monkeypatch.undo()

    def no_embedding(*args):
        raise AssertionError("resumed from scratch")

    monkeypatch.setattr(procedures, "embed", no_embedding)
    resumed = dimcut.calibrate(
        llama, fmt="slicegpt", width=40, resume_dir=state, memory_budget=1024, **ONE_BATCH
    )
    assert resumed.activations_on_disk
    for name in reference.rotations:
        np.testing.assert_array_equal(reference.rotations[name], resumed.rotations[name])


def test_streamed_forward_is_timed(llama):
    timings = dimcut.calibration.streamed_forward(llama, nsamples=2, seqlen=32, progress=False)
    assert timings.tokens == 64 and timings.total >= timings.forward > 0
    assert timings.eigh == 0 and timings.covariance == 0


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_streamed_logits_equal_the_whole_model_logits(family, tmp_path):
    """The heal's teacher is streamed half a layer at a time: the logits it hands over, a
    block of token rows at a time, are the stock model's (every family; tied heads too)."""
    model_dir = save_tiny_model(family, tmp_path / family)
    tokens = token_batch(model_dir, n=3, length=20)
    expected = tiny_logits(model_dir, tokens).reshape(-1, tiny_config(family).vocab_size)
    got = torch.full_like(expected, float("nan"))

    def keep(rows, logits):
        got[rows] = logits

    timings = dimcut.calibration.streamed_logits(model_dir, tokens, keep, progress=False)
    assert timings.tokens == tokens.numel() and timings.forward > 0
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("weighting", dimcut.Weighting.values())
def test_every_plain_weighting_keeps_dense_logits_at_full_width(llama, weighting, tmp_path):
    out = tmp_path / "out"
    dimcut.slice_model(llama, 0.0, out, fmt="plain", weighting=weighting, **CALIB)
    tokens = token_batch(llama)
    reference = tiny_logits(llama, tokens)
    error = (tiny_logits(out, tokens) - reference).abs().max() / reference.abs().max()
    assert error < 1e-4, f"{weighting}: relative logit error {error:.2e}"
    config = json.loads((out / "config.json").read_text())
    assert config["dimcut"]["calibration"]["weighting"] == weighting


def test_weightings_give_different_rotations(llama):
    """rms and trace weigh the signals differently from the raw sum: the rotations differ."""
    rotations = {
        w: dimcut.calibrate(llama, fmt="plain", width=40, weighting=w, **CALIB).rotations["Q"]
        for w in dimcut.Weighting.values()
    }
    for w in ("rms", "trace"):
        overlap = np.abs(rotations["raw"][:, :40].T @ rotations[w][:, :40])
        assert np.linalg.svd(overlap, compute_uv=False).min() < 0.999, w


def test_bfloat16_blocks_calibrate_nearly_as_float32(trained_llama, tmp_path):
    """Only f(x) runs in bfloat16 (the residual stream and covariances stay float32/float64):
    the kept subspaces and the sliced model's perplexity barely move, and the record says so."""
    from dimcut.evaluation import perplexity

    docs, _ = calibration_documents(None)
    ppl, retained = {}, {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        dimcut.slice_model(trained_llama, 0.25, out, calib_dtype=dtype, **{**CALIB, "nsamples": 16})
        block = json.loads((out / "config.json").read_text())["dimcut"]["calibration"]
        assert block.get("block_dtype") == (None if dtype == "float32" else "bfloat16")
        retained[dtype] = np.array(list(block["retained_variance"].values()))
        model, tokenizer = dimcut.load(out)
        ppl[dtype] = perplexity(model, tokenizer, docs[-40:], seqlen=64)["ppl"]
    assert np.abs(retained["bfloat16"] - retained["float32"]).max() < 2e-3
    assert ppl["bfloat16"] == pytest.approx(ppl["float32"], rel=0.02), ppl
    assert ppl["bfloat16"] != ppl["float32"]  # it did run in another precision


def test_bfloat16_blocks_still_reproduce_dense_logits_at_full_width(llama, tmp_path):
    dimcut.slice_model(llama, 0.0, tmp_path / "out", calib_dtype="bfloat16", **CALIB)
    tokens = token_batch(llama)
    reference = tiny_logits(llama, tokens)
    error = (tiny_logits(tmp_path / "out", tokens) - reference).abs().max() / reference.abs().max()
    assert error < 1e-4  # the rotation is orthogonal whatever precision estimated it
