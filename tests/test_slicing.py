"""`dimcut slice` on broken inputs, bad options and bad output locations.

Every bad-input case runs the real command line and asserts: exit status 1, an error naming the
file/tensor/option, the input directory byte-identical afterwards, and nothing left beside the
output (no output, no temporary directory, no lock file).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import struct
import subprocess
import types
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import dimcut
from dimcut.architectures import load_architecture
from dimcut.cli import main
from helpers import SLICE, refuse, run_cli, slice_args, tree_hash
from tiny_models import save_tiny_model


@pytest.fixture
def model(pristine, tmp_path) -> Path:
    """A private copy of the tiny sharded Llama, to break."""
    return Path(shutil.copytree(pristine, tmp_path / "model"))


def shard_of(model_dir: Path, tensor: str) -> Path:
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    return model_dir / index["weight_map"][tensor]


def edit_header(path: Path, edit, *, append: bytes = b"") -> None:
    """Rewrite a safetensors header through `edit(header_dict)` (data bytes kept)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :] + append)


def tensors_by_offset(header: dict) -> list[str]:
    names = [k for k in header if k != "__metadata__"]
    return sorted(names, key=lambda k: header[k]["data_offsets"])


# ---------------------------------------------------------------- safetensors and index inputs

LAYER0 = "model.layers.0.mlp.down_proj.weight"


def _header_too_long(m: Path) -> str:
    shard = shard_of(m, LAYER0)
    raw = bytearray(shard.read_bytes())
    raw[:8] = struct.pack("<Q", len(raw) + 1000)
    shard.write_bytes(bytes(raw))
    return rf"{shard.name}.*header length \d+ is larger than the file"


def _header_over_limit(m: Path) -> str:
    shard = shard_of(m, LAYER0)
    raw = bytearray(shard.read_bytes())
    raw[:8] = struct.pack("<Q", 2**62)
    shard.write_bytes(bytes(raw))
    return rf"{shard.name}.*larger than the 100000000-byte limit"


def _header_not_json(m: Path) -> str:
    shard = shard_of(m, LAYER0)
    raw = bytearray(shard.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    raw[8 : 8 + n] = b"{not json" + b" " * (n - 9)
    shard.write_bytes(bytes(raw))
    return rf"{shard.name}.*header is not valid JSON"


def _overlap(m: Path) -> str:
    shard = shard_of(m, "model.layers.0.self_attn.q_proj.weight")
    names = []

    def edit(header):
        first, second = tensors_by_offset(header)[:2]
        names.extend([first, second])
        a, b = header[second]["data_offsets"]
        header[second]["data_offsets"] = [a - 4, b - 4]

    edit_header(shard, edit)
    return rf"{shard.name}.*tensors .*{re.escape(names[0])}.* and .*{re.escape(names[1])}.* overlap"


def _gap(m: Path) -> str:
    shard = shard_of(m, "model.layers.0.self_attn.q_proj.weight")
    names = []

    def edit(header):
        last = tensors_by_offset(header)[-1]
        names.append(last)
        a, b = header[last]["data_offsets"]
        header[last]["data_offsets"] = [a + 8, b + 8]

    edit_header(shard, edit, append=b"\0" * 8)
    return rf"{shard.name}.*gap of 8 bytes .*{re.escape(names[0])}"


def _length_disagrees(m: Path) -> str:
    shard = shard_of(m, LAYER0)

    def edit(header):
        header[LAYER0]["shape"][0] += 1

    edit_header(shard, edit)
    return rf"{shard.name}.*{re.escape(LAYER0)}.*hold \d+ bytes, but shape .* needs \d+"


def _truncated(m: Path) -> str:
    shard = shard_of(m, LAYER0)
    shard.write_bytes(shard.read_bytes()[:-100])
    return rf"{shard.name}.*truncated"


def _missing_shard(m: Path) -> str:
    shard = shard_of(m, LAYER0)
    shard.unlink()
    return rf"{shard.name}.*shard named by model.safetensors.index.json does not exist"


def _index_disagrees(m: Path) -> str:
    index_path = m / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    other = index["weight_map"]["model.embed_tokens.weight"]
    assert index["weight_map"][LAYER0] != other
    index["weight_map"][LAYER0] = other
    index_path.write_text(json.dumps(index))
    return rf"index.json.*{re.escape(LAYER0)}.*is not in its shard {other}"


def _config_missing(m: Path) -> str:
    (m / "config.json").unlink()
    return r"config.json: no config.json"


def _config_unparsable(m: Path) -> str:
    (m / "config.json").write_text('{"model_type": "llama",')
    return r"config.json: config.json is not valid JSON"


def _config_unsupported(m: Path) -> str:
    config = json.loads((m / "config.json").read_text())
    config["model_type"] = "gpt2"
    (m / "config.json").write_text(json.dumps(config))
    return r"config.json: model_type 'gpt2' is not supported"


def _config_sizes(m: Path) -> str:
    config = json.loads((m / "config.json").read_text())
    config["intermediate_size"] += 8
    (m / "config.json").write_text(json.dumps(config))
    return r"config.json disagrees with the weights: tensor 'model.layers.0.mlp.gate_proj.weight'"


def _config_layers(m: Path) -> str:
    config = json.loads((m / "config.json").read_text())
    config["num_hidden_layers"] = 1
    (m / "config.json").write_text(json.dumps(config))
    return r"num_hidden_layers=1, but the checkpoint has tensor 'model.layers.1"


def _nan_weight(m: Path) -> str:
    shard = shard_of(m, LAYER0)
    tensors = load_file(shard)
    tensors[LAYER0][3, 5] = np.nan
    save_file(tensors, shard, metadata={"format": "pt"})
    return rf"tensor '{re.escape(LAYER0)}' .*contains NaN or Inf"


def _inf_embedding(m: Path) -> str:
    shard = shard_of(m, "model.embed_tokens.weight")
    tensors = load_file(shard)
    tensors["model.embed_tokens.weight"][:, 0] = np.inf
    save_file(tensors, shard, metadata={"format": "pt"})
    return r"model.embed_tokens.weight.*NaN or Inf"


BROKEN_INPUTS = {
    "header_longer_than_file": _header_too_long,
    "header_over_limit": _header_over_limit,
    "header_not_json": _header_not_json,
    "offsets_overlap": _overlap,
    "offsets_gap": _gap,
    "byte_length_disagrees_with_shape": _length_disagrees,
    "truncated_shard": _truncated,
    "index_names_missing_shard": _missing_shard,
    "index_and_shard_disagree": _index_disagrees,
    "config_missing": _config_missing,
    "config_unparsable": _config_unparsable,
    "config_unsupported_model_type": _config_unsupported,
    "config_sizes_disagree": _config_sizes,
    "config_layer_count_disagrees": _config_layers,
    "nan_weight": _nan_weight,
    "inf_embedding": _inf_embedding,
}


@pytest.mark.parametrize("case", list(BROKEN_INPUTS))
def test_broken_input_is_refused(case, model, tmp_path, capsys):
    expected = BROKEN_INPUTS[case](model)
    refuse(slice_args(model, tmp_path / "out"), capsys, expected, inputs=(model,))


def test_non_finite_weights_are_refused_by_the_engine_too(model, pristine, tmp_path, capsys):
    """With saved rotations there is no calibration: the engine itself refuses to write NaN."""
    rotations = tmp_path / "q.rotations"
    assert (
        run_cli(slice_args(pristine, tmp_path / "first", "--save-rotations", rotations), capsys)[0]
        == 0
    )
    _nan_weight(model)
    refuse(
        slice_args(model, tmp_path / "out", "--rotations", rotations),
        capsys,
        rf"output tensor \"{re.escape(LAYER0)}\" would contain NaN or Inf",
        inputs=(model,),
    )


# ------------------------------------------------------------------------- options and paths


@pytest.mark.parametrize("sparsity", ["-0.1", "1", "1.5", "nan", "inf"])
def test_bad_sparsity_is_refused(sparsity, pristine, tmp_path, capsys):
    args = ["slice", pristine, "-o", tmp_path / "out", "--sparsity", sparsity, "-q"]
    refuse(args, capsys, r"sparsity must be in \[0, 1\)", inputs=(pristine,))


def test_sparsity_zero_is_the_rotation_only_check(pristine, tmp_path, capsys):
    args = ["slice", pristine, "-o", tmp_path / "out", "--sparsity", "0", *SLICE[2:]]
    code, output = run_cli(args, capsys)
    assert code == 0, output
    assert "64 -> 64" in output


@pytest.mark.parametrize(
    ("fmt", "sparsity", "grows"), [("slicegpt", "0.125", True), ("plain", "0.25", False)]
)
def test_an_output_larger_than_its_input_is_warned_about(
    pristine, tmp_path, capsys, fmt, sparsity, grows
):
    """A slicegpt cut's shortcut matrices outweigh a small cut: the command says so on stderr,
    with the options that make the output smaller; a cut that shrinks the model says nothing."""
    args = ["slice", pristine, "-o", tmp_path / "out", "--format", fmt, "--sparsity", sparsity]
    assert main([str(a) for a in [*args, *SLICE[2:]]]) == 0
    captured = capsys.readouterr()
    before = dimcut.count_parameters(pristine)["total"]
    after = dimcut.count_parameters(tmp_path / "out")
    assert (after["total"] > before) is grows
    if grows:
        shortcuts = after["total"] - after["without_shortcuts"]
        assert f"{after['total'] - before:,} more parameters than the input" in captured.err
        assert f"shortcut matrices hold {shortcuts:,}" in captured.err
        assert "--format plain" in captured.err and "--target-params" in captured.err
    else:
        assert "warning" not in captured.err and "fewer" in captured.out


def test_existing_output_is_refused_and_untouched(pristine, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    refuse_args = slice_args(pristine, out)
    before = tree_hash(out)
    code, output = run_cli(refuse_args, capsys)
    assert code == 1 and "exists" in output and str(out) in output
    assert tree_hash(out) == before


def test_output_equal_to_or_inside_input_is_refused(model, capsys):
    for out in (model, model / "sub"):
        refuse(
            ["slice", model, "-o", out, *SLICE],
            capsys,
            "must not be .*the input model directory",
            inputs=(model,),
        )


@contextlib.contextmanager
def read_only_dir(path: Path):
    """A directory nobody (not even root) can write in: a read-only tmpfs when we may mount,
    else permissions (which bind only non-root users)."""
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        try:
            yield path
        finally:
            path.chmod(0o755)
        return
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip("running as root without permission to mount a read-only file system")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_read_only_output_location_is_refused(pristine, tmp_path, capsys):
    with read_only_dir(tmp_path / "ro") as ro:
        refuse(
            slice_args(pristine, ro / "out"), capsys, rf"cannot write in {ro}", inputs=(pristine,)
        )


def test_rotations_for_a_different_model_are_refused(pristine, tmp_path, capsys):
    rotations = tmp_path / "q.rotations"
    assert (
        run_cli(slice_args(pristine, tmp_path / "a", "--save-rotations", rotations), capsys)[0] == 0
    )
    # Same family and sizes, other weights: the shapes agree, only the fingerprint differs.
    other = save_tiny_model("llama", tmp_path / "other", seed=1)
    refuse(
        slice_args(other, tmp_path / "out", "--rotations", rotations),
        capsys,
        r"rotations .*q.rotations: computed for a different model",
        inputs=(other,),
    )
    # Another size: the record says so.
    wide = save_tiny_model("llama", tmp_path / "wide", hidden_size=32)
    refuse(
        slice_args(wide, tmp_path / "out", "--rotations", rotations, "--round-to", "4"),
        capsys,
        r"made for hidden size 64 and 2 layers, but the model has 32 and 2",
        inputs=(wide,),
    )
    # Not a rotations file at all.
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"PK\x03\x04 not really a zip")
    refuse(slice_args(pristine, tmp_path / "out", "--rotations", junk), capsys, "junk.npz")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("", r"the calibration text is empty"), ("hi there", r"shorter than one sequence")],
)
def test_bad_calibration_text_is_refused(text, expected, pristine, tmp_path, capsys):
    calib = tmp_path / "calib.txt"
    calib.write_text(text)
    refuse(
        slice_args(pristine, tmp_path / "out", "--calib", calib, "--seqlen", "64"),
        capsys,
        expected,
        inputs=(pristine,),
    )


@pytest.mark.parametrize("fmt", ["slicegpt", "plain"])
@pytest.mark.parametrize("target", [0.8, 0.95, 1.05, 100_000])
def test_a_parameter_budget_is_met_by_the_written_count(pristine, tmp_path, capsys, fmt, target):
    """The width is the largest whose output fits the budget; the count the summary reports is
    the written checkpoint's, and one width step more would not fit."""
    from dimcut.slicing import budget_width, parameter_budget

    dense = dimcut.count_parameters(pristine)["total"]
    budget = parameter_budget(target, dense)
    args = ["slice", pristine, "-o", tmp_path / "out", "--format", fmt, "--target-params"]
    code, output = run_cli([*args, str(target), *SLICE[2:]], capsys)
    assert code == 0, output
    written = dimcut.count_parameters(tmp_path / "out")
    assert written["total"] <= budget
    arch = load_architecture(pristine)
    width, following = budget_width(arch, fmt, budget, 8, False)
    assert written["hidden_size"] == width
    assert following > budget if following is not None else width == 64  # full width fits
    assert f"{written['total']:,}" in output and f"{budget:,} parameters" in output
    config = json.loads((tmp_path / "out" / "config.json").read_text())["dimcut"]
    assert config["target_params"] == budget and config["effective_sparsity"] == 1 - width / 64


def test_plain_budgets_only_consider_widths_the_stock_config_accepts(tiny_llama_config):
    """With 9 heads only multiples of 9 are stock Llama widths (SmolLM2: multiples of 72)."""
    from dimcut.architectures import describe
    from dimcut.plan import plan_widths
    from dimcut.slicing import budget_width

    config = {**tiny_llama_config, "hidden_size": 144, "num_attention_heads": 9}
    config.update(num_key_value_heads=3, head_dim=16)
    arch = describe(config)
    assert budget_width(arch, "plain", 10**9, 8, False) == (144, None)
    full = dimcut.formats.planned_parameters(arch, "plain", plan_widths(arch, "plain", 144, False))
    assert budget_width(arch, "plain", full["total"] - 1, 8, False) == (72, full["total"])


def test_an_unreachable_budget_is_refused(pristine, tmp_path, capsys):
    refuse(
        ["slice", pristine, "-o", tmp_path / "out", "--target-params", "1000", *SLICE[2:]],
        capsys,
        "below the smallest slicegpt output",
        inputs=(pristine,),
    )
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["slice", pristine, "-o", tmp_path / "o", "--target-params", "x"], capsys)
    assert exit_info.value.code == 2 and "--target-params" in capsys.readouterr().err


def test_a_widths_file_round_trips_through_the_config_and_loads(pristine, tmp_path, capsys):
    schedule = [48, 56, 40, 64, 32]  # embedding, then (mid, out) of each of the 2 layers
    file = tmp_path / "widths.json"
    file.write_text(json.dumps(schedule))
    code, output = run_cli(
        ["slice", pristine, "-o", tmp_path / "out", "--widths", file, *SLICE[2:]], capsys
    )
    assert code == 0, output
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["embedding_width"] == 48
    assert config["mid_widths"] == [56, 64] and config["out_widths"] == [40, 32]
    from dimcut.verify import verify

    assert verify(tmp_path / "out").ok
    model, tokenizer = dimcut.load(tmp_path / "out")
    ids = tokenizer("Paris is the capital of France.", return_tensors="pt").input_ids
    assert model(ids).logits.isfinite().all()
    counts = dimcut.count_parameters(tmp_path / "out")
    assert config["dimcut"]["target_params"] is None and "budget" not in output
    # The recorded width is the uniform one with the same parameter budget.
    arch = load_architecture(pristine)
    from dimcut.slicing import budget_width

    assert counts["hidden_size"] == budget_width(arch, "slicegpt", counts["total"], 8, False)[0]


@pytest.mark.parametrize(
    ("schedule", "extra", "match"),
    [
        ([48, 56], [], "2·layers \\+ 1 = 5"),
        ([48, 56, 40, 64, 99], [], "integers in \\[1, 64\\]"),
        ([48, 56, 40, 64, 32], ["--sparsity", "0.25"], "give neither"),
        ([48, 56, 40, 64, 32], ["--format", "plain"], "need the slicegpt format"),
    ],
)
def test_bad_widths_files_are_refused(pristine, tmp_path, capsys, schedule, extra, match):
    file = tmp_path / "widths.json"
    file.write_text(json.dumps(schedule))
    args = ["slice", pristine, "-o", tmp_path / "out", "--widths", file, *SLICE[2:], *extra]
    refuse(args, capsys, match, inputs=(pristine,))


@pytest.mark.parametrize("kind", ["variance", "sensitivity"])
def test_measured_widths_fit_the_uniform_parameter_count(trained_llama, tmp_path, kind):
    import functools

    from dimcut.plan import SENSITIVITY_FLOOR, retained_widths, sensitivity_candidates
    from dimcut.slicing import fitted_schedule

    options = {"nsamples": 8, "seqlen": 64, "progress": False}
    uniform = dimcut.slice_model(trained_llama, 0.5, tmp_path / "uniform", round_to=4, **options)
    varied = dimcut.slice_model(
        trained_llama, 0.5, tmp_path / kind, widths=kind, round_to=4, **options
    )
    assert varied.parameters["total"] <= uniform.parameters["total"]
    config = json.loads((tmp_path / kind / "config.json").read_text())
    widths = [config["embedding_width"], *config["mid_widths"], *config["out_widths"][:-1]]
    assert len(set(widths)) > 1 and config["dimcut"]["widths"] == kind
    assert varied.hidden_size == uniform.hidden_size == 32
    # The next step of the schedule would not fit: it is as wide as it can be.
    arch = load_architecture(trained_llama)
    if kind == "variance":
        spectra = dimcut.calibration.signal_spectra(trained_llama, **options)
        candidate = functools.partial(retained_widths, spectra, arch, round_to=4, slice_head=False)
    else:
        assert min(widths) >= int(SENSITIVITY_FLOOR * 32) // 4 * 4  # rounded to --round-to
        found = dimcut.calibration.signal_sensitivities(trained_llama, 32, **options)
        candidate = sensitivity_candidates(found.spectra, found.sensitivity, arch, 32, 4, False)
    schedule = fitted_schedule(arch, uniform.parameters["total"], kind, candidate)
    assert dimcut.formats.planned_parameters(arch, "slicegpt", schedule) == {
        k: varied.parameters[k] for k in ("total", "shortcuts", "without_shortcuts")
    }


@pytest.mark.parametrize("blocks", ["whole", "blocked"])
@pytest.mark.parametrize("tied", [False, True])
def test_streamed_sensitivities_match_gradients_taken_directly(
    trained_llama, tmp_path, tied, blocks, monkeypatch
):
    """The oracle: ½ mean over tokens of (g · δ)² at every residual point (the embedding output,
    after each attention and each layer), from the stock model's own residual stream and
    autograd, whole in memory; the streamed backward holds one layer at a time, and the head
    one block of vocabulary rows ("blocked": 100 of the 384, the tokens in chunks of 30)."""
    import torch

    from dimcut.calibration import sensitivity

    if blocks == "blocked":
        monkeypatch.setattr(sensitivity, "HEAD_BLOCK_BYTES", 100 * 4 * 64)
        monkeypatch.setattr(sensitivity, "HEAD_LOGITS", 30 * 100)

    from dimcut.calibration import sampled_text
    from dimcut.calibration.procedures import fisher_sensitivities

    model_dir = trained_llama
    if tied:  # the head is the embedding matrix: no lm_head tensor
        model_dir = Path(shutil.copytree(trained_llama, tmp_path / "tied"))
        config = json.loads((model_dir / "config.json").read_text())
        (model_dir / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
        for shard in model_dir.glob("*.safetensors"):
            tensors = load_file(shard)
            tensors.pop("lm_head.weight", None)
            save_file(tensors, shard, metadata={"format": "pt"})
        index = model_dir / "model.safetensors.index.json"
        if index.is_file():
            mapping = json.loads(index.read_text())
            mapping["weight_map"].pop("lm_head.weight", None)
            index.write_text(json.dumps(mapping))
    model, tokenizer = dimcut.load(model_dir)
    options = {"nsamples": 2, "seqlen": 48, "seed": 3}
    tokens, _ = sampled_text(None, tokenizer, options["nsamples"], options["seqlen"], 3)
    width, full, layers = 24, model.config.hidden_size, model.config.num_hidden_layers
    generator = torch.Generator().manual_seed(0)
    names = ["Q.embedding", *(f"Q.{i}.{p}" for i in range(layers) for p in ("mid", "out"))]
    axes = {}
    for name in names:
        q, _ = torch.linalg.qr(torch.randn(full, full, generator=generator))
        axes[name] = q[:, :width].contiguous()
    # Each point is the input of the norm that reads it next.
    readers = [
        norm
        for layer in model.model.layers
        for norm in (layer.input_layernorm, layer.post_attention_layernorm)
    ]
    readers.append(model.model.norm)
    expected = dict.fromkeys(names, 0.0)
    for sequence in tokens:
        seen: list[torch.Tensor] = []
        hooks = [r.register_forward_pre_hook(lambda _m, a, s=seen: s.append(a[0])) for r in readers]
        batch = sequence[None]
        loss = model(batch, labels=batch).loss * (batch.shape[1] - 1)
        for hook in hooks:
            hook.remove()
        gradients = torch.autograd.grad(loss, seen)
        for name, x, g in zip(names, [x.detach() for x in seen], gradients, strict=True):
            delta = x - (x @ axes[name]) @ axes[name].T
            expected[name] += 0.5 * float(((g * delta).sum(-1) ** 2).sum())
    count = tokens.shape[0] * (tokens.shape[1] - 1)
    kept = {name: a.numpy() for name, a in axes.items()}
    measured, timings = fisher_sensitivities(model_dir, kept, **options, progress=False)
    assert set(measured) == set(names) and timings.backward > 0
    for name, total in expected.items():
        assert measured[name] == pytest.approx(total / count, rel=1e-5), name


def test_direction_losses_spread_each_points_sensitivity():
    from dimcut.plan import SENSITIVITY_SMOOTHING, direction_losses, loss_widths

    arch = types.SimpleNamespace(num_layers=3, hidden_size=8)
    names = ["Q.embedding", *(f"Q.{i}.{p}" for i in range(3) for p in ("mid", "out"))]
    rng = np.random.default_rng(0)
    spectra = {n: np.sort(rng.random(8))[::-1] for n in names}
    sensitivity = {n: float(i + 1) for i, n in enumerate(names)}
    losses = direction_losses(spectra, sensitivity, arch, 5)
    for index, name in enumerate(names):
        around = names[max(0, index - SENSITIVITY_SMOOTHING) : index + SENSITIVITY_SMOOTHING + 1]
        # What a uniform cut to 5 deletes there costs the point's (smoothed) sensitivity.
        assert losses[name][5:].sum() == pytest.approx(np.mean([sensitivity[n] for n in around]))
    low = loss_widths(losses, arch, 1e9, 4, 2, False)
    high = loss_widths(losses, arch, 0.0, 4, 2, False)
    assert low.as_list()[:-1] == [4] * 6 and high.as_list() == [8] * 7  # the floor; everything
