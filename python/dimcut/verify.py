"""`dimcut verify OUT`: check that a written checkpoint is whole and matches what was written.

Checks, in order (each reported; the exit status is 0 only when all pass):
1. headers: every safetensors header is valid and the index agrees with the shards (the engine's
   own validation, the same one every dimcut command runs on its inputs);
2. manifest: `dimcut-manifest.json` lists every file with its size and SHA-256, and they match
   (so a truncated, swapped or bit-flipped shard is caught); no weight file is unlisted;
3. shapes: the model config.json describes has exactly the checkpoint's tensors, shape for shape;
4. layer: the first decoder layer's tensors load into that model's layer and are finite.

Nothing is executed from the directory: config.json is read as data and the model skeleton is
built from dimcut's own classes (or transformers' stock ones) on the meta device.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

# Defined once, by the engine that writes the manifest and refuses to copy weight files.
from dimcut._core import MANIFEST_FILE, MANIFEST_SCHEMA, WEIGHT_SUFFIXES


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class VerifyReport:
    path: Path
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(check.ok for check in self.checks)

    def add(self, name: str, ok: bool, detail: str) -> bool:
        self.checks.append(Check(name, ok, detail))
        return ok

    def summary(self) -> str:
        lines = [f"{'ok  ' if c.ok else 'FAIL'}  {c.name:<9} {c.detail}" for c in self.checks]
        verdict = "PASS" if self.ok else "FAIL"
        lines.append(f"{verdict}: {self.path}")
        return "\n".join(lines)


def sha256_file(path: Path) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def verify(path: str | Path, *, require_manifest: bool = True, load_layer: bool = True):
    """Run every check on the checkpoint directory `path`; returns a VerifyReport."""
    from dimcut._core import DimcutError
    from dimcut.engine import inspect_checkpoint

    path = Path(path)
    report = VerifyReport(path)
    if not path.is_dir():
        report.add("directory", False, f"{path} is not a directory")
        return report
    try:
        tensors = inspect_checkpoint(path)
    except (DimcutError, OSError, ValueError) as exc:
        report.add("headers", False, str(exc))
        tensors = None
    else:
        shards = sorted({file for _d, _s, file in tensors.values()})
        report.add("headers", True, f"{len(tensors)} tensors in {len(shards)} shard(s)")
    _check_manifest(path, report, require_manifest)
    if tensors is None:
        return report
    model = _check_shapes(path, tensors, report)
    if model is not None and load_layer:
        _check_layer(path, tensors, model, report)
    return report


def _check_manifest(path: Path, report: VerifyReport, required: bool) -> None:
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        report.add(
            "manifest",
            not required,
            f"no {MANIFEST_FILE}" + ("" if required else " (skipped: --allow-missing-manifest)"),
        )
        return
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        if manifest.get("schema") != MANIFEST_SCHEMA or not isinstance(files, dict):
            raise ValueError(f"schema {manifest.get('schema')!r}")
    except (ValueError, KeyError, TypeError) as exc:
        report.add("manifest", False, f"{manifest_path} is not a {MANIFEST_SCHEMA} file ({exc})")
        return
    problems = []
    for name, entry in sorted(files.items()):
        file = path / name
        if "/" in name or "\\" in name or name in ("", ".", ".."):
            problems.append(f"{name!r}: not a plain file name")
        elif not file.is_file():
            problems.append(f"{name}: missing")
        else:
            size, sha = sha256_file(file)
            if size != entry.get("size"):
                problems.append(f"{name}: {size} bytes, manifest says {entry.get('size')}")
            elif sha != entry.get("sha256"):
                problems.append(f"{name}: SHA-256 {sha[:12]}… differs from the manifest")
    unlisted = sorted(
        f.name
        for f in path.iterdir()
        if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES) and f.name not in files
    )
    problems += [f"{name}: weight file not in the manifest" for name in unlisted]
    if problems:
        report.add("manifest", False, "; ".join(problems))
    else:
        report.add("manifest", True, f"{len(files)} files, sizes and SHA-256 match")


def _skeleton(path: Path):
    """The model config.json describes, built on the meta device from local classes only."""
    from dimcut import formats

    return formats.skeleton(json.loads((path / "config.json").read_text()))


def _check_shapes(path: Path, tensors: dict, report: VerifyReport):
    try:
        model = _skeleton(path)
    except Exception as exc:  # noqa: BLE001 - any failure to build the model is a verdict
        report.add("shapes", False, f"cannot build the model config.json describes: {exc}")
        return None
    expected = {name: list(p.shape) for name, p in model.state_dict().items()}
    problems = []
    for name, shape in sorted(expected.items()):
        if name not in tensors:
            if name == "lm_head.weight" and getattr(model.config, "tie_word_embeddings", False):
                continue
            problems.append(f"{name}: missing (config expects {shape})")
        elif list(tensors[name][1]) != shape:
            problems.append(
                f"{name}: shape {list(tensors[name][1])} in {tensors[name][2]}, config expects "
                f"{shape}"
            )
    problems += [f"{name}: not part of the model" for name in sorted(set(tensors) - set(expected))]
    if problems:
        more = f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
        report.add("shapes", False, "; ".join(problems[:5]) + more)
        return None
    report.add("shapes", True, f"{len(expected)} tensors match config.json")
    return model


def _check_layer(path: Path, tensors: dict, model, report: VerifyReport) -> None:
    import torch
    from safetensors import safe_open

    prefix = "model.layers.0."
    names = [n for n in tensors if n.startswith(prefix)]
    if not names:
        report.add("layer", False, "no tensors of model.layers.0")
        return
    state = {}
    try:
        for name in names:
            with safe_open(str(path / tensors[name][2]), framework="pt") as handle:
                state[name.removeprefix(prefix)] = handle.get_tensor(name)
        bad = [n for n, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()]
        if bad:
            report.add("layer", False, f"layer 0: non-finite values in {', '.join(bad)}")
            return
        layer = model.model.layers[0].to_empty(device="cpu")
        missing, unexpected = layer.load_state_dict(state, strict=False)
        if missing or unexpected:
            report.add("layer", False, f"layer 0: missing {missing}, unexpected {unexpected}")
            return
    except Exception as exc:  # noqa: BLE001 - a layer that does not load is a verdict
        report.add("layer", False, f"layer 0 does not load: {exc}")
        return
    report.add("layer", True, f"layer 0 loads ({len(state)} tensors, finite)")


def add_commands(subparsers) -> None:
    parser = subparsers.add_parser(
        "verify",
        description=(
            "Check a checkpoint directory written by dimcut: every safetensors header and the "
            "index, the recorded size and SHA-256 of every file (dimcut-manifest.json), every "
            "tensor's shape against config.json, and that the first layer loads. Exit status 0 "
            "when everything passes, 1 otherwise."
        ),
    )
    parser.add_argument("path", metavar="OUT", help="checkpoint directory to check")
    parser.add_argument(
        "--allow-missing-manifest",
        action="store_true",
        help="pass a directory without dimcut-manifest.json (e.g. a dense input checkpoint)",
    )
    parser.add_argument("--no-load", action="store_true", help="skip loading the first layer")
    parser.set_defaults(func=_run_verify)


def _run_verify(args) -> int:
    report = verify(
        args.path, require_manifest=not args.allow_missing_manifest, load_layer=not args.no_load
    )
    print(report.summary())
    return 0 if report.ok else 1
