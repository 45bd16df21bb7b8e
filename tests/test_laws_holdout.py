"""`dimcut fit --holdout`: the fit leaves cuts out, predicts them, and says how well."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dimcut.laws import check_holdout, fit_records, load_records
from dimcut.laws.fit import PERPLEXITY
from laws_records import law_records, write

SPARSITIES = [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4]


def noisy_records(shift_at_04: float = 0.0) -> list[dict]:
    residuals = np.array([0.004, -0.006, 0.005, -0.003, 0.002, -0.004, shift_at_04])
    return law_records("m", SPARSITIES, residuals=residuals, acc_residuals=residuals / 2)


def test_held_out_cuts_are_left_out_and_predicted(tmp_path):
    records = load_records([write(tmp_path / "runs", noisy_records())])
    report = fit_records(records, held_out=[0.25, 0.3, 0.4])
    ppl = report.model("m").metric(PERPLEXITY)
    assert ppl.line.n == 5 and ppl.line.s_max == pytest.approx(0.2)  # dense + s ≤ 0.2
    checks = check_holdout(report, records)
    assert [(c.prediction.metric, round(c.prediction.sparsity, 2)) for c in checks] == [
        (metric, s) for s in (0.25, 0.3, 0.4) for metric in (PERPLEXITY, "arc_easy")
    ]
    for check in checks:  # the points follow the law: inside their intervals
        assert check.inside
        assert check.measured_y == pytest.approx(check.prediction.y, abs=0.05)  # extrapolated 2×
        assert check.prediction.extrapolated
        if check.prediction.metric != PERPLEXITY:  # PPL = PPL0^(1/y) magnifies errors in y
            assert abs(check.relative_error) < 0.03


def test_a_point_off_the_law_falls_outside_its_interval(tmp_path):
    records = load_records([write(tmp_path / "runs", noisy_records(shift_at_04=-0.15))])
    checks = check_holdout(fit_records(records, held_out=[0.4]), records)
    ppl = next(c for c in checks if c.prediction.metric == PERPLEXITY)
    assert not ppl.inside
    assert ppl.measured > ppl.prediction.interval[1]  # y fell: the perplexity rose
    assert ppl.relative_error < -0.2


def test_holdout_without_records_there_is_a_clear_error(tmp_path):
    records = load_records([write(tmp_path / "runs", noisy_records())])
    with pytest.raises(ValueError, match="held-out sparsities 0.35"):
        check_holdout(fit_records(records, held_out=[0.35]), records)


def test_cli_fit_holdout(tmp_path, capsys):
    from dimcut.cli import main

    runs = write(tmp_path / "runs", noisy_records())
    out, md = tmp_path / "fit.json", tmp_path / "fit.md"
    argv = ["fit", str(runs), "--holdout", "0.25,0.3,0.4", "-o", str(out), "--markdown", str(md)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "perplexity: 3 of 3 inside the 95% interval" in printed
    document = json.loads(out.read_text())
    assert document["held_out"] == [0.25, 0.3, 0.4]
    assert len(document["holdout"]) == 6 and all(c["inside_interval"] for c in document["holdout"])
    assert "## Held out of the fit" in md.read_text()
    assert main(["fit", str(runs), "--holdout", "1.5"]) == 1  # a clear error, non-zero
    assert "--holdout sparsities must lie in (0, 1)" in capsys.readouterr().err
