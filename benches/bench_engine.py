"""End-to-end slicing benchmark: dimcut's engine vs a PyTorch baseline vs the GEMM limit.

The implementation is `dimcut.bench` (also `dimcut bench`); this script is kept so that
`python benches/bench_engine.py ...` keeps working. Examples:

    python benches/bench_engine.py --preset tiny            # seconds
    python benches/bench_engine.py --preset 8b --repeat 3   # 2 Llama-3-8B layers, 2.97 GB
    python benches/bench_engine.py --suite calibration --nsamples 16

See `dimcut bench --help` and the Performance section of README.md.
"""

from __future__ import annotations

import sys

from dimcut.bench import main

if __name__ == "__main__":
    sys.exit(main())
