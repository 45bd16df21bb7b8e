"""The README's "At equal parameter budgets" table, from the records of `budgets_study.sh`.

Each cut is docs/results/budgets/<name>-b<budget>-<format>-<widths>.{wiki,lambada,tasks}.json; a
cut missing a record is listed with "…" in its place, so a study still running prints too.

    python benches/budgets_table.py qwen
    python benches/budgets_table.py smol --dense docs/results/heal/smollm2
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

BUDGETS = Path(__file__).resolve().parent.parent / "docs" / "results" / "budgets"
CUT = re.compile(r"-b(?P<budget>[0-9.]+)-(?P<format>[a-z]+)-(?P<widths>[a-z]+)$")
TEXTS = ("wiki", "lambada")
TASKS = ("arc_easy", "piqa")
MISSING = "…"
ORDER = ("slicegpt-uniform", "slicegpt-variance", "slicegpt-sensitivity", "plain-uniform")
HEADER = "| budget | cut | d | parameters (w/o shortcuts) | PPL wiki-offline | PPL LAMBADA | ARC-e | PIQA |"


def read(prefix: Path, part: str) -> dict | None:
    path = Path(f"{prefix}.{part}.json")
    return json.loads(path.read_text()) if path.is_file() else None


def millions(count: int) -> str:
    return f"{count / 1e6:.2f} M"


def cut_name(fmt: str, widths: str, model: dict) -> str:
    if fmt == "plain":
        return f"plain (`{model['calibration'].get('weighting', 'raw')}`)"
    return "slicegpt, uniform" if widths == "uniform" else f"slicegpt, `--widths {widths}`"


def row(prefix: Path) -> tuple[str, str, dict, list[str]]:
    """(d, parameters, the model facts, the measured cells) of one cut or dense model."""
    records = {part: read(prefix, part) for part in (*TEXTS, "tasks")}
    model = next((r["model"] for r in records.values() if r is not None), None)
    if model is None:
        raise SystemExit(f"no records for {prefix}.*.json")
    cells = [
        MISSING if records[text] is None else f"{records[text]['perplexity']['ppl']:.2f}"
        for text in TEXTS
    ]
    tasks = (records["tasks"] or {}).get("tasks") or {}
    cells += [f"{tasks[t]['headline']:.3f}" if t in tasks else MISSING for t in TASKS]
    params = model["parameters"]
    counted = millions(params["total"])
    if params.get("shortcuts") is not None:
        counted += f" ({millions(params['without_shortcuts'])})"
    return str(model["hidden_size"] or model["original_hidden_size"]), counted, model, cells


def rank(cut: re.Match) -> int:
    """The README's order within a budget: the baseline, then each improvement."""
    key = f"{cut['format']}-{cut['widths']}"
    return ORDER.index(key) if key in ORDER else len(ORDER)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", help="the study's model name: smol or qwen")
    parser.add_argument(
        "--dense", help="the dense model's record prefix (default: budgets/<name>-dense)"
    )
    args = parser.parse_args()
    dense = Path(args.dense) if args.dense else BUDGETS / f"{args.name}-dense"
    dense_d, dense_params, dense_model, dense_cells = row(dense)
    dense_total = dense_model["parameters"]["total"]
    print(HEADER)
    print("|---|---|---|---|---|---|---|---|")
    prefixes = sorted(
        {Path(str(p).rsplit(".", 2)[0]) for p in BUDGETS.glob(f"{args.name}-b*.json")}
    )
    cuts = [(CUT.search(p.name), p) for p in prefixes]
    for match, prefix in sorted(cuts, key=lambda c: (float(c[0]["budget"]), rank(c[0]))):
        d, params, model, cells = row(prefix)
        name = cut_name(match["format"], match["widths"], model)
        budget = f"{match['budget']} ({millions(float(match['budget']) * dense_total)})"
        print(f"| {budget} | {name} | {d} | {params} | {' | '.join(cells)} |")
    print(
        f"| dense ({millions(dense_total)}) | — | {dense_d} | {dense_params} | {' | '.join(dense_cells)} |"
    )


if __name__ == "__main__":
    main()
