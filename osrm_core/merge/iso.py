"""Iso-C and Iso-CTS: isotropic merging, the spectrum of the merge flattened to its mean.

Iso-C takes the task-arithmetic sum ``M = sum_i Delta_i = U S V^T`` and replaces every singular
value by their mean: ``mean(S) U V^T``. No direction of the merge dominates, so tasks that live
in its weaker directions are no longer drowned by those in the stronger ones.

Iso-CTS ("common and task-specific") keeps the top ``common_space_fraction`` of the budget of
singular directions from ``M`` (the common subspace), fills the rest with each task's own top
directions taken from its delta projected off the common subspace, ``(I - U_c U_c^T) Delta_i``,
orthogonalizes the combined left and right bases (orthogonal Procrustes, ``P Q^T``), and gives
every direction the mean of the combined singular values.

References
----------
Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific
Subspaces", ICML 2025. https://arxiv.org/abs/2502.04959 (reference code:
danielm1405/iso-merging).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from osrm_core.params import Interval, number_param

from .base import MergeMethod, MergeParams
from .spectral import count_above, polar, rank_tolerance, top_svd


def _sum_svd(deltas: list[Tensor], shape: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
    """Singular triplets of ``sum_i Delta_i`` above rounding noise: U (m, k), S (k,), Vh (k, n)."""
    u, s, vh = torch.linalg.svd(torch.stack(deltas).sum(dim=0), full_matrices=False)
    k = count_above(s, rank_tolerance(s.max(), shape, s.dtype)) if s.numel() else 0
    return u[:, :k], s[:k], vh[:k]


class IsoC(MergeMethod):
    """Iso-C on deltas of shape (d_out, d_in): ``mean(S) U V^T`` of the sum's SVD.

    The reference code flattens all min(d_out, d_in) singular values of the sum, so a sum of
    rank R < min(d) gets its spectrum averaged with zeros and its null directions filled with
    arbitrary singular vectors (a full-rank merge of noise directions). Ours keeps the singular
    values above the numerical-rank tolerance (computed with the layer's (d_out, d_in), also in
    core space) and gives each the mean of those: the merge keeps the sum's rank and row and
    column spaces. The scale of the merge is ``lam``, the reference's ``alpha``.
    """

    name = "iso_c"
    low_rank = True
    summary = "the sum's singular vectors with one flat singular value (their mean): no direction dominates"
    reference = "https://arxiv.org/abs/2502.04959"

    def combine(self, deltas: list[Tensor], gram: list[Tensor] | None, shape: tuple[int, int]) -> Tensor:
        u, s, vh = _sum_svd(deltas, shape)
        if s.numel() == 0:
            return torch.zeros_like(deltas[0])
        return s.mean() * (u @ vh)


@dataclass
class IsoCtsParams(MergeParams):
    """Parameters of Iso-CTS."""

    common_space_fraction: float = number_param(
        0.8, "share of the rank budget given to the common subspace (top singular vectors of the sum), in "
        "[0, 1]; the rest is split evenly among the tasks' own directions", Interval(0.0, 1.0))


class IsoCts(MergeMethod):
    """Iso-CTS on deltas of shape (d_out, d_in).

    Like the reference code: the common size is ``int(budget * common_space_fraction)``, each
    task gets ``round((budget - common) / T)`` directions and the common size is then set to
    the rest of the budget; task-specific directions come from the SVD of the task's delta
    minus its projection on the common left singular vectors; both stacks are whitened by
    orthogonal Procrustes; every singular value becomes the mean of the combined ones. The
    reference's budget is min(d_out, d_in); ours is the numerical rank of the sum (for LoRA
    deltas a budget of min(d) would put the whole sum in the common subspace and leave the
    tasks nothing of their own: Iso-CTS would be Iso-C), and a task keeps only directions above
    the rounding noise of the sum. The reference's ``alpha`` (tuned per model) is ``lam`` here.
    """

    name = "iso_cts"
    low_rank = True
    summary = "Iso-C on the sum's main subspace plus each task's own directions outside it"
    reference = "https://arxiv.org/abs/2502.04959"
    params_type = IsoCtsParams

    def combine(self, deltas: list[Tensor], gram: list[Tensor] | None, shape: tuple[int, int]) -> Tensor:
        u, s, vh = _sum_svd(deltas, shape)
        budget = s.numel()
        if budget == 0:
            return torch.zeros_like(deltas[0])
        common = int(budget * self.params.common_space_fraction)
        per_task = round((budget - common) / len(deltas))
        common = max(0, budget - per_task * len(deltas))
        uc, sc, vhc = u[:, :common], s[:common], vh[:common]
        tol = rank_tolerance(s.max(), shape, s.dtype)
        us, ss, vhs = [uc], [sc], [vhc]
        for d in deltas if per_task > 0 else []:
            residual = d - uc @ (uc.T @ d)
            ut, st, vht = top_svd(residual, per_task)
            k = count_above(st, tol)
            us.append(ut[:, :k])
            ss.append(st[:k])
            vhs.append(vht[:k])
        u_all, s_all, vh_all = torch.cat(us, dim=1), torch.cat(ss), torch.cat(vhs, dim=0)
        return s_all.mean() * (polar(u_all) @ polar(vh_all))
