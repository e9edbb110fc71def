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

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from osrm_core.adapters import Adapter, union_layers
from osrm_core.batching import iter_batches, move_batch
from osrm_core.data import TaskData
from osrm_core.errors import OsrmInputError
from osrm_core.models import decoder_position_ids, get_module

from .collect import StopForward, check_collect_args, eval_mode, select_samples

Progress = Callable[[int, int, str], None]
#: Real tokens cast to the accumulation dtype at once (bounds the scratch of a wide layer).
CHUNK_TOKENS = 2048


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
    """Forward hooks on the adapted layers that add each batch's real tokens to the sums."""

    def __init__(self, modules: dict[str, nn.Module], adapters: dict[str, Adapter], dtype: torch.dtype) -> None:
        self.modules, self.dtype = modules, dtype
        self.mask: torch.Tensor | None = None
        self.waiting: set[str] = set()
        self.layers: dict[str, ProjectedLayer] = {}
        for name, module in modules.items():
            held = {n: a.layers[name].A for n, a in adapters.items() if name in a.layers}
            device = module.weight.device
            R = sum(A.shape[0] for A in held.values())
            zero = torch.zeros((), dtype=dtype, device=device)
            self.layers[name] = ProjectedLayer(held, torch.zeros(R, R, dtype=dtype, device=device), zero, zero.clone())

    def hook(self, name: str):
        def run(module, args, kwargs, output):
            x = args[0] if args else next(iter(kwargs.values()))
            self._accumulate(name, module, x, output)
            self.waiting.discard(name)
            if not self.waiting:  # the rest of the model (its LM head too) is not needed
                raise StopForward

        return run

    @torch.no_grad()
    def _accumulate(self, name: str, module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        mask = self.mask.to(x.device)
        if x.shape[:2] != mask.shape:
            raise OsrmInputError(
                f"layer {name!r}: input of shape {tuple(x.shape)} does not match the attention "
                f"mask {tuple(mask.shape)}; only (batch, tokens, features) inputs are supported"
            )
        st = self.layers[name]
        bias = getattr(module, "bias", None)
        real_x, real_y = _real(x, mask), _real(y, mask)
        for start in range(0, real_x.shape[0], CHUNK_TOKENS):
            h = real_x[start : start + CHUNK_TOKENS].to(self.dtype)
            sum_sq = _sum_of_squares(h)
            # A NaN or Inf entry makes the sum of squares non-finite; so may a float32 overflow: check the entries.
            if not torch.isfinite(sum_sq) and not torch.isfinite(h).all():
                raise OsrmInputError(f"layer {name!r}: input features contain NaN or Inf")
            # (R, tokens), A @ h.T: on the CPU several times faster than h @ A.T. Each A_j cast here, one
            # layer at a time: a float64 copy of every layer's stacked A would outweigh the adapters.
            p = torch.cat([A.to(h.device, self.dtype) @ h.T for A in st.adapters.values()])
            st.sum_outer.addmm_(p, p.T)
            st.sum_sq += sum_sq
            out = real_y[start : start + CHUNK_TOKENS].to(self.dtype)
            if bias is not None:
                out = out - bias.to(self.dtype)
            st.base_sq += _sum_of_squares(out)
        st.count += real_x.shape[0]


def _real(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The rows of ``t`` (batch, tokens, width) at real tokens, as (n, width)."""
    return t.reshape(-1, t.shape[-1]) if bool(mask.all()) else t[mask]


def _sum_of_squares(t: torch.Tensor) -> torch.Tensor:
    flat = t.reshape(-1)
    return torch.dot(flat, flat)  # BLAS: an order of magnitude faster than (t * t).sum() on the CPU


def collect_projected_stats(
    model: nn.Module,
    tokenizer,
    task: TaskData,
    adapters: dict[str, Adapter],
    *,
    max_samples: int | None = 100,
    batch_size: int = 32,
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
        As :func:`osrm_core.stats.collect_feature_stats` (the same seeded subset of samples).
    dtype : torch.dtype
        Accumulation dtype, float64 (default) or float32.

    Returns
    -------
    ProjectedStats
    """
    data = check_collect_args(task, split, dtype, None, None, None)
    if not adapters:
        raise OsrmInputError("projected statistics need at least one adapter")
    modules = {}
    for name in union_layers(adapters):
        module = get_module(model, name)
        modules[name] = getattr(module, "base_layer", module)
    projector = _Projector(modules, adapters, dtype)
    idx = select_samples(len(data), max_samples, seed)
    batches = iter_batches(tokenizer, data, batch_size=batch_size, max_length=max_length, indices=idx,
                           with_labels=False)
    total = -(-len(idx) // batch_size)
    device = next(model.parameters()).device
    handles = [m.register_forward_hook(projector.hook(n), with_kwargs=True) for n, m in modules.items()]
    try:
        with eval_mode(model), torch.no_grad():
            for i, batch in enumerate(batches):
                batch = move_batch(decoder_position_ids(batch, model), device)
                projector.mask = batch["attention_mask"].bool()
                projector.waiting = set(modules)
                try:
                    model(**batch)
                except StopForward:
                    pass
                if projector.waiting:
                    raise OsrmInputError(f"layer {sorted(projector.waiting)[0]!r} never ran in the model's forward pass")
                if progress:
                    progress(i + 1, total, "projected statistics")
    finally:
        for h in handles:
            h.remove()
    meta = {"max_samples": max_samples, "max_length": max_length, "split": split, "seed": seed}
    model_name = getattr(model, "name_or_path_", "")
    return ProjectedStats(projector.layers, task=task.name, model=model_name, meta=meta)
