"""The entry point of a worker process: `python -m dimcut.bench.child MODULE:FUNCTION WORKDIR
PARAMS_JSON` (see `dimcut.bench.workers.run_worker`). Prints the worker's result as one JSON
line, with "peak_rss": this process's peak resident memory."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

from dimcut.runtime import peak_rss_bytes


def main(argv: list[str]) -> None:
    target, workdir, params = argv[0], Path(argv[1]), json.loads(argv[2])
    module, function = target.split(":")
    worker = getattr(importlib.import_module(module), function)
    result = worker(workdir, params)
    result["peak_rss"] = peak_rss_bytes()
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
