"""Where an unfinished heal keeps its state: `<OUT>.dimcut-heal/`, beside the output.

It holds the teacher's targets (`teacher-topk.safetensors`) and the last training checkpoint
(`checkpoint.pt`: adapter and trained shortcut values, optimizer and scheduler state, the RNG,
the losses so far, and the identity of the run — model fingerprints, data hash, options — that a
resumed run must match). Checkpoints are written atomically and read with
`torch.load(weights_only=True)`, which unpickles tensors and plain containers only.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch

from dimcut.runtime import atomic_write, atomic_write_text

CHECKPOINT_FILE = "checkpoint.pt"
IDENTITY_FILE = "run.json"
LOSS_WINDOW = 10  # steps averaged for the reported initial and final losses


def state_dir_for(out_dir: Path) -> Path:
    return out_dir.with_name(out_dir.name + ".dimcut-heal")


def open_state(state_dir: Path, identity: dict, *, resume: bool) -> dict | None:
    """Prepare the state directory of a run with `identity`; returns the checkpoint to resume
    from (None: start at step 0). Refuses to silently discard an earlier run's state, and to
    resume one made with other inputs or options."""
    identity_file = state_dir / IDENTITY_FILE
    identity = _jsonable(identity)
    if state_dir.exists():
        if not resume:
            raise FileExistsError(
                f"{state_dir} holds the state of an unfinished heal of this output: pass "
                "--resume (resume=True) to continue it, or delete the directory to start over"
            )
        try:
            previous = json.loads(identity_file.read_text())
        except (OSError, ValueError):
            previous = identity  # killed before its identity was written: nothing to check
        differing = sorted(
            k for k in set(previous) | set(identity) if previous.get(k) != identity.get(k)
        )
        if differing:
            raise ValueError(
                f"cannot resume from {state_dir}: it was made with other inputs or options "
                f"({', '.join(differing)} differ); rerun with the same ones or delete it"
            )
    state_dir.mkdir(exist_ok=True)
    atomic_write_text(identity_file, json.dumps(identity, indent=2, sort_keys=True))
    checkpoint = state_dir / CHECKPOINT_FILE
    if not checkpoint.is_file():
        return None
    return torch.load(checkpoint, map_location="cpu", weights_only=True)


def save_checkpoint(state_dir: Path, snapshot: dict) -> None:
    buffer = io.BytesIO()
    torch.save(snapshot, buffer)
    atomic_write(state_dir / CHECKPOINT_FILE, lambda handle: handle.write(buffer.getbuffer()))


def _jsonable(identity: dict) -> dict:
    return json.loads(json.dumps(identity, sort_keys=True))
