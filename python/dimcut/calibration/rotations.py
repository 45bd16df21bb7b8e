"""Rotations leave RAM as they are made: a `RotationStore` is a directory with one float64 `.npy`
file per rotation, holding only the leading columns the rewrite reads (D×d, not D×D), and its
eigenvalues. The rewrite memory-maps the files, so memory stays flat in the number of layers.

The same directory layout is what `--save-rotations` writes and `--rotations` reads.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dimcut._core import DimcutError
from dimcut.architectures import Architecture, load_architecture
from dimcut.plan import Format, Method, Widths, plan_rotation_names
from dimcut.runtime import atomic_write, atomic_write_text

RECORD_FILE = "record.json"
TEMPORARY_PREFIX = ".dimcut-rotations-"
EIGENVALUES_SUFFIX = ".eigenvalues.npy"
ROTATION_SUFFIX = ".npy"


class RotationStore(Mapping[str, np.ndarray]):
    """Rotations by plan name, each a read-only memory map of Q[:, :keep]."""

    def __init__(self, directory: str | Path, *, temporary: bool = False):
        self.directory = Path(directory)
        # A temporary store is removed by close(), or when it is garbage collected.
        self._cleanup = (
            weakref.finalize(self, shutil.rmtree, self.directory, ignore_errors=True)
            if temporary
            else None
        )

    @classmethod
    def create_temporary(cls, parent: str | Path | None = None) -> RotationStore:
        """A store in a new hidden directory (beside the output when `parent` is given), removed
        by `close()`."""
        directory = tempfile.mkdtemp(prefix=f"{TEMPORARY_PREFIX}{os.getpid()}-", dir=parent)
        return cls(directory, temporary=True)

    def put(self, name: str, rotation: np.ndarray, eigenvalues: np.ndarray, keep: int) -> None:
        """Store the first `keep` columns of `rotation` (each file replaced atomically)."""
        columns = np.ascontiguousarray(rotation[:, :keep], dtype=np.float64)
        atomic_write(self._path(name), lambda handle: np.save(handle, columns))
        values = np.asarray(eigenvalues, dtype=np.float64)
        atomic_write(self._path(name, EIGENVALUES_SUFFIX), lambda handle: np.save(handle, values))

    def __getitem__(self, name: str) -> np.ndarray:
        path = self._path(name)
        if not path.is_file():
            raise KeyError(name)
        return np.load(path, mmap_mode="r", allow_pickle=False)

    def __iter__(self) -> Iterator[str]:
        for path in sorted(self.directory.glob(f"*{ROTATION_SUFFIX}")):
            if not path.name.endswith(EIGENVALUES_SUFFIX):
                yield path.name.removesuffix(ROTATION_SUFFIX)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def eigenvalues(self) -> dict[str, np.ndarray]:
        return {
            name: np.load(self._path(name, EIGENVALUES_SUFFIX), allow_pickle=False) for name in self
        }

    def _path(self, name: str, suffix: str = ROTATION_SUFFIX) -> Path:
        return self.directory / f"{name}{suffix}"

    def close(self) -> None:
        if self._cleanup is not None:
            self._cleanup()


@dataclass
class Calibrated:
    """Rotations (by plan name; Q[:, :keep] float64), their eigenvalues, and what made them."""

    rotations: Mapping[str, np.ndarray]
    eigenvalues: dict[str, np.ndarray]
    record: dict = field(default_factory=dict)
    # How this run went, kept out of the record (which goes into the output's provenance and
    # must be the same for the same inputs, resumed or not): seconds per phase
    # (`procedures.Timings.as_dict()`) and whether activations spilled to disk.
    timings: dict = field(default_factory=dict)
    activations_on_disk: bool = False

    def retained_variance(self, keep: int | Mapping[str, int]) -> dict[str, float]:
        """Per rotation, the fraction of the signal's energy kept by its first `keep`
        directions (one count, or one per rotation name as `Widths.of_rotations` gives)."""
        return {
            name: float(e[: keep if isinstance(keep, int) else keep[name]].sum() / e.sum())
            for name, e in self.eigenvalues.items()
            if e.sum() > 0
        }

    def close(self) -> None:
        """Remove the rotations if they live in a temporary store."""
        if isinstance(self.rotations, RotationStore):
            self.rotations.close()


def save_rotations(path: str | Path, calibrated: Calibrated) -> None:
    """Write rotations as a directory (`record.json` and one `.npy` per rotation), atomically."""
    path = Path(path)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        store = RotationStore(staging)
        for name, rotation in calibrated.rotations.items():
            store.put(name, rotation, calibrated.eigenvalues[name], rotation.shape[1])
        atomic_write_text(staging / RECORD_FILE, json.dumps(calibrated.record, indent=1))
        staging.chmod(0o755)
        if path.is_dir() and (path / RECORD_FILE).is_file():
            shutil.rmtree(path)  # replacing an earlier rotations directory
        os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def load_rotations(
    path: str | Path,
    arch: Architecture,
    fmt: Format | str,
    widths: Widths | None = None,
    *,
    model_dir: str | Path | None = None,
    method: Method | str = Method.PCA,
) -> Calibrated:
    """Open rotations saved by `save_rotations`, refusing ones made for another model, format or
    method (with `model_dir`, also another checkpoint of the same shape: see
    `model_fingerprint`), for another width (slicegpt), or that are not finite matrices with
    orthonormal columns."""
    fmt, method = Format.parse(fmt), Method.parse(method, "method")
    path = Path(path)
    what = f"rotations {path}"
    if not path.exists():
        raise FileNotFoundError(f"{what}: no such directory")
    try:
        record = json.loads((path / RECORD_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise DimcutError(f"{what}: not a dimcut rotations directory ({exc})") from None
    if not isinstance(record, dict):
        raise DimcutError(f"{what}: not a dimcut rotations directory (bad {RECORD_FILE})")
    if (record.get("hidden_size"), record.get("num_layers")) != (arch.hidden_size, arch.num_layers):
        raise DimcutError(
            f"{what}: made for hidden size {record.get('hidden_size')} and "
            f"{record.get('num_layers')} layers, but the model has {arch.hidden_size} and "
            f"{arch.num_layers}"
        )
    if record.get("format") != fmt.value:
        raise DimcutError(f"{what}: made for format {record.get('format')!r}, not {fmt.value!r}")
    made_by = record.get("method", Method.PCA.value)  # PCA records name no method
    if made_by != method.value:
        raise DimcutError(f"{what}: made by method {made_by!r}, not {method.value!r}")
    if fmt is Format.SLICEGPT and widths is not None:
        d, layers = widths.embedding, arch.num_layers
        uniform = widths in (
            Widths.constant(d, layers),
            Widths.constant(d, layers, arch.hidden_size),
        )
        made = record.get("widths") or [record.get("width")]
        wanted = [d] if uniform else widths.as_list()
        if made != wanted:
            raise DimcutError(
                f"{what}: slicegpt rotations depend on the widths; these were computed "
                f"for {made}, not {wanted}"
            )
    if model_dir is not None and record.get("model_fingerprint"):
        from dimcut.engine import inspect_checkpoint

        model_dir = Path(model_dir)
        mine = model_fingerprint(model_dir, inspect_checkpoint(model_dir))
        if mine != record["model_fingerprint"]:
            raise DimcutError(
                f"{what}: computed for a different model (fingerprint "
                f"{record['model_fingerprint'][:12]}…, but {model_dir} has {mine[:12]}…): same "
                "sizes, different weights"
            )
    store = RotationStore(path)
    needed = _needed_widths(arch, fmt, widths)
    missing = [name for name in needed if name not in store]
    if missing:
        raise DimcutError(f"{what}: lacks rotation(s) {', '.join(missing[:3])}")
    for name, width in needed.items():
        _check_rotation(what, name, store[name], arch.hidden_size, width)
    return Calibrated(store, store.eigenvalues(), {**record, "rotations_file": str(path)})


def _needed_widths(arch: Architecture, fmt: Format, widths: Widths | None) -> dict[str, int]:
    """Rotation name → the number of leading columns the plan reads."""
    names = plan_rotation_names(fmt, arch.num_layers)
    if widths is None:
        widths = Widths.constant(1, arch.num_layers)
    needed: dict[str, int] = {}
    points = [(names.embedding, widths.embedding)]
    points += list(zip(names.mid, widths.mid, strict=True))
    points += list(zip(names.out, widths.out, strict=True))
    for name, width in points:
        needed[name] = max(needed.get(name, 0), width)
    return needed


def _check_rotation(what: str, name: str, q: np.ndarray, rows: int, width: int) -> None:
    if q.ndim != 2 or q.shape[0] != rows or q.shape[1] < width or q.dtype.kind != "f":
        raise DimcutError(
            f"{what}: rotation {name!r} is {q.dtype} {list(q.shape)}, expected a float "
            f"[{rows}, ≥{width}] matrix"
        )
    if not np.isfinite(q).all():
        raise DimcutError(f"{what}: rotation {name!r} contains NaN or Inf")
    probe = np.random.default_rng(0).standard_normal(q.shape[1])
    if abs(np.linalg.norm(q @ probe) / np.linalg.norm(probe) - 1) > 1e-3:
        raise DimcutError(f"{what}: rotation {name!r} does not have orthonormal columns")


def model_fingerprint(model_dir: Path, tensors: dict) -> str:
    """SHA-256 of what identifies a checkpoint cheaply: its config sizes, every tensor's name,
    dtype and shape, and the values of its 1-D tensors (norm weights differ between fine-tunes)."""
    import torch
    from safetensors import safe_open

    arch = load_architecture(model_dir)
    digest = hashlib.sha256()
    sizes = (arch.model_type, arch.hidden_size, arch.num_layers, arch.intermediate_size)
    digest.update(json.dumps(sizes).encode())
    digest.update(json.dumps(sorted((k, v[0], v[1]) for k, v in tensors.items())).encode())
    by_file: dict[str, list[str]] = {}
    for name, (_dtype, shape, file) in sorted(tensors.items()):
        if len(shape) == 1:
            by_file.setdefault(file, []).append(name)
    for file, names in sorted(by_file.items()):
        with safe_open(str(model_dir / file), framework="pt") as handle:
            for name in names:
                raw = handle.get_tensor(name).contiguous().view(torch.uint8)
                digest.update(raw.numpy().tobytes())
    return digest.hexdigest()
