"""TSV-M: Task Singular Vectors merge, the tasks' top singular vectors whitened together.

Per layer, each task's delta ``Delta_i = U_i S_i V_i^T`` keeps its top ``k`` singular triplets;
the kept left vectors of all tasks are stacked into ``U = [U_1 | ... | U_T]`` (d_out, K), the
right ones into ``V = [V_1 | ... | V_T]`` (d_in, K), and the singular values into ``S`` (K,).
The stacks are whitened by orthogonal Procrustes, ``U_perp = P Q^T`` from ``U = P Sigma Q^T``
(the closest matrix with orthonormal columns), likewise ``V_perp``, and the merge is
``U_perp diag(S) V_perp^T``. Tasks whose singular vectors are mutually orthogonal come back as
their sum; overlapping ones are decorrelated, which removes the interference between them.

References
----------
Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging", CVPR
2025. https://arxiv.org/abs/2412.00081 (reference code: AntoAndGar/task_singular_vectors).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from osrm_core.params import share_param

from .base import MergeMethod, MergeParams
from .spectral import count_above, polar, rank_tolerance, top_svd


@dataclass
class TsvParams(MergeParams):
    """Parameters of TSV-M."""

    sv_fraction: float = share_param(
        1.0, "share of min(d_out, d_in) singular triplets kept over all tasks, in (0, 1]: each task keeps its "
        "top sv_fraction * min(d_out, d_in) / T (at most its numerical rank); 1 is the reference's choice")


@dataclass
class TsvPrepared:
    """Each task's kept triplets, and the whitened stacks per set of tasks with a weight > 0.

    Attributes
    ----------
    u : list of T tensors of shape (m, k_i)
    s : list of T tensors of shape (k_i,)
    vh : list of T tensors of shape (k_i, n)
    zero : tensor of shape (m, n)
        The merge of nothing.
    whitened : dict
        Tuple of the tasks kept -> ``(U_perp, V_perp^T)``; the whitening does not depend on the
        weights, only on which tasks take part.
    """

    u: list[Tensor]
    s: list[Tensor]
    vh: list[Tensor]
    zero: Tensor
    whitened: dict[tuple[int, ...], tuple[Tensor, Tensor]] = field(default_factory=dict)


class TsvMerge(MergeMethod):
    """TSV-M on deltas of shape (d_out, d_in).

    The reference code keeps ``int(min(d_out, d_in) / T)`` triplets per task (``sv_fraction``
    1) and whitens the zero-padded stacks of size min(d_out, d_in); ours keeps at most each
    delta's numerical rank, so a LoRA delta of rank r contributes r triplets and no noise
    directions (the padded zero columns only multiply zero singular values there), and the
    tolerance uses the layer's (d_out, d_in) so that a merge in core space keeps the same
    triplets. The task weights scale the singular values: the SVD is done once per task.
    A task of weight 0 is left out of the whitening, like a zero delta (rank 0). The reference
    scales the merge by ``alpha`` (1 by default), which is ``lam`` here.
    """

    name = "tsv_m"
    low_rank = True
    summary = "each task's top singular vectors, decorrelated across tasks (Procrustes) before they are summed"
    reference = "https://arxiv.org/abs/2412.00081"
    params_type = TsvParams

    def prepare_layer(self, deltas: list[Tensor], gram: list[Tensor] | None, generator: torch.Generator,
                      shape: tuple[int, int]) -> TsvPrepared:
        """One SVD per task, truncated to ``min(sv_fraction min(shape) / T, numerical rank)``."""
        budget = int(self.params.sv_fraction * min(shape) / len(deltas))
        us, ss, vhs = [], [], []
        for d in deltas:
            u, s, vh = top_svd(d, max(1, budget))
            k = count_above(s, rank_tolerance(s.max() if s.numel() else 0.0, shape, d.dtype)) if budget else 0
            us.append(u[:, :k])
            ss.append(s[:k])
            vhs.append(vh[:k])
        return TsvPrepared(us, ss, vhs, torch.zeros_like(deltas[0]))

    def combine_prepared(self, prepared: TsvPrepared, weights: list[float], shape: tuple[int, int]) -> Tensor:
        kept = tuple(i for i, w in enumerate(weights) if w > 0 and prepared.s[i].numel() > 0)
        if not kept:
            return prepared.zero
        if kept not in prepared.whitened:
            u = torch.cat([prepared.u[i] for i in kept], dim=1)
            vh = torch.cat([prepared.vh[i] for i in kept], dim=0)
            prepared.whitened[kept] = (polar(u), polar(vh))
        u_perp, vh_perp = prepared.whitened[kept]
        s = torch.cat([weights[i] * prepared.s[i] for i in kept])
        return (u_perp * s) @ vh_perp
