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
from dimcut.runtime import atomic_write_text


def add_commands(subparsers) -> None:
    """Register `dimcut fit` and `dimcut predict`."""
    fit = subparsers.add_parser(
        "fit",
        description=(
            "Fit the laws of arXiv 2503.04377 to results records (dimcut.results/1): "
            f"{PERPLEXITY_LAW.formula} and, per task, {ACCURACY_LAW.formula}, with s = 1 − d/D "
            "the effective sparsity and acc the task's headline metric. Records are grouped by "
            "model label; each model needs its dense record (s = 0) and at least 2 sliced ones. "
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
        "--min-acc",
        metavar="TASK=Y",
        help="largest sparsity with predicted accuracy on TASK ≥ Y (e.g. arc_easy=0.6)",
    )
    predict_parser.add_argument(
        "--model", metavar="LABEL", help="the model to use when the fit holds several"
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
    report = fit_records(
        load_records(args.runs), fixed_intercept=args.fixed_intercept, labels=args.label
    )
    print(report.table(), end="")
    if args.output:
        report.save(args.output)
        print(f"wrote {args.output}")
    if args.markdown:
        text = report.markdown()
        atomic_write_text(args.markdown, text)
        print(f"wrote {args.markdown}")
    if args.plot:
        for written in plot_fits(report, args.plot):
            print(f"wrote {written}")
    return 0


def _run_predict(args: argparse.Namespace) -> int:
    model = FitReport.load(args.fit).model(args.model)
    options = {
        "confidence": args.confidence,
        "allow_extrapolation": args.allow_extrapolation,
        "hidden_size": args.hidden_size,
    }
    if args.sparsity is not None:
        predictions = predict(model, args.sparsity, **options)
    elif args.max_ppl is not None:
        predictions = [max_sparsity(model, PERPLEXITY, args.max_ppl, **options)]
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
        print(_prediction_text(model, predictions, D), end="")
    return 0


def _prediction_text(model: ModelFit, predictions: list[Prediction], D: int | None) -> str:
    first = predictions[0]  # all share sparsity, width and budget
    lines = [f"model {model.label}"]
    if first.budget is not None:
        relation = "≤" if first.metric == PERPLEXITY else "≥"
        lines.append(
            f"largest {X_AXIS} with predicted {first.metric} {relation} {first.budget:g}: "
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
            f"{p.metric} ({p.measure})",
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
