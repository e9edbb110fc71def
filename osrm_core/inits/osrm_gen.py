"""``osrm_gen``, our variant: the subspace with the most own-task feature energy per unit of the
other tasks' energy (top generalized eigenvectors), not the least energy of the others alone."""

from __future__ import annotations

import torch

from osrm_core.errors import OsrmInputError
from osrm_core.params import Interval, ParamSpec
from osrm_core.spectra import fix_signs, symmetric_eigh
from osrm_core.stats import FeatureStats, check_same_layers

from .base import InitMethod, Placement, Weighting, check_rank, device_for, per_group, rest_moment

#: osrm_gen's default trade-off eps.
DEFAULT_EPS = 1e-2


def osrm_gen_subspace(
    own_stats: FeatureStats,
    other_stats: list[FeatureStats],
    rank: int,
    eps: float = DEFAULT_EPS,
    weighting: Weighting = "equal",
    device: Placement = None,
) -> dict[str, torch.Tensor]:
    """Our variant: most own-task feature energy per unit of the other tasks' energy.

    Solves ``S_own v = mu (S_rest + eps * mean_eig(S_rest) * I) v`` and returns an orthonormal
    basis of the top ``rank`` generalized eigenvectors' span, rotated so that row ``k`` carries
    the ``k``-th most own-task energy within it.

    The generalized eigenproblem is solved by scipy on the CPU; the result is moved to
    ``device`` (as in :func:`osrm_subspace`).

    Returns
    -------
    dict of str to tensor of shape (rank, d_in), float64, orthonormal rows
    """
    if not eps > 0:
        raise OsrmInputError(f"eps must be > 0, got {eps}")
    rest = rest_moment(other_stats, weighting)
    check_same_layers([own_stats, *other_stats])

    def subspace(name: str) -> torch.Tensor:
        import scipy.linalg  # a slow import (the CLI's start-up), when solving

        s_own = own_stats.layers[name].second_moment
        d = s_own.shape[0]
        check_rank(rank, d, name)
        s_rest = rest[name]
        # Relative to the mean eigenvalue; statistics without energy (no tokens) get eps itself.
        ridge = eps * (float(torch.trace(s_rest)) / d or 1.0)
        b = s_rest + ridge * torch.eye(d, dtype=s_rest.dtype, device=s_rest.device)
        _, vecs = scipy.linalg.eigh(s_own.cpu().numpy(), b.cpu().numpy(), subset_by_index=[d - rank, d - 1])
        q, _ = torch.linalg.qr(torch.from_numpy(vecs).to(s_own))
        inner = symmetric_eigh(q.T @ s_own @ q)
        basis = q @ inner.eigenvectors.flip(1)
        return fix_signs(basis).T.contiguous().to(device_for(device, name, s_own.device))

    return per_group(own_stats, subspace)


OSRM_GEN = InitMethod(
    "osrm_gen",
    "OSRM-gen: most own-task energy per unit of the other tasks' energy",
    "#AB63FA",
    subspace=osrm_gen_subspace,
    needs_own_stats=True,
    params=(ParamSpec("eps", DEFAULT_EPS, "trade-off: the others' moment plus eps times its mean eigenvalue (small: "
                      "fewer of the others' directions; large: more own-task energy)",
                      range=(1e-6, 1e6), interval=Interval(0.0, low_open=True)),),
)
