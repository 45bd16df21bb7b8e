"""The PyTorch baseline of the slicing suite: the plan applied the straightforward way.

`safetensors.torch.load_file` per shard, norm fusion, `torch.matmul` with the same `Q[:, :d]`
as the engine, slicing, `save_file`, `os.fsync` (whose time is also reported apart).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from dimcut.bench.plan import load_arrays
from dimcut.bench.workers import set_torch_threads
from dimcut.runtime import peak_rss_bytes

OUTPUT = "out-torch"


def worker_torch(workdir: Path, params: dict) -> dict:
    """Whole shards in memory, one op at a time."""
    import numpy as np
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    set_torch_threads(params)
    ops = json.loads((workdir / "ops.json").read_text())
    arrays = {k: torch.from_numpy(np.asarray(v)) for k, v in load_arrays(workdir).items()}
    src, out = workdir / "src", workdir / OUTPUT
    shutil.rmtree(out, ignore_errors=True)
    rss_before = peak_rss_bytes()
    timer = dict.fromkeys(("load", "compute", "save", "fsync"), 0.0)
    dtypes = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}

    start = time.perf_counter()
    out.mkdir()
    weight_map = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    rotations = {k: v.float() for k, v in arrays.items()}  # Q[:, :d] in f32, like the engine
    groups: dict[str, list[dict]] = {}
    last = None
    for op in ops:  # literals travel with the shard before them
        last = (
            weight_map[op["source"]]
            if op.get("source")
            else (last or next(iter(weight_map.values())))
        )
        groups.setdefault(last, []).append(op)
    for i, (shard, shard_ops) in enumerate(groups.items()):
        t = time.perf_counter()
        tensors = load_file(src / shard)
        timer["load"] += time.perf_counter() - t
        t = time.perf_counter()
        result = {}
        for op in shard_ops:
            if op.get("literal"):
                result[op["name"]] = arrays[op["literal"]].to(dtypes[op["dtype"]])
                continue
            w = tensors[op["source"]]
            dtype = dtypes.get(op.get("dtype"), w.dtype)
            x = w.float()
            if op.get("col_scale"):
                name = op["col_scale"]
                if name in tensors:
                    scale = tensors[name]
                else:
                    with safe_open(src / weight_map[name], "pt") as f:
                        scale = f.get_tensor(name)
                x = x * scale.float()
            if op.get("in_rotation"):
                x = torch.matmul(x, rotations[op["in_rotation"]][:, : op["in_keep"]])
            elif op.get("in_keep") is not None:
                x = x[..., : op["in_keep"]]
            if op.get("out_rotation"):
                x = torch.matmul(rotations[op["out_rotation"]][:, : op["out_keep"]].T, x)
            elif op.get("out_keep") is not None:
                x = x[: op["out_keep"]]
            result[op["name"]] = x.to(dtype).contiguous()
            del x
        del tensors
        timer["compute"] += time.perf_counter() - t
        path = out / f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        t = time.perf_counter()
        save_file(result, str(path), metadata={"format": "pt"})
        timer["save"] += time.perf_counter() - t
        del result
        if params["baseline_fsync"]:
            t = time.perf_counter()
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            timer["fsync"] += time.perf_counter() - t
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "rss_before": rss_before,
        **{f"{k}_seconds": v for k, v in timer.items()},
    }
