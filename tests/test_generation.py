"""Generative tasks: the sandbox's containment, HumanEval pass@1 (scoring, resuming, end to end
through `dimcut eval`), LAMBADA by generation, and the collapse metrics."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import pytest

from dimcut.evaluation import collapse
from dimcut.evaluation.generation import (
    Finish,
    FirstWord,
    Generation,
    GreedyGenerator,
    StopSequences,
    generate_in_order,
)
from dimcut.evaluation.humaneval import (
    STOP_SEQUENCES,
    SamplesFile,
    evaluate_humaneval,
    generation_key,
    load_problems,
    program,
)
from dimcut.evaluation.lambada import Passage, evaluate_lambada, load_passages
from dimcut.evaluation.sandbox import Limits, Outcome, run_program
from helpers import run_cli

QUICK = Limits(timeout=1.5)


@pytest.fixture(scope="module")
def problems():
    return load_problems()


def _live_members(group: int) -> list[int]:
    """Processes of a process group that still run (zombies awaiting init are dead)."""
    members = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path("/proc", entry, "stat").read_text()
        except OSError:
            continue
        state, _ppid, pgrp = stat.rsplit(")", 1)[1].split()[:3]
        if int(pgrp) == group and state != "Z":
            members.append(int(entry))
    return members


def _gone(group: int) -> bool:
    """Whether the group has no live process left (SIGKILL lands within moments, not at once)."""
    deadline = time.monotonic() + 5
    while _live_members(group) and time.monotonic() < deadline:
        time.sleep(0.05)
    return _live_members(group) == []


def _group_of(output: str) -> int:
    return int(output.split("group=", 1)[1].split()[0])


# ---------------------------------------------------------------------------------- sandbox


def test_canonical_solutions_pass_and_wrong_ones_fail(problems):
    for problem in problems[:5]:
        run = run_program(program(problem, problem.canonical_solution))
        assert run.outcome is Outcome.PASSED, (problem.task_id, run.output)
    wrong = run_program(program(problems[0], "    return False\n"))
    assert wrong.outcome is Outcome.FAILED and "AssertionError" in wrong.output


def test_an_infinite_loop_is_killed_at_the_timeout_and_leaves_no_process():
    started = time.monotonic()
    run = run_program(
        "import os\nprint('group=%d' % os.getpgid(0), flush=True)\nwhile True: pass", QUICK
    )
    assert run.outcome is Outcome.TIMEOUT and run.returncode is None
    assert time.monotonic() - started < 5
    assert _gone(_group_of(run.output))


def test_a_fork_bomb_is_refused_and_leaves_no_process():
    bomb = "import os\nprint('group=%d' % os.getpgid(0), flush=True)\nwhile True:\n    os.fork()"
    run = run_program(bomb, QUICK)
    assert run.outcome is Outcome.FAILED and "os.fork is refused" in run.output
    assert _gone(_group_of(run.output))


def test_without_the_guard_forked_processes_are_killed_with_the_group():
    """If a program got past the audit hook, what it started still dies with its group: twenty
    children sleeping for ten minutes, the parent exiting at once."""
    spawner = (
        "import os, time\nprint('group=%d' % os.getpgid(0), flush=True)\n"
        "for _ in range(20):\n    if os.fork() == 0:\n        time.sleep(600)\n"
    )
    run = run_program(spawner, QUICK, guard=False)
    assert run.outcome is Outcome.PASSED and run.seconds < 5
    assert _gone(_group_of(run.output))


def test_writing_outside_the_directory_is_refused(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    attempts = [
        f"open({str(tmp_path / 'new.txt')!r}, 'w').write('x')",
        f"import os; os.open({str(tmp_path / 'new.txt')!r}, os.O_CREAT | os.O_WRONLY)",
        f"open({str(victim)!r}, 'a').write('x')",
        f"import os; os.remove({str(victim)!r})",
        f"import os; os.rename({str(victim)!r}, 'stolen.txt')",
        f"import shutil; shutil.rmtree({str(tmp_path)!r})",
        f"import os; os.chdir({str(tmp_path)!r}); open('new.txt', 'w')",
        f"import os; os.symlink({str(tmp_path)!r}, 'link'); open('link/new.txt', 'w')",
        f"import pathlib; pathlib.Path({str(tmp_path / 'new.txt')!r}).write_text('x')",
        f"import os; os.mkdir({str(tmp_path / 'made')!r})",
    ]
    for attempt in attempts:
        run = run_program(attempt, QUICK)
        assert run.outcome is Outcome.FAILED and "sandbox:" in run.output, (attempt, run.output)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["victim.txt"]
    assert victim.read_text() == "keep"


def test_its_own_directory_is_writable_and_removed_afterwards():
    run = run_program(
        "import os, tempfile\nopen('a.txt', 'w').write('x')\nos.mkdir('d')\nos.remove('a.txt')\n"
        "tempfile.NamedTemporaryFile()\nprint(os.getcwd())",
        QUICK,
    )
    assert run.outcome is Outcome.PASSED, run.output
    assert not Path(run.output.strip()).exists()


def test_a_huge_allocation_fails_without_harming_the_parent():
    run = run_program("x = bytearray(8 << 30)", QUICK)
    assert run.outcome is Outcome.FAILED and "MemoryError" in run.output


def test_processes_sockets_and_other_readers_are_refused():
    for attempt in [
        "import subprocess; subprocess.run(['true'])",
        "import os; os.system('true')",
        "import socket; socket.socket()",
        "import ctypes",
        "open('/etc/passwd').read()",
        "import os; os.kill(os.getppid(), 9)",
        "import resource; resource.setrlimit(resource.RLIMIT_AS, (-1, -1))",
    ]:
        run = run_program(attempt, QUICK)
        assert run.outcome is Outcome.FAILED and "sandbox:" in run.output, (attempt, run.output)


def test_the_environment_is_stripped_and_stdin_closed(monkeypatch):
    monkeypatch.setenv("DIMCUT_TEST_SECRET", "hunter2")
    run = run_program(
        "import os, sys\nprint(sorted(os.environ))\nprint(os.environ['HOME'] == os.getcwd() "
        "== os.environ['TMPDIR'])\nprint(repr(sys.stdin.read()))",
        QUICK,
    )
    assert run.outcome is Outcome.PASSED, run.output
    names, same, stdin = run.output.splitlines()
    assert "DIMCUT_TEST_SECRET" not in names and same == "True" and stdin == "''"


def test_long_output_keeps_its_head_and_tail():
    run = run_program("print('h' + 'x' * 100_000 + 't')", QUICK)
    assert len(run.output) < 5000 and run.output.startswith("h") and "t\n" in run.output[-3:]


# ---------------------------------------------------------------------------- collapse metrics


def test_collapse_metrics_on_hand_computed_strings():
    words = ["a", "b", "c", "d", "a", "b", "c", "d"]
    assert collapse.repetition_rate(words) == pytest.approx(1 - 4 / 5)  # abcd repeats once
    assert collapse.distinct_n(["a", "b", "a", "b"]) == pytest.approx(2 / 3)  # ab ba ab
    assert collapse.repetition_rate(["a", "b"]) is None
    assert collapse.loops("x y " * 10)
    assert collapse.loops("go go go go")
    assert not collapse.loops("a b c a b c a b c")  # period 3 seen only 3 times
    assert not collapse.loops("a b c d e f g h i " * 8)  # period 9 > 8 (words and characters)
    assert not collapse.loops(" ".join(f"w{i}" for i in range(60)) + " go" * 4)  # tail not all loop
    assert collapse.loops(" ".join(f"w{i}" for i in range(60)) + " go on" * 32)  # last 64 do
    # Loops without words to repeat: blank lines, one digit, a run inside one long word.
    assert collapse.loops("def f():\n" + "\n" * 64)
    assert collapse.loops("x = 1" + "0" * 64)
    assert collapse.loops("print('" + "ab" * 40)
    assert not collapse.loops("\n" * 63)  # shorter than the window
    assert not collapse.loops(
        "    return sorted(numbers)[len(numbers) // 2] if numbers else None\n"
    )

    metrics = collapse.collapse_metrics(["a b c d a b c d", "x x x x", "hi", "\n" * 100])
    assert metrics["repetition_rate"] == pytest.approx((0.2 + 0.0) / 2)
    assert metrics["distinct_2"] == pytest.approx((4 / 7 + 1 / 3) / 2)
    assert metrics["loop_fraction"] == pytest.approx(2 / 4)  # "x x x x" and the blank lines
    assert metrics["collapse_unit"] == "whitespace words; loops also characters"


def test_stop_rules():
    humaneval = StopSequences(STOP_SEQUENCES)
    assert humaneval.end("    return 1\n\ndef g():") == len("    return 1\n")
    assert humaneval.end("    return 1\n") is None
    word = FirstWord()
    assert word.end(" signs.") == len(" signs")
    assert word.end(" sig") is None  # the word may go on
    assert word.end(", and") == 0  # punctuation first: an empty word


# ----------------------------------------------------------------------- scoring with stubs


class ScriptedGenerator:
    """Stands in for a model: each prompt's continuation is looked up, then cut by the rule."""

    def __init__(self, continuations: dict[str, str]):
        self.continuations = continuations
        self.generated: list[str] = []

    def check_fits(self, labels, prompts, new_tokens):
        pass

    def generate(self, prompts, stop, max_new_tokens):
        self.generated += prompts
        for index in reversed(range(len(prompts))):  # out of order, as rows may finish
            text = self.continuations[prompts[index]]
            end = stop.end(text)
            cut = text if end is None else text[:end]
            yield index, Generation(cut, Finish.EOS if end is None else Finish.STOP, 1)


def test_canonical_completions_score_pass_at_1_of_one(problems, tmp_path):
    canonical = ScriptedGenerator({p.prompt: p.canonical_solution for p in problems[:3]})
    samples = SamplesFile(tmp_path / "s.jsonl", "key")
    entry = evaluate_humaneval(canonical, problems, limit=3, samples=samples)
    assert entry["pass@1"] == entry["headline"] == 1.0 and entry["n"] == 3
    assert entry["rows"] == 164 and entry["outcomes"] == {"passed": 3, "failed": 0, "timeout": 0}
    assert entry["pass@1_stderr"] == 0.0

    wrong = {p.prompt: "    return None\n\ndef helper():\n    pass\n" for p in problems[:3]}
    entry = evaluate_humaneval(ScriptedGenerator(wrong), problems, limit=3)
    assert entry["pass@1"] == 0.0 and entry["finish"]["stop"] == 3
    assert entry["samples"] is None


def test_finished_problems_are_not_generated_again(problems, tmp_path):
    continuations = {p.prompt: p.canonical_solution for p in problems[:3]}
    samples = SamplesFile(tmp_path / "s.jsonl", "key")
    evaluate_humaneval(ScriptedGenerator(continuations), problems, limit=2, samples=samples)
    with samples.path.open("a") as handle:
        handle.write('{"key": "key", "task_id": "HumanEval/2", "compl')  # killed mid-write
    again = ScriptedGenerator(continuations)
    entry = evaluate_humaneval(again, problems, limit=3, samples=samples)
    assert again.generated == [problems[2].prompt] and entry["pass@1"] == 1.0
    lines = samples.path.read_text().splitlines()
    # one line per problem, in the order they finished (the scripted rows end last first)
    assert [json.loads(line)["task_id"] for line in lines] == [
        "HumanEval/1",
        "HumanEval/0",
        "HumanEval/2",
    ]
    other_model = ScriptedGenerator(continuations)
    evaluate_humaneval(other_model, problems, limit=3, samples=SamplesFile(samples.path, "other"))
    assert len(other_model.generated) == 3  # another model (key) shares nothing


def test_samples_of_other_end_tokens_are_not_reused():
    key = generation_key("model", "bfloat16", 512, [151645])
    assert key == generation_key("model", "bfloat16", 512, [151645])
    assert key != generation_key("model", "bfloat16", 512, [151645, 151643])


def test_lambada_exact_match_with_a_fake_generator():
    passages = [
        Passage("The cat sat on the", "mat"),
        Passage("She opened the", "door"),
        Passage("He drank a cup of", "tea"),
    ]
    fake = ScriptedGenerator(
        {
            "The cat sat on the": " mat. Then it slept",
            "She opened the": " doorway and left",  # a longer word is a miss
            "He drank a cup of": " tea, hot",
        }
    )
    entry = evaluate_lambada(fake, passages)
    assert entry["exact_match"] == entry["headline"] == pytest.approx(2 / 3)
    assert entry["exact_match_stderr"] == pytest.approx(math.sqrt(2 / 3 * 1 / 3 / 2))
    assert entry["n"] == entry["rows"] == 3
    assert evaluate_lambada(fake, passages, limit=1)["n"] == 1


def test_lambada_passages_split_off_the_last_word():
    first = load_passages()[0]
    assert first.target == "signs" and first.context.endswith("I don't care about")


# ------------------------------------------------------------------- a tiny model, end to end


@pytest.fixture(scope="module")
def long_context_llama(tiny_llama_dir, tmp_path_factory):
    """The tiny Llama with room for HumanEval's prompts (≈ 300 tokens in its small vocabulary);
    RoPE has no position table, so only the config changes."""
    model = tmp_path_factory.mktemp("long") / "model"
    shutil.copytree(tiny_llama_dir, model)
    config = json.loads((model / "config.json").read_text())
    config["max_position_embeddings"] = 1024
    (model / "config.json").write_text(json.dumps(config))
    return model


PROMPTS = [
    "def f(x):\n",
    "The quick brown fox jumps over the lazy dog and",
    "Paris",
    "import os\nimport sys\n\n\ndef main(argv):\n    ",
    "a b c d e f g h i j k l m n o p q r s t u v w x y z",
    "1, 2, 3,",
    "class Stack:\n    def push(self, item):",
]


@pytest.fixture(scope="module")
def sliced_long_context(long_context_llama, tmp_path_factory):
    """The same model cut to the slicegpt format (its shortcut matrices patched into the stock
    architecture)."""
    import dimcut

    out = tmp_path_factory.mktemp("sliced") / "model"
    dimcut.slice_model(long_context_llama, 0.25, out, fmt="slicegpt", calib="builtin",
                       nsamples=4, seqlen=32, seed=0, progress=False)  # fmt: skip
    return out


@pytest.mark.parametrize(("model_name", "batch_size"), [("dense", 2), ("dense", 3), ("sliced", 3)])
def test_continuous_batching_equals_transformers_generate_one_at_a_time(
    long_context_llama, sliced_long_context, model_name, batch_size
):
    """The oracle: transformers' own greedy `generate`, one prompt at a time (no padding), in
    float64 so that rounding cannot flip an argmax. Rows of different lengths end at different
    steps (the stop rule, the cap), so prompts join a batch whose rows are mid-completion."""
    import torch
    from transformers import GenerationConfig

    from dimcut import formats

    model_dir = long_context_llama if model_name == "dense" else sliced_long_context
    model, tokenizer = formats.load(model_dir)
    model = model.to(torch.float64)
    stop = StopSequences(("c",))  # the random model writes it at varied places: rows end apart
    generator = GreedyGenerator(model, tokenizer, batch_size=batch_size)
    config = GenerationConfig(max_new_tokens=20, do_sample=False, eos_token_id=generator.eos)
    expected = []
    for prompt in PROMPTS:
        ids = torch.tensor([tokenizer(prompt).input_ids])
        tokens = model.generate(input_ids=ids, generation_config=config)[0, ids.shape[1] :].tolist()
        for count in range(1, len(tokens) + 1):  # transformers runs on to the cap or EOS
            if tokens[count - 1] in generator.eos:
                text = tokenizer.decode(tokens[: count - 1], skip_special_tokens=True)
                expected.append(Generation(text, Finish.EOS, count - 1))
                break
            text = tokenizer.decode(tokens[:count], skip_special_tokens=True)
            if (end := stop.end(text)) is not None:
                expected.append(Generation(text[:end], Finish.STOP, count))
                break
        else:
            expected.append(Generation(text, Finish.LENGTH, len(tokens)))
    got = generate_in_order(generator, PROMPTS, stop, 20)
    steps = generator.steps
    order = [index for index, _ in generator.generate(PROMPTS, stop, 20)]
    assert [g.text for g in got] == [g.text for g in expected]
    assert [g.finish for g in got] == [g.finish for g in expected]
    assert [g.new_tokens for g in got] == [g.new_tokens for g in expected]
    assert sorted(order) == list(range(len(PROMPTS)))
    assert order != sorted(order)  # a later prompt finished first: rows were refilled
    # rows share steps, and a finished row's place is refilled: fewer steps than one prompt at
    # a time, and than static batches that each wait for their longest row
    lengths = [g.new_tokens for g in got]
    static = sum(max(lengths[i : i + batch_size]) - 1 for i in range(0, len(lengths), batch_size))
    assert steps < static < sum(n - 1 for n in lengths)
    assert {g.finish for g in got} >= {Finish.STOP, Finish.LENGTH}


def test_dimcut_eval_humaneval_writes_samples_and_resumes(
    long_context_llama, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "tiny.json"
    argv = ["eval", long_context_llama, "--ppl", "none", "--tasks", "humaneval,lambada_generate",
            "--limit", "2", "--max-new-tokens", "16", "--batch-size", "2", "-o", out]  # fmt: skip
    code, output = run_cli(argv, capsys)
    assert code == 0, output
    record = json.loads(out.read_text())
    entry = record["tasks"]["humaneval"]
    assert entry["pass@1"] == 0.0 and entry["n"] == 2 and entry["headline_metric"] == "pass@1"
    assert set(entry) >= {"repetition_rate", "distinct_2", "loop_fraction"}
    assert record["tasks"]["lambada_generate"]["n"] == 2
    assert record["wall_seconds"]["generation"] > 0
    samples = tmp_path / "tiny.humaneval.jsonl"
    lines = [json.loads(line) for line in samples.read_text().splitlines()]
    assert [line["task_id"] for line in lines] == ["HumanEval/0", "HumanEval/1"]
    assert all(line["new_tokens"] <= 16 and line["outcome"] != "passed" for line in lines)

    calls = []
    original = GreedyGenerator.generate
    monkeypatch.setattr(
        GreedyGenerator,
        "generate",
        lambda self, prompts, *a: calls.append(list(prompts)) or original(self, prompts, *a),
    )
    argv[argv.index("humaneval,lambada_generate")] = "humaneval"
    assert run_cli(argv, capsys)[0] == 0
    assert calls == []  # both problems came from the samples file
    assert json.loads(out.read_text())["tasks"]["humaneval"] == entry

    argv[argv.index("--limit") + 1] = "3"
    assert run_cli(argv, capsys)[0] == 0
    assert len(calls) == 1 and len(calls[0]) == 1  # only HumanEval/2 was generated
    assert len(samples.read_text().splitlines()) == 3


def test_bad_generation_options_fail_before_loading_the_model(tiny_llama_dir, tmp_path, capsys):
    from dimcut import evaluation

    with pytest.raises(ValueError, match="max_new_tokens must be at least 1"):
        evaluation.evaluate(tiny_llama_dir, ppl=None, tasks=["humaneval"], max_new_tokens=0)
    with pytest.raises(ValueError, match="exec_timeout must be positive"):
        evaluation.evaluate(tiny_llama_dir, ppl=None, tasks=["humaneval"], exec_timeout=0)
    code, output = run_cli(["eval", "--tasks", "humaneval", "--write-tasks", tmp_path], capsys)
    assert code == 1 and "humaneval are scored by dimcut itself" in output


def test_a_prompt_longer_than_the_context_is_refused_before_generating(
    tiny_llama_dir, tmp_path, capsys
):
    out = tmp_path / "r.json"
    argv = ["eval", tiny_llama_dir, "--ppl", "none", "--tasks", "humaneval", "--limit", "1",
            "--max-new-tokens", "16", "-o", out]  # fmt: skip
    code, output = run_cli(argv, capsys)
    assert code == 1 and "humaneval HumanEval/0 needs" in output and "context is 256" in output
    assert not out.exists() and not (tmp_path / "r.humaneval.jsonl").exists()
