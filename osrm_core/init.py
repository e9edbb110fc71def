"""LoRA initialization: OSRM (Zhang & Zhou, ACL 2025), its variants, and peft's own baselines.

OSRM sets each task's ``A`` (shape (r, d_in)) to the eigenvectors of the ``r`` smallest
eigenvalues of the other tasks' feature second moment, with ``B = 0``, so that after merging
``A_i h_j`` (and so ``B_i A_i h_j``) is as small as it can be for orthonormal rows (Ky Fan):
``sum_j tr(A_i S_j A_i^T)`` equals the sum of those ``r`` eigenvalues.

References
----------
Zhang & Zhou, "Unraveling LoRA Interference: Orthogonal Subspaces for Robust Model Merging",
ACL 2025, arXiv:2505.22934.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Literal

import scipy.linalg
import torch
from torch import nn

from osrm_core.models import find_target_layers, head_module_names, layer_devices
from osrm_core.spectra import Moment, fix_signs, symmetric_eigh
from osrm_core.stats import FeatureStats, check_same_layers

InitMethod = Literal["standard", "osrm", "osrm_mean", "osrm_gen", "eva", "pissa"]
INIT_METHODS: tuple[str, ...] = ("standard", "osrm", "osrm_mean", "osrm_gen", "eva", "pissa")
OSRM_METHODS: tuple[str, ...] = ("osrm", "osrm_mean", "osrm_gen")
Weighting = Literal["equal", "tokens"]


def _check_rank(rank: int, d: int, layer: str) -> None:
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    if rank > d:
        raise ValueError(f"rank {rank} is larger than the width {d} of layer {layer!r}")


def _check_others(other_stats: list[FeatureStats]) -> None:
    if isinstance(other_stats, FeatureStats):
        raise TypeError("other_stats must be a list of FeatureStats, got one FeatureStats")
    if not other_stats:
        raise ValueError(
            "other_stats is empty: OSRM needs the statistics of at least one other task"
        )


def _warn_if_few_tokens(rank: int, counts: list[int], d: int, layer: str, unit: str = "tokens") -> bool:
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


def _combine(mats: list[torch.Tensor], counts: list[int], weighting: Weighting) -> torch.Tensor:
    """Weighted mean of per-task matrices: equal weights, or weights proportional to counts."""
    if weighting == "equal":
        return sum(mats) / len(mats)
    if weighting == "tokens":
        total = sum(counts)
        return sum(m * (c / total) for m, c in zip(mats, counts))
    raise ValueError(f"weighting must be 'equal' or 'tokens', got {weighting!r}")


def rest_moment(
    other_stats: list[FeatureStats], weighting: Weighting = "equal", moment: Moment = "second_moment"
) -> dict[str, torch.Tensor]:
    """``S_rest`` per layer: the weighted mean of the other tasks' second moments, (d, d)."""
    _check_others(other_stats)
    names = check_same_layers(other_stats)
    out: dict[str, torch.Tensor] = {}
    for group in other_stats[0].groups():
        mats = [getattr(s.layers[group[0]], moment) for s in other_stats]
        combined = _combine(mats, [s.layers[group[0]].count for s in other_stats], weighting)
        for name in group:
            out[name] = combined
    return {n: out[n] for n in names}


#: Where an eigendecomposition runs: None (where the statistics are), one device, or a device per
#: layer name (:func:`osrm_core.models.layer_devices`: each on the device of its layer).
Placement = torch.device | str | dict[str, torch.device] | None


def _device_for(placement: Placement, name: str, fallback: torch.device) -> torch.device:
    if placement is None:
        return fallback
    if isinstance(placement, dict):
        return torch.device(placement.get(name, fallback))
    return torch.device(placement)


def _per_group(stats: FeatureStats, fn) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for group in stats.groups():
        value = fn(group[0])
        for name in group:
            out[name] = value
    return {n: out[n] for n in stats.layers}


def osrm_subspace(
    other_stats: list[FeatureStats],
    rank: int,
    weighting: Weighting = "equal",
    moment: Moment = "second_moment",
    device: Placement = None,
) -> dict[str, torch.Tensor]:
    """OSRM's ``A`` per layer: eigenvectors of the ``rank`` smallest eigenvalues of ``S_rest``.

    Parameters
    ----------
    other_stats : list of FeatureStats
        The statistics of every task except the one being initialized.
    rank : int
    weighting : {"equal", "tokens"}
        Each other task counts the same, or in proportion to its token count.
    moment : {"second_moment", "covariance"}
    device : device, or dict of layer name to device, optional
        Where each layer's ``S_rest`` is formed and decomposed (default: where the statistics
        are). One layer's matrices are moved there at a time, so a GPU holds only those.

    Returns
    -------
    dict of str to tensor of shape (rank, d_in), float64, orthonormal rows, on that device
    """
    _check_others(other_stats)
    check_same_layers(other_stats)
    if moment not in ("second_moment", "covariance"):
        raise ValueError(f"moment must be 'second_moment' or 'covariance', got {moment!r}")
    warned = []

    def subspace(name: str) -> torch.Tensor:
        dev = _device_for(device, name, other_stats[0].layers[name].sum.device)
        mats = [getattr(s.layers[name].to(dev), moment) for s in other_stats]
        counts = [s.layers[name].count for s in other_stats]
        rest = _combine(mats, counts, weighting)
        _check_rank(rank, rest.shape[0], name)
        if not warned and _warn_if_few_tokens(rank, counts, rest.shape[0], name):
            warned.append(name)  # once per call, not once per layer
        return symmetric_eigh(rest).smallest(rank)

    return _per_group(other_stats[0], subspace)


def osrm_mean_subspace(
    other_stats: list[FeatureStats], rank: int, weighting: Weighting = "equal", device: Placement = None
) -> dict[str, torch.Tensor]:
    """The reference code's variant: the null space of the other tasks' per-sample mean features.

    The last ``rank`` right singular vectors of the stacked per-sample means (padding excluded)
    are the eigenvectors of the ``rank`` smallest eigenvalues of ``sum m m^T``. ``device`` as in
    :func:`osrm_subspace`.
    """
    _check_others(other_stats)
    check_same_layers(other_stats)

    def subspace(name: str) -> torch.Tensor:
        dev = _device_for(device, name, other_stats[0].layers[name].sum.device)
        mats = [
            s.layers[name].sum_sample_mean_outer.to(dev) / max(s.layers[name].n_samples, 1) for s in other_stats
        ]
        combined = _combine(mats, [s.layers[name].n_samples for s in other_stats], weighting)
        _check_rank(rank, combined.shape[0], name)
        return symmetric_eigh(combined).smallest(rank)

    return _per_group(other_stats[0], subspace)


def osrm_gen_subspace(
    own_stats: FeatureStats,
    other_stats: list[FeatureStats],
    rank: int,
    eps: float = 1e-2,
    weighting: Weighting = "equal",
    device: Placement = None,
) -> dict[str, torch.Tensor]:
    """Our variant: most own-task feature energy per unit of the other tasks' energy.

    Solves ``S_own v = mu (S_rest + eps * mean_eig(S_rest) * I) v`` and returns an orthonormal
    basis of the top ``rank`` generalized eigenvectors' span, rotated so that row ``k`` carries
    the ``k``-th most own-task energy within it.

    The generalized eigenproblem is solved by scipy on the CPU; the result is moved to
    ``device`` (as in :func:`osrm_subspace`).

    Returns
    -------
    dict of str to tensor of shape (rank, d_in), float64, orthonormal rows
    """
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    rest = rest_moment(other_stats, weighting)
    check_same_layers([own_stats, *other_stats])

    def subspace(name: str) -> torch.Tensor:
        s_own = own_stats.layers[name].second_moment
        d = s_own.shape[0]
        _check_rank(rank, d, name)
        s_rest = rest[name]
        # Relative to the mean eigenvalue; statistics without energy (no tokens) get eps itself.
        ridge = eps * (float(torch.trace(s_rest)) / d or 1.0)
        b = s_rest + ridge * torch.eye(d, dtype=s_rest.dtype, device=s_rest.device)
        _, vecs = scipy.linalg.eigh(s_own.cpu().numpy(), b.cpu().numpy(), subset_by_index=[d - rank, d - 1])
        q, _ = torch.linalg.qr(torch.from_numpy(vecs).to(s_own))
        inner = symmetric_eigh(q.T @ s_own @ q)
        basis = q @ inner.eigenvectors.flip(1)
        return fix_signs(basis).T.contiguous().to(_device_for(device, name, s_own.device))

    return _per_group(own_stats, subspace)


def task_subspaces(
    method: Literal["osrm", "osrm_mean", "osrm_gen"],
    all_stats: list[FeatureStats],
    task_index: int,
    rank: int,
    **options,
) -> dict[str, torch.Tensor]:
    """The subspace ``A`` for task ``task_index`` given the statistics of all tasks."""
    if not 0 <= task_index < len(all_stats):
        raise ValueError(f"task_index must be in 0..{len(all_stats) - 1}, got {task_index}")
    others = [s for i, s in enumerate(all_stats) if i != task_index]
    if method == "osrm":
        return osrm_subspace(others, rank, **options)
    if method == "osrm_mean":
        return osrm_mean_subspace(others, rank, **options)
    if method == "osrm_gen":
        return osrm_gen_subspace(all_stats[task_index], others, rank, **options)
    raise ValueError(f"method {method!r} has no subspace; allowed: {', '.join(OSRM_METHODS)}")


def lora_config(
    method: InitMethod,
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

    init_weights: object = {"eva": "eva", "pissa": "pissa"}.get(method, True)
    extra = {"eva_config": EvaConfig(rho=1.0)} if method == "eva" else {}
    return LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        init_lora_weights=init_weights,
        modules_to_save=modules_to_save,
        fan_in_fan_out=fan_in_fan_out,
        **extra,
    )


def init_lora(
    model: nn.Module,
    method: InitMethod = "standard",
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
    method : {"standard", "osrm", "osrm_mean", "osrm_gen", "eva", "pissa"}
        ``standard`` (Kaiming A, B = 0), ``eva`` and ``pissa`` come from peft. The OSRM variants
        set ``A = a_scale * subspace`` and ``B = 0``.
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

    if method not in INIT_METHODS:
        raise ValueError(f"method {method!r} is unknown: allowed are {', '.join(INIT_METHODS)}")
    if hasattr(model, "peft_config"):
        raise ValueError("model already has LoRA adapters; pass the base model")
    if not a_scale > 0:
        raise ValueError(f"a_scale must be > 0, got {a_scale}")
    targets = find_target_layers(model, target_modules)
    for t in targets:
        _check_rank(rank, min(t.d_in, t.d_out), t.name)
    if method in OSRM_METHODS and subspaces is None:
        # Decompose each layer's matrices on the device of that layer (GPUs of a large model).
        subspace_options.setdefault("device", layer_devices(model, [t.name for t in targets]))
        if other_stats is None or (method == "osrm_gen" and own_stats is None):
            raise ValueError(
                f"method {method!r} needs subspaces, or other_stats"
                + (" and own_stats" if method == "osrm_gen" else "")
            )
        if method == "osrm":
            subspaces = osrm_subspace(other_stats, rank, **subspace_options)
        elif method == "osrm_mean":
            subspaces = osrm_mean_subspace(other_stats, rank, **subspace_options)
        else:
            subspaces = osrm_gen_subspace(own_stats, other_stats, rank, **subspace_options)
    if method in OSRM_METHODS:
        missing = [t.name for t in targets if t.name not in subspaces]
        if missing:
            raise ValueError(f"subspaces have no entry for layer {missing[0]!r}")
        for t in targets:
            if tuple(subspaces[t.name].shape) != (rank, t.d_in):
                raise ValueError(
                    f"size mismatch for layer {t.name!r}: subspace {tuple(subspaces[t.name].shape)},"
                    f" expected ({rank}, {t.d_in})"
                )
    if method == "eva" and eva_batches is None:
        raise ValueError("method 'eva' needs eva_batches (input_ids and attention_mask)")

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
    if method == "eva":
        from peft import initialize_lora_eva_weights

        initialize_lora_eva_weights(peft_model, dataloader=eva_batches)
    base = peft_model.get_base_model()
    with torch.no_grad():
        for t in targets:
            layer = base.get_submodule(t.name)
            if method in OSRM_METHODS:
                a = layer.lora_A["default"].weight
                a.copy_(a_scale * subspaces[t.name].to(a))
                layer.lora_B["default"].weight.zero_()
            layer.lora_A["default"].weight.requires_grad_(not freeze_a)
            layer.lora_B["default"].weight.requires_grad_(not freeze_b)
    peft_model.osrm_init_ = {"method": method, "rank": rank, "alpha": alpha, "a_scale": a_scale}
    return peft_model
