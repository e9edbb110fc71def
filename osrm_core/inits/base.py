"""What every init family shares: the registry entry (:class:`InitMethod`), rank and input
checks, and the weighted combination of the other tasks' statistics per layer."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from osrm_core.errors import InputTypeError, OsrmInputError
from osrm_core.params import ParamSpec
from osrm_core.spectra import Moment
from osrm_core.stats import FeatureStats, check_same_layers

Weighting = Literal["equal", "tokens"]


@dataclass(frozen=True)
class InitMethod:
    """A registered LoRA initialization.

    Attributes
    ----------
    name : str
        Registry name (``osrm``, ``standard``, ...).
    description : str
        One line for help texts and the app.
    color : str
        Its fixed colour in every figure.
    subspace : callable (own_stats, other_stats, rank, **options) -> dict layer -> (rank, d_in), optional
        For the data-driven inits of the OSRM family: ``A`` is ``a_scale`` times this subspace
        and ``B = 0``. Needs the feature statistics of the other tasks.
    needs_own_stats : bool
        Whether ``subspace`` also needs the task's own statistics (``own_stats`` may be None
        otherwise).
    peft_init : object
        peft's ``init_lora_weights`` value (``True`` for its default Kaiming init).
    needs_data : bool
        Whether peft needs batches of the task's own data (EVA).
    moves_base : bool
        Whether the init changes the base weights (PiSSA): a saved adapter must then be
        expressed relative to the original base.
    params : tuple of ParamSpec
        The init's options: keyword arguments of ``subspace`` with default, help and allowed
        values. A run config sets them in ``init_params`` (``{"osrm_gen": {"eps": 0.01}}``),
        the command line with ``--INIT-PARAM`` (``--osrm-gen-eps``), the app with a widget.
    """

    name: str
    description: str
    color: str
    subspace: Callable[..., dict[str, torch.Tensor]] | None = None
    needs_own_stats: bool = False
    peft_init: object = True
    needs_data: bool = False
    moves_base: bool = False
    params: tuple[ParamSpec, ...] = ()

    @property
    def needs_stats(self) -> bool:
        """Whether the init needs the feature statistics of the tasks."""
        return self.subspace is not None


def check_rank(rank: int, d: int, layer: str) -> None:
    if not isinstance(rank, int) or rank < 1:
        raise OsrmInputError(f"rank must be a positive integer, got {rank!r}")
    if rank > d:
        raise OsrmInputError(f"rank {rank} is larger than the width {d} of layer {layer!r}")


def check_others(other_stats: list[FeatureStats]) -> None:
    if isinstance(other_stats, FeatureStats):
        raise InputTypeError("other_stats must be a list of FeatureStats, got one FeatureStats")
    if not other_stats:
        raise OsrmInputError(
            "other_stats is empty: OSRM needs the statistics of at least one other task"
        )


def warn_if_few_tokens(rank: int, counts: list[int], d: int, layer: str, unit: str = "tokens") -> bool:
    """Warn when the other tasks' statistics rest on fewer tokens than the width: their moment
    is then rank-deficient, and OSRM's directions are partly chosen by a fixed rule, not by data."""
    n = sum(counts)
    if n >= d:
        return False
    warnings.warn(
        f"OSRM rank {rank} at {layer!r}: the other tasks' statistics rest on {n} {unit}, fewer than "
        f"the width {d}; at least {d - n} directions carry none of their energy, and the choice among "
        "them is a fixed rule, not the data (collect more samples)",
        stacklevel=5,
    )
    return True


def combine(mats: list[torch.Tensor], counts: list[int], weighting: Weighting) -> torch.Tensor:
    """Weighted mean of per-task matrices: equal weights, or weights proportional to counts."""
    if weighting == "equal":
        return sum(mats) / len(mats)
    if weighting == "tokens":
        total = sum(counts)
        return sum(m * (c / total) for m, c in zip(mats, counts))
    raise OsrmInputError(f"weighting must be 'equal' or 'tokens', got {weighting!r}")


def rest_moment(
    other_stats: list[FeatureStats], weighting: Weighting = "equal", moment: Moment = "second_moment"
) -> dict[str, torch.Tensor]:
    """``S_rest`` per layer: the weighted mean of the other tasks' second moments, (d, d)."""
    check_others(other_stats)
    names = check_same_layers(other_stats)
    out: dict[str, torch.Tensor] = {}
    for group in other_stats[0].groups():
        mats = [getattr(s.layers[group[0]], moment) for s in other_stats]
        combined = combine(mats, [s.layers[group[0]].count for s in other_stats], weighting)
        for name in group:
            out[name] = combined
    return {n: out[n] for n in names}


#: Where an eigendecomposition runs: None (where the statistics are), one device, or a device per
#: layer name (:func:`osrm_core.models.layer_devices`: each on the device of its layer).
Placement = torch.device | str | dict[str, torch.device] | None


def device_for(placement: Placement, name: str, fallback: torch.device) -> torch.device:
    if placement is None:
        return fallback
    if isinstance(placement, dict):
        return torch.device(placement.get(name, fallback))
    return torch.device(placement)


def per_group(stats: FeatureStats, fn) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for group in stats.groups():
        value = fn(group[0])
        for name in group:
            out[name] = value
    return {n: out[n] for n in stats.layers}


def others_of(all_stats: list[FeatureStats], task_index: int) -> list[FeatureStats]:
    """The statistics of every task but ``task_index``."""
    if not 0 <= task_index < len(all_stats):
        raise OsrmInputError(f"task_index must be in 0..{len(all_stats) - 1}, got {task_index}")
    return [s for i, s in enumerate(all_stats) if i != task_index]
