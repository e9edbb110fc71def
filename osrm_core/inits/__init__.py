"""LoRA initialization: a registry of init families, one module each, and the one dispatch point.

* :mod:`.osrm` — OSRM (Zhang & Zhou, ACL 2025) and the reference code's mean-null-space variant;
* :mod:`.osrm_gen` — our generalized-eigenvector variant;
* :mod:`.peft_inits` — peft's standard (Kaiming), EVA and PiSSA, the baselines.

Each is an :class:`InitMethod` registered by name with what it needs (the tasks' statistics,
the task's own data) and its figure colour; the command line's choices, config validation, the
app's choices and the plot colours all read :data:`INITS`. To add an init, write its module
with an ``InitMethod`` and add it to the tuple below.

References
----------
Zhang & Zhou, "Unraveling LoRA Interference: Orthogonal Subspaces for Robust Model Merging",
ACL 2025, arXiv:2505.22934.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from osrm_core.errors import OsrmInputError
from osrm_core.models import find_target_layers, head_module_names, layer_devices
from osrm_core.stats import FeatureStats

from .base import InitMethod, Weighting, check_rank, others_of, rest_moment
from .osrm import OSRM, OSRM_MEAN, osrm_mean_subspace, osrm_subspace, rest_spectrum
from .osrm_gen import OSRM_GEN, osrm_gen_subspace
from .peft_inits import EVA, PISSA, STANDARD

__all__ = [
    "INITS",
    "INIT_METHODS",
    "OSRM_METHODS",
    "InitMethod",
    "Weighting",
    "get_init",
    "init_lora",
    "lora_config",
    "osrm_gen_subspace",
    "osrm_mean_subspace",
    "osrm_subspace",
    "rest_moment",
    "rest_spectrum",
    "task_subspaces",
]

INITS: dict[str, InitMethod] = {m.name: m for m in (STANDARD, OSRM, OSRM_MEAN, OSRM_GEN, EVA, PISSA)}
INIT_METHODS: tuple[str, ...] = tuple(INITS)
#: The inits with a subspace from the tasks' statistics (the OSRM family).
OSRM_METHODS: tuple[str, ...] = tuple(n for n, m in INITS.items() if m.needs_stats)


def get_init(name: str) -> InitMethod:
    """The init registered as ``name``; ValueError listing the known ones otherwise."""
    if not isinstance(name, str) or name not in INITS:
        raise OsrmInputError(f"unknown init {name!r}; allowed: {', '.join(INITS)}")
    return INITS[name]


def task_subspaces(method: str, all_stats: list[FeatureStats], task_index: int, rank: int, **options) -> dict[str, torch.Tensor]:
    """The subspace ``A`` for task ``task_index`` given the statistics of all tasks."""
    spec = get_init(method)
    if not spec.needs_stats:
        raise OsrmInputError(f"method {method!r} has no subspace; allowed: {', '.join(OSRM_METHODS)}")
    others = others_of(all_stats, task_index)
    return spec.subspace(all_stats[task_index], others, rank, **options)


def lora_config(
    method: str,
    rank: int,
    alpha: float,
    target_modules: list[str],
    *,
    dropout: float = 0.0,
    modules_to_save: list[str] | None = None,
    fan_in_fan_out: bool = False,
):
    """The peft ``LoraConfig`` for ``method`` (OSRM variants start from peft's default init).

    ``fan_in_fan_out`` must be True when the targets are GPT-2 ``Conv1D`` layers (weight stored
    as (d_in, d_out)); :func:`init_lora` sets it from the model.
    """
    from peft import EvaConfig, LoraConfig, TaskType

    spec = get_init(method)
    extra = {"eva_config": EvaConfig(rho=1.0)} if spec.needs_data else {}
    return LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        init_lora_weights=spec.peft_init,
        modules_to_save=modules_to_save,
        fan_in_fan_out=fan_in_fan_out,
        **extra,
    )


def init_lora(
    model: nn.Module,
    method: str = "standard",
    rank: int = 8,
    alpha: float = 16,
    target_modules: list[str] | None = None,
    *,
    subspaces: dict[str, torch.Tensor] | None = None,
    own_stats: FeatureStats | None = None,
    other_stats: list[FeatureStats] | None = None,
    eva_batches: Iterable[dict[str, torch.Tensor]] | None = None,
    a_scale: float = 1.0,
    freeze_a: bool = False,
    freeze_b: bool = False,
    dropout: float = 0.0,
    seed: int = 0,
    **subspace_options,
):
    """Wrap ``model`` (in place) in a peft ``PeftModel`` with LoRA initialized by ``method``.

    Parameters
    ----------
    model : nn.Module
        A base sequence-classification model (see :func:`osrm_core.models.load_base_model`).
    method : str
        A name of :data:`INITS`: ``standard`` (Kaiming A, B = 0), ``eva`` and ``pissa`` come
        from peft; the OSRM family sets ``A = a_scale * subspace`` and ``B = 0``.
    subspaces : dict of str to tensor (rank, d_in), optional
        Precomputed OSRM ``A`` per layer; otherwise computed from ``own_stats``/``other_stats``.
    eva_batches : iterable of batches, optional
        Batches with ``input_ids`` and ``attention_mask`` (no labels) for EVA.
    a_scale : float
        Scale of the OSRM ``A`` rows (orthonormal rows have norm 1).
    freeze_a, freeze_b : bool
        Make ``A`` or ``B`` non-trainable.
    seed : int
        Seeds peft's random initialization (in a forked RNG; the global RNG is untouched).

    Returns
    -------
    peft.PeftModel
        With the task's classification head trainable (``modules_to_save``).
    """
    from peft import get_peft_model

    spec = get_init(method)
    if hasattr(model, "peft_config"):
        raise OsrmInputError("model already has LoRA adapters; pass the base model")
    if not a_scale > 0:
        raise OsrmInputError(f"a_scale must be > 0, got {a_scale}")
    targets = find_target_layers(model, target_modules)
    for t in targets:
        check_rank(rank, min(t.d_in, t.d_out), t.name)
    if spec.needs_stats:
        subspaces = _subspaces(spec, model, targets, rank, subspaces, own_stats, other_stats, subspace_options)
    if spec.needs_data and eva_batches is None:
        raise OsrmInputError(f"method {method!r} needs eva_batches (input_ids and attention_mask)")

    config = lora_config(
        method,
        rank,
        alpha,
        [t.name for t in targets],
        dropout=dropout,
        modules_to_save=head_module_names(model),
        fan_in_fan_out=any(t.fan_in_fan_out for t in targets),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, config)
    if spec.needs_data:
        from peft import initialize_lora_eva_weights

        initialize_lora_eva_weights(peft_model, dataloader=eva_batches)
    _set_lora_weights(peft_model, targets, subspaces if spec.needs_stats else None, a_scale, freeze_a, freeze_b)
    peft_model.osrm_init_ = {"method": method, "rank": rank, "alpha": alpha, "a_scale": a_scale}
    return peft_model


def _subspaces(spec: InitMethod, model: nn.Module, targets: list, rank: int, subspaces: dict[str, torch.Tensor] | None,
               own_stats: FeatureStats | None, other_stats: list[FeatureStats] | None,
               options: dict) -> dict[str, torch.Tensor]:
    """The given ``subspaces`` (checked: one of shape (rank, d_in) per target layer), or those
    ``spec`` computes from the statistics."""
    if subspaces is None:
        if other_stats is None or (spec.needs_own_stats and own_stats is None):
            raise OsrmInputError(
                f"method {spec.name!r} needs subspaces, or other_stats" + (" and own_stats" if spec.needs_own_stats else "")
            )
        # Decompose each layer's matrices on the device of that layer (GPUs of a large model).
        options.setdefault("device", layer_devices(model, [t.name for t in targets]))
        subspaces = spec.subspace(own_stats, other_stats, rank, **options)
    missing = [t.name for t in targets if t.name not in subspaces]
    if missing:
        raise OsrmInputError(f"subspaces have no entry for layer {missing[0]!r}")
    for t in targets:
        if tuple(subspaces[t.name].shape) != (rank, t.d_in):
            raise OsrmInputError(
                f"size mismatch for layer {t.name!r}: subspace {tuple(subspaces[t.name].shape)},"
                f" expected ({rank}, {t.d_in})"
            )
    return subspaces


@torch.no_grad()
def _set_lora_weights(peft_model, targets: list, subspaces: dict[str, torch.Tensor] | None, a_scale: float,
                      freeze_a: bool, freeze_b: bool) -> None:
    """``A = a_scale * subspace`` and ``B = 0`` where ``subspaces`` are given; A and B frozen as asked."""
    base = peft_model.get_base_model()
    for t in targets:
        layer = base.get_submodule(t.name)
        if subspaces is not None:
            a = layer.lora_A["default"].weight
            a.copy_(a_scale * subspaces[t.name].to(a))
            layer.lora_B["default"].weight.zero_()
        layer.lora_A["default"].weight.requires_grad_(not freeze_a)
        layer.lora_B["default"].weight.requires_grad_(not freeze_b)
