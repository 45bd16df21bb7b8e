"""Typed front of the Rust engine (`dimcut._core`): plan ops as dataclasses, path-like
directories, and an optional tqdm progress bar. The plan format is docs/plan-format.md."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, TypedDict

import numpy as np

from dimcut import _core, _hooks

PathArg = str | os.PathLike[str]
ProgressArg = bool | Callable[[int, int], None]


@dataclass(frozen=True)
class TensorOp:
    """One output tensor of a plan; see docs/plan-format.md for the meaning of each field.

    The fields are the engine's `_core.OP_KEYS` (tests/test_engine.py holds them equal)."""

    name: str
    source: str | None = None
    col_scale: str | None = None
    in_rotation: str | None = None
    in_keep: int | None = None
    out_rotation: str | None = None
    out_keep: int | None = None
    shortcut: tuple[str, str, int, int] | None = None
    literal: str | None = None
    dtype: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The engine's dict form; unset fields are left out (omitted keys mean None)."""
        out: dict[str, Any] = {}
        for field in fields(self):
            value = getattr(self, field.name)
            if value is not None:
                out[field.name] = list(value) if field.name == "shortcut" else value
        return out


class RewriteStats(TypedDict):
    tensors: int
    bytes_read: int
    bytes_written: int
    flops: int
    seconds: float
    shards: int
    # Where the time went: matrix products, dtype conversions, writes, the final fsync.
    matmul_seconds: float
    convert_seconds: float
    write_seconds: float
    sync_seconds: float


Op = TensorOp | Mapping[str, Any]


def rewrite_checkpoint(
    src_dir: PathArg,
    out_dir: PathArg,
    ops: Sequence[Op],
    arrays: Mapping[str, np.ndarray] | None = None,
    *,
    extra_files: Mapping[str, bytes | str] | None = None,
    max_shard_size: int = 5 * 2**30,
    memory_budget: int = 512 * 2**20,
    precision: str = "f32",
    overwrite: bool = False,
    threads: int | None = None,
    progress: ProgressArg = False,
) -> RewriteStats:
    """Write the checkpoint `ops` describe into `out_dir`, streaming from `src_dir`.

    `progress=True` shows a tqdm bar; a callable receives `(bytes_done, bytes_total)`.
    """
    extra = {
        name: data.encode() if isinstance(data, str) else bytes(data)
        for name, data in (extra_files or {}).items()
    }
    engine_arrays, mapped = _engine_arrays(arrays)
    with _progress_callback(progress, f"writing {os.fspath(out_dir)}") as callback:
        if _hooks.watches("write"):
            callback = _hooked(callback)
        stats = _core.rewrite_checkpoint(
            os.fspath(src_dir),
            os.fspath(out_dir),
            _op_dicts(ops),
            engine_arrays,
            extra_files=extra,
            max_shard_size=max_shard_size,
            memory_budget=memory_budget,
            precision=precision,
            overwrite=overwrite,
            threads=threads,
            progress=callback,
            mapped=mapped,
            **_hooks.engine_faults(),
        )
    return RewriteStats(**stats)


def rewrite_tensors(
    src_dir: PathArg,
    ops: Sequence[Op],
    arrays: Mapping[str, np.ndarray] | None = None,
    *,
    precision: str = "f32",
    memory_budget: int = 512 * 2**20,
    threads: int | None = None,
) -> dict[str, np.ndarray]:
    """Compute the ops' tensors in memory (float32, or float64 with precision="f64"); values
    are rounded to each op's output dtype, exactly as `rewrite_checkpoint` would write them."""
    engine_arrays, mapped = _engine_arrays(arrays)
    return _core.rewrite_tensors(
        os.fspath(src_dir),
        _op_dicts(ops),
        engine_arrays,
        precision=precision,
        memory_budget=memory_budget,
        threads=threads,
        mapped=mapped,
    )


def inspect_checkpoint(src_dir: PathArg) -> dict[str, tuple[str, list[int], str]]:
    """Tensor name -> (dtype, shape, shard file name), after validating every header."""
    return _core.inspect_checkpoint(os.fspath(src_dir))


def _hooked(callback: Callable[[int, int], None] | None) -> Callable[[int, int], None]:
    def report(done: int, total: int) -> None:
        _hooks.reached("write", done / max(total, 1))
        if callback is not None:
            callback(done, total)

    return report


def _op_dicts(ops: Sequence[Op]) -> list[dict[str, Any]]:
    return [op.to_dict() if isinstance(op, TensorOp) else dict(op) for op in ops]


def _engine_arrays(
    arrays: Mapping[str, np.ndarray] | None,
) -> tuple[dict[str, np.ndarray], list[str]]:
    """C-contiguous float32/float64 arrays (no copy when they already are), and the names of
    those that are still views of a read-only file map: the engine drops their pages after
    each op, so rotations opened as `mmap_mode="r"` memmaps never pile up in resident memory."""
    converted, mapped = {}, []
    for name, array in (arrays or {}).items():
        # Decided on the caller's object: conversion may return a plain ndarray view of it.
        file_map = _is_read_only_file_map(array)
        array = np.asarray(array)
        dtype = array.dtype if array.dtype in (np.float32, np.float64) else np.float64
        converted[name] = np.ascontiguousarray(array, dtype=dtype)
        if file_map and np.shares_memory(converted[name], array):
            mapped.append(name)
    return converted, mapped


def _is_read_only_file_map(array: object) -> bool:
    """A view of a `mmap_mode="r"` memmap (a read-only shared file mapping): the only memory
    whose pages may be dropped; anonymous or copy-on-write memory would lose its contents."""
    return (
        isinstance(array, np.memmap)
        and array.mode == "r"
        and getattr(array, "_mmap", None) is not None
    )


class _progress_callback:
    """Context manager yielding the engine callback for `progress` (and closing a tqdm bar)."""

    def __init__(self, progress: ProgressArg, description: str) -> None:
        self._progress = progress
        self._description = description
        self._bar: Any = None

    def __enter__(self) -> Callable[[int, int], None] | None:
        if callable(self._progress):
            return self._progress
        if not self._progress:
            return None
        from tqdm.auto import tqdm

        self._bar = tqdm(desc=self._description, unit="B", unit_scale=True, unit_divisor=1024)

        def update(done: int, total: int) -> None:
            self._bar.total = total
            self._bar.update(done - self._bar.n)

        return update

    def __exit__(self, *exc_info: object) -> None:
        if self._bar is not None:
            self._bar.close()
