"""Merging whole adapters and writing the result: a PEFT adapter (exact or SVD-truncated) or
full merged weights. Each task keeps its own classification head, written beside the merge."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from osrm_core.adapters import Adapter, LoraWeights, aligned_deltas, num_labels_of, write_adapter
from osrm_core.errors import OsrmInputError
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
        raise OsrmInputError(f"no feature statistics for adapter {missing[0]!r}; tasks are {sorted(stats)}")
    grams = []
    for name, task_deltas in zip(adapters, deltas, strict=True):
        grams.append({})
        for layer, delta in task_deltas.items():
            if layer not in stats[name].layers:
                raise OsrmInputError(f"statistics of task {name!r} have no layer {layer!r}")
            ls = stats[name].layers[layer]
            gram = ls.gram
            if delta.shape[1] == ls.d + 1:  # [h; 1]: sum h h^T, sum h, token count
                total = torch.tensor([[float(ls.count)]], dtype=gram.dtype, device=gram.device)
                gram = torch.cat([torch.cat([gram, ls.sum[:, None]], 1), torch.cat([ls.sum[None], total], 1)], 0)
            grams[-1][layer] = gram
    return deltas, grams


def aligned_factors(adapters: dict[str, Adapter]) -> list[dict]:
    """Each adapter's LoRA factors over the union of layers, as :func:`aligned_deltas` but never
    forming a delta: :class:`osrm_core.merge.LoraFactors` ``(scale * B, A)`` per layer, rank 0
    where an adapter has no weights. Where some adapter has a bias, the factors carry it as
    one more rank: ``B' = [s B | s b]``, ``A' = [[A, 0], [0, 1]]`` of width d_in + 1, so
    ``B' A'`` is the ``[Delta_W | s b]`` of :func:`osrm_core.adapters.aligned_deltas`.
    """
    from osrm_core.adapters import map_aligned

    return map_aligned(adapters, _factors_with_bias)


def _factors_with_bias(lw, d_out: int, d_in: int, bias_column: bool):
    from osrm_core.merge import LoraFactors

    b, a = (torch.zeros(d_out, 0), torch.zeros(0, d_in)) if lw is None else (lw.scale * lw.B.float(), lw.A.float())
    if bias_column:
        a = torch.cat([a, a.new_zeros(a.shape[0], 1)], 1)
        if lw is not None and lw.bias is not None:
            b = torch.cat([b, lw.bias_delta.float()[:, None]], 1)
            a = torch.cat([a, torch.cat([a.new_zeros(1, d_in), a.new_ones(1, 1)], 1)], 0)
    return LoraFactors(b, a)


def merge_adapters(
    adapters: dict[str, Adapter],
    method: str = "task_arithmetic",
    *,
    lam: float = 1.0,
    weights: Sequence[float] | None = None,
    stats: dict[str, FeatureStats] | None = None,
    seed: int = 0,
    space: str = "full",
    **params,
) -> dict:
    """Merge the adapters' ``Delta_W`` per layer with a registered merge method.

    Adapters may cover different layers: the merge is over the union, each adapter contributing
    zero where it has no weights. ``weights`` (one per adapter, >= 0, e.g. the merge advisor's)
    are the method's per-task weights (adapter i's delta enters as ``w_i Delta_W_i``); ``lam``
    scales the result. ``space="core"`` merges the LoRA factors in core space
    (:mod:`osrm_core.merge.core`) without forming a (d_out, d_in) delta.

    Returns
    -------
    dict of layer to merged delta, shape (d_out, d_in) (d_in + 1 with a bias column, see
    :func:`osrm_core.adapters.split_bias`), float32; in core space to
    :class:`osrm_core.merge.LoraFactors` of that product
    """
    from osrm_core.merge import get_merge_method, merge_deltas

    if len(adapters) < 1:
        raise OsrmInputError("merge_adapters needs at least one adapter")
    if get_merge_method(method, **params).needs_gram and stats is None:
        raise OsrmInputError(f"merge method {method!r} needs the feature statistics of every task")
    if space == "core":
        inputs, grams = aligned_factors(adapters), None
    else:
        inputs, grams = merge_inputs(adapters, stats)
    return merge_deltas(inputs, method, lam=lam, grams=grams, seed=seed, weights=weights, space=space, **params)


def _spectrum(value) -> torch.Tensor:
    """Singular values (computed in float64) of a merged delta or of the product of merged
    LoRA factors, in the merge's dtype, float32 at least."""
    from osrm_core.merge import LoraFactors
    from osrm_core.merge.factor import product_svd

    if isinstance(value, LoraFactors):
        s, dtype = product_svd(value.B.double(), value.A.double())[1], value.B.dtype
    else:
        s, dtype = torch.linalg.svdvals(value.double()), value.dtype
    return s if dtype == torch.float64 else s.float()


def _factor_layer(value, k: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Rank-k factors ``(B, A)`` (float64) of a merged delta or LoraFactors, and the relative
    error ``||Delta - B A||_F / ||Delta||_F``."""
    from osrm_core.merge import LoraFactors, low_rank_factors
    from osrm_core.merge.factor import product_svd

    if isinstance(value, LoraFactors):
        u, s, vh = product_svd(value.B.double(), value.A.double())
        k = min(k, s.numel())
        root = s[:k].sqrt()
        total = float(s.square().sum())
        err = (float(s[k:].square().sum()) / total) ** 0.5 if total > 0 else 0.0
        return u[:, :k] * root, root[:, None] * vh[:k], err
    delta = value.double()
    B, A = low_rank_factors(delta, k)
    norm = float(torch.linalg.norm(delta))
    return B, A, float(torch.linalg.norm(delta - B @ A)) / norm if norm > 0 else 0.0


def merged_rank(merged: dict) -> int:
    """The largest numerical rank over the merged layers (deltas or LoraFactors), at least 1;
    the tolerance is that of the merge's own precision, so float32 rounding noise does not
    count as rank."""
    from osrm_core.merge.factor import numerical_rank

    shapes = {n: tuple(getattr(v, "shape", ())) for n, v in merged.items()}
    return max(max(1, numerical_rank(_spectrum(v), shapes[n])) for n, v in merged.items())


def factor_merged(
    merged: dict, rank: int | None = None, d_in: dict[str, int] | None = None
) -> tuple[dict[str, LoraWeights], pd.DataFrame]:
    """LoRA factors (scale 1) of merged deltas, at one rank for all layers.

    ``merged`` maps layers to deltas of shape (d_out, d_in) or to
    :class:`osrm_core.merge.LoraFactors` (a core-space merge, factored without forming the
    delta). With ``rank`` None the rank is the largest numerical rank over layers
    (:func:`merged_rank`), so ``B @ A`` reproduces every merged delta (exact); a smaller
    ``rank`` truncates by SVD. ``d_in`` gives each layer's input width where a delta carries a
    bias column (see :func:`osrm_core.adapters.split_bias`): that column becomes ``lora_B``'s
    bias, ``B a``.

    Returns the layers and a table ``layer, rank, relative_error`` with
    ``||Delta - B A||_F / ||Delta||_F`` per layer (0 when exact).
    """
    from osrm_core.adapters import split_bias

    if rank is None:
        rank = merged_rank(merged)
    layers, rows = {}, []
    for name, value in merged.items():
        k = min(rank, *value.shape)
        B, A, err = _factor_layer(value, k)
        k = A.shape[0]
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
    merged: dict,
    adapters: dict[str, Adapter] | None = None,
    *,
    rank: int | None = None,
) -> tuple[Path, pd.DataFrame]:
    """Write merged deltas (or core-space LoraFactors) as one PEFT LoRA adapter (factored by
    :func:`factor_merged`, at the merge's numerical rank unless ``rank`` truncates it).

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


def _rank_lines(method: str, written: pd.DataFrame | None) -> list[str]:
    """The model card's sentence on the rank the merged adapter holds (empty without ``written``)."""
    from osrm_core.merge import get_merge_method

    if written is None or not len(written):
        return []
    rank, error = int(written["rank"].max()), float(written["relative_error"].max())
    how = "exact" if error < 1e-5 else f"truncated by SVD, largest relative error {error:.3g} over layers"
    text = f"It holds rank {rank} per layer ({how})."
    if not get_merge_method(method).low_rank:
        text += (f" `{method}` changes the deltas entry by entry (or by Gram matrices), so its merge is full "
                 "rank: the exact adapter is as large as the layers; `osrm merge --out-rank K` writes a smaller one.")
    return [text, ""]


def write_model_card(
    folder: str | Path,
    adapters: dict[str, Adapter],
    *,
    method: str,
    lam: float,
    params: dict | None = None,
    scores: pd.DataFrame | None = None,
    evaluation: dict | None = None,
    written: pd.DataFrame | None = None,
) -> Path:
    """Write ``README.md``, the Hub model card of a merged adapter: metadata (``library_name:
    peft``, ``base_model``, ``tags: [merge, osrm]``), the merge (method, lambda, parameters such
    as the density), the source adapters (name, path or Hub id, SHA-256 of the weights), the
    measured scores when given (rows of :func:`osrm_core.workflows.merge_scores`: ``task,
    metric, score, single, normalized``), what reproduces them (``evaluation``: ``on``, the texts
    scored, e.g. "each task's test split"; ``rows`` per task; ``max_length``; ``seed``), and how to
    load it and each task's head (with its number of classes) with plain peft. ``written``, the
    factorization table of :func:`factor_merged` (``rank``, ``relative_error`` per layer), adds
    the rank the adapter was written at, and for a full-rank method (TIES, DARE, RegMean) says so."""
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
             *_rank_lines(method, written),
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


def write_merged_model(model: nn.Module, tokenizer, merged: dict, path: str | Path) -> Path:
    """Add the merged deltas (or LoraFactors of a core-space merge) to a copy of ``model``'s
    weights and ``save_pretrained`` it."""
    import copy

    from osrm_core.adapters import split_bias
    from osrm_core.merge import LoraFactors
    from osrm_core.models import weight_as_linear

    merged_model = copy.deepcopy(model)
    with torch.no_grad():
        for name, delta in merged.items():
            if isinstance(delta, LoraFactors):  # a core-space merge: whole weights need the product
                delta = delta.delta()
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
