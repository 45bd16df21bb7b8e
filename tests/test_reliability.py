"""Reliability across commands: interrupted, killed and concurrent runs, locks, a full disk,
resumable calibration, and safe loading (nothing unpickled, no remote code).

Bad inputs and options of each command are tested beside it (test_slicing.py, test_verify.py, ...).
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from dimcut import _hooks
from dimcut.cli import main
from helpers import (
    REPO,
    child_environment,
    leftovers,
    refuse,
    run_cli,
    run_cli_subprocess,
    slice_args,
    tree_hash,
)

# -------------------------------------------------------------------- engine failure handling


def test_disk_full_is_reported_and_cleaned_up(pristine, tmp_path, capsys):
    """Injected: the write fails mid-way, as on a full disk."""
    rotations = tmp_path / "q.rotations"
    assert (
        run_cli(slice_args(pristine, tmp_path / "a", "--save-rotations", rotations), capsys)[0] == 0
    )
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
        code, output = run_cli(slice_args(pristine, tmp_path / "out"), capsys)
    assert code == 1 and "another dimcut run is writing this output" in output
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------ interrupted runs


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
    result = run_cli_subprocess(slice_args(pristine, out), hook=hook)
    assert result.returncode == status, result.stderr
    if message:
        assert message in result.stderr
        assert "Traceback" not in result.stderr
        assert leftovers(tmp_path) == []
    else:
        # SIGKILL: nothing can clean up, but the leftovers are recognisably named and inert.
        assert not out.exists()
        assert all(".out.dimcut-" in name for name in leftovers(tmp_path))
    code, output = run_cli(slice_args(pristine, out), capsys)
    assert code == 0, output
    assert leftovers(tmp_path) == ["out"], "the rerun removes what the dead run left"
    assert main(["verify", str(out)]) == 0


def test_killed_overwrite_keeps_the_previous_output(pristine, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli(slice_args(pristine, out), capsys)[0] == 0
    before = tree_hash(out)
    result = run_cli_subprocess(
        slice_args(pristine, out, "--overwrite", "--sparsity", "0.5"), hook="write:0.3:SIGKILL"
    )
    assert result.returncode == -signal.SIGKILL
    assert tree_hash(out) == before
    result = run_cli_subprocess(slice_args(pristine, out, "--overwrite"), hook="written:1:SIGKILL")
    assert result.returncode == -signal.SIGKILL
    assert main(["verify", str(out)]) == 0  # killed after the rename: complete


def test_concurrent_slices_of_one_output(pristine, tmp_path, capsys):
    rotations = tmp_path / "q.rotations"
    assert (
        run_cli(slice_args(pristine, tmp_path / "a", "--save-rotations", rotations), capsys)[0] == 0
    )
    out = tmp_path / "out"
    env = child_environment()
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
    result = run_cli_subprocess(slice_args(pristine, out), environment=stray)
    assert result.returncode == 0, result.stderr
    assert main(["verify", str(out)]) == 0
    # The same variable does fail a run started through the test entry point.
    result = run_cli_subprocess(slice_args(pristine, tmp_path / "faulty"), fail_writes_after=0)
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
    env = child_environment()
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
    assert run_cli(slice_args(pristine, reference), capsys)[0] == 0

    out = tmp_path / "out"
    result = run_cli_subprocess(slice_args(pristine, out, "--resume"), hook="calibration:1:SIGKILL")
    assert result.returncode == -signal.SIGKILL
    state = tmp_path / "out.dimcut-resume"
    assert (state / "state.json").is_file() and not out.exists()

    # Other options cannot resume this state.
    code, output = run_cli(slice_args(pristine, out, "--resume", "--seed", "7"), capsys)
    assert code == 1 and "differs from this run in seed, token_sha256" in output

    # The rerun starts after layer 1: the embedding (layer 0's input) is not computed again.
    from dimcut.calibration import procedures

    def no_embedding(*args):
        raise AssertionError("resumed from scratch")

    monkeypatch.setattr(procedures, "embed", no_embedding)
    code, output = run_cli(slice_args(pristine, out, "--resume"), capsys)
    assert code == 0, output
    assert tree_hash(out) == tree_hash(reference)  # every file, weights and manifest included
    assert not state.exists(), "the resume state is removed once the output is complete"


def test_sigint_with_resume_says_how_to_continue(pristine, tmp_path):
    result = run_cli_subprocess(
        slice_args(pristine, tmp_path / "out", "--resume"), hook="calibration:1:SIGINT"
    )
    assert result.returncode == 130
    assert "rerun the same command (with --resume)" in result.stderr


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


# ------------------------------------------------- `dimcut eval` task data (for test_evaluation)


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
