"""SVD helpers shared by the spectral merges (TSV-M, Iso-C, Iso-CTS, CART)."""

from __future__ import annotations

import torch
from torch import Tensor


def rank_tolerance(top: float | Tensor, shape: tuple[int, int], dtype: torch.dtype) -> float:
    """``top * max(shape) * eps``: singular values at or below it are rounding noise.

    ``top`` is the largest singular value of reference; ``shape`` the (d_out, d_in) of the layer,
    also in core space, so that full and core merges keep the same singular triplets.
    """
    return float(top) * max(shape) * torch.finfo(dtype).eps


def count_above(singular_values: Tensor, tol: float) -> int:
    """How many of ``singular_values`` (shape (k,), decreasing) exceed ``tol``."""
    return int((singular_values > tol).sum())


def top_svd(x: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The top ``k`` singular triplets of ``x`` of shape (m, n).

    Returns
    -------
    U : tensor of shape (m, k)
    S : tensor of shape (k,)
    Vh : tensor of shape (k, n)
    """
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    return u[:, :k], s[:k], vh[:k]


def polar(x: Tensor) -> Tensor:
    """The orthogonal Procrustes whitening ``P Q^T`` of ``x = P diag(sigma) Q^T`` (thin SVD).

    Of all matrices with orthonormal columns (rows, for a wide ``x``), the closest to ``x`` in
    Frobenius norm; ``x`` of shape (m, k), the result of the same shape.
    """
    p, _, qh = torch.linalg.svd(x, full_matrices=False)
    return p @ qh
