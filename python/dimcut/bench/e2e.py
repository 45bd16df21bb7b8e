"""The `e2e` suite: the real `dimcut.slice_model` on a synthetic checkpoint of a real model's
shape (with a tokenizer, so that calibration runs), beside the dense forward of the same tokens
streamed the same way (`dimcut.calibration.streamed_forward`, no PCA).

Per layer count (`--layers 2,32` runs two: memory should not grow with the layers), each in a
fresh subprocess so that its peak RSS (VmHWM) is its own:

- `slice`:   `slice_model(checkpoint, 0.25, out, nsamples, seqlen)` with the default memory
             budget; its per-phase timings, wall time and peak RSS; then `dimcut verify` of the
             output (in another process, outside the slice's peak);
- `forward`: `streamed_forward(checkpoint, nsamples, seqlen)`; its per-phase timings.

With `--extra`, the cuts that need more than a forward, each in its own process too:

- `sensitivity`: the same slice with `widths="sensitivity"` (the streamed Fisher backward picks
             per-layer widths at the uniform cut's parameter count);
- `heal`:    `heal` of the uniform slice, distilled from the checkpoint, `--heal-steps` steps of
             `seqlen` tokens in bfloat16; its teacher and training time (per step) and peak RSS.

Calibration's cost is projected to SliceGPT's 128×2048 tokens from a shorter run: the per-token
phases (embed, forward, project, covariance, activations) scale linearly with the token count;
eigh, the weight reads and the setup (tokenizer, sampling) do not.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

from dimcut.bench.checkpoints import KEEP_FRACTION, PRESETS, Shape, ensure_checkpoint
from dimcut.bench.workers import machine, measure, run_worker
from dimcut.runtime import DEFAULT_MEMORY_BUDGET

SPARSITY = 1 - KEEP_FRACTION
# SliceGPT's calibration: 128 sequences of 2048 tokens.
REFERENCE_TOKENS = 128 * 2048
# Phases whose time is proportional to the token count; the others (one eigh per PCA signal,
# one weight read per block) and the setup outside every phase do not depend on it.
PER_TOKEN_PHASES = ("embed", "forward", "project", "covariance", "activations")
PHASES = ("read", "embed", "forward", "project", "covariance", "eigh", "activations")
PROJECTION = "total + (embed + forward + project + covariance + activations) × (T / tokens − 1)"


def worker_slice(workdir: Path, params: dict) -> dict:
    return _slice(params, params["output"], "uniform")


def _slice(params: dict, output: str, widths: str) -> dict:
    from dimcut.slicing import slice_model

    result, measured = measure(
        params,
        lambda: slice_model(
            params["checkpoint"],
            params["sparsity"],
            output,
            nsamples=params["nsamples"],
            seqlen=params["seqlen"],
            calib=None,
            memory_budget=params["memory_budget"],
            progress=False,
            widths=widths,
        ),
    )
    return {**measured, "timings": result.timings, "hidden_size": result.hidden_size}


def worker_forward(workdir: Path, params: dict) -> dict:
    from dimcut.calibration import streamed_forward

    timings, measured = measure(
        params,
        lambda: streamed_forward(
            params["checkpoint"],
            nsamples=params["nsamples"],
            seqlen=params["seqlen"],
            source=None,
            memory_budget=params["memory_budget"],
            progress=False,
        ),
    )
    return {**measured, "timings": timings.as_dict()}


def worker_verify(workdir: Path, params: dict) -> dict:
    from dimcut.verify import verify

    report = verify(params["output"])
    return {"passed": report.ok, "checks": [asdict(check) for check in report.checks]}


def worker_sensitivity(workdir: Path, params: dict) -> dict:
    return _slice(params, params["sensitivity_output"], "sensitivity")


def worker_heal(workdir: Path, params: dict) -> dict:
    from dimcut.healing import HealOptions, heal
    from dimcut.runtime import Precision

    options = HealOptions(
        steps=params["heal_steps"], seqlen=params["seqlen"], dtype=Precision.BFLOAT16
    )
    result, measured = measure(
        params,
        lambda: heal(
            params["output"],
            params["checkpoint"],
            params["healed_output"],
            options,
            progress=False,
        ),
    )
    return {
        **measured,
        "steps": result.steps,
        "tokens": result.tokens,
        "teacher_seconds": result.teacher_seconds,
        "training_seconds": result.training_seconds,
    }


CONTENDERS = {"slice": worker_slice, "forward": worker_forward}
# Run after those, on request (`--extra`): the heal trains the uniform slice's output.
EXTRAS = {"sensitivity": worker_sensitivity, "heal": worker_heal}


def project(timings: dict) -> float:
    """Seconds of the same run with REFERENCE_TOKENS tokens (PROJECTION)."""
    per_token = sum(timings[phase] for phase in PER_TOKEN_PHASES)
    return timings["total"] + per_token * (REFERENCE_TOKENS / timings["tokens"] - 1)


def contender_row(result: dict) -> dict:
    timings = result["timings"]
    return {
        "seconds": result["seconds"],
        "phases": timings,
        "tokens": timings["tokens"],
        "tokens_per_s": timings["tokens_per_second"],
        "projected_seconds": project(timings),
        "peak_rss_gib": result["peak_rss"] / 2**30,
        "rss_before_gib": result["rss_before"] / 2**30,
    }


def heal_row(result: dict) -> dict:
    trained = result["training_seconds"]
    return {
        "seconds": result["seconds"],
        "steps": result["steps"],
        "tokens": result["tokens"],
        "teacher_seconds": result["teacher_seconds"],
        "training_seconds": trained,
        "seconds_per_step": trained / result["steps"],
        "peak_rss_gib": result["peak_rss"] / 2**30,
        "rss_before_gib": result["rss_before"] / 2**30,
    }


def disk_needed(workdir: Path, shapes: list[Shape], tokens: int, extras: list[str]) -> int:
    """Checkpoints not built yet, the uniform slice's output (and one extra's beside it: each is
    deleted once measured), and the spilled activation stores (an upper bound: the memory budget
    keeps part of them in RAM): two, or one per layer input for the sensitivity's backward."""
    unbuilt = sum(s.checkpoint_bytes() for s in shapes if not checkpoint_dir(workdir, s).is_dir())
    largest = max(s.checkpoint_bytes() for s in shapes)
    stores = max(s.layers for s in shapes) + 2 if "sensitivity" in extras else 2
    outputs = 2 if extras else 1
    return unbuilt + outputs * largest + stores * tokens * shapes[0].hidden * 4


def checkpoint_dir(workdir: Path, shape: Shape) -> Path:
    return workdir / f"llama-d{shape.hidden}-l{shape.layers}-v{shape.vocab}"


def run_e2e(args, say=print) -> dict:
    preset = PRESETS[args.preset]
    layer_counts = args.layers or [preset.layers]
    shapes = [preset.with_overrides(layers=count, vocab=args.vocab) for count in layer_counts]
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="dimcut-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    tokens = args.nsamples * args.seqlen
    extras = args.extra or []
    free, need = shutil.disk_usage(workdir).free, disk_needed(workdir, shapes, tokens, extras)
    if free < need:
        raise ValueError(
            f"{workdir}: {free / 1e9:.1f} GB free, the run needs ≈ {need / 1e9:.1f} GB"
        )
    memory_budget = args.memory_budget or DEFAULT_MEMORY_BUDGET
    report: dict = {
        "suite": "e2e",
        "preset": args.preset,
        "shape": asdict(preset.with_overrides(vocab=args.vocab)),
        "sparsity": SPARSITY,
        "nsamples": args.nsamples,
        "seqlen": args.seqlen,
        "tokens": tokens,
        "reference_tokens": REFERENCE_TOKENS,
        "projection": f"seconds(T) = {PROJECTION}",
        "memory_budget": memory_budget,
        "extras": extras,
        "heal_steps": args.heal_steps if "heal" in extras else None,
        "threads": args.threads,
        "machine": machine(),
        "runs": [],
    }
    try:
        for shape in shapes:
            report["runs"].append(run_layers(workdir, shape, memory_budget, extras, args, say))
    finally:
        if not args.workdir and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    report["loadavg_end"] = machine()["loadavg"]
    return report


def run_layers(
    workdir: Path, shape: Shape, memory_budget: int, extras: list[str], args, say
) -> dict:
    """Build (or reuse) the checkpoint of `shape`, then slice, verify and forward it, and run
    the `extras`."""
    checkpoint = checkpoint_dir(workdir, shape)
    output = checkpoint.with_name(checkpoint.name + "-sliced")
    # Each extra writes beside the checkpoint; the heal's is `-heal`, the sensitivity's `-sensitivity`.
    extra_outputs = {name: checkpoint.with_name(f"{checkpoint.name}-{name}") for name in EXTRAS}
    outputs = [output, *(extra_outputs[name] for name in extras)]
    meta = ensure_checkpoint(checkpoint, shape, args.shard_size, tokenizer=True)
    say(
        f"{shape.layers} layers: checkpoint {meta['input_bytes'] / 1e9:.2f} GB in "
        f"{len(meta['shards'])} shard(s) ({checkpoint})"
    )
    params = {
        "threads": args.threads,
        "checkpoint": str(checkpoint),
        "output": str(output),
        "sensitivity_output": str(extra_outputs["sensitivity"]),
        "healed_output": str(extra_outputs["heal"]),
        "heal_steps": args.heal_steps,
        "sparsity": SPARSITY,
        "nsamples": args.nsamples,
        "seqlen": args.seqlen,
        "memory_budget": memory_budget,
    }
    for path in outputs:
        shutil.rmtree(path, ignore_errors=True)
        shutil.rmtree(path.with_name(path.name + ".dimcut-heal"), ignore_errors=True)
    rows, verified = {}, None
    try:
        for name, worker in CONTENDERS.items():
            result = run_worker(worker, workdir, params)
            rows[name] = contender_row(result)
            say(
                f"  {name:7s} {result['seconds']:.1f} s, peak RSS {rows[name]['peak_rss_gib']:.2f} GiB"
            )
            if name == "slice":
                rows[name]["hidden_size"] = result["hidden_size"]
                verified = run_worker(worker_verify, workdir, params)
                verified.pop("peak_rss")
        for name in extras:
            result = run_worker(EXTRAS[name], workdir, params)
            rows[name] = heal_row(result) if name == "heal" else contender_row(result)
            say(
                f"  {name:7s} {result['seconds']:.1f} s, peak RSS {rows[name]['peak_rss_gib']:.2f} GiB"
            )
            if name == "sensitivity":
                rows[name]["hidden_size"] = result["hidden_size"]
            if not args.keep:
                # Only the uniform slice is read again (by the heal); free the disk for the next.
                shutil.rmtree(extra_outputs[name], ignore_errors=True)
    finally:
        if not args.keep:
            for path in outputs:
                shutil.rmtree(path, ignore_errors=True)
    calibration, forward = rows["slice"], rows["forward"]
    eigh = calibration["phases"]["eigh"]
    projected = calibration["projected_seconds"]
    other = (
        calibration["seconds"] - calibration["phases"]["total"] - calibration["phases"]["rewrite"]
    )
    return {
        "layers": shape.layers,
        "checkpoint": str(checkpoint),
        "input_bytes": meta["input_bytes"],
        "shards": meta["shards"],
        "build_seconds": meta["build_seconds"],
        "contenders": rows,
        "verify": verified,
        "tokens_per_s_ratio": calibration["tokens_per_s"] / forward["tokens_per_s"],
        "eigh_seconds": eigh,
        "eigh_signals": 1 + 2 * shape.layers,
        "projected_calibration_seconds": projected,
        "projected_forward_seconds": forward["projected_seconds"],
        "projected_tokens_per_s_ratio": forward["projected_seconds"] / projected,
        "projected_slice_seconds": projected + calibration["phases"]["rewrite"] + other,
    }
