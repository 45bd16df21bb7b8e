"""`dimcut heal` before and after it went out of core, side by side on this machine.

The same sliced model, teacher and options, each contender in its own process under
`/usr/bin/time -v` (peak RSS):

- `baseline`: the heal as of BASE (default c96381a: the teacher and the student loaded whole in
  the training dtype), run from a git worktree of that commit with this checkout's compiled
  engine (the Rust engine did not change since);
- `out-of-core`: this checkout (the teacher streamed half a layer at a time, the student's frozen
  weights mapped from the shards).

Each line reports wall time, the teacher's seconds, training seconds per step (from the
progress bar's elapsed time, which both versions print) and peak RSS; `--json` keeps them.

    python benches/heal_memory.py SLICED TEACHER --steps 8 -- --dtype bfloat16   # heal options after --

e.g. SLICED = the Qwen2.5-Coder-1.5B s = 0.25 cut that `bash benches/heal_study.sh
qwen_streamed` makes (bench-out/heal/qwen-slicegpt-s25-healed-streamed-sliced).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASE = "c96381a"
# The last update of tqdm's "healing" bar: "healing: 100%|...| 8/8 [01:40<00:00, ...".
BAR = re.compile(r"healing:\s+100%\|[^|]*\|\s*(\d+)/\1 \[(?:(\d+):)?(\d+):(\d+)<")
TEACHER = re.compile(r"teacher (\d+(?:\.\d+)?) s")
PEAK = re.compile(r"Maximum resident set size \(kbytes\): (\d+)")
WALL = re.compile(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)")


def worktree(base: str, where: Path) -> Path:
    """A checkout of `base` at `where`, with this checkout's compiled engine."""
    if not (where / "python").is_dir():
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(where), base], check=True
        )
    for engine in (ROOT / "python" / "dimcut").glob("_core*.so"):
        shutil.copy2(engine, where / "python" / "dimcut" / engine.name)
    return where / "python"


def run(name: str, python_path: Path, sliced: str, teacher: str, steps: int, extra, work: Path):
    out = work / name
    log, timing = work / f"{name}.log", work / f"{name}.time.txt"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(out.with_name(out.name + ".dimcut-heal"), ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(python_path), "HF_HUB_OFFLINE": "1"}
    command = ["/usr/bin/time", "-v", "-o", str(timing), sys.executable, "-P", "-c",
               "import sys; from dimcut.cli import main; sys.exit(main())",
               "heal", sliced, "--teacher", teacher, "-o", str(out), "--steps", str(steps),
               "--data", "wiki-offline", *extra]  # fmt: skip
    with open(log, "w") as stderr:
        summary = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=stderr,
                                 text=True, check=True).stdout  # fmt: skip
    shutil.rmtree(out, ignore_errors=True)
    bar = BAR.findall(log.read_text().replace("\r", "\n"))[-1]
    hours, minutes, seconds = (int(part or 0) for part in bar[1:])
    wall = WALL.search(timing.read_text()).groups()
    return {
        "contender": name,
        "wall_seconds": int(wall[0] or 0) * 3600 + int(wall[1]) * 60 + float(wall[2]),
        "teacher_seconds": float(TEACHER.search(summary).group(1)),
        "seconds_per_step": (hours * 3600 + minutes * 60 + seconds) / steps,
        "peak_rss_gib": int(PEAK.search(timing.read_text()).group(1)) * 1024 / 2**30,
        "summary": summary.strip().splitlines(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sliced")
    parser.add_argument("teacher")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--base", default=BASE, help="the baseline commit")
    parser.add_argument("--work", type=Path, default=ROOT / "bench-out" / "heal-memory")
    parser.add_argument("--json", type=Path, help="write the rows here")
    args, heal_options = parser.parse_known_args()  # the rest, after --, goes to `dimcut heal`
    args.heal_options = [option for option in heal_options if option != "--"]
    from dimcut.bench.workers import machine

    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        with tempfile.TemporaryDirectory(dir=args.work) as scratch:
            contenders = {
                "baseline": worktree(args.base, Path(scratch) / "base"),
                "out-of-core": ROOT / "python",
            }
            for name, python_path in contenders.items():
                row = run(name, python_path, args.sliced, args.teacher, args.steps,
                          args.heal_options, args.work)  # fmt: skip
                rows.append(row)
                print(f"{name:12s} peak RSS {row['peak_rss_gib']:.2f} GiB, wall "
                      f"{row['wall_seconds']:.0f} s, teacher {row['teacher_seconds']:.0f} s, "
                      f"training {row['seconds_per_step']:.1f} s/step", flush=True)  # fmt: skip
    finally:  # the worktree's directory is gone now: forget it
        subprocess.run(["git", "-C", str(ROOT), "worktree", "prune"], check=False)
    base, ours = rows
    print(f"out-of-core / baseline: peak RSS {ours['peak_rss_gib'] / base['peak_rss_gib']:.2f}x, "
          f"s/step {ours['seconds_per_step'] / base['seconds_per_step']:.2f}x")  # fmt: skip
    if args.json:
        report = {"command": sys.argv, "base": args.base, "steps": args.steps,
                  "machine": machine(), "rows": rows}  # fmt: skip
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
