"""What every stage shares about the machine it runs on: the compute device, peak memory, the
memory budget, and writing a file so that readers never see half of it.

Importing this module is cheap (no torch): device resolution imports torch only when called.
"""

from __future__ import annotations

import ctypes
import enum
import os
import resource
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

GIB = 2**30


def parse_sparsities(text: str, option: str = "--sparsities") -> list[float]:
    """A comma-separated list of sparsities in (0, 1), sorted, each once; errors name `option`."""
    try:
        values = sorted({float(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise ValueError(f"{option} must be comma-separated numbers, got {text!r}") from None
    if not values or not all(0 < v < 1 for v in values):
        raise ValueError(f"{option} must lie in (0, 1); got {text!r}")
    return values


# One user-facing memory setting (`--memory-budget`) reaches every stage: calibration keeps its
# activations in RAM up to half of it (then spills to disk), the engine's tiles get a quarter.
DEFAULT_MEMORY_BUDGET = 2 * GIB


class Choice(str, enum.Enum):
    """A string option with a fixed set of values, parsed once where it enters (a typo fails
    before any work is done) and offered as the CLI's `choices`."""

    @classmethod
    def parse(cls, value, parameter: str | None = None, allowed=None):
        """`value` as a member; `allowed` narrows the members a caller accepts."""
        allowed = tuple(allowed or cls)
        try:
            member = cls(value)
        except ValueError:
            member = None
        if member not in allowed:
            name = parameter or cls.__name__.lower()
            choices = ", ".join(c.value for c in allowed)
            raise ValueError(f"{name} must be one of {choices}, got {value!r}")
        return member

    @classmethod
    def values(cls) -> list[str]:
        return [c.value for c in cls]


@enum.unique
class Device(Choice):
    """Where calibration, evaluation and healing compute."""

    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


@enum.unique
class Precision(Choice):
    """The floating type a model's weights and activations are in while dimcut runs it
    (evaluation, calibration blocks, healing); what is written keeps its own dtypes."""

    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"

    @property
    def torch(self):
        import torch

        return getattr(torch, self.value)


def torch_device(device: str | Device = Device.AUTO):
    """The one place that turns a device choice into a `torch.device` (no `.cuda()` elsewhere)."""
    import torch

    device = Device.parse(device)
    if device is Device.AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device is Device.CUDA and not torch.cuda.is_available():
        raise ValueError("device cuda: CUDA is not available on this machine (use cpu or auto)")
    return torch.device(device.value)


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dimcut")
    except PackageNotFoundError:  # running from a source tree without an install
        return "0.0.0+unknown"


def engine_budget(memory_budget: int) -> int:
    """The engine's tile budget within the user's memory budget."""
    return max(memory_budget // 4, 16 * 2**20)


def activation_budget(memory_budget: int) -> int:
    """Bytes of calibration activations kept in RAM before spilling to disk."""
    return memory_budget // 2


# mallopt's parameter number (glibc malloc.h) and the size from which allocations are mapped.
_M_MMAP_THRESHOLD = -3
_MAPPED_FROM = 1 << 20


def return_freed_memory() -> None:
    """Make glibc give freed allocations of 1 MiB and more back to the system at once (Linux;
    elsewhere nothing). Its mmap threshold otherwise rises with the first large frees, after
    which a training step's activations come from the heap and stay resident, fragmented: a
    Qwen-1.5B heal's resident memory grew from 4.9 GiB after its first step to 7.4 GiB in its
    second; with this it returns to 1.2 GiB after every step."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(_M_MMAP_THRESHOLD, _MAPPED_FROM)


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux: VmHWM; elsewhere ru_maxrss)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """Write `path` through a temporary file beside it, fsynced and renamed into place: a reader
    sees the old file or the whole new one, and a failure leaves nothing behind."""
    path = Path(path)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or ".")
    try:
        os.fchmod(descriptor, 0o666 & ~_umask())  # mkstemp's 0600 is for secrets, not results
        with os.fdopen(descriptor, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda handle: handle.write(text.encode()))


def check_output_dir(model_dir: Path, out_dir: Path, overwrite: bool) -> None:
    """Refuse bad output locations for a model written from `model_dir` before any long work
    (calibration, healing) is spent on it."""
    src, dst = model_dir.resolve(), out_dir.resolve()
    if dst == src or src in dst.parents:
        raise ValueError(f"output {out_dir}: must not be (inside) the input model directory")
    if dst.exists() and not overwrite:
        raise FileExistsError(
            f"output {out_dir}: the directory exists (pass overwrite=True / --overwrite)"
        )
    if not dst.parent.exists():
        raise FileNotFoundError(
            f"output {out_dir}: the parent directory {dst.parent} does not exist"
        )
    # Probe that the output location is writable (read-only file system, permissions) before
    # spending time on the work; the engine writes a temporary directory there too.
    try:
        Path(tempfile.mkdtemp(prefix=f".{dst.name}.dimcut-probe-", dir=dst.parent)).rmdir()
    except OSError as exc:
        raise PermissionError(
            f"output {out_dir}: cannot write in {dst.parent} ({exc.strerror or exc})"
        ) from None
