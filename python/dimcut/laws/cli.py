"""`dimcut fit` and `dimcut predict`."""

from __future__ import annotations

import argparse
import json
import math

from dimcut.laws.fit import (
    ACCURACY_LAW,
    PERPLEXITY,
    PERPLEXITY_LAW,
    X_AXIS,
    FitReport,
    ModelFit,
    fit_records,
    text_table,
)
from dimcut.laws.holdout import check_holdout, holdout_markdown, holdout_table
from dimcut.laws.plot import plot_fits
from dimcut.laws.predict import (
    EXTRAPOLATION_MARGIN,
    PREDICTION_SCHEMA,
    Prediction,
    max_sparsity,
    measured_width_multiple,
    predict,
)
from dimcut.laws.records import load_records
from dimcut.runtime import atomic_write_text, parse_sparsities


def add_commands(subparsers) -> None:
    """Register `dimcut fit` and `dimcut predict`."""
    fit = subparsers.add_parser(
        "fit",
        description=(
            "Fit the laws of arXiv 2503.04377 to results records (dimcut.results/1): "
            f"{PERPLEXITY_LAW.formula} on each evaluation text and, per task, "
            f"{ACCURACY_LAW.formula}, with s = 1 − d/D the effective sparsity and acc the task's "
            "headline metric. Records are grouped by model label and cut variant (format, "
            "plain weighting, width schedule, healing: e.g. slicegpt, plain/rms, "
            "slicegpt/widths=variance, slicegpt/healed-kd-200); records of one model in several "
            "files (one per text, say) are merged. Each group needs the model's dense record "
            "(s = 0) and at least 2 sliced ones. "
            "The dense record is the fit's point s = 0 (y = 1 for perplexity, 0 for accuracy); "
            "with --fixed-intercept it fixes b instead. Prints a table like the paper's Table 3 "
            "(RMSE = root mean squared residual; SE = standard error)."
        ),
    )
    fit.add_argument(
        "runs",
        nargs="+",
        metavar="RUNS",
        help="results files, or directories searched recursively for them",
    )
    fit.add_argument(
        "-o",
        "--output",
        "--out",  # the 0.1 spelling, kept for one release
        dest="output",
        metavar="FIT_JSON",
        help="write the fits as JSON (e.g. fit.json); --out is a deprecated alias",
    )
    fit.add_argument("--markdown", metavar="FIT_MD", help="write the table as Markdown")
    fit.add_argument(
        "--plot",
        metavar="FIG",
        help="draw the fits like the paper's Fig. 3; writes FIG as .png and .svg",
    )
    fit.add_argument(
        "--fixed-intercept",
        action="store_true",
        help="fix b to the theory's value (1 for perplexity, 0 for accuracy) and fit only a",
    )
    fit.add_argument(
        "--label",
        action="append",
        metavar="NAME",
        help="fit only this model label (repeatable; default: every model found)",
    )
    fit.add_argument(
        "--variant",
        action="append",
        metavar="VARIANT",
        help="fit only this cut variant, e.g. slicegpt or plain/rms (repeatable; default: all)",
    )
    fit.add_argument(
        "--holdout",
        metavar="S1,S2,...",
        help="leave the cuts made at these requested sparsities out of the fit, then predict "
        "them and print predicted vs measured with interval coverage (e.g. 0.25,0.3,0.4)",
    )
    fit.add_argument(
        "--confidence",
        type=float,
        default=0.95,
        metavar="P",
        help="confidence level of the --holdout prediction intervals (default 0.95)",
    )
    fit.set_defaults(func=_run_fit)

    predict_parser = subparsers.add_parser(
        "predict",
        description=(
            "Use a fit (from `dimcut fit --out`) to predict the metrics at an effective sparsity "
            "s = 1 − d/D, with prediction intervals, or invert it: the largest sparsity whose "
            "predicted perplexity/accuracy meets a budget. Predictions more than "
            f"{EXTRAPOLATION_MARGIN:.0%} beyond the fitted sparsity range are refused unless "
            "--allow-extrapolation; those beyond it but within the margin are flagged."
        ),
    )
    predict_parser.add_argument("--fit", required=True, metavar="FIT_JSON", help="a fit.json")
    target = predict_parser.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "--sparsity", type=float, metavar="S", help="predict every metric at effective sparsity S"
    )
    target.add_argument(
        "--max-ppl", type=float, metavar="X", help="largest sparsity with predicted PPL ≤ X"
    )
    target.add_argument(
        "--target-params",
        metavar="FRACTION|COUNT",
        help="predict every metric for the cut that fits this parameter budget (a fraction of the "
        "dense model such as 0.8, or a count such as 120M), as `dimcut slice --target-params` "
        "would cut it; needs --model-dir",
    )
    target.add_argument(
        "--min-acc",
        metavar="TASK=Y",
        help="largest sparsity with predicted accuracy on TASK ≥ Y (e.g. arc_easy=0.6)",
    )
    predict_parser.add_argument(
        "--model", metavar="LABEL", help="the model to use when the fit holds several"
    )
    predict_parser.add_argument(
        "--variant",
        metavar="VARIANT",
        help="the cut variant to use when the fit holds several (e.g. slicegpt, plain/rms)",
    )
    predict_parser.add_argument(
        "--model-dir",
        metavar="MODEL",
        help="with --target-params: the dense model (directory or alias) whose parameters are "
        "counted, in the fit's cut format",
    )
    predict_parser.add_argument(
        "--text",
        metavar="SOURCE",
        help="with --max-ppl: the evaluation text whose perplexity is bounded (as the fit names "
        "it, e.g. wiki-offline:test; default: the headline text, the first measured)",
    )
    predict_parser.add_argument(
        "--hidden-size",
        type=int,
        metavar="D",
        help="the dense hidden size D (default: from the records), to report the width d",
    )
    predict_parser.add_argument(
        "--confidence",
        type=float,
        default=0.95,
        metavar="P",
        help="confidence level of the prediction intervals (default 0.95)",
    )
    predict_parser.add_argument(
        "--allow-extrapolation",
        action="store_true",
        # argparse %-formats help strings: "%%" prints the percent sign.
        help=f"predict even more than {EXTRAPOLATION_MARGIN:.0%}% beyond the fitted sparsity range",
    )
    predict_parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    predict_parser.set_defaults(func=_run_predict)


def _run_fit(args: argparse.Namespace) -> int:
    records = load_records(args.runs)
    held_out = parse_sparsities(args.holdout, "--holdout sparsities") if args.holdout else ()
    report = fit_records(
        records,
        fixed_intercept=args.fixed_intercept,
        labels=args.label,
        variants=args.variant,
        held_out=held_out,
    )
    checks = check_holdout(report, records, confidence=args.confidence) if held_out else []
    print(report.table(), end="")
    if checks:
        print(f"\nHeld out of the fit (requested s = {args.holdout}), predicted:\n")
        print(holdout_table(checks), end="")
    if args.output:
        report.save(args.output, {"holdout": [c.to_dict() for c in checks]} if checks else None)
        print(f"wrote {args.output}")
    if args.markdown:
        text = report.markdown()
        if checks:
            text += f"\n## Held out of the fit (requested s = {args.holdout})\n\n"
            text += holdout_markdown(checks)
        atomic_write_text(args.markdown, text)
        print(f"wrote {args.markdown}")
    if args.plot:
        for written in plot_fits(report, args.plot):
            print(f"wrote {written}")
    return 0


def _run_predict(args: argparse.Namespace) -> int:
    model = FitReport.load(args.fit).model(args.model, args.variant)
    options = {
        "confidence": args.confidence,
        "allow_extrapolation": args.allow_extrapolation,
        "hidden_size": args.hidden_size,
    }
    budget_line = None
    if args.target_params is not None:
        sparsity, budget_line = _budget_sparsity(model, args)
        predictions = predict(model, sparsity, **options)
    elif args.sparsity is not None:
        predictions = predict(model, args.sparsity, **options)
    elif args.max_ppl is not None:
        predictions = [max_sparsity(model, PERPLEXITY, args.max_ppl, text=args.text, **options)]
    else:
        task, _, value = args.min_acc.rpartition("=")
        try:
            budget = float(value)
        except ValueError:
            raise ValueError(f"--min-acc wants TASK=Y, got {args.min_acc!r}") from None
        if not task:
            raise ValueError(f"--min-acc wants TASK=Y, got {args.min_acc!r}")
        predictions = [max_sparsity(model, task, budget, **options)]

    if args.json:
        document = {
            "schema": PREDICTION_SCHEMA,
            "x": X_AXIS,
            "predictions": [p.to_dict() for p in predictions],
        }
        print(json.dumps(document, indent=2, ensure_ascii=False))
    else:
        D = args.hidden_size or model.hidden_size
        if budget_line:
            print(budget_line)
        print(_prediction_text(model, predictions, D), end="")
    return 0


def _budget_sparsity(model: ModelFit, args: argparse.Namespace) -> tuple[float, str]:
    """The effective sparsity of the cut `dimcut slice --target-params` makes, in the fit's
    format (its variant's first part), and a line saying so."""
    from dimcut.architectures import load_architecture  # these load torch: only when asked
    from dimcut.plan import Format
    from dimcut.slicing import budget_cut, parse_parameter_count
    from dimcut.zoo import resolve_model

    if not args.model_dir:
        raise ValueError("--target-params needs --model-dir, the dense model to count")
    model_dir = resolve_model(args.model_dir)
    arch = load_architecture(model_dir)
    if model.hidden_size and arch.hidden_size != model.hidden_size:
        raise ValueError(
            f"--model-dir {args.model_dir}: hidden size {arch.hidden_size}, but the fit's model "
            f"{model.name!r} has D = {model.hidden_size}"
        )
    fmt = Format.parse((model.variant or Format.SLICEGPT.value).split("/")[0])
    try:
        target = parse_parameter_count(args.target_params)
    except argparse.ArgumentTypeError as exc:
        raise ValueError(f"--target-params: {exc}") from None
    budget, width, _ = budget_cut(model_dir, arch, fmt, target)
    sparsity = 1 - width / arch.hidden_size
    line = (
        f"parameter budget {budget:,}: the widest {fmt.value} cut within it has d = {width} of "
        f"D = {arch.hidden_size} ({X_AXIS} = {sparsity:.4f})"
    )
    return sparsity, line


def _prediction_text(model: ModelFit, predictions: list[Prediction], D: int | None) -> str:
    first = predictions[0]  # all share sparsity, width and budget
    lines = [f"model {model.name}"]
    if first.budget is not None:
        relation = "≤" if first.metric == PERPLEXITY else "≥"
        lines.append(
            f"largest {X_AXIS} with predicted {first.metric_name} {relation} {first.budget:g}: "
            f"{first.sparsity:.4f}"
        )
        if first.hidden_size is not None:
            lines.append(
                f"hidden width d = {first.hidden_size} of D = {D}: rounded up to a multiple of "
                f"{first.width_multiple} to stay within the budget"
            )
    else:
        lines.append(f"{X_AXIS} = {first.sparsity:.4f}")
        if first.hidden_size is not None:
            lines.append(
                f"hidden width d = {first.hidden_size} of D = {D} (effective sparsity "
                f"{1 - first.hidden_size / D:.4f}): floor((1 − s)·D) rounded down to a multiple "
                f"of {first.width_multiple}, as `dimcut slice` cuts"
            )
    if first.hidden_size is not None:
        lines.append(_width_multiple_origin(model, first.width_multiple))
    if any(p.extrapolated for p in predictions):
        lines.append("note: beyond the fitted sparsity range; the flagged laws are extrapolated")

    def number(value: float) -> str:
        return "∞" if math.isinf(value) else f"{value:.4g}"

    rows = [["metric", "predicted", f"{first.confidence:.0%} prediction interval", ""]] + [
        [
            f"{p.metric_name} ({p.measure})",
            number(p.value),
            f"[{number(p.interval[0])}, {number(p.interval[1])}]",
            "extrapolated" if p.extrapolated else "",
        ]
        for p in predictions
    ]
    return "\n".join(lines) + "\n\n" + text_table(rows, left=4)


def _width_multiple_origin(model: ModelFit, multiple: int) -> str:
    if measured_width_multiple(model) is None:
        return (
            f"({multiple}: `dimcut slice`'s default --round-to, as the fit's points give no "
            "sliced widths)"
        )
    return (
        f"({multiple}: the gcd of the measured sliced widths, as the records do not say what "
        "their cuts were rounded to)"
    )
