"""Running one contender in a fresh interpreter, so that the peak RSS it reports is its own.

A worker is a module-level function `worker(workdir: Path, params: dict) -> dict` of a bench
module. `run_worker` starts `python -m dimcut.bench.child MODULE:FUNCTION ...`, which imports
that module, calls the function, and prints its result (JSON) with the process's peak RSS.
Worker modules import torch inside their workers only: the engine's worker then loads the
extension module and NumPy alone, and its RSS is the engine's.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

CHILD_MODULE = "dimcut.bench.child"

Worker = Callable[[Path, dict], dict]


def run_worker(worker: Worker, workdir: Path, params: dict) -> dict:
    """Runs `worker` in a fresh interpreter; returns its JSON result with its "peak_rss"."""
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    threads = params.get("threads") or os.cpu_count() or 1
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env.setdefault(var, str(threads))
    target = f"{worker.__module__}:{worker.__name__}"
    # -P: the working directory must not shadow module names (python/dimcut has tokenizers.py).
    command = [sys.executable, "-P", "-m", CHILD_MODULE, target, str(workdir), json.dumps(params)]
    completed = subprocess.run(command, check=False, capture_output=True, text=True, env=env)
    if completed.returncode != 0:
        raise RuntimeError(
            f"bench worker {target} failed ({completed.returncode}):\n{completed.stderr[-4000:]}"
        )
    return json.loads(completed.stdout.strip().splitlines()[-1])


def set_torch_threads(params: dict) -> None:
    import torch

    torch.set_num_threads(params.get("threads") or os.cpu_count() or 1)


def import_tokenizers() -> None:
    """Import transformers' tokenizer classes before a worker starts its clock: some code paths
    import them on first use (≈ 8 s on a busy 2-core machine), others at module import, and
    imports are not what the contenders' wall times compare."""
    from transformers import AutoTokenizer  # noqa: F401


def measure(params: dict, work: Callable[[], object]) -> tuple[object, dict]:
    """Run a contender's measured work with the threads set and transformers' tokenizer classes
    imported before the clock; returns its result and {"seconds", "rss_before"}."""
    from dimcut.runtime import peak_rss_bytes

    set_torch_threads(params)
    import_tokenizers()
    rss_before = peak_rss_bytes()
    start = time.perf_counter()
    value = work()
    return value, {"seconds": time.perf_counter() - start, "rss_before": rss_before}


def machine() -> dict:
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu": _cpu_model(),
        "python": platform.python_version(),
        "loadavg": load,
    }


def _cpu_model() -> str | None:
    """The CPU's model name (Linux): timings on these shared machines depend on it (bfloat16
    matmuls, for one, are fast on some and slower than float32 on others)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None
