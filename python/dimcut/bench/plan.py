"""The slicing suite's input: a synthetic checkpoint in `<workdir>/src` and the `plain`-format
plan for it (`ops.json`, `arrays/*.npy`): every matrix rotated by one random orthogonal Q, the
heaviest plan."""

from __future__ import annotations

import json
from pathlib import Path

from dimcut.bench.checkpoints import Shape, ensure_checkpoint

PLAN_META = "bench-meta.json"


def load_arrays(workdir: Path) -> dict:
    """The plan's rotation arrays (`arrays/*.npy`), by name."""
    import numpy as np

    return {
        p.stem: np.load(p, allow_pickle=False) for p in sorted((workdir / "arrays").glob("*.npy"))
    }


def build_plan(workdir: Path, shape: Shape) -> dict:
    """Writes the plan for `<workdir>/src`; returns its op count, flops and GEMM shapes."""
    import numpy as np

    from dimcut.architectures import load_architecture
    from dimcut.engine import inspect_checkpoint
    from dimcut.plan import model_ops, plan_widths, rotation_arrays

    src = workdir / "src"
    arch = load_architecture(src)
    tensors = inspect_checkpoint(src)
    widths = plan_widths(arch, "plain", shape.kept, True)
    q, _ = np.linalg.qr(np.random.default_rng(1).standard_normal((shape.hidden, shape.hidden)))
    names, arrays = rotation_arrays("plain", {"Q": q}, widths, arch)
    ops = [op.to_dict() for op in model_ops(arch, "plain", names, widths, tensors)]
    array_dir = workdir / "arrays"
    array_dir.mkdir(exist_ok=True)
    for name, array in arrays.items():
        np.save(array_dir / f"{name}.npy", array)
    (workdir / "ops.json").write_text(json.dumps(ops))
    flops, gemms = 0.0, {}
    for op in ops:
        if op.get("source") is None:
            continue
        dims = tensors[op["source"]][1]
        if len(dims) != 2:
            continue
        rows, cols = dims
        if op.get("in_rotation"):
            key = (rows, cols, op["in_keep"])  # W·Q[:, :k]
        elif op.get("out_rotation"):
            key = (op["out_keep"], rows, cols)  # Q[:, :k]ᵀ·W
        else:
            continue
        gemms[key] = gemms.get(key, 0) + 1
        flops += 2.0 * key[0] * key[1] * key[2]
    return {
        "ops": len(ops),
        "flops": flops,
        "gemms": [[m, k, n, count] for (m, k, n), count in sorted(gemms.items())],
    }


def prepare(workdir: Path, shape: Shape, shard_size: int) -> dict:
    """Builds (or reuses, when `workdir` already holds the same one) checkpoint and plan;
    returns the checkpoint's record with the plan's facts, also kept in `<workdir>/PLAN_META`."""
    checkpoint = ensure_checkpoint(workdir / "src", shape, shard_size)
    meta_path = workdir / PLAN_META
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("checkpoint") == checkpoint:
            return meta
    meta = {**checkpoint, "checkpoint": checkpoint, **build_plan(workdir, shape)}
    meta_path.write_text(json.dumps(meta, indent=2))
    return meta
