"""Covariance accumulation and its eigendecomposition (the PCA of one residual signal)."""

from __future__ import annotations

import enum

import numpy as np
import torch

from dimcut._core import DimcutError
from dimcut.runtime import Choice


@enum.unique
class Weighting(Choice):
    """How the plain format's one rotation weighs the residual signals it is the PCA of.

    Every reader sees the residual through an RMSNorm, i.e. divided by its RMS, while the raw
    sum lets the layers and tokens with the largest residual norms decide the rotation.
    """

    RAW = "raw"  # Σ over signals and tokens of x xᵀ
    RMS = "rms"  # each token scaled to unit RMS first: what the norm-fed readers see
    TRACE = "trace"  # each signal's covariance divided by its trace: every layer counts equally


class Covariance:
    """H = Σ x xᵀ over tokens in float64 (uncentred), accumulated as one flattened GEMM; with
    `unit_rms`, of x / rms(x)."""

    def __init__(self, width: int, device: torch.device | str = "cpu", unit_rms: bool = False):
        self.matrix = torch.zeros(width, width, dtype=torch.float64, device=device)
        self.unit_rms = unit_rms

    def add(self, x: torch.Tensor) -> None:
        flat = x.reshape(-1, x.shape[-1]).to(self.matrix.device, torch.float64)
        if self.unit_rms:
            flat = flat * torch.rsqrt(flat.pow(2).mean(-1, keepdim=True).clamp_min(1e-30))
        self.matrix.addmm_(flat.T, flat)

    def add_signal(self, signal: Covariance, weighting: Weighting) -> None:
        """Sum another signal's covariance into this one, normalised as `weighting` says."""
        scale = 1.0
        if weighting is Weighting.TRACE:
            scale = 1.0 / max(float(signal.matrix.trace()), 1e-300)
        self.matrix.add_(signal.matrix, alpha=scale)

    def principal_axes(self, what: str = "a signal") -> tuple[np.ndarray, np.ndarray]:
        """Eigenvectors (columns) sorted by descending eigenvalue, and the eigenvalues."""
        self.check_finite(what)
        values, vectors = _eigh(self.matrix)
        # eigh returns ascending order
        return vectors.flip(-1).cpu().numpy(), values.flip(-1).clamp_min(0).cpu().numpy()

    def check_finite(self, what: str) -> None:
        if not torch.isfinite(self.matrix).all():
            raise DimcutError(
                f"calibration: {what} has NaN or Inf activations; the model's weights or the "
                "calibration text overflow (check the checkpoint for non-finite weights)"
            )

    def spectrum(self) -> np.ndarray:
        """The eigenvalues alone, descending (cheaper than `principal_axes`)."""
        values = _eigh(self.matrix, vectors=False)
        return values.flip(-1).clamp_min(0).cpu().numpy()


# Below this width a multi-threaded eigh spends its time in thread barriers: on a busy machine
# it measured 50× slower than one thread (SmolLM2's 576-wide covariances: 2.5 s vs 0.05 s).
SINGLE_THREAD_EIGH_WIDTH = 2048


def _eigh(matrix: torch.Tensor, vectors: bool = True):
    solve = torch.linalg.eigh if vectors else torch.linalg.eigvalsh
    if matrix.shape[0] > SINGLE_THREAD_EIGH_WIDTH or matrix.is_cuda:
        return solve(matrix)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return solve(matrix)
    finally:
        torch.set_num_threads(threads)
