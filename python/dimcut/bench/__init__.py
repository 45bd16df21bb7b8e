"""`dimcut bench`: throughput and memory of slicing and calibration against baselines.

A harness outside the runtime: no dimcut module imports it, and the CLI imports it only when
`dimcut bench` runs. Modules:

- `checkpoints`: synthetic bf16 Llama checkpoints of real shapes (`PRESETS`), with a tokenizer;
- `plan`, `baseline`, `slicing`: the `slicing` suite (engine vs PyTorch vs the GEMM limit);
- `calibration`: the `calibration` suite (calibrate vs a transformers forward);
- `e2e`: the `e2e` suite (`slice_model` vs the same streamed forward without PCA);
- `inference`: the `inference` suite (dense vs sliced models: prefill, first token, decode);
- `workers`, `child`: each contender in its own process, measuring its own peak RSS;
- `report`, `cli`: tables, JSON and the command line.

Nothing imported here imports torch: a worker process imports torch only if its worker needs it.
"""

from dimcut.bench.checkpoints import PRESETS, Shape
from dimcut.bench.cli import add_commands, main

__all__ = ["PRESETS", "Shape", "add_commands", "main"]
