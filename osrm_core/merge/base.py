"""The ``MergeMethod`` base class: declared parameters, input checks, dtypes and the scale ``lam``.

A merge method combines the per-layer weight deltas ``Delta_W_i = s_i * B_i @ A_i`` of T tasks,
each a tensor of shape (d_out, d_in), into one delta of the same shape. Subclasses implement
``combine`` (the unscaled combination of the weighted deltas), or ``prepare_layer`` (the
per-task, weight-independent work: trimming, random drops, SVDs) and ``combine_prepared`` (the
rest, for one weight vector). ``MergeMethod.prepare`` checks the inputs and computes in float32
(float64 inputs stay float64); ``MergeMethod.merge`` weights the tasks, scales by ``lam`` and
returns the inputs' dtype.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from osrm_core.errors import InputTypeError, OsrmInputError
from osrm_core.params import ParamSpec, check_real

#: Seed of the generator used when ``merge`` is called without one, so results stay reproducible.
DEFAULT_SEED = 0


@dataclass
class MergeParams:
    """Parameters of a merge method (none here).

    Subclasses add dataclass fields made by :func:`~osrm_core.params.number_param` (a number
    in an interval) or :func:`~osrm_core.params.choice_param` (a ``Literal`` type); each value
    is checked here against its spec, and the command line, the config and the app's widgets
    are built from the same specs (:meth:`MergeMethod.param_specs`).
    """

    def __post_init__(self) -> None:
        for spec in param_specs_of(type(self)):
            setattr(self, spec.name, spec.check(getattr(self, spec.name)))


def param_specs_of(params_type: type[MergeParams]) -> list[ParamSpec]:
    """The :class:`ParamSpec` of every field of a parameter dataclass."""
    hints = typing.get_type_hints(params_type)
    out = []
    for f in fields(params_type):
        choices = typing.get_args(hints[f.name]) if typing.get_origin(hints[f.name]) is Literal else None
        out.append(ParamSpec(f.name, f.default, f.metadata.get("help", ""), choices, f.metadata.get("range"),
                             f.metadata.get("interval")))
    return out


def check_weights(weights: Sequence[float] | None, n_tasks: int) -> list[float]:
    """The per-task weights as floats (all 1 when None), or ValueError naming what is allowed."""
    if weights is None:
        return [1.0] * n_tasks
    if isinstance(weights, (str, Tensor)) or not isinstance(weights, Sequence) or len(weights) != n_tasks:
        raise OsrmInputError(f"weights must be {n_tasks} numbers >= 0 (one per task), got {weights!r}")
    return [check_real(f"weights[{i}]", w, low=0.0, high=math.inf, high_open=True) for i, w in enumerate(weights)]


def weight_rows(stacked: Tensor, weights: list[float]) -> Tensor:
    """``stacked`` (T, ...) with row i times ``weights[i]`` (itself when all weights are 1)."""
    if all(w == 1.0 for w in weights):
        return stacked
    w = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device)
    return stacked * w.reshape(-1, *([1] * (stacked.ndim - 1)))


def check_scale(lam: float, weights: Sequence[float] | None, n_tasks: int) -> tuple[float, list[float]]:
    """The scale ``lam`` (>= 0) and the per-task weights (all 1 when None), checked once per merge."""
    return check_real("lam", lam, low=0.0, high=math.inf, high_open=True), check_weights(weights, n_tasks)


@dataclass(frozen=True)
class PreparedLayer:
    """One layer's deltas after a method's weight-independent work (:meth:`MergeMethod.prepare`).

    Attributes
    ----------
    method : str
        Registry name of the method that prepared it.
    params : MergeParams
        Its parameters (a preparation is only valid for the same ones).
    n_tasks : int
    shape : (int, int)
        Shape of the deltas (and of the merge).
    full_shape : (int, int)
        (d_out, d_in) of the layer (differs from ``shape`` in core space).
    dtype : torch.dtype
        Dtype of the inputs, that of the merge.
    data : object
        What the method's ``combine_prepared`` reads.
    """

    method: str
    params: MergeParams
    n_tasks: int
    shape: tuple[int, int]
    full_shape: tuple[int, int]
    dtype: torch.dtype
    data: Any = field(repr=False)


def _at(layer: str | None) -> str:
    return "" if layer is None else f" for layer {layer!r}"


class MergeMethod:
    """A way of merging the weight deltas of several tasks at one layer.

    Parameters
    ----------
    **params
        Values for the fields of ``params_type``; unknown names or invalid values raise
        ValueError naming the parameter, the value and what is allowed.

    Attributes
    ----------
    name : str
        Registry name, e.g. ``"ties"``.
    reference : str
        URL of the paper that defines the method.
    summary : str
        What the method does, in one sentence for a user (CLI help, the Learn page).
    low_rank : bool
        Whether the merge of LoRA deltas stays low-rank (at most the sum of the parts' ranks per
        layer); entry-wise (TIES, DARE) and Gram-weighted (RegMean) merges are full rank.
    params_type : type of MergeParams
        Dataclass of the method's parameters, with defaults and help text.
    params : MergeParams
        The parameters of this instance.
    needs_gram : bool
        Whether ``combine`` needs the Gram matrices of the layer inputs (RegMean).
    uses_density : bool
        Whether the method has a ``density`` parameter worth sweeping.
    """

    name: ClassVar[str]
    reference: ClassVar[str]
    summary: ClassVar[str] = ""
    low_rank: ClassVar[bool] = False
    params_type: ClassVar[type[MergeParams]] = MergeParams
    needs_gram: ClassVar[bool] = False
    uses_density: ClassVar[bool] = False

    def __init__(self, **params: Any) -> None:
        allowed = [f.name for f in fields(self.params_type)]
        for key, value in params.items():
            if key not in allowed:
                raise OsrmInputError(
                    f"unknown parameter {key}={value!r} for merge method {self.name!r}; "
                    f"allowed: {', '.join(allowed) if allowed else 'none'}"
                )
        self.params = self.params_type(**params)

    @classmethod
    def param_specs(cls) -> list[ParamSpec]:
        """The method's parameters with default, help, and choices or range: what the command
        line's flags, the config's sweep grid and the app's widgets are built from."""
        return param_specs_of(cls.params_type)

    def __repr__(self) -> str:
        args = ", ".join(f"{f.name}={getattr(self.params, f.name)!r}" for f in fields(self.params))
        return f"{type(self).__name__}({args})"

    def prepare_layer(self, deltas: list[Tensor], gram: list[Tensor] | None, generator: torch.Generator,
                      shape: tuple[int, int]) -> Any:
        """The weight-independent work on one layer's deltas, done once for many weight vectors.

        The default keeps the deltas and Gram matrices; methods with per-task work (trimming,
        random drops, SVDs) override it and :meth:`combine_prepared`.

        Parameters
        ----------
        deltas : list of T tensors of shape (m, n)
            Already checked, all float32 or all float64; (m, n) = ``shape`` in full space, the
            core size in core space.
        gram : list of T tensors of shape (n, n), or None
            None unless ``needs_gram``.
        generator : torch.Generator
            Source of all randomness (CPU generator).
        shape : (int, int)
            (d_out, d_in) of the layer, which rank budgets and numerical-rank tolerances use, so
            that a merge in core space keeps the budgets of the full layer.
        """
        return deltas, gram

    def combine_prepared(self, prepared: Any, weights: list[float], shape: tuple[int, int]) -> Tensor:
        """Unscaled combination of the prepared deltas with per-task ``weights`` (each >= 0).

        The default is :meth:`combine` of ``w_i * Delta_i``. Returns a tensor of the deltas' shape.
        """
        deltas, gram = prepared
        scaled = [d if w == 1.0 else w * d for d, w in zip(deltas, weights, strict=True)]
        return self.combine(scaled, gram, shape)

    def combine(self, deltas: list[Tensor], gram: list[Tensor] | None, shape: tuple[int, int]) -> Tensor:
        """Unscaled combination of the (weighted) deltas.

        Parameters
        ----------
        deltas : list of T tensors of shape (m, n)
            All float32 or all float64.
        gram : list of T tensors of shape (n, n), or None
            Gram matrices of the layer inputs per task; None unless ``needs_gram``.
        shape : (int, int)
            (d_out, d_in) of the layer (see :meth:`prepare_layer`).

        Returns
        -------
        tensor of shape (m, n)
        """
        raise NotImplementedError

    def check_inputs(
        self,
        deltas: Sequence[Tensor],
        gram: Sequence[Tensor] | None = None,
        *,
        layer: str | None = None,
    ) -> None:
        """Raise ValueError if ``deltas`` (and ``gram`` when needed) cannot be merged."""
        at = _at(layer)
        if not isinstance(deltas, Sequence) or isinstance(deltas, (str, Tensor)):
            raise InputTypeError(f"deltas{at} must be a list of tensors, got {type(deltas).__name__}")
        if len(deltas) == 0:
            raise OsrmInputError(f"deltas{at} is empty: give one delta per task (at least one)")
        for i, d in enumerate(deltas):
            if not isinstance(d, Tensor):
                raise InputTypeError(f"delta of task {i}{at} is not a tensor: {type(d).__name__}")
            if d.ndim != 2:
                raise OsrmInputError(
                    f"delta of task {i}{at} must have shape (d_out, d_in), got {tuple(d.shape)}"
                )
            if not d.is_floating_point():
                raise OsrmInputError(f"delta of task {i}{at} must be floating-point, got {d.dtype}")
            ref = deltas[0]
            if d.shape != ref.shape:
                raise OsrmInputError(
                    f"size mismatch{at}: delta of task {i} has shape {tuple(d.shape)}, "
                    f"task 0 has {tuple(ref.shape)}"
                )
            if d.dtype != ref.dtype or d.device != ref.device:
                raise OsrmInputError(
                    f"delta of task {i}{at} is {d.dtype} on {d.device}, "
                    f"task 0 is {ref.dtype} on {ref.device}: all must match"
                )
            if not bool(torch.isfinite(d).all()):
                raise OsrmInputError(f"delta of task {i}{at} contains NaN or Inf")
        if self.needs_gram:
            self._check_gram(len(deltas), deltas[0].shape[1], gram, at)

    def _check_gram(self, n_tasks: int, d_in: int, gram: Sequence[Tensor] | None, at: str) -> None:
        if gram is None:
            raise OsrmInputError(
                f"merge method {self.name!r} needs the Gram matrices of the layer inputs{at} "
                f"(one tensor of shape (d_in, d_in) per task)"
            )
        if not isinstance(gram, Sequence) or len(gram) != n_tasks:
            size = len(gram) if isinstance(gram, Sequence) else type(gram).__name__
            raise OsrmInputError(f"need {n_tasks} Gram matrices{at} (one per task), got {size}")
        for i, g in enumerate(gram):
            if not isinstance(g, Tensor):
                raise InputTypeError(f"Gram matrix of task {i}{at} is not a tensor: {type(g).__name__}")
            if not g.is_floating_point():
                raise OsrmInputError(
                    f"Gram matrix of task {i}{at} must be floating-point, got {g.dtype}"
                )
            if tuple(g.shape) != (d_in, d_in):
                raise OsrmInputError(
                    f"size mismatch{at}: Gram matrix of task {i} has shape {tuple(g.shape)}, "
                    f"expected ({d_in}, {d_in})"
                )
            if not bool(torch.isfinite(g).all()):
                raise OsrmInputError(f"Gram matrix of task {i}{at} contains NaN or Inf")

    @torch.no_grad()
    def prepare(
        self,
        deltas: Sequence[Tensor],
        *,
        gram: Sequence[Tensor] | None = None,
        generator: torch.Generator | None = None,
        shape: tuple[int, int] | None = None,
        checked: bool = False,
    ) -> PreparedLayer:
        """Check the deltas of one layer and do the method's weight-independent work on them.

        Parameters
        ----------
        deltas : list of T tensors of shape (m, n)
        gram : list of T tensors of shape (n, n), optional
            Required when ``needs_gram``, ignored otherwise.
        generator : torch.Generator, optional
            Randomness for DARE; when None, a fresh CPU generator seeded with ``DEFAULT_SEED``.
        shape : (int, int), optional
            (d_out, d_in) of the layer when the deltas are core matrices; default (m, n).
        checked : bool
            The inputs were checked already (by :func:`osrm_core.merge.merge_deltas`).

        Returns
        -------
        PreparedLayer
            To give to :meth:`merge` with any number of weight vectors.
        """
        if not checked:
            self.check_inputs(deltas, gram)
        dtype = deltas[0].dtype
        work = torch.promote_types(dtype, torch.float32)  # half precision is too coarse for SVD
        if generator is None:
            generator = torch.Generator().manual_seed(DEFAULT_SEED)
        full = tuple(deltas[0].shape) if shape is None else (int(shape[0]), int(shape[1]))
        data = self.prepare_layer(
            [d.to(work) for d in deltas], list(gram) if self.needs_gram else None, generator, full
        )
        return PreparedLayer(self.name, self.params, len(deltas), tuple(deltas[0].shape), full, dtype, data)

    @torch.no_grad()
    def merge(
        self,
        deltas: Sequence[Tensor] | PreparedLayer,
        *,
        lam: float = 1.0,
        gram: Sequence[Tensor] | None = None,
        generator: torch.Generator | None = None,
        weights: Sequence[float] | None = None,
    ) -> Tensor:
        """Merged delta ``lam * combine(w_1 Delta_1, ..., w_T Delta_T)``.

        Parameters
        ----------
        deltas : list of T tensors of shape (d_out, d_in), or a PreparedLayer
            A :class:`PreparedLayer` from :meth:`prepare` of this method skips the checks and the
            weight-independent work (then ``gram`` and ``generator`` must be None).
        lam : float, >= 0
            Scale of the combination.
        gram : list of T tensors of shape (d_in, d_in), optional
            Required when ``needs_gram``, ignored otherwise.
        generator : torch.Generator, optional
            Randomness for DARE; when None, a fresh CPU generator seeded with ``DEFAULT_SEED``.
        weights : list of T floats >= 0, optional
            Per-task weights, all 1 by default.

        Returns
        -------
        tensor of shape (d_out, d_in), dtype and device of the inputs
        """
        if isinstance(deltas, PreparedLayer):
            if deltas.method != self.name or deltas.params != self.params:
                raise OsrmInputError(f"deltas prepared by {deltas.method!r} with {deltas.params}; this is {self!r}: "
                                     "prepare them with this method")
            if gram is not None or generator is not None:
                raise OsrmInputError("gram and generator go to prepare(), not to merge() of prepared deltas")
            lam, w = check_scale(lam, weights, deltas.n_tasks)
            return self.merged(deltas, lam, w)
        self.check_inputs(deltas, gram)
        lam, w = check_scale(lam, weights, len(deltas))
        return self.merged(self.prepare(deltas, gram=gram, generator=generator, checked=True), lam, w)

    def merged(self, prepared: PreparedLayer, lam: float, weights: list[float]) -> Tensor:
        """``lam * combine_prepared`` in the inputs' dtype, for ``lam`` and ``weights`` already
        checked (:func:`check_scale`): the one place where the scale and the weights enter."""
        return (lam * self.combine_prepared(prepared.data, weights, prepared.full_shape)).to(prepared.dtype)
