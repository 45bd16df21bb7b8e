"""Where calibration keeps the residual signals of every calibration token between layers.

An `ActivationStore` is a float32 [tokens, width] array: in RAM when it fits its budget, else a
file read and written one batch at a time (explicit reads and writes rather than a memory map, so
the pages never count towards the process's resident memory).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

SPILL_PREFIX = "dimcut-activations-"


class ActivationStore:
    """Float32 activations of `tokens` positions × `width`, read and written by token ranges.

    With `path` (resumable calibration) the array always lives in that file, reopened when it
    exists with the right size.
    """

    def __init__(
        self, tokens: int, width: int, budget_bytes: int, spill_dir: Path, path: Path | None = None
    ):
        self.width = width
        nbytes = tokens * width * 4
        self._array: np.ndarray | None = None
        self._file = None
        if path is None and nbytes <= budget_bytes:
            self._array = np.empty((tokens, width), dtype=np.float32)
            return
        if path is None:
            descriptor, _spill = tempfile.mkstemp(dir=spill_dir, suffix=".f32")
            self._file = os.fdopen(descriptor, "r+b")
        else:
            reopen = path.is_file() and path.stat().st_size == nbytes
            self._file = open(path, "r+b" if reopen else "w+b")  # noqa: SIM115 (closed in close())
        self._file.truncate(nbytes)

    @property
    def on_disk(self) -> bool:
        return self._file is not None

    def read(self, rows: slice) -> np.ndarray:
        if self._array is not None:
            return self._array[rows]
        out = np.empty((rows.stop - rows.start, self.width), dtype=np.float32)
        self._file.seek(rows.start * self.width * 4)
        view = memoryview(out).cast("B")
        done = 0
        while done < len(view):
            count = self._file.readinto(view[done:])
            if not count:
                raise EOFError(f"{self._file.name}: activation file is shorter than expected")
            done += count
        return out

    def write(self, rows: slice, values: np.ndarray) -> None:
        values = np.ascontiguousarray(values, dtype=np.float32)
        if self._array is not None:
            self._array[rows] = values
            return
        self._file.seek(rows.start * self.width * 4)
        self._file.write(memoryview(values).cast("B"))

    def flush(self) -> None:
        """Make written activations durable (a resumable checkpoint points at them)."""
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._array = None


def remove_dead_temporaries(root: Path, prefix: str) -> None:
    """Remove `<prefix><pid>-*` directories in `root` whose process is gone: what calibrations
    killed by SIGKILL (which cannot be caught) left behind."""
    for spill in root.glob(f"{prefix}*-*"):
        pid = spill.name.removeprefix(prefix).split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(spill, ignore_errors=True)
        except OSError:
            pass  # alive, or not ours to judge
