"""Sketches of a task's top-``k`` data subspace: the leading eigenpairs of the second moment
``S = E[h h^T]`` at some layers, with a stated error, without forming the ``d x d`` matrix.

The randomized range finder of Halko, Martinsson & Tropp (2011, Algorithms 4.3-4.4 and 5.3),
streamed: every pass streams the texts once (padding masked, as :mod:`.projected`) and adds up,
per layer, ``sum h (h^T M) = n S M`` for the current ``M`` of shape ``(d, m)``, ``m = k +
oversampling``: a seeded Gaussian ``Omega`` first, then, for each of the ``power`` passes of
subspace iteration, the orthonormalized previous sum. Then ``Q = orth(Y)``, and a last pass gives
``Z = S Q``; ``B = Q^T Z = U Theta U^T`` gives the Ritz pairs ``(theta_i, v_i = Q u_i)``. In all
``2 + power`` passes; per layer two ``d x m`` sums instead of ``d^2``, and ``2 d m`` work per
token and pass on top of the forward pass.

The stated error, from ``Z`` alone (no ``S``):

* the residual ``r_i = ||S v_i - theta_i v_i|| = ||Z u_i - theta_i Q u_i||`` of each Ritz pair:
  an eigenvalue of ``S`` lies within ``r_i`` of ``theta_i`` (Parlett 1998, Theorem 4.5.1), and
  ``theta_i <= lambda_i`` (Cauchy interlacing);
* the subspace: the largest principal angle between ``span(v_1..v_k)`` and the top-``k``
  eigenspace of ``S`` has ``sin <= ||R_k||_2 / gap`` (Davis & Kahan 1970, the sin theta
  theorem), ``R_k`` the residuals of the top ``k`` pairs, ``gap = theta_k - (theta_{k+1} +
  r_{k+1})``. The theorem's gap is ``theta_k - lambda_{k+1}``; the one used takes
  ``lambda_{k+1}`` to lie within ``r_{k+1}`` of the ``(k+1)``-th Ritz value, i.e. that the sketch
  has missed no direction of ``S`` with a larger eigenvalue (what the oversampling and the power
  passes make likely; Halko et al., Section 10). No gap left: the bound is 90 degrees.

References
----------
Halko, Martinsson & Tropp (2011), Finding structure with randomness, SIAM Review 53(2).
Davis & Kahan (1970), The rotation of eigenvectors by a perturbation III, SIAM J. Numer. Anal. 7(1).
Parlett (1998), The Symmetric Eigenvalue Problem, SIAM.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from osrm_core.data import TaskData
from osrm_core.errors import InputTypeError, OsrmInputError
from osrm_core.models import weight_as_linear

from .collect import check_collect_args
from .stream import Progress, Tokens, base_modules, stream_layers, token_chunks

#: Default passes of subspace iteration. On three layers of the packaged model (k = 8, 756 tokens
#: of a demo task, eigenvalue gaps after the 8th of 3 to 13 per cent) 2 left the angle bound at 90
#: degrees (nothing stated) on all three, 4 at 90, 10 and 29, 8 at 6.4, 0.34 and 1.1.
SKETCH_POWER = 4


@dataclass
class SketchLayer:
    """The top-``k`` Ritz pairs of one layer's ``S`` and their stated error.

    Attributes
    ----------
    basis : tensor of shape (d, k), float64
        Orthonormal Ritz vectors, largest Ritz value first.
    eigenvalues : tensor of shape (k,), float64
        Ritz values ``theta_1 >= ... >= theta_k``.
    residuals : tensor of shape (k,), float64
        ``||S v_i - theta_i v_i||`` per pair.
    residual_norm : float
        ``||R_k||_2``, the spectral norm of the residuals of the ``k`` pairs together.
    next_eigenvalue, next_residual : float
        The ``(k+1)``-th Ritz value and its residual (for the gap).
    trace : float
        ``tr S = E||h||^2``.
    count : int
        Tokens.
    """

    basis: torch.Tensor
    eigenvalues: torch.Tensor
    residuals: torch.Tensor
    residual_norm: float
    next_eigenvalue: float
    next_residual: float
    trace: float
    count: int

    @property
    def max_residual(self) -> float:
        """The largest residual of the ``k`` pairs: every Ritz value is within it of an eigenvalue."""
        return float(self.residuals.max())

    @property
    def gap(self) -> float:
        """``theta_k - (theta_{k+1} + r_{k+1})``, the gap the angle bound divides by."""
        return float(self.eigenvalues[-1]) - self.next_eigenvalue - self.next_residual

    @property
    def angle_bound(self) -> float:
        """Bound in degrees on the largest principal angle to the top-``k`` eigenspace (90: none)."""
        if self.gap <= 0:
            return 90.0
        return math.degrees(math.asin(min(1.0, self.residual_norm / self.gap)))


@dataclass
class Sketch:
    """Sketches of one task's top-``k`` data subspace at some layers (layers that read one input
    share one :class:`SketchLayer`)."""

    layers: dict[str, SketchLayer]
    k: int
    power: int
    task: str = ""
    model: str = ""
    meta: dict = field(default_factory=dict)

    def table(self):
        """One row per layer: ``task, layer, k, power, eigenvalue_1, eigenvalue_k, max_residual,
        gap, angle_bound_deg, captured`` (``captured``: the ``k`` Ritz values' share of ``tr S``)."""
        import pandas as pd

        return pd.DataFrame([{
            "task": self.task, "layer": name, "k": self.k, "power": self.power,
            "eigenvalue_1": float(sl.eigenvalues[0]), "eigenvalue_k": float(sl.eigenvalues[-1]),
            "max_residual": sl.max_residual, "gap": sl.gap, "angle_bound_deg": sl.angle_bound,
            "captured": float(sl.eigenvalues.sum()) / sl.trace if sl.trace > 0 else math.nan,
        } for name, sl in self.layers.items()])


class _RangeFinder:
    """Per layer input, the running sum ``sum h (h^T M)`` for the current ``M``, kept as rows
    (``M^T``, ``Y^T``: ``M^T @ h.T``, the layout :mod:`.projected` found fastest on the CPU)."""

    def __init__(self, m: int, dtype: torch.dtype, seed: int) -> None:
        self.m, self.dtype = m, dtype
        self.generator = torch.Generator().manual_seed(seed)
        self.first: dict[str, str] = {}  # a layer reading the input of an earlier one: that one
        self.Mt: dict[str, torch.Tensor] = {}
        self.Yt: dict[str, torch.Tensor] = {}
        self.sum_sq: dict[str, torch.Tensor] = {}
        self.count: dict[str, int] = {}
        self.counting = True

    @torch.no_grad()
    def add(self, name: str, module: nn.Module, x: Tokens, y, first: str) -> None:
        if first != name:
            self.first[name] = first
            return
        if name not in self.Mt:  # the first batch: a Gaussian test matrix Omega
            d, device = x.width, x.flat.device
            omega = torch.randn(min(self.m, d), d, generator=self.generator, dtype=torch.float64)
            self.Mt[name] = omega.to(device, self.dtype)
            self.Yt[name] = torch.zeros_like(self.Mt[name])
            self.sum_sq[name] = torch.zeros((), dtype=self.dtype, device=device)
            self.count[name] = 0
        Mt, Yt = self.Mt[name], self.Yt[name]
        for _, h, sum_sq in token_chunks(name, x, self.dtype):
            Yt.addmm_(Mt @ h.T, h)
            if self.counting:
                self.sum_sq[name] += sum_sq
        if self.counting:
            self.count[name] += x.count

    def next_pass(self) -> None:
        """``M = orth(Y)`` for the next pass, the sums zeroed."""
        self.counting = False
        for name, Yt in self.Yt.items():
            self.Mt[name] = torch.linalg.qr(Yt.T.to(torch.float64))[0].T.to(self.dtype).contiguous()
            Yt.zero_()

    def ritz(self, name: str, k: int) -> SketchLayer:
        """The Rayleigh-Ritz step on ``span(Q)`` from ``Z = S Q`` (the last pass's sum)."""
        from osrm_core.spectra import fix_signs

        n = max(self.count[name], 1)
        Q = self.Mt[name].T.to(torch.float64)  # the Q the last pass used (rounded, in float32)
        Z = self.Yt[name].T.to(torch.float64) / n
        B = Q.T @ Z
        theta, U = torch.linalg.eigh((B + B.T) / 2)
        theta, U = theta.flip(0), U.flip(1)
        V = Q @ U
        R = Z @ U - V * theta
        residuals = torch.linalg.vector_norm(R, dim=0)
        return SketchLayer(fix_signs(V[:, :k]), theta[:k], residuals[:k], float(torch.linalg.matrix_norm(R[:, :k], 2)),
                           float(theta[k]), float(residuals[k]), float(self.sum_sq[name]) / n, self.count[name])


def collect_sketch(
    model: nn.Module,
    tokenizer,
    task: TaskData,
    layers: Sequence[str],
    k: int,
    *,
    power: int = SKETCH_POWER,
    oversampling: int = 10,
    split: str = "train",
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    progress: Progress | None = None,
    **options,
) -> Sketch:
    """Sketch ``task``'s top-``k`` data subspace at ``layers`` in ``2 + power`` passes over its
    texts (see the module's docstring).

    Parameters
    ----------
    model : nn.Module
        The base model (a layer wrapped by PEFT is read at its base layer).
    layers : sequence of str
        Layer names; their inputs are sketched (layers reading one input tensor, one after the
        other, share one sketch).
    k : int
        Dimension of the subspace, ``1 <= k < d`` at every layer.
    power : int
        Passes of subspace iteration, ``>= 0``: each shrinks the error by about the ratio
        ``lambda_{m+1} / lambda_k`` of the spectrum (Halko et al., Section 4.5).
    oversampling : int
        Extra columns, ``>= 1`` (``m = min(k + oversampling, d)`` per layer; the ``(k+1)``-th
        gives the gap).
    split, seed
        As :func:`osrm_core.stats.collect_feature_stats` (the same seeded subset of samples);
        ``seed`` also draws ``Omega``.
    dtype : torch.dtype
        Accumulation dtype, float64 (default) or float32; the small eigenproblem is float64.
    progress : callable (step, total, message), optional
        Over all passes.
    **options
        ``max_samples``, ``batch_size``, ``max_length``: as :func:`osrm_core.stats.collect_feature_stats`.

    Returns
    -------
    Sketch
    """
    data = check_collect_args(task, split, dtype, None, None, None)
    for arg, value, low in (("k", k, 1), ("power", power, 0), ("oversampling", oversampling, 1)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputTypeError(f"{arg} must be an integer >= {low}, got {value!r}")
        if value < low:
            raise OsrmInputError(f"{arg} must be an integer >= {low}, got {value}")
    if not layers:
        raise OsrmInputError("a sketch needs at least one layer")
    modules = base_modules(model, layers)
    widths = {name: weight_as_linear(module).shape[1] for name, module in modules.items()}
    narrow = min(widths, key=widths.get)
    if k >= widths[narrow]:
        raise OsrmInputError(f"k must be below the width of layer {narrow!r} ({widths[narrow]}), got {k}")
    finder = _RangeFinder(k + oversampling, dtype, seed)
    passes = power + 2
    for p in range(passes):
        if p:
            finder.next_pass()
        step = None if progress is None else (
            lambda i, total, what, p=p: progress(p * total + i, passes * total, what))
        stream_layers(model, tokenizer, data, modules, finder.add, seed=seed, progress=step,
                      what=f"sketch, pass {p + 1} of {passes}", **options)
    done = {name: finder.ritz(name, k) for name in finder.Mt}
    meta = {**options, "split": split, "seed": seed, "oversampling": oversampling}
    return Sketch({name: done[finder.first.get(name, name)] for name in layers}, k, power, task=task.name,
                  model=getattr(model, "name_or_path_", ""), meta=meta)
