"""Merge methods for LoRA weight deltas: a registry, one module per method, and the public API.

Every method merges, per layer, the task deltas ``Delta_W_i = s_i * B_i @ A_i`` (tensors of shape
(d_out, d_in)), never A and B separately, which would add cross terms ``B_i A_j``. The merged
delta is ``lam * combine(deltas)``; ``combine`` is the sum for task arithmetic, DARE-linear and
KnOTS-TA, and a mean for TIES, DARE-TIES, KnOTS-TIES and RegMean.

Examples
--------
>>> import torch
>>> task0 = {"q": torch.tensor([[1.0, -2.0], [0.5, 0.0]])}
>>> task1 = {"q": torch.tensor([[3.0, 1.0], [-0.5, 0.0]])}
>>> merge_deltas([task0, task1], "task_arithmetic", lam=0.5)["q"]
tensor([[ 2.0000, -0.5000],
        [ 0.0000,  0.0000]])
>>> merge_deltas([task0, task1], "ties", density=1.0)["q"]
tensor([[ 2.0000, -2.0000],
        [ 0.5000,  0.0000]])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .base import MergeMethod, MergeParams, ParamSpec, check_real
from .dare import DareLinear, DareTies
from .factor import low_rank_factors, stack_lora_factors
from .knots import KnotsTA, KnotsTies
from .regmean import RegMean
from .task_arithmetic import TaskArithmetic
from .ties import Ties

__all__ = [
    "MERGE_METHODS",
    "MergeMethod",
    "MergeParams",
    "ParamSpec",
    "all_param_specs",
    "get_merge_method",
    "low_rank_factors",
    "merge_deltas",
    "merge_layer",
    "stack_lora_factors",
]

MERGE_METHODS: dict[str, type[MergeMethod]] = {
    cls.name: cls
    for cls in (TaskArithmetic, Ties, DareLinear, DareTies, RegMean, KnotsTA, KnotsTies)
}


def all_param_specs() -> dict[str, ParamSpec]:
    """Every parameter of the registered methods, by name (methods that share one, e.g.
    ``density``, share its flag on the command line and its widget)."""
    out: dict[str, ParamSpec] = {}
    for cls in MERGE_METHODS.values():
        for spec in cls.param_specs():
            out.setdefault(spec.name, spec)
    return out


def get_merge_method(name: str, **params: Any) -> MergeMethod:
    """The merge method registered as ``name``, with ``params`` checked.

    Raises
    ------
    ValueError
        For an unknown name (the message lists the known ones), an unknown parameter or a value
        out of range (the message names the parameter, the value and what is allowed).
    """
    if not isinstance(name, str) or name not in MERGE_METHODS:
        raise ValueError(f"unknown merge method {name!r}; known: {', '.join(MERGE_METHODS)}")
    return MERGE_METHODS[name](**params)


def _resolve(method: MergeMethod | str, params: dict[str, Any]) -> MergeMethod:
    if isinstance(method, MergeMethod):
        if params:
            raise ValueError(
                f"parameters {', '.join(sorted(params))} given with a MergeMethod object; "
                f"pass them to get_merge_method instead"
            )
        return method
    if isinstance(method, str):
        return get_merge_method(method, **params)
    raise TypeError(f"method must be a name or a MergeMethod, got {type(method).__name__}")


def merge_layer(
    deltas: list[Tensor],
    method: MergeMethod | str,
    *,
    lam: float = 1.0,
    gram: list[Tensor] | None = None,
    generator: torch.Generator | None = None,
    **params: Any,
) -> Tensor:
    """Merge the deltas of one layer.

    Parameters
    ----------
    deltas : list of T tensors of shape (d_out, d_in)
        One per task, same shape, dtype and device.
    method : MergeMethod or str
        A method object, or a registered name (then ``params`` configure it).
    lam : float, >= 0
        Scale of the combination (``lam = 1 / T`` averages for task arithmetic).
    gram : list of T tensors of shape (d_in, d_in), optional
        Gram matrices of each task's inputs to the layer; required by RegMean.
    generator : torch.Generator, optional
        Randomness for DARE; None means a fresh CPU generator seeded with 0.

    Returns
    -------
    tensor of shape (d_out, d_in), the inputs' dtype
    """
    return _resolve(method, params).merge(deltas, lam=lam, gram=gram, generator=generator)


def merge_deltas(
    deltas: list[dict[str, Tensor]],
    method: MergeMethod | str,
    *,
    lam: float = 1.0,
    grams: list[dict[str, Tensor]] | None = None,
    seed: int = 0,
    **params: Any,
) -> dict[str, Tensor]:
    """Merge the deltas of every layer; all inputs are checked before anything is computed.

    Parameters
    ----------
    deltas : list of T dicts layer name -> tensor of shape (d_out, d_in)
        All tasks (numbered from 0) must have the same layers and shapes.
    method : MergeMethod or str
    lam : float, >= 0
    grams : list of T dicts layer name -> tensor of shape (d_in, d_in), optional
        Gram matrices (token count times second moment) of each layer's inputs per task;
        required by RegMean, ignored by the other methods.
    seed : int
        Seed of the one CPU generator used across layers in sorted layer-name order.

    Returns
    -------
    dict layer name -> tensor of shape (d_out, d_in)
        In the layer order of ``deltas[0]``; dtype of the inputs.
    """
    merger = _resolve(method, params)
    check_real("lam", lam, low=0.0, high=float("inf"), high_open=True)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    if not isinstance(deltas, Sequence) or len(deltas) == 0:
        raise ValueError("deltas is empty: give one dict of layer deltas per task")
    for i, task in enumerate(deltas):
        if not isinstance(task, Mapping):
            raise TypeError(f"deltas of task {i} must be a dict layer -> tensor")
    names = list(deltas[0])
    if not names:
        raise ValueError("deltas of task 0 hold no layers")
    for i, task in enumerate(deltas[1:], start=1):
        for name in names:
            if name not in task:
                raise ValueError(f"layer {name!r} missing from task {i}")
        for name in task:
            if name not in deltas[0]:
                raise ValueError(f"layer {name!r} of task {i} missing from task 0")
    layer_grams: dict[str, list[Tensor] | None] = dict.fromkeys(names)
    if merger.needs_gram:
        if grams is None:
            raise ValueError(f"merge method {merger.name!r} needs grams (one dict per task)")
        if not isinstance(grams, Sequence) or len(grams) != len(deltas):
            raise ValueError(f"need one dict of Gram matrices per task ({len(deltas)})")
        for i, task in enumerate(grams):
            for name in names:
                if not isinstance(task, Mapping) or name not in task:
                    raise ValueError(f"Gram matrix of layer {name!r} missing from task {i}")
        layer_grams = {name: [task[name] for task in grams] for name in names}
    for name in names:
        merger.check_inputs([t[name] for t in deltas], layer_grams[name], layer=name)

    generator = torch.Generator().manual_seed(seed)
    merged = {}
    for name in sorted(names):
        layer = [t[name] for t in deltas]
        merged[name] = merger.merge(layer, lam=lam, gram=layer_grams[name], generator=generator)
    return {name: merged[name] for name in names}
