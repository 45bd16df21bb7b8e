"""The one basis a `plain` cut keeps the leading columns of, by `--method`
(docs/algorithm.md §4.4): the principal axes of the summed residual covariance (`pca`), the
residual channels of largest energy (`channels`: a selection, no rotation), or a seeded random
rotation (`random`: the control, no calibration at all).

Any orthogonal Q serves the plain format (§4): the norm folding and the √(D/d) reader scale hold
for Q restricted to its first d columns whatever Q is, so every method goes through one plan.
"""

from __future__ import annotations

import numpy as np

from dimcut.calibration.pca import Covariance
from dimcut.calibration.rotations import Calibrated
from dimcut.plan import PLAIN_ROTATION, Format, Method


def channel_axes(covariance: Covariance) -> tuple[np.ndarray, np.ndarray]:
    """The identity's columns in descending order of the covariance's diagonal — each residual
    channel's energy; with the `rms` weighting the channels uses, Minitron's embedding-channel
    importance — and those energies: Q[:, :d] selects the d most energetic channels."""
    covariance.check_finite("the residual stream")
    energy = covariance.matrix.diagonal().cpu().numpy()
    order = np.argsort(-energy, kind="stable")
    return np.eye(len(energy))[:, order], energy[order]


def principal_axes(covariance: Covariance) -> tuple[np.ndarray, np.ndarray]:
    return covariance.principal_axes("the residual stream")


# How the plain procedure turns its summed covariance into the basis, by method.
CALIBRATED_BASES = {Method.PCA: principal_axes, Method.CHANNELS: channel_axes}


def random_axes(size: int, seed: int) -> np.ndarray:
    """A Haar-random orthogonal matrix: the QR factor of a seeded Gaussian matrix, each column's
    sign fixed by R's diagonal (without the fix QR's sign convention biases the distribution)."""
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((size, size)))
    return q * np.sign(np.diag(r))


def random_basis(hidden_size: int, num_layers: int, seed: int) -> Calibrated:
    """The `random` method's rotation, made from `seed` alone (no calibration text, no
    eigenvalues), with the record that identifies it."""
    record = {
        "format": Format.PLAIN.value,
        "method": Method.RANDOM.value,
        "seed": seed,
        "hidden_size": hidden_size,
        "num_layers": num_layers,
    }
    return Calibrated({PLAIN_ROTATION: random_axes(hidden_size, seed)}, {}, record)
