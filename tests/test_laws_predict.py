"""Predictions from the fitted laws, and the widths d they give."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dimcut import laws
from dimcut.architectures import describe, sliced_width
from dimcut.formats import stock_width
from dimcut.laws import FitReport, max_sparsity, predict
from dimcut.laws.fit import PERPLEXITY
from dimcut.laws.predict import measured_width_multiple
from laws_records import D, fit_of, law_records, sweep_records

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


# ------------------------------------------------------------------------------------ widths d

# SmolLM2-135M: D = 576 and 9 attention heads. Its plain cuts are stock Llama configs, which need
# hidden_size divisible by 9, so `dimcut slice --format plain` writes multiples of lcm(8, 9) = 72.
SMOLLM2 = describe(
    {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "vocab_size": 49152,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
    }
)
SWEEP = [0.1, 0.2, 0.3, 0.4]  # sparsities a sweep sliced at


def slice_width(fmt: str, sparsity: float, round_to: int) -> int:
    """The width `dimcut slice --format fmt --sparsity s --round-to r` writes (as slice_model)."""
    width = sliced_width(SMOLLM2.hidden_size, sparsity, round_to)
    return stock_width(SMOLLM2, width, round_to) if fmt == "plain" else width


def smollm2_fit(tmp_path, fmt: str, round_to: int):
    widths = [slice_width(fmt, s, round_to) for s in SWEEP]
    records = sweep_records("SmolLM2", widths, SMOLLM2.hidden_size)
    return fit_of(tmp_path, records).model("SmolLM2")


@pytest.mark.parametrize("fmt,round_to,multiple", [("plain", 8, 72), ("slicegpt", 16, 16)])
def test_predicted_widths_are_the_widths_dimcut_slice_writes(tmp_path, fmt, round_to, multiple):
    model = smollm2_fit(tmp_path, fmt, round_to)
    assert measured_width_multiple(model) == multiple
    for s in np.arange(0.02, 0.5, 0.01):
        sparsity = float(s)
        predictions = predict(model, sparsity, allow_extrapolation=True)
        expected = slice_width(fmt, sparsity, round_to)
        assert [p.hidden_size for p in predictions] == [expected, expected], sparsity
        assert predictions[0].width_multiple == multiple


def test_max_sparsity_gives_a_width_dimcut_slice_writes_within_the_budget(tmp_path):
    model = smollm2_fit(tmp_path, "plain", 8)
    D = SMOLLM2.hidden_size
    without_width = laws.ModelFit(model.label, None, model.metrics)
    for budget in (20.0, 40.0, 100.0):
        solved = max_sparsity(without_width, PERPLEXITY, budget).sparsity
        cut = max_sparsity(model, PERPLEXITY, budget)
        assert cut.width_multiple == 72
        assert (1 - solved) * D <= cut.hidden_size < (1 - solved) * D + 72
        assert cut.sparsity == pytest.approx(1 - cut.hidden_size / D)
        # Slicing at the reported sparsity cuts exactly the reported width.
        assert slice_width("plain", cut.sparsity, 8) == cut.hidden_size
        assert cut.value <= budget


def test_the_width_multiple_survives_fit_json(tmp_path):
    """fit.json keeps the points, so the multiple is inferred again from a saved fit, such as the
    committed SmolLM2 sweeps (plain: widths 504, 432, 360, 288; slicegpt: multiples of 8)."""
    report = FitReport.load(Path(__file__).parents[1] / "docs" / "results" / "fit.json")
    plain, slicegpt = report.model("SmolLM2-plain"), report.model("SmolLM2-slicegpt")
    assert (measured_width_multiple(plain), measured_width_multiple(slicegpt)) == (72, 8)
    assert predict(plain, 0.3)[0].hidden_size == 360  # not 400: no plain SmolLM2 is 400 wide
    assert predict(slicegpt, 0.3)[0].hidden_size == 400


def test_without_whole_widths_the_multiple_is_the_slice_default(tmp_path):
    # Round sparsities of D = 4096 are not whole widths: these records were not cut by dimcut.
    model = fit_of(tmp_path, law_records("m", [0.1, 0.2, 0.3])).model("m")
    assert measured_width_multiple(model) is None
    (ppl, _) = predict(model, 0.25)
    assert (ppl.hidden_size, ppl.width_multiple) == (3072, 8)
    without_width = laws.ModelFit(model.label, None, model.metrics)
    (ppl, _) = predict(without_width, 0.2, hidden_size=576)
    assert (ppl.hidden_size, ppl.width_multiple) == (456, 8)  # floor(460.8) down to 8
    assert predict(without_width, 0.2)[0].width_multiple is None
