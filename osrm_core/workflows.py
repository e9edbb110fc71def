"""Workflows on adapters that already exist (no run directory): diagnosis and merge sweeps.

Used by ``osrm diagnose``/``osrm sweep`` and the app's adapter diagnosis page.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pandas as pd

from osrm_core.adapters import Adapter, check_against_model, union_layers
from osrm_core.data import TaskData
from osrm_core.stats import FeatureStats, collect_feature_stats

Progress = Callable[[int, int, str], None]


def is_causal_lm_set(adapters: dict[str, Adapter]) -> bool:
    """Whether adapters belong on a causal LM (``task_type: CAUSAL_LM``); mixing kinds is refused."""
    kinds = {a.task_type == "CAUSAL_LM" for a in adapters.values()}
    if len(kinds) > 1:
        causal = sorted(n for n, a in adapters.items() if a.task_type == "CAUSAL_LM")
        raise ValueError(
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
    adapter has no weights for, e.g. ``key`` x6, empty when it covers all).
    """
    union = union_layers(adapters)
    rows = []
    for name, adapter in adapters.items():
        missing = [layer for layer in union if layer not in adapter.layers]
        counts: dict[str, int] = {}
        for layer in missing:
            short = layer.rsplit(".", 1)[-1]
            counts[short] = counts.get(short, 0) + 1
        rows.append({
            "adapter": name, "layers": len(adapter.layers), "of_union": len(union),
            "missing": ", ".join(f"{k} x{v}" for k, v in counts.items()),
        })
    return pd.DataFrame(rows)


def task_stats(model, tokenizer, tasks: Sequence[TaskData], *, samples: int = 100, max_length: int = 128,
               target_modules: list[str] | None = None, seed: int = 0) -> dict[str, FeatureStats]:
    """Feature statistics of each task at the given layers of ``model``."""
    return {
        t.name: collect_feature_stats(
            model, tokenizer, t, max_samples=samples, max_length=max_length,
            target_modules=target_modules, seed=seed,
        )
        for t in tasks
    }


def diagnose_adapters(
    model,
    tokenizer,
    adapters: dict[str, Adapter],
    tasks: Sequence[TaskData],
    *,
    samples: int = 100,
    max_length: int = 128,
    rank: int | None = None,
) -> dict[str, pd.DataFrame]:
    """Interference, principal angles, own-task energy and post-hoc OSRM energy for adapters.

    ``adapters`` and ``tasks`` are matched by name (every adapter needs the task of the same
    name). Adapters may cover different layers: statistics are collected for the union, and
    each adapter contributes where it has weights (whatever the order of ``adapters``).
    Returns DataFrames ``interference``, ``matrix`` (input energy summed over layers),
    ``angles``, ``own_energy``, ``posthoc`` (energy each adapter keeps when projected on
    its OSRM subspace of rank ``rank``, default the adapter's rank) and ``coverage`` (which
    layers each adapter covers, :func:`coverage_table`). Tasks need no labels.
    """
    from osrm_core.diagnostics import (
        angle_table,
        interference_matrix,
        interference_table,
        own_energy_table,
        posthoc_osrm_adapters,
    )
    from osrm_core.models import weight_as_linear

    if len(adapters) < 2:
        raise ValueError(f"diagnosis needs at least two adapters, got {len(adapters)}")
    by_name = {t.name: t for t in tasks}
    missing = [a for a in adapters if a not in by_name]
    if missing:
        raise ValueError(f"adapter {missing[0]!r} has no task data of the same name; tasks are {sorted(by_name)}")
    for name, adapter in adapters.items():
        check_against_model(adapter, model, where=name)
    layers = list(union_layers(adapters))
    order = list(adapters)
    stats = task_stats(model, tokenizer, [by_name[n] for n in order], samples=samples,
                       max_length=max_length, target_modules=layers)
    w0 = {n: weight_as_linear(model.get_submodule(n)).detach() for n in layers}
    table = interference_table(adapters, stats, w0)
    _, posthoc = posthoc_osrm_adapters(adapters, stats, rank)
    return {
        "interference": table,
        "matrix": interference_matrix(table),
        "angles": angle_table(stats, k=min(8, next(iter(stats.values())).layers[layers[0]].d), adapters=adapters),
        "own_energy": own_energy_table(adapters, stats),
        "posthoc": posthoc,
        "coverage": coverage_table(adapters),
        "stats": stats,
    }


def sweep_adapters(
    model,
    tokenizer,
    adapters: dict[str, Adapter],
    tasks: Sequence[TaskData],
    *,
    methods: Sequence[str] = ("task_arithmetic", "ties"),
    lambdas: Sequence[float] = (0.3, 0.5, 0.7, 1.0),
    densities: Sequence[float] = (0.5,),
    stats: dict[str, FeatureStats] | None = None,
    max_test: int | None = None,
    max_length: int = 128,
    seed: int = 0,
    progress: Progress | None = None,
) -> pd.DataFrame:
    """Merged scores of existing adapters over a grid (see :class:`osrm_core.evaluate.SweepEngine`)."""
    from osrm_core.evaluate import SweepEngine

    for name, adapter in adapters.items():
        check_against_model(adapter, model, where=name)
    engine = SweepEngine(model, tokenizer, tasks, adapters, max_test=max_test, max_length=max_length)
    try:
        return engine.sweep(methods, lambdas, densities=densities, stats=stats, seed=seed, progress=progress)
    finally:
        engine.restore()
