"""RegMean: the delta that best reproduces every task's layer outputs on its own inputs.

With ``G_i = X_i^T X_i`` the Gram matrix of task i's inputs to the layer (token count times the
uncentred second moment), RegMean solves ``min_W sum_i ||X_i W^T - X_i Delta_W_i^T||^2``:

    W* = (sum_i Delta_W_i G_i~) (sum_i G_i~)^{-1},   G_i~ = alpha G_i + (1 - alpha) diag(G_i).

Merging the full weights ``W0 + Delta_W_i`` gives ``W0 + W*``, so merging deltas is the same.
``W*`` is a weighted average of the deltas (identical Grams give the plain mean), hence
``lam = 1`` is plain RegMean, unlike task arithmetic where ``lam = 1`` is the sum.

References
----------
Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language Models", ICLR 2023.
https://arxiv.org/abs/2212.09849
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from osrm_core.errors import OsrmInputError
from osrm_core.params import Interval, number_param

from .base import MergeMethod, MergeParams

#: Ridge added to the diagonal of the summed Gram matrix, relative to each entry.
RIDGE = 1e-8


@dataclass
class RegMeanParams(MergeParams):
    """Parameters of RegMean."""

    alpha: float = number_param(
        0.9, "scale of the off-diagonal Gram entries, in [0, 1]: 1 is exact RegMean, 0 keeps only the "
        "diagonal (a per-input-feature weighted mean)", Interval(0.0, 1.0))


def regmean_merge(deltas: list[Tensor], grams: list[Tensor], alpha: float = 0.9) -> Tensor:
    """Closed-form RegMean in float64.

    Parameters
    ----------
    deltas : list of T tensors of shape (d_out, d_in)
    grams : list of T tensors of shape (d_in, d_in)
        Gram matrices of each task's inputs to the layer.
    alpha : float in [0, 1]
        Off-diagonal scaling of the Grams.

    Returns
    -------
    tensor of shape (d_out, d_in), float64
    """
    d_out, d_in = deltas[0].shape
    f64 = {"dtype": torch.float64, "device": deltas[0].device}
    weighted = torch.zeros(d_out, d_in, **f64)
    total = torch.zeros(d_in, d_in, **f64)
    for delta, gram in zip(deltas, grams, strict=True):
        # alpha G + (1 - alpha) diag(G) with one (d_in, d_in) temporary (Grams of wide layers are
        # large), the diagonal summed as that formula sums it.
        g = gram.to(**f64)
        diagonal = alpha * torch.diagonal(g) + (1.0 - alpha) * torch.diagonal(g)
        g = alpha * g
        g.diagonal().copy_(diagonal)
        weighted += delta.to(**f64) @ g
        total += g
    # The ridge keeps the solve defined for singular Grams (alpha = 1 with fewer tokens than
    # d_in, or an input feature that is always 0). It is relative to each diagonal entry, not to
    # their mean: activations have outlier features orders of magnitude apart, and a ridge of
    # the mean's size would swamp the small ones. Features that are 0 everywhere get the mean's
    # size; their columns of the result are 0.
    diag = torch.diagonal(total)
    ridge = RIDGE * torch.where(diag > 0, diag, diag.mean())
    diag += ridge
    return torch.linalg.solve(total, weighted, left=False)  # X total = weighted


class RegMean(MergeMethod):
    """RegMean merge; needs one Gram matrix of shape (d_in, d_in) per task at each layer."""

    name = "regmean"
    summary = "the least-squares merge that keeps each task's layer outputs (needs each task's input Gram matrices)"
    reference = "https://arxiv.org/abs/2212.09849"
    params_type = RegMeanParams
    needs_gram = True

    def _check_gram(self, n_tasks: int, d_in: int, gram: Sequence[Tensor] | None, at: str) -> None:
        super()._check_gram(n_tasks, d_in, gram, at)
        diag = torch.stack([torch.diagonal(g).to(torch.float64) for g in gram])
        if bool((diag < 0).any()):
            raise OsrmInputError(f"Gram matrices{at} have negative diagonal entries: not Gram matrices")
        if not bool((diag > 0).any()):
            raise OsrmInputError(f"Gram matrices{at} are all zero: no input statistics to weight by")

    def combine(self, deltas: list[Tensor], gram: list[Tensor] | None, shape: tuple[int, int]) -> Tensor:
        return regmean_merge(deltas, gram, self.params.alpha)
