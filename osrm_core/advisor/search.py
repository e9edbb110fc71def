"""The merge advisor: from adapters and labelled sample texts to a recommended merge.

The samples of each task are split (stratified, seeded) into a validation share, on which the
search runs, and a held-out share, on which the finalists are reported: the best grid point of
each method and density, and the per-adapter weights the search found. The search covers the
merge method, its density, one global lambda (a grid) and then per-adapter weights (coordinate
search from the best grid points, as LoraHub searches its weights) within an evaluation
budget. Every merge method here is positively homogeneous (``merge(c Delta) = c merge(Delta)``),
so a candidate is (method, density, weights): adapter ``i``'s delta enters the merge as
``w_i Delta_W_i`` (the method's per-task weights; KnOTS keeps the shared basis of the unweighted
deltas, see :mod:`osrm_core.merge.knots`), and one global lambda is ``w_i = lambda`` for all ``i``.

All scoring goes through :class:`osrm_core.evaluate.SweepEngine` (one in-place model).

References
----------
Huang et al., "LoraHub: Efficient Cross-Task Generalization via Dynamic LoRA Composition",
COLM 2024, arXiv:2307.13269 (gradient-free search of per-adapter weights on a few examples).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from osrm_core.adapters import Adapter, check_against_model, num_labels_of, union_layers
from osrm_core.data import TaskData
from osrm_core.errors import OsrmInputError
from osrm_core.evaluate import SweepEngine, score
from osrm_core.memory import StatsPlan, space_plan, stats_plan
from osrm_core.models import is_causal_lm

from .choice import choose, reason, selection_margin, summarize
from .result import Advice, adapter_layer_verdicts, method_label, weights_label
from .samples import loss_interval, score_interval, split_samples

Progress = Callable[[int, int, str], None]

#: Lambdas of the grid stage (1.0 is kept: task arithmetic at lambda 1 is the usual default).
ADVISE_LAMBDAS = (0.3, 0.5, 0.7, 1.0, 1.3)
#: Methods searched by default: the plain default, TIES, and the two spectral mergers (one SVD per
#: layer, prepared once for the whole search).
ADVISE_METHODS = ("task_arithmetic", "ties", "tsv_m", "iso_c")
#: Densities tried for methods that trim or drop (TIES, DARE).
ADVISE_DENSITIES = (0.3, 0.5, 0.7)
#: Validation evaluations of the per-adapter weight search, and the grid points it starts from.
ADVISE_BUDGET = 8
ADVISE_REFINE = 1


class Search:
    """Candidates scored on the validation engine, every call counted and logged.

    Each (method, density) is prepared once (:func:`osrm_core.merge.prepare_merge`: TIES-like
    trimming per density, DARE's drops, TSV-M's per-task SVDs) and merged for every weight vector
    the search tries, the weights going to the method as its per-task weights. The last
    ``KEEP_PREPARED`` preparations are kept (each holds a copy of the deltas). In core space the
    deltas are LoRA factors and the merges too (:mod:`osrm_core.merge.core`)."""

    KEEP_PREPARED = 3

    def __init__(self, engine: SweepEngine, names: list[str], deltas, grams, seed: int, report,
                 lower_is_better: bool = False, space: str = "full") -> None:
        self.engine, self.names, self.deltas, self.grams, self.seed = engine, names, deltas, grams, seed
        self.space = space
        self.sign = -1.0 if lower_is_better else 1.0  # the objective is maximized: minus a loss
        self.report = report
        self.evaluations = 0
        self.cache: dict[tuple, float] = {}
        self.log: list[dict] = []  # every validation evaluation, in order
        self.prepared: OrderedDict[tuple[str, float | None], object] = OrderedDict()

    def merged(self, method: str, density: float | None, weights: Sequence[float]) -> dict[str, torch.Tensor]:
        from osrm_core.merge import merge_deltas, prepare_merge

        key = (method, density)
        if key not in self.prepared:
            params = {} if density is None else {"density": density}
            self.prepared[key] = prepare_merge(self.deltas, method, grams=self.grams, seed=self.seed, space=self.space,
                                               **params)
            while len(self.prepared) > self.KEEP_PREPARED:
                self.prepared.popitem(last=False)
        self.prepared.move_to_end(key)
        return merge_deltas(self.prepared[key], weights=list(weights), space=self.space)

    def validation(self, method: str, density: float | None, weights: Sequence[float], merged=None,
                   lam: float = 1.0, stage: str = "weights") -> float:
        """The validation score of the merge with ``weights`` (``merged``, scaled by ``lam``, when
        the caller has it already)."""
        key = (method, density, tuple(round(w, 6) for w in weights))
        if key not in self.cache:
            self.engine.apply(merged if merged is not None else self.merged(method, density, weights), lam)
            self.cache[key] = self.sign * float(np.mean(list(self.engine.evaluate().values())))
            self.evaluations += 1
            self.log.append({"evaluation": self.evaluations, "stage": stage, "method": method, "density": density,
                             "weights": weights_label(weights), "validation": self.cache[key]})
            self.report(f"{method_label(method, density)} weights {weights_label(weights)}")
        return self.cache[key]

    def coordinate(self, method: str, density: float | None, start: list[float], budget: int) -> list[float]:
        """Coordinate search on the per-adapter weights: try each weight up and down by a step,
        keep any gain, halve the step when none helps, stop at ``budget`` new evaluations."""
        best_w, best = list(start), self.validation(method, density, start)
        step, spent = 0.25 * max(float(np.mean(start)), 0.1), self.evaluations
        while self.evaluations - spent < budget and step >= 0.03:
            improved = False
            for i in range(len(best_w)):
                for sign in (1, -1):
                    trial = list(best_w)
                    trial[i] = round(max(0.0, trial[i] + sign * step), 4)
                    if self.evaluations - spent >= budget:
                        return best_w
                    got = self.validation(method, density, trial)
                    if got > best + 1e-9:
                        best_w, best, improved = trial, got, True
                        break
            if not improved:
                step /= 2
        return best_w


def advise(model, tokenizer, adapters: dict[str, Adapter], tasks: Sequence[TaskData], *,
           methods: Sequence[str] = ADVISE_METHODS, lambdas: Sequence[float] = ADVISE_LAMBDAS,
           densities: Sequence[float] = ADVISE_DENSITIES, budget: int = ADVISE_BUDGET, refine: int = ADVISE_REFINE,
           holdout: float = 0.5, max_samples: int | None = None, max_length: int = 128, seed: int = 0,
           use_train: bool = False, stats: str = "auto", stats_dtype: str = "float64", space: str = "auto",
           progress: Progress | None = None, on_stage: Callable[[str], None] | None = None) -> Advice:
    """Search merge method, density, lambda and per-adapter weights on a validation share of
    labelled sample texts and report the finalists on the held-out share.

    Parameters
    ----------
    model, tokenizer
        The base model (not a PEFT model) the adapters were trained on; restored on return.
    adapters : dict of task name to Adapter
        Each with the classification head of its task.
    tasks : sequence of TaskData
        Labelled samples per adapter (same names). A task with a test split of its own (a folder,
        a dataset) is scored on that split alone; sample texts and a single file are pooled
        (:func:`sample_pool`).
    methods : merge method names (registry names; RegMean uses the Gram matrices of the validation share)
    lambdas, densities : grids of the first stage
    budget : int
        Validation evaluations for the per-adapter weight search, shared by the ``refine`` best
        grid points (one evaluation scores every task once).
    holdout : float in (0, 1)
        Share of each task's samples held out from the search, for the report.
    max_samples : int, optional
        At most this many samples per task (a seeded subset).
    use_train : bool
        Also score on the training split of tasks that have a test split of their own (warns:
        adapters trained on those texts look better than they are).
    stats, stats_dtype : {"auto", "projected", "dense"}, {"float64", "float32"}
        The verdicts' statistics and RegMean's Gram matrices, as :func:`osrm_core.memory.stats_plan`
        plans them (projected: no post-hoc OSRM); :attr:`Advice.notes` says what it decided.
    space : {"auto", "full", "core"}
        Where the search merges (:func:`osrm_core.memory.space_plan`): the dense deltas, or the
        LoRA factors' cores (no dense delta of the model is held; TIES and DARE act on the cores'
        entries, RegMean is left out); auto: full when its copies of the deltas fit.
    """
    start_time, on_stage = time.perf_counter(), on_stage or (lambda s: None)
    names, by_name = list(adapters), {t.name: t for t in tasks}
    lower = _check_inputs(model, adapters, by_name, methods, lambdas, densities, budget)
    planned = advice_plan(stats, space, adapters, methods, stats_dtype)  # refused here if it does not fit
    methods = planned.methods

    on_stage("splitting the samples")
    split = {n: split_samples(by_name[n], holdout, max_samples=max_samples, seed=seed, use_train=use_train)
             for n in names}
    val_tasks, held_tasks = [split[n][0] for n in names], [split[n][1] for n in names]
    val_engine = SweepEngine(model, tokenizer, val_tasks, adapters, max_length=max_length)
    held_engine = SweepEngine(model, tokenizer, held_tasks, adapters, max_length=max_length, base_from=val_engine)
    on_stage("per-layer verdicts")
    verdicts, deltas, grams = _layer_inputs(model, tokenizer, adapters, val_tasks, planned, max_length, stats_dtype,
                                            val_engine)
    plan = _plan(methods, densities)
    counter = _Counter(2 * len(names) + len(plan) * len(lambdas) + budget + len(plan) + refine, progress)
    try:
        on_stage("single-task scores")
        single = _single_scores({"validation": val_engine, "heldout": held_engine}, names, counter.report)
        search = Search(val_engine, names, deltas, grams, seed, counter.report, lower_is_better=lower,
                        space=planned.space)
        on_stage("grid on the validation share")
        grid = _grid(search, plan, lambdas, len(names))
        on_stage("per-adapter weights on the validation share")
        candidates = _finalists(search, grid, refine, budget, len(names))
        counter.total = counter.done + len(candidates)
        on_stage("held-out scores")
        table = pd.DataFrame(_heldout_rows(held_engine, search, candidates, held_tasks, single, lower, seed,
                                           counter.report))
        summary, margin, chosen = _choice(table, val_tasks)
        best = candidates[int(chosen["candidate"])]
        merged = search.merged(best["method"], best["density"], best["weights"])
    finally:
        val_engine.restore()
        held_engine.restore()
    on_stage("done")
    return Advice(
        names=names, candidates=table, summary=summary,
        single=pd.DataFrame([{"task": n, "share": share, "score": s} for (n, share), s in single.items()]),
        recommended=_recommended(chosen, best, table), reason=reason(summary, chosen, margin, lower),
        evaluations=counter.done, seconds=time.perf_counter() - start_time, notes=list(planned.notes),
        shares={n: split[n][2] for n in names}, merged=merged, layers=verdicts, search=pd.DataFrame(search.log),
        settings={"methods": list(methods), "lambdas": [float(x) for x in lambdas], "stats": planned.stats.kind,
                  "space": planned.space,
                  "densities": [float(x) for x in densities], "budget": budget, "refine": refine,
                  "holdout": holdout, "max_samples": max_samples, "max_length": max_length, "seed": seed,
                  "use_train": use_train, "selection_margin": margin, "stats_dtype": stats_dtype},
    )


def _choice(table: pd.DataFrame, val_tasks: Sequence[TaskData]) -> tuple[pd.DataFrame, float, pd.Series]:
    """The finalists' summary, the selection margin of the validation share (which another
    method or searched weights must clear) and the chosen row."""
    summary = summarize(table)
    margin = selection_margin([(t.metric, len(t.test)) for t in val_tasks])
    return summary, margin, choose(summary, margin)


def _check_inputs(model, adapters: dict[str, Adapter], by_name: dict[str, TaskData], methods: Sequence[str],
                  lambdas: Sequence[float], densities: Sequence[float], budget: int) -> bool:
    """Refuse what the advisor cannot use (one line naming it); returns whether the model is a
    causal LM (each task then scored by the token loss of its texts)."""
    from osrm_core.merge import get_merge_method

    names = list(adapters)
    if len(names) < 2:
        raise OsrmInputError(f"advise needs at least two adapters, got {len(names)}")
    missing = [n for n in names if n not in by_name]
    if missing:
        raise OsrmInputError(f"adapter {missing[0]!r} has no sample texts of the same name; tasks are {sorted(by_name)}")
    if not methods:
        raise OsrmInputError("methods is empty: give at least one merge method")
    for method in methods:
        get_merge_method(method)
    bad = [x for x in [*lambdas, *densities] if not 0 < x <= 10]
    if not lambdas or bad:
        raise OsrmInputError(f"lambdas must be a non-empty list in (0, 10] and densities in (0, 1]; got {bad}")
    if not isinstance(budget, int) or budget < 0:
        raise OsrmInputError(f"budget is {budget!r}; it must be an integer >= 0")
    lower = is_causal_lm(model)
    for name, adapter in adapters.items():
        check_against_model(adapter, model, where=name)
        if not lower and not by_name[name].labeled:
            raise OsrmInputError(f"task {name!r} has no labels; the merge advisor needs labelled samples of every task "
                                 "(or adapters of a causal LM, scored by the token loss of plain texts)")
        classes = num_labels_of(adapter)
        if classes is not None and by_name[name].num_labels > classes:
            raise OsrmInputError(
                f"task {name!r}: labels 0..{by_name[name].num_labels - 1} but the adapter's head has {classes} classes"
            )
    return lower


@dataclass(frozen=True)
class AdvicePlan:
    """What :func:`advise` collects and where it merges (:func:`advice_plan`).

    Attributes
    ----------
    stats : StatsPlan
        The verdicts' statistics and whether RegMean's Gram matrices are collected.
    space : {"full", "core"}
        Where the search merges.
    methods : list of str
        The methods searched (those that need Gram matrices left out where the plan has none).
    notes : tuple of str
        One line per choice made for the user (core space, RegMean left out, projected
        statistics), as :attr:`Advice.notes` reports them.
    """

    stats: StatsPlan
    space: str
    methods: list[str]
    notes: tuple[str, ...] = ()


def advice_plan(stats: str, space: str, adapters: dict[str, Adapter], methods: Sequence[str],
                stats_dtype: str) -> AdvicePlan:
    """The statistics :func:`advise` collects (:func:`osrm_core.memory.stats_plan` for its
    adapters' tasks: dense moments without the per-sample means serve the verdicts and RegMean)
    and where it merges (:func:`osrm_core.memory.space_plan`: the full-space search holds the
    deltas and ``Search.KEEP_PREPARED`` prepared copies of them, and the merge); methods that need
    Gram matrices are left out, with a note, in core space or when the plan has no Grams. Each
    refused in one line when the user's explicit choice does not fit. The command line calls it
    before loading the model."""
    from osrm_core.merge import get_merge_method

    needs_gram = [m for m in methods if get_merge_method(m).needs_gram]
    where, notes = space_plan(space, adapters, len(adapters) * (1 + Search.KEEP_PREPARED) + 1)
    if where == "core" and needs_gram:
        notes = (*notes, f"{', '.join(needs_gram)} left out: core space has no Gram matrices of the full input space")
    planned = stats_plan(stats, adapters, len(adapters), stats_dtype=stats_dtype, sample_means=False,
                         regmean=bool(needs_gram) and where == "full")
    notes = (*notes, *planned.notes)
    if planned.projected:
        notes = (*notes, "per-layer verdicts from projected statistics: post-hoc OSRM left out (it needs the "
                 "d x d moments; --stats dense)")
    return AdvicePlan(planned, where, [m for m in methods if planned.grams or m not in needs_gram], notes)


def _layer_inputs(model, tokenizer, adapters: dict[str, Adapter], val_tasks: list[TaskData], plan: AdvicePlan,
                  max_length: int, stats_dtype: str, engine: SweepEngine):
    """The per-layer verdicts from the validation share's statistics (projected or dense, as
    ``plan`` says), and the merge inputs: in full space the deltas, and Gram matrices when
    ``plan.stats.grams`` (the dense moments, only ``sum h h^T`` and ``sum h`` at the adapters'
    layers, in ``stats_dtype``); in core space the LoRA factors ``engine`` holds."""
    from osrm_core.export import merge_inputs
    from osrm_core.workflows import task_stats

    dense = None
    if not plan.stats.projected or plan.stats.grams:
        dense = task_stats(model, tokenizer, val_tasks, samples=None, max_length=max_length,
                           target_modules=list(union_layers(adapters)), dtype=getattr(torch, stats_dtype),
                           sample_means=False)
    stats = task_stats(model, tokenizer, val_tasks, samples=None, max_length=max_length,
                       adapters=adapters) if plan.stats.projected else dense
    verdicts = adapter_layer_verdicts(model, adapters, stats)
    if plan.space == "core":
        return verdicts, [engine.single[n] for n in adapters], None
    deltas, grams = merge_inputs(adapters, dense if plan.stats.grams else None)
    return verdicts, deltas, grams


def _plan(methods: Sequence[str], densities: Sequence[float]) -> list[tuple[str, float | None]]:
    """(method, density) of the grid; task arithmetic, the default, always first."""
    from osrm_core.merge import get_merge_method

    return [(method, density) for method in ["task_arithmetic", *[m for m in methods if m != "task_arithmetic"]]
            for density in (densities if get_merge_method(method).uses_density else [None])]


class _Counter:
    """The evaluations done and planned, told to ``progress``."""

    def __init__(self, total: int, progress: Progress | None) -> None:
        self.total, self.done, self.progress = total, 0, progress

    def report(self, message: str) -> None:
        self.done += 1
        if self.progress:
            self.progress(self.done, self.total, f"evaluation {self.done}: {message}")


def _single_scores(engines: dict[str, SweepEngine], names: list[str], report) -> dict[tuple[str, str], float]:
    """Each adapter alone on its task, on each share: ``{(task, share): score}``."""
    single = {}
    for share, engine in engines.items():
        for n in names:
            engine.apply(engine.single[n])
            single[(n, share)] = engine.evaluate([n])[n]
            report(f"single-task {n} ({share})")
    return single


def _grid(search: Search, plan: list[tuple[str, float | None]], lambdas: Sequence[float], n: int) -> list[dict]:
    """Every (method, density) at every lambda on the validation share (one merge per
    (method, density), scaled by lambda)."""
    grid = []
    for method, density in plan:
        unit = search.merged(method, density, [1.0] * n)
        for lam in lambdas:
            weights = [float(lam)] * n
            got = search.validation(method, density, weights, unit, lam, stage="grid")
            grid.append({"method": method, "density": density, "weights": weights, "origin": "grid",
                         "validation": got})
    return grid


def _finalists(search: Search, grid: list[dict], refine: int, budget: int, n: int) -> list[dict]:
    """The plain default, the best grid point of each (method, density) and the weights the
    coordinate search found from the ``refine`` best of them (``budget`` evaluations shared)."""
    best_per_config: dict[tuple, dict] = {}
    for c in grid:
        key = (c["method"], c["density"])
        if key not in best_per_config or c["validation"] > best_per_config[key]["validation"]:
            best_per_config[key] = c
    starts = sorted(best_per_config.values(), key=lambda c: -c["validation"])[:refine]
    searched = []
    for i, c in enumerate(starts):
        share = budget // len(starts) + (1 if i < budget % len(starts) else 0) if starts else 0
        weights = search.coordinate(c["method"], c["density"], c["weights"], share)
        if weights != c["weights"]:
            searched.append({**c, "weights": weights, "origin": "weights",
                             "validation": search.validation(c["method"], c["density"], weights)})
    ones = [1.0] * n  # the plain default: task arithmetic at lambda 1, always a finalist
    default = {"method": "task_arithmetic", "density": None, "weights": ones, "origin": "default",
               "validation": search.validation("task_arithmetic", None, ones, stage="default")}
    return [default, *[c for c in [*best_per_config.values(), *searched] if c["weights"] != ones
                       or c["method"] != "task_arithmetic"]]


def _heldout_rows(engine: SweepEngine, search: Search, candidates: list[dict], held_tasks: list[TaskData],
                  single: dict, lower: bool, seed: int, report) -> list[dict]:
    """One row per finalist and task: its held-out score with a 95% interval."""
    rows = []
    for k, c in enumerate(candidates):
        engine.apply(search.merged(c["method"], c["density"], c["weights"]))
        preds = {} if lower else engine.predictions()
        report(f"held-out {method_label(c['method'], c['density'])} weights {weights_label(c['weights'])}")
        for t in held_tasks:
            n = t.name
            if lower:
                losses, units = engine.example_losses(n)
                got = float(losses.sum() / units.sum())
                low, high = loss_interval(losses, units, seed=seed)
            else:
                got = score(t.metric, t.test.label, preds[n])
                low, high = score_interval(t.metric, t.test.label, preds[n], seed=seed)
            ref = single[(n, "heldout")]
            rows.append({"candidate": k, "method": c["method"], "density": c["density"],
                         "weights": weights_label(c["weights"]), "origin": c["origin"],
                         "validation": c["validation"], "task": n, "metric": engine.tasks[n].metric,
                         "n": len(t.test), "score": got, "low": low, "high": high, "single": ref,
                         "normalized": got / ref if ref > 0 else float("nan")})
    return rows


def _recommended(chosen: pd.Series, best: dict, table: pd.DataFrame) -> dict:
    return {
        "method": chosen["method"],
        "density": None if pd.isna(chosen["density"]) else float(chosen["density"]),
        "weights": best["weights"],
        "candidate": int(chosen["candidate"]),
        "validation": float(chosen["validation"]),
        "heldout": float(chosen["score"]),
        "heldout_low": float(chosen["low"]),
        "heldout_high": float(chosen["high"]),
        "heldout_per_task": {
            r.task: float(r.score) for r in table[table["candidate"] == chosen["candidate"]].itertuples()
        },
    }
