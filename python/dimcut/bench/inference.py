"""The `inference` suite: what slicing buys at run time, dense against sliced models (either format).

Contenders are checkpoint directories (`--models dense=DIR,plain-s25=DIR,...`), or one dense
model (`--model-dir`) and the sliced models `dimcut.slice_model` makes of it first (`--sparsities`
× `--formats`, with a small calibration). Each contender runs in its own process (its peak RSS,
VmHWM, is its own), `--repeat` times, interleaved so that the machine's load drifts over all of
them alike; the table shows medians.

Per contender, on the same prompts (`--prompt-tokens` tokens of the built-in calibration text,
or seeded random ids when no contender has a tokenizer), one greedy `generate` call per batch
size (KV cache on, exactly `--new-tokens` new tokens) timed at every step by a logits processor:

- first-token latency: from the call to the first logits (setup + prefill);
- prefill tokens/s: batch × prompt tokens / first-token latency;
- decode tokens/s: batch × (new tokens − 1) / time from the first to the last logits;
- decode tokens per CPU-second: the same over the process's CPU time. On a machine that other
  jobs share, compare contenders with `--threads 1` and this figure: several threads then spend
  their time waiting for each other at every op (measured here at load 10 on 2 cores: a SmolLM2
  decode step took 0.3 s wall and 0.04 CPU-s at 1 thread, 0.9-1.3 s and 0.25 CPU-s at 2).

`slicegpt` layers multiply the residual by two shortcut matrices that `plain` does not have (its
one rotation folds them all away). To measure what they cost, every `slicegpt` worker times its
model a second time in the same process with every square shortcut replaced by the identity (the
outputs are then wrong; only the time matters): the model "with every foldable shortcut folded".
Beside it, the shortcuts' share of the per-token FLOPs and of the weights read per decode step,
estimated from the shapes.
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from dimcut.bench.report import cell, markdown
from dimcut.bench.workers import machine, run_worker, set_torch_threads
from dimcut.plan import Format
from dimcut.runtime import parse_sparsities, peak_rss_bytes
from dimcut.tokenizers import missing_tokenizer_files
from dimcut.zoo import resolve_model

PROMPT_SEED = 1234
# The warm-up call (first-call allocations, thread-pool start) uses this many prompt tokens.
WARMUP_TOKENS = 16
DENSE = "dense"


# --- contenders ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Contender:
    name: str
    model_dir: Path
    kind: str  # "dense", "plain" or "slicegpt"
    sparsity: float | None  # the sparsity it was sliced at (None when dense)


def describe_checkpoint(name: str, model_dir: Path) -> Contender:
    """The contender `model_dir` holds, from its config.json (dimcut outputs record their format)."""
    config = json.loads((model_dir / "config.json").read_text())
    facts = config.get("dimcut") or {}
    kind = facts.get("format", DENSE)
    sparsity = facts.get("sparsity", facts.get("effective_sparsity"))
    return Contender(name, model_dir, kind, sparsity)


def sliced_name(fmt: Format, sparsity: float) -> str:
    return f"{fmt.value}-s{sparsity * 100:g}"


def parse_models(value: str) -> list[tuple[str, str]]:
    """`name=DIR,name=DIR` → [(name, DIR)]; names unique."""
    pairs = []
    for item in value.split(","):
        name, sep, directory = item.partition("=")
        if not sep or not name or not directory:
            raise ValueError(f"--models: expected name=DIR items, got {item!r}")
        pairs.append((name.strip(), directory.strip()))
    names = [name for name, _ in pairs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"--models: names must be unique, repeated: {', '.join(duplicates)}")
    return pairs


def checkpoint_dir(value: str, option: str) -> Path:
    """A checkpoint directory or zoo alias (converted once into the cache)."""
    path = resolve_model(Path(value).expanduser())
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{option} {value}: no config.json in {path}")
    return path


def contenders_from_models(value: str) -> list[Contender]:
    return [
        describe_checkpoint(name, checkpoint_dir(directory, f"--models {name}="))
        for name, directory in parse_models(value)
    ]


def parse_formats(value: str) -> list[Format]:
    return [Format.parse(part.strip(), "--formats") for part in value.split(",") if part.strip()]


def slice_jobs(args, model_dir: Path, workdir: Path) -> list[dict]:
    """One slice_model call per (sparsity, format), outputs named like their contenders."""
    return [
        {
            "name": sliced_name(fmt, sparsity),
            "format": fmt.value,
            "sparsity": sparsity,
            "output": str(workdir / sliced_name(fmt, sparsity)),
        }
        for sparsity in parse_sparsities(args.sparsities)
        for fmt in parse_formats(args.formats)
    ]


def reusable(job: dict, model_dir: Path, nsamples: int, seqlen: int) -> bool:
    """Whether `job`'s output exists from an earlier run with the same inputs (--workdir reuse).

    An output made otherwise is an error, not something to overwrite silently."""
    config_path = Path(job["output"]) / "config.json"
    if not config_path.is_file():
        return False
    facts = json.loads(config_path.read_text()).get("dimcut") or {}
    calibration = facts.get("calibration") or {}
    made = (
        facts.get("format"),
        facts.get("sparsity"),
        facts.get("source_model"),
        calibration.get("nsamples"),
        calibration.get("seqlen"),
    )
    wanted = (job["format"], job["sparsity"], str(model_dir.resolve()), nsamples, seqlen)
    if made != wanted:
        raise FileExistsError(
            f"--workdir: {job['output']} holds another slice ({made}, wanted {wanted}); "
            "remove it or use another --workdir"
        )
    return True


def worker_slice(workdir: Path, params: dict) -> dict:
    """Slice the dense model once per job (one process: calibration's memory is not measured)."""
    from dimcut.slicing import slice_model

    set_torch_threads(params)
    seconds = {}
    for job in params["jobs"]:
        start = time.perf_counter()
        slice_model(
            params["model_dir"],
            job["sparsity"],
            job["output"],
            fmt=job["format"],
            nsamples=params["nsamples"],
            seqlen=params["seqlen"],
            device=params["device"],
            progress=False,
        )
        seconds[job["name"]] = time.perf_counter() - start
    return {"seconds": seconds}


# --- the worker ---------------------------------------------------------------------------------


def prompt_ids(params: dict):
    """The prompts every contender sees: [max batch, prompt tokens] token ids."""
    import torch

    rows, length = max(params["batch_sizes"]), params["prompt_tokens"]
    if params["prompt_source"] is None:
        generator = torch.Generator().manual_seed(PROMPT_SEED)
        return torch.randint(0, params["vocab_size"], (rows, length), generator=generator)
    from dimcut.calibration import calibration_documents, sample_sequences
    from dimcut.tokenizers import load_tokenizer

    documents, _ = calibration_documents(None)
    tokenizer = load_tokenizer(params["prompt_source"])
    return sample_sequences(tokenizer, documents, rows, length, PROMPT_SEED)


def make_step_clock(synchronize):
    """A logits processor that stamps the wall and CPU time of every generation step (after its
    forward)."""
    from transformers import LogitsProcessor

    class StepClock(LogitsProcessor):
        def __init__(self):
            self.times: list[float] = []
            self.cpu_times: list[float] = []

        def __call__(self, input_ids, scores):
            synchronize()
            self.times.append(time.perf_counter())
            self.cpu_times.append(time.process_time())
            return scores

    return StepClock()


def time_generation(model, ids, new_tokens: int, synchronize) -> dict:
    """One greedy generate call of exactly `new_tokens` tokens, timed step by step."""
    import torch
    from transformers import GenerationConfig, LogitsProcessorList

    eos = model.config.eos_token_id
    # An explicit config: every contender decodes the same way, whatever its generation_config.
    config = GenerationConfig(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        use_cache=True,
        eos_token_id=eos,
        pad_token_id=eos[0] if isinstance(eos, list) else (eos if eos is not None else 0),
    )
    clock = make_step_clock(synchronize)
    synchronize()
    start, cpu_start = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        output = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            generation_config=config,
            logits_processor=LogitsProcessorList([clock]),
        )
    synchronize()
    end = time.perf_counter()
    batch, length = ids.shape
    if output.shape[1] - length != new_tokens or len(clock.times) != new_tokens:
        raise RuntimeError(
            f"generate made {output.shape[1] - length} tokens in {len(clock.times)} steps, "
            f"not {new_tokens}"
        )
    first = clock.times[0] - start
    decode = clock.times[-1] - clock.times[0]
    steps = [later - earlier for earlier, later in zip(clock.times, clock.times[1:])]
    decode_cpu = clock.cpu_times[-1] - clock.cpu_times[0]
    return {
        "first_token_s": first,
        "prefill_tokens_per_s": batch * length / first,
        "decode_s": decode,
        "decode_tokens_per_s": batch * (new_tokens - 1) / decode,
        # Robust to the other processes of a shared machine preempting a few steps.
        "decode_median_step_s": statistics.median(steps),
        # CPU seconds of the process (all its threads). With one thread they measure the work
        # whatever else the machine runs; with several they include threads waiting for others.
        "first_token_cpu_s": clock.cpu_times[0] - cpu_start,
        "decode_cpu_s": decode_cpu,
        "decode_tokens_per_cpu_s": batch * (new_tokens - 1) / decode_cpu,
        "generate_s": end - start,
    }


def time_batches(model, prompts, params: dict, synchronize) -> dict:
    """{batch size: timings}, each after a short warm-up call at that batch size."""
    timings = {}
    for batch in params["batch_sizes"]:
        ids = prompts[:batch].to(model.device)
        time_generation(model, ids[:, :WARMUP_TOKENS], 2, synchronize)
        timings[str(batch)] = time_generation(model, ids, params["new_tokens"], synchronize)
    return timings


def linear_and_shortcut_parameters(model) -> tuple[int, int]:
    """Weights multiplied per token: every Linear's (a tied head counts: it is multiplied) and the
    shortcut matrices; the embedding is a lookup."""
    from torch import nn

    from dimcut.formats import SHORTCUT_MARK

    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    shortcut = sum(p.numel() for n, p in model.named_parameters() if SHORTCUT_MARK in n)
    return linear, shortcut


def flop_estimate(model, params: dict) -> dict:
    """Per-token FLOPs of a decode step at the mean context, and the shortcuts' share of them."""
    config = model.config
    linear, shortcut = linear_and_shortcut_parameters(model)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    # Scores and the weighted sum of values: 2 × 2 × heads × head_dim FLOPs per context token.
    attention_per_context_token = (
        4 * config.num_hidden_layers * config.num_attention_heads * head_dim
    )
    context = params["prompt_tokens"] + params["new_tokens"] / 2
    decode_flops = 2 * (linear + shortcut) + attention_per_context_token * context
    return {
        "linear_parameters": linear,
        "shortcut_parameters": shortcut,
        "decode_flops_per_token": decode_flops,
        "shortcut_flop_share": 2 * shortcut / decode_flops,
        "shortcut_weight_share": shortcut / (linear + shortcut),
    }


def fold_square_shortcuts(model) -> tuple[int, int]:
    """Replace every square shortcut by the identity (None); returns (folded, kept non-square).

    Timing only: this is the compute of a model whose residual never changes basis (as `plain`)."""
    folded = kept = 0
    for layer in model.model.layers:
        for name in ("attn_shortcut", "mlp_shortcut"):
            shortcut = getattr(layer, name, None)
            if shortcut is None:
                continue
            if shortcut.shape[0] == shortcut.shape[1]:
                setattr(layer, name, None)
                folded += 1
            else:
                kept += 1
    return folded, kept


def worker_infer(workdir: Path, params: dict) -> dict:
    import torch

    from dimcut.formats import count_parameters, load
    from dimcut.runtime import torch_device

    set_torch_threads(params)
    device = torch_device(params["device"])

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    prompts = prompt_ids(params)
    rss_before = peak_rss_bytes()
    start = time.perf_counter()
    model, _ = load(params["model_dir"], device=str(device), dtype=params["dtype"])
    load_s = time.perf_counter() - start
    result = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "load_s": load_s,
        "rss_before": rss_before,
        "rss_loaded": peak_rss_bytes(),
        "parameters": count_parameters(params["model_dir"]),
        "flops": flop_estimate(model, params),
        "batches": time_batches(model, prompts, params, synchronize),
    }
    if params["kind"] == Format.SLICEGPT.value:
        folded, kept = fold_square_shortcuts(model)
        result["folded"] = {
            "folded_shortcuts": folded,
            "kept_shortcuts": kept,
            "flops": flop_estimate(model, params),
            "batches": time_batches(model, prompts, params, synchronize),
        }
    return result


# --- the suite ----------------------------------------------------------------------------------


def median_timings(runs: list[dict]) -> dict:
    """Per batch size and metric, the median over runs."""
    return {
        batch: {
            metric: statistics.median(run[batch][metric] for run in runs)
            for metric in runs[0][batch]
        }
        for batch in runs[0]
    }


def contender_row(contender: Contender, results: list[dict]) -> dict:
    first = results[0]
    row = {
        "model_dir": str(contender.model_dir),
        "format": contender.kind,
        "sparsity": contender.sparsity,
        "device": first["device"],
        "threads": first["threads"],
        "parameters": first["parameters"],
        "flops": first["flops"],
        "load_s": statistics.median(r["load_s"] for r in results),
        "batches": median_timings([r["batches"] for r in results]),
        "batches_all": [r["batches"] for r in results],
        "peak_rss_gib": max(r["peak_rss"] for r in results) / 2**30,
        "rss_loaded_gib": max(r["rss_loaded"] for r in results) / 2**30,
        "rss_before_gib": max(r["rss_before"] for r in results) / 2**30,
    }
    if "folded" in first:
        row["folded"] = {
            "folded_shortcuts": first["folded"]["folded_shortcuts"],
            "kept_shortcuts": first["folded"]["kept_shortcuts"],
            "flops": first["folded"]["flops"],
            "batches": median_timings([r["folded"]["batches"] for r in results]),
            "batches_all": [r["folded"]["batches"] for r in results],
        }
    return row


def decode_rates(batches: dict, metric: str = "decode_tokens_per_s") -> dict:
    return {batch: timing[metric] for batch, timing in batches.items()}


def ratios_to(reference: dict, row: dict) -> dict:
    """Speed-ups of `row` over `reference` (> 1: faster) and its parameter ratio."""
    smallest = min(row["batches"], key=int)
    ours, theirs = row["batches"][smallest], reference["batches"][smallest]
    return {
        "decode_speedup": {
            batch: row["batches"][batch]["decode_tokens_per_s"] / timing["decode_tokens_per_s"]
            for batch, timing in reference["batches"].items()
        },
        "decode_cpu_speedup": {
            batch: row["batches"][batch]["decode_tokens_per_cpu_s"]
            / timing["decode_tokens_per_cpu_s"]
            for batch, timing in reference["batches"].items()
        },
        "prefill_speedup": ours["prefill_tokens_per_s"] / theirs["prefill_tokens_per_s"],
        "first_token_ratio": ours["first_token_s"] / theirs["first_token_s"],
        "parameter_ratio": row["parameters"]["total"] / reference["parameters"]["total"],
        "decode_flop_ratio": row["flops"]["decode_flops_per_token"]
        / reference["flops"]["decode_flops_per_token"],
    }


def gap_closed(slicegpt: dict, plain: dict, folded: dict) -> dict:
    """Per batch: (folded − slicegpt) / (plain − slicegpt) of the rates; None without a gap."""
    closed = {}
    for batch, rate in slicegpt.items():
        gap = plain[batch] - rate
        closed[batch] = (folded[batch] - rate) / gap if gap > 0 else None
    return closed


def shortcut_cost(slicegpt: dict, plain: dict) -> dict:
    """Does `slicegpt` pay for its shortcuts? Measured decode ratios beside the FLOP estimate.

    gap_closed: of the decode gap slicegpt → plain, the part that folding the square shortcuts
    recovers in the same process ((folded − slicegpt) / (plain − slicegpt))."""
    ours, theirs = decode_rates(slicegpt["batches"]), decode_rates(plain["batches"])
    folded = decode_rates(slicegpt["folded"]["batches"])
    per_cpu = "decode_tokens_per_cpu_s"
    ours_cpu, theirs_cpu = (decode_rates(r["batches"], per_cpu) for r in (slicegpt, plain))
    folded_cpu = decode_rates(slicegpt["folded"]["batches"], per_cpu)

    def median_step(row: dict, batch: str) -> float:
        return row["batches"][batch]["decode_median_step_s"]

    return {
        "decode_ratio": {b: ours[b] / theirs[b] for b in ours},
        "decode_ratio_median_step": {
            b: median_step(plain, b) / median_step(slicegpt, b) for b in ours
        },
        "decode_ratio_cpu": {b: ours_cpu[b] / theirs_cpu[b] for b in ours},
        "folded_speedup_cpu": {b: folded_cpu[b] / ours_cpu[b] for b in ours},
        "folded_decode_ratio": {b: folded[b] / theirs[b] for b in ours},
        "folded_speedup": {b: folded[b] / ours[b] for b in ours},
        "gap_closed": gap_closed(ours, theirs, folded),
        "gap_closed_cpu": gap_closed(ours_cpu, theirs_cpu, folded_cpu),
        "shortcut_flop_share": slicegpt["flops"]["shortcut_flop_share"],
        "shortcut_weight_share": slicegpt["flops"]["shortcut_weight_share"],
        "flop_predicted_ratio": plain["flops"]["decode_flops_per_token"]
        / slicegpt["flops"]["decode_flops_per_token"],
        "folded_shortcuts": slicegpt["folded"]["folded_shortcuts"],
        "kept_shortcuts": slicegpt["folded"]["kept_shortcuts"],
    }


def shortcut_pairs(contenders: list[Contender], rows: dict) -> list[dict]:
    """Each slicegpt contender beside the plain one of the same sparsity (or the only plain)."""
    plains = [c for c in contenders if c.kind == Format.PLAIN.value]
    pairs = []
    for contender in contenders:
        if contender.kind != Format.SLICEGPT.value or not plains:
            continue
        same = [p for p in plains if p.sparsity == contender.sparsity]
        plain = same[0] if same else plains[0] if len(plains) == 1 else None
        if plain is not None:
            cost = shortcut_cost(rows[contender.name], rows[plain.name])
            pairs.append({"slicegpt": contender.name, "plain": plain.name, **cost})
    return pairs


def check_lengths(contenders: list[Contender], prompt_tokens: int, new_tokens: int) -> None:
    if prompt_tokens < WARMUP_TOKENS:
        raise ValueError(f"--prompt-tokens must be ≥ {WARMUP_TOKENS}, got {prompt_tokens}")
    if new_tokens < 2:
        raise ValueError(
            f"--new-tokens must be ≥ 2 (decode is timed between tokens), got {new_tokens}"
        )
    for contender in contenders:
        config = json.loads((contender.model_dir / "config.json").read_text())
        limit = config.get("max_position_embeddings")
        if limit is not None and prompt_tokens + new_tokens > limit:
            raise ValueError(
                f"--prompt-tokens + --new-tokens = {prompt_tokens + new_tokens} exceeds "
                f"{contender.name}'s max_position_embeddings {limit}"
            )


def prompt_source(contenders: list[Contender]) -> Path | None:
    """The first contender with a tokenizer (sliced outputs copy the dense model's)."""
    for contender in contenders:
        if missing_tokenizer_files(contender.model_dir) is None:
            return contender.model_dir
    return None


def batch_sizes(value: str) -> list[int]:
    try:
        sizes = [int(part) for part in value.split(",") if part]
    except ValueError:
        raise ValueError(f"--batch-sizes: expected sizes like 1,8, got {value!r}")
    if not sizes or min(sizes) < 1:
        raise ValueError(f"--batch-sizes: sizes must be ≥ 1, got {value!r}")
    return sorted(set(sizes))


def run_inference(args, say=print) -> dict:
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="dimcut-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        return measure(args, workdir, say)
    finally:
        if not args.workdir and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def prepare_contenders(args, workdir: Path, say) -> tuple[list[Contender], dict | None]:
    """The contenders and how the sliced ones were made (None when `--models` names them all)."""
    if args.models:
        return contenders_from_models(args.models), None
    model_dir = checkpoint_dir(args.model_dir, "--model-dir")
    jobs = slice_jobs(args, model_dir, workdir)
    todo = [job for job in jobs if not reusable(job, model_dir, args.nsamples, args.seqlen)]
    slicing = {
        "model_dir": str(model_dir),
        "nsamples": args.nsamples,
        "seqlen": args.seqlen,
        "reused": [job["name"] for job in jobs if job not in todo],
        "seconds": {},
    }
    if todo:
        names = ", ".join(job["name"] for job in todo)
        say(f"slicing {names} ({args.nsamples}×{args.seqlen} calibration tokens)")
        params = {
            "threads": args.threads,
            "device": args.device,
            "model_dir": str(model_dir),
            "nsamples": args.nsamples,
            "seqlen": args.seqlen,
            "jobs": todo,
        }
        slicing["seconds"] = run_worker(worker_slice, workdir, params)["seconds"]
    contenders = [describe_checkpoint(DENSE, model_dir)]
    contenders += [describe_checkpoint(job["name"], Path(job["output"])) for job in jobs]
    return contenders, slicing


def measure(args, workdir: Path, say) -> dict:
    contenders, slicing = prepare_contenders(args, workdir, say)
    check_lengths(contenders, args.prompt_tokens, args.new_tokens)
    source = prompt_source(contenders)
    first_config = json.loads((contenders[0].model_dir / "config.json").read_text())
    common = {
        "threads": args.threads,
        "device": args.device,
        "dtype": args.dtype,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "batch_sizes": batch_sizes(args.batch_sizes),
        "prompt_source": str(source) if source else None,
        "vocab_size": first_config["vocab_size"],
    }
    loadavg_start = machine()["loadavg"]
    results: dict[str, list[dict]] = {c.name: [] for c in contenders}
    for run in range(args.repeat):
        for contender in contenders:
            params = {**common, "model_dir": str(contender.model_dir), "kind": contender.kind}
            result = run_worker(worker_infer, workdir, params)
            results[contender.name].append(result)
            rates = decode_rates(result["batches"])
            say(
                f"run {run + 1}/{args.repeat} {contender.name}: decode tokens/s "
                + ", ".join(f"b{batch} {rate:.1f}" for batch, rate in rates.items())
            )
    rows = {c.name: contender_row(c, results[c.name]) for c in contenders}
    reference = next((c for c in contenders if c.kind == DENSE), contenders[0])
    return {
        "suite": "inference",
        **{key: common[key] for key in ("dtype", "prompt_tokens", "new_tokens", "batch_sizes")},
        "device": rows[reference.name]["device"],
        "threads": rows[reference.name]["threads"],
        "repeat": args.repeat,
        "prompts": (
            f"built-in calibration text, {source} tokenizer, seed {PROMPT_SEED}"
            if source
            else f"random token ids, seed {PROMPT_SEED}"
        ),
        "slicing": slicing,
        "machine": {**machine(), "loadavg": loadavg_start},
        "loadavg_end": machine()["loadavg"],
        "reference": reference.name,
        "contenders": rows,
        "ratios": {name: ratios_to(rows[reference.name], row) for name, row in rows.items()},
        "shortcuts": shortcut_pairs(contenders, rows),
    }


# --- the table ----------------------------------------------------------------------------------


def format_inference(report: dict) -> str:
    batches = [str(b) for b in report["batch_sizes"]]
    smallest = batches[0]
    header = ["contender", "params M", f"prefill tok/s (b{smallest})", "first token s"]
    header += [f"decode tok/s b{b}" for b in batches]
    header += [f"decode tok/CPU-s b{b}" for b in batches] + ["peak RSS GiB"]
    header += [f"decode × {report['reference']} b{b}" for b in batches]
    rows = []

    def timing_row(name: str, params: str, timings: dict, rss: str, speedups: dict) -> list[str]:
        return (
            [name, params]
            + [f"{timings[smallest]['prefill_tokens_per_s']:.0f}"]
            + [f"{timings[smallest]['first_token_s']:.3f}"]
            + [f"{timings[b]['decode_tokens_per_s']:.1f}" for b in batches]
            + [f"{timings[b]['decode_tokens_per_cpu_s']:.1f}" for b in batches]
            + [rss]
            + [cell(speedups.get(b), "{:.2f}") for b in batches]
        )

    reference = report["contenders"][report["reference"]]
    for name, row in report["contenders"].items():
        speedups = report["ratios"][name]["decode_speedup"]
        params = f"{row['parameters']['total'] / 1e6:.1f}"
        rows.append(
            timing_row(name, params, row["batches"], f"{row['peak_rss_gib']:.2f}", speedups)
        )
        if "folded" in row:
            folded = row["folded"]["batches"]
            speedups = {
                b: folded[b]["decode_tokens_per_s"] / reference["batches"][b]["decode_tokens_per_s"]
                for b in batches
            }
            rows.append(timing_row(f"{name}, shortcuts folded", "—", folded, "—", speedups))
    lines = markdown(header, rows)
    lines.append(
        f"\n{report['device']}, {report['threads']} threads, {report['dtype']}; prompts of "
        f"{report['prompt_tokens']} tokens ({report['prompts']}); {report['new_tokens']} new "
        f"tokens, greedy, KV cache; medians of {report['repeat']} run(s), one process each"
    )
    load_start, load_end = report["machine"]["loadavg"], report["loadavg_end"]
    if load_start and load_end:
        lines.append(
            f"load average at start {load_start[0]:.2f}, at end {load_end[0]:.2f} "
            f"(1 min; {report['machine']['cpu_count']} CPUs)"
        )
    for pair in report["shortcuts"]:
        lines.append(
            f"{pair['slicegpt']} / {pair['plain']} decode: "
            + ", ".join(f"b{b} {pair['decode_ratio'][b]:.3f}" for b in batches)
            + " (median step: "
            + ", ".join(f"b{b} {pair['decode_ratio_median_step'][b]:.3f}" for b in batches)
            + "; per CPU-second: "
            + ", ".join(f"b{b} {pair['decode_ratio_cpu'][b]:.3f}" for b in batches)
            + f"); FLOP estimate {pair['flop_predicted_ratio']:.3f} (shortcuts "
            f"{pair['shortcut_flop_share']:.1%} of decode FLOPs, "
            f"{pair['shortcut_weight_share']:.1%} of weights read)"
        )
        lines.append(
            f"  {pair['folded_shortcuts']} square shortcuts folded ({pair['kept_shortcuts']} "
            "non-square kept): decode × "
            + ", ".join(f"b{b} {pair['folded_speedup'][b]:.3f}" for b in batches)
            + " (per CPU-second: "
            + ", ".join(f"b{b} {pair['folded_speedup_cpu'][b]:.3f}" for b in batches)
            + "); of the gap to plain it closes "
            + ", ".join(f"b{b} {cell(pair['gap_closed'][b], '{:.0%}')}" for b in batches)
            + " (per CPU-second: "
            + ", ".join(f"b{b} {cell(pair['gap_closed_cpu'][b], '{:.0%}')}" for b in batches)
            + ")"
        )
    return "\n".join(lines)
