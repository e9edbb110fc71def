"""Merging whole adapters and writing the result: a PEFT adapter (exact or SVD-truncated) or
full merged weights. Each task keeps its own classification head, written beside the merge."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from osrm_core.adapters import Adapter, LoraWeights, write_adapter
from osrm_core.stats import FeatureStats


def merge_adapters(
    adapters: dict[str, Adapter],
    method: str = "task_arithmetic",
    *,
    lam: float = 1.0,
    weights: Sequence[float] | None = None,
    stats: dict[str, FeatureStats] | None = None,
    seed: int = 0,
    **params,
) -> dict[str, torch.Tensor]:
    """Merge the adapters' ``Delta_W`` per layer with a registered merge method.

    ``weights`` (one per adapter, >= 0) scale each adapter's delta before the merge, as the
    merge advisor's per-adapter weights do; ``lam`` scales the result.

    Returns
    -------
    dict of layer to merged delta, shape (d_out, d_in), float32
    """
    from osrm_core.merge import get_merge_method, merge_deltas

    if len(adapters) < 1:
        raise ValueError("merge_adapters needs at least one adapter")
    names = list(adapters)
    weights = [1.0] * len(names) if weights is None else list(weights)
    if len(weights) != len(names) or not all(isinstance(w, int | float) and 0 <= w < float("inf") for w in weights):
        raise ValueError(f"weights {weights} must be {len(names)} finite numbers >= 0, one per adapter")
    layers = sorted(adapters[names[0]].layers)
    for n in names[1:]:
        if sorted(adapters[n].layers) != layers:
            diff = sorted(set(adapters[n].layers) ^ set(layers))
            raise ValueError(f"adapter {n!r} adapts other layers than {names[0]!r} (e.g. {diff[0]!r})")
        for layer in layers:  # else the merge fails deep inside torch (adapters of other models)
            a, b = adapters[names[0]].layers[layer], adapters[n].layers[layer]
            if (a.B.shape[0], a.A.shape[1]) != (b.B.shape[0], b.A.shape[1]):
                raise ValueError(
                    f"size mismatch for layer {layer!r}: adapter {n!r} is {b.B.shape[0]}x{b.A.shape[1]}, "
                    f"adapter {names[0]!r} is {a.B.shape[0]}x{a.A.shape[1]} (adapters of other base models?)"
                )
    grams = None
    if get_merge_method(method, **params).needs_gram:
        if stats is None or any(n not in stats for n in names):
            raise ValueError(f"merge method {method!r} needs the feature statistics of every task")
        grams = [{layer: stats[n].layers[layer].gram for layer in layers} for n in names]
    deltas = [{k: w * d for k, d in adapters[n].deltas().items()} for n, w in zip(names, weights)]
    return merge_deltas(deltas, method, lam=lam, grams=grams, seed=seed, **params)


def _svdvals_at_precision(delta: torch.Tensor) -> torch.Tensor:
    """Singular values (computed in float64) in the delta's dtype, float32 at least."""
    s = torch.linalg.svdvals(delta.double())
    return s if delta.dtype == torch.float64 else s.float()


def write_merged_adapter(
    path: str | Path,
    merged: dict[str, torch.Tensor],
    adapters: dict[str, Adapter] | None = None,
    *,
    rank: int | None = None,
) -> Path:
    """Write merged deltas as one PEFT LoRA adapter.

    With ``rank`` None the rank is the largest numerical rank over layers, so ``B @ A``
    reproduces every merged delta (exact); a smaller ``rank`` truncates by SVD. Each task's
    head from ``adapters`` is written to ``heads/<task>.safetensors``.
    """
    from safetensors.torch import save_file

    from osrm_core.atomic import atomic_path
    from osrm_core.merge import low_rank_factors
    from osrm_core.merge.factor import numerical_rank

    if rank is None:
        # The tolerance is that of the deltas' own precision: float32 rounding noise would
        # otherwise count as rank and make the "exact" adapter full rank.
        rank = max(
            max(1, numerical_rank(_svdvals_at_precision(d), tuple(d.shape))) for d in merged.values()
        )
    layers = {}
    for name, delta in merged.items():
        k = min(rank, *delta.shape)
        B, A = low_rank_factors(delta.double(), k)
        if k < rank:  # pad so every layer has one rank
            A = torch.cat([A, A.new_zeros(rank - k, A.shape[1])])
            B = torch.cat([B, B.new_zeros(B.shape[0], rank - k)], 1)
        layers[name] = LoraWeights(A.float(), B.float(), 1.0)
    config = dict(next(iter(adapters.values())).config) if adapters else {"peft_type": "LORA"}
    # The heads are per task (under heads/), so the merged adapter carries none: with
    # task_type SEQ_CLS peft would add the classifier to modules_to_save and fail to load it.
    config["modules_to_save"] = None
    config["task_type"] = None
    out = write_adapter(path, layers, config)
    for task, adapter in (adapters or {}).items():
        if adapter.head:
            with atomic_path(out / "heads" / f"{task}.safetensors") as tmp:
                save_file({k: v.float().contiguous() for k, v in adapter.head.items()}, str(tmp))
    return out


def write_merged_model(model: nn.Module, tokenizer, merged: dict[str, torch.Tensor], path: str | Path) -> Path:
    """Add the merged deltas to a copy of ``model``'s weights and ``save_pretrained`` it."""
    import copy

    from osrm_core.models import weight_as_linear

    merged_model = copy.deepcopy(model)
    with torch.no_grad():
        for name, delta in merged.items():
            w = weight_as_linear(merged_model.get_submodule(name))
            w += delta.to(w.device, w.dtype)
    path = Path(path)
    merged_model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
