"""`dimcut sweep`: evaluate the dense model and a series of sliced ones, resumably.

Layout of RUNS/: `dense.json` and `s<sparsity>.json` results records (written atomically as each
point finishes, so a crash loses at most the point in progress), `models/s<sparsity>/` sliced
checkpoints while being evaluated (kept with --keep-models), and for the plain format
`rotations-plain/`, computed once and reused by every point made with the same calibration.
With healing (`--heal-steps N`), each sliced point is healed from the dense model into
`models/s<sparsity>-healed/` before it is evaluated, so the laws can be fitted on healed models;
an interrupted heal resumes from its checkpoint.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from dimcut import calibration
from dimcut.calibration.rotations import RECORD_FILE
from dimcut.evaluation import (
    SCHEMA,
    add_evaluation_arguments,
    describes,
    evaluate,
    evaluation_options,
    merge_results,
    missing_measurements,
    write_results,
)
from dimcut.healing import HealOptions, Loss, heal
from dimcut.hub import model_label
from dimcut.runtime import Device, Precision, parse_sparsities
from dimcut.slicing import add_cut_arguments, cut_options, slice_model
from dimcut.zoo import MODEL_HELP, REVISION_HELP, resolve_model

PLAIN_ROTATIONS = "rotations-plain"


def point_name(sparsity: float) -> str:
    return "dense" if sparsity == 0 else f"s{sparsity:g}"


def read_record(record_path: Path) -> dict | None:
    """A point's record, or None when it has none yet (records are written atomically, so a
    file that does not parse is a foreign one and is redone)."""
    try:
        record = json.loads(record_path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return record if record.get("schema") == SCHEMA else None


def sweep(
    model_dir: str | Path,
    sparsities: list[float],
    runs_dir: str | Path,
    *,
    slice_options: dict | None = None,
    eval_options: dict | None = None,
    label: str | None = None,
    keep_models: bool = False,
    heal_options: HealOptions | None = None,
    progress: bool = True,
) -> list[Path]:
    """Run (or resume) a sweep; returns the record paths, dense first. With `heal_options`,
    every sliced point is healed (distilled from `model_dir`) before it is evaluated."""
    from tqdm.auto import tqdm

    model_dir, runs_dir = Path(model_dir), Path(runs_dir)
    slice_options = dict(slice_options or {})
    eval_options = dict(eval_options or {})
    label = label or model_label(model_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    points = [0.0, *sparsities]
    records = [runs_dir / f"{point_name(s)}.json" for s in points]
    todo = []  # (sparsity, record path, its record so far, what that lacks)
    for sparsity, record_path in zip(points, records, strict=True):
        old = read_record(record_path)
        lacking = missing_measurements(old, eval_options)
        if any(lacking.values()):
            todo.append((sparsity, record_path, old, lacking))
    if len(todo) < len(points) and progress:
        print(f"resuming: {len(points) - len(todo)} of {len(points)} points already finished")
    fmt = slice_options.get("fmt", "slicegpt")
    rotations = runs_dir / PLAIN_ROTATIONS
    calibrate_options = {
        _CALIBRATE_KEYS[k]: v for k, v in slice_options.items() if k in _CALIBRATE_KEYS
    }
    wanted = {
        "source": calibration.text.source_name(slice_options.get("calib")),
        **{k: calibrate_options.get(k, DEFAULT_CALIBRATION[k]) for k in DEFAULT_CALIBRATION},
        "weighting": calibration.Weighting.parse(
            calibrate_options.get("weighting", calibration.DEFAULT_WEIGHTING)
        ).value,
    }
    dtype = calibration.block_precision(calibrate_options.get("dtype", Precision.FLOAT32))
    # float32 calibration records carry no block_dtype (they predate it): None matches them.
    wanted["block_dtype"] = None if dtype is Precision.FLOAT32 else dtype.value
    if fmt == "plain" and any(s > 0 for s, *_ in todo) and not _reusable(rotations, wanted):
        # One calibration serves every sparsity: the plain rotation does not depend on s.
        calibrated = calibration.calibrate(
            model_dir,
            fmt="plain",
            width=0,
            source=slice_options.get("calib"),
            **calibrate_options,
            progress=progress,
            rotations_dir=runs_dir,
        )
        try:
            calibration.save_rotations(rotations, calibrated)
        finally:
            calibrated.close()
    bar = tqdm(todo, desc="sweep", unit="point", disable=not progress)
    for sparsity, record_path, old, lacking in bar:
        bar.set_postfix_str(point_name(sparsity))
        started = time.perf_counter()
        target = model_dir
        sliced_dir = runs_dir / "models" / point_name(sparsity)
        if sparsity > 0:
            sliced_dir.parent.mkdir(exist_ok=True)
            options = dict(slice_options)
            if fmt == "plain":
                options["rotations_file"] = rotations
            slice_model(
                model_dir, sparsity, sliced_dir, overwrite=True, progress=progress, **options
            )
            target = sliced_dir
            if heal_options is not None:
                target = sliced_dir.with_name(sliced_dir.name + "-healed")
                heal(
                    sliced_dir,
                    model_dir,
                    target,
                    heal_options,
                    device=slice_options.get("device", "auto"),
                    resume=True,
                    overwrite=True,
                    progress=progress,
                )
        # A record that lacks only some texts or tasks gets just those added, if it was
        # measured on this very cut in this precision; otherwise the point is measured afresh.
        precision = eval_options.get("dtype", "float32")
        if old is not None and not describes(old, target, precision):
            old, lacking = None, missing_measurements(None, eval_options)
        record = evaluate(target, label=label, **{**eval_options, **lacking})
        if old is not None:
            record = merge_results(old, record)
        seconds = (record.get("sweep") or {}).get("point_seconds", 0)
        record["sweep"] = {"point_seconds": seconds + time.perf_counter() - started}
        write_results(record, record_path)
        if sparsity > 0 and not keep_models:
            shutil.rmtree(sliced_dir)
            if target != sliced_dir:
                shutil.rmtree(target)
    bar.close()
    return records


# slice_model keyword -> calibrate keyword, for the plain rotation the sweep calibrates once.
_CALIBRATE_KEYS = {
    key: key for key in ("nsamples", "seqlen", "seed", "device", "memory_budget", "weighting")
} | {"calib_dtype": "dtype"}
# What a saved plain rotation must have been made with to be reused (slice_model's defaults).
DEFAULT_CALIBRATION = {"nsamples": 128, "seqlen": 2048, "seed": 42}


def _reusable(rotations: Path, wanted: dict) -> bool:
    """Whether RUNS/rotations-plain/ was calibrated with these options (the model itself is
    checked by its fingerprint when the rotations are loaded)."""
    try:
        record = json.loads((rotations / RECORD_FILE).read_text())
    except (OSError, ValueError):
        return False
    return all(record.get(key) == value for key, value in wanted.items())


def add_commands(subparsers) -> None:
    parser = subparsers.add_parser(
        "sweep",
        description=(
            "Evaluate the dense model once and every sparsity point, writing one results "
            "record per point into RUNS/ as it finishes. Rerunning resumes: finished points are "
            "skipped, an interrupted point is redone. Feed RUNS/ to `dimcut fit`."
        ),
    )
    parser.add_argument("model", help=MODEL_HELP)
    parser.add_argument("--revision", metavar="REV", help=REVISION_HELP)
    parser.add_argument(
        "--sparsities", default="0.1,0.2,0.25,0.3,0.4", help="comma-separated s values in (0, 1)"
    )
    parser.add_argument(
        "-o",
        "--output",
        "--out",  # the 0.1 spelling, kept for one release
        dest="output",
        required=True,
        help="RUNS directory for records (and models); --out is a deprecated alias",
    )
    parser.add_argument(
        "--label",
        help="model name for the laws (default: the directory name; NAME for a model ID ORG/NAME)",
    )
    parser.add_argument("--keep-models", action="store_true", help="keep the sliced checkpoints")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    group = parser.add_argument_group("slicing")
    add_cut_arguments(group, seqlen_alias=False)
    add_evaluation_arguments(parser.add_argument_group("evaluation"))
    group = parser.add_argument_group("healing (see `dimcut heal --help`)")
    group.add_argument(
        "--heal-steps",
        type=int,
        default=0,
        metavar="N",
        help="heal every sliced point for N steps before evaluating it (default 0: no healing)",
    )
    group.add_argument("--heal-data", default=None, help="healing text (default: built-in)")
    group.add_argument(
        "--heal-loss", choices=Loss.values(), default=HealOptions().loss.value, help="heal loss"
    )
    parser.add_argument("--device", choices=Device.values(), default=Device.AUTO.value)
    parser.set_defaults(func=_run_sweep)


def _run_sweep(args) -> int:
    records = sweep(
        resolve_model(args.model, revision=args.revision, progress=not args.quiet),
        parse_sparsities(args.sparsities),
        args.output,
        slice_options={**cut_options(args), "device": args.device},
        eval_options={**evaluation_options(args), "device": args.device},
        label=args.label,
        keep_models=args.keep_models,
        heal_options=HealOptions(steps=args.heal_steps, data=args.heal_data, loss=args.heal_loss)
        if args.heal_steps > 0
        else None,
        progress=not args.quiet,
    )
    print(f"{len(records)} records in {args.output}; fit them with `dimcut fit {args.output}`")
    return 0
