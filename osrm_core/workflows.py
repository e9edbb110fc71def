"""One function per workflow on adapters that already exist (no run directory), called alike by
the command line, the app and notebooks:

* :func:`task_stats` — feature statistics of tasks (or sample texts) at the adapters' layers;
* :func:`diagnose_adapters` — interference, principal angles, own-task energy and post-hoc
  OSRM of uploaded adapters (``osrm diagnose``, the Adapter diagnosis page); with projected
  statistics, the angles from :func:`task_sketches` (:func:`sketch_angles`);
* :func:`sweep_adapters` — merged scores over a grid on labelled data (``osrm sweep``, the
  page's quick sweep);
* :func:`osrm_core.advisor.advise` — the merge advisor (``osrm advise``, the page's advice):
  method, lambda, density and per-adapter weights searched on sample texts;
* :func:`build_merged_adapter` — one PEFT adapter with the merged ``Delta_W`` and every task's
  head under ``heads/`` (``osrm merge``, the page's download);
* :func:`real_model_comparison` — the Learn page's OSRM-vs-random comparison on the packaged
  model and the demo tasks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from osrm_core.adapters import Adapter, check_against_model, union_layers
from osrm_core.data import TaskData
from osrm_core.diagnosis import Diagnosis
from osrm_core.errors import OsrmInputError
from osrm_core.stats import (
    FeatureStats,
    ProjectedStats,
    Sketch,
    collect_feature_stats,
    collect_projected_stats,
    collect_sketch,
)
from osrm_core.stats.sketch import SKETCH_POWER

Progress = Callable[[int, int, str], None]


def is_causal_lm_set(adapters: dict[str, Adapter]) -> bool:
    """Whether adapters belong on a causal LM (``task_type: CAUSAL_LM``); mixing kinds is refused."""
    kinds = {a.task_type == "CAUSAL_LM" for a in adapters.values()}
    if len(kinds) > 1:
        causal = sorted(n for n, a in adapters.items() if a.task_type == "CAUSAL_LM")
        raise OsrmInputError(
            f"adapters {causal} have task_type CAUSAL_LM and the others not; merge adapters of one kind of model"
        )
    return kinds == {True}


def load_base_for(adapters: dict[str, Adapter], model_name: str | None = None, **kwargs):
    """The base model the adapters belong on (a causal LM for ``task_type: CAUSAL_LM``, else a
    classifier) and its tokenizer; every adapter is checked against it."""
    from osrm_core.models import load_base_model

    model, tokenizer = load_base_model(model_name, causal_lm=is_causal_lm_set(adapters), **kwargs)
    for name, adapter in adapters.items():
        check_against_model(adapter, model, where=name)
    return model, tokenizer


def coverage_table(adapters: dict[str, Adapter]) -> pd.DataFrame:
    """Which of the union of adapted layers each adapter covers.

    Columns ``adapter, layers, of_union, missing`` (``missing``: short names of the layers the
    adapter has no weights for, e.g. ``key x6``; empty when it covers all).
    """
    union = union_layers(adapters)
    rows = []
    for name, adapter in adapters.items():
        counts: dict[str, int] = {}
        for layer in union:
            if layer not in adapter.layers:
                short = layer.rsplit(".", 1)[-1]
                counts[short] = counts.get(short, 0) + 1
        rows.append({
            "adapter": name, "layers": len(adapter.layers), "of_union": len(union),
            "missing": ", ".join(f"{k} x{v}" for k, v in counts.items()),
        })
    return pd.DataFrame(rows)


def task_stats(model, tokenizer, tasks: Sequence[TaskData], *, samples: int | None = 100, max_length: int = 128,
               target_modules: list[str] | None = None, seed: int = 0,
               adapters: dict[str, Adapter] | None = None, dtype: torch.dtype = torch.float64,
               sample_means: bool = True) -> dict[str, FeatureStats | ProjectedStats]:
    """Feature statistics of each task at the given layers of ``model`` (``samples`` None: all),
    summed in ``dtype`` (``sample_means`` False: ``sum h h^T`` and ``sum h`` alone, e.g. RegMean's
    Gram matrices, see :func:`osrm_core.stats.iter_feature_stats`); with ``adapters``, projected
    on them instead, in float64 (:func:`osrm_core.stats.collect_projected_stats`: what the
    interference tables need, without the ``d x d`` moments; tasks with the same texts are
    streamed once)."""
    if adapters is not None:
        return _once_per_texts(tasks, lambda t: collect_projected_stats(
            model, tokenizer, t, adapters, max_samples=samples, max_length=max_length, seed=seed))
    return {
        t.name: collect_feature_stats(
            model, tokenizer, t, max_samples=samples, max_length=max_length,
            target_modules=target_modules, seed=seed, dtype=dtype, sample_means=sample_means,
        )
        for t in tasks
    }


def task_sketches(model, tokenizer, tasks: Sequence[TaskData], adapters: dict[str, Adapter], *,
                  power: int = SKETCH_POWER, samples: int | None = 100, max_length: int = 128,
                  seed: int = 0) -> dict[str, Sketch]:
    """Each task's top-``k`` data subspace at the adapters' layers, sketched without the ``d x d``
    moments (:func:`osrm_core.stats.collect_sketch`, ``2 + power`` passes over the texts; ``k``:
    the smallest adapter rank, as the principal angles compare); tasks with the same texts are
    streamed once."""
    from osrm_core.diagnostics import angle_rank

    layers, k = union_layers(adapters), angle_rank(adapters)
    return _once_per_texts(tasks, lambda t: collect_sketch(
        model, tokenizer, t, layers, k, power=power, max_samples=samples, max_length=max_length, seed=seed))


def _once_per_texts(tasks: Sequence[TaskData], collect: Callable):
    """``collect(task)`` per task, once per distinct texts (several adapters scored on one data
    set stream it once), each result named after its task."""
    done: dict[tuple, object] = {}
    out = {}
    for t in tasks:
        key = (tuple(t.train.text), None if t.train.text_pair is None else tuple(t.train.text_pair))
        if key not in done:
            done[key] = collect(t)
        out[t.name] = dataclasses.replace(done[key], task=t.name)
    return out


def adapter_rank(adapter: Adapter) -> int:
    """The largest LoRA rank over the adapter's layers."""
    return max(lw.rank for lw in adapter.layers.values())


def diagnose_adapters(
    model,
    adapters: dict[str, Adapter],
    stats: dict[str, FeatureStats | ProjectedStats],
    *,
    posthoc_rank: int | None = None,
    sketches: dict[str, Sketch] | None = None,
) -> Diagnosis:
    """Interference, principal angles, own-task energy and post-hoc OSRM for existing adapters.

    Parameters
    ----------
    model : nn.Module
        The base model the adapters were trained on (its weights give ``W0``).
    adapters : dict of task name to Adapter
        At least two. They may cover different layers: the diagnosis is over the union, each
        adapter contributing where it has weights (whatever the order of ``adapters``).
    stats : dict of task name to FeatureStats
        Every adapter's task (same name), collected at the union of the adapters' layers
        (:func:`task_stats`); tasks need no labels. Projected statistics (``task_stats(...,
        adapters=adapters)``) give every table but the ones of the ``d x d`` moments:
        ``angles``, ``posthoc`` and ``projected`` are then absent and ``interference`` holds the
        uploaded adapters only.
    posthoc_rank : int, optional
        Rank of the OSRM subspace each adapter is projected on (default: its own rank).
    sketches : dict of task name to Sketch, optional
        With projected statistics: ``angles`` of the uploaded adapters from these sketches of
        the tasks' data subspaces, each row with its stated ``bound`` (:func:`sketch_angles`).

    Returns
    -------
    Diagnosis
        Its tables (interference as uploaded and after post-hoc OSRM, angles, own-task energy,
        energy kept, coverage, data-free signals), the post-hoc OSRM adapters, and the verdicts
        and summaries read from them (:class:`osrm_core.diagnosis.Diagnosis`). From projected
        statistics ``posthoc`` is empty, ``projected`` is ``{}`` and ``angles`` empty without ``sketches``.
    """
    from osrm_core.diagnostics import (
        interference_table,
        merged_spectrum,
        own_energy_table,
        sv_interference_table,
    )
    from osrm_core.models import weight_as_linear

    if len(adapters) < 2:
        raise OsrmInputError(f"diagnosis needs at least two adapters, got {len(adapters)}")
    missing = [a for a in adapters if a not in stats]
    if missing:
        raise OsrmInputError(f"adapter {missing[0]!r} has no task data of the same name; tasks are {sorted(stats)}")
    if posthoc_rank is not None and posthoc_rank < 1:
        raise OsrmInputError(f"posthoc_rank must be >= 1, got {posthoc_rank}")
    for name, adapter in adapters.items():
        check_against_model(adapter, model, where=name)
    stats = {n: stats[n] for n in adapters}
    if isinstance(next(iter(stats.values())), ProjectedStats):
        # Projected statistics serve the tables of the adapters as they are; post-hoc OSRM needs
        # the d x d moments, the angles of data subspaces them or sketches.
        uploaded = interference_table(adapters, stats).assign(init="uploaded")
        dense = {} if sketches is None else {"angles": sketch_angles(adapters, stats, sketches)}
    elif sketches is not None:
        raise OsrmInputError("sketches serve projected statistics; dense statistics give the exact angles")
    else:
        w0 = {n: weight_as_linear(model.get_submodule(n)).detach() for n in union_layers(adapters)}
        dense = _dense_views(adapters, stats, w0, posthoc_rank)
        uploaded = dense.pop("uploaded")
    spectra, spectrum = merged_spectrum(adapters)
    return Diagnosis(
        names=list(adapters),
        coverage=coverage_table(adapters),
        interference=pd.concat([uploaded, dense.get("posthoc_interference")], ignore_index=True),
        angles=dense.get("angles", pd.DataFrame(columns=["layer", "kind", "a", "b", "min_angle", "mean_angle",
                                                         "init"])),
        own_energy=own_energy_table(adapters, stats),
        posthoc=dense.get("posthoc", pd.DataFrame(columns=["adapter", "layer", "energy_kept"])),
        projected=dense.get("projected", {}),
        sv_interference=sv_interference_table(adapters),
        spectra=spectra,
        spectrum=spectrum,
    )


def _dense_views(adapters, stats, w0, posthoc_rank) -> dict:
    """What :func:`diagnose_adapters` computes from the ``d x d`` moments: post-hoc OSRM and its
    interference, the principal angles of data subspaces (and the uploaded interference table)."""
    from osrm_core.diagnostics import (
        angle_rank,
        angle_table,
        data_subspaces,
        interference_table,
        posthoc_osrm_adapters,
    )

    projected, kept = posthoc_osrm_adapters(adapters, stats, posthoc_rank)
    k = angle_rank(adapters)
    bases = data_subspaces(stats, k)
    angles = pd.concat(
        [
            angle_table(stats, k=k, adapters=adapters, bases=bases).assign(init="uploaded"),
            angle_table(stats, k=k, adapters=projected, bases=bases)
            .query("kind == 'adapter-data'").assign(init="posthoc_osrm"),
        ],
        ignore_index=True,
    )
    return {
        "uploaded": interference_table(adapters, stats, w0).assign(init="uploaded"),
        "posthoc_interference": interference_table(projected, stats, w0).assign(init="posthoc_osrm"),
        "angles": angles,
        "posthoc": kept[["adapter", "layer", "energy_kept"]],
        "projected": projected,
    }


def sketch_angles(adapters: dict[str, Adapter], stats: dict[str, ProjectedStats],
                  sketches: dict[str, Sketch]) -> pd.DataFrame:
    """:func:`osrm_core.diagnostics.angle_table` of the uploaded adapters with each task's data
    subspace from its sketch (:func:`task_sketches`), and a column ``bound`` (degrees): the most
    the row's angles can be off, the sketches' stated angle bounds
    (:attr:`osrm_core.stats.SketchLayer.angle_bound`) added over the data subspaces it compares, at
    most 90 (each principal angle moves by at most the largest angle one of the subspaces turns:
    Knyazev & Argentati 2006)."""
    from osrm_core.diagnostics import angle_rank, angle_table

    k = angle_rank(adapters)
    for name in adapters:
        if name not in sketches:
            raise OsrmInputError(f"adapter {name!r} has no sketch of its task; sketches are {sorted(sketches)}")
        if sketches[name].k != k:
            raise OsrmInputError(f"the sketch of task {name!r} has k={sketches[name].k}; the angles need "
                                 f"k={k}, the smallest adapter rank")
        missing = [layer for layer in union_layers(adapters) if layer not in sketches[name].layers]
        if missing:
            raise OsrmInputError(f"the sketch of task {name!r} has no layer {missing[0]!r}")
    bases = {(t, layer): sl.basis for t in adapters for layer, sl in sketches[t].layers.items()}
    table = angle_table(stats, k=k, adapters=adapters, bases=bases)
    bound = [sketches[row.b].layers[row.layer].angle_bound
             + (sketches[row.a].layers[row.layer].angle_bound if row.kind == "data-data" else 0.0)
             for row in table.itertuples()]
    return table.assign(init="uploaded", bound=np.minimum(bound, 90.0))


def sweep_adapters(
    model,
    tokenizer,
    adapters: dict[str, Adapter],
    tasks: Sequence[TaskData],
    *,
    methods: Sequence[str] = ("task_arithmetic", "ties"),
    lambdas: Sequence[float] = (0.3, 0.5, 0.7, 1.0),
    densities: Sequence[float] = (0.5,),
    params: dict[str, Sequence] | None = None,
    stats: dict[str, FeatureStats] | None = None,
    max_test: int | None = None,
    max_length: int = 128,
    seed: int = 0,
    weights: Sequence[float] | None = None,
    space: str = "full",
    progress: Progress | None = None,
) -> pd.DataFrame:
    """Merged scores of existing adapters over a grid (see :class:`osrm_core.evaluate.SweepEngine`;
    ``weights`` and ``space`` as in :meth:`~osrm_core.evaluate.SweepEngine.sweep`).

    A sweep needs statistics only for the Gram matrices of the methods that weight by them
    (RegMean): ``stats`` from :func:`task_stats` at the adapters' layers with
    ``sample_means=False`` (``osrm sweep`` collects them so, in ``--stats-dtype``, after the memory
    plan's :func:`osrm_core.memory.check_grams`). ``model`` is changed in place during the sweep
    and restored afterwards.
    """
    from osrm_core.evaluate import SweepEngine

    for name, adapter in adapters.items():
        check_against_model(adapter, model, where=name)
    engine = SweepEngine(model, tokenizer, tasks, adapters, max_test=max_test, max_length=max_length)
    try:
        return engine.sweep(methods, lambdas, densities=densities, params=params, stats=stats, seed=seed,
                            weights=weights, space=space, progress=progress)
    finally:
        engine.restore()


def merge_scores(
    model,
    tokenizer,
    adapters: dict[str, Adapter],
    tasks: Sequence[TaskData],
    method: str,
    *,
    lam: float,
    stats: dict[str, FeatureStats] | None = None,
    max_test: int | None = None,
    max_length: int = 128,
    seed: int = 0,
    weights: Sequence[float] | None = None,
    space: str = "full",
    **params,
) -> pd.DataFrame:
    """Each task's score with the merge of ``adapters`` by ``method`` at ``lam`` (``params``: the
    method's, defaults for the rest; ``weights``: per adapter; ``space``: full or core): one row
    per task with the columns of :func:`sweep_adapters` (``metric, score, single,
    normalized``), as a merged adapter's model card reports them."""
    from osrm_core.merge import get_merge_method

    chosen = get_merge_method(method, **params)
    grid = {spec.name: [getattr(chosen.params, spec.name)] for spec in chosen.param_specs()}
    return sweep_adapters(model, tokenizer, adapters, tasks, methods=[method], lambdas=[lam], params=grid,
                          stats=stats, max_test=max_test, max_length=max_length, seed=seed, weights=weights,
                          space=space)


def build_merged_adapter(
    adapters: dict[str, Adapter],
    out: str | Path,
    method: str = "task_arithmetic",
    *,
    lam: float = 1.0,
    weights: Sequence[float] | None = None,
    stats: dict[str, FeatureStats] | None = None,
    rank: int | None = None,
    seed: int = 0,
    scores: pd.DataFrame | None = None,
    evaluation: dict | None = None,
    space: str = "full",
    **params,
) -> tuple[Path, pd.DataFrame]:
    """Merge ``adapters`` (over the union of their layers) and write one PEFT LoRA adapter
    folder at ``out``.

    The adapter holds ``lam * merge(Delta_W_1..T)`` per layer, exactly (``rank`` None: the
    largest numerical rank over layers) or truncated by SVD to ``rank``; its config has
    no ``modules_to_save`` and ``task_type`` null (kept for ``CAUSAL_LM``), so plain
    ``PeftModel.from_pretrained`` loads it on the base model; each task's head is written to
    ``heads/<task>.safetensors``. Methods that need Gram matrices (``needs_gram``) take them
    from ``stats``; ``weights`` (one per adapter, e.g. the merge advisor's) are the method's
    per-task weights; ``space="core"`` merges in core space (never forming a delta). A ``README.md`` model card documents it
    (:func:`osrm_core.export.write_model_card`, with ``scores`` when measured, see
    :func:`merge_scores`, and what they were measured on, see :func:`evaluation_record`). Returns the folder and the per-layer factorization table (rank,
    relative error, see :func:`osrm_core.export.factor_merged`).
    """
    from osrm_core.export import merge_adapters, write_merged_adapter, write_model_card

    merged = merge_adapters(adapters, method, lam=lam, weights=weights, stats=stats, seed=seed, space=space,
                            **params)
    path, table = write_merged_adapter(out, merged, adapters, rank=rank)
    shown = params if weights is None else {**params, "weights": list(weights)}
    shown = {**shown, "seed": seed} if method.startswith("dare") else shown  # DARE's drops are seeded
    if space != "full":
        shown = {**shown, "space": space}
    write_model_card(path, adapters, method=method, lam=lam, params=shown, scores=scores, evaluation=evaluation,
                     written=table)
    return path, table


def evaluation_record(tasks: Sequence[TaskData], *, max_test: int | None, max_length: int, seed: int) -> dict:
    """What a model card needs to reproduce its scores: which texts (each task's test split, or
    the share drawn from a single file), how many rows of each, ``max_length`` and ``seed``."""
    drawn = [t.name for t in tasks if t.drawn_test]
    on = "the first rows of each task's test split"
    if drawn:
        on += f" (for {', '.join(drawn)}: the test share drawn from its one file)"
    rows = {t.name: len(t.test) if max_test is None else min(len(t.test), max_test) for t in tasks}
    return {"on": on, "rows": rows, "max_length": max_length, "seed": seed}


def real_model_comparison(model, tokenizer, *, rank: int = 8, n_samples: int = 32, seed: int = 0,
                          max_length: int = 64) -> pd.DataFrame:
    """On the demo tasks: per task and input, the other tasks' energy ``sum_j E||A h_j||^2``
    seen by OSRM's A and by a random orthonormal A of the same rank.

    Returns a DataFrame with columns ``task, layer, osrm, random, ratio`` (one row per input
    that layers share: query and value read the same hidden states).
    """
    from osrm_core.demo import demo_tasks
    from osrm_core.diagnostics import summed_interference
    from osrm_core.inits import osrm_subspace

    tasks = demo_tasks(seed=seed, n_train=max(n_samples, 10), n_test=10)
    stats = list(task_stats(model, tokenizer, tasks, samples=n_samples, max_length=max_length, seed=seed).values())
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for i, task in enumerate(tasks):
        others = stats[:i] + stats[i + 1 :]
        firsts = [g[0] for g in stats[i].groups()]
        osrm = {n: a for n, a in osrm_subspace(others, rank).items() if n in firsts}
        rand = {n: torch.linalg.qr(torch.randn(a.shape[1], rank, generator=generator, dtype=torch.float64))[0].T
                for n, a in osrm.items()}
        got, ref = summed_interference(osrm, others), summed_interference(rand, others)
        rows += [
            {"task": task.name, "layer": n, "osrm": got[n], "random": ref[n],
             "ratio": got[n] / ref[n] if ref[n] > 0 else float("nan")}
            for n in firsts
        ]
    return pd.DataFrame(rows)
