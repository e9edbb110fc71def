"""KnOTS: align the task deltas in one shared SVD basis, then merge their coordinates.

The column-concatenation ``[Delta_W_1 | ... | Delta_W_T]`` of shape (d_out, T d_in) has the SVD
``U S V^T``, truncated to its numerical rank k. Splitting ``V^T`` into T blocks ``V_i^T`` of
shape (k, d_in) gives ``Delta_W_i = U S V_i^T`` exactly, so the tasks differ only in their
blocks. ``knots_ta`` sums the blocks (equal to task arithmetic), ``knots_ties`` merges them with
TIES; the merged delta is ``U S V_merged^T``.

References
----------
Stoica et al., "Model merging with SVD to tie the KnOTS", ICLR 2025.
https://arxiv.org/abs/2410.19735
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import MergeMethod, weight_rows
from .factor import fix_svd_signs, numerical_rank
from .ties import TiesParams, elect_and_merge, trim_by_magnitude


def knots_basis(deltas: list[Tensor]) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Shared basis of the deltas and each task's coordinates in it.

    Parameters
    ----------
    deltas : list of T tensors of shape (d_out, d_in)

    Returns
    -------
    U : tensor of shape (d_out, k)
    S : tensor of shape (k,)
        Singular values above the numerical-rank tolerance, decreasing.
    blocks : list of T tensors of shape (k, d_in)
        ``V_i^T``, with ``Delta_W_i = U diag(S) V_i^T``. Signs are deterministic: the
        largest-magnitude entry of each column of U is positive.
    """
    d_in = deltas[0].shape[1]
    joint = torch.cat(deltas, dim=1)
    u, s, vh = torch.linalg.svd(joint, full_matrices=False)
    k = numerical_rank(s, tuple(joint.shape))
    u, vh = fix_svd_signs(u[:, :k], vh[:k])
    return u, s[:k], list(vh.split(d_in, dim=1))


class _Knots(MergeMethod):
    """Merge of the KnOTS blocks; subclasses define ``prepare_blocks`` and ``merge_blocks``.

    With per-task weights the shared basis stays that of the unweighted deltas (computed once
    in :meth:`prepare_layer`) and the weights scale each task's block: ``w_i Delta_W_i = U S
    (w_i V_i^T)``. Weights of 1 are KnOTS; other weights differ from KnOTS of the weighted
    deltas, whose joint SVD would give another basis.
    """

    reference = "https://arxiv.org/abs/2410.19735"

    def prepare_blocks(self, blocks: list[Tensor]) -> Tensor:
        """Weight-independent work on T blocks of shape (k, d_in); returns shape (T, k, d_in)."""
        return torch.stack(blocks)

    def merge_blocks(self, blocks: Tensor) -> Tensor:
        """Merge the weighted blocks, shape (T, k, d_in), into one of shape (k, d_in)."""
        raise NotImplementedError

    def prepare_layer(self, deltas: list[Tensor], gram: list[Tensor] | None, generator: torch.Generator,
                      shape: tuple[int, int]) -> tuple[Tensor, Tensor] | Tensor:
        """``(U S, blocks)`` of :func:`knots_basis`, the blocks prepared (shape (T, k, d_in));
        a zero delta when all deltas are zero."""
        u, s, blocks = knots_basis(deltas)
        if s.numel() == 0:
            return torch.zeros_like(deltas[0])
        return u * s, self.prepare_blocks(blocks)

    def combine_prepared(
        self, prepared: tuple[Tensor, Tensor] | Tensor, weights: list[float], shape: tuple[int, int]
    ) -> Tensor:
        if isinstance(prepared, Tensor):  # all deltas are zero
            return prepared
        us, blocks = prepared
        return us @ self.merge_blocks(weight_rows(blocks, weights))


class KnotsTA(_Knots):
    """KnOTS with task arithmetic: the sum of the blocks (the same result as task arithmetic)."""

    name = "knots_ta"
    low_rank = True
    summary = "task arithmetic in one SVD basis shared by all tasks (equal to task arithmetic)"

    def merge_blocks(self, blocks: Tensor) -> Tensor:
        return blocks.sum(dim=0)


class KnotsTies(_Knots):
    """KnOTS with TIES on the blocks: trim per task block, elect sign, disjoint mean.

    The blocks are trimmed once in :meth:`prepare_layer` (``trim(w V) = w trim(V)``, ``w >= 0``).
    """

    name = "knots_ties"
    low_rank = True
    summary = "TIES on the tasks' coordinates in one shared SVD basis"
    params_type = TiesParams
    uses_density = True

    def prepare_blocks(self, blocks: list[Tensor]) -> Tensor:
        return torch.stack([trim_by_magnitude(b, self.params.density) for b in blocks])

    def merge_blocks(self, blocks: Tensor) -> Tensor:
        return elect_and_merge(blocks, self.params.majority_sign_method)
