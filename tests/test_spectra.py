"""Tests for eigendecompositions of feature statistics (:mod:`osrm_core.spectra`)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from osrm_core.spectra import Spectrum, feature_spectra, fix_signs, symmetric_eigh


def _psd(d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(3 * d, d, generator=g, dtype=torch.float64) * torch.linspace(
        0.1, 3.0, d, dtype=torch.float64
    )
    return X.T @ X / (3 * d)


def test_eigh_ascending_and_reconstructs() -> None:
    S = _psd(12)
    spec = symmetric_eigh(S)
    lam, V = spec.eigenvalues, spec.eigenvectors
    assert lam.dtype == V.dtype == torch.float64
    assert (lam[1:] >= lam[:-1]).all()
    torch.testing.assert_close(V @ torch.diag(lam) @ V.T, S, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(V.T @ V, torch.eye(12, dtype=torch.float64), rtol=0, atol=1e-12)
    # Same eigenvalues as numpy's float64 reference.
    np.testing.assert_allclose(lam.numpy(), np.linalg.eigvalsh(S.numpy()), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(spec.eigenvalues_desc, lam.flip(0))
    # float32 input is decomposed in float64.
    assert symmetric_eigh(S.float()).eigenvalues.dtype == torch.float64


def test_signs_are_deterministic() -> None:
    S = _psd(10, seed=3)
    spec = symmetric_eigh(S)
    V = spec.eigenvectors
    idx = V.abs().argmax(0)
    assert (V[idx, torch.arange(10)] > 0).all()
    # Flipping any columns, or decomposing an orthogonally equivalent input, gives the same vectors.
    flipped = V * torch.tensor([(-1.0) ** k for k in range(10)], dtype=torch.float64)
    torch.testing.assert_close(fix_signs(flipped), V, rtol=0, atol=0)
    again = symmetric_eigh(S.clone())
    torch.testing.assert_close(again.eigenvectors, V, rtol=0, atol=0)


def test_smallest_and_largest_rows() -> None:
    spec = symmetric_eigh(torch.diag(torch.tensor([3.0, 1.0, 2.0, 5.0], dtype=torch.float64)))
    torch.testing.assert_close(spec.eigenvalues, torch.tensor([1.0, 2.0, 3.0, 5.0], dtype=torch.float64))
    e = torch.eye(4, dtype=torch.float64)
    torch.testing.assert_close(spec.smallest(2), e[[1, 2]])
    torch.testing.assert_close(spec.largest(2), e[[3, 0]])  # largest first
    assert spec.largest(0).shape == (0, 4) and spec.smallest(0).shape == (0, 4)


def test_effective_rank_and_cumulative_energy() -> None:
    for d in (1, 7, 32):
        ident = symmetric_eigh(torch.eye(d, dtype=torch.float64))
        assert math.isclose(ident.effective_rank, d, rel_tol=1e-12)
        torch.testing.assert_close(ident.cumulative_energy, torch.arange(1, d + 1, dtype=torch.float64) / d)
    spec = symmetric_eigh(_psd(16))
    cum = spec.cumulative_energy
    assert math.isclose(float(cum[-1]), 1.0, rel_tol=1e-12)
    assert (cum[1:] >= cum[:-1]).all() and 1.0 <= spec.effective_rank <= 16
    # Naive reference: entropy of the normalized eigenvalues.
    p = np.linalg.eigvalsh(_psd(16).numpy())
    p = p / p.sum()
    assert math.isclose(spec.effective_rank, math.exp(-(p * np.log(p)).sum()), rel_tol=1e-10)
    # Rank one: effective rank 1, all energy in the first eigenvalue.
    v = torch.ones(5, 1, dtype=torch.float64)
    one = symmetric_eigh(v @ v.T)
    assert math.isclose(one.effective_rank, 1.0, rel_tol=1e-9)
    assert math.isclose(float(one.cumulative_energy[0]), 1.0, rel_tol=1e-12)
    # The zero matrix has no energy at all, and no NaN either.
    zero = Spectrum(torch.zeros(3, dtype=torch.float64), torch.eye(3, dtype=torch.float64))
    assert torch.equal(zero.cumulative_energy, torch.zeros(3, dtype=torch.float64))


def test_feature_spectra_share_groups(tiny_stats) -> None:
    stats = tiny_stats[0]
    spectra = feature_spectra(stats)
    assert list(spectra) == list(stats.layers)
    for group in stats.groups():
        assert all(spectra[name] is spectra[group[0]] for name in group)
        st = stats.layers[group[0]]
        np.testing.assert_allclose(
            spectra[group[0]].eigenvalues.numpy(),
            np.linalg.eigvalsh(st.second_moment.numpy()),
            rtol=1e-10,
            atol=1e-12,
        )
    cov = feature_spectra(stats, moment="covariance")
    first = stats.groups()[0][0]
    np.testing.assert_allclose(
        cov[first].eigenvalues.numpy(),
        np.linalg.eigvalsh(stats.layers[first].covariance.numpy()),
        rtol=1e-10,
        atol=1e-12,
    )
    with pytest.raises(ValueError, match="moment must be 'second_moment' or 'covariance', got 'gram'"):
        feature_spectra(stats, moment="gram")


@pytest.mark.parametrize(
    ("matrix", "message"),
    [
        (torch.zeros(3, 4), r"matrix must be square, got shape \(3, 4\)"),
        (torch.zeros(2, 2, 2), "matrix must be square"),
        (torch.tensor([[1.0, math.nan], [math.nan, 1.0]]), "matrix contains NaN or Inf"),
        (torch.tensor([[1.0, 2.0], [0.0, 1.0]]), "matrix is not symmetric"),
    ],
)
def test_eigh_rejects(matrix: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        symmetric_eigh(matrix)
