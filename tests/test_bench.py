"""`dimcut bench` end to end on the tiny preset: every JSON field present, outputs agree.

A benchmark, not a timed test: nothing here asserts a speed or a memory figure.
"""

from __future__ import annotations

import ast
import json
import math
import subprocess
import sys
from pathlib import Path

import dimcut
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


E2E_PHASES = {"read", "embed", "forward", "project", "covariance", "eigh", "activations", "total"}


def test_bench_e2e_tiny_slices_verifies_and_times_every_phase(tmp_path, capsys):
    out = tmp_path / "e2e.json"
    argv = ["bench", "--suite", "e2e", "--preset", "tiny", "--nsamples", "2", "--seqlen", "32"]
    code = main([*argv, "--workdir", str(tmp_path / "w"), "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    table = capsys.readouterr().out
    assert "| 2 | slice |" in table and "| 2 | forward |" in table
    assert "dimcut verify PASSED" in table

    assert report["suite"] == "e2e" and report["tokens"] == 2 * 32
    (run,) = report["runs"]
    assert run["layers"] == PRESETS["tiny"].layers and run["verify"]["passed"]
    checks = {check["name"] for check in run["verify"]["checks"]}
    assert checks == {"headers", "manifest", "shapes", "layer"}
    sliced, forward = run["contenders"]["slice"], run["contenders"]["forward"]
    assert E2E_PHASES | {"rewrite", "tokens", "tokens_per_second"} <= set(sliced["phases"])
    assert E2E_PHASES <= set(forward["phases"])
    assert sliced["hidden_size"] == PRESETS["tiny"].kept
    for row in (sliced, forward):
        assert row["tokens"] == 64 and row["tokens_per_s"] > 0 and row["peak_rss_gib"] > 0
        assert row["phases"]["forward"] > 0 and row["phases"]["total"] > row["phases"]["forward"]
    # Calibration computes covariances and eigendecompositions; the plain forward does not.
    assert sliced["phases"]["eigh"] > 0 and forward["phases"]["eigh"] == 0
    assert sliced["phases"]["rewrite"] > 0
    assert math.isclose(run["tokens_per_s_ratio"], sliced["tokens_per_s"] / forward["tokens_per_s"])
    # Projection: eigh, reads and setup stay; the per-token phases grow with the tokens.
    phases = sliced["phases"]
    per_token = sum(phases[k] for k in ("embed", "forward", "project", "covariance", "activations"))
    expected = phases["total"] + per_token * (report["reference_tokens"] / 64 - 1)
    assert math.isclose(run["projected_calibration_seconds"], expected)
    assert run["projected_calibration_seconds"] > phases["total"]
    assert math.isclose(
        run["projected_tokens_per_s_ratio"],
        forward["projected_seconds"] / run["projected_calibration_seconds"],
    )
    # The output is removed unless --keep; the checkpoint and its tokenizer stay for reuse.
    checkpoint = tmp_path / "w" / "llama-d64-l2-v256"
    assert (checkpoint / "tokenizer.json").is_file()
    assert not checkpoint.with_name(checkpoint.name + "-sliced").exists()


def test_bench_e2e_extras_run_the_sensitivity_slice_and_the_heal(tmp_path, capsys):
    out = tmp_path / "e2e.json"
    argv = ["bench", "--suite", "e2e", "--preset", "tiny", "--nsamples", "2", "--seqlen", "32"]
    argv += ["--extra", "heal,sensitivity", "--heal-steps", "3"]
    assert main([*argv, "--workdir", str(tmp_path / "w"), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["extras"] == ["sensitivity", "heal"] and report["heal_steps"] == 3
    (run,) = report["runs"]
    sensitivity, heal = run["contenders"]["sensitivity"], run["contenders"]["heal"]
    assert sensitivity["hidden_size"] == PRESETS["tiny"].kept
    assert sensitivity["phases"]["widths"] > sensitivity["phases"]["sensitivity"]["backward"] > 0
    assert heal["steps"] == 3 and heal["tokens"] == 3 * 32
    assert 0 < heal["training_seconds"] < heal["seconds"] and heal["teacher_seconds"] > 0
    assert math.isclose(heal["seconds_per_step"], heal["training_seconds"] / 3)
    assert heal["peak_rss_gib"] > 0
    table = capsys.readouterr().out
    assert "| 2 | sensitivity |" in table and "heal 3 steps of 32 tokens" in table
    # Every output goes unless --keep: the checkpoint and its build record stay for reuse.
    left = sorted(p.name for p in (tmp_path / "w").iterdir())
    assert left == ["llama-d64-l2-v256", "llama-d64-l2-v256.json"]


def test_bench_tokenizer_ids_fit_the_vocabulary(tmp_path):
    from transformers import AutoTokenizer

    from dimcut.bench.checkpoints import write_tokenizer
    from dimcut.calibration import calibration_documents

    token_ids = write_tokenizer(tmp_path, 256)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    documents, _ = calibration_documents(None)
    ids = tokenizer("\n\n".join(documents[:50]))["input_ids"]
    assert ids[0] == token_ids["bos_token_id"] and max(ids) < 256 and len(ids) > 1000


def test_slicing_suite_refuses_several_layer_counts(tmp_path, capsys):
    code = main(["bench", "--layers", "2,4", "--workdir", str(tmp_path), "--json", "x.json"])
    assert code == 1 and "--layers" in capsys.readouterr().err
    assert not (tmp_path / "src").exists()


def test_runtime_modules_never_import_the_bench():
    """`dimcut.bench` is a harness: only the CLI's command table names it (as a string)."""
    package = Path(dimcut.__file__).parent
    for path in package.rglob("*.py"):
        if "bench" in path.relative_to(package).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            assert not any(n.startswith("dimcut.bench") for n in names), path


def test_importing_the_bench_does_not_import_torch():
    """Worker processes import their suite module: the engine's must not load torch."""
    code = "import sys, dimcut.bench.slicing; print('torch' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-P", "-c", code], check=False, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


INFERENCE_TIMINGS = {
    "first_token_s",
    "prefill_tokens_per_s",
    "decode_s",
    "decode_tokens_per_s",
    "decode_median_step_s",
    "first_token_cpu_s",
    "decode_cpu_s",
    "decode_tokens_per_cpu_s",
    "generate_s",
}
INFERENCE_FIELDS = {
    "model_dir",
    "format",
    "sparsity",
    "device",
    "threads",
    "parameters",
    "flops",
    "load_s",
    "batches",
    "batches_all",
    "peak_rss_gib",
    "rss_loaded_gib",
    "rss_before_gib",
}


def test_bench_inference_tiny_dense_plain_and_slicegpt(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "inference.json"
    argv = ["bench", "--suite", "inference", "--model-dir", str(tiny_llama_dir)]
    argv += ["--nsamples", "2", "--seqlen", "32", "--prompt-tokens", "24", "--new-tokens", "4"]
    argv += ["--batch-sizes", "2,1", "--workdir", str(tmp_path / "w"), "--json", str(out)]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    table = capsys.readouterr().out
    for row in ("dense", "plain-s25", "slicegpt-s25", "slicegpt-s25, shortcuts folded"):
        assert f"| {row} |" in table, row
    assert "slicegpt-s25 / plain-s25 decode" in table

    assert report["suite"] == "inference" and report["batch_sizes"] == [1, 2]
    assert report["reference"] == "dense" and report["slicing"]["nsamples"] == 2
    assert "tokenizer" in report["prompts"] and len(report["machine"]["loadavg"]) == 3
    rows = report["contenders"]
    assert list(rows) == ["dense", "plain-s25", "slicegpt-s25"]
    for name, row in rows.items():
        assert INFERENCE_FIELDS <= set(row), INFERENCE_FIELDS - set(row)
        assert row["device"] == "cpu" and row["peak_rss_gib"] >= row["rss_loaded_gib"] > 0
        for timings in (row["batches"], *row["batches_all"]):
            assert set(timings) == {"1", "2"}
            for timing in timings.values():
                assert set(timing) == INFERENCE_TIMINGS
                assert all(value > 0 for value in timing.values()), (name, timing)
                assert timing["generate_s"] > timing["first_token_s"] + timing["decode_s"] * 0.99
    assert [rows[name]["format"] for name in rows] == ["dense", "plain", "slicegpt"]

    # Parameters from the headers; shortcuts only in slicegpt (2 per layer, d×d or d×D).
    dense, plain, sliced = (rows[name] for name in ("dense", "plain-s25", "slicegpt-s25"))
    layers, hidden, width = 2, 64, 48
    assert plain["parameters"]["hidden_size"] == sliced["parameters"]["hidden_size"] == width
    assert plain["parameters"]["shortcuts"] == plain["flops"]["shortcut_parameters"] == 0
    shortcuts = (2 * layers - 1) * width * width + width * hidden  # the last one feeds the head
    assert sliced["parameters"]["shortcuts"] == sliced["flops"]["shortcut_parameters"] == shortcuts
    assert plain["parameters"]["total"] < dense["parameters"]["total"]
    folded = sliced["folded"]
    assert (folded["folded_shortcuts"], folded["kept_shortcuts"]) == (2 * layers - 1, 1)
    assert folded["flops"]["shortcut_parameters"] == width * hidden
    assert sliced["flops"]["decode_flops_per_token"] - folded["flops"][
        "decode_flops_per_token"
    ] == (2 * (2 * layers - 1) * width * width)

    (pair,) = report["shortcuts"]
    assert (pair["slicegpt"], pair["plain"]) == ("slicegpt-s25", "plain-s25")
    for batch in ("1", "2"):
        expected = (
            sliced["batches"][batch]["decode_tokens_per_s"]
            / plain["batches"][batch]["decode_tokens_per_s"]
        )
        assert math.isclose(pair["decode_ratio"][batch], expected)
        cpu = (
            sliced["batches"][batch]["decode_tokens_per_cpu_s"]
            / plain["batches"][batch]["decode_tokens_per_cpu_s"]
        )
        assert math.isclose(pair["decode_ratio_cpu"][batch], cpu)
    assert 0 < pair["shortcut_flop_share"] < pair["shortcut_weight_share"] < 1
    ratios = report["ratios"]["plain-s25"]
    assert math.isclose(
        ratios["parameter_ratio"], plain["parameters"]["total"] / dense["parameters"]["total"]
    )
    assert report["ratios"]["dense"]["decode_speedup"] == {"1": 1.0, "2": 1.0}
    assert (tmp_path / "w" / "slicegpt-s25" / "config.json").is_file()  # --workdir keeps slices


def test_bench_inference_refuses_bad_models_and_foreign_slices(tiny_llama_dir, tmp_path, capsys):
    base = ["bench", "--suite", "inference", "--json", str(tmp_path / "x.json")]
    assert main([*base, "--models", f"dense{tiny_llama_dir}"]) == 1
    assert "--models: expected name=DIR" in capsys.readouterr().err
    assert main([*base, "--models", f"a={tiny_llama_dir},a={tiny_llama_dir}"]) == 1
    assert "repeated: a" in capsys.readouterr().err
    assert main([*base, "--models", f"a={tmp_path}"]) == 1
    assert "no config.json" in capsys.readouterr().err
    # A slice in --workdir made from other inputs is not reused, nor overwritten.
    foreign = tmp_path / "w" / "plain-s25"
    foreign.mkdir(parents=True)
    (foreign / "config.json").write_text(json.dumps({"dimcut": {"format": "plain"}}))
    argv = [*base, "--model-dir", str(tiny_llama_dir), "--workdir", str(tmp_path / "w")]
    assert main([*argv, "--formats", "plain"]) == 1
    assert "holds another slice" in capsys.readouterr().err
    assert main([*argv, "--formats", "plain", "--sparsities", "1.5"]) == 1
    assert "--sparsities" in capsys.readouterr().err


def test_gap_closed_is_the_fraction_of_the_slicegpt_to_plain_gap_folding_recovers():
    from dimcut.bench.inference import gap_closed

    closed = gap_closed({"1": 10.0, "8": 40.0}, {"1": 12.0, "8": 40.0}, {"1": 11.5, "8": 41.0})
    assert closed == {"1": 0.75, "8": None}  # no gap at batch 8: nothing to close
