"""Merging whole adapters and writing the result: a PEFT adapter (exact or SVD-truncated) or
full merged weights. Each task keeps its own classification head, written beside the merge."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from osrm_core.adapters import Adapter, LoraWeights, aligned_deltas, num_labels_of, write_adapter
from osrm_core.stats import FeatureStats


def merge_inputs(
    adapters: dict[str, Adapter], stats: dict[str, FeatureStats] | None = None
) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]] | None]:
    """What a merge method reads: each adapter's deltas over the union of adapted layers (zero
    where an adapter has no weights, see :func:`osrm_core.adapters.aligned_deltas`) and, with
    ``stats``, each task's Gram matrix at those layers (with the bias input ``1`` appended where
    the deltas carry a bias column). Tasks are matched to adapters by name.
    """
    deltas = aligned_deltas(adapters)
    if stats is None:
        return deltas, None
    missing = [n for n in adapters if n not in stats]
    if missing:
        raise ValueError(f"no feature statistics for adapter {missing[0]!r}; tasks are {sorted(stats)}")
    grams = []
    for name, task_deltas in zip(adapters, deltas, strict=True):
        grams.append({})
        for layer, delta in task_deltas.items():
            if layer not in stats[name].layers:
                raise ValueError(f"statistics of task {name!r} have no layer {layer!r}")
            ls = stats[name].layers[layer]
            gram = ls.gram
            if delta.shape[1] == ls.d + 1:  # [h; 1]: sum h h^T, sum h, token count
                total = torch.tensor([[float(ls.count)]], dtype=gram.dtype, device=gram.device)
                gram = torch.cat([torch.cat([gram, ls.sum[:, None]], 1), torch.cat([ls.sum[None], total], 1)], 0)
            grams[-1][layer] = gram
    return deltas, grams


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

    Adapters may cover different layers: the merge is over the union, each adapter contributing
    zero where it has no weights. ``weights`` (one per adapter, >= 0) scale each adapter's delta
    before the merge, as the merge advisor's per-adapter weights do; ``lam`` scales the result.

    Returns
    -------
    dict of layer to merged delta, shape (d_out, d_in) (d_in + 1 with a bias column, see
    :func:`osrm_core.adapters.split_bias`), float32
    """
    from osrm_core.merge import get_merge_method, merge_deltas

    if len(adapters) < 1:
        raise ValueError("merge_adapters needs at least one adapter")
    weights = [1.0] * len(adapters) if weights is None else list(weights)
    if len(weights) != len(adapters) or not all(
        isinstance(w, int | float) and 0 <= w < float("inf") for w in weights
    ):
        raise ValueError(f"weights {weights} must be {len(adapters)} finite numbers >= 0, one per adapter")
    if get_merge_method(method, **params).needs_gram and stats is None:
        raise ValueError(f"merge method {method!r} needs the feature statistics of every task")
    deltas, grams = merge_inputs(adapters, stats)
    deltas = [{k: w * d for k, d in task.items()} for task, w in zip(deltas, weights, strict=True)]
    return merge_deltas(deltas, method, lam=lam, grams=grams, seed=seed, **params)


def _svdvals_at_precision(delta: torch.Tensor) -> torch.Tensor:
    """Singular values (computed in float64) in the delta's dtype, float32 at least."""
    s = torch.linalg.svdvals(delta.double())
    return s if delta.dtype == torch.float64 else s.float()


def factor_merged(
    merged: dict[str, torch.Tensor], rank: int | None = None, d_in: dict[str, int] | None = None
) -> tuple[dict[str, LoraWeights], pd.DataFrame]:
    """LoRA factors (scale 1) of merged deltas, at one rank for all layers.

    With ``rank`` None the rank is the largest numerical rank over layers, so ``B @ A``
    reproduces every merged delta (exact); a smaller ``rank`` truncates by SVD. ``d_in`` gives
    each layer's input width where a delta carries a bias column (see
    :func:`osrm_core.adapters.split_bias`): that column becomes ``lora_B``'s bias, ``B a``.

    Returns the layers and a table ``layer, rank, relative_error`` with
    ``||Delta - B A||_F / ||Delta||_F`` per layer (0 when exact).
    """
    from osrm_core.adapters import split_bias
    from osrm_core.merge import low_rank_factors
    from osrm_core.merge.factor import numerical_rank

    if rank is None:
        # The tolerance is that of the deltas' own precision: float32 rounding noise would
        # otherwise count as rank and make the "exact" adapter full rank.
        rank = max(
            max(1, numerical_rank(_svdvals_at_precision(d), tuple(d.shape))) for d in merged.values()
        )
    layers, rows = {}, []
    for name, delta in merged.items():
        k = min(rank, *delta.shape)
        B, A = low_rank_factors(delta.double(), k)
        norm = float(torch.linalg.norm(delta.double()))
        err = float(torch.linalg.norm(delta.double() - B @ A)) / norm if norm > 0 else 0.0
        if k < rank:  # pad so every layer has one rank
            A = torch.cat([A, A.new_zeros(rank - k, A.shape[1])])
            B = torch.cat([B, B.new_zeros(B.shape[0], rank - k)], 1)
        A, bias_input = split_bias(A, (d_in or {}).get(name, A.shape[1]))
        bias = None if bias_input is None else (B @ bias_input).float()
        layers[name] = LoraWeights(A.float().contiguous(), B.float(), 1.0, bias)
        rows.append({"layer": name, "rank": rank, "relative_error": err})
    return layers, pd.DataFrame(rows)


def write_merged_adapter(
    path: str | Path,
    merged: dict[str, torch.Tensor],
    adapters: dict[str, Adapter] | None = None,
    *,
    rank: int | None = None,
) -> tuple[Path, pd.DataFrame]:
    """Write merged deltas as one PEFT LoRA adapter (factored by :func:`factor_merged`).

    Each task's head (its ``modules_to_save``) from ``adapters`` is written to
    ``heads/<task>.safetensors``. Returns the folder and the factorization table.
    """
    from safetensors.torch import save_file

    from osrm_core.adapters import union_layers
    from osrm_core.atomic import atomic_path

    d_in = {n: shape[1] for n, shape in union_layers(adapters).items()} if adapters else None
    layers, table = factor_merged(merged, rank, d_in)
    config = dict(next(iter(adapters.values())).config) if adapters else {"peft_type": "LORA"}
    # The heads are per task (under heads/), so the merged adapter carries none: with
    # task_type SEQ_CLS peft would add the classifier to modules_to_save and fail to load it.
    # A causal LM's adapter keeps its task type (AutoPeftModelForCausalLM reads it).
    config["modules_to_save"] = None
    if config.get("task_type") != "CAUSAL_LM":
        config["task_type"] = None
    out = write_adapter(path, layers, config)
    for task, adapter in (adapters or {}).items():
        if adapter.head:
            with atomic_path(out / "heads" / f"{task}.safetensors") as tmp:
                save_file({k: v.float().contiguous() for k, v in adapter.head.items()}, str(tmp))
    return out, table


def write_model_card(
    folder: str | Path,
    adapters: dict[str, Adapter],
    *,
    method: str,
    lam: float,
    params: dict | None = None,
    scores: pd.DataFrame | None = None,
    evaluation: dict | None = None,
) -> Path:
    """Write ``README.md``, the Hub model card of a merged adapter: metadata (``library_name:
    peft``, ``base_model``, ``tags: [merge, osrm]``), the merge (method, lambda, parameters such
    as the density), the source adapters (name, path or Hub id, SHA-256 of the weights), the
    measured scores when given (rows of :func:`osrm_core.workflows.merge_scores`: ``task,
    metric, score, single, normalized``), what reproduces them (``evaluation``: ``on``, the texts
    scored, e.g. "each task's test split"; ``rows`` per task; ``max_length``; ``seed``), and how to
    load it and each task's head (with its number of classes) with plain peft."""
    import yaml

    folder = Path(folder)
    first = next(iter(adapters.values()))
    base = first.config.get("base_model_name_or_path")
    causal = first.task_type == "CAUSAL_LM"
    meta = {"library_name": "peft", "tags": ["merge", "osrm", "lora"]}
    if base:
        meta["base_model"] = base
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
             f"# Merged LoRA adapter: {', '.join(adapters)}", "",
             f"Written by the OSRM workbench: `{method}` with lambda = {lam:g}"
             + "".join(f", {k} = {v}" for k, v in (params or {}).items()) + ".", "",
             "## Source adapters", "", "| task | source | sha256 of the weights |", "|---|---|---|"]
    lines += [f"| {n} | {a.source or '(in memory)'} | {a.sha256 or '-'} |" for n, a in adapters.items()]
    if scores is not None and len(scores):
        ev = evaluation or {}
        rows = ev.get("rows", {})
        lines += ["", "## Measured scores", "",
                  f"Each task's score on {ev.get('on', 'its test texts')} with this merged adapter and with its "
                  "own adapter alone (a loss: lower is better)"
                  + "".join(f"; {k} = {ev[k]}" for k in ("max_length", "seed") if k in ev) + ".", "",
                  "| task | metric | texts | merged | own adapter | merged / own |", "|---|---|---|---|---|---|"]
        lines += [f"| {r.task} | {r.metric} | {rows.get(r.task, '-')} | {r.score:.4f} | {r.single:.4f} "
                  f"| {r.normalized:.3f} |" for r in scores.itertuples()]
    auto = "AutoModelForCausalLM" if causal else "AutoModelForSequenceClassification"
    lines += ["", "## Loading it with plain peft", "", "```python",
              "from peft import PeftModel", f"from transformers import {auto}", "",
              f"base = {auto}.from_pretrained({base or 'BASE_MODEL'!r}"
              + ("" if causal else ", num_labels=K") + ")"
              + ("" if causal else "  # K: " + ", ".join(f"{n} {num_labels_of(a)}" for n, a in adapters.items())),
              "model = PeftModel.from_pretrained(base, 'THIS_FOLDER')"]
    heads = [n for n, a in adapters.items() if a.head]
    if heads:
        lines += ["", "# each task keeps its own head (and any module it trained in full):",
                  "from safetensors.torch import load_file",
                  f"model.get_base_model().load_state_dict(load_file('THIS_FOLDER/heads/{heads[0]}.safetensors'),"
                  " strict=False)"]
    lines += ["```", ""]
    path = folder / "README.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def write_merged_model(model: nn.Module, tokenizer, merged: dict[str, torch.Tensor], path: str | Path) -> Path:
    """Add the merged deltas to a copy of ``model``'s weights and ``save_pretrained`` it."""
    import copy

    from osrm_core.adapters import split_bias
    from osrm_core.models import weight_as_linear

    merged_model = copy.deepcopy(model)
    with torch.no_grad():
        for name, delta in merged.items():
            module = merged_model.get_submodule(name)
            w = weight_as_linear(module)
            delta, shift = split_bias(delta, w.shape[1])
            w += delta.to(w.device, w.dtype)
            if shift is not None:
                module.bias += shift.to(module.bias.device, module.bias.dtype)
    path = Path(path)
    merged_model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
