"""The `calibration` suite: `dimcut.calibration.calibrate` on a real checkpoint beside a plain
transformers forward (float32, no grad) over the same tokens."""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

from dimcut.bench.workers import machine, measure, run_worker, set_torch_threads
from dimcut.runtime import peak_rss_bytes


def _calibrate(params: dict, dtype: str) -> dict:
    from dimcut.calibration import calibrate

    calibrated, measured = measure(
        params,
        lambda: calibrate(
            params["model_dir"],
            fmt="slicegpt",
            width=params["width"],
            nsamples=params["nsamples"],
            seqlen=params["seqlen"],
            device="cpu",
            dtype=dtype,
            progress=False,
        ),
    )
    calibrated.close()
    return measured


def worker_calibrate(workdir: Path, params: dict) -> dict:
    return _calibrate(params, "float32")


def worker_calibrate_bf16(workdir: Path, params: dict) -> dict:
    """Calibration with the decoder blocks in bfloat16 (`--calib-dtype bfloat16`)."""
    return _calibrate(params, "bfloat16")


def worker_forward(workdir: Path, params: dict) -> dict:
    """A plain transformers forward (no grad, float32) over the tokens calibration samples."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dimcut.calibration import calibration_documents, sample_sequences
    from dimcut.calibration.procedures import MAX_BATCH_TOKENS

    set_torch_threads(params)
    rss_before = peak_rss_bytes()
    start = time.perf_counter()
    model_dir = params["model_dir"]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    documents, _ = calibration_documents(None)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokens = sample_sequences(tokenizer, documents, params["nsamples"], params["seqlen"], 42)
    per_batch = max(1, MAX_BATCH_TOKENS // params["seqlen"])
    with torch.inference_mode():
        for first in range(0, len(tokens), per_batch):
            model.model(tokens[first : first + per_batch])  # hidden states, as calibration
    return {"seconds": time.perf_counter() - start, "rss_before": rss_before}


CONTENDERS = {
    "calibrate": worker_calibrate,
    "calibrate-bf16": worker_calibrate_bf16,
    "forward": worker_forward,
}


def run_calibration(args) -> dict:
    model_dir = Path(args.model_dir).expanduser()
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"--model-dir {model_dir}: no config.json there")
    layers = int(json.loads(config_path.read_text())["num_hidden_layers"])
    params = {
        "threads": args.threads,
        "model_dir": str(model_dir),
        "nsamples": args.nsamples,
        "seqlen": args.seqlen,
        "width": args.width,
    }
    tokens = args.nsamples * args.seqlen
    rows = {}
    for name, worker in CONTENDERS.items():
        results = [
            run_worker(worker, Path(tempfile.gettempdir()), params) for _ in range(args.repeat)
        ]
        median = statistics.median(r["seconds"] for r in results)
        rows[name] = {
            "seconds": median,
            "seconds_all": [r["seconds"] for r in results],
            "tokens_per_s": tokens / median,
            "layer_tokens_per_s": tokens * layers / median,
            "peak_rss_gib": max(r["peak_rss"] for r in results) / 2**30,
            "rss_before_gib": max(r["rss_before"] for r in results) / 2**30,
        }
    return {
        "suite": "calibration",
        "model_dir": str(model_dir),
        "layers": layers,
        "nsamples": args.nsamples,
        "seqlen": args.seqlen,
        "tokens": tokens,
        "width": args.width,
        "threads": args.threads,
        "machine": machine(),
        "contenders": rows,
        "time_ratio": rows["calibrate"]["seconds"] / rows["forward"]["seconds"],
        "bf16_speedup": rows["calibrate"]["seconds"] / rows["calibrate-bf16"]["seconds"],
    }
