"""`dimcut bench`: the command line of the benchmark suites."""

from __future__ import annotations

import argparse
from pathlib import Path

from dimcut.bench.calibration import run_calibration
from dimcut.bench.checkpoints import PRESETS
from dimcut.bench.e2e import EXTRAS as E2E_EXTRAS
from dimcut.bench.e2e import run_e2e
from dimcut.bench.inference import format_inference, run_inference
from dimcut.bench.report import format_table, passed, write_json
from dimcut.bench.slicing import CONTENDERS as SLICING_CONTENDERS
from dimcut.bench.slicing import run_slicing
from dimcut.runtime import Device, Precision

JSON_DEFAULT = Path("bench-out/bench.json")
DESCRIPTION = (
    "Benchmark dimcut: `slicing` (the engine against a PyTorch baseline and the GEMM limit), "
    "`calibration` (calibrate against a transformers forward on a real checkpoint), `e2e` "
    "(slice_model on a synthetic checkpoint of a real shape against the same streamed forward "
    "without PCA), `inference` (prefill, first-token latency and decode speed of dense and "
    "sliced models). Each contender runs in its own process; peak RSS is its own."
)
# Calibration size per suite when --nsamples/--seqlen are not given: SliceGPT's for the suites
# that measure calibration, a small one where slicing only makes the inference contenders.
CALIBRATION_DEFAULTS = {"inference": (16, 512)}
SLICEGPT_CALIBRATION = (128, 2048)


def layer_counts(value: str) -> list[int]:
    try:
        counts = [int(part) for part in value.split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected layer counts like 2 or 2,32, got {value!r}")
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"layer counts must be ≥ 1, got {value!r}")
    return counts


def extra_contenders(value: str) -> list[str]:
    names = [part for part in value.split(",") if part]
    unknown = sorted(set(names) - set(E2E_EXTRAS))
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown e2e extras {unknown or value!r}; choose from {', '.join(E2E_EXTRAS)}"
        )
    return [name for name in E2E_EXTRAS if name in names]  # the heal runs last


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--suite",
        choices=("slicing", "calibration", "e2e", "inference"),
        default="slicing",
        help="what to measure",
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="8b", help="model shape")
    parser.add_argument(
        "--layers",
        type=layer_counts,
        help="decoder layers (default: the preset's); e2e takes a list, e.g. 2,32, one run each",
    )
    parser.add_argument("--vocab", type=int, help="vocabulary size (default: the preset's)")
    parser.add_argument(
        "--contenders", default=",".join(SLICING_CONTENDERS), help="comma list (slicing suite)"
    )
    parser.add_argument(
        "--extra",
        type=extra_contenders,
        help="e2e: also run these after slice and forward, comma list of sensitivity (the slice "
        "with --widths sensitivity) and heal (the uniform slice healed, --heal-steps steps)",
    )
    parser.add_argument(
        "--heal-steps", type=int, default=2, help="e2e --extra heal: training steps (default 2)"
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs per contender (median)")
    parser.add_argument(
        "--memory-budget",
        type=int,
        help="bytes: the engine's (slicing suite, default 512 MiB) or slice_model's (e2e, "
        "default dimcut's)",
    )
    parser.add_argument("--shard-size", type=int, default=5 * 10**9, help="bytes per shard")
    parser.add_argument("--threads", type=int, default=None, help="threads (default: all)")
    parser.add_argument("--gemm-repeat", type=int, default=2, help="best of N per GEMM shape")
    parser.add_argument("--no-baseline-fsync", action="store_true", help="the baseline skips fsync")
    parser.add_argument("--no-check", action="store_true", help="skip the output comparison")
    parser.add_argument("--workdir", help="build/reuse the checkpoints here (default: temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep outputs and temp files")
    parser.add_argument("--json", type=Path, default=JSON_DEFAULT, help="write results here")
    parser.add_argument("--quiet", action="store_true", help="print only the table")
    calib = parser.add_argument_group("calibration, e2e and inference suites")
    calib.add_argument(
        "--model-dir",
        default="~/.cache/dimcut/SmolLM2-135M-Instruct",
        help="dense checkpoint (calibration suite; inference suite: sliced first, a zoo alias "
        "such as smollm2 works)",
    )
    calib.add_argument(
        "--nsamples", type=int, help="calibration sequences (default 128; inference suite: 16)"
    )
    calib.add_argument(
        "--seqlen", type=int, help="tokens per sequence (default 2048; inference suite: 512)"
    )
    calib.add_argument("--width", type=int, default=432, help="sliced width (calibration suite)")
    infer = parser.add_argument_group("inference suite")
    infer.add_argument(
        "--models",
        help="name=DIR,... checkpoints to compare (dense or sliced, either format; zoo aliases "
        "work); default: --model-dir and its slices at --sparsities × --formats",
    )
    infer.add_argument(
        "--sparsities", default="0.25", help="slice --model-dir at these, e.g. 0.25 or 0.1,0.25"
    )
    infer.add_argument(
        "--formats", default="plain,slicegpt", help="slice --model-dir into these formats"
    )
    infer.add_argument("--prompt-tokens", type=int, default=512, help="tokens per prompt")
    infer.add_argument("--new-tokens", type=int, default=128, help="greedy tokens generated")
    infer.add_argument("--batch-sizes", default="1,8", help="decode batch sizes")
    infer.add_argument(
        "--device",
        default=Device.AUTO.value,
        choices=[d.value for d in Device],
        help="compute device (auto: CUDA when present)",
    )
    infer.add_argument(
        "--dtype",
        default=Precision.FLOAT32.value,
        choices=Precision.values(),
        help="weights and activations",
    )


def run(args: argparse.Namespace) -> int:
    say = print if not args.quiet else (lambda *a, **k: None)
    nsamples, seqlen = CALIBRATION_DEFAULTS.get(args.suite, SLICEGPT_CALIBRATION)
    args.nsamples = nsamples if args.nsamples is None else args.nsamples
    args.seqlen = seqlen if args.seqlen is None else args.seqlen
    if args.suite == "calibration":
        report = run_calibration(args)
    elif args.suite == "e2e":
        report = run_e2e(args, say)
    elif args.suite == "inference":
        report = run_inference(args, say)
    else:
        report = run_slicing(args, say)
    print(format_inference(report) if args.suite == "inference" else format_table(report))
    write_json(report, args.json)
    print(f"wrote {args.json}")
    return 0 if passed(report) else 1


def add_commands(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        description=DESCRIPTION,
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dimcut-bench", description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv))
