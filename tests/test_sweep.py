"""`dimcut sweep`: every point evaluated once, resumable, plain calibrates once; then `fit`."""

from __future__ import annotations

import json

import pytest

import dimcut
from dimcut import calibration, evaluation, sweep
from helpers import refuse, tree_hash
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


def run(setup, runs, fmt, method="pca", **kwargs):
    model, eval_options = setup
    return sweep.sweep(
        model,
        [0.25, 0.5],
        runs,
        slice_options={"fmt": fmt, "method": method, **SLICE},
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


# ------------------------------------------------------------------------- sweep --method


def counting(monkeypatch, module, name):
    """Replace `module.name` by a wrapper that appends each call's keyword arguments to a list."""
    calls = []
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(k) or real(*a, **k))
    return calls


def variants(runs) -> dict[float, str]:
    """Each sliced record's effective sparsity -> its cut variant, as the laws read them."""
    return {r.effective_sparsity: r.variant for r in dimcut.load_records([runs]) if not r.is_dense}


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """A 4-layer tiny Llama: depth cuts need layers to choose from."""
    return save_tiny_model("llama", tmp_path_factory.mktemp("deep") / "dense", layers=4)


def test_a_channels_sweep_calibrates_once(setup, tmp_path, monkeypatch):
    calibrations = counting(monkeypatch, calibration, "calibrate")
    run(setup, tmp_path / "runs", "plain", method="channels")
    assert [call["method"].value for call in calibrations] == ["channels"]
    saved = json.loads((tmp_path / "runs" / sweep.PLAIN_ROTATIONS / "record.json").read_text())
    assert saved["method"] == "channels"
    assert variants(tmp_path / "runs") == {0.25: "plain/channels", 0.5: "plain/channels"}
    calibrations.clear()
    model, eval_options = setup
    sweep.sweep(  # a new point reuses the saved channel basis
        model, [0.25, 0.5, 0.75], tmp_path / "runs", slice_options={"fmt": "plain",
        "method": "channels", **SLICE}, eval_options=eval_options, label="tiny", progress=False,
    )  # fmt: skip
    assert calibrations == []
    assert set(variants(tmp_path / "runs")) == {0.25, 0.5, 0.75}


def test_plain_pca_rotations_are_not_reused_by_a_channels_sweep(setup, tmp_path, monkeypatch):
    """A RUNS/ whose saved rotation is a PCA one (and which holds no records) recalibrates."""
    runs = tmp_path / "runs"
    run(setup, runs, "plain")
    for record in runs.glob("s*.json"):
        record.unlink()
    calibrations = counting(monkeypatch, calibration, "calibrate")
    run(setup, runs, "plain", method="channels")
    assert [call["method"].value for call in calibrations] == ["channels"]


def test_a_random_sweep_never_calibrates(setup, tmp_path, monkeypatch):
    calibrations = counting(monkeypatch, calibration, "calibrate")
    influences = counting(monkeypatch, calibration, "block_influence")
    run(setup, tmp_path / "runs", "plain", method="random")
    assert calibrations == [] and influences == []
    assert not (tmp_path / "runs" / sweep.PLAIN_ROTATIONS).exists()
    assert variants(tmp_path / "runs") == {0.25: "plain/random", 0.5: "plain/random"}


def test_a_layers_sweep_computes_the_block_influence_once(setup, deep, tmp_path, monkeypatch):
    _, eval_options = setup
    influences = counting(monkeypatch, calibration, "block_influence")

    def layers_sweep(sparsities):
        return sweep.sweep(
            deep, sparsities, tmp_path / "runs", slice_options={"fmt": "plain",
            "method": "layers", **SLICE}, eval_options=eval_options, label="deep", progress=False,
        )  # fmt: skip

    records = layers_sweep([0.25, 0.5])
    assert len(influences) == 1  # for both points
    assert variants(tmp_path / "runs") == {0.25: "plain/layers", 0.5: "plain/layers"}
    configs = [json.loads(p.read_text())["model"] for p in records[1:]]
    assert [c["calibration"]["method"] for c in configs] == ["layers", "layers"]
    assert [c["hidden_size"] for c in configs] == [64, 64]  # the width is untouched
    influences.clear()
    layers_sweep([0.25, 0.5, 0.75])  # a new point, the influences read from RUNS/
    assert influences == []
    assert set(variants(tmp_path / "runs")) == {0.25, 0.5, 0.75}
    saved = json.loads((tmp_path / "runs" / sweep.BLOCK_INFLUENCE).read_text())
    assert len(saved["influence"]) == 4 and saved["record"]["method"] == "layers"


def test_precomputed_block_influences_cut_as_computed_ones(deep, tmp_path):
    """What a layers sweep hands `slice_model`: the same checkpoint as computing them there;
    another model's influences are refused."""
    from dimcut.slicing import slice_model

    options = {"fmt": "plain", "method": "layers", "progress": False, **SLICE}
    computed = slice_model(deep, 0.5, tmp_path / "computed", **options)
    signals = {k: SLICE[k] for k in ("nsamples", "seqlen", "seed")}
    influence, record, _ = calibration.block_influence(
        deep, source=SLICE["calib"], **signals, progress=False
    )
    given = slice_model(deep, 0.5, tmp_path / "given", influence=(influence, record), **options)
    assert given.removed_layers == computed.removed_layers
    config = lambda name: json.loads((tmp_path / name / "config.json").read_text())
    assert config("given") == config("computed")
    other = save_tiny_model("llama", tmp_path / "other", layers=4, seed=1)
    with pytest.raises(ValueError, match="computed for another model"):
        slice_model(other, 0.5, tmp_path / "c", influence=(influence, record), **options)


def test_a_method_without_its_format_is_refused_before_any_work(setup, tmp_path, capsys):
    model, _ = setup
    runs = tmp_path / "runs"
    with pytest.raises(ValueError, match="method channels: works with format plain only"):
        sweep.sweep(model, [0.25], runs, slice_options={"fmt": "slicegpt", "method": "channels"})
    args = ["sweep", model, "--method", "layers", "--format", "slicegpt", "-o", runs, "-q"]
    refuse(args, capsys, "method layers: works with format plain only")
    with pytest.raises(ValueError, match="weighting rms"):
        sweep.sweep(model, [0.25], runs, slice_options={"fmt": "plain", "method": "channels",
                                                         "weighting": "raw"})  # fmt: skip
    assert not runs.exists()  # nothing written, not even RUNS/


def test_records_of_another_method_are_refused(setup, tmp_path, monkeypatch, capsys):
    """A pca sweep's records are never taken for the points of a channels sweep in the same
    RUNS/: the mix is refused before anything is calibrated, sliced or written."""
    model, _ = setup
    runs = tmp_path / "runs"
    run(setup, runs, "plain")
    before = tree_hash(runs)
    calibrations = counting(monkeypatch, calibration, "calibrate")
    with pytest.raises(ValueError, match=r"sweep's plain/channels \(s0\.25\.json is plain/rms"):
        run(setup, runs, "plain", method="channels")
    args = ["sweep", model, "--sparsities", "0.25", "--format", "plain", "--method", "random",
            "-o", runs, "-q"]  # fmt: skip
    refuse(args, capsys, "this sweep's plain/random", r"own RUNS directory \(-o\)", inputs=(runs,))
    assert calibrations == [] and tree_hash(runs) == before
    run(setup, runs, "plain")  # the same cut resumes as before: nothing to do
    assert calibrations == [] and tree_hash(runs) == before


# ------------------------------------------------------------------ generative tasks


@pytest.fixture(scope="module")
def long_context(tmp_path_factory):
    """The tiny Llama with room for HumanEval's prompts (RoPE: only the config changes)."""
    model = save_tiny_model("llama", tmp_path_factory.mktemp("long") / "dense")
    config = json.loads((model / "config.json").read_text())
    config["max_position_embeddings"] = 1024
    (model / "config.json").write_text(json.dumps(config))
    return model


def test_humaneval_points_keep_their_samples_and_resume_per_problem(
    long_context, tmp_path, monkeypatch
):
    from dimcut.evaluation.generation import GreedyGenerator

    runs = tmp_path / "runs"
    options = {"ppl": None, "tasks": ["humaneval"], "limit": 2, "max_new_tokens": 8}

    def humaneval_sweep(**changes):
        return sweep.sweep(
            long_context, [0.5], runs, slice_options={"fmt": "plain", **SLICE},
            eval_options={**options, **changes}, label="tiny", progress=False,
        )  # fmt: skip

    records = humaneval_sweep()
    for record in records:
        samples = runs / f"{record.stem}.humaneval.jsonl"
        assert len(samples.read_text().splitlines()) == 2
        entry = json.loads(record.read_text())["tasks"]["humaneval"]
        assert entry["samples"] == str(samples.resolve()) and entry["max_new_tokens"] == 8
    assert dimcut.load_records([runs])  # the samples files are not taken for records
    generated = []
    real_generate = GreedyGenerator.generate
    monkeypatch.setattr(
        GreedyGenerator,
        "generate",
        lambda self, prompts, *a: (
            generated.append(len(prompts)) or real_generate(self, prompts, *a)
        ),
    )
    records[1].unlink()  # the point was interrupted after its problems were generated
    humaneval_sweep()
    assert generated == []  # the re-made cut is the same model: its problems were kept
    assert json.loads(records[1].read_text())["tasks"]["humaneval"]["n"] == 2
    humaneval_sweep(max_new_tokens=12)  # another token cap: both points generate again
    assert sum(generated) == 4  # two problems at each of two points
    assert json.loads(records[1].read_text())["tasks"]["humaneval"]["max_new_tokens"] == 12
    humaneval_sweep(max_new_tokens=12)
    assert sum(generated) == 4  # nothing left to do


def test_missing_measurements_compares_humaneval_settings():
    record = {
        "dtype": "float32",
        "limit": None,
        "tasks": {"humaneval": {"max_new_tokens": 512, "timeout": 10.0}},
    }
    options = {"ppl": None, "tasks": ["humaneval"]}
    assert evaluation.missing_measurements(record, options)["tasks"] == []
    same = {**options, "max_new_tokens": 512, "exec_timeout": 10.0}
    assert evaluation.missing_measurements(record, same)["tasks"] == []
    for change in ({"max_new_tokens": 256}, {"exec_timeout": 3.0}):
        assert evaluation.missing_measurements(record, {**same, **change})["tasks"] == ["humaneval"]
