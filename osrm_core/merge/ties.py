"""TIES merging: trim each task's delta, elect a sign per entry, average the agreeing entries.

The tensor maths comes from ``peft.utils.merge_utils``; DARE-TIES and KnOTS-TIES reuse
:func:`ties_merge` and :func:`elect_and_merge`.

References
----------
Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023.
https://arxiv.org/abs/2306.01708
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from osrm_core.params import choice_param, share_param

from .base import MergeMethod, MergeParams, weight_rows

SignMethod = Literal["total", "frequency"]


@dataclass
class TiesParams(MergeParams):
    """Parameters of TIES (and KnOTS-TIES)."""

    density: float = share_param(
        0.5, "fraction of each task's entries kept, the largest in magnitude, in (0, 1]; 0.5 by default "
        "because LoRA deltas are low-rank and dense")
    majority_sign_method: SignMethod = choice_param(
        "total", "sign election per entry: 'total' (sign of the sum of values) or 'frequency' (sign held by "
        "more tasks)")


def trim_by_magnitude(delta: Tensor, density: float) -> Tensor:
    """Zero all but the ``int(density * numel)`` largest-magnitude entries (any shape)."""
    if density >= 1.0:
        return delta
    # peft's own functions, imported when used (peft is a slow import for the command line)
    from peft.utils.merge_utils import magnitude_based_pruning

    return magnitude_based_pruning(delta, density)


def elect_and_merge(stacked: Tensor, majority_sign_method: SignMethod = "total") -> Tensor:
    """Elect a sign per entry and average the entries that carry it.

    Parameters
    ----------
    stacked : tensor of shape (T, ...)
        Task tensors stacked on dimension 0; zeros never count as agreeing.
    majority_sign_method : {"total", "frequency"}

    Returns
    -------
    tensor of shape (...); entries where no task agrees are 0
    """
    from peft.utils.merge_utils import calculate_majority_sign_mask, disjoint_merge

    mask = calculate_majority_sign_mask(stacked, method=majority_sign_method)
    return disjoint_merge(stacked, mask)


def ties_merge(
    deltas: list[Tensor], density: float, majority_sign_method: SignMethod = "total"
) -> Tensor:
    """TIES on T tensors of the same shape: trim per task, elect sign, disjoint mean."""
    trimmed = torch.stack([trim_by_magnitude(d, density) for d in deltas])
    return elect_and_merge(trimmed, majority_sign_method)


class Ties(MergeMethod):
    """TIES merging of the deltas of shape (d_out, d_in); trimming is per task and per layer."""

    name = "ties"
    summary = "per entry: keep each task's largest entries, elect a sign, average the entries that agree (full rank)"
    reference = "https://arxiv.org/abs/2306.01708"
    params_type = TiesParams
    uses_density = True

    def prepare_layer(self, deltas: list[Tensor], gram: list[Tensor] | None, generator: torch.Generator,
                      shape: tuple[int, int]) -> Tensor:
        """The trimmed deltas stacked, shape (T, d_out, d_in): ``trim(w D) = w trim(D)`` for
        ``w >= 0``, so one trimming serves every weight vector."""
        return torch.stack([trim_by_magnitude(d, self.params.density) for d in deltas])

    def combine_prepared(self, prepared: Tensor, weights: list[float], shape: tuple[int, int]) -> Tensor:
        return elect_and_merge(weight_rows(prepared, weights), self.params.majority_sign_method)

