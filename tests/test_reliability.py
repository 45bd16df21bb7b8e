"""Reliability acceptance tests: hostile and broken inputs, interrupted and concurrent runs, disk
full, verifiable outputs, safe loading.

Every bad-input case runs the real command line and asserts: exit status 1, an error naming the
file/tensor/option, the input directory byte-identical afterwards, and nothing left beside the
output (no output, no temporary directory, no lock file).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import dimcut
from dimcut import _hooks
from dimcut.cli import main
from tiny_models import save_tiny_model

REPO = Path(__file__).resolve().parents[1]
# Where the imported dimcut lives (the source tree in a develop install, site-packages
# otherwise): child processes must import the same, built package.
PACKAGE_ROOT = Path(dimcut.__file__).resolve().parent.parent
SLICE = ["--sparsity", "0.25", "--nsamples", "2", "--seqlen", "16", "-q"]


# ----------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A sharded 2-layer tiny Llama with a tokenizer; never modified (tests copy it)."""
    return save_tiny_model("llama", tmp_path_factory.mktemp("pristine") / "model")


@pytest.fixture
def model(pristine, tmp_path) -> Path:
    """A private copy of the tiny model, to break."""
    return Path(shutil.copytree(pristine, tmp_path / "model"))


def tree_hash(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def run(args: list[str], capsys) -> tuple[int, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def leftovers(parent: Path, name: str = "out") -> list[str]:
    """Anything a run left beside (or as) its output `name`."""
    return sorted(
        p.name
        for p in parent.iterdir()
        if p.name == name or p.name.startswith(f".{name}.") or p.name.endswith(".dimcut-resume")
    )


def refuse(args: list[str], capsys, *expected: str, inputs: tuple[Path, ...] = ()) -> str:
    """Run the CLI and assert the refusal contract; returns the message."""
    before = {d: tree_hash(d) for d in inputs}
    code, output = run(args, capsys)
    assert code == 1, output
    for text in expected:
        assert re.search(text, output), f"{text!r} not in {output!r}"
    for d in inputs:
        assert tree_hash(d) == before[d], f"{d} was modified"
    out = Path(args[args.index("-o") + 1]) if "-o" in args else None
    if out is not None and out not in inputs:
        assert leftovers(out.parent, out.name) == [], "a failed run left files behind"
    return output


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


def slice_args(model_dir: Path, out: Path, *extra) -> list:
    return ["slice", model_dir, "-o", out, *SLICE, *extra]


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
    rotations = tmp_path / "q.npz"
    assert (
        run(slice_args(pristine, tmp_path / "first", "--save-rotations", rotations), capsys)[0] == 0
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
    refuse(args, capsys, r"--sparsity must be in \[0, 1\)", inputs=(pristine,))


def test_sparsity_zero_is_the_rotation_only_check(pristine, tmp_path, capsys):
    args = ["slice", pristine, "-o", tmp_path / "out", "--sparsity", "0", *SLICE[2:]]
    code, output = run(args, capsys)
    assert code == 0, output
    assert "64 -> 64" in output


def test_existing_output_is_refused_and_untouched(pristine, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    refuse_args = slice_args(pristine, out)
    before = tree_hash(out)
    code, output = run(refuse_args, capsys)
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
    rotations = tmp_path / "q.npz"
    assert run(slice_args(pristine, tmp_path / "a", "--save-rotations", rotations), capsys)[0] == 0
    # Same family and sizes, other weights: the shapes agree, only the fingerprint differs.
    other = save_tiny_model("llama", tmp_path / "other", seed=1)
    refuse(
        slice_args(other, tmp_path / "out", "--rotations", rotations),
        capsys,
        r"--rotations .*q.npz: computed for a different model",
        inputs=(other,),
    )
    # Another size: the record says so.
    from transformers import AutoModelForCausalLM

    from tiny_models import tiny_config

    wide = tmp_path / "wide"
    AutoModelForCausalLM.from_config(tiny_config("llama", hidden_size=32)).save_pretrained(wide)
    shutil.copy(pristine / "tokenizer.json", wide)
    shutil.copy(pristine / "tokenizer_config.json", wide)
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


def test_task_data_with_the_wrong_schema_is_refused(pristine, tmp_path, capsys):
    data = tmp_path / "tasks"
    data.mkdir()
    (data / "arc_easy.jsonl").write_text(json.dumps({"question": "q?", "answer": "a"}) + "\n")
    results = tmp_path / "results.json"
    args = ["eval", pristine, "--ppl", "none", "--tasks", "arc_easy", "--task-data", data]
    refuse(
        [*args, "-o", results],
        capsys,
        r"task arc_easy: .*arc_easy.jsonl lacks field 'id'",
        inputs=(pristine, data),
    )
    assert not results.exists()


def _record(label, s, fingerprint):
    return {
        "schema": "dimcut.results/1",
        "model": {
            "path": f"/m/{fingerprint}-{s}",
            "label": label,
            "fingerprint": fingerprint,
            "effective_sparsity": s,
            "original_hidden_size": 64,
        },
        "perplexity": {"source": "wiki", "seqlen": 64, "windows": 2, "ppl": 10 + 10 * s},
        "tasks": {},
    }


def test_results_of_different_models_are_not_mixed(tmp_path, capsys):
    runs = tmp_path / "runs"
    runs.mkdir()
    for i, (label, s, fp) in enumerate([(None, 0.0, "a"), (None, 0.2, "a"), (None, 0.0, "b")]):
        (runs / f"r{i}.json").write_text(json.dumps(_record(label, s, fp)))
    refuse(["fit", runs], capsys, r"records without model.label", inputs=(runs,))
    for i, (label, s, fp) in enumerate([("m", 0.0, "a"), ("m", 0.2, "a"), ("m", 0.0, "b")]):
        (runs / f"r{i}.json").write_text(json.dumps(_record(label, s, fp)))
    refuse(["fit", runs], capsys, r"dense records of different models", inputs=(runs,))


# -------------------------------------------------------------------- engine failure handling


def test_a_rust_panic_is_a_python_exception():
    from dimcut import DimcutError, _core

    with pytest.raises(DimcutError, match="internal engine error: deliberate test panic"):
        _core._panic_for_test()


def test_disk_full_is_reported_and_cleaned_up(pristine, tmp_path, capsys):
    """Injected: the write fails mid-way, as on a full disk."""
    rotations = tmp_path / "q.npz"
    assert run(slice_args(pristine, tmp_path / "a", "--save-rotations", rotations), capsys)[0] == 0
    _hooks.arm({_hooks.WRITE_FAULT_ENV: "50000"})
    try:
        refuse(
            slice_args(pristine, tmp_path / "out", "--rotations", rotations),
            capsys,
            r"model.safetensors: No space left on device",
            inputs=(pristine,),
        )
    finally:
        _hooks.arm({})


def test_real_full_file_system(pristine, tmp_path, capsys):
    """A 256 KiB tmpfs (the output needs ~470 KiB): space is reserved before writing."""
    small = tmp_path / "small"
    small.mkdir()
    if (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(small)],
            capture_output=True,
            check=False,
        ).returncode
        != 0
    ):
        pytest.skip("cannot mount a small tmpfs here")
    try:
        refuse(
            slice_args(pristine, small / "out"),
            capsys,
            r"No space left on device",
            inputs=(pristine,),
        )
        assert list(small.iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_a_locked_output_is_refused(pristine, tmp_path, capsys):
    import fcntl

    with open(tmp_path / ".out.dimcut-lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        code, output = run(slice_args(pristine, tmp_path / "out"), capsys)
    assert code == 1 and "another dimcut run is writing this output" in output
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------ interrupted runs


def cli(
    args: list,
    *,
    hook: str | None = None,
    fail_writes_after: int | None = None,
    environment: dict[str, str] | None = None,
    **kwargs,
) -> subprocess.CompletedProcess:
    """The command line in a child process. A `hook` (a DIMCUT_TEST_SIGNAL value) or a write
    fault runs it through the test entry point that arms them; `environment` adds variables."""
    env = {**os.environ, "PYTHONPATH": str(PACKAGE_ROOT), "HF_HUB_OFFLINE": "1"}
    for name in (_hooks.SIGNAL_ENV, _hooks.WRITE_FAULT_ENV):
        env.pop(name, None)
    env.update(environment or {})
    entry = "dimcut.cli"
    if hook:
        env[_hooks.SIGNAL_ENV] = hook
        entry = "dimcut._hooks"
    if fail_writes_after is not None:
        env[_hooks.WRITE_FAULT_ENV] = str(fail_writes_after)
        entry = "dimcut._hooks"
    return subprocess.run(
        [sys.executable, "-m", entry, *map(str, args)],
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        **kwargs,
    )


@pytest.mark.parametrize(
    ("hook", "status", "message"),
    [
        ("calibration:1:SIGINT", 130, "interrupted; no partial output"),
        ("write:0.5:SIGTERM", 143, "terminated; no partial output"),
        ("write:0.5:SIGKILL", -signal.SIGKILL, None),
    ],
)
def test_killed_slice_leaves_no_output_and_a_rerun_succeeds(
    hook, status, message, pristine, tmp_path, capsys
):
    out = tmp_path / "out"
    result = cli(slice_args(pristine, out), hook=hook)
    assert result.returncode == status, result.stderr
    if message:
        assert message in result.stderr
        assert "Traceback" not in result.stderr
        assert leftovers(tmp_path) == []
    else:
        # SIGKILL: nothing can clean up, but the leftovers are recognisably named and inert.
        assert not out.exists()
        assert all(".out.dimcut-" in name for name in leftovers(tmp_path))
    code, output = run(slice_args(pristine, out), capsys)
    assert code == 0, output
    assert leftovers(tmp_path) == ["out"], "the rerun removes what the dead run left"
    assert main(["verify", str(out)]) == 0


def test_killed_overwrite_keeps_the_previous_output(pristine, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(slice_args(pristine, out), capsys)[0] == 0
    before = tree_hash(out)
    result = cli(
        slice_args(pristine, out, "--overwrite", "--sparsity", "0.5"), hook="write:0.3:SIGKILL"
    )
    assert result.returncode == -signal.SIGKILL
    assert tree_hash(out) == before
    result = cli(slice_args(pristine, out, "--overwrite"), hook="written:1:SIGKILL")
    assert result.returncode == -signal.SIGKILL
    assert main(["verify", str(out)]) == 0  # killed after the rename: complete


def test_concurrent_slices_of_one_output(pristine, tmp_path, capsys):
    rotations = tmp_path / "q.npz"
    assert run(slice_args(pristine, tmp_path / "a", "--save-rotations", rotations), capsys)[0] == 0
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(PACKAGE_ROOT), "HF_HUB_OFFLINE": "1"}
    args = [
        sys.executable,
        "-m",
        "dimcut.cli",
        *map(str, slice_args(pristine, out)),
        "--rotations",
        str(rotations),
    ]
    runs = [subprocess.Popen(args, env=env, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in runs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 1], results
    loser = next(err for code, err in results if code == 1)
    assert "exists" in loser or "another dimcut run" in loser
    assert leftovers(tmp_path) == ["out"]
    assert main(["verify", str(out)]) == 0


def test_the_plain_command_ignores_the_test_hook_variables(pristine, tmp_path):
    stray = {_hooks.SIGNAL_ENV: "write:0:SIGKILL", _hooks.WRITE_FAULT_ENV: "0"}
    out = tmp_path / "out"
    result = cli(slice_args(pristine, out), environment=stray)
    assert result.returncode == 0, result.stderr
    assert main(["verify", str(out)]) == 0
    # The same variable does fail a run started through the test entry point.
    result = cli(slice_args(pristine, tmp_path / "faulty"), fail_writes_after=0)
    assert result.returncode == 1 and "No space left on device" in result.stderr


# Rotated tensors in memory, a column at a time: minutes of work unless a signal stops it.
LONG_REWRITE_TENSORS = """
import sys, time
import numpy as np
from dimcut.engine import TensorOp, rewrite_tensors

q = np.linalg.qr(np.random.default_rng(0).standard_normal((1024, 1024)))[0]
ops = [
    TensorOp(name=f"w{i}", source="w", in_rotation="q", out_rotation="q", out_keep=8)
    for i in range(10)
]
print("started", flush=True)
try:
    rewrite_tensors(sys.argv[1], ops, {"q": q}, memory_budget=1 << 16, threads=1)
except KeyboardInterrupt:
    print("interrupted", flush=True)
    sys.exit(130)
print("finished", flush=True)
"""


def test_ctrl_c_interrupts_rewrite_tensors(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    w = np.random.default_rng(1).standard_normal((1024, 1024)).astype(np.float32)
    save_file({"w": w}, str(src / "model.safetensors"))
    env = {**os.environ, "PYTHONPATH": str(PACKAGE_ROOT)}
    command = [sys.executable, "-c", LONG_REWRITE_TENSORS, str(src)]
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True) as child:
        try:
            assert child.stdout.readline() == "started\n"
            time.sleep(1)
            child.send_signal(signal.SIGINT)
            # Stopped at the next tile, not after the whole plan.
            assert child.wait(timeout=15) == 130
            assert child.stdout.read() == "interrupted\n"
        finally:
            child.kill()


# ------------------------------------------------------------------------------------ resume


def test_resume_continues_after_the_last_layer_bit_identically(
    pristine, tmp_path, capsys, monkeypatch
):
    reference = tmp_path / "reference"
    assert run(slice_args(pristine, reference), capsys)[0] == 0

    out = tmp_path / "out"
    result = cli(slice_args(pristine, out, "--resume"), hook="calibration:1:SIGKILL")
    assert result.returncode == -signal.SIGKILL
    state = tmp_path / "out.dimcut-resume"
    assert (state / "state.npz").is_file() and not out.exists()

    # Other options cannot resume this state.
    code, output = run(slice_args(pristine, out, "--resume", "--seed", "7"), capsys)
    assert code == 1 and "differs from this run in seed, token_sha256" in output

    # The rerun starts after layer 1: the embedding (layer 0's input) is not computed again.
    from dimcut import calibration

    def no_embedding(*args):
        raise AssertionError("resumed from scratch")

    monkeypatch.setattr(calibration, "_embed", no_embedding)
    code, output = run(slice_args(pristine, out, "--resume"), capsys)
    assert code == 0, output
    assert tree_hash(out) == tree_hash(reference)  # every file, weights and manifest included
    assert not state.exists(), "the resume state is removed once the output is complete"


def test_sigint_with_resume_says_how_to_continue(pristine, tmp_path):
    result = cli(slice_args(pristine, tmp_path / "out", "--resume"), hook="calibration:1:SIGINT")
    assert result.returncode == 130
    assert "rerun the same command (with --resume)" in result.stderr


# ------------------------------------------------------------------------------------ verify


def test_verify_catches_damaged_outputs(pristine, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(slice_args(pristine, out), capsys)[0] == 0
    code, output = run(["verify", out], capsys)
    assert code == 0 and "PASS" in output and "SHA-256 match" in output

    data = bytearray((out / "model.safetensors").read_bytes())
    data[-3] ^= 0x40  # one flipped bit in the last tensor: headers still parse
    (out / "model.safetensors").write_bytes(bytes(data))
    code, output = run(["verify", out], capsys)
    assert code == 1 and "model.safetensors: SHA-256" in output

    data[-3] ^= 0x40
    (out / "model.safetensors").write_bytes(bytes(data))
    config = json.loads((out / "config.json").read_text())
    config["mid_widths"][0] -= 8
    (out / "config.json").write_text(json.dumps(config))
    code, output = run(["verify", out, "--allow-missing-manifest"], capsys)
    assert code == 1 and "FAIL  shapes" in output and "config expects" in output

    (out / "model.safetensors").write_bytes(bytes(data[:-10]))
    code, output = run(["verify", out], capsys)
    assert code == 1 and "FAIL  headers" in output and "truncated" in output


@pytest.mark.parametrize("stray", ["tf_model.h5", "flax_model.msgpack", "pytorch_model.bin"])
def test_verify_refuses_a_weight_file_the_manifest_does_not_list(stray, pristine, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(slice_args(pristine, out), capsys)[0] == 0
    (out / stray).write_bytes(b"unsliced weights")
    code, output = run(["verify", out], capsys)
    assert code == 1 and f"{stray}: weight file not in the manifest" in output


# ----------------------------------------------------------------------------- safe loading


def test_nothing_is_unpickled_and_remote_code_stays_off():
    sources = {p.name: p.read_text() for p in (REPO / "python" / "dimcut").glob("*.py")}
    for name, text in sources.items():
        assert "torch.load(" not in text, name
        assert not re.search(r"import pickle|pickle\.loads?\(|allow_pickle=True", text), name
        assert "trust_remote_code=True" not in text.replace(
            "`from_pretrained(out, trust_remote_code=True)`", ""
        ), name
        for call in re.findall(r"np\.load\([^)]*\)", text):
            assert "allow_pickle=False" in call, (name, call)


def test_pickled_weights_are_never_loaded(pristine, tmp_path):
    """A directory with only a pytorch_model.bin (a pickle) is refused, not unpickled."""
    from dimcut import formats

    evil = tmp_path / "evil"
    evil.mkdir()
    shutil.copy(pristine / "config.json", evil)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.write_text, (marker, "x"))

    import pickle

    (evil / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(OSError):
        formats.load(evil)
    assert not marker.exists()
