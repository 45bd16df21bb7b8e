"""`dimcut sweep`: evaluate the dense model and a series of sliced ones, resumably.

Layout of RUNS/: `dense.json` and `s<sparsity>.json` results records (written atomically as each
point finishes, so a crash loses at most the point in progress), `s<sparsity>.humaneval.jsonl`
with `--tasks humaneval` (each problem kept as it finishes: an interrupted point resumes per
problem), `models/s<sparsity>/` sliced checkpoints while being evaluated (kept with
--keep-models), and what one calibration gives every point: for the plain format's `pca` and
`channels` methods `rotations-plain/` (the basis does not depend on s), for `layers`
`block-influence.json` (the layers' block influences, of which each s removes the lowest);
`random` calibrates nothing. A RUNS/ directory holds one cut variant (format, method, plain
weighting, widths, healing): a sweep refuses records of another one there.
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
from dimcut.evaluation.generation import GenerativeTask
from dimcut.evaluation.humaneval import DEFAULT_MAX_NEW_TOKENS, samples_path
from dimcut.evaluation.sandbox import DEFAULT_LIMITS
from dimcut.healing import HealOptions, Loss, heal
from dimcut.hub import model_label
from dimcut.laws.records import cut_variant
from dimcut.plan import Format, Method, parse_method
from dimcut.runtime import Device, Precision, atomic_write_text, parse_sparsities
from dimcut.slicing import add_cut_arguments, add_method_argument, cut_options, slice_model
from dimcut.zoo import MODEL_HELP, REVISION_HELP, resolve_model

PLAIN_ROTATIONS = "rotations-plain"
BLOCK_INFLUENCE = "block-influence.json"


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
    every sliced point is healed (distilled from `model_dir`) before it is evaluated.

    `slice_options["method"]` (`slice_model`'s: pca, channels, random, layers) cuts every
    point; methods other than pca need `fmt="plain"`, refused before any work. Records of
    another cut variant in `runs_dir` (`laws.records.cut_variant`: a pca record in a channels
    sweep, say) are refused too, before any work: each variant needs its own RUNS/."""
    from tqdm.auto import tqdm

    model_dir, runs_dir = Path(model_dir), Path(runs_dir)
    slice_options = dict(slice_options or {})
    # humaneval's settings as `evaluate` defaults them: a record made with others is redone
    eval_options = {
        "max_new_tokens": DEFAULT_MAX_NEW_TOKENS,
        "exec_timeout": DEFAULT_LIMITS.timeout,
        **(eval_options or {}),
    }
    fmt = Format.parse(slice_options.get("fmt", Format.SLICEGPT), "format")
    method = parse_method(slice_options.get("method", Method.PCA), fmt)
    slice_options["method"] = method
    weighting = calibration.Weighting.parse(
        slice_options.get("weighting", calibration.DEFAULT_WEIGHTING), "weighting"
    )
    if method is Method.CHANNELS and weighting is not calibration.Weighting.RMS:
        raise ValueError(
            f"method channels ranks the channels by their unit-RMS energy (weighting rms): "
            f"weighting {weighting.value} does not apply"
        )
    points = [0.0, *sparsities]
    records = [runs_dir / f"{point_name(s)}.json" for s in points]
    variant = cut_variant(_planned_cut(fmt, method, weighting, slice_options, heal_options))
    _check_variant(records, variant)
    label = label or model_label(model_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    todo = []  # (sparsity, record path, its record so far, what that lacks)
    for sparsity, record_path in zip(points, records, strict=True):
        old = read_record(record_path)
        lacking = missing_measurements(old, eval_options)
        if any(lacking.values()):
            todo.append((sparsity, record_path, old, lacking))
    if len(todo) < len(points) and progress:
        print(f"resuming: {len(points) - len(todo)} of {len(points)} points already finished")
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
    # PCA rotation records name no method
    wanted["method"] = None if method is Method.PCA else method.value
    slicing = any(s > 0 for s, *_ in todo)
    influence = None
    if fmt is Format.PLAIN and method in SHARED_ROTATION and slicing:
        if not _reusable(rotations, wanted):
            # One calibration serves every sparsity: the plain rotation does not depend on s.
            calibrated = calibration.calibrate(
                model_dir,
                fmt="plain",
                width=0,
                source=slice_options.get("calib"),
                **calibrate_options,
                progress=progress,
                rotations_dir=runs_dir,
                method=method,
            )
            try:
                calibration.save_rotations(rotations, calibrated)
            finally:
                calibrated.close()
    elif method is Method.LAYERS and slicing:
        influence = _block_influence(
            model_dir, runs_dir / BLOCK_INFLUENCE, wanted, slice_options, progress
        )
    bar = tqdm(todo, desc="sweep", unit="point", disable=not progress)
    for sparsity, record_path, old, lacking in bar:
        bar.set_postfix_str(point_name(sparsity))
        started = time.perf_counter()
        target = model_dir
        sliced_dir = runs_dir / "models" / point_name(sparsity)
        if sparsity > 0:
            sliced_dir.parent.mkdir(exist_ok=True)
            options = dict(slice_options)
            if fmt is Format.PLAIN and method in SHARED_ROTATION:
                options["rotations_file"] = rotations
            if influence is not None:
                options["influence"] = influence
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
        if GenerativeTask.HUMANEVAL.value in lacking["tasks"]:
            # every finished problem is kept beside the record: a rerun resumes per problem
            lacking = {**lacking, "samples": samples_path(record_path)}
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


# The methods whose one plain basis the sweep calibrates once and saves in RUNS/rotations-plain/
# (random makes its basis from the seed; layers has none: its block influence is shared instead).
SHARED_ROTATION = (Method.PCA, Method.CHANNELS)
# slice_model keyword -> calibrate keyword, for the plain rotation the sweep calibrates once.
_CALIBRATE_KEYS = {
    key: key for key in ("nsamples", "seqlen", "seed", "device", "memory_budget", "weighting")
} | {"calib_dtype": "dtype"}
# What a saved plain rotation must have been made with to be reused (slice_model's defaults).
DEFAULT_CALIBRATION = {"nsamples": 128, "seqlen": 2048, "seed": 42}


def _planned_cut(fmt, method, weighting, slice_options: dict, heal_options) -> dict:
    """The `model` facts a record of this sweep's cuts will have, as far as `cut_variant`
    reads them."""
    settings = {"weighting": weighting.value}
    if method is not Method.PCA:
        settings["method"] = method.value
    heal = None
    if heal_options is not None:
        heal = {"loss": heal_options.loss.value, "steps": heal_options.steps}
    return {
        "format": fmt.value,
        "calibration": settings,
        "widths": str(slice_options.get("widths", "uniform")),
        "heal": heal,
    }


def _check_variant(records: list[Path], variant: str) -> None:
    """Refuse a RUNS/ directory whose sliced records are of another cut variant (one made by
    another method, say): resuming would take them for points of this sweep."""
    foreign = []
    for record_path in records[1:]:  # the dense record serves every variant
        old = read_record(record_path)
        if old is not None and (found := cut_variant(old.get("model") or {})) != variant:
            foreign.append(f"{record_path.name} is {found}")
    if foreign:
        raise ValueError(
            f"{records[0].parent} holds records of another cut than this sweep's {variant} "
            f"({'; '.join(foreign)}): give each format, method, weighting, widths and healing "
            "its own RUNS directory (-o)"
        )


def _block_influence(
    model_dir: Path, saved: Path, wanted: dict, slice_options: dict, progress: bool
) -> tuple[list[float], dict]:
    """`--method layers`: the block influences of the dense model, computed once and kept in
    RUNS/block-influence.json for every point (s only changes how many layers go), reused while
    they were computed with the same calibration options (`slice_model` checks the model)."""
    try:
        kept = json.loads(saved.read_text())
        influence, record = kept["influence"], kept["record"]
    except (OSError, ValueError, KeyError, TypeError):
        influence, record = None, {}
    options = {k: v for k, v in wanted.items() if k not in ("weighting", "method")}
    if influence is None or any(record.get(k) != v for k, v in options.items()):
        signals = {
            _CALIBRATE_KEYS[k]: v
            for k, v in slice_options.items()
            if k in _CALIBRATE_KEYS and k != "weighting"
        }
        influence, record, _ = calibration.block_influence(
            model_dir, source=slice_options.get("calib"), **signals,
            progress=progress,
        )  # fmt: skip
        atomic_write_text(saved, json.dumps({"influence": influence, "record": record}, indent=1))
    return influence, record


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
            "skipped, an interrupted point is redone (with --tasks humaneval, from its last "
            "finished problem, kept in RUNS/<point>.humaneval.jsonl; a result made with another "
            "--max-new-tokens or --exec-timeout is redone). Every point is cut by --method: pca "
            "and channels calibrate once for all points, layers computes the block influences "
            "once, random calibrates nothing. One RUNS/ holds one cut variant (format, method, "
            "weighting, widths, healing): records of another are refused. Feed RUNS/ to "
            "`dimcut fit`."
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
    add_method_argument(group)
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
        slice_options={**cut_options(args), "method": args.method, "device": args.device},
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
