"""The `slicing` suite: dimcut's engine against the PyTorch baseline and the GEMM limit.

On the synthetic checkpoint and its `plain` plan (`dimcut.bench.plan`), each in a fresh
subprocess so that peak RSS is the contender's own:

- `engine`: dimcut's Rust engine (`_core.rewrite_checkpoint`; output fsynced before rename);
- `torch`:  the PyTorch baseline (`dimcut.bench.baseline`);
- `gemm`:   the machine's f32 GEMM rate (torch and NumPy BLAS) on the plan's matrix shapes.

The engine's and the baseline's outputs are then compared tensor by tensor (names, shapes,
dtypes; max abs and relative error; the tolerance is one bf16 ulp of each tensor's largest
value).
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from dimcut.bench.baseline import OUTPUT as BASELINE_OUTPUT
from dimcut.bench.baseline import worker_torch
from dimcut.bench.checkpoints import PRESETS
from dimcut.bench.plan import PLAN_META, load_arrays, prepare
from dimcut.bench.workers import machine, run_worker, set_torch_threads
from dimcut.runtime import peak_rss_bytes

# One bf16 ulp of a tensor's largest |value|, relative to that value: two correct f32
# computations that differ only in summation order can round to neighbouring bf16 values.
TOLERANCE = 2.0**-7
# The GEMM-rate probe multiplies at most this many rows per shape (the rate does not depend on
# the row count once it is this large); flops are counted for the rows actually multiplied.
GEMM_MAX_ROWS = 8192
ENGINE_OUTPUT = "out-engine"
# The engine's tile budget when --memory-budget is not given.
DEFAULT_ENGINE_BUDGET = 512 * 2**20


def worker_engine(workdir: Path, params: dict) -> dict:
    from dimcut import _core

    ops = json.loads((workdir / "ops.json").read_text())
    arrays = load_arrays(workdir)
    rss_before = peak_rss_bytes()
    start = time.perf_counter()
    stats = _core.rewrite_checkpoint(
        str(workdir / "src"),
        str(workdir / ENGINE_OUTPUT),
        ops,
        arrays,
        max_shard_size=params["shard_size"],
        memory_budget=params["memory_budget"],
        threads=params["threads"],
        overwrite=True,
    )
    seconds = time.perf_counter() - start
    phases = {k: v for k, v in stats.items() if k.endswith("_seconds")}
    return {"seconds": seconds, "rss_before": rss_before, "flops": stats["flops"], **phases}


def _time_best(fn, repeat: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def worker_gemm(workdir: Path, params: dict) -> dict:
    """f32 GEMM seconds per plan shape (rows capped at GEMM_MAX_ROWS), for torch and NumPy."""
    import numpy as np
    import torch

    set_torch_threads(params)
    meta = json.loads((workdir / PLAN_META).read_text())
    rng = np.random.default_rng(0)
    rates = {}
    for library in ("torch", "numpy"):
        flops = seconds = 0.0
        for m, k, n, count in meta["gemms"]:
            rows = min(m, GEMM_MAX_ROWS)
            a = rng.standard_normal((rows, k), dtype=np.float32)
            b = rng.standard_normal((k, n), dtype=np.float32)
            if library == "torch":
                ta, tb = torch.from_numpy(a), torch.from_numpy(b)
                best = _time_best(lambda ta=ta, tb=tb: torch.matmul(ta, tb), params["gemm_repeat"])
            else:
                best = _time_best(lambda a=a, b=b: a @ b, params["gemm_repeat"])
            flops += 2.0 * rows * k * n * count
            seconds += best * count
        rates[f"{library}_gflop_per_s"] = flops / seconds / 1e9
    return {"seconds": 0.0, "rss_before": 0, **rates}


def worker_check(workdir: Path, params: dict) -> dict:
    """Compares the engine's output with the baseline's: same tensors, values within TOLERANCE."""
    from safetensors import safe_open

    def inventory(directory: Path) -> dict[str, Path]:
        found = {}
        for path in sorted(directory.glob("*.safetensors")):
            with safe_open(path, "pt") as f:
                found.update(dict.fromkeys(f.keys(), path))
        return found

    engine, baseline = inventory(workdir / ENGINE_OUTPUT), inventory(workdir / BASELINE_OUTPUT)
    report = {
        "tolerance": TOLERANCE,
        "tolerance_meaning": "max |engine - torch| / max |torch| per tensor (one bf16 ulp)",
        "same_names": sorted(engine) == sorted(baseline),
        "tensors": 0,
        "max_abs_err": 0.0,
        "max_rel_err": 0.0,
        "differing_fraction": 0.0,
        "worst_tensor": None,
        "mismatches": [],
    }
    elements = differing = 0
    for name in sorted(set(engine) & set(baseline)):
        with safe_open(engine[name], "pt") as fa, safe_open(baseline[name], "pt") as fb:
            a, b = fa.get_tensor(name), fb.get_tensor(name)
        if a.shape != b.shape or a.dtype != b.dtype:
            report["mismatches"].append(
                f"{name}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"
            )
            continue
        a2, b2 = (
            a.reshape(a.shape[0] if a.dim() else 1, -1),
            b.reshape(b.shape[0] if b.dim() else 1, -1),
        )
        abs_err = peak = 0.0
        for rows in range(0, a2.shape[0], 4096):
            x, y = a2[rows : rows + 4096].float(), b2[rows : rows + 4096].float()
            abs_err = max(abs_err, float((x - y).abs().max()))
            peak = max(peak, float(y.abs().max()))
            differing += int((a2[rows : rows + 4096] != b2[rows : rows + 4096]).sum())
        elements += a.numel()
        rel = abs_err / peak if peak else abs_err
        report["tensors"] += 1
        report["max_abs_err"] = max(report["max_abs_err"], abs_err)
        if rel >= report["max_rel_err"]:
            report["max_rel_err"], report["worst_tensor"] = rel, name
    report["differing_fraction"] = differing / max(elements, 1)
    report["passed"] = bool(
        report["same_names"]
        and not report["mismatches"]
        and report["tensors"] > 0
        and report["max_rel_err"] <= TOLERANCE
    )
    return report


CONTENDERS = {"engine": worker_engine, "torch": worker_torch, "gemm": worker_gemm}


def run_slicing(args, say=print) -> dict:
    if len(args.layers or []) > 1:
        raise ValueError("--layers: the slicing suite takes one layer count")
    shape = PRESETS[args.preset].with_overrides(
        layers=args.layers[0] if args.layers else None, vocab=args.vocab
    )
    contenders = [c for c in args.contenders.split(",") if c]
    unknown = sorted(set(contenders) - set(CONTENDERS))
    if unknown:
        raise ValueError(f"--contenders: unknown {unknown}; choose from {tuple(CONTENDERS)}")
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="dimcut-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(workdir).free
    need = 3 * shape.checkpoint_bytes()
    if free < need:
        raise ValueError(
            f"{workdir}: {free / 1e9:.1f} GB free, the run needs ≈ {need / 1e9:.1f} GB"
        )
    memory_budget = args.memory_budget or DEFAULT_ENGINE_BUDGET
    params = {
        "threads": args.threads,
        "memory_budget": memory_budget,
        "shard_size": args.shard_size,
        "baseline_fsync": not args.no_baseline_fsync,
        "gemm_repeat": args.gemm_repeat,
    }
    report: dict = {"suite": "slicing", "preset": args.preset, "shape": asdict(shape)}
    try:
        meta = prepare(workdir, shape, args.shard_size)
        say(
            f"checkpoint {meta['input_bytes'] / 1e9:.2f} GB in {len(meta['shards'])} shard(s), "
            f"D = {shape.hidden} -> d = {shape.kept}, {meta['flops'] / 1e12:.2f} TFLOP"
        )
        machine_start = machine()
        runs: dict[str, list[dict]] = {c: [] for c in contenders}
        for repeat in range(args.repeat):
            for contender in contenders:
                if contender == "gemm" and repeat > 0:
                    continue
                result = run_worker(CONTENDERS[contender], workdir, params)
                runs[contender].append(result)
                say(f"  {contender:7s} run {repeat + 1}: {result['seconds']:.2f} s")
        check = None
        if "engine" in runs and "torch" in runs and not args.no_check:
            check = run_worker(worker_check, workdir, params)
            check.pop("peak_rss", None)
        report.update(
            kept=shape.kept,
            input_bytes=meta["input_bytes"],
            shards=meta["shards"],
            shard_size=args.shard_size,
            flops=meta["flops"],
            gemm_shapes=meta["gemms"],
            memory_budget=memory_budget,
            threads=args.threads,
            baseline_fsync=params["baseline_fsync"],
            repeat=args.repeat,
            machine=machine_start,
            loadavg_end=machine()["loadavg"],
            check=check,
        )
        report.update(summarize(runs, meta))
    finally:
        if not args.workdir and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        elif not args.keep:
            for out in (ENGINE_OUTPUT, BASELINE_OUTPUT):
                shutil.rmtree(workdir / out, ignore_errors=True)
    return report


def summarize(runs: dict[str, list[dict]], meta: dict) -> dict:
    gemm = runs.get("gemm", [{}])[0] if runs.get("gemm") else {}
    limit = max(gemm.get("torch_gflop_per_s", 0.0), gemm.get("numpy_gflop_per_s", 0.0)) or None
    rows = {}
    for name in ("engine", "torch"):
        if not runs.get(name):
            continue
        seconds = [r["seconds"] for r in runs[name]]
        median = statistics.median(seconds)
        gflops = meta["flops"] / median / 1e9
        row = {
            "seconds": median,
            "seconds_all": seconds,
            "input_gb_per_s": meta["input_bytes"] / median / 1e9,
            "gflop_per_s": gflops,
            "gemm_fraction": gflops / limit if limit else None,
            "peak_rss_gib": max(r["peak_rss"] for r in runs[name]) / 2**30,
            "rss_before_gib": max(r["rss_before"] for r in runs[name]) / 2**30,
        }
        phase_keys = sorted({k for r in runs[name] for k in r if k.endswith("_seconds")})
        row["phases"] = {
            k: statistics.median(r.get(k, 0.0) for r in runs[name]) for k in phase_keys
        }
        matmul = row["phases"].get("matmul_seconds") or row["phases"].get("compute_seconds")
        row["rotation_gflop_per_s"] = meta["flops"] / matmul / 1e9 if matmul else None
        row["rotation_gemm_fraction"] = (
            row["rotation_gflop_per_s"] / limit if limit and row["rotation_gflop_per_s"] else None
        )
        if name == "torch" and "fsync_seconds" in row["phases"]:
            row["seconds_without_fsync"] = median - row["phases"]["fsync_seconds"]
        rows[name] = row
    out: dict = {"contenders": rows, "gemm": {**gemm, "limit_gflop_per_s": limit}}
    for key in ("seconds", "rss_before", "peak_rss"):
        out["gemm"].pop(key, None)
    if "engine" in rows and "torch" in rows:
        out["time_ratio"] = rows["engine"]["seconds"] / rows["torch"]["seconds"]
        out["speedup"] = rows["torch"]["seconds"] / rows["engine"]["seconds"]
        out["rss_ratio"] = rows["engine"]["peak_rss_gib"] / rows["torch"]["peak_rss_gib"]
    return out
