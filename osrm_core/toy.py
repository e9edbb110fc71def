"""The teaching toy of the Learn page: zero-mean Gaussian task clouds in 2-D or 3-D, the ``A`` of
standard init (random orthonormal) and of OSRM (smallest eigenvectors of the other tasks'
summed moment), and the interference ``||A h||`` of each on each task."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from osrm_core.errors import OsrmInputError


def _rotation(dim: int, angle: float, tilt: float = 0.0) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    if dim == 2:
        return np.array([[c, -s], [s, c]])
    rz = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    ct, st_ = np.cos(tilt), np.sin(tilt)
    rx = np.array([[1.0, 0.0, 0.0], [0.0, ct, -st_], [0.0, st_, ct]])
    return rz @ rx


def toy_moments(
    n_tasks: int = 2, angle_deg: float = 60.0, spread: float = 0.2, dim: int = 2
) -> list[np.ndarray]:
    """Second moments ``E[h h^T]`` of ``n_tasks`` zero-mean Gaussian clouds.

    Each cloud has standard deviation 1 along its main axis and ``spread`` across it; task
    ``k``'s main axis is turned by ``k * angle_deg`` (in 3-D also tilted out of the plane).

    Returns
    -------
    list of arrays of shape (dim, dim)
    """
    if dim not in (2, 3):
        raise OsrmInputError(f"dim must be 2 or 3, got {dim}")
    if not 2 <= n_tasks <= 3:
        raise OsrmInputError(f"n_tasks must be 2 or 3, got {n_tasks}")
    if not 0 < spread <= 1:
        raise OsrmInputError(f"spread must be in (0, 1], got {spread}")
    stds = np.array([1.0, spread] if dim == 2 else [1.0, spread, spread * 0.5])
    out = []
    for k in range(n_tasks):
        a = np.radians(angle_deg) * k
        R = _rotation(dim, a, tilt=a / 2)
        out.append(R @ np.diag(stds**2) @ R.T)
    return out


def toy_samples(moments: Sequence[np.ndarray], n: int = 200, seed: int = 0) -> list[np.ndarray]:
    """``n`` points of each cloud, arrays of shape (n, dim) (drawn from the exact moments)."""
    rng = np.random.default_rng(seed)
    return [rng.multivariate_normal(np.zeros(m.shape[0]), m, size=n) for m in moments]


def toy_adapters(
    moments: Sequence[np.ndarray], target: int, rank: int = 1, seed: int = 0
) -> dict[str, np.ndarray]:
    """The ``A`` of task ``target``: a random orthonormal one (standard init's row space) and
    OSRM's (eigenvectors of the ``rank`` smallest eigenvalues of the other tasks' summed moment).

    Returns
    -------
    dict with ``"standard"`` and ``"osrm"``, arrays of shape (rank, dim) with orthonormal rows
    """
    dim = moments[0].shape[0]
    if not 1 <= rank < dim:
        raise OsrmInputError(f"rank must be in 1..{dim - 1}, got {rank}")
    rest = sum(m for i, m in enumerate(moments) if i != target)
    _, vecs = np.linalg.eigh(rest)
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((dim, rank)))
    return {"standard": q.T, "osrm": vecs[:, :rank].T}


def toy_interference(A: np.ndarray, moments: Sequence[np.ndarray]) -> list[float]:
    """``sqrt(E||A h_k||^2) = sqrt(tr(A S_k A^T))`` for every task ``k``."""
    return [float(np.sqrt(max(np.trace(A @ m @ A.T), 0.0))) for m in moments]


def toy_table(
    adapters: Mapping[str, np.ndarray], moments: Sequence[np.ndarray], names: Sequence[str], target: int
) -> pd.DataFrame:
    """``||A h||`` (RMS) of each adapter on each toy task, and on all the other tasks together
    (``sqrt(sum_{k != target} E||A h_k||^2)``, the interference that merging adds)."""
    rows = []
    for label, A in adapters.items():
        norms = toy_interference(A, moments)
        others = float(np.sqrt(sum(v**2 for k, v in enumerate(norms) if k != target)))
        rows.append(
            {"A": label, **{f"||A h|| on {n}": v for n, v in zip(names, norms)}, "other tasks": others}
        )
    return pd.DataFrame(rows)
