"""End-to-end benchmark of the rewrite engine on a synthetic Llama-3-8B-shaped bf16 checkpoint.

Builds the checkpoint (one shard per layer, plus embedding and head shards), one random
orthogonal rotation, and a plain-format-like plan: every matrix rotated and the hidden width cut
to d = 0.75 D. Each backend runs in its own subprocess so its peak RSS is its own; results are
printed as a table and written as JSON.

    python benches/bench_engine.py --small            # seconds
    python benches/bench_engine.py --layers 2         # two 8B-shaped layers + 128256 vocab

A backend is a function `(workdir, shape, args) -> run` registered in BACKENDS: it does its
imports and setup, and `run()` does the timed work and returns a dict (optionally with its own
"seconds"). A PyTorch baseline only needs to be added there.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

KEEP_FRACTION = 0.75


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


PRESETS = {
    "8b": Shape(hidden=4096, intermediate=14336, heads=32, kv_heads=8, layers=2, vocab=128256),
    "small": Shape(hidden=512, intermediate=1792, heads=8, kv_heads=2, layers=2, vocab=8000),
}


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


def build_checkpoint(directory: Path, shape: Shape, seed: int = 0) -> int:
    """Writes the bf16 checkpoint shard by shard (bounded memory); returns its tensor bytes."""
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)

    def randn(*dims: int) -> torch.Tensor:
        return (torch.randn(*dims, generator=generator) * 0.02).to(torch.bfloat16)

    def norm() -> torch.Tensor:
        return (1 + 0.1 * torch.randn(shape.hidden, generator=generator)).to(torch.bfloat16)

    groups: list[dict[str, torch.Tensor]] = [
        {"model.embed_tokens.weight": randn(shape.vocab, shape.hidden)}
    ]
    for layer in range(shape.layers):
        tensors = {name: randn(*dims) for name, dims in layer_matrices(shape, layer).items()}
        tensors[f"model.layers.{layer}.input_layernorm.weight"] = norm()
        tensors[f"model.layers.{layer}.post_attention_layernorm.weight"] = norm()
        groups.append(tensors)
    groups.append({"model.norm.weight": norm(), "lm_head.weight": randn(shape.vocab, shape.hidden)})

    directory.mkdir(parents=True, exist_ok=True)
    weight_map, total = {}, 0
    for i, tensors in enumerate(groups):
        file_name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(tensors, str(directory / file_name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file_name))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        groups[i] = {}  # free each group once written
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    (directory / "config.json").write_text(json.dumps({"model_type": "llama", **asdict(shape)}))
    return total


def build_rotation(path: Path, n: int, seed: int = 1) -> None:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    np.save(path, q)


def plan(shape: Shape) -> tuple[list[dict], float]:
    """The ops and their analytic flop count (2·m·n·k per rotated matrix)."""
    d = shape.kept
    ops: list[dict] = [
        {
            "name": "model.embed_tokens.weight",
            "source": "model.embed_tokens.weight",
            "in_rotation": "Q",
            "in_keep": d,
        }
    ]
    flops = 2.0 * shape.vocab * shape.hidden * d
    for layer in range(shape.layers):
        prefix = f"model.layers.{layer}"
        for name, (rows, cols) in layer_matrices(shape, layer).items():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                ops.append({"name": name, "source": name, "out_rotation": "Q", "out_keep": d})
            else:
                norm = "input_layernorm" if ".self_attn." in name else "post_attention_layernorm"
                ops.append(
                    {
                        "name": name,
                        "source": name,
                        "col_scale": f"{prefix}.{norm}.weight",
                        "in_rotation": "Q",
                        "in_keep": d,
                    }
                )
            flops += 2.0 * rows * cols * d
        for norm in ("input_layernorm", "post_attention_layernorm"):
            ops.append({"name": f"{prefix}.{norm}.weight", "literal": "norm", "dtype": "BF16"})
    ops.append({"name": "model.norm.weight", "literal": "norm", "dtype": "BF16"})
    ops.append(
        {
            "name": "lm_head.weight",
            "source": "lm_head.weight",
            "col_scale": "model.norm.weight",
            "in_rotation": "Q",
            "in_keep": d,
        }
    )
    flops += 2.0 * shape.vocab * shape.hidden * d
    return ops, flops


def prepare_engine(workdir: Path, shape: Shape, args: argparse.Namespace) -> Callable[[], dict]:
    from dimcut.engine import rewrite_checkpoint

    ops, _ = plan(shape)
    arrays = {
        "Q": np.load(workdir / "rotation.npy", mmap_mode="r"),
        "norm": np.full(shape.kept, np.sqrt(shape.hidden / shape.kept), dtype=np.float32),
    }

    def run() -> dict:
        stats = rewrite_checkpoint(
            workdir / "src",
            workdir / "out-engine",
            ops,
            arrays,
            memory_budget=args.memory_budget,
            threads=args.threads,
            overwrite=True,
        )
        return {"seconds": stats["seconds"], "bytes_written": stats["bytes_written"]}

    return run


# name -> setup function run inside the worker subprocess; add a PyTorch baseline here.
Backend = Callable[[Path, Shape, argparse.Namespace], Callable[[], dict]]
BACKENDS: dict[str, Backend] = {"engine": prepare_engine}


def proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def worker(args: argparse.Namespace) -> None:
    """Runs one backend and prints its JSON result (inside a fresh subprocess)."""
    shape = Shape(**json.loads(args.shape_json))
    run = BACKENDS[args.worker](Path(args.workdir), shape, args)
    rss_before = proc_status_kib("VmRSS") * 1024
    start = time.perf_counter()
    result = run()
    result.setdefault("seconds", time.perf_counter() - start)
    # VmHWM is this process's own high-water mark; ru_maxrss would include the parent's
    # resident set at fork time, which is large right after building the checkpoint.
    peak = (
        proc_status_kib("VmHWM") * 1024 or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    result.update(rss_before=rss_before, peak_rss=peak)
    print(json.dumps(result))


def run_backend(name: str, workdir: Path, shape: Shape, args: argparse.Namespace) -> dict:
    command = [
        sys.executable,
        __file__,
        "--worker",
        name,
        "--workdir",
        str(workdir),
        "--shape-json",
        json.dumps(asdict(shape)),
        "--memory-budget",
        str(args.memory_budget),
    ]
    if args.threads:
        command += ["--threads", str(args.threads)]
    completed = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny preset for a quick run")
    parser.add_argument("--layers", type=int, help="decoder layers (default: preset's)")
    parser.add_argument("--vocab", type=int, help="vocabulary size (default: preset's)")
    parser.add_argument("--backends", default="engine", help=f"comma list of {sorted(BACKENDS)}")
    parser.add_argument("--memory-budget", type=int, default=512 * 2**20)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--workdir", type=Path, help="keep files here (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=Path("bench-out/bench_engine.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--shape-json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    shape = PRESETS["small" if args.small else "8b"]
    overrides = {"layers": args.layers, "vocab": args.vocab}
    shape = Shape(**{**asdict(shape), **{k: v for k, v in overrides.items() if v is not None}})
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="dimcut-bench-"))
    try:
        started = time.perf_counter()
        input_bytes = build_checkpoint(workdir / "src", shape)
        build_rotation(workdir / "rotation.npy", shape.hidden)
        print(
            f"built {input_bytes / 1e9:.2f} GB checkpoint in {time.perf_counter() - started:.0f} s "
            f"({shape}, d = {shape.kept})"
        )
        _, flops = plan(shape)
        rows = []
        for name in args.backends.split(","):
            result = run_backend(name, workdir, shape, args)
            seconds = result["seconds"]
            rows.append(
                {
                    "backend": name,
                    "seconds": seconds,
                    "input_gb_per_s": input_bytes / seconds / 1e9,
                    "gflop_per_s": flops / seconds / 1e9,
                    "peak_rss_gb": result["peak_rss"] / 1e9,
                    "rss_before_gb": result["rss_before"] / 1e9,
                }
            )
        print_table(rows)
        report = {
            "shape": asdict(shape),
            "kept": shape.kept,
            "input_bytes": input_bytes,
            "flops": flops,
            "memory_budget": args.memory_budget,
            "threads": args.threads,
            "cpu_count": os.cpu_count(),
            "results": rows,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


def print_table(rows: list[dict]) -> None:
    columns = [
        "backend",
        "seconds",
        "input_gb_per_s",
        "gflop_per_s",
        "peak_rss_gb",
        "rss_before_gb",
    ]
    print(" | ".join(f"{c:>14}" for c in columns))
    for row in rows:
        cells = [row[c] if isinstance(row[c], str) else f"{row[c]:.3f}" for c in columns]
        print(" | ".join(f"{c:>14}" for c in cells))


if __name__ == "__main__":
    main()
