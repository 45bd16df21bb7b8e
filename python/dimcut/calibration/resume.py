"""Per-layer checkpoints of a calibration (`dimcut slice --resume`).

The resume directory holds `state.json` (what the calibration is, and how many layers are done),
the rotation store of the layers done, the two activation files that alternate between layers
(so the state a checkpoint points to is never overwritten by the next layer), and, for the plain
format, the covariance summed so far.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dimcut._core import DimcutError
from dimcut.runtime import atomic_write, atomic_write_text

RESUME_SUFFIX = ".dimcut-resume"
STATE_FILE = "state.json"
COVARIANCE_FILE = "covariance.npy"
ROTATION_FILE = "rotation.npy"  # the whole Q entering the next layer (the store keeps Q[:, :d])


def resume_dir_for(out_dir: str | Path) -> Path:
    """Where `dimcut slice --resume` keeps calibration state for `out_dir`."""
    out_dir = Path(out_dir)
    return out_dir.with_name(out_dir.name + RESUME_SUFFIX)


class ResumeState:
    """The checkpoint in `directory` for a calibration identified by `identity`."""

    def __init__(self, directory: Path, identity: dict):
        self.directory = directory
        self.identity = identity
        self.layers_done = 0
        directory.mkdir(parents=True, exist_ok=True)
        state = directory / STATE_FILE
        if not state.is_file():
            return
        try:
            saved = json.loads(state.read_text())
            layers_done = int(saved["layers_done"])
            saved_identity = saved["identity"]
        except (OSError, ValueError, KeyError, TypeError) as exc:  # damaged
            raise DimcutError(
                f"{state}: unreadable resume state ({exc}); delete {directory} to start over"
            ) from None
        keys = set(saved_identity) | set(identity)
        differing = sorted(k for k in keys if saved_identity.get(k) != identity.get(k))
        if differing:
            raise DimcutError(
                f"{directory}: the saved calibration differs from this run in "
                f"{', '.join(differing)}; delete it to start over, or rerun with the same "
                "model and options"
            )
        self.layers_done = layers_done

    def activation_file(self, name: str) -> Path:
        return self.directory / f"{name}.f32"

    def covariance(self) -> np.ndarray:
        return np.load(self.directory / COVARIANCE_FILE, allow_pickle=False)

    def rotation(self) -> np.ndarray:
        return np.load(self.directory / ROTATION_FILE, allow_pickle=False)

    def save(
        self,
        layers_done: int,
        covariance: np.ndarray | None = None,
        rotation: np.ndarray | None = None,
    ) -> None:
        """Record that `layers_done` layers are complete (their rotations and activations are
        already durable)."""
        for name, array in ((COVARIANCE_FILE, covariance), (ROTATION_FILE, rotation)):
            if array is not None:
                atomic_write(self.directory / name, lambda f, a=array: np.save(f, a))
        state = {"identity": self.identity, "layers_done": layers_done}
        atomic_write_text(self.directory / STATE_FILE, json.dumps(state))
        self.layers_done = layers_done
