"""Shared test helpers: the command line in-process and in a child process, tree hashes, the
refusal contract every bad-input test asserts, and checkpoint listings without files."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import dimcut
from dimcut import _hooks
from dimcut.architectures import Architecture, expected_shapes
from dimcut.cli import main

REPO = Path(__file__).resolve().parents[1]
# Where the imported dimcut lives (the source tree in a develop install, site-packages
# otherwise): child processes must import the same, built package.
PACKAGE_ROOT = Path(dimcut.__file__).resolve().parent.parent
# A quick `dimcut slice` of the tiny models: few, short calibration sequences.
SLICE = ["--sparsity", "0.25", "--nsamples", "2", "--seqlen", "16", "-q"]


def tree_hash(directory: Path) -> dict[str, str]:
    """SHA-256 of every file under `directory`, by relative path."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def checkpoint_tensors(arch: Architecture) -> dict[str, tuple[str, list[int], str]]:
    """What `inspect_checkpoint` reports for a float32 checkpoint holding exactly the tensors
    `arch` implies (no file needed)."""
    return {
        name: ("F32", list(shape), "model.safetensors")
        for name, shape in expected_shapes(arch).items()
    }


def slice_args(model_dir: Path, out: Path, *extra) -> list:
    return ["slice", model_dir, "-o", out, *SLICE, *extra]


def run_cli(args: list, capsys) -> tuple[int, str]:
    """The command line in this process: exit status and everything it printed."""
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def child_environment() -> dict[str, str]:
    """The environment of a child process that imports this dimcut, offline."""
    return {**os.environ, "PYTHONPATH": str(PACKAGE_ROOT), "HF_HUB_OFFLINE": "1"}


def run_cli_subprocess(
    args: list,
    *,
    hook: str | None = None,
    fail_writes_after: int | None = None,
    environment: dict[str, str] | None = None,
    **kwargs,
) -> subprocess.CompletedProcess:
    """The command line in a child process. A `hook` (a DIMCUT_TEST_SIGNAL value) or a write
    fault runs it through the test entry point that arms them; `environment` adds variables."""
    env = child_environment()
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


def leftovers(parent: Path, name: str = "out") -> list[str]:
    """Anything a run left beside (or as) its output `name`."""
    return sorted(
        p.name
        for p in parent.iterdir()
        if p.name == name
        or p.name.startswith(f".{name}.")
        or p.name.endswith((".dimcut-resume", ".dimcut-heal"))
    )


def refuse(args: list, capsys, *expected: str, inputs: tuple[Path, ...] = ()) -> str:
    """Run the CLI and assert the refusal contract: exit status 1, every `expected` pattern in
    the output, the `inputs` byte-identical, nothing left beside `-o`. Returns the message."""
    before = {d: tree_hash(d) for d in inputs}
    code, output = run_cli(args, capsys)
    assert code == 1, output
    for text in expected:
        assert re.search(text, output), f"{text!r} not in {output!r}"
    for d in inputs:
        assert tree_hash(d) == before[d], f"{d} was modified"
    out = Path(args[args.index("-o") + 1]) if "-o" in args else None
    if out is not None and out not in inputs:
        assert leftovers(out.parent, out.name) == [], "a failed run left files behind"
    return output
