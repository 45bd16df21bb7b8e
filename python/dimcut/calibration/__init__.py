"""Calibration: sample text, stream the model half a layer at a time, compute PCA rotations.

Modules, in the order data flows: `text` (sampling) → `layers` (streaming the stock decoder
blocks) → `activations` (where the signals live between layers) → `pca` (covariances, eigh) →
`rotations` (the on-disk rotation store, `--save-rotations`/`--rotations`) → `resume`
(per-layer checkpoints) → `sensitivity` (the loss sensitivity of each residual point, one
backward pass) → `bases` (the plain format's basis by `--method`: PCA, channels, random) →
`procedures` (the slicegpt and plain procedures, spectra and sensitivities for per-layer
widths, the block influence of `--method layers`).
"""

from dimcut.calibration.bases import random_basis
from dimcut.calibration.layers import BLOCK_PRECISIONS, block_precision
from dimcut.calibration.pca import Weighting
from dimcut.calibration.procedures import (
    DEFAULT_WEIGHTING,
    SignalSensitivities,
    Timings,
    block_influence,
    calibrate,
    signal_sensitivities,
    signal_spectra,
    streamed_forward,
    streamed_logits,
)
from dimcut.calibration.resume import STATE_FILE, resume_dir_for
from dimcut.calibration.rotations import (
    Calibrated,
    RotationStore,
    load_rotations,
    model_fingerprint,
    save_rotations,
)
from dimcut.calibration.text import (
    BUILTIN_SOURCE,
    calibration_documents,
    sample_sequences,
    sampled_text,
)

__all__ = [
    "BLOCK_PRECISIONS",
    "BUILTIN_SOURCE",
    "DEFAULT_WEIGHTING",
    "STATE_FILE",
    "Calibrated",
    "RotationStore",
    "SignalSensitivities",
    "Timings",
    "Weighting",
    "block_influence",
    "block_precision",
    "calibrate",
    "calibration_documents",
    "load_rotations",
    "model_fingerprint",
    "random_basis",
    "resume_dir_for",
    "sample_sequences",
    "sampled_text",
    "save_rotations",
    "signal_sensitivities",
    "signal_spectra",
    "streamed_forward",
    "streamed_logits",
]
