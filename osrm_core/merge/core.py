"""Core space: merging LoRA adapters on small core matrices, never forming a (d_out, d_in) delta.

With the factors of T adapters at one layer, ``Delta_i = B_i A_i`` (scale folded into B_i, B_i of
shape (d_out, r_i), A_i of shape (r_i, d_in)), stack ``B = [B_1 | ... | B_T]`` (d_out, R) and
``A = [A_1; ...; A_T]`` (R, d_in), R = sum_i r_i. With the thin SVDs ``B = U_B S_B V_B^T`` and
``A = U_A S_A V_A^T``, every delta is exactly

    Delta_i = U_B M_i V_A^T,   M_i = (U_B^T B_i)(A_i V_A)   (the core, at most R x R),

because the columns of B_i lie in the span of U_B and the rows of A_i in that of V_A^T. A merge
method runs on the cores and its result M maps back as the LoRA factors ``(U_B M, V_A^T)``.

Methods built on the SVD of the deltas or of their sums (task arithmetic, KnOTS-TA, TSV-M, Iso-C,
Iso-CTS, CART) give the same merge in both spaces (up to rounding): ``U_B`` and ``V_A`` have
orthonormal columns, so singular values, projections and orthogonal Procrustes commute with
the change of basis; rank budgets and tolerances use the layer's (d_out, d_in) in both spaces.
Entry-wise methods (TIES, DARE, KnOTS-TIES's trimming of the basis coordinates) are not
basis-invariant: in core space they trim, drop and elect signs on the entries of the cores,
a different merge from the full-space one. RegMean needs Gram matrices of the full input space
and is refused.

References
----------
Panariello et al., "Accurate and Efficient Low-Rank Model Merging in Core Space", NeurIPS 2025
(reference code: apanariello4/core-space-merging).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from osrm_core.errors import InputTypeError, OsrmInputError

from .factor import fix_svd_signs


class LoraFactors(NamedTuple):
    """The LoRA factors of one delta, ``B @ A``, with the scale folded into B.

    Attributes
    ----------
    B : tensor of shape (d_out, r)
    A : tensor of shape (r, d_in)
    """

    B: Tensor
    A: Tensor

    @property
    def shape(self) -> tuple[int, int]:
        """(d_out, d_in) of the delta."""
        return self.B.shape[0], self.A.shape[1]

    def delta(self) -> Tensor:
        """``B @ A``, shape (d_out, d_in) (for tests and small layers)."""
        return self.B @ self.A


def check_factors(factors: list[object], at: str) -> list[LoraFactors]:
    """The factors of one layer (pairs ``(B, A)``) as LoraFactors, or ValueError/TypeError."""
    out = []
    for i, f in enumerate(factors):
        if not isinstance(f, tuple) or len(f) != 2 or not all(isinstance(x, Tensor) for x in f):
            raise InputTypeError(f"factors of task {i}{at} must be a pair (B, A) of tensors, got {type(f).__name__}")
        b, a = f
        if b.ndim != 2 or a.ndim != 2 or b.shape[1] != a.shape[0]:
            raise OsrmInputError(
                f"factors of task {i}{at} must be B (d_out, r) and A (r, d_in), "
                f"got B {tuple(b.shape)} and A {tuple(a.shape)}"
            )
        if not (b.is_floating_point() and a.dtype == b.dtype and a.device == b.device):
            raise OsrmInputError(f"factors of task {i}{at} must be floating-point, of one dtype and device")
        if not (bool(torch.isfinite(b).all()) and bool(torch.isfinite(a).all())):
            raise OsrmInputError(f"factors of task {i}{at} contain NaN or Inf")
        ref = out[0] if out else LoraFactors(b, a)
        if (b.shape[0], a.shape[1]) != ref.shape or (b.dtype, b.device) != (ref.B.dtype, ref.B.device):
            raise OsrmInputError(
                f"size mismatch{at}: task {i} is ({b.shape[0]}, {a.shape[1]}) {b.dtype}, "
                f"task 0 is {ref.shape} {ref.B.dtype}: all must match"
            )
        out.append(LoraFactors(b, a))
    return out


def core_space(factors: list[LoraFactors]) -> tuple[Tensor, list[Tensor], Tensor]:
    """Common bases of the factors and each task's core.

    Parameters
    ----------
    factors : list of T LoraFactors, ``B_i`` (d_out, r_i), ``A_i`` (r_i, d_in)
        Ranks may differ (0 too); one dtype, float32 or float64.

    Returns
    -------
    U_B : tensor of shape (d_out, p), p = min(d_out, R)
        Orthonormal columns spanning every B_i's columns.
    cores : list of T tensors of shape (p, q)
        ``M_i``, with ``B_i A_i = U_B M_i V_A^T`` exactly.
    V_A^T : tensor of shape (q, d_in), q = min(d_in, R)
        Orthonormal rows spanning every A_i's rows.
    """
    b = torch.cat([f.B for f in factors], dim=1)
    a = torch.cat([f.A for f in factors], dim=0)
    u_b, s_b, vh_b = torch.linalg.svd(b, full_matrices=False)
    u_b, vh_b = fix_svd_signs(u_b, vh_b)
    u_a, s_a, vh_a = torch.linalg.svd(a, full_matrices=False)
    v_a, u_a_t = fix_svd_signs(vh_a.T, u_a.T)  # signs fixed on V_A's columns
    coord_b = s_b[:, None] * vh_b  # U_B^T B, shape (p, R)
    coord_a = u_a_t.T * s_a  # A V_A, shape (R, q)
    cores, start = [], 0
    for f in factors:
        r = f.B.shape[1]
        cores.append(coord_b[:, start : start + r] @ coord_a[start : start + r])
        start += r
    return u_b, cores, v_a.T
