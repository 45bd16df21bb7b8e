"""Evaluation: perplexity (the GPTQ/SliceGPT protocol), lm-eval zero-shot multiple choice, and
generative tasks (HumanEval pass@1, LAMBADA by generation) with collapse metrics.

`evaluate(model_dir)` produces one results record (docs/results-schema.md); `dimcut eval` is its
command line. Modules, each importing only those before it:

- `perplexity`: the perplexity protocol on a loaded model;
- `shared_prefix`: lm-eval's HF model scoring each question's shared context once;
- `tasks`: lm-eval tasks on local data (task YAMLs, context checks, runs, headline metrics);
- `record`: the record's model facts, fingerprint, parameter counts, versions; writing it;
- `collapse`: repetition, distinct-2 and loops of generated text;
- `sandbox`: running generated programs in a throwaway directory under limits and a guard;
- `generation`: the generative tasks' names, stop rules and batched greedy decoding;
- `humaneval`, `lambada`: the two generative tasks (problems, scoring, HumanEval's samples file);
- `run`: `evaluate`, which puts them together;
- `cli`: `dimcut eval` and the evaluation options `dimcut sweep` shares.
"""

from dimcut.evaluation.cli import add_commands, add_evaluation_arguments, evaluation_options
from dimcut.evaluation.perplexity import perplexity
from dimcut.evaluation.record import (
    SCHEMA,
    checkpoint_fingerprint,
    count_parameters,
    describes,
    format_summary,
    merge_results,
    missing_measurements,
    model_facts,
    write_results,
)
from dimcut.evaluation.run import DEFAULT_PPL_SOURCE, evaluate
from dimcut.evaluation.tasks import (
    DEFAULT_TASKS,
    TASKS,
    TaskRun,
    TaskScorer,
    default_task_data,
    evaluate_tasks,
    prepare_tasks,
)

__all__ = [
    "DEFAULT_PPL_SOURCE",
    "DEFAULT_TASKS",
    "SCHEMA",
    "TASKS",
    "TaskRun",
    "TaskScorer",
    "add_commands",
    "add_evaluation_arguments",
    "checkpoint_fingerprint",
    "count_parameters",
    "default_task_data",
    "describes",
    "evaluate",
    "evaluate_tasks",
    "evaluation_options",
    "format_summary",
    "merge_results",
    "missing_measurements",
    "model_facts",
    "perplexity",
    "prepare_tasks",
    "write_results",
]
