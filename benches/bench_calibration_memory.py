"""Peak memory of `dimcut slice` on a synthetic checkpoint much larger than its memory budgets.

Builds a random Llama checkpoint (default ≈ 1.1 GB of float32 weights in 200 MB shards), then
runs `dimcut slice` in a child process with small budgets and reports its peak RSS beside the
checkpoint size and the RSS of merely loading the whole model with transformers (what an
in-memory implementation such as SliceGPT's reference needs at least).

    python benches/bench_calibration_memory.py [--hidden 1024 --layers 16] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def build_checkpoint(path: Path, hidden: int, layers: int, vocab: int) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from tiny_models import build_tokenizer

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=int(2.75 * hidden),
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 256,
        vocab_size=vocab,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path, max_shard_size="200MB")
    tokenizer.save_pretrained(path)
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


# RUSAGE_CHILDREN is a running maximum over all children, so each measurement runs under its
# own fresh wrapper process that reports the peak of its single child.
MEASURE = """
import resource, subprocess, sys
subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
"""


def child_peak_rss(command: list[str]) -> tuple[int, float]:
    """Run a command; return its peak RSS (bytes) and wall seconds."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, *command], check=True, capture_output=True, text=True
    )
    return int(done.stdout.split()[-1]), time.perf_counter() - started


LOAD_WHOLE_MODEL = """
import sys, torch
from transformers import AutoModelForCausalLM
AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
"""

IMPORT_ONLY = "import torch, transformers, dimcut"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="dimcut-bench-") as tmp:
        model = Path(tmp) / "model"
        size = build_checkpoint(model, args.hidden, args.layers, args.vocab)
        baseline, _ = child_peak_rss([sys.executable, "-c", IMPORT_ONLY])
        sliced, seconds = child_peak_rss(
            [
                sys.executable, "-m", "dimcut.cli", "slice", str(model), "--sparsity", "0.25",
                "-o", str(Path(tmp) / "out"), "--nsamples", str(args.nsamples),
                "--seqlen", str(args.seqlen), "--memory-budget", "0.03", "-q",
            ]
        )  # fmt: skip
        whole, _ = child_peak_rss([sys.executable, "-c", LOAD_WHOLE_MODEL, str(model)])
    results = {
        "checkpoint_bytes": size,
        "hidden": args.hidden,
        "layers": args.layers,
        "calibration_tokens": args.nsamples * args.seqlen,
        "peak_rss_import_only": baseline,
        "peak_rss_dimcut_slice": sliced,
        "dimcut_slice_seconds": seconds,
        "peak_rss_transformers_load": whole,
    }
    gib = 2**30
    print(
        f"checkpoint                      {size / gib:6.2f} GiB ({args.layers} layers, D={args.hidden})"
    )
    print(f"python + torch + dimcut import  {baseline / gib:6.2f} GiB")
    print(f"dimcut slice (budgets 30 MiB)   {sliced / gib:6.2f} GiB peak RSS, {seconds:.0f} s")
    print(f"transformers load, whole model  {whole / gib:6.2f} GiB peak RSS")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
