"""The Rust engine (private; use `dimcut.engine`). Plan format: docs/plan-format.md."""

from collections.abc import Callable
from typing import Any

import numpy as np

# The manifest every output carries (file name, schema id), and the names of weight files.
MANIFEST_FILE: str
MANIFEST_SCHEMA: str
WEIGHT_SUFFIXES: tuple[str, ...]
OP_KEYS: tuple[str, ...]  # the fields of a plan op (dimcut.engine.TensorOp)

class DimcutError(Exception):
    """A checkpoint or output problem the engine detected (or an internal engine failure)."""

def rewrite_checkpoint(
    src_dir: str,
    out_dir: str,
    ops: list[dict[str, Any]],
    arrays: dict[str, np.ndarray],
    *,
    extra_files: dict[str, bytes] | None = None,
    max_shard_size: int = ...,
    memory_budget: int = ...,
    precision: str = "f32",
    overwrite: bool = False,
    threads: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    mapped: list[str] = [],
) -> dict[str, Any]: ...
def rewrite_tensors(
    src_dir: str,
    ops: list[dict[str, Any]],
    arrays: dict[str, np.ndarray],
    *,
    precision: str = "f32",
    memory_budget: int = ...,
    threads: int | None = None,
    mapped: list[str] = [],
) -> dict[str, np.ndarray]: ...
def inspect_checkpoint(src_dir: str) -> dict[str, tuple[str, list[int], str]]: ...
