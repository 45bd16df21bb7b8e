"""`dimcut bench` end to end on the tiny preset: every JSON field present, outputs agree.

A benchmark, not a timed test: nothing here asserts a speed or a memory figure.
"""

from __future__ import annotations

import json
import math

from dimcut.bench import PRESETS
from dimcut.cli import main

CONTENDER_FIELDS = {
    "seconds",
    "seconds_all",
    "input_gb_per_s",
    "gflop_per_s",
    "gemm_fraction",
    "peak_rss_gib",
    "rss_before_gib",
    "phases",
    "rotation_gflop_per_s",
    "rotation_gemm_fraction",
}


def test_bench_tiny_preset_reports_every_field(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", "--preset", "tiny", "--workdir", str(tmp_path / "w"), "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    table = capsys.readouterr().out
    assert "| engine |" in table and "| torch |" in table and "check PASSED" in table

    shape = PRESETS["tiny"]
    assert report["suite"] == "slicing" and report["shape"]["hidden"] == shape.hidden
    assert report["kept"] == shape.kept and report["input_bytes"] == shape.checkpoint_bytes()
    for key in ("flops", "gemm_shapes", "shards", "memory_budget", "machine", "speedup"):
        assert key in report, key
    assert report["flops"] > 0
    assert math.isclose(report["time_ratio"] * report["speedup"], 1.0)
    for name in ("engine", "torch"):
        row = report["contenders"][name]
        assert CONTENDER_FIELDS <= set(row), CONTENDER_FIELDS - set(row)
        assert row["seconds"] > 0 and row["peak_rss_gib"] > 0
    engine_phases = report["contenders"]["engine"]["phases"]
    assert {"matmul_seconds", "convert_seconds", "write_seconds", "sync_seconds"} <= set(
        engine_phases
    )
    assert "fsync_seconds" in report["contenders"]["torch"]["phases"]
    gemm = report["gemm"]
    assert gemm["torch_gflop_per_s"] > 0 and gemm["numpy_gflop_per_s"] > 0
    assert gemm["limit_gflop_per_s"] == max(gemm["torch_gflop_per_s"], gemm["numpy_gflop_per_s"])

    check = report["check"]
    assert check["passed"] and check["same_names"] and not check["mismatches"]
    assert check["tensors"] == 3 + 9 * shape.layers  # every output tensor was compared
    assert check["max_rel_err"] <= check["tolerance"]
    # Outputs are removed unless --keep; the reusable checkpoint stays in --workdir.
    assert not (tmp_path / "w" / "out-engine").exists()
    assert (tmp_path / "w" / "src" / "config.json").is_file()
