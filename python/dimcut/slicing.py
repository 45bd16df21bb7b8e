"""`dimcut slice`: calibrate rotations, build the plan, and write the sliced model via the engine."""

from __future__ import annotations

import functools
import json
import math
import shutil
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dimcut import _hooks, calibration, depth, formats, zoo
from dimcut.architectures import check_weights, load_architecture, sliced_width
from dimcut.engine import inspect_checkpoint, rewrite_checkpoint
from dimcut.plan import (
    Format,
    Method,
    Widths,
    model_ops,
    parse_method,
    plan_rotation_names,
    plan_widths,
    retained_widths,
    rotation_arrays,
    sensitivity_candidates,
)
from dimcut.runtime import (
    DEFAULT_MEMORY_BUDGET,
    GIB,
    Device,
    Precision,
    check_output_dir,
    engine_budget,
    package_version,
    peak_rss_bytes,
)

# `--widths`, besides a schedule FILE
UNIFORM, VARIANCE, SENSITIVITY = "uniform", "variance", "sensitivity"


@dataclass
class SliceResult:
    """What `slice_model` did: widths, parameter counts, time and memory."""

    output: Path
    format: str
    sparsity: float
    hidden_size: int
    original_hidden_size: int
    parameters_before: int
    parameters: dict
    seconds: float
    peak_rss_bytes: int
    calibration: dict | None = None
    retained_variance: dict[str, float] = field(default_factory=dict)
    # Seconds per phase: calibration's (see calibration.Timings), the engine's "rewrite", and
    # with measured widths "widths" (choosing them) and "sensitivity" (that pass's own phases).
    timings: dict = field(default_factory=dict)
    # With a parameter budget: the budget and what the next wider width would have needed.
    target_params: int | None = None
    next_width_parameters: int | None = None
    method: str = Method.PCA.value
    # A depth cut (`--method layers`): (layers kept, layers before), the removed layers' indices
    # and every layer's block influence.
    layers: tuple[int, int] | None = None
    removed_layers: list[int] = field(default_factory=list)
    block_influence: list[float] = field(default_factory=list)

    @property
    def effective_sparsity(self) -> float:
        if self.layers is not None:
            return 1 - self.layers[0] / self.layers[1]
        return 1 - self.hidden_size / self.original_hidden_size

    @property
    def size_warning(self) -> str | None:
        """Why the output has more parameters than the input and what makes it smaller, or None.

        A slicegpt cut adds shortcut matrices and, on a tied-embedding model, an untied head:
        at small sparsities that outweighs what the cut removes."""
        before, after = self.parameters_before, self.parameters["total"]
        if after <= before:
            return None
        shortcuts = after - self.parameters["without_shortcuts"]
        cause = f"its shortcut matrices hold {shortcuts:,}" if shortcuts else "an untied head"
        return (
            f"the output has {after - before:,} more parameters than the input ({cause}); "
            "--format plain (no shortcut matrices, a stock architecture) or --target-params 0.9 "
            "(a parameter budget: the width is chosen to meet it) make it smaller"
        )

    def summary(self) -> str:
        before, counts = self.parameters_before, self.parameters

        def change(after: int) -> str:
            delta = 100 * (after / before - 1)
            return f"{after:,} ({abs(delta):.1f}% {'more' if delta > 0 else 'fewer'})"

        how = f"format {self.format}"
        if self.method != Method.PCA.value:
            how += f", method {self.method}"
        shape = (
            f"hidden size      {self.original_hidden_size} -> {self.hidden_size} "
            f"(sparsity {self.sparsity:g}, effective {self.effective_sparsity:.4f})"
        )
        if self.layers is not None:
            removed = ", ".join(
                f"{i} (BI {self.block_influence[i]:.4f})" for i in self.removed_layers
            )
            shape = (
                f"layers           {self.layers[1]} -> {self.layers[0]} "
                f"(sparsity {self.sparsity:g}, effective {self.effective_sparsity:.4f}); "
                f"removed {removed or 'none'}"
            )
        lines = [
            f"sliced model     {self.output} ({how})",
            shape,
            f"parameters       {before:,} -> {change(counts['total'])}",
            f"  w/o shortcuts  {change(counts['without_shortcuts'])}",
        ]
        if self.target_params is not None:
            size = "number of layers" if self.layers else "width"
            bound = (
                f"the next {size} up would have {self.next_width_parameters:,}"
                if self.next_width_parameters is not None
                else ("met with every layer" if self.layers else "met at full width")
            )
            lines.append(
                f"budget           {self.target_params:,} parameters: the {size} was chosen by "
                f"it ({bound})"
            )
        if self.retained_variance:
            kept = list(self.retained_variance.values())
            lines.append(
                f"variance kept    min {min(kept):.4f}, mean {sum(kept) / len(kept):.4f} "
                f"(of {len(kept)} PCA signals, by the directions each keeps)"
            )
        phases = [
            f"{phase} {self.timings[key]:.1f} s"
            for phase, key in (
                ("widths", "widths"),
                ("calibration", "total"),
                ("rewrite", "rewrite"),
            )
            if key in self.timings
        ]
        lines += [
            f"wall time        {self.seconds:.1f} s ({', '.join(phases)})",
            f"peak memory      {self.peak_rss_bytes / 2**20:.0f} MiB (RSS)",
        ]
        return "\n".join(lines)


def write_sliced_model(
    model_dir: str | Path,
    out_dir: str | Path,
    *,
    fmt: Format | str,
    rotations: Mapping[str, np.ndarray],
    width: int,
    slice_head: bool = False,
    widths: Widths | None = None,
    provenance: dict | None = None,
    overwrite: bool = False,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    precision: str = "f32",
    progress: bool = True,
) -> dict:
    """Rewrite `model_dir` into `out_dir` with the given rotations (float64 Q or its leading
    columns, by plan name; memory-mapped ones are read by the engine in place). `widths` is a
    per-layer schedule (slicegpt), else `width` everywhere."""
    fmt = Format.parse(fmt)
    arch = load_architecture(model_dir)
    tensors = inspect_checkpoint(model_dir)
    if fmt is Format.PLAIN and formats.stock_width(arch, width, 1) != width:
        raise ValueError(f"width {width} is not a valid hidden size for a stock {arch.model_type}")
    widths = widths or plan_widths(arch, fmt, width, slice_head)
    names, arrays = rotation_arrays(fmt, rotations, widths, arch)
    ops = model_ops(arch, fmt, names, widths, tensors)
    facts = {
        "version": package_version(),
        "format": fmt.value,
        "hidden_size": width,
        "original_hidden_size": arch.hidden_size,
        "effective_sparsity": 1 - width / arch.hidden_size,
        "slice_head": widths.head != arch.hidden_size,
        "shortcuts": fmt is Format.SLICEGPT,
        **(provenance or {}),
    }
    config = formats.output_config(arch, fmt, widths, facts)
    return rewrite_checkpoint(
        model_dir,
        out_dir,
        ops,
        arrays,
        extra_files=formats.output_files(config, fmt.value),
        memory_budget=engine_budget(memory_budget),
        precision=precision,
        overwrite=overwrite,
        progress=progress,
    )


def slice_model(
    model_dir: str | Path,
    sparsity: float | None,
    out_dir: str | Path,
    *,
    target_params: float | None = None,
    fmt: Format | str = Format.SLICEGPT,
    calib: str | None = None,
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 42,
    device: str = "auto",
    round_to: int = 8,
    slice_head: bool = False,
    rotations_file: str | Path | None = None,
    save_rotations: str | Path | None = None,
    overwrite: bool = False,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    precision: str = "f32",
    progress: bool = True,
    resume: bool = False,
    weighting: calibration.Weighting | str = calibration.DEFAULT_WEIGHTING,
    widths: str | Path = UNIFORM,
    calib_dtype: Precision | str = Precision.FLOAT32,
    method: Method | str = Method.PCA,
    influence: tuple[list[float], dict] | None = None,
) -> SliceResult:
    """Slice a checkpoint's hidden size to d = (1 − s)·D (rounded down) and write it to out_dir.

    `method` makes the basis whose first d directions are kept: "pca" (SliceGPT), or for the
    plain format "channels" (the d residual channels of largest energy: no rotation) or
    "random" (a random rotation from `seed`, the control); "layers" cuts depth instead — the
    fraction s of the decoder layers with the lowest block influence is removed (`depth`);
    `influence`, the (influences, record) `calibration.block_influence` returned for this model
    and these calibration options, is used instead of computing them again (a sweep computes
    them once for all its sparsities).

    Instead of a sparsity, `target_params` sets a parameter budget — a fraction of the dense
    model's parameters (≤ 10) or a count — and the width is the largest whose output (head and
    shortcut matrices included) has at most that many parameters (pass `sparsity=None`).

    `widths` (slicegpt format) is "uniform" (d everywhere), "variance" (each residual point as
    wide as its signal needs to keep a common fraction of its energy in the dense model, that
    fraction the largest whose output fits the same parameter count as uniform d, or the
    budget), or a JSON file with the schedule as one list (`plan.Widths.from_list`; then give
    neither sparsity nor target_params). The recorded hidden size of a schedule is the uniform
    width with the same parameter budget.

    `calib_dtype` is what the decoder blocks compute in during calibration (the residual
    stream and covariances stay float32/float64; `calibration.BLOCK_PRECISIONS`).

    `memory_budget` (bytes) bounds what dimcut itself holds: calibration activations beyond half
    of it spill to disk, the engine's tiles use a quarter. `resume=True` keeps calibration state
    after every layer in `<out_dir>.dimcut-resume/` and continues from it when it exists; it is
    removed once the output is complete.
    """
    started = time.perf_counter()
    fmt = Format.parse(fmt)
    method = parse_method(method, fmt)
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    arch = load_architecture(model_dir)
    if method in UNCALIBRATED_METHODS:
        reused = [
            option
            for option, value in (
                ("rotations", rotations_file),
                ("save_rotations", save_rotations),
                ("resume", resume),
            )
            if value
        ]
        if reused:
            raise ValueError(
                f"method {method.value}: {reused[0]} (--{reused[0].replace('_', '-')}) keeps "
                "or reuses calibrated rotations, and this method makes none"
            )
    budget = next_count = None
    schedule_file = None if str(widths) in (UNIFORM, VARIANCE, SENSITIVITY) else Path(widths)
    if schedule_file is not None:
        if sparsity is not None or target_params is not None:
            raise ValueError(
                f"widths {widths}: a schedule file sets every width; give neither sparsity nor "
                "target_params"
            )
    elif (sparsity is None) == (target_params is None):
        raise ValueError("give exactly one of sparsity and target_params")
    if str(widths) != UNIFORM and fmt is not Format.SLICEGPT:
        raise ValueError(
            f"widths {widths}: per-layer widths need the slicegpt format (plain has one width)"
        )
    signals = {
        "source": calib, "nsamples": nsamples, "seqlen": seqlen, "seed": seed,
        "device": device, "memory_budget": memory_budget, "dtype": calib_dtype,
        "progress": progress,
    }  # fmt: skip
    if influence is not None and method is not Method.LAYERS:
        raise ValueError(
            f"method {method.value}: influence is the block influence of --method layers"
        )
    if method is Method.LAYERS:
        return _cut_layers(
            model_dir, out_dir, arch, sparsity, target_params, signals, overwrite, started,
            influence,
        )  # fmt: skip
    if schedule_file is not None:
        schedule = read_schedule(schedule_file, arch)
        size = formats.planned_parameters(arch, fmt, schedule)["total"]
        width, _ = budget_width(arch, fmt, size, round_to, slice_head)
        sparsity = 1 - width / arch.hidden_size
    elif target_params is not None:
        budget, width, next_count = budget_cut(
            model_dir, arch, fmt, target_params, round_to, slice_head
        )
        sparsity = 1 - width / arch.hidden_size
    else:
        width = sliced_width(arch.hidden_size, sparsity, round_to)
        if fmt is Format.PLAIN:
            width = formats.stock_width(arch, width, round_to)
    check_output_dir(model_dir, out_dir, overwrite)
    check_weights(arch, inspect_checkpoint(model_dir), model_dir)
    resume_dir = calibration.resume_dir_for(out_dir)
    widths_seconds, widths_timings = None, None
    if str(widths) in (VARIANCE, SENSITIVITY):
        widths_started = time.perf_counter()
        fits = budget  # the budget, or the uniform cut's parameter count
        if fits is None:
            uniform = plan_widths(arch, fmt, width, slice_head)
            fits = formats.planned_parameters(arch, fmt, uniform)["total"]
        if str(widths) == VARIANCE:
            spectra = calibration.signal_spectra(model_dir, **signals)
            candidate = functools.partial(
                retained_widths, spectra, arch, round_to=round_to, slice_head=slice_head
            )
        else:
            measured = calibration.signal_sensitivities(model_dir, width, **signals)
            widths_timings = measured.timings
            candidate = sensitivity_candidates(
                measured.spectra, measured.sensitivity, arch, width, round_to, slice_head
            )
        schedule = fitted_schedule(arch, fits, str(widths), candidate)
        widths_seconds = time.perf_counter() - widths_started
    elif schedule_file is None:
        schedule = plan_widths(arch, fmt, width, slice_head)
    if method is Method.RANDOM:
        found = calibration.random_basis(arch.hidden_size, arch.num_layers, seed)
    elif rotations_file is not None:
        found = calibration.load_rotations(
            rotations_file, arch, fmt, schedule, model_dir=model_dir, method=method
        )
    else:
        found = calibration.calibrate(
            model_dir,
            fmt=fmt,
            width=width,
            slice_head=slice_head,
            source=calib,
            nsamples=nsamples,
            seqlen=seqlen,
            seed=seed,
            device=device,
            memory_budget=memory_budget,
            dtype=calib_dtype,
            progress=progress,
            resume_dir=resume_dir if resume else None,
            rotations_dir=out_dir.parent,
            weighting=weighting,
            schedule=None if schedule == plan_widths(arch, fmt, width, slice_head) else schedule,
            method=method,
        )
    try:
        if save_rotations is not None and rotations_file is None:
            calibration.save_rotations(save_rotations, found)
        provenance = {
            "sparsity": sparsity,
            "target_params": budget,
            "widths": str(widths) if schedule_file is None else str(schedule_file.resolve()),
            "round_to": round_to,
            "source_model": str(model_dir.resolve()),
            "rotation_source": str(rotations_file)
            if rotations_file
            else ("seed" if method is Method.RANDOM else "calibration"),
            "calibration": found.record,
        }
        rewrite_started = time.perf_counter()
        write_sliced_model(
            model_dir,
            out_dir,
            fmt=fmt,
            rotations=found.rotations,
            width=width,
            slice_head=slice_head,
            widths=schedule,
            provenance=provenance,
            overwrite=overwrite,
            memory_budget=memory_budget,
            precision=precision,
            progress=progress,
        )
        rewrite_seconds = time.perf_counter() - rewrite_started
    finally:
        found.close()
    if resume_dir.is_dir():
        shutil.rmtree(resume_dir, ignore_errors=True)  # the output is complete: state is moot
    _hooks.reached("written", 1)
    timings = {**found.timings, "rewrite": rewrite_seconds}
    if widths_seconds is not None:
        timings["widths"] = widths_seconds
    if widths_timings is not None:  # the sensitivity pass's own phases (its backward)
        timings["sensitivity"] = widths_timings
    return SliceResult(
        output=out_dir,
        format=fmt.value,
        sparsity=sparsity,
        hidden_size=width,
        original_hidden_size=arch.hidden_size,
        parameters_before=formats.count_parameters(model_dir)["total"],
        parameters=formats.count_parameters(out_dir),
        seconds=time.perf_counter() - started,
        peak_rss_bytes=peak_rss_bytes(),
        calibration=found.record,
        retained_variance=found.retained_variance(
            schedule.of_rotations(plan_rotation_names(fmt, arch.num_layers))
        ),
        timings=timings,
        target_params=budget,
        next_width_parameters=next_count,
        method=method.value,
    )


# Methods that calibrate no rotation: `--rotations`, `--save-rotations` and `--resume` refused.
UNCALIBRATED_METHODS = (Method.RANDOM, Method.LAYERS)


def _cut_layers(
    model_dir: Path,
    out_dir: Path,
    arch,
    sparsity: float | None,
    target_params: float | None,
    signals: dict,
    overwrite: bool,
    started: float,
    given: tuple[list[float], dict] | None = None,
) -> SliceResult:
    """`--method layers`: every layer's block influence on the calibration text (or the `given`
    influences and their record, checked to be this model's), the layers of lowest influence
    removed (`depth`); s is the fraction of layers removed."""
    tensors = inspect_checkpoint(model_dir)
    budget = next_count = None
    if target_params is not None:
        budget = parameter_budget(target_params, formats.count_parameters(model_dir)["total"])
        keep, next_count = depth.budget_layers(arch, tensors, budget)
        sparsity = 1 - keep / arch.num_layers
    else:
        keep = depth.kept_layer_count(arch.num_layers, sparsity)
    check_output_dir(model_dir, out_dir, overwrite)
    check_weights(arch, tensors, model_dir)
    if given is None:
        influence, record, timings = calibration.block_influence(model_dir, **signals)
        timings = timings.as_dict()
    else:
        (influence, record), timings = given, {}
        _check_influence(model_dir, arch, tensors, influence, record)
    removed = depth.removed_layers(influence, keep)
    provenance = {
        "version": package_version(),
        "format": Format.PLAIN.value,
        "hidden_size": arch.hidden_size,
        "original_hidden_size": arch.hidden_size,
        "num_layers": keep,
        "original_num_layers": arch.num_layers,
        "effective_sparsity": 1 - keep / arch.num_layers,
        "sparsity": sparsity,
        "target_params": budget,
        "removed_layers": removed,
        "block_influence": influence,
        "source_model": str(model_dir.resolve()),
        "calibration": record,
    }
    rewrite_started = time.perf_counter()
    depth.write_pruned_model(
        model_dir,
        out_dir,
        arch,
        tensors,
        removed,
        provenance,
        overwrite=overwrite,
        memory_budget=signals["memory_budget"],
        progress=signals["progress"],
    )
    rewrite_seconds = time.perf_counter() - rewrite_started
    _hooks.reached("written", 1)
    return SliceResult(
        output=out_dir,
        format=Format.PLAIN.value,
        sparsity=sparsity,
        hidden_size=arch.hidden_size,
        original_hidden_size=arch.hidden_size,
        parameters_before=formats.count_parameters(model_dir)["total"],
        parameters=formats.count_parameters(out_dir),
        seconds=time.perf_counter() - started,
        peak_rss_bytes=peak_rss_bytes(),
        calibration=record,
        timings={**timings, "rewrite": rewrite_seconds},
        target_params=budget,
        next_width_parameters=next_count,
        method=Method.LAYERS.value,
        layers=(keep, arch.num_layers),
        removed_layers=removed,
        block_influence=influence,
    )


def _check_influence(model_dir: Path, arch, tensors, influence, record: dict) -> None:
    """Refuse precomputed block influences that are not one per layer of this very model."""
    what = "influence (precomputed block influences)"
    if record.get("method") != Method.LAYERS.value or len(influence) != arch.num_layers:
        raise ValueError(
            f"{what}: expected {arch.num_layers} values with a --method layers calibration "
            f"record, got {len(influence)} made by {record.get('method')!r}"
        )
    fingerprint = calibration.model_fingerprint(model_dir, tensors)
    if record.get("model_fingerprint") != fingerprint:
        raise ValueError(f"{what}: computed for another model than {model_dir}")


def read_schedule(path: Path, arch) -> Widths:
    """A widths FILE: a JSON list (see `Widths.from_list`)."""
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"widths file {path}: cannot read a JSON list ({exc})") from None
    try:
        return Widths.from_list(values, arch.num_layers, arch.hidden_size)
    except ValueError as exc:
        raise ValueError(f"widths file {path}: {exc}") from None


def fitted_schedule(arch, budget: int, what: str, candidate) -> Widths:
    """The widest `candidate(x)` (x in [0, 1], wider as x grows) whose output has at most
    `budget` parameters: a bisection."""

    def count(widths: Widths) -> int:
        return formats.planned_parameters(arch, Format.SLICEGPT, widths)["total"]

    best = candidate(0.0)
    if count(best) > budget:
        raise ValueError(f"widths {what}: no schedule fits in {budget:,} parameters")
    low, high = 0.0, 1.0
    for _ in range(30):
        middle = (low + high) / 2
        widths = candidate(middle)
        if count(widths) <= budget:
            low, best = middle, widths
        else:
            high = middle
    return best


_COUNT_SUFFIXES = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9}


def parse_parameter_count(text: str) -> float:
    """`--target-params`: 0.8, 95000000, 120M, 1.2B."""
    import argparse

    number, scale = text.strip(), 1.0
    if number[-1:].upper() in _COUNT_SUFFIXES:
        number, scale = number[:-1], _COUNT_SUFFIXES[number[-1].upper()]
    try:
        return float(number) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a fraction or a count such as 0.8, 120M, 1.2B; got {text!r}"
        ) from None


# Budgets up to this are fractions of the dense model (1.1: 10 % more, which slicegpt's shortcuts
# can need); above it, parameter counts.
MAX_BUDGET_FRACTION = 10


def parameter_budget(target: float, dense_parameters: int) -> int:
    """A budget given as a fraction of the dense model (≤ 10) or as a count, in parameters."""
    if not (isinstance(target, (int, float)) and math.isfinite(target) and target > 0):
        raise ValueError(f"target_params must be a positive fraction or count, got {target!r}")
    if target <= MAX_BUDGET_FRACTION:
        return int(target * dense_parameters)
    return int(target)


def budget_cut(
    model_dir: str | Path,
    arch,
    fmt: Format,
    target_params: float,
    round_to: int = 8,
    slice_head: bool = False,
) -> tuple[int, int, int | None]:
    """The budget (`parameter_budget` of the dense checkpoint in `model_dir`), the width
    `budget_width` picks for it, and the count of the next wider cut."""
    budget = parameter_budget(target_params, formats.count_parameters(model_dir)["total"])
    return (budget, *budget_width(arch, fmt, budget, round_to, slice_head))


def budget_width(
    arch, fmt: Format, budget: int, round_to: int, slice_head: bool
) -> tuple[int, int | None]:
    """The largest width (a multiple of `round_to`; for `plain` one its stock config accepts)
    whose output has at most `budget` parameters, and the count of the next wider one (None
    at full width). Parameter counts grow with the width, so a bisection finds it."""
    fmt = Format.parse(fmt)
    widths = list(range(round_to, arch.hidden_size + 1, round_to))
    if fmt is Format.PLAIN:
        widths = [w for w in widths if formats.stock_config_accepts(arch, w)]

    def count(width: int) -> int:
        return formats.planned_parameters(arch, fmt, plan_widths(arch, fmt, width, slice_head))[
            "total"
        ]

    if not widths:
        raise ValueError(f"no width is a valid stock {arch.model_type} hidden size")
    smallest = count(widths[0])
    if smallest > budget:
        raise ValueError(
            f"target_params: {budget:,} parameters is below the smallest {fmt.value} output of "
            f"this model ({smallest:,} at width {widths[0]}): the embedding and head alone "
            "need more"
        )
    low, high = 0, len(widths) - 1  # count(widths[low]) <= budget
    while low < high:
        middle = (low + high + 1) // 2
        if count(widths[middle]) <= budget:
            low = middle
        else:
            high = middle - 1
    following = count(widths[low + 1]) if low + 1 < len(widths) else None
    return widths[low], following


def add_commands(subparsers) -> None:
    parser = subparsers.add_parser(
        "slice",
        description=(
            "Compute PCA rotations of the residual stream from calibration text, rotate every "
            "weight and delete the low-variance directions, shrinking the hidden size D to "
            "d = (1 - s)·D rounded down to a multiple of --round-to. Weights stream from the "
            "safetensors shards: at most one decoder layer is resident during calibration."
        ),
    )
    parser.add_argument(
        "model",
        help=zoo.MODEL_HELP,
    )
    parser.add_argument("--revision", metavar="REV", help=zoo.REVISION_HELP)
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--sparsity",
        type=float,
        help="fraction s of the hidden width to remove, 0 ≤ s < 1 (this, --target-params, or "
        "a --widths FILE is required)",
    )
    size.add_argument(
        "--target-params",
        type=parse_parameter_count,
        metavar="FRACTION|COUNT",
        help="a parameter budget instead of a sparsity: a fraction of the dense model (0.8, "
        "1.1; values up to 10) or a count (120M, 1.2B, 95000000); the width is the largest whose output — head and "
        "shortcut matrices counted — fits in it",
    )
    parser.add_argument("-o", "--output", required=True, help="output directory (must not exist)")
    add_method_argument(parser)
    add_cut_arguments(parser, seqlen_alias=True)
    parser.add_argument(
        "--device", default="auto", choices=Device.values(), help="where calibration runs"
    )
    parser.add_argument(
        "--rotations", default=None, help="reuse rotations saved by --save-rotations (a directory)"
    )
    parser.add_argument(
        "--save-rotations",
        default=None,
        help="store the computed rotations in this directory (one .npy per rotation)",
    )
    parser.add_argument(
        "--memory-budget",
        type=float,
        default=DEFAULT_MEMORY_BUDGET / GIB,
        help="GiB dimcut itself may hold beyond the interpreter and one decoder block's weights: "
        "calibration activations above half of it spill to disk, the weight rewrite's tiles get "
        f"a quarter (default {DEFAULT_MEMORY_BUDGET / GIB:g}, which fits an 8 GiB laptop)",
    )
    parser.add_argument(
        "--precision",
        choices=("f32", "f64"),
        default="f32",
        help="arithmetic of the weight rewrite: f32 (default; relative error ~1e-6, far below "
        "bf16's 4e-3) or f64. The PCA itself is always float64",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing output directory"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep calibration state after every layer in OUTPUT.dimcut-resume/ and continue "
        "from it if a previous run was interrupted (removed once the output is complete)",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=_run_slice)


def add_method_argument(parser) -> None:
    """`--method`, shared by `slice` and `sweep`."""
    parser.add_argument(
        "--method",
        choices=Method.values(),
        default=Method.PCA.value,
        help="how the cut is made. pca: keep the principal axes of the residual stream "
        "(SliceGPT; default). channels: keep the d residual channels of largest unit-RMS "
        "energy, no rotation (Minitron's channel importance). random: a random rotation from "
        "--seed, the control (no calibration). layers: remove the fraction s of whole decoder "
        "layers with the lowest block influence 1 - cos(layer input, output) on the "
        "calibration text (ShortGPT), hidden size unchanged. channels, random and layers need "
        "--format plain (their output is a stock checkpoint); random and layers take no "
        "--rotations, --save-rotations or --resume",
    )


def add_cut_arguments(parser, *, seqlen_alias: bool) -> None:
    """The options that say how to calibrate and cut, shared by `slice` and `sweep`
    (`cut_options` turns them into `slice_model` keywords)."""
    parser.add_argument(
        "--format",
        choices=Format.values(),
        default=Format.SLICEGPT.value,
        help="slicegpt: per-layer rotations + shortcut matrices (faithful; loads with `import dimcut` "
        "or trust_remote_code). plain: one rotation, a stock config of width d that loads "
        "anywhere (default: slicegpt)",
    )
    parser.add_argument(
        "--weighting",
        choices=calibration.Weighting.values(),
        default=calibration.DEFAULT_WEIGHTING.value,
        help="plain format: how the one rotation weighs the residual signals. raw: their plain "
        "covariance sum; rms: each token scaled to unit RMS first, as the norm-fed readers see "
        "it; trace: every signal's covariance normalised by its trace "
        f"(default {calibration.DEFAULT_WEIGHTING.value}, the best measured)",
    )
    parser.add_argument(
        "--widths",
        default=UNIFORM,
        metavar="uniform|variance|sensitivity|FILE",
        help="slicegpt format: per-layer widths, at the uniform cut's parameter count (or "
        "--target-params). uniform: d everywhere (default); variance: each residual point keeps "
        "the same fraction of its signal's energy (one extra streamed forward of the dense "
        "model); sensitivity: each point keeps the directions whose deletion the loss feels "
        "most (an empirical-Fisher estimate from one backward pass of the dense model, loaded "
        "whole; best measured: −26 %% perplexity on SmolLM2, −34 %% on Qwen-1.5B at s = 0.25); FILE: a JSON list of "
        "2·layers + 1 widths (embedding, then after attention and after the MLP of each layer; "
        "the last feeds the head)",
    )
    parser.add_argument(
        "--calib",
        default=None,
        help="calibration text: a .txt file or folder, JSONL/Parquet/Arrow, a save_to_disk "
        "directory, 'wiki-offline' (Wikipedia summaries), 'python-stdlib' (this Python's "
        "standard library source: calibrate a code model on code), 'builtin' (the corpus "
        "shipped with dimcut, Wikipedia summaries), or a hub dataset when online (default: "
        "python-stdlib for the offline coder models, builtin otherwise)",
    )
    parser.add_argument(
        "--nsamples", type=int, default=128, help="calibration sequences (default 128)"
    )
    parser.add_argument(
        "--calib-dtype",
        choices=[p.value for p in calibration.BLOCK_PRECISIONS],
        default=Precision.FLOAT32.value,
        help="what the decoder blocks compute in during calibration; the residual stream and "
        "covariances stay float32/float64 (default float32; bfloat16 calibrated Qwen-1.5B 1.6× "
        "faster on an AVX-512 BF16 CPU, +2.8 %% in-domain perplexity; SliceGPT's reference "
        "calibrates in float16)",
    )
    # 0.1 spelled it --seqlen in `slice`; `sweep --seqlen` was the perplexity window.
    legacy = ("--seqlen",) if seqlen_alias else ()
    parser.add_argument(
        "--calib-seqlen",
        *legacy,
        dest="calib_seqlen",
        type=int,
        default=2048,
        help="tokens per calibration sequence (default 2048)",
    )
    parser.add_argument(
        "--seed", "--calib-seed", type=int, default=42, help="sampling seed (default 42)"
    )
    parser.add_argument(
        "--round-to", type=int, default=8, help="round d down to a multiple of this (default 8)"
    )
    parser.add_argument(
        "--slice-head", action="store_true", help="also slice the final norm and head (slicegpt)"
    )


def cut_options(args) -> dict:
    """`slice_model` keywords from the options `add_cut_arguments` defined."""
    return {
        "fmt": args.format,
        "weighting": args.weighting,
        "calib": zoo.text_or_default(args.calib, args.model, "--calib", args.quiet),
        "nsamples": args.nsamples,
        "seqlen": args.calib_seqlen,
        "calib_dtype": args.calib_dtype,
        "seed": args.seed,
        "round_to": args.round_to,
        "slice_head": args.slice_head,
        "widths": args.widths,
    }


def _run_slice(args) -> int:
    try:
        result = _slice_from_args(args)
    except KeyboardInterrupt:
        state = calibration.resume_dir_for(args.output) / calibration.STATE_FILE
        if args.resume and state.is_file():
            print(
                f"dimcut slice: calibration state kept in {state.parent}; rerun the same command "
                "(with --resume) to continue after the last completed layer",
                file=sys.stderr,
            )
        raise
    print(result.summary())
    if result.size_warning:
        print(f"dimcut slice: warning: {result.size_warning}", file=sys.stderr)
    return 0


def _slice_from_args(args) -> SliceResult:
    return slice_model(
        zoo.resolve_model(args.model, revision=args.revision, progress=not args.quiet),
        args.sparsity,
        args.output,
        target_params=args.target_params,
        **cut_options(args),
        device=args.device,
        rotations_file=args.rotations,
        save_rotations=args.save_rotations,
        overwrite=args.overwrite,
        memory_budget=int(args.memory_budget * GIB),
        precision=args.precision,
        progress=not args.quiet,
        resume=args.resume,
        method=args.method,
    )
