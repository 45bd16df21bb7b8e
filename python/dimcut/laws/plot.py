"""Plots of the fitted laws like the paper's Fig. 3 (the only module that uses matplotlib)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from dimcut.laws.fit import PERPLEXITY, FitReport, law_for
from dimcut.runtime import atomic_write


def plot_fits(report: FitReport, path: str | Path) -> list[Path]:
    """Draw the fits like the paper's Fig. 3: one panel per metric (the perplexity: per text),
    every model and variant in each panel.

    Writes both a PNG and an SVG: `path` may end in .png, .svg or have no suffix.
    Returns the files written.
    """
    from matplotlib.figure import Figure  # no pyplot: no global backend state; renders with Agg

    path = Path(path)
    if path.suffix.lower() not in ("", ".png", ".svg"):
        raise ValueError(f"{path}: plots are written as .png and .svg")
    metrics = list(dict.fromkeys((f.metric, f.text) for m in report.models for f in m.metrics))
    metrics.sort(key=lambda key: (key[0] != PERPLEXITY, key[0]))
    columns = min(3, len(metrics))
    rows = math.ceil(len(metrics) / columns)
    figure = Figure(figsize=(4.8 * columns, 4.4 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    colours = [f"C{i % 10}" for i in range(len(report.models))]

    for ax, (metric, text) in zip(axes, metrics):
        law = law_for(metric)
        panel = [
            (model, fit, colour)
            for model, colour in zip(report.models, colours)
            for fit in model.metrics
            if (fit.metric, fit.text) == (metric, text)
        ]
        grid = np.linspace(0, max(fit.line.s_max for _, fit, _ in panel) * 1.05, 50)
        for model, fit, colour in panel:
            line = fit.line
            ax.scatter(line.s, line.y, color=colour, s=22, zorder=3)
            ax.plot(
                grid,
                line.a * grid + line.b,
                color=colour,
                label=(
                    f"{model.name}: a = {line.a:.2f}, b = {line.b:.2f}"
                    f"{' (fixed)' if line.fixed_intercept else ''}, RMSE = {line.rmse:.3f}"
                ),
            )
        if metric == PERPLEXITY:
            ax.plot(grid, 1 - grid, color="0.4", linestyle="--", label="theory: 1 − s")
            title = f"perplexity on {text}: {law.formula}" if text else f"perplexity: {law.formula}"
        else:
            measures = ", ".join(sorted({fit.measure for _, fit, _ in panel}))
            title = f"{metric} ({measures}): {law.formula}"
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("effective sparsity 1 − d/D")
        ax.set_ylabel(law.y_label)
        ax.grid(alpha=0.3)
        # Below the panel: inside, the long labels would hide measured points.
        ax.legend(fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.17), frameon=False)
    for ax in axes[len(metrics) :]:
        ax.set_visible(False)
    # One panel is narrower than the title: it takes two lines there.
    figure.suptitle(
        "Sparsity laws (arXiv 2503.04377):"
        + ("\n" if columns == 1 else " ")
        + "dots are measured, lines are least-squares fits"
    )

    written = []
    for suffix in (".png", ".svg"):
        target = path.with_suffix(suffix)
        atomic_write(target, lambda f, fmt=suffix[1:]: figure.savefig(f, format=fmt, dpi=150))
        written.append(target)
    return written
