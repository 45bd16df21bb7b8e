"""Which weighting should the plain format's one rotation use? Measured at equal width.

For each weighting, one plain calibration (the rotation does not depend on the width), then the
model written at each width and its perplexity on held-out Wikipedia (in-domain: the calibration
text is the disjoint `train` part) and on LAMBADA fiction (out of domain); the per-layer slicegpt
format at the same widths for reference. Results are appended to a JSON file as they finish, so
an interrupted run resumes.

    python benches/plain_weighting.py smollm2 --widths 432,504 --out docs/results/plain-weighting-smollm2.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import dimcut
from dimcut import calibration, data_sources, zoo
from dimcut.evaluation import perplexity
from dimcut.runtime import atomic_write_text

TEXTS = {"wiki-offline": "test", "lambada-offline": None}


def measure(model_dir: Path, texts: dict, windows: int) -> dict:
    model, tokenizer = dimcut.load(model_dir)
    return {
        name: perplexity(model, tokenizer, documents, seqlen=2048, max_windows=windows)["ppl"]
        for name, documents in texts.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--widths", default="432,504")
    parser.add_argument("--weightings", default=",".join(dimcut.Weighting.values()))
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--calib-seqlen", type=int, default=512)
    parser.add_argument("--windows", type=int, default=4, help="2048-token windows per text")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    model_dir = zoo.resolve_model(args.model)
    out = Path(args.out)
    rows = json.loads(out.read_text()) if out.is_file() else []
    done = {(r["format"], r["weighting"], r["width"]) for r in rows}
    texts = {n: data_sources.load_documents(n, s) for n, s in TEXTS.items()}
    calib = {"source": "wiki-offline", "nsamples": args.nsamples, "seqlen": args.calib_seqlen}
    widths = [int(w) for w in args.widths.split(",")]
    arch = dimcut.load_architecture(model_dir)

    def record(row: dict) -> None:
        rows.append(row)
        atomic_write_text(out, json.dumps(rows, indent=1))
        print(json.dumps(row))

    with tempfile.TemporaryDirectory(dir=out.parent) as scratch:
        scratch = Path(scratch)
        if ("dense", "-", arch.hidden_size) not in done:
            record(
                {
                    "format": "dense",
                    "weighting": "-",
                    "width": arch.hidden_size,
                    **measure(model_dir, texts, args.windows),
                }
            )
        for weighting in args.weightings.split(","):
            todo = [w for w in widths if ("plain", weighting, w) not in done]
            if not todo:
                continue
            started = time.perf_counter()
            found = calibration.calibrate(
                model_dir,
                fmt="plain",
                width=0,
                weighting=weighting,
                rotations_dir=scratch,
                progress=False,
                **calib,
            )
            seconds = time.perf_counter() - started
            for width in todo:
                target = scratch / f"plain-{weighting}-{width}"
                dimcut.write_sliced_model(
                    model_dir,
                    target,
                    fmt="plain",
                    rotations=found.rotations,
                    width=width,
                    progress=False,
                )
                params = dimcut.count_parameters(target)["total"]
                record(
                    {
                        "format": "plain",
                        "weighting": weighting,
                        "width": width,
                        "parameters": params,
                        "calibration_seconds": seconds,
                        **measure(target, texts, args.windows),
                    }
                )
                shutil.rmtree(target)
            found.close()
        for width in widths:
            if ("slicegpt", "-", width) in done:
                continue
            target = scratch / f"slicegpt-{width}"
            sparsity = 1 - width / arch.hidden_size
            result = dimcut.slice_model(
                model_dir,
                sparsity,
                target,
                progress=False,
                calib=calib["source"],
                nsamples=args.nsamples,
                seqlen=args.calib_seqlen,
            )
            record(
                {
                    "format": "slicegpt",
                    "weighting": "-",
                    "width": result.hidden_size,
                    "parameters": result.parameters["total"],
                    "parameters_without_shortcuts": result.parameters["without_shortcuts"],
                    **measure(target, texts, args.windows),
                }
            )
            shutil.rmtree(target)


if __name__ == "__main__":
    main()
