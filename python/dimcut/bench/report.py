"""Printing a suite's report as a Markdown table and writing it as JSON."""

from __future__ import annotations

import json
from pathlib import Path

from dimcut.bench.e2e import PHASES, PROJECTION
from dimcut.runtime import atomic_write_text

COLUMNS = {
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


def markdown(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cells) + " |" for cells in rows]


def cell(value, fmt: str) -> str:
    return "—" if value is None else fmt.format(value)


def rate(value: float) -> str:
    """Three significant digits below 100 (short runs on big models are slow), else whole."""
    return f"{value:.3g}" if value < 100 else f"{value:,.0f}"


def format_table(report: dict) -> str:
    if report["suite"] == "e2e":
        return format_e2e(report)
    columns = COLUMNS[report["suite"]]
    rows = [
        [name] + [cell(row.get(key), fmt) for key, _, fmt in columns]
        for name, row in report["contenders"].items()
    ]
    lines = markdown(["contender"] + [title for _, title, _ in columns], rows)
    if report["suite"] == "slicing":
        lines += slicing_notes(report)
    else:
        lines.append(f"\ncalibrate/forward time ratio {report['time_ratio']:.2f}")
        lines.append(f"calibrate float32/bfloat16 time ratio {report['bf16_speedup']:.2f}")
    return "\n".join(lines)


def slicing_notes(report: dict) -> list[str]:
    lines = []
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
    return lines


def format_e2e(report: dict) -> str:
    header = ["layers", "contender", "wall s", *PHASES, "calib. total", "rewrite"]
    header += ["tokens/s", "peak RSS GiB"]
    rows = []
    for run in report["runs"]:
        for name, row in run["contenders"].items():
            if "phases" not in row:  # the heal: its own line below
                continue
            phases = row["phases"]
            rows.append(
                [str(run["layers"]), name, f"{row['seconds']:.2f}"]
                + [f"{phases[phase]:.2f}" for phase in PHASES]
                + [f"{phases['total']:.2f}", cell(phases.get("rewrite"), "{:.2f}")]
                + [rate(row["tokens_per_s"]), f"{row['peak_rss_gib']:.2f}"]
            )
    reference = report["reference_tokens"]
    lines = markdown(header, rows)
    lines.append(
        f"\n{report['nsamples']}×{report['seqlen']} = {report['tokens']} calibration tokens, "
        f"sparsity {report['sparsity']:g}, memory budget {report['memory_budget'] / 2**30:.2f} GiB"
    )
    lines.append(
        f"projection to T = {reference} tokens (128×2048): seconds(T) = {PROJECTION} "
        "(eigh, weight reads and setup do not depend on the token count)"
    )
    for run in report["runs"]:
        slice_row, forward = run["contenders"]["slice"], run["contenders"]["forward"]
        verdict = "PASSED" if run["verify"]["passed"] else "FAILED"
        lines.append(
            f"{run['layers']} layers: calibration {rate(slice_row['tokens_per_s'])} tokens/s, "
            f"forward {rate(forward['tokens_per_s'])} tokens/s, ratio "
            f"{run['tokens_per_s_ratio']:.3f}; eigh {run['eigh_seconds']:.2f} s "
            f"({run['eigh_signals']} signals)"
        )
        lines.append(
            f"  projected to {reference} tokens: calibration "
            f"{run['projected_calibration_seconds']:.0f} s, forward "
            f"{run['projected_forward_seconds']:.0f} s (tokens/s ratio "
            f"{run['projected_tokens_per_s_ratio']:.3f}), slice (calibration + rewrite + rest) "
            f"{run['projected_slice_seconds']:.0f} s; dimcut verify {verdict}"
        )
        heal = run["contenders"].get("heal")
        if heal:
            lines.append(
                f"  heal {heal['steps']} steps of {heal['tokens'] // heal['steps']} tokens "
                f"(bfloat16): {heal['seconds']:.0f} s, teacher {heal['teacher_seconds']:.0f} s, "
                f"training {heal['seconds_per_step']:.1f} s/step, peak RSS "
                f"{heal['peak_rss_gib']:.2f} GiB"
            )
    if len(report["runs"]) > 1:
        for name in report["runs"][0]["contenders"]:
            peaks = ", ".join(
                f"{run['layers']} layers {run['contenders'][name]['peak_rss_gib']:.2f} GiB"
                for run in report["runs"]
            )
            lines.append(f"peak RSS of {name}: {peaks}")
    return "\n".join(lines)


def write_json(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(report, indent=2) + "\n")


def passed(report: dict) -> bool:
    """False when an output check of the report failed."""
    check = report.get("check")
    verified = [run["verify"]["passed"] for run in report.get("runs", [])]
    return (check is None or check["passed"]) and all(verified)
