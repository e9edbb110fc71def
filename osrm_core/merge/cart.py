"""CART: Centered Arithmetic with Rank-reduced Task vectors.

Weight averaging is task arithmetic centred at the average: ``theta_avg + sum_i (theta_i -
theta_avg) / T``. CART keeps the average and adds back each centred task delta only through its
top singular directions:

    merge = mean_i Delta_i + centred_scale * sum_i SVD_k(Delta_i - mean_j Delta_j).

(The sum of the full centred deltas is zero, so the low-rank approximation is what CART adds.)

References
----------
Choi et al., "Revisiting Weight Averaging for Model Merging", 2024.
https://arxiv.org/abs/2412.12153 (reference code: JH-GEECS/CART).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from osrm_core.params import Interval, number_param, share_param

from .base import MergeMethod, MergeParams
from .spectral import count_above, rank_tolerance


@dataclass
class CartParams(MergeParams):
    """Parameters of CART."""

    rank_fraction: float = share_param(
        0.08, "share of each centred delta's numerical rank kept by its SVD, in (0, 1] (the paper's best "
        "rank is about 8%); 1 keeps all, which gives the plain average")
    centred_scale: float = number_param(
        1.0, "scale of the sum of the rank-reduced centred deltas added to the average, in [0, 10] (the "
        "paper's lambda); lam scales the whole merge", Interval(0.0, 10.0))


class Cart(MergeMethod):
    """CART on deltas of shape (d_out, d_in).

    The reference code keeps a fixed share of min(d_out, d_in) singular triplets per centred
    task vector of a fully fine-tuned model, which is numerically full rank. A centred LoRA
    delta has rank at most the sum of the adapters' ranks, so that share would keep all of it
    and CART would be the plain average; ours keeps ``ceil(rank_fraction * r_i)`` triplets with
    ``r_i`` the numerical rank of the centred delta (tolerance from the layer's (d_out, d_in)
    and the largest centred singular value), which is the paper's share of the directions that
    exist. ``lam`` scales the whole merge (with ``lam = 1`` the average stays the average).
    """

    name = "cart"
    low_rank = True
    summary = "the mean of the deltas plus a low-rank part of each delta's difference from it"
    reference = "https://arxiv.org/abs/2412.12153"
    params_type = CartParams

    def combine(self, deltas: list[Tensor], gram: list[Tensor] | None, shape: tuple[int, int]) -> Tensor:
        mean = torch.stack(deltas).mean(dim=0)
        svds = [torch.linalg.svd(d - mean, full_matrices=False) for d in deltas]
        top = max(float(s.max()) if s.numel() else 0.0 for _, s, _ in svds)
        if top == 0.0:  # all deltas equal: the average is the merge
            return mean
        tol = rank_tolerance(top, shape, mean.dtype)
        low_rank = torch.zeros_like(mean)
        for u, s, vh in svds:
            k = math.ceil(self.params.rank_fraction * count_above(s, tol))
            low_rank += (u[:, :k] * s[:k]) @ vh[:k]
        return mean + self.params.centred_scale * low_rank
