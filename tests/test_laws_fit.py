"""The sparsity laws: record loading, least squares and the fits (records, stats, fit)."""

from __future__ import annotations

import numpy as np
import pytest

from dimcut.laws import FitReport, fit_line, fit_records, load_records
from dimcut.laws.fit import PERPLEXITY
from dimcut.laws.stats import t_quantile
from laws_records import fit_of, law_records, record, write

# ------------------------------------------------------------------------------ least squares


def test_noisy_records_recover_the_law(tmp_path):
    rng = np.random.default_rng(0)
    s = np.linspace(0.05, 0.5, 40)
    records = law_records(
        "m", s, residuals=rng.normal(0, 0.01, 40), acc_residuals=rng.normal(0, 0.02, 40)
    )
    model = fit_of(tmp_path, records).model("m")
    ppl, acc = model.metric(PERPLEXITY).line, model.metric("arc_easy").line
    assert ppl.n == acc.n == 41  # the dense point is part of a free-intercept fit
    assert ppl.a == pytest.approx(-1.1, abs=4 * ppl.se_a)
    assert ppl.b == pytest.approx(0.97, abs=4 * ppl.se_b)
    assert acc.a == pytest.approx(-2.0, abs=4 * acc.se_a)
    assert acc.b == pytest.approx(0.03, abs=4 * acc.se_b)
    assert ppl.r2 > 0.95 and acc.r2 > 0.95
    assert 0.005 < ppl.rmse < 0.02


def test_standard_errors_shrink_with_more_points():
    rng = np.random.default_rng(1)

    def standard_errors(n: int) -> tuple[float, float]:
        s = np.linspace(0.05, 0.5, n)
        line = fit_line(s, -1.0 * s + 1.0 + rng.normal(0, 0.02, n))
        return line.se_a, line.se_b

    few, many = standard_errors(5), standard_errors(40)
    # Theory: SE ∝ 1/√n, a factor √8 ≈ 2.8 from 5 to 40 points.
    assert many[0] < few[0] / 1.8
    assert many[1] < few[1] / 1.8


def test_fit_line_matches_scipy_linregress():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(2)
    s = rng.uniform(0, 0.5, 12)
    y = 0.9 - 1.3 * s + rng.normal(0, 0.05, 12)
    line, reference = fit_line(s, y), stats.linregress(s, y)
    assert line.a == pytest.approx(reference.slope)
    assert line.b == pytest.approx(reference.intercept)
    assert line.se_a == pytest.approx(reference.stderr)
    assert line.se_b == pytest.approx(reference.intercept_stderr)
    assert line.r2 == pytest.approx(reference.rvalue**2)
    assert line.dof == 10


@pytest.mark.parametrize("metric,intercept", [(PERPLEXITY, 1.0), ("arc_easy", 0.0)])
def test_fixed_intercept_is_exact_on_noise_free_records(tmp_path, metric, intercept):
    s = [0.1, 0.2, 0.3, 0.4]
    records = law_records("m", s, a=-0.9, b=1.0, acc_a=-1.7, acc_b=0.0)
    fit = fit_of(tmp_path, records, fixed_intercept=True).model("m").metric(metric)
    line = fit.line
    assert line.fixed_intercept and line.b == intercept and line.se_b is None
    assert line.a == pytest.approx(-0.9 if metric == PERPLEXITY else -1.7, abs=1e-12)
    assert line.n == 4 and line.dof == 3  # the dense point is the constraint, not a point
    assert line.rmse == pytest.approx(0, abs=1e-12)
    assert line.se_a == pytest.approx(0, abs=1e-12)


def test_free_fit_is_exact_on_noise_free_records_and_theory_rmse(tmp_path):
    records = law_records("m", [0.1, 0.2, 0.3], a=-1.0, b=1.0)
    fit = fit_of(tmp_path, records).model("m").metric(PERPLEXITY)
    assert (fit.line.a, fit.line.b) == (pytest.approx(-1.0), pytest.approx(1.0))
    assert fit.theory_rmse == pytest.approx(0, abs=1e-12)
    assert fit.line.r2 == pytest.approx(1.0)


def test_t_quantile_without_scipy():
    assert t_quantile(0.975, 1) == pytest.approx(12.7062047, rel=1e-7)
    assert t_quantile(0.975, 10) == pytest.approx(2.2281389, rel=1e-7)
    assert t_quantile(0.995, 3) == pytest.approx(5.8409093, rel=1e-7)
    assert t_quantile(0.025, 10) == pytest.approx(-2.2281389, rel=1e-7)
    stats = pytest.importorskip("scipy.stats")
    for dof in (1, 2, 3, 7, 30, 200):
        for p in (0.6, 0.9, 0.975, 0.9995):
            assert t_quantile(p, dof) == pytest.approx(stats.t.ppf(p, dof), rel=1e-9)


@pytest.mark.parametrize("intercept", [None, 1.0])
def test_prediction_intervals_have_their_coverage(intercept):
    rng = np.random.default_rng(3)
    s = np.array([0.0, 0.1, 0.2, 0.3, 0.4]) if intercept is None else np.array([0.1, 0.2, 0.3])
    trials, covered = 4000, 0
    for _ in range(trials):
        line = fit_line(s, 1 - s + rng.normal(0, 0.03, len(s)), intercept=intercept)
        _, low, high = line.prediction_interval(0.35, 0.9)
        covered += low <= 1 - 0.35 + rng.normal(0, 0.03) <= high
    assert covered / trials == pytest.approx(0.9, abs=0.015)


# ---------------------------------------------------------------------------- degenerate input


def degenerate_cases() -> dict[str, tuple[list[dict], str]]:
    good = law_records("m", [0.1, 0.2])
    nan_ppl = law_records("m", [0.1, 0.2])
    nan_ppl[1]["perplexity"]["ppl"] = float("nan")
    return {
        "one sliced point": (law_records("m", [0.1]), "1 sliced point.*at least 2 sliced"),
        "no dense baseline": (good[1:], "model 'm': no dense baseline"),
        "acc0 = 0": (
            [record("m", 0.0, ppl=8.0, tasks={"arc_easy": 0.0}), *good[1:]],
            "accuracy = 0.0 .*needs acc > 0",
        ),
        "dense PPL ≤ 1": ([record("m", 0.0, ppl=1.0), *good[1:]], "PPL = 1.0 ≤ 1"),
        "sliced PPL ≤ 1": ([*good, record("m", 0.3, ppl=0.9)], "PPL = 0.9 ≤ 1"),
        "two dense models under one label": (
            [*good, record("m", 0.0, ppl=9.0, fingerprint="another")],
            "dense records of different models",
        ),
        "missing label": ([*good, record(None, 0.3, ppl=20.0)], "without model.label"),
        "NaN": (nan_ppl, "perplexity.ppl = nan is not finite"),
        "metric missing on the dense model": (
            [record("m", 0.0, tasks={"arc_easy": 0.7}), *good[1:]],
            "perplexity on wikitext2: measured on sliced models but not on the dense baseline",
        ),
        "different D": (
            [*good, record("m", 0.3, ppl=30.0, original_hidden_size=2048)],
            "D = 2048",
        ),
    }


@pytest.mark.parametrize("case", list(degenerate_cases()))
def test_degenerate_input_is_a_clear_error(tmp_path, case):
    records, message = degenerate_cases()[case]
    with pytest.raises(ValueError, match=message):
        fit_of(tmp_path, records)


def test_fit_line_refuses_too_few_points():
    with pytest.raises(ValueError, match="at least 3 points"):
        fit_line([0.0, 0.1], [1.0, 0.9])
    with pytest.raises(ValueError, match="2 or more distinct s"):
        fit_line([0.1, 0.1, 0.1], [1.0, 0.9, 0.8])
    with pytest.raises(ValueError, match="at least 2 points with s ≠ 0"):
        fit_line([0.1], [0.9], intercept=1.0)
    with pytest.raises(ValueError, match="finite"):
        fit_line([0.0, 0.1, float("nan")], [1.0, 0.9, 0.8])


# ----------------------------------------------------------------------------------- loading


def test_loading_searches_directories_and_skips_other_json(tmp_path):
    runs = write(tmp_path / "sweep" / "m", law_records("m", [0.1, 0.2]))
    (runs / "config.json").write_text('{"hidden_size": 4096}')
    (runs / "tokenizer.json").write_text("not json at all")
    records = load_records([tmp_path / "sweep", runs / "results-001.json"])
    assert len(records) == 3  # the file named twice is read once
    assert sorted(r.effective_sparsity for r in records) == [0.0, 0.1, 0.2]


def test_loading_errors(tmp_path):
    (tmp_path / "config.json").write_text('{"hidden_size": 4096}')
    with pytest.raises(ValueError, match="no dimcut.results/1 records found"):
        load_records([tmp_path])
    with pytest.raises(ValueError, match="not a dimcut.results/1 record"):
        load_records([tmp_path / "config.json"])
    with pytest.raises(FileNotFoundError):
        load_records([tmp_path / "missing"])
    (tmp_path / "future.json").write_text('{"schema": "dimcut.results/2"}')
    with pytest.raises(ValueError, match="unsupported schema"):
        load_records([tmp_path])


def test_labels_select_models(tmp_path):
    records = law_records("a", [0.1, 0.2]) + law_records("b", [0.1, 0.2], ppl0=12.0)
    assert [m.label for m in fit_of(tmp_path, records).models] == ["a", "b"]
    assert [m.label for m in fit_of(tmp_path / "2", records, labels=["b"]).models] == ["b"]
    with pytest.raises(ValueError, match="no records for model"):
        fit_of(tmp_path / "3", records, labels=["c"])


# ------------------------------------------------------------------------------ outputs


def test_fit_json_round_trip_and_table(tmp_path):
    report = fit_of(tmp_path, law_records("m", [0.1, 0.2, 0.3], residuals=[0.01, -0.02, 0.01]))
    report.save(tmp_path / "fit.json")
    loaded = FitReport.load(tmp_path / "fit.json")
    assert loaded == report
    table = report.table()
    for column in ("a", "b", "RMSE", "R²", "SE(a)", "SE(b)", "n", "1 − d/D"):
        assert column in table
    assert "| m | slicegpt | perplexity on wikitext2 (ppl) |" in report.markdown()


# ------------------------------------------------------------ variants, texts, merged records


def test_each_variant_and_text_gets_its_own_fit(tmp_path):
    texts = lambda s, wiki_a, other_a: {
        "wiki": 8.0 ** (1 / (1 + wiki_a * s)),
        "lambada": 40.0 ** (1 / (1 + other_a * s)),
    }
    records = [record("m", 0.0, texts=texts(0, 0, 0))]
    for s in (0.1, 0.2, 0.3):
        records.append(record("m", s, texts=texts(s, -1.0, -0.8)))
        records.append(record("m", s, fmt="plain", texts=texts(s, -1.5, -1.2)))
    report = fit_of(tmp_path, records)
    assert sorted(m.variant for m in report.models) == ["plain/raw", "slicegpt"]
    with pytest.raises(ValueError, match="several models"):
        report.model("m")
    slicegpt, plain = report.model("m", "slicegpt"), report.model(variant="plain/raw")
    assert slicegpt.metric(PERPLEXITY).text == "wiki"  # the headline text by default
    assert slicegpt.metric(PERPLEXITY, "lambada").line.a == pytest.approx(-0.8)
    assert plain.metric(PERPLEXITY, "wiki").line.a == pytest.approx(-1.5)
    assert plain.metric(PERPLEXITY, "lambada").line.n == 4  # shares the one dense record
    assert "| m | plain/raw | perplexity on lambada (ppl) | -1.200 |" in report.markdown()
    assert FitReport.from_dict(report.to_dict()) == report
    only = fit_records(load_records([tmp_path / "runs"]), variants=["plain/raw"])
    assert [m.variant for m in only.models] == ["plain/raw"]
    with pytest.raises(ValueError, match="no records of cut variant.*'plain/rms'"):
        fit_records(load_records([tmp_path / "runs"]), variants=["plain/rms"])


def test_records_of_one_model_in_several_files_are_merged(tmp_path):
    records = law_records("m", [0.1, 0.2, 0.3])
    tasks_only = [dict(r, perplexity=None) for r in records]
    ppl_only = [dict(r, tasks={}) for r in records]
    report = fit_of(tmp_path, [*ppl_only, *tasks_only])
    assert report.models == fit_of(tmp_path / "whole", records).models
    clash = dict(records[2], tasks={"arc_easy": {"headline_metric": "acc_norm", "headline": 0.1}})
    with pytest.raises(ValueError, match="disagree on task arc_easy"):
        fit_of(tmp_path / "clash", [*records, clash])


def test_a_metric_measured_in_two_precisions_is_refused(tmp_path):
    # Accuracies in bfloat16 beside float32 perplexities merge (each metric in one precision),
    # but one metric measured in float32 at some points and bfloat16 at others is no law.
    records = law_records("m", [0.1, 0.2, 0.3])
    ppl_only = [dict(r, tasks={}) for r in records]
    tasks_bf16 = [dict(r, perplexity=None, dtype="bfloat16") for r in records]
    report = fit_of(tmp_path, [*ppl_only, *tasks_bf16])
    assert report.models == fit_of(tmp_path / "whole", records).models
    mixed = [*records[:3], dict(records[3], dtype="bfloat16")]
    with pytest.raises(ValueError, match=r"perplexities on wikitext2 were measured in different"):
        fit_of(tmp_path / "mixed", mixed)
    mixed_tasks = [*tasks_bf16[:3], dict(tasks_bf16[3], dtype="float32")]
    with pytest.raises(ValueError, match=r"accuracies on task 'arc_easy' were measured in diff"):
        fit_of(tmp_path / "mixed-tasks", mixed_tasks)


def test_humaneval_pass_at_1_is_fitted_as_an_accuracy(tmp_path):
    """A generative task's headline (HumanEval's pass@1, as `dimcut eval` records it) follows
    the accuracy law ln(pass@1 / pass@1₀) = a·s + b like any task; a point where nothing
    passes is outside its domain (ln 0), a clear error."""

    def humaneval(s: float, rate: float) -> dict:
        entry = {"headline_metric": "pass@1", "headline": rate, "pass@1": rate, "n": 164}
        return {**record("coder", s), "tasks": {"humaneval": entry}}

    rates = {0.0: 0.4, 0.1: 0.4 * np.exp(-0.3), 0.2: 0.4 * np.exp(-0.6), 0.3: 0.4 * np.exp(-0.9)}
    report = fit_of(tmp_path, [humaneval(s, rate) for s, rate in rates.items()])
    fit = report.model("coder").metric("humaneval")
    assert (fit.measure, fit.baseline) == ("pass@1", 0.4)
    assert fit.line.a == pytest.approx(-3.0) and fit.line.b == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match=r"humaneval: accuracy = 0.0 .*needs acc > 0"):
        fit_of(tmp_path / "zero", [humaneval(s, r) for s, r in {**rates, 0.4: 0.0}.items()])
