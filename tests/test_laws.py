"""The sparsity laws: record loading, least squares, predictions, plots and the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from dimcut import laws
from dimcut.laws import (
    PERPLEXITY,
    FitReport,
    fit_line,
    fit_records,
    load_records,
    max_sparsity,
    plot_fits,
    predict,
    t_quantile,
)

D = 4096


def record(
    label: str | None,
    s: float,
    *,
    ppl: float | None = None,
    tasks: dict[str, float] | None = None,
    fingerprint: str | None = None,
    original_hidden_size: int = D,
) -> dict:
    """A `dimcut.results/1` record as `dimcut eval` writes it."""
    return {
        "schema": "dimcut.results/1",
        "model": {
            "path": f"/models/{label}-{s}",
            "label": label,
            "fingerprint": fingerprint or f"{label}@{s}",
            "format": "dense" if s == 0 else "slicegpt",
            "sparsity": s,
            "effective_sparsity": s,
            "hidden_size": round((1 - s) * original_hidden_size),
            "original_hidden_size": original_hidden_size,
        },
        "perplexity": None
        if ppl is None
        else {"source": "wikitext2", "seqlen": 2048, "windows": 10, "ppl": ppl},
        "tasks": {
            task: {"headline_metric": "acc_norm", "headline": acc, "acc_norm": acc}
            for task, acc in (tasks or {}).items()
        },
    }


def write(directory: Path, records: list[dict]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for i, rec in enumerate(records):
        (directory / f"results-{i:03d}.json").write_text(json.dumps(rec))
    return directory


def law_records(
    label: str,
    sparsities,
    *,
    ppl0: float = 8.0,
    a: float = -1.1,
    b: float = 0.97,
    acc0: float = 0.7,
    acc_a: float = -2.0,
    acc_b: float = 0.03,
    residuals=None,
    acc_residuals=None,
) -> list[dict]:
    """A dense record plus sliced ones whose y follow the laws plus the given residuals."""
    residuals = np.zeros(len(sparsities)) if residuals is None else residuals
    acc_residuals = np.zeros(len(sparsities)) if acc_residuals is None else acc_residuals
    records = [record(label, 0.0, ppl=ppl0, tasks={"arc_easy": acc0})]
    for s, r, r_acc in zip(sparsities, residuals, acc_residuals):
        ppl = ppl0 ** (1 / (a * s + b + r))
        acc = acc0 * math.exp(acc_a * s + acc_b + r_acc)
        records.append(record(label, float(s), ppl=ppl, tasks={"arc_easy": acc}))
    return records


def fit_of(tmp_path: Path, records: list[dict], **options) -> FitReport:
    return fit_records(load_records([write(tmp_path / "runs", records)]), **options)


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


# -------------------------------------------------------------------------------- predictions


def exact_fit_records(
    label: str, ppl0: float, a: float, b: float, acc0: float, acc_a: float, acc_b: float
):
    """Records whose least-squares fits are exactly (a, b) and (acc_a, acc_b).

    The dense point's residual is r0 = y(0) − b; the residuals (r0, −3r0/2, 0, r0/2) at
    s = (0, 0.1, 0.2, 0.3) sum to 0 and are orthogonal to s, so OLS returns the line.
    """

    def residuals(r0: float) -> list[float]:
        return [-1.5 * r0, 0.0, r0 / 2]

    return law_records(
        label,
        [0.1, 0.2, 0.3],
        ppl0=ppl0,
        a=a,
        b=b,
        acc0=acc0,
        acc_a=acc_a,
        acc_b=acc_b,
        residuals=residuals(1 - b),
        acc_residuals=residuals(0 - acc_b),
    )


# arXiv 2503.04377 Table 3: perplexity (a, b) and ARC-e (a, b). The paper lists no dense PPL or
# accuracy; PPL0 = 8.3 / 6.0 and acc0 = 0.80 / 0.82 are assumed. At s = 0.25 the laws imply
# PPL = PPL0^(1/(0.25a + b)) and acc = acc0·exp(0.25a + b), computed by hand:
PAPER = {
    # Llama: 8.3^(1/0.69) = exp(2.116256/0.69); 0.80·exp(−0.495)
    "Llama-3-8B-Instruct": ((8.3, -1.08, 0.96, 0.80, -2.14, 0.04), 21.47817, 0.487657),
    # Phi-3: 6.0^(1/0.795) = exp(1.791759/0.795); 0.82·exp(−0.42)
    "Phi-3-mini-4k-Instruct": ((6.0, -0.90, 1.02, 0.82, -1.84, 0.04), 9.52372, 0.538778),
}


@pytest.mark.parametrize("label", list(PAPER))
def test_paper_coefficients_give_the_values_they_imply(tmp_path, label):
    law, ppl_expected, acc_expected = PAPER[label]
    _, a, b, _, acc_a, acc_b = law
    model = fit_of(tmp_path, exact_fit_records(label, *law)).model(label)
    ppl_line, acc_line = model.metric(PERPLEXITY).line, model.metric("arc_easy").line
    assert (ppl_line.a, ppl_line.b) == (pytest.approx(a), pytest.approx(b))
    assert (acc_line.a, acc_line.b) == (pytest.approx(acc_a), pytest.approx(acc_b))

    ppl, acc = predict(model, 0.25)
    assert ppl.value == pytest.approx(ppl_expected, rel=1e-5)
    assert acc.value == pytest.approx(acc_expected, rel=1e-5)
    for prediction in (ppl, acc):
        assert prediction.interval[0] < prediction.value < prediction.interval[1]
        assert not prediction.extrapolated
        assert prediction.hidden_size == 3072  # floor(0.75 · 4096), a multiple of 8


def test_inverse_predictions_round_trip(tmp_path):
    rng = np.random.default_rng(4)
    s = np.linspace(0.05, 0.4, 8)
    noise = {"residuals": rng.normal(0, 0.01, 8), "acc_residuals": rng.normal(0, 0.01, 8)}
    model = fit_of(tmp_path, law_records("m", s, **noise)).model("m")  # D = 4096 from records
    without_width = laws.ModelFit(model.label, None, model.metrics)

    for metric, budget in ((PERPLEXITY, 20.0), ("arc_easy", 0.5)):
        solved = max_sparsity(without_width, metric, budget)
        assert solved.hidden_size is None and solved.budget == budget
        (again,) = predict(without_width, solved.sparsity, metrics=[metric])
        assert again.value == pytest.approx(budget)

        # With D known the width is rounded up to a multiple of 8: the cut stays within budget.
        cut = max_sparsity(model, metric, budget)
        assert cut.hidden_size % 8 == 0
        assert (1 - solved.sparsity) * D <= cut.hidden_size < (1 - solved.sparsity) * D + 8
        assert cut.sparsity == pytest.approx(1 - cut.hidden_size / D)
        assert cut.value <= budget if metric == PERPLEXITY else cut.value >= budget


def test_extrapolation_is_flagged_then_refused(tmp_path):
    model = fit_of(tmp_path, law_records("m", [0.1, 0.2, 0.3, 0.4])).model("m")
    assert not predict(model, 0.4)[0].extrapolated
    assert all(p.extrapolated for p in predict(model, 0.45))  # within 25 % of the range
    with pytest.raises(ValueError, match="beyond the fitted range.*--allow-extrapolation"):
        predict(model, 0.55)
    assert predict(model, 0.55, allow_extrapolation=True)[0].extrapolated
    with pytest.raises(ValueError, match="--allow-extrapolation"):
        max_sparsity(model, PERPLEXITY, 1e6)


def test_prediction_errors(tmp_path):
    model = fit_of(tmp_path, law_records("m", [0.1, 0.2, 0.3], a=-3.0, b=1.0)).model("m")
    with pytest.raises(ValueError, match="unbounded perplexity"):
        predict(model, 0.35, metrics=[PERPLEXITY])  # a·s + b = −0.05
    with pytest.raises(ValueError, match="no sparsity meets"):
        max_sparsity(model, PERPLEXITY, 7.0)  # below PPL0 = 8
    with pytest.raises(ValueError, match="must exceed 1"):
        max_sparsity(model, PERPLEXITY, 1.0)
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        max_sparsity(model, "arc_easy", 1.5)
    with pytest.raises(ValueError, match="no fit for 'hellaswag'"):
        max_sparsity(model, "hellaswag", 0.5)
    with pytest.raises(ValueError, match="confidence"):
        predict(model, 0.2, confidence=1.0)
    rising = fit_of(tmp_path / "rising", law_records("m", [0.1, 0.2, 0.3], a=0.5)).model("m")
    with pytest.raises(ValueError, match="slope a = .* ≥ 0"):
        max_sparsity(rising, PERPLEXITY, 10.0)


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
            "perplexity: measured on sliced models but not on the dense baseline",
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
    assert "| m | perplexity (ppl) |" in report.markdown()


def test_plots_are_png_and_svg(tmp_path):
    records = law_records("a", [0.1, 0.2, 0.3]) + law_records("b", [0.1, 0.2, 0.3], a=-0.9)
    written = plot_fits(fit_of(tmp_path, records), tmp_path / "fig.png")
    png, svg = written
    assert (png.name, svg.name) == ("fig.png", "fig.svg")
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") and png.stat().st_size > 10_000
    assert "<svg" in svg.read_text() and svg.stat().st_size > 10_000
    with pytest.raises(ValueError, match=".png and .svg"):
        plot_fits(fit_of(tmp_path / "2", records), tmp_path / "fig.pdf")


# ---------------------------------------------------------------------------------------- CLI


def test_cli_fit_and_predict(tmp_path, capsys):
    from dimcut.cli import main

    runs = write(
        tmp_path / "runs", law_records("m", [0.1, 0.2, 0.3], residuals=[0.01, -0.02, 0.01])
    )
    out, md, fig = tmp_path / "fit.json", tmp_path / "fit.md", tmp_path / "fig.png"
    argv = ["fit", str(runs), "--out", str(out), "--markdown", str(md), "--plot", str(fig)]
    assert main(argv) == 0
    assert "perplexity (ppl)" in capsys.readouterr().out
    assert json.loads(out.read_text())["schema"] == "dimcut.fit/1"
    assert md.read_text().startswith("# Sparsity-law fits")
    assert fig.exists() and fig.with_suffix(".svg").exists()

    assert main(["predict", "--fit", str(out), "--sparsity", "0.25", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert [p["metric"] for p in document["predictions"]] == [PERPLEXITY, "arc_easy"]
    assert document["predictions"][0]["hidden_size"] == 3072

    assert main(["predict", "--fit", str(out), "--max-ppl", "15"]) == 0
    text = capsys.readouterr().out
    assert "largest effective sparsity s = 1 − d/D with predicted perplexity ≤ 15" in text

    assert main(["predict", "--fit", str(out), "--min-acc", "arc_easy=0.5", "--json"]) == 0
    (prediction,) = json.loads(capsys.readouterr().out)["predictions"]
    assert prediction["value"] >= 0.5 and prediction["hidden_size"] % 8 == 0

    assert main(["predict", "--fit", str(out), "--sparsity", "0.9"]) == 1
    assert "--allow-extrapolation" in capsys.readouterr().err
    assert main(["predict", "--fit", str(out), "--min-acc", "0.5"]) == 1
    assert "TASK=Y" in capsys.readouterr().err
