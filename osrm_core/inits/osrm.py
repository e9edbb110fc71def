"""OSRM (Zhang & Zhou, ACL 2025): ``A`` spans the eigenvectors of the ``r`` smallest eigenvalues of
the other tasks' feature second moment; and the reference code's variant, the null space of the
other tasks' per-sample mean features.

For orthonormal rows this ``A`` minimizes ``sum_j tr(A S_j A^T)`` over the other tasks (Ky Fan),
and the minimum equals the sum of those ``r`` eigenvalues.

References
----------
Zhang & Zhou, "Unraveling LoRA Interference: Orthogonal Subspaces for Robust Model Merging",
ACL 2025, arXiv:2505.22934; https://github.com/illidanlab/OSRM (the mean-null-space variant).
"""

from __future__ import annotations

import numpy as np
import torch

from osrm_core.errors import OsrmInputError
from osrm_core.spectra import Moment, symmetric_eigh
from osrm_core.stats import FeatureStats, check_same_layers

from .base import (
    InitMethod,
    Placement,
    Weighting,
    check_others,
    check_rank,
    combine,
    device_for,
    per_group,
    rest_moment,
    warn_if_few_tokens,
)


def osrm_subspace(
    other_stats: list[FeatureStats],
    rank: int,
    weighting: Weighting = "equal",
    moment: Moment = "second_moment",
    device: Placement = None,
) -> dict[str, torch.Tensor]:
    """OSRM's ``A`` per layer: eigenvectors of the ``rank`` smallest eigenvalues of ``S_rest``.

    Parameters
    ----------
    other_stats : list of FeatureStats
        The statistics of every task except the one being initialized.
    rank : int
    weighting : {"equal", "tokens"}
        Each other task counts the same, or in proportion to its token count.
    moment : {"second_moment", "covariance"}
    device : device, or dict of layer name to device, optional
        Where each layer's ``S_rest`` is formed and decomposed (default: where the statistics
        are). One layer's matrices are moved there at a time, so a GPU holds only those.

    Returns
    -------
    dict of str to tensor of shape (rank, d_in), float64, orthonormal rows, on that device
    """
    check_others(other_stats)
    check_same_layers(other_stats)
    if moment not in ("second_moment", "covariance"):
        raise OsrmInputError(f"moment must be 'second_moment' or 'covariance', got {moment!r}")
    warned = []

    def subspace(name: str) -> torch.Tensor:
        dev = device_for(device, name, other_stats[0].layers[name].sum.device)
        mats = [getattr(s.layers[name].to(dev), moment) for s in other_stats]
        counts = [s.layers[name].count for s in other_stats]
        rest = combine(mats, counts, weighting)
        check_rank(rank, rest.shape[0], name)
        if not warned and warn_if_few_tokens(rank, counts, rest.shape[0], name):
            warned.append(name)  # once per call, not once per layer
        return symmetric_eigh(rest).smallest(rank)

    return per_group(other_stats[0], subspace)


def osrm_mean_subspace(
    other_stats: list[FeatureStats], rank: int, weighting: Weighting = "equal", device: Placement = None
) -> dict[str, torch.Tensor]:
    """The reference code's variant: the null space of the other tasks' per-sample mean features.

    The last ``rank`` right singular vectors of the stacked per-sample means (padding excluded)
    are the eigenvectors of the ``rank`` smallest eigenvalues of ``sum m m^T``. ``device`` as in
    :func:`osrm_subspace`.
    """
    check_others(other_stats)
    check_same_layers(other_stats)

    def subspace(name: str) -> torch.Tensor:
        dev = device_for(device, name, other_stats[0].layers[name].sum.device)
        without = [s.task for s in other_stats if s.layers[name].sum_sample_mean_outer.numel() == 0]
        if without:
            raise OsrmInputError(f"statistics of task {without[0]!r} hold no per-sample means (collected with "
                                 "sample_means=False); the mean-feature variant needs them")
        mats = [
            s.layers[name].sum_sample_mean_outer.to(dev) / max(s.layers[name].n_samples, 1) for s in other_stats
        ]
        combined = combine(mats, [s.layers[name].n_samples for s in other_stats], weighting)
        check_rank(rank, combined.shape[0], name)
        return symmetric_eigh(combined).smallest(rank)

    return per_group(other_stats[0], subspace)


OSRM = InitMethod(
    "osrm",
    "OSRM: A spans the smallest-eigenvalue directions of the other tasks' second moment",
    "#EF553B",
    subspace=lambda own, others, rank, **options: osrm_subspace(others, rank, **options),
)
OSRM_MEAN = InitMethod(
    "osrm_mean",
    "the reference code's OSRM: null space of the other tasks' mean features",
    "#FFA15A",
    subspace=lambda own, others, rank, **options: osrm_mean_subspace(others, rank, **options),
)


def rest_spectrum(
    stats: dict[str, FeatureStats], task: str, weighting: Weighting = "equal", moment: Moment = "second_moment"
) -> dict[str, np.ndarray]:
    """Eigenvalues (descending) of the other tasks' combined moment, the matrix OSRM decomposes
    for ``task``: one array of length d_in per layer (layers that share an input share it)."""
    if task not in stats:
        raise OsrmInputError(f"no statistics of task {task!r}; tasks are {sorted(stats)}")
    others = [s for name, s in stats.items() if name != task]
    rest = rest_moment(others, weighting, moment)
    eigenvalues = per_group(others[0], lambda name: symmetric_eigh(rest[name]).eigenvalues_desc)
    return {n: v.numpy() for n, v in eigenvalues.items()}
