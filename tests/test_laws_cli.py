"""`dimcut fit` and `dimcut predict`, the plots, and what importing the laws costs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dimcut.laws import plot_fits
from dimcut.laws.fit import PERPLEXITY
from helpers import refuse
from laws_records import fit_of, law_records, sweep_records, write


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
    assert "perplexity on wikitext2 (ppl)" in capsys.readouterr().out
    assert json.loads(out.read_text())["schema"] == "dimcut.fit/1"
    assert md.read_text().startswith("# Sparsity-law fits")
    assert fig.exists() and fig.with_suffix(".svg").exists()

    assert main(["predict", "--fit", str(out), "--sparsity", "0.25", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert [p["metric"] for p in document["predictions"]] == [PERPLEXITY, "arc_easy"]
    assert document["predictions"][0]["hidden_size"] == 3072

    assert main(["predict", "--fit", str(out), "--max-ppl", "15"]) == 0
    text = capsys.readouterr().out
    assert (
        "largest effective sparsity s = 1 − d/D with predicted perplexity on wikitext2 ≤ 15" in text
    )

    assert main(["predict", "--fit", str(out), "--min-acc", "arc_easy=0.5", "--json"]) == 0
    (prediction,) = json.loads(capsys.readouterr().out)["predictions"]
    assert prediction["value"] >= 0.5 and prediction["hidden_size"] % 8 == 0

    assert main(["predict", "--fit", str(out), "--sparsity", "0.9"]) == 1
    assert "--allow-extrapolation" in capsys.readouterr().err
    assert main(["predict", "--fit", str(out), "--min-acc", "0.5"]) == 1
    assert "TASK=Y" in capsys.readouterr().err


def test_cli_predict_says_what_widths_are_rounded_to(tmp_path, capsys):
    from dimcut.cli import main

    # A plain SmolLM2 sweep (D = 576, 9 heads): its widths are multiples of 72.
    runs = write(tmp_path / "plain", sweep_records("SmolLM2", [504, 432, 360, 288], 576))
    plain = tmp_path / "plain.json"
    assert main(["fit", str(runs), "--out", str(plain)]) == 0
    capsys.readouterr()
    assert main(["predict", "--fit", str(plain), "--sparsity", "0.15"]) == 0
    text = capsys.readouterr().out
    assert "hidden width d = 432 of D = 576 (effective sparsity 0.2500)" in text
    assert "rounded down to a multiple of 72, as `dimcut slice` cuts" in text
    assert "(72: the gcd of the measured sliced widths" in text
    assert main(["predict", "--fit", str(plain), "--max-ppl", "40"]) == 0
    text = capsys.readouterr().out
    # The law solves s = 0.369 for PPL 40: (1 − s)·D = 363.2 rounds up to 432, not to 368.
    assert "with predicted perplexity on wikitext2 ≤ 40: 0.2500" in text
    assert "hidden width d = 432 of D = 576: rounded up to a multiple of 72" in text

    # Round sparsities of D = 4096 are not whole widths: the slice default is used, and said so.
    runs = write(tmp_path / "round", law_records("m", [0.1, 0.2, 0.3]))
    fit = tmp_path / "round.json"
    assert main(["fit", str(runs), "--out", str(fit)]) == 0
    assert main(["predict", "--fit", str(fit), "--sparsity", "0.25"]) == 0
    assert "(8: `dimcut slice`'s default --round-to" in capsys.readouterr().out


def _record(label, s, fingerprint):
    return {
        "schema": "dimcut.results/1",
        "model": {
            "path": f"/m/{fingerprint}-{s}",
            "label": label,
            "fingerprint": fingerprint,
            "effective_sparsity": s,
            "original_hidden_size": 64,
        },
        "perplexity": {"source": "wiki", "seqlen": 64, "windows": 2, "ppl": 10 + 10 * s},
        "tasks": {},
    }


def test_results_of_different_models_are_not_mixed(tmp_path, capsys):
    runs = tmp_path / "runs"
    runs.mkdir()
    for i, (label, s, fp) in enumerate([(None, 0.0, "a"), (None, 0.2, "a"), (None, 0.0, "b")]):
        (runs / f"r{i}.json").write_text(json.dumps(_record(label, s, fp)))
    refuse(["fit", runs], capsys, r"records without model.label", inputs=(runs,))
    for i, (label, s, fp) in enumerate([("m", 0.0, "a"), ("m", 0.2, "a"), ("m", 0.0, "b")]):
        (runs / f"r{i}.json").write_text(json.dumps(_record(label, s, fp)))
    refuse(["fit", runs], capsys, r"dense records of different models", inputs=(runs,))


def test_importing_the_laws_imports_neither_torch_nor_matplotlib():
    # With torch blocked any import of it fails; transformers and matplotlib must stay unloaded.
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "import dimcut.laws, dimcut.laws.cli\n"
        "print([m for m in ('transformers', 'matplotlib') if m in sys.modules])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("fmt", ["slicegpt", "plain"])
def test_cli_predict_for_a_parameter_budget(tmp_path, capsys, fmt):
    """`predict --target-params` predicts at the cut `slice --target-params` would make."""
    from dimcut.architectures import load_architecture
    from dimcut.cli import main
    from dimcut.laws import predict
    from dimcut.slicing import budget_cut
    from tiny_models import save_tiny_model

    dense = save_tiny_model("llama", tmp_path / "dense")  # D = 64
    records = law_records("tiny", [0.125, 0.25, 0.375], original_hidden_size=64)
    for r in records[1:]:
        r["model"]["format"] = fmt
    fit = fit_of(tmp_path, records)
    fit.save(tmp_path / "fit.json")
    argv = ["predict", "--fit", str(tmp_path / "fit.json"), "--target-params", "0.8", "--json"]
    assert main([*argv, "--model-dir", str(dense)]) == 0
    document = json.loads(capsys.readouterr().out)
    _, width, _ = budget_cut(dense, load_architecture(dense), fmt, 0.8)
    got = {p["metric"]: p for p in document["predictions"]}
    assert got[PERPLEXITY]["sparsity"] == pytest.approx(1 - width / 64)
    expected = predict(fit.model(), 1 - width / 64)
    assert got[PERPLEXITY]["value"] == pytest.approx(expected[0].value)
    refuse(argv, capsys, r"--target-params needs --model-dir")
