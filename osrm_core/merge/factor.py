"""Low-rank factors of a delta, and one LoRA that carries a weighted sum of LoRAs exactly."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

from osrm_core.errors import InputTypeError, OsrmInputError


def numerical_rank(singular_values: Tensor, shape: tuple[int, int]) -> int:
    """Number of singular values above ``max(s) * max(shape) * eps`` (the LAPACK convention).

    Parameters
    ----------
    singular_values : tensor of shape (min(shape),), in decreasing order
    shape : (int, int)
        Shape of the decomposed matrix.
    """
    if singular_values.numel() == 0:
        return 0
    eps = torch.finfo(singular_values.dtype).eps
    tol = singular_values.max() * max(shape) * eps
    return int((singular_values > tol).sum())


def fix_svd_signs(u: Tensor, vh: Tensor) -> tuple[Tensor, Tensor]:
    """Flip singular-vector pairs so the largest-magnitude entry of each column of ``u`` is > 0.

    ``u`` of shape (m, k), ``vh`` of shape (k, n); ``u @ diag(s) @ vh`` is unchanged. SVD signs
    are otherwise up to LAPACK, and methods that break ties by sign (TIES with 'frequency'
    election, where a tied vote elects +) would then depend on them.
    """
    k = u.shape[1]
    pivot = u.abs().argmax(dim=0)
    signs = torch.sign(u[pivot, torch.arange(k, device=u.device)])
    signs[signs == 0] = 1
    return u * signs, vh * signs[:, None]


def _check_matrix(name: str, x: object) -> Tensor:
    if not isinstance(x, Tensor):
        raise InputTypeError(f"{name} must be a tensor, got {type(x).__name__}")
    if x.ndim != 2 or not x.is_floating_point():
        raise OsrmInputError(
            f"{name} must be a 2-D floating-point tensor, got shape {tuple(x.shape)} {x.dtype}"
        )
    return x


@torch.no_grad()
def low_rank_factors(delta: Tensor, rank: int | None = None) -> tuple[Tensor, Tensor]:
    """LoRA factors ``(B, A)`` with ``B @ A`` the best rank-k approximation of ``delta``.

    Parameters
    ----------
    delta : tensor of shape (d_out, d_in)
    rank : int in [1, min(d_out, d_in)], optional
        k; by default the numerical rank of ``delta`` (at least 1, so the factors make a valid
        LoRA; for a zero delta they are zero).

    Returns
    -------
    B : tensor of shape (d_out, k)
        ``U_k diag(sqrt(S_k))``.
    A : tensor of shape (k, d_in)
        ``diag(sqrt(S_k)) V_k^T``; both in the dtype of ``delta``. Signs are made
        deterministic: the largest-magnitude entry of each column of ``U_k`` is positive.
    """
    _check_matrix("delta", delta)
    max_rank = min(delta.shape)
    if rank is not None and (
        isinstance(rank, bool)
        or not isinstance(rank, numbers.Integral)
        or not 1 <= rank <= max_rank
    ):
        raise OsrmInputError(f"rank must be None or an integer in [1, {max_rank}], got {rank!r}")
    if not bool(torch.isfinite(delta).all()):
        raise OsrmInputError("delta contains NaN or Inf")
    work = delta.to(torch.promote_types(delta.dtype, torch.float32))
    u, s, vh = torch.linalg.svd(work, full_matrices=False)
    k = int(rank) if rank is not None else max(1, numerical_rank(s, tuple(work.shape)))
    u, vh = fix_svd_signs(u[:, :k], vh[:k])
    root = s[:k].sqrt()
    return (u * root).to(delta.dtype), (root[:, None] * vh).to(delta.dtype)


def stack_lora_factors(
    factors: Sequence[tuple[Tensor, Tensor]], weights: Sequence[float]
) -> tuple[Tensor, Tensor]:
    """One LoRA of rank ``sum_i r_i`` whose product is ``sum_i w_i B_i A_i``.

    Writes an exact task-arithmetic merge as a single adapter. The weights go into B, so the
    rows of each A (e.g. an OSRM subspace) are kept as they are.

    Parameters
    ----------
    factors : list of T pairs ``(B_i, A_i)``
        ``B_i`` of shape (d_out, r_i), ``A_i`` of shape (r_i, d_in); one dtype and device.
    weights : list of T finite floats
        ``w_i``, e.g. ``lam * s_i``; may be negative.

    Returns
    -------
    B_stack : tensor of shape (d_out, sum_i r_i)
        ``[w_1 B_1 | ... | w_T B_T]``.
    A_stack : tensor of shape (sum_i r_i, d_in)
        ``[A_1; ...; A_T]``.
    """
    if len(factors) == 0:
        raise OsrmInputError("factors is empty: give at least one (B, A) pair")
    if len(weights) != len(factors):
        raise OsrmInputError(f"got {len(weights)} weights for {len(factors)} factor pairs")
    b0, a0 = factors[0]
    d_out = _check_matrix("B of pair 0", b0).shape[0]
    d_in = _check_matrix("A of pair 0", a0).shape[1]
    bs, as_ = [], []
    for i, ((b, a), w) in enumerate(zip(factors, weights, strict=True)):
        _check_matrix(f"B of pair {i}", b)
        _check_matrix(f"A of pair {i}", a)
        if b.shape[0] != d_out or a.shape[1] != d_in or b.shape[1] != a.shape[0]:
            raise OsrmInputError(
                f"size mismatch in pair {i}: B {tuple(b.shape)} and A {tuple(a.shape)}, "
                f"expected B (d_out={d_out}, r) and A (r, d_in={d_in})"
            )
        if (b.dtype, b.device, a.dtype, a.device) != (b0.dtype, b0.device, b0.dtype, b0.device):
            raise OsrmInputError(f"pair {i} differs in dtype or device from pair 0 ({b0.dtype})")
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w):
            raise OsrmInputError(f"weight {i} must be a finite number, got {w!r}")
        bs.append(b * float(w))
        as_.append(a)
    return torch.cat(bs, dim=1), torch.cat(as_, dim=0)


@torch.no_grad()
def product_svd(b: Tensor, a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of ``b @ a`` without forming it, through QR of both factors.

    Parameters
    ----------
    b : tensor of shape (d_out, r)
    a : tensor of shape (r, d_in)

    Returns
    -------
    U : tensor of shape (d_out, q)
    S : tensor of shape (q,), decreasing; q = min(d_out, d_in, r)
    Vh : tensor of shape (q, d_in)
        ``U diag(S) Vh = b @ a``; signs as in :func:`fix_svd_signs`.
    """
    q_b, r_b = torch.linalg.qr(b)  # (d_out, p), (p, r)
    q_a, r_a = torch.linalg.qr(a.T)  # (d_in, p'), (p', r)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
    u, vh = fix_svd_signs(q_b @ u, vh @ q_a.T)
    return u, s, vh
