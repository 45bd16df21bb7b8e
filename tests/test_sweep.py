"""`dimcut sweep`: every point evaluated once, resumable, plain calibrates once; then `fit`."""

from __future__ import annotations

import json

import pytest

import dimcut
from dimcut import calibration, evaluation, sweep
from tiny_models import save_tiny_model

SLICE = {"calib": "builtin", "nsamples": 4, "seqlen": 32, "seed": 0}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    model = save_tiny_model("llama", root / "dense")
    docs, _ = calibration.calibration_documents(None)
    text = root / "held_out.txt"
    text.write_text("\n\n".join(docs[-30:]), encoding="utf-8")
    eval_options = {"ppl": str(text), "seqlen": 64, "tasks": []}
    return model, eval_options


def run(setup, runs, fmt, **kwargs):
    model, eval_options = setup
    return sweep.sweep(
        model,
        [0.25, 0.5],
        runs,
        slice_options={"fmt": fmt, **SLICE},
        eval_options=eval_options,
        label="tiny",
        progress=False,
        **kwargs,
    )


@pytest.mark.parametrize("fmt", ["slicegpt", "plain"])
def test_sweep_writes_one_record_per_point_and_fits(setup, tmp_path, fmt):
    records = run(setup, tmp_path / "runs", fmt)
    assert [p.name for p in records] == ["dense.json", "s0.25.json", "s0.5.json"]
    widths = [json.loads(p.read_text())["model"]["hidden_size"] for p in records]
    assert widths == [64, 48, 32]
    assert not (tmp_path / "runs" / "models" / "s0.25").exists()  # deleted unless --keep-models
    assert (tmp_path / "runs" / sweep.PLAIN_ROTATIONS).is_dir() == (fmt == "plain")
    report = dimcut.fit_records(dimcut.load_records([tmp_path / "runs"]))
    assert report.models[0].label == "tiny"


def test_sweep_resumes_after_a_crash(setup, tmp_path, monkeypatch):
    calls = []
    real_evaluate = evaluation.evaluate

    def crash_on_second_slice(target, **kwargs):
        calls.append(target.name)
        if target.name == "s0.5":
            raise KeyboardInterrupt  # killed while evaluating the last point
        return real_evaluate(target, **kwargs)

    monkeypatch.setattr(sweep, "evaluate", crash_on_second_slice)
    with pytest.raises(KeyboardInterrupt):
        run(setup, tmp_path / "runs", "plain", keep_models=True)
    assert sorted(p.name for p in (tmp_path / "runs").glob("*.json")) == [
        "dense.json",
        "s0.25.json",
    ]
    calibrations = []
    monkeypatch.setattr(sweep, "evaluate", real_evaluate)
    real_calibrate = calibration.calibrate
    monkeypatch.setattr(
        calibration, "calibrate", lambda *a, **k: calibrations.append(1) or real_calibrate(*a, **k)
    )
    records = run(setup, tmp_path / "runs", "plain", keep_models=True)
    assert all(p.is_file() for p in records)
    assert calibrations == []  # the saved plain rotations were reused
    assert (tmp_path / "runs" / "models" / "s0.5" / "config.json").is_file()  # kept, redone


def test_a_resumed_sweep_measures_only_what_its_records_lack(setup, tmp_path, monkeypatch):
    """Asking a finished sweep for a second text evaluates just that text on every point and
    adds it to the records; asking again evaluates nothing."""
    model, eval_options = setup
    runs = tmp_path / "runs"
    first = run(setup, runs, "slicegpt")
    before = [json.loads(p.read_text()) for p in first]
    other = tmp_path / "other.txt"
    other.write_text(" ".join(["The river ran north past the old mill."] * 200), encoding="utf-8")
    asked = []
    real_evaluate = evaluation.evaluate

    def spy(target, **kwargs):
        asked.append((target.name, kwargs["ppl"], kwargs["tasks"]))
        return real_evaluate(target, **kwargs)

    monkeypatch.setattr(sweep, "evaluate", spy)
    both = {**eval_options, "ppl": [eval_options["ppl"], str(other)]}
    for _ in range(2):
        records = sweep.sweep(
            model,
            [0.25, 0.5],
            runs,
            slice_options={"fmt": "slicegpt", **SLICE},
            eval_options=both,
            label="tiny",
            progress=False,
        )
    assert asked == [(name, [str(other)], []) for name in ("dense", "s0.25", "s0.5")]
    for old, path in zip(before, records, strict=True):
        new = json.loads(path.read_text())
        assert new["perplexity"] == old["perplexity"]  # the headline text is kept, not redone
        assert [e["source"] for e in new["perplexities"]] == [
            old["perplexity"]["source"],
            str(other.resolve()),
        ]
    report = dimcut.fit_records(dimcut.load_records([runs]))
    assert [f.text for f in report.model("tiny").metrics] == [
        old["perplexity"]["source"],
        str(other.resolve()),
    ]
    # A record of another cut (here: another calibration) lacking a text is measured afresh.
    stale = json.loads(records[1].read_text())
    stale["model"]["calibration"]["token_sha256"] = "another calibration"
    stale["perplexities"] = stale["perplexities"][:1]
    records[1].write_text(json.dumps(stale))
    asked.clear()
    sweep.sweep(
        model, [0.25, 0.5], runs, slice_options={"fmt": "slicegpt", **SLICE},
        eval_options=both, label="tiny", progress=False,
    )  # fmt: skip
    assert asked == [("s0.25", both["ppl"], [])]
    fresh = json.loads(records[1].read_text())
    assert fresh["model"]["calibration"]["token_sha256"] != "another calibration"
    assert len(fresh["perplexities"]) == 2


def test_plain_rotations_of_another_calibration_are_not_reused(setup, tmp_path, monkeypatch):
    """A RUNS/ directory resumed with other calibration options recalibrates the plain rotation
    instead of reusing one made from other tokens."""
    model, eval_options = setup
    options = {"slice_options": {"fmt": "plain", **SLICE}, "eval_options": eval_options}
    sweep.sweep(model, [0.25], tmp_path / "runs", progress=False, **options)
    calibrations = []
    real_calibrate = calibration.calibrate

    def counted(*args, **kwargs):
        calibrations.append(kwargs["nsamples"])
        return real_calibrate(*args, **kwargs)

    monkeypatch.setattr(calibration, "calibrate", counted)
    options["slice_options"] = {**options["slice_options"], "nsamples": 6}
    sweep.sweep(model, [0.25, 0.5], tmp_path / "runs", progress=False, **options)
    assert calibrations == [6]
    record = json.loads((tmp_path / "runs" / sweep.PLAIN_ROTATIONS / "record.json").read_text())
    assert record["nsamples"] == 6


def test_bad_sparsities_are_refused():
    for text in ("0,0.5", "0.2,1", "abc", ""):
        with pytest.raises(ValueError, match="--sparsities"):
            sweep.parse_sparsities(text)


def test_a_healed_sweep_heals_every_sliced_point(trained_llama, setup, tmp_path):
    _, eval_options = setup
    heal_options = dimcut.HealOptions(steps=20, seqlen=64, lr=2e-3)
    ppl = {}
    for name, options in (("sliced", None), ("healed", heal_options)):
        records = sweep.sweep(
            trained_llama,
            [0.5],
            tmp_path / name,
            slice_options={"fmt": "plain", **SLICE, "seqlen": 64},
            eval_options=eval_options,
            heal_options=options,
            progress=False,
        )
        data = [json.loads(p.read_text()) for p in records]
        assert data[0]["model"]["heal"] is None  # the dense reference is never healed
        ppl[name] = [d["perplexity"]["ppl"] for d in data]
        assert list((tmp_path / name / "models").iterdir()) == []
    assert data[1]["model"]["heal"]["steps"] == 20 and data[1]["model"]["heal"]["loss"] == "kd"
    assert ppl["healed"][0] == ppl["sliced"][0]
    assert ppl["healed"][1] < 0.97 * ppl["sliced"][1], ppl
