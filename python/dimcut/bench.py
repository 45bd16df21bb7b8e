"""`dimcut bench`: slicing throughput and memory against a PyTorch baseline and the GEMM limit.

The `slicing` suite builds a synthetic bf16 checkpoint of a real model's shape (Llama-3-8B's
layers, a reduced layer count, the full 128256-token embedding and head, shards of at most
`--shard-size` bytes) and one random orthogonal rotation, turns them into the `plain`-format plan
(every matrix rotated: the heaviest plan), and runs, each in a fresh subprocess so that peak RSS
is the contender's own, on the same files:

- `engine`: dimcut's Rust engine (`_core.rewrite_checkpoint`; output fsynced before rename);
- `torch`:  a straightforward PyTorch CPU rewrite — `safetensors.torch.load_file` per shard, norm
  fusion, `torch.matmul` with the same `Q[:, :d]`, slicing, `save_file`, `os.fsync` (its fsync
  time is also reported apart);
- `gemm`:   the machine's f32 GEMM rate (torch and NumPy BLAS) on the plan's matrix shapes.

The engine's and the baseline's outputs are then compared tensor by tensor (names, shapes,
dtypes; max abs and relative error; the tolerance is one bf16 ulp of each tensor's largest
value). The `calibration` suite times `dimcut.calibration.calibrate` beside a plain transformers
forward over the same tokens. Results are printed as a table and written as JSON.

Worker subprocesses run this file as a script (not `-m dimcut.bench`) so that the engine worker
loads only the extension module and NumPy — not torch — and its RSS is the engine's.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

KEEP_FRACTION = 0.75
# One bf16 ulp of a tensor's largest |value|, relative to that value: two correct f32
# computations that differ only in summation order can round to neighbouring bf16 values.
TOLERANCE = 2.0**-7
# The GEMM-rate probe multiplies at most this many rows per shape (the rate does not depend on
# the row count once it is this large); flops are counted for the rows actually multiplied.
GEMM_MAX_ROWS = 8192
JSON_DEFAULT = Path("bench-out/bench.json")


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    layers: int
    vocab: int

    @property
    def kept(self) -> int:
        return int(self.hidden * KEEP_FRACTION) // 8 * 8

    @property
    def kv_width(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    def checkpoint_bytes(self) -> int:
        d, inter, kv = self.hidden, self.intermediate, self.kv_width
        layer = 2 * d * d + 2 * kv * d + 3 * inter * d + 2 * d
        return 2 * (2 * self.vocab * d + self.layers * layer + d)


PRESETS = {
    # Llama-3-8B per-layer shapes, 2 of its 32 layers, its full embedding and head (2.97 GB).
    "8b": Shape(hidden=4096, intermediate=14336, heads=32, kv_heads=8, layers=2, vocab=128256),
    "8b-full": Shape(
        hidden=4096, intermediate=14336, heads=32, kv_heads=8, layers=32, vocab=128256
    ),
    "3b": Shape(hidden=3072, intermediate=8192, heads=24, kv_heads=8, layers=28, vocab=128256),
    "1b": Shape(hidden=2048, intermediate=8192, heads=32, kv_heads=8, layers=16, vocab=128256),
    "small": Shape(hidden=512, intermediate=1792, heads=8, kv_heads=2, layers=2, vocab=8000),
    "tiny": Shape(hidden=64, intermediate=160, heads=4, kv_heads=2, layers=2, vocab=256),
}
SLICING_CONTENDERS = ("engine", "torch", "gemm")


# -- the synthetic checkpoint -------------------------------------------------------------------


def layer_matrices(shape: Shape, layer: int) -> dict[str, tuple[int, int]]:
    prefix = f"model.layers.{layer}"
    d, kv, inter = shape.hidden, shape.kv_width, shape.intermediate
    return {
        f"{prefix}.self_attn.q_proj.weight": (d, d),
        f"{prefix}.self_attn.k_proj.weight": (kv, d),
        f"{prefix}.self_attn.v_proj.weight": (kv, d),
        f"{prefix}.self_attn.o_proj.weight": (d, d),
        f"{prefix}.mlp.gate_proj.weight": (inter, d),
        f"{prefix}.mlp.up_proj.weight": (inter, d),
        f"{prefix}.mlp.down_proj.weight": (d, inter),
    }


def tensor_shapes(shape: Shape) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, kind) in Hugging Face order; kind is "matrix" or "norm"."""
    out = [("model.embed_tokens.weight", (shape.vocab, shape.hidden), "matrix")]
    for layer in range(shape.layers):
        out += [(n, dims, "matrix") for n, dims in layer_matrices(shape, layer).items()]
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out.append((f"model.layers.{layer}.{norm}.weight", (shape.hidden,), "norm"))
    out.append(("model.norm.weight", (shape.hidden,), "norm"))
    out.append(("lm_head.weight", (shape.vocab, shape.hidden), "matrix"))
    return out


def llama_config(shape: Shape) -> dict:
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "num_hidden_layers": shape.layers,
        "vocab_size": shape.vocab,
        "head_dim": shape.hidden // shape.heads,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }


def build_checkpoint(directory: Path, shape: Shape, shard_size: int, seed: int = 0) -> int:
    """Writes the bf16 checkpoint one shard at a time (memory ≈ one shard); returns its bytes."""
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)

    def make(dims: tuple[int, ...], kind: str) -> torch.Tensor:
        if kind == "norm":
            return (1 + 0.1 * torch.randn(*dims, generator=generator)).to(torch.bfloat16)
        out = torch.empty(dims, dtype=torch.bfloat16)
        for rows in range(0, dims[0], 8192):  # bounded f32 temporaries
            block = torch.randn(min(8192, dims[0] - rows), dims[1], generator=generator)
            out[rows : rows + block.shape[0]] = block.mul_(0.02)
        return out

    directory.mkdir(parents=True, exist_ok=True)
    groups: list[list[tuple[str, tuple[int, ...], str]]] = [[]]
    size = 0
    for name, dims, kind in tensor_shapes(shape):
        nbytes = 2 * int(torch.tensor(dims).prod())
        if groups[-1] and size + nbytes > shard_size:
            groups.append([])
            size = 0
        groups[-1].append((name, dims, kind))
        size += nbytes
    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        file_name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {name: make(dims, kind) for name, dims, kind in group}
        save_file(tensors, str(directory / file_name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file_name))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    (directory / "config.json").write_text(json.dumps(llama_config(shape), indent=2))
    return total


def build_plan(workdir: Path, shape: Shape) -> dict:
    """The `plain` plan of dimcut.plan for the checkpoint: ops.json and arrays/*.npy."""
    import numpy as np

    from dimcut.architectures import load_architecture
    from dimcut.engine import inspect_checkpoint
    from dimcut.plan import model_ops
    from dimcut.slicing import plan_widths, rotation_arrays

    src = workdir / "src"
    arch = load_architecture(src)
    tensors = inspect_checkpoint(src)
    widths = plan_widths(arch, "plain", shape.kept, True)
    q, _ = np.linalg.qr(np.random.default_rng(1).standard_normal((shape.hidden, shape.hidden)))
    names, arrays = rotation_arrays("plain", {"Q": q}, widths, arch)
    ops = model_ops(arch, "plain", names, widths, tensors)
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
    """Builds (or reuses, when `workdir` already holds the same one) checkpoint and plan."""
    meta_path = workdir / "bench-meta.json"
    wanted = {"shape": asdict(shape), "shard_size": shard_size, "version": 2}
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if {k: meta.get(k) for k in wanted} == wanted:
            return meta
    shutil.rmtree(workdir / "src", ignore_errors=True)
    started = time.perf_counter()
    input_bytes = build_checkpoint(workdir / "src", shape, shard_size)
    meta = {**wanted, "input_bytes": input_bytes, **build_plan(workdir, shape)}
    meta["build_seconds"] = time.perf_counter() - started
    shards = sorted((workdir / "src").glob("*.safetensors"))
    meta["shards"] = [p.stat().st_size for p in shards]
    meta_path.write_text(json.dumps(meta, indent=2))
    return meta


# -- workers (run in their own subprocess) ------------------------------------------------------


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _peak_rss() -> int:
    import resource

    # VmHWM is this process's own high-water mark (ru_maxrss is the fallback off Linux).
    return _status_bytes("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _load_core():
    """The extension module alone, without importing the dimcut package (and torch)."""
    import importlib.machinery
    import importlib.util

    here = Path(__file__).resolve().parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = here / f"_core{suffix}"
        if path.is_file():
            loader = importlib.machinery.ExtensionFileLoader("dimcut._core", str(path))
            spec = importlib.util.spec_from_file_location("dimcut._core", path, loader=loader)
            module = importlib.util.module_from_spec(spec)
            loader.exec_module(module)
            return module
    from dimcut import _core  # an installed wheel may keep it elsewhere

    return _core


def _load_arrays(workdir: Path) -> dict:
    import numpy as np

    return {
        p.stem: np.load(p, allow_pickle=False) for p in sorted((workdir / "arrays").glob("*.npy"))
    }


def worker_engine(workdir: Path, params: dict) -> dict:
    core = _load_core()
    ops = json.loads((workdir / "ops.json").read_text())
    arrays = _load_arrays(workdir)
    rss_before = _status_bytes("VmRSS")
    start = time.perf_counter()
    stats = core.rewrite_checkpoint(
        str(workdir / "src"),
        str(workdir / "out-engine"),
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


def worker_torch(workdir: Path, params: dict) -> dict:
    """The straightforward baseline: whole shards in memory, one op at a time."""
    import numpy as np
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    torch.set_num_threads(params["threads"] or os.cpu_count() or 1)
    ops = json.loads((workdir / "ops.json").read_text())
    arrays = {k: torch.from_numpy(np.asarray(v)) for k, v in _load_arrays(workdir).items()}
    src, out = workdir / "src", workdir / "out-torch"
    shutil.rmtree(out, ignore_errors=True)
    rss_before = _status_bytes("VmRSS")
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

    threads = params["threads"] or os.cpu_count() or 1
    torch.set_num_threads(threads)
    meta = json.loads((workdir / "bench-meta.json").read_text())
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


def worker_calibrate(workdir: Path, params: dict) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from dimcut.calibration import calibrate

    torch.set_num_threads(params["threads"] or os.cpu_count() or 1)
    rss_before = _status_bytes("VmRSS")
    start = time.perf_counter()
    calibrate(
        params["model_dir"],
        fmt="slicegpt",
        width=params["width"],
        nsamples=params["nsamples"],
        seqlen=params["seqlen"],
        device="cpu",
        progress=False,
    )
    return {"seconds": time.perf_counter() - start, "rss_before": rss_before}


def worker_forward(workdir: Path, params: dict) -> dict:
    """A plain transformers forward (no grad, float32) over the tokens calibration samples."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dimcut.calibration import BATCH_TOKENS, calibration_documents, sample_sequences

    torch.set_num_threads(params["threads"] or os.cpu_count() or 1)
    rss_before = _status_bytes("VmRSS")
    start = time.perf_counter()
    model_dir = params["model_dir"]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    documents, _ = calibration_documents(None)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokens = sample_sequences(tokenizer, documents, params["nsamples"], params["seqlen"], 42)
    per_batch = max(1, BATCH_TOKENS // params["seqlen"])
    with torch.inference_mode():
        for first in range(0, len(tokens), per_batch):
            model.model(tokens[first : first + per_batch])  # hidden states, as calibration
    return {"seconds": time.perf_counter() - start, "rss_before": rss_before}


def worker_check(workdir: Path, params: dict) -> dict:
    """Compares out-engine with out-torch: same tensors, values within TOLERANCE."""
    from safetensors import safe_open

    def inventory(directory: Path) -> dict[str, Path]:
        found = {}
        for path in sorted(directory.glob("*.safetensors")):
            with safe_open(path, "pt") as f:
                found.update(dict.fromkeys(f.keys(), path))
        return found

    engine, baseline = inventory(workdir / "out-engine"), inventory(workdir / "out-torch")
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
    return {"seconds": 0.0, "rss_before": 0, **report}


WORKERS = {
    "engine": worker_engine,
    "torch": worker_torch,
    "gemm": worker_gemm,
    "calibrate": worker_calibrate,
    "forward": worker_forward,
    "check": worker_check,
}


def run_worker(name: str, workdir: Path, params: dict) -> dict:
    """Runs `name` in a fresh interpreter; returns its JSON result with its peak RSS."""
    env = dict(os.environ)
    threads = params.get("threads") or os.cpu_count() or 1
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env.setdefault(var, str(threads))
    # The script's own directory (python/dimcut) must not shadow stdlib/dimcut module names.
    package_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    command = [sys.executable, "-P", __file__, "--worker", name, str(workdir), json.dumps(params)]
    completed = subprocess.run(command, check=False, capture_output=True, text=True, env=env)
    if completed.returncode != 0:
        raise RuntimeError(
            f"bench worker {name!r} failed ({completed.returncode}):\n{completed.stderr[-4000:]}"
        )
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _worker_main(argv: list[str]) -> None:
    name, workdir, params = argv[0], Path(argv[1]), json.loads(argv[2])
    result = WORKERS[name](workdir, params)
    result["peak_rss"] = _peak_rss()
    print(json.dumps(result))


# -- the suites ---------------------------------------------------------------------------------


def _machine() -> dict:
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "loadavg": load,
    }


def run_slicing(args) -> dict:
    shape = PRESETS[args.preset]
    overrides = {"layers": args.layers, "vocab": args.vocab}
    shape = replace(shape, **{k: v for k, v in overrides.items() if v is not None})
    contenders = [c for c in args.contenders.split(",") if c]
    unknown = sorted(set(contenders) - set(SLICING_CONTENDERS))
    if unknown:
        raise ValueError(f"--contenders: unknown {unknown}; choose from {SLICING_CONTENDERS}")
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="dimcut-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(workdir).free
    need = 3 * shape.checkpoint_bytes()
    if free < need:
        raise ValueError(
            f"{workdir}: {free / 1e9:.1f} GB free, the run needs ≈ {need / 1e9:.1f} GB"
        )
    params = {
        "threads": args.threads,
        "memory_budget": args.memory_budget,
        "shard_size": args.shard_size,
        "baseline_fsync": not args.no_baseline_fsync,
        "gemm_repeat": args.gemm_repeat,
    }
    report: dict = {"suite": "slicing", "preset": args.preset, "shape": asdict(shape)}
    try:
        meta = prepare(workdir, shape, args.shard_size)
        say = print if not args.quiet else (lambda *a, **k: None)
        say(
            f"checkpoint {meta['input_bytes'] / 1e9:.2f} GB in {len(meta['shards'])} shard(s), "
            f"D = {shape.hidden} -> d = {shape.kept}, {meta['flops'] / 1e12:.2f} TFLOP"
        )
        machine_start = _machine()
        runs: dict[str, list[dict]] = {c: [] for c in contenders}
        for repeat in range(args.repeat):
            for contender in contenders:
                if contender == "gemm" and repeat > 0:
                    continue
                result = run_worker(contender, workdir, params)
                runs[contender].append(result)
                say(f"  {contender:7s} run {repeat + 1}: {result['seconds']:.2f} s")
        check = None
        if "engine" in runs and "torch" in runs and not args.no_check:
            check = run_worker("check", workdir, params)
            for key in ("seconds", "rss_before", "peak_rss"):
                check.pop(key, None)
        report.update(
            kept=shape.kept,
            input_bytes=meta["input_bytes"],
            shards=meta["shards"],
            shard_size=args.shard_size,
            flops=meta["flops"],
            gemm_shapes=meta["gemms"],
            memory_budget=args.memory_budget,
            threads=args.threads,
            baseline_fsync=params["baseline_fsync"],
            repeat=args.repeat,
            machine=machine_start,
            loadavg_end=_machine()["loadavg"],
            check=check,
        )
        report.update(summarize(runs, meta))
    finally:
        if not args.workdir and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        elif not args.keep:
            for out in ("out-engine", "out-torch"):
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


def run_calibration(args) -> dict:
    model_dir = Path(args.model_dir).expanduser()
    config = json.loads((model_dir / "config.json").read_text())
    layers = int(config["num_hidden_layers"])
    params = {
        "threads": args.threads,
        "model_dir": str(model_dir),
        "nsamples": args.nsamples,
        "seqlen": args.seqlen,
        "width": args.width,
    }
    tokens = args.nsamples * args.seqlen
    rows = {}
    for name in ("calibrate", "forward"):
        results = [
            run_worker(name, Path(tempfile.gettempdir()), params) for _ in range(args.repeat)
        ]
        median = statistics.median(r["seconds"] for r in results)
        rows[name] = {
            "seconds": median,
            "seconds_all": [r["seconds"] for r in results],
            "tokens_per_s": tokens / median,
            "layer_tokens_per_s": tokens * layers / median,
            "peak_rss_gib": max(r["peak_rss"] for r in results) / 2**30,
            "rss_before_gib": max(r["rss_before"] for r in results) / 2**30,
        }
    return {
        "suite": "calibration",
        "model_dir": str(model_dir),
        "layers": layers,
        "nsamples": args.nsamples,
        "seqlen": args.seqlen,
        "tokens": tokens,
        "width": args.width,
        "threads": args.threads,
        "machine": _machine(),
        "contenders": rows,
        "time_ratio": rows["calibrate"]["seconds"] / rows["forward"]["seconds"],
    }


TABLE_COLUMNS = {
    "slicing": [
        ("seconds", "wall s", "{:.2f}"),
        ("input_gb_per_s", "GB/s in", "{:.3f}"),
        ("gflop_per_s", "GFLOP/s", "{:.1f}"),
        ("gemm_fraction", "of GEMM", "{:.0%}"),
        ("rotation_gemm_fraction", "rot. of GEMM", "{:.0%}"),
        ("peak_rss_gib", "peak RSS GiB", "{:.2f}"),
    ],
    "calibration": [
        ("seconds", "wall s", "{:.2f}"),
        ("tokens_per_s", "tokens/s", "{:.0f}"),
        ("layer_tokens_per_s", "layer-tokens/s", "{:.0f}"),
        ("peak_rss_gib", "peak RSS GiB", "{:.2f}"),
    ],
}


def format_table(report: dict) -> str:
    columns = TABLE_COLUMNS[report["suite"]]
    header = ["contender"] + [title for _, title, _ in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, row in report["contenders"].items():
        cells = [name]
        for key, _, fmt in columns:
            value = row.get(key)
            cells.append("—" if value is None else fmt.format(value))
        lines.append("| " + " | ".join(cells) + " |")
    if report["suite"] == "slicing":
        gemm = report.get("gemm") or {}
        if gemm.get("limit_gflop_per_s"):
            lines.append(
                f"\nGEMM limit (f32, same shapes): torch {gemm['torch_gflop_per_s']:.1f}, "
                f"NumPy {gemm['numpy_gflop_per_s']:.1f} GFLOP/s"
            )
        if "speedup" in report:
            lines.append(
                f"dimcut/baseline time ratio {report['time_ratio']:.3f} "
                f"(speedup {report['speedup']:.2f}x), peak RSS ratio {report['rss_ratio']:.3f}"
            )
        check = report.get("check")
        if check:
            verdict = "PASSED" if check["passed"] else "FAILED"
            lines.append(
                f"check {verdict}: {check['tensors']} tensors, max abs err {check['max_abs_err']:.3g}, "
                f"max rel err {check['max_rel_err']:.3g} (tolerance {check['tolerance']:.3g}), "
                f"{check['differing_fraction']:.2%} of elements differ"
            )
    else:
        lines.append(f"\ncalibrate/forward time ratio {report['time_ratio']:.2f}")
    return "\n".join(lines)


# -- command line -------------------------------------------------------------------------------


def add_arguments(parser) -> None:
    parser.add_argument(
        "--suite", choices=("slicing", "calibration"), default="slicing", help="what to measure"
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="8b", help="model shape")
    parser.add_argument("--layers", type=int, help="decoder layers (default: the preset's)")
    parser.add_argument("--vocab", type=int, help="vocabulary size (default: the preset's)")
    parser.add_argument(
        "--contenders", default=",".join(SLICING_CONTENDERS), help="comma list (slicing suite)"
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs per contender (median)")
    parser.add_argument("--memory-budget", type=int, default=512 * 2**20, help="engine bytes")
    parser.add_argument("--shard-size", type=int, default=5 * 10**9, help="bytes per shard")
    parser.add_argument("--threads", type=int, default=None, help="threads (default: all)")
    parser.add_argument("--gemm-repeat", type=int, default=2, help="best of N per GEMM shape")
    parser.add_argument("--no-baseline-fsync", action="store_true", help="the baseline skips fsync")
    parser.add_argument("--no-check", action="store_true", help="skip the output comparison")
    parser.add_argument("--workdir", help="build/reuse the checkpoint here (default: temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep outputs and temp files")
    parser.add_argument("--json", type=Path, default=JSON_DEFAULT, help="write results here")
    parser.add_argument("--quiet", action="store_true", help="print only the table")
    calib = parser.add_argument_group("calibration suite")
    calib.add_argument(
        "--model-dir", default="~/.cache/dimcut/SmolLM2-135M-Instruct", help="dense checkpoint"
    )
    calib.add_argument("--nsamples", type=int, default=128)
    calib.add_argument("--seqlen", type=int, default=2048)
    calib.add_argument("--width", type=int, default=432)


def run(args) -> int:
    report = run_calibration(args) if args.suite == "calibration" else run_slicing(args)
    print(format_table(report))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")
    check = report.get("check")
    return 1 if check is not None and not check["passed"] else 0


def add_commands(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="benchmark slicing against a PyTorch baseline and the GEMM limit",
        description=__doc__.split("\n\n")[0],
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="dimcut-bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _worker_main(sys.argv[2:])
    else:
        sys.exit(main())
