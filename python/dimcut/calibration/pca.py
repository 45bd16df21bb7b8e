"""Covariance accumulation and its eigendecomposition (the PCA of one residual signal)."""

from __future__ import annotations

import numpy as np
import torch

from dimcut._core import DimcutError


class Covariance:
    """H = Σ x xᵀ over tokens in float64 (uncentred), accumulated as one flattened GEMM."""

    def __init__(self, width: int, device: torch.device | str = "cpu"):
        self.matrix = torch.zeros(width, width, dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor) -> None:
        flat = x.reshape(-1, x.shape[-1]).to(self.matrix.device, torch.float64)
        self.matrix.addmm_(flat.T, flat)

    def principal_axes(self, what: str = "a signal") -> tuple[np.ndarray, np.ndarray]:
        """Eigenvectors (columns) sorted by descending eigenvalue, and the eigenvalues."""
        if not torch.isfinite(self.matrix).all():
            raise DimcutError(
                f"calibration: {what} has NaN or Inf activations; the model's weights or the "
                "calibration text overflow (check the checkpoint for non-finite weights)"
            )
        values, vectors = _eigh(self.matrix)
        # eigh returns ascending order
        return vectors.flip(-1).cpu().numpy(), values.flip(-1).clamp_min(0).cpu().numpy()


# Below this width a multi-threaded eigh spends its time in thread barriers: on a busy machine
# it measured 50× slower than one thread (SmolLM2's 576-wide covariances: 2.5 s vs 0.05 s).
SINGLE_THREAD_EIGH_WIDTH = 2048


def _eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if matrix.shape[0] > SINGLE_THREAD_EIGH_WIDTH or matrix.is_cuda:
        return torch.linalg.eigh(matrix)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return torch.linalg.eigh(matrix)
    finally:
        torch.set_num_threads(threads)
