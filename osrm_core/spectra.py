"""Eigendecomposition of feature statistics, with deterministic eigenvector signs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from osrm_core.errors import OsrmInputError
from osrm_core.stats import FeatureStats

Moment = Literal["second_moment", "covariance"]


@dataclass
class Spectrum:
    """Eigenvalues and eigenvectors of a symmetric positive semi-definite matrix.

    Attributes
    ----------
    eigenvalues : tensor of shape (d,), float64, ascending
    eigenvectors : tensor of shape (d, d), float64; column ``k`` belongs to ``eigenvalues[k]``
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor

    @property
    def eigenvalues_desc(self) -> torch.Tensor:
        return self.eigenvalues.flip(0)

    def smallest(self, k: int) -> torch.Tensor:
        """The eigenvectors of the ``k`` smallest eigenvalues as rows, shape (k, d)."""
        return self.eigenvectors[:, :k].T

    def largest(self, k: int) -> torch.Tensor:
        """The eigenvectors of the ``k`` largest eigenvalues as rows (largest first), shape (k, d)."""
        return self.eigenvectors[:, -k:].flip(1).T if k > 0 else self.eigenvectors[:, :0].T

    @property
    def cumulative_energy(self) -> torch.Tensor:
        """Share of the trace in the top-k eigenvalues, for k = 1..d, shape (d,)."""
        lam = self.eigenvalues_desc.clamp_min(0)
        return torch.cumsum(lam, 0) / lam.sum().clamp_min(torch.finfo(lam.dtype).tiny)

    @property
    def effective_rank(self) -> float:
        """``exp`` of the entropy of the normalized eigenvalues (Roy & Vetterli, 2007)."""
        lam = self.eigenvalues.clamp_min(0)
        p = lam / lam.sum().clamp_min(torch.finfo(lam.dtype).tiny)
        p = p[p > 0]
        return float(torch.exp(-(p * p.log()).sum()))


def symmetric_eigh(matrix: torch.Tensor) -> Spectrum:
    """``eigh`` in float64 with each eigenvector's largest-magnitude entry made positive.

    Repeated eigenvalues (equal up to rounding: the null space of statistics from fewer tokens
    than the width, say) leave ``eigh`` free to return any basis of their eigenspace, and which
    one it returns changes with the last bits of the input. Such a basis is replaced by a
    canonical one (:func:`canonical_basis`), so that OSRM's choice among equally good
    directions is a fixed rule, not an accident of LAPACK.

    Raises ValueError for a non-square, non-finite or non-symmetric matrix.
    """
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise OsrmInputError(f"matrix must be square, got shape {tuple(matrix.shape)}")
    m = matrix.to(torch.float64)
    if not torch.isfinite(m).all():
        raise OsrmInputError("matrix contains NaN or Inf")
    scale = m.abs().max().clamp_min(1e-300)
    if (m - m.T).abs().max() > 1e-8 * scale:
        raise OsrmInputError("matrix is not symmetric")
    values, vectors = torch.linalg.eigh((m + m.T) / 2)
    return Spectrum(values, fix_signs(_canonical_eigenspaces(values, vectors)))


#: Eigenvalues closer than this many float64 epsilons times ``d * max|lambda|`` count as equal.
REPEATED_TOL = 64.0


def _canonical_eigenspaces(values: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """``vectors`` with the basis of every repeated eigenvalue's eigenspace made canonical."""
    d = values.shape[0]
    if d < 2:
        return vectors
    tol = REPEATED_TOL * d * torch.finfo(torch.float64).eps * float(values.abs().max())
    breaks = (torch.diff(values) > tol).nonzero().flatten().tolist()
    starts, ends = [0, *(b + 1 for b in breaks)], [*(b + 1 for b in breaks), d]
    clusters = [(a, b) for a, b in zip(starts, ends) if b - a > 1]
    if not clusters:
        return vectors
    out = vectors.clone()
    for a, b in clusters:
        out[:, a:b] = canonical_basis(vectors[:, a:b].cpu()).to(out)
    return out


def canonical_basis(basis: torch.Tensor, tie: float = 1e-6) -> torch.Tensor:
    """An orthonormal basis of the span of ``basis``'s columns that depends on the span only.

    Gram-Schmidt of the columns ``P e_k`` of the projector ``P`` onto the span, taken greedily
    (the one with the largest remaining norm; near-ties, within ``tie``, go to the lowest
    index ``k``), each vector's sign such that it points along its ``P e_k``. Any orthonormal
    basis of the same span gives the same result (up to rounding).

    Parameters
    ----------
    basis : tensor of shape (d, m), orthonormal columns

    Returns
    -------
    tensor of shape (d, m), float64, orthonormal columns
    """
    V = basis.to(torch.float64)
    # Coordinates of P e_k in the basis V: column k of V^T; their norms and inner products
    # (the Gram matrix V V^T = P) do not depend on which basis of the span V is.
    W = V.T.clone()
    q = W.new_empty(W.shape[0], W.shape[0])
    for j in range(W.shape[0]):
        norms = (W * W).sum(0)
        k = int((norms >= norms.max() * (1 - tie)).nonzero()[0])
        q[:, j] = W[:, k] / norms[k].sqrt()
        W -= torch.outer(q[:, j], q[:, j] @ W)
    return V @ q


def fix_signs(vectors: torch.Tensor) -> torch.Tensor:
    """Flip columns so that each one's entry of largest magnitude is positive (sklearn's rule)."""
    idx = vectors.abs().argmax(0)
    signs = torch.sign(vectors[idx, torch.arange(vectors.shape[1], device=vectors.device)])
    signs[signs == 0] = 1
    return vectors * signs


def feature_spectra(stats: FeatureStats, moment: Moment = "second_moment") -> dict[str, Spectrum]:
    """Spectrum of each layer's second moment (or centred covariance), keyed like ``stats.layers``.

    Layers that share statistics share the spectrum object (computed once).
    """
    if moment not in ("second_moment", "covariance"):
        raise OsrmInputError(f"moment must be 'second_moment' or 'covariance', got {moment!r}")
    out: dict[str, Spectrum] = {}
    for names in stats.groups():
        spec = symmetric_eigh(getattr(stats.layers[names[0]], moment))
        for name in names:
            out[name] = spec
    return out
