"""Task arithmetic: the sum of the task deltas.

With ``lam = 1 / T`` it is the plain average; the merged delta is ``lam * sum_i Delta_W_i``.

References
----------
Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023.
https://arxiv.org/abs/2212.04089
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import MergeMethod


class TaskArithmetic(MergeMethod):
    """``combine`` returns ``sum_i Delta_W_i``, a tensor of shape (d_out, d_in)."""

    name = "task_arithmetic"
    low_rank = True
    summary = "the weighted sum of the task deltas, scaled by lambda (the plain default)"
    reference = "https://arxiv.org/abs/2212.04089"

    def combine(self, deltas: list[Tensor], gram: list[Tensor] | None, shape: tuple[int, int]) -> Tensor:
        return torch.stack(deltas).sum(dim=0)
