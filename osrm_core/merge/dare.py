"""DARE: drop entries at random and rescale, then sum (``dare_linear``) or TIES (``dare_ties``).

Each entry of each task's delta is kept with probability ``density`` and divided by
``density``, so the expectation of the dropped delta is the delta itself. The draws come from a
``torch.Generator`` (peft's ``random_pruning`` uses the global RNG, which this package never
seeds), one Bernoulli tensor per task in task order, drawn in float64 on the generator's device
so that the same seed gives the same mask whatever the dtype or device of the deltas.

References
----------
Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a
Free Lunch", ICML 2024. https://arxiv.org/abs/2311.03099
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from osrm_core.params import choice_param, share_param

from .base import MergeMethod, MergeParams, weight_rows
from .ties import SignMethod, elect_and_merge


@dataclass
class DareParams(MergeParams):
    """Parameters of DARE with task arithmetic."""

    density: float = share_param(
        0.5, "probability of keeping each entry, in (0, 1]; kept entries are divided by it (drop rate "
        "p = 1 - density)")


@dataclass
class DareTiesParams(DareParams):
    """Parameters of DARE with TIES sign election."""

    majority_sign_method: SignMethod = choice_param(
        "total", "sign election per entry: 'total' or 'frequency' (see TIES)")


def random_pruning(
    delta: Tensor, density: float, generator: torch.Generator, *, rescale: bool = True
) -> Tensor:
    """Keep each entry with probability ``density`` (divided by it when ``rescale``).

    Parameters
    ----------
    delta : tensor of any shape
    density : float in (0, 1]
        At 1 the delta is returned as is and no numbers are drawn.
    generator : torch.Generator
        Source of the Bernoulli draws.

    Returns
    -------
    tensor of the shape, dtype and device of ``delta``
    """
    if density >= 1.0:
        return delta
    probs = torch.full(delta.shape, density, dtype=torch.float64, device=generator.device)
    keep = torch.bernoulli(probs, generator=generator).to(device=delta.device, dtype=delta.dtype)
    pruned = delta * keep
    return pruned / density if rescale else pruned


class _Dare(MergeMethod):
    """DARE sparsification followed by a consensus step chosen by the subclass."""

    reference = "https://arxiv.org/abs/2311.03099"
    uses_density = True
    consensus: ClassVar[Literal["sum", "ties"]]

    def prepare_layer(self, deltas: list[Tensor], gram: list[Tensor] | None, generator: torch.Generator,
                      shape: tuple[int, int]) -> Tensor:
        """The dropped, rescaled deltas stacked, shape (T, d_out, d_in): the masks are drawn once,
        so every weight vector merged from one preparation sees the same drops."""
        density = self.params.density
        return torch.stack([random_pruning(d, density, generator) for d in deltas])

    def combine_prepared(self, prepared: Tensor, weights: list[float], shape: tuple[int, int]) -> Tensor:
        dropped = weight_rows(prepared, weights)
        if self.consensus == "ties":
            return elect_and_merge(dropped, self.params.majority_sign_method)
        return dropped.sum(dim=0)


class DareLinear(_Dare):
    """DARE, then the sum of the rescaled deltas (task arithmetic)."""

    name = "dare_linear"
    summary = "drop a random share of each delta's entries, rescale the rest, then sum"
    params_type = DareParams
    consensus = "sum"


class DareTies(_Dare):
    """DARE, then TIES sign election and disjoint mean of the rescaled deltas."""

    name = "dare_ties"
    summary = "DARE's random drop and rescale, then TIES's sign election and disjoint mean"
    params_type = DareTiesParams
    consensus = "ties"
