"""Projected statistics: what the interference tables need of each task's features, without the
``d x d`` second moment.

At a layer with adapters ``j = 1..n`` (``A_j`` of shape ``(r_j, d)``), stacked into
``A = [A_1; ...; A_n]`` of shape ``(R, d)``, the texts of a task stream through once and add up

* ``sum (A h)(A h)^T`` (``R x R``): its ``(j, j)`` block over the token count is
  ``A_j S A_j^T`` with ``S = E[h h^T]``, so ``E||A_j h||^2 = tr(A_j S A_j^T)``, the output
  shift ``s_j^2 tr(B_j^T B_j A_j S A_j^T)`` and the own-task energy of ``A_j``'s row space follow
  exactly (:mod:`osrm_core.diagnostics`);
* ``sum ||h||^2`` (``tr S``) and ``sum ||W0 h||^2`` (``tr(W0 S W0^T)``, from the layer's own
  output less its bias, at the model's precision);

over the real tokens (padding masked), in float64 (or float32). Memory per layer is ``R^2``
numbers instead of ``2 d^2``; the work per token is ``R d`` on top of the forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from osrm_core.adapters import Adapter, union_layers
from osrm_core.data import TaskData
from osrm_core.errors import OsrmInputError

from .collect import check_collect_args
from .stream import Progress, Scratch, Tokens, base_modules, stream_layers, sum_of_squares, token_chunks


@dataclass
class ProjectedLayer:
    """Sums over the real tokens that entered one layer, projected on its adapters' ``A``.

    Attributes
    ----------
    adapters : dict of str to tensor (r_j, d)
        The ``A`` of each adapter with weights at this layer, in stacking order (the tensors
        the projections were taken with, not copies).
    sum_outer : tensor (R, R)
        ``sum (A h)(A h)^T`` with ``A`` the stacked ``A_j``.
    sum_sq : tensor ()
        ``sum ||h||^2``.
    base_sq : tensor ()
        ``sum ||W0 h||^2``.
    count : int
        Number of tokens.
    """

    adapters: dict[str, torch.Tensor]
    sum_outer: torch.Tensor
    sum_sq: torch.Tensor
    base_sq: torch.Tensor
    count: int = 0

    def _block(self, name: str) -> slice:
        start = 0
        for n, a in self.adapters.items():
            if n == name:
                return slice(start, start + a.shape[0])
            start += a.shape[0]
        raise OsrmInputError(f"projected statistics hold no projection of adapter {name!r}; "
                         f"they have {sorted(self.adapters)}")

    def moment(self, name: str, A: torch.Tensor) -> torch.Tensor:
        """``A_j S A_j^T`` (r_j x r_j) of adapter ``name``, whose ``A`` must be the one projected on."""
        block = self._block(name)
        held = self.adapters[name]
        if A is not held and (A.shape != held.shape or not torch.equal(A.to(held), held)):
            raise OsrmInputError(f"adapter {name!r}: its A is not the one the projected statistics were taken "
                             "with; projected statistics serve only the adapters they were collected for")
        return self.sum_outer[block, block] / max(self.count, 1)

    @property
    def trace(self) -> float:
        """``tr S = E||h||^2``."""
        return float(self.sum_sq) / max(self.count, 1)

    @property
    def base_energy(self) -> float:
        """``tr(W0 S W0^T) = E||W0 h||^2``."""
        return float(self.base_sq) / max(self.count, 1)


@dataclass
class ProjectedStats:
    """Projected statistics of one task at every layer some adapter covers."""

    layers: dict[str, ProjectedLayer]
    task: str = ""
    model: str = ""
    meta: dict = field(default_factory=dict)


class _Projector:
    """The sums of every adapted layer, added to from each batch's real tokens."""

    def __init__(self, modules: dict[str, nn.Module], adapters: dict[str, Adapter], dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.scratch = Scratch()
        self.layers: dict[str, ProjectedLayer] = {}
        for name, module in modules.items():
            held = {n: a.layers[name].A for n, a in adapters.items() if name in a.layers}
            device = module.weight.device
            R = sum(A.shape[0] for A in held.values())
            zero = torch.zeros((), dtype=dtype, device=device)
            self.layers[name] = ProjectedLayer(held, torch.zeros(R, R, dtype=dtype, device=device), zero, zero.clone())

    @torch.no_grad()
    def add(self, name: str, module: nn.Module, x: Tokens, y: Tokens, first: str) -> None:
        st = self.layers[name]
        # The stacked A in the accumulation dtype, in a held buffer (a float64 copy of every layer's A
        # would outweigh the adapters); one product per chunk, not one per adapter.
        A = self.scratch.take("stacked A", st.sum_outer.shape[:1] + (x.width,), self.dtype, st.sum_outer.device)
        torch.cat([a.to(A.device, self.dtype) for a in st.adapters.values()], out=A)
        bias = getattr(module, "bias", None)
        for start, h, sum_sq in token_chunks(name, x, self.dtype):
            p = A @ h.T  # (R, tokens): on the CPU several times faster than h @ A.T
            st.sum_outer.addmm_(p, p.T)
            st.sum_sq += sum_sq
            out = y.chunk(start, self.dtype)
            if bias is not None:
                out -= bias.to(self.dtype)
            st.base_sq += sum_of_squares(out)
        st.count += x.count


def collect_projected_stats(
    model: nn.Module,
    tokenizer,
    task: TaskData,
    adapters: dict[str, Adapter],
    *,
    max_samples: int | None = 100,
    batch_size: int = 16,
    max_length: int = 128,
    split: str = "train",
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    progress: Progress | None = None,
) -> ProjectedStats:
    """Stream ``task``'s texts through ``model`` once and collect its projected statistics at
    every layer some adapter covers (see the module's docstring).

    Parameters
    ----------
    model : nn.Module
        The base model the adapters belong on (without them: its layers' outputs give ``W0 h``).
    adapters : dict of name to Adapter
    max_samples, batch_size, max_length, split, seed
        As :func:`osrm_core.stats.collect_feature_stats` (the same seeded subset of samples); the
        smaller default batch bounds the pass's activations (on the Llama-3.2-1B shape a batch of
        32 x 128 tokens peaked 0.19 GiB above one of 16, at the same speed).
    dtype : torch.dtype
        Accumulation dtype, float64 (default) or float32.

    Returns
    -------
    ProjectedStats
    """
    data = check_collect_args(task, split, dtype, None, None, None)
    if not adapters:
        raise OsrmInputError("projected statistics need at least one adapter")
    modules = base_modules(model, union_layers(adapters))
    projector = _Projector(modules, adapters, dtype)
    stream_layers(model, tokenizer, data, modules, projector.add, outputs=True, max_samples=max_samples,
                  batch_size=batch_size, max_length=max_length, seed=seed, progress=progress,
                  what="projected statistics")
    meta = {"max_samples": max_samples, "max_length": max_length, "split": split, "seed": seed}
    model_name = getattr(model, "name_or_path_", "")
    return ProjectedStats(projector.layers, task=task.name, model=model_name, meta=meta)
