"""Merge methods for LoRA weight deltas: a registry, one module per method, and the public API.

Every method merges, per layer, the task deltas ``Delta_W_i = s_i * B_i @ A_i`` (tensors of shape
(d_out, d_in)), never A and B separately, which would add cross terms ``B_i A_j``. The merged
delta is ``lam * combine(deltas)``; ``combine`` is the sum for task arithmetic, DARE-linear and
KnOTS-TA, and a mean for TIES, DARE-TIES, KnOTS-TIES and RegMean; TSV-M, Iso-C, Iso-CTS and
CART rebuild the merge from singular vectors. Each task may carry a weight ``w_i >= 0``
(``weights``): the merge is then that of ``w_i Delta_W_i``. :func:`prepare_merge` does a
method's weight-independent work once (trimming, drops, SVDs) for many weight vectors. With
``space="core"`` the inputs are LoRA factors and the method runs on small core matrices
(:mod:`osrm_core.merge.core`).

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

from osrm_core.errors import InputTypeError, OsrmInputError
from osrm_core.params import ParamSpec, check_choice

from .base import MergeMethod, MergeParams, PreparedLayer, check_scale
from .cart import Cart
from .core import LoraFactors, check_factors, core_space
from .dare import DareLinear, DareTies
from .factor import low_rank_factors, stack_lora_factors
from .iso import IsoC, IsoCts
from .knots import KnotsTA, KnotsTies
from .regmean import RegMean
from .task_arithmetic import TaskArithmetic
from .ties import Ties
from .tsv import TsvMerge

__all__ = [
    "MERGE_METHODS",
    "SPACES",
    "LoraFactors",
    "MergeMethod",
    "MergeParams",
    "ParamSpec",
    "PreparedMerge",
    "all_param_specs",
    "get_merge_method",
    "low_rank_factors",
    "merge_deltas",
    "merge_layer",
    "method_table",
    "prepare_merge",
    "stack_lora_factors",
]

#: Where a merge runs: on the (d_out, d_in) deltas, or on the cores of LoRA factors.
SPACES: tuple[str, ...] = ("full", "core")

MERGE_METHODS: dict[str, type[MergeMethod]] = {
    cls.name: cls
    for cls in (
        TaskArithmetic, Ties, DareLinear, DareTies, RegMean, KnotsTA, KnotsTies, TsvMerge, IsoC, IsoCts, Cart
    )
}


def method_table() -> list[dict[str, str]]:
    """Every registered method: ``name``, ``summary`` (one sentence) and ``reference`` (the paper)."""
    return [{"name": n, "summary": cls.summary, "reference": cls.reference} for n, cls in MERGE_METHODS.items()]


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
        raise OsrmInputError(f"unknown merge method {name!r}; known: {', '.join(MERGE_METHODS)}")
    return MERGE_METHODS[name](**params)


def _resolve(method: MergeMethod | str, params: dict[str, Any]) -> MergeMethod:
    if isinstance(method, MergeMethod):
        if params:
            raise OsrmInputError(
                f"parameters {', '.join(sorted(params))} given with a MergeMethod object; "
                f"pass them to get_merge_method instead"
            )
        return method
    if isinstance(method, str):
        return get_merge_method(method, **params)
    raise InputTypeError(f"method must be a name or a MergeMethod, got {type(method).__name__}")


def merge_layer(deltas: list[Tensor], method: MergeMethod | str, *, lam: float = 1.0,
                gram: list[Tensor] | None = None, generator: torch.Generator | None = None,
                weights: Sequence[float] | None = None, **params: Any) -> Tensor:
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
    weights : list of T floats >= 0, optional
        Per-task weights (all 1 by default).

    Returns
    -------
    tensor of shape (d_out, d_in), the inputs' dtype
    """
    return _resolve(method, params).merge(deltas, lam=lam, gram=gram, generator=generator, weights=weights)


class PreparedMerge:
    """Every layer of a merge after the method's weight-independent work (:func:`prepare_merge`).

    Attributes
    ----------
    method : MergeMethod
    space : {"full", "core"}
    layers : dict layer name -> PreparedLayer
        In the layer order of the inputs.
    bases : dict layer name -> (U_B, V_A^T, dtype), empty in full space
        The core bases, U_B of shape (d_out, p) and V_A^T of shape (q, d_in), and the dtype of
        the input factors (that of the merged factors).
    """

    def __init__(self, method: MergeMethod, space: str, layers: dict[str, PreparedLayer],
                 bases: dict[str, tuple[Tensor, Tensor, torch.dtype]]) -> None:
        self.method, self.space, self.layers, self.bases = method, space, layers, bases

    @property
    def n_tasks(self) -> int:
        return next(iter(self.layers.values())).n_tasks

    def __repr__(self) -> str:
        return f"PreparedMerge({self.method!r}, space={self.space!r}, {len(self.layers)} layers)"

    @torch.no_grad()
    def merge(self, *, lam: float = 1.0, weights: Sequence[float] | None = None) -> dict[str, Any]:
        """The merged layers for one weight vector.

        Parameters
        ----------
        lam : float, >= 0
        weights : list of T floats >= 0, optional
            Per-task weights, all 1 by default.

        Returns
        -------
        dict layer name -> tensor of shape (d_out, d_in) in full space, LoraFactors
        (B of shape (d_out, q), A of shape (q, d_in), ``lam`` folded into B) in core space;
        the inputs' dtype.
        """
        return self._merge(*check_scale(lam, weights, self.n_tasks))

    def _merge(self, lam: float, weights: list[float]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, layer in self.layers.items():
            merged = self.method.merged(layer, lam, weights)
            if self.space == "core":
                u_b, vh_a, dtype = self.bases[name]  # the core merged in float32 or float64
                merged = LoraFactors((u_b @ merged).to(dtype), vh_a.to(dtype))
            out[name] = merged
        return out


def _check_tasks(deltas: object) -> list[str]:
    """Layer names of task 0, after checking that every task has the same layers."""
    if not isinstance(deltas, Sequence) or len(deltas) == 0:
        raise OsrmInputError("deltas is empty: give one dict of layer deltas per task")
    for i, task in enumerate(deltas):
        if not isinstance(task, Mapping):
            raise InputTypeError(f"deltas of task {i} must be a dict layer -> tensor")
    names = list(deltas[0])
    if not names:
        raise OsrmInputError("deltas of task 0 hold no layers")
    for i, task in enumerate(deltas[1:], start=1):
        for name in names:
            if name not in task:
                raise OsrmInputError(f"layer {name!r} missing from task {i}")
        for name in task:
            if name not in deltas[0]:
                raise OsrmInputError(f"layer {name!r} of task {i} missing from task 0")
    return names


def _layer_grams(merger: MergeMethod, grams: object, names: list[str], n_tasks: int) -> dict[str, Any]:
    if not merger.needs_gram:
        return dict.fromkeys(names)
    if grams is None:
        raise OsrmInputError(f"merge method {merger.name!r} needs grams (one dict per task)")
    if not isinstance(grams, Sequence) or len(grams) != n_tasks:
        raise OsrmInputError(f"need one dict of Gram matrices per task ({n_tasks})")
    for i, task in enumerate(grams):
        for name in names:
            if not isinstance(task, Mapping) or name not in task:
                raise OsrmInputError(f"Gram matrix of layer {name!r} missing from task {i}")
    return {name: [task[name] for task in grams] for name in names}


def prepare_merge(
    deltas: list[dict[str, Any]],
    method: MergeMethod | str,
    *,
    grams: list[dict[str, Tensor]] | None = None,
    seed: int = 0,
    space: str = "full",
    **params: Any,
) -> PreparedMerge:
    """Check every input, then do the method's weight-independent work on every layer.

    The one place where merge inputs are checked; :meth:`PreparedMerge.merge` then merges for
    any ``lam`` and ``weights`` (the merge advisor's search merges one preparation many times).

    Parameters
    ----------
    deltas : list of T dicts layer name -> tensor of shape (d_out, d_in), or (space "core")
        -> LoraFactors ``(B, A)``, B of shape (d_out, r_i), A of shape (r_i, d_in), the scale
        folded in; ranks may differ between tasks.
    method : MergeMethod or str
    grams : list of T dicts layer name -> tensor of shape (d_in, d_in), optional
        Required by RegMean (full space only), ignored by the other methods.
    seed : int
        Seed of the one CPU generator used across layers in sorted layer-name order (DARE).
    space : {"full", "core"}
    """
    merger = _resolve(method, params)
    check_choice("space", space, SPACES)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InputTypeError(f"seed must be an integer, got {seed!r}")
    if space == "core" and merger.needs_gram:
        raise OsrmInputError(f"space='core' does not support merge method {merger.name!r} (it needs Gram "
                         "matrices of the full input space); use space='full'")
    names = _check_tasks(deltas)
    layer_grams = _layer_grams(merger, grams, names, len(deltas))
    inputs: dict[str, list] = {}
    for name in names:
        layer = [t[name] for t in deltas]
        if space == "core":
            inputs[name] = check_factors(layer, f" for layer {name!r}")
        else:
            merger.check_inputs(layer, layer_grams[name], layer=name)
            inputs[name] = layer
    generator = torch.Generator().manual_seed(seed)
    layers, bases = {}, {}
    for name in sorted(names):
        if space == "core":
            factors = inputs[name]
            work = torch.promote_types(factors[0].B.dtype, torch.float32)
            u_b, cores, vh_a = core_space([LoraFactors(f.B.to(work), f.A.to(work)) for f in factors])
            bases[name] = (u_b, vh_a, factors[0].B.dtype)
            layer = merger.prepare(cores, generator=generator, shape=factors[0].shape, checked=True)
        else:
            layer = merger.prepare(inputs[name], gram=layer_grams[name], generator=generator, checked=True)
        layers[name] = layer
    return PreparedMerge(merger, space, {name: layers[name] for name in names}, bases)


def merge_deltas(
    deltas: list[dict[str, Any]] | PreparedMerge,
    method: MergeMethod | str | None = None,
    *,
    lam: float = 1.0,
    grams: list[dict[str, Tensor]] | None = None,
    seed: int = 0,
    weights: Sequence[float] | None = None,
    space: str = "full",
    **params: Any,
) -> dict[str, Any]:
    """Merge the deltas of every layer; all inputs are checked before anything is computed.

    Parameters
    ----------
    deltas : list of T dicts layer name -> tensor of shape (d_out, d_in), or a PreparedMerge
        All tasks (numbered from 0) must have the same layers and shapes. With ``space="core"``
        the values are LoraFactors ``(B, A)`` (see :func:`prepare_merge`). A PreparedMerge
        (from :func:`prepare_merge`) carries its method, grams, seed and space: give only
        ``lam`` and ``weights`` with it.
    method : MergeMethod or str
        Required unless ``deltas`` is a PreparedMerge.
    lam : float, >= 0
    grams : list of T dicts layer name -> tensor of shape (d_in, d_in), optional
        Gram matrices (token count times second moment) of each layer's inputs per task;
        required by RegMean, ignored by the other methods.
    seed : int
        Seed of the one CPU generator used across layers in sorted layer-name order.
    weights : list of T floats >= 0, optional
        Per-task weights: task i's delta enters the merge as ``w_i Delta_W_i``; all 1 by default.
    space : {"full", "core"}
        ``"core"`` merges LoRA factors in core space and returns factors.

    Returns
    -------
    dict layer name -> tensor of shape (d_out, d_in), or LoraFactors in core space
        In the layer order of ``deltas[0]``; dtype of the inputs.
    """
    if isinstance(deltas, PreparedMerge):
        if method is not None or grams is not None or params or space != deltas.space:
            raise OsrmInputError("a PreparedMerge carries its method, parameters, grams and space: "
                             "give only lam and weights with it")
        return deltas.merge(lam=lam, weights=weights)
    if method is None:
        raise OsrmInputError("method is required: a registered name or a MergeMethod")
    scale = check_scale(lam, weights, len(deltas) if isinstance(deltas, Sequence) else 0)
    return prepare_merge(deltas, method, grams=grams, seed=seed, space=space, **params)._merge(*scale)
