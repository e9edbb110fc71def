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

import json
import math
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from osrm_core.adapters import Adapter, check_against_model, num_labels_of, union_layers
from osrm_core.data import Split, TaskData
from osrm_core.errors import OsrmInputError
from osrm_core.evaluate import LOWER_IS_BETTER, SweepEngine, score
from osrm_core.models import is_causal_lm

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
#: z of a two-sided 95% interval.
Z95 = 1.959964


# --------------------------------------------------------------------------- intervals


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``successes / n`` (95% by default)."""
    if n <= 0:
        raise OsrmInputError(f"n must be positive, got {n}")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def score_interval(
    metric: str, y_true: np.ndarray, y_pred: np.ndarray, *, seed: int = 0, resamples: int = 200
) -> tuple[float, float]:
    """95% interval of a task's metric: Wilson for accuracy, a seeded percentile bootstrap for
    Matthews correlation and F1 (no closed form from the sample count alone)."""
    n = len(y_true)
    if metric == "accuracy":
        return wilson_interval(int((y_true == y_pred).sum()), n)
    rng = np.random.default_rng(seed)
    draws = [score(metric, y_true[idx], y_pred[idx]) for idx in rng.integers(0, n, size=(resamples, n))]
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return float(lo), float(hi)


def loss_interval(total: np.ndarray, units: np.ndarray, *, seed: int = 0, resamples: int = 200) -> tuple[float, float]:
    """95% percentile-bootstrap interval of a mean loss ``sum(total) / sum(units)`` over examples
    (e.g. the token losses of each text, :func:`osrm_core.evaluate.example_losses`)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(total), size=(resamples, len(total)))
    draws = total[idx].sum(1) / np.maximum(units[idx].sum(1), 1)
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return float(lo), float(hi)


# --------------------------------------------------------------------------- samples


def sample_pool(task: TaskData, *, use_train: bool = False) -> tuple[Split, str]:
    """The texts the advisor may score a task's adapter on, and where they came from.

    A task whose source gave a test split of its own (a folder's ``test.csv``, a dataset's test
    split, the demo tasks) contributes that split alone: its training texts are what the adapter
    may have been fine-tuned on, and a test text that is also a training text is left out.
    ``use_train`` adds them anyway (the user's call; a warning says so). Sample texts (train and test the same texts) and a single file (split here) are pooled
    whole. Exact duplicates (text and pair) are kept once, so no text can land in both shares.

    Returns
    -------
    (Split, str)
        The pool, and its origin: ``"test"`` for a source's test split, ``"train+test"`` with
        ``use_train``, else the task's source (a file name, ``upload``, ``sample texts``).
    """
    a, b = task.train, task.test
    same = a is b or (a.text == b.text and a.text_pair == b.text_pair)
    if same:
        pool, origin = b, task.source or "sample texts"
    elif task.drawn_test or use_train:
        if use_train and not task.drawn_test:
            warnings.warn(f"task {task.name!r}: the advisor scores on its training texts too (use_train); "
                          "an adapter trained on them looks better than it is", stacklevel=3)
        pair = None if a.text_pair is None else a.text_pair + b.text_pair
        label = None if a.label is None else np.concatenate([a.label, b.label])
        pool = Split(a.text + b.text, label, pair)
        origin = (task.source or "sample texts") if task.drawn_test else "train+test"
    else:
        pool, origin = b, "test"
    seen: set = set(_pairs(a)) if origin == "test" else set()  # a test text also in train: seen in training
    keep = []
    for i, key in enumerate(_pairs(pool)):
        if key not in seen:
            seen.add(key)
            keep.append(i)
    if len(keep) < len(pool.text):
        pool = _subset(pool, np.asarray(keep))
    return pool, origin


def _pairs(split: Split):
    """(text, text_pair) of each sample: what makes two samples the same."""
    return zip(split.text, split.text_pair or [None] * len(split.text))


def _subset(split: Split, idx: np.ndarray) -> Split:
    pair = None if split.text_pair is None else [split.text_pair[i] for i in idx]
    return Split([split.text[i] for i in idx], None if split.label is None else split.label[idx], pair)


def split_samples(
    task: TaskData, holdout: float = 0.5, *, max_samples: int | None = None, seed: int = 0,
    use_train: bool = False,
) -> tuple[TaskData, TaskData, dict]:
    """Stratified, seeded split of a task's sample pool (:func:`sample_pool`) into a validation
    and a held-out share.

    Every class with at least two samples puts at least one in each share. Returns the two
    shares as tasks (train = test = the share) and what was split: ``{"split": origin,
    "validation": indices, "heldout": indices}``, indices into the pool.
    """
    if not 0 < holdout < 1:
        raise OsrmInputError(f"holdout is {holdout}; it must be in (0, 1)")
    pooled, origin = sample_pool(task, use_train=use_train)
    rng = np.random.default_rng(seed)
    idx = np.arange(len(pooled))
    if max_samples is not None and max_samples < len(idx):
        idx = np.sort(rng.choice(idx, size=max_samples, replace=False))
    strata = pooled.label if task.labeled else np.zeros(len(pooled), dtype=np.int64)  # texts: one stratum
    val, held = [], []
    for label in np.unique(strata[idx]):
        members = rng.permutation(idx[strata[idx] == label])
        k = int(round(holdout * len(members)))
        if len(members) >= 2:
            k = min(max(k, 1), len(members) - 1)
        held += members[:k].tolist()
        val += members[k:].tolist()
    shares = []
    for name, chosen in (("validation", sorted(val)), ("held-out", sorted(held))):
        if len(chosen) < 2 or (task.labeled and np.unique(strata[chosen]).size < 2):
            raise OsrmInputError(
                f"task {task.name!r}: the {name} share has {len(chosen)} samples of "
                f"{np.unique(strata[chosen]).size} class(es) (from its {origin} texts); give at least 2 samples"
                + (" of each of 2 classes" if task.labeled else " in each share (4 texts or more)")
            )
        part = _subset(pooled, np.asarray(chosen))
        shares.append(TaskData(task.name, part, part, task.label_names, task.metric, source=origin))
    return shares[0], shares[1], {"split": origin, "validation": sorted(val), "heldout": sorted(held)}


# --------------------------------------------------------------------------- result


@dataclass
class Advice:
    """What :func:`advise` found.

    Attributes
    ----------
    candidates : DataFrame
        One row per finalist and task: ``candidate, method, density, weights, origin,
        validation, task, metric, n, score, low, high, single, normalized`` (held-out share; ``validation``
        is the candidate's mean validation score, the search objective). The finalists are the
        best grid point of each method and density (``origin`` ``grid``) and the weights the
        search found from the best of them (``weights``).
    summary : DataFrame
        One row per finalist: mean held-out score with its 95% interval, mean normalized score,
        validation score.
    search : DataFrame
        Every validation evaluation of the search in order: ``evaluation, stage`` (``grid`` or
        ``weights``), ``method, density, weights, validation`` (minus the loss for causal LMs).
    single : DataFrame
        Single-task scores per task on each share (``task, share, score``).
    recommended : dict
        The chosen candidate (method, density, weights, held-out scores).
    reason : str
        One sentence with numbers saying why.
    shares : dict of task to {"split": origin, "validation": indices, "heldout": indices}
        Where each task's samples came from (``"test"``: the source's test split) and the
        indices of each share into that pool (see :func:`split_samples`).
    merged : dict of layer to tensor (d_out, d_in)
        The recommended merge's ``Delta_W``.
    layers : DataFrame
        Per-layer verdicts (:func:`osrm_core.diagnostics.layer_verdicts`) from the statistics of
        the validation share; :func:`layer_notes` says them in words.
    """

    names: list[str]
    candidates: pd.DataFrame
    summary: pd.DataFrame
    single: pd.DataFrame
    recommended: dict
    reason: str
    evaluations: int
    seconds: float
    shares: dict[str, dict[str, list[int]]] = field(repr=False)
    settings: dict = field(default_factory=dict)
    merged: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    layers: pd.DataFrame = field(default_factory=pd.DataFrame, repr=False)
    search: pd.DataFrame = field(default_factory=pd.DataFrame, repr=False)

    @property
    def lower_is_better(self) -> bool:
        """Whether the scores are losses (adapters of a causal LM): the best comes lowest."""
        return bool(len(self.candidates)) and bool(self.candidates["metric"].isin(LOWER_IS_BETTER).all())

    def to_dict(self) -> dict:
        def records(df: pd.DataFrame) -> list[dict]:
            return json.loads(df.to_json(orient="records"))

        return {
            "adapters": self.names,
            "recommended": self.recommended,
            "reason": self.reason,
            "summary": records(self.summary),
            "candidates": records(self.candidates),
            "search": records(self.search),
            "single": records(self.single),
            "evaluations": self.evaluations,
            "seconds": round(self.seconds, 2),
            "shares": self.shares,
            "samples": {n: {"split": s["split"], "validation": len(s["validation"]), "heldout": len(s["heldout"])}
                        for n, s in self.shares.items()},
            "layers": records(self.layers),
            "layer_notes": layer_notes(self.layers) if len(self.layers) else [],
            "settings": self.settings,
        }


def weights_label(weights: Sequence[float]) -> str:
    return "/".join(f"{w:.2g}" for w in weights)


def _method_label(method: str, density: float | None) -> str:
    return method + ("" if density is None or pd.isna(density) else f" (density {density:g})")


# --------------------------------------------------------------------------- per-layer verdicts


def adapter_layer_verdicts(model, adapters: dict[str, Adapter], stats: dict) -> pd.DataFrame:
    """:func:`osrm_core.diagnostics.layer_verdicts` of the adapters against their tasks' statistics
    (over the union of their layers)."""
    from osrm_core.diagnostics import interference_table, layer_verdicts, posthoc_osrm_adapters
    from osrm_core.models import weight_as_linear

    w0 = {n: weight_as_linear(model.get_submodule(n)).detach() for n in union_layers(adapters)}
    projected, kept = posthoc_osrm_adapters(adapters, stats)
    table = pd.concat(
        [interference_table(adapters, stats, w0).assign(init="uploaded"),
         interference_table(projected, stats, w0).assign(init="posthoc_osrm")],
        ignore_index=True,
    )
    return layer_verdicts(table, kept)


def layer_notes(verdicts: pd.DataFrame) -> list[str]:
    """One plain sentence per layer group (the adapted layers of one block), ranked by the
    interference they carry, from :func:`osrm_core.diagnostics.layer_verdicts`."""
    from osrm_core.viz.common import short_layer

    block = verdicts["layer"].map(lambda n: short_layer(n).split(".")[0])
    notes = []
    for name, part in verdicts.groupby(block, sort=False):
        total, own = float(part["cross_shift"].sum()), float(part["own_shift"].sum())
        removed = 1 - float(part["cross_shift_posthoc"].sum()) / total if total > 0 else 0.0
        kept = float(part["kept_by_posthoc"].mean())
        top = part.iloc[0]  # verdicts come most interference first
        layers = ", ".join(short_layer(n).split(".")[-1] for n in part["layer"])
        if own <= 0:
            notes.append((total, f"{name} ({layers}): the adapters do not change this block."))
            continue
        if total / own < 0.05:
            verdict = "little to fix here"
        elif removed >= 0.5 and kept >= 0.5:
            verdict = "projecting is worth it here"
        elif removed >= 0.5:
            verdict = "it would remove the interference but also most of what the adapters learned here"
        else:
            verdict = "projection would not help much here"
        notes.append((total, (
            f"{name} ({layers}): the other tasks' adapters shift each task's outputs by {total:.2%} of their "
            f"energy in all ({total / own:.2f}x the wanted change), mostly {top['top_adapter']} on "
            f"{top['top_data']} ({top['top_share']:.0%} at {short_layer(top['layer'])}); post-hoc OSRM would "
            f"remove {removed:.0%} of it and keep {kept:.0%} of the adapters' ΔW: {verdict}."
        )))
    ranked = sorted(notes, key=lambda x: -x[0])
    return [f"{k}. {text}" for k, (_, text) in enumerate(ranked, start=1)]


# --------------------------------------------------------------------------- search


class _Search:
    """Candidates scored on the validation engine, every call counted and logged.

    Each (method, density) is prepared once (:func:`osrm_core.merge.prepare_merge`: TIES-like
    trimming per density, DARE's drops, TSV-M's per-task SVDs) and merged for every weight vector
    the search tries, the weights going to the method as its per-task weights. The last
    ``KEEP_PREPARED`` preparations are kept (each holds a copy of the deltas)."""

    KEEP_PREPARED = 3

    def __init__(self, engine: SweepEngine, names: list[str], deltas, grams, seed: int, report,
                 lower_is_better: bool = False) -> None:
        self.engine, self.names, self.deltas, self.grams, self.seed = engine, names, deltas, grams, seed
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
            self.prepared[key] = prepare_merge(self.deltas, method, grams=self.grams, seed=self.seed, **params)
            while len(self.prepared) > self.KEEP_PREPARED:
                self.prepared.popitem(last=False)
        self.prepared.move_to_end(key)
        return merge_deltas(self.prepared[key], weights=list(weights))

    def validation(self, method: str, density: float | None, weights: Sequence[float], merged=None,
                   stage: str = "weights") -> float:
        key = (method, density, tuple(round(w, 6) for w in weights))
        if key not in self.cache:
            self.engine.apply(merged if merged is not None else self.merged(method, density, weights))
            self.cache[key] = self.sign * float(np.mean(list(self.engine.evaluate().values())))
            self.evaluations += 1
            self.log.append({"evaluation": self.evaluations, "stage": stage, "method": method, "density": density,
                             "weights": weights_label(weights), "validation": self.cache[key]})
            self.report(f"{_method_label(method, density)} weights {weights_label(weights)}")
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


def advise(
    model,
    tokenizer,
    adapters: dict[str, Adapter],
    tasks: Sequence[TaskData],
    *,
    methods: Sequence[str] = ADVISE_METHODS,
    lambdas: Sequence[float] = ADVISE_LAMBDAS,
    densities: Sequence[float] = ADVISE_DENSITIES,
    budget: int = ADVISE_BUDGET,
    refine: int = ADVISE_REFINE,
    holdout: float = 0.5,
    max_samples: int | None = None,
    max_length: int = 128,
    seed: int = 0,
    use_train: bool = False,
    progress: Progress | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> Advice:
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
    methods : merge method names (registry names; RegMean uses statistics of the validation share)
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

    Returns
    -------
    Advice
    """
    from osrm_core.merge import get_merge_method

    start_time = time.perf_counter()
    on_stage = on_stage or (lambda s: None)
    names = list(adapters)
    by_name = {t.name: t for t in tasks}
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
    lower = is_causal_lm(model)  # a causal LM: each task scored by the token loss of its texts
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

    on_stage("splitting the samples")
    val_tasks, held_tasks, shares = [], [], {}
    for n in names:
        v, h, idx = split_samples(by_name[n], holdout, max_samples=max_samples, seed=seed, use_train=use_train)
        val_tasks.append(v)
        held_tasks.append(h)
        shares[n] = idx
    on_stage("per-layer verdicts")
    from osrm_core.export import merge_inputs
    from osrm_core.workflows import task_stats

    stats = task_stats(model, tokenizer, val_tasks, samples=None, max_length=max_length,
                       target_modules=list(union_layers(adapters)))
    verdicts = adapter_layer_verdicts(model, adapters, stats)
    needs_gram = any(get_merge_method(m).needs_gram for m in methods)
    deltas, grams = merge_inputs(adapters, stats if needs_gram else None)
    plan = []
    for method in ["task_arithmetic", *[m for m in methods if m != "task_arithmetic"]]:  # the default always
        for density in densities if get_merge_method(method).uses_density else [None]:
            plan.append((method, density))
    n_grid = len(plan) * len(lambdas)
    total = {"n": 2 * len(names) + n_grid + budget + len(plan) + refine}
    done = {"n": 0}

    def report(message: str) -> None:
        done["n"] += 1
        if progress:
            progress(done["n"], total["n"], f"evaluation {done['n']}: {message}")

    val_engine = SweepEngine(model, tokenizer, val_tasks, adapters, max_length=max_length)
    held_engine = SweepEngine(model, tokenizer, held_tasks, adapters, max_length=max_length)
    try:
        on_stage("single-task scores")
        single = {}
        for share, engine in (("validation", val_engine), ("heldout", held_engine)):
            for n in names:
                engine.apply(engine.single_deltas[n])
                single[(n, share)] = engine.evaluate([n])[n]
                report(f"single-task {n} ({share})")
        search = _Search(val_engine, names, deltas, grams, seed, report, lower_is_better=lower)

        on_stage("grid on the validation share")
        grid = []
        for method, density in plan:
            unit = search.merged(method, density, [1.0] * len(names))
            for lam in lambdas:
                weights = [float(lam)] * len(names)
                got = search.validation(method, density, weights, {k: lam * d for k, d in unit.items()}, stage="grid")
                grid.append({"method": method, "density": density, "weights": weights, "origin": "grid",
                             "validation": got})

        on_stage("per-adapter weights on the validation share")
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
        ones = [1.0] * len(names)  # the plain default: task arithmetic at lambda 1, always a finalist
        default = {"method": "task_arithmetic", "density": None, "weights": ones, "origin": "default",
                   "validation": search.validation("task_arithmetic", None, ones, stage="default")}
        candidates = [default, *[c for c in [*best_per_config.values(), *searched] if c["weights"] != ones
                                 or c["method"] != "task_arithmetic"]]  # the finalists
        total["n"] = done["n"] + len(candidates)

        on_stage("held-out scores")
        rows = []
        for k, c in enumerate(candidates):
            held_engine.apply(search.merged(c["method"], c["density"], c["weights"]))
            preds = {} if lower else held_engine.predictions()
            report(f"held-out {_method_label(c['method'], c['density'])} weights {weights_label(c['weights'])}")
            for n, t in zip(names, held_tasks):
                if lower:
                    losses, units = held_engine.example_losses(n)
                    got = float(losses.sum() / units.sum())
                    low, high = loss_interval(losses, units, seed=seed)
                else:
                    got = score(t.metric, t.test.label, preds[n])
                    low, high = score_interval(t.metric, t.test.label, preds[n], seed=seed)
                ref = single[(n, "heldout")]
                rows.append({"candidate": k, "method": c["method"], "density": c["density"],
                             "weights": weights_label(c["weights"]), "origin": c["origin"],
                             "validation": c["validation"], "task": n, "metric": held_engine.tasks[n].metric,
                             "n": len(t.test), "score": got, "low": low, "high": high, "single": ref,
                             "normalized": got / ref if ref > 0 else float("nan")})
        table = pd.DataFrame(rows)
        summary = _summarize(table)
        margin = selection_margin([(t.metric, len(t.test)) for t in val_tasks])  # for methods and weights
        chosen = _choose(summary, margin)
        best = candidates[int(chosen["candidate"])]
        merged = search.merged(best["method"], best["density"], best["weights"])
    finally:
        val_engine.restore()
        held_engine.restore()

    recommended = {
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
    single_df = pd.DataFrame(
        [{"task": n, "share": share, "score": s} for (n, share), s in single.items()]
    )
    on_stage("done")
    return Advice(
        names=names, candidates=table, summary=summary, single=single_df, recommended=recommended,
        reason=_reason(summary, chosen, margin, lower), evaluations=done["n"], seconds=time.perf_counter() - start_time,
        shares=shares, merged=merged, layers=verdicts, search=pd.DataFrame(search.log),
        settings={"methods": list(methods), "lambdas": [float(x) for x in lambdas],
                  "densities": [float(x) for x in densities], "budget": budget, "refine": refine,
                  "holdout": holdout, "max_samples": max_samples, "max_length": max_length, "seed": seed,
                  "use_train": use_train, "selection_margin": margin},
    )


def _summarize(table: pd.DataFrame) -> pd.DataFrame:
    """Per candidate: mean held-out score, its 95% interval (per-task half-widths combined as
    independent normal errors), mean normalized score and the validation score."""
    rows = []
    for k, part in table.groupby("candidate", sort=True):
        half = np.sqrt((((part["high"] - part["low"]) / 2) ** 2).sum()) / len(part)
        mean = float(part["score"].mean())
        first = part.iloc[0]
        rows.append({"candidate": k, "method": first["method"], "density": first["density"],
                     "weights": first["weights"], "origin": first["origin"],
                     "validation": first["validation"], "score": mean, "low": mean - half, "high": mean + half,
                     "normalized": float(part["normalized"].mean())})
    return pd.DataFrame(rows)


#: Complexity of a finalist: task arithmetic with one lambda, another method's lambda, searched weights.
_TIER = {"default": 0, "grid": 1, "weights": 2}


def selection_margin(shares: Sequence[tuple[str, int]]) -> float:
    """How far another method or searched weights must beat task arithmetic's validation score to
    be chosen over it.

    Half the width of a 95% interval of a mean over tasks of ``n_t`` validation texts each, at
    the largest variance a score can have (0.25 for an accuracy or F1, 1 for a Matthews
    correlation in [-1, 1]): ``1.96 sqrt(sum_t v_t / n_t) / T``. With 20 texts per task and
    three tasks that is 6.3 points: picking the best of many candidates on a few dozen texts
    over-fits them, so the advisor keeps task arithmetic unless a candidate wins clearly.
    Losses (causal LMs): 0.
    """
    if not shares or any(metric == "loss" for metric, _ in shares):
        return 0.0
    var = sum((1.0 if metric == "mcc" else 0.25) / max(n, 1) for metric, n in shares)
    return 1.96 * math.sqrt(var) / len(shares)


def _baseline(summary: pd.DataFrame) -> pd.Series | None:
    """Task arithmetic at its best lambda on the validation share (lambda 1, the plain default,
    on a tie): one scalar tuned, the simplest candidate worth having."""
    ta = summary[(summary["method"] == "task_arithmetic") & summary["origin"].isin(["default", "grid"])]
    if ta.empty:
        return None
    return ta.assign(_d=ta["origin"] != "default").sort_values(["validation", "_d"], ascending=[False, True]).iloc[0]


def _choose(summary: pd.DataFrame, margin: float = 0.0) -> pd.Series:
    """Task arithmetic at its best validation lambda (:func:`_baseline`) unless another finalist
    (another method, or searched weights) beats its validation score by more than ``margin``;
    among those that do, the best validation score, then the simpler, then the earlier."""
    base = _baseline(summary)
    if base is None:
        ok = summary
    else:
        ok = summary[(summary["candidate"] == base["candidate"]) | (summary["validation"] > base["validation"] + margin)]
    ranked = ok.assign(_tier=ok["origin"].map(_TIER).fillna(3)).sort_values(
        ["validation", "_tier", "candidate"], ascending=[False, True, True]
    )
    return ranked.iloc[0].drop("_tier")


def _reason(summary: pd.DataFrame, chosen: pd.Series, margin: float = 0.0, lower: bool = False) -> str:
    what = _method_label(chosen["method"], chosen["density"])
    if chosen["origin"] == "weights":
        what += f", per-adapter weights {chosen['weights']}"
    else:
        what += f", lambda {chosen['weights'].split('/')[0]}"
    held = f"{'mean loss ' if lower else ''}{chosen['score']:.3f} [{chosen['low']:.3f}, {chosen['high']:.3f}]"
    default = summary[summary["origin"] == "default"]
    base = _baseline(summary)
    if default.empty or base is None or lower:
        best = f"the best validation {'loss' if lower else 'score'} ({abs(chosen['validation']):.3f})"
        return f"{what}: {best}; held-out {held}."
    ref = default.iloc[0]
    plain = f"the plain default (task arithmetic, lambda 1: held-out {ref['score']:.3f})"
    gain = 100 * (chosen["score"] - ref["score"])
    versus = f"{abs(gain):.1f} points {'above' if gain >= 0 else 'below'} {plain}"
    if int(base["candidate"]) == int(chosen["candidate"]):
        lam = "the plain default" if chosen["origin"] == "default" else "task arithmetic's best lambda on the validation texts"
        return (f"{what}: {lam}; no other method or weighting beat it there by more than {100 * margin:.1f} points, "
                f"the uncertainty of so few texts; held-out {held}" + ("." if chosen["origin"] == "default" else f", {versus}."))
    return (f"{what}: validation {100 * (chosen['validation'] - base['validation']):.1f} points above task "
            f"arithmetic's best lambda (margin {100 * margin:.1f}); held-out {held}, {versus}.")


# --------------------------------------------------------------------------- output


def grid_table(search: pd.DataFrame) -> pd.DataFrame:
    """The grid stage of :attr:`Advice.search` as a table: one row per method and density, one
    column per lambda, the validation score in the cells."""
    grid = search[search["stage"] == "grid"] if not search.empty else search
    if grid.empty:
        return pd.DataFrame()
    grid = grid.assign(
        config=[_method_label(m, d) for m, d in zip(grid["method"], grid["density"])],
        lam=grid["weights"].str.split("/").str[0],
    )
    table = grid.pivot_table(index="config", columns="lam", values="validation", sort=False)
    return table.rename_axis(columns=None).reset_index().rename(columns={"config": "method"})


def advice_markdown(advice: Advice) -> str:
    """The advice as a short Markdown report."""
    from osrm_core.study import _md

    cols = ["method", "density", "weights", "origin", "validation", "score", "low", "high", "normalized"]
    table = advice.summary.sort_values("score", ascending=advice.lower_is_better)[cols]
    single = advice.single.pivot_table(index="task", columns="share", values="score").reset_index()
    lines = [
        "# Merge advice", "",
        f"Adapters: {', '.join(advice.names)}. {advice.evaluations} evaluations in {advice.seconds:.1f} s.", "",
        f"**Recommended**: {advice.reason}", "",
        "Where each task's samples came from (`test`: the test split of a task folder, never its train",
        "texts), and how many went to each share: "
        + "; ".join(f"{n} {s['split']} ({len(s['validation'])} validation, {len(s['heldout'])} held out)"
                    for n, s in advice.shares.items()) + ".", "",
        "Scores are each task's metric on the held-out share (never seen by the search), averaged over",
        "tasks, with a 95% interval (Wilson per task for accuracy, bootstrap otherwise); for adapters of",
        "a causal LM the metric is the mean token loss (lower is better). `normalized` divides by each",
        "adapter alone. `validation` is the search objective (higher is better: minus a loss).", "",
        _md(table), "", "## Single-task scores", "", _md(single), "",
        "## The search on the validation share", "",
        f"Validation score of each grid point (rows: method and density; columns: lambda); then "
        f"{int((advice.search['stage'] == 'weights').sum()) if len(advice.search) else 0} evaluations of "
        "per-adapter weights.", "",
        _md(grid_table(advice.search)), "",
        "## Interference per layer", "",
        "Exact, from the statistics of the validation texts; ranked by the summed relative output",
        "shift of every adapter on the other tasks' inputs.", "",
        *[f"{note}  " for note in layer_notes(advice.layers)], "",
        _md(advice.layers), "",
    ]
    return "\n".join(lines)


def merge_command(advice: Advice, adapters: dict[str, Adapter], out: str = "merged/") -> str:
    """The ``osrm merge`` command that writes the recommended adapter again (equal weights are
    one lambda: every method here is positively homogeneous, ``merge(w D) = w merge(D)``)."""
    rec = advice.recommended
    weights = list(rec["weights"])
    parts = ["osrm merge", *[f"--adapter {n}={adapters[n].source or n}" for n in advice.names],
             f"--method {rec['method']}"]
    if rec["density"] is not None:
        parts.append(f"--density {rec['density']:g}")
    if len(set(weights)) == 1:
        parts.append(f"--lambda {weights[0]:g}")
    else:
        parts += ["--lambda 1", "--weights " + ",".join(f"{n}={w:g}" for n, w in zip(advice.names, weights))]
    if rec["method"].startswith("dare"):
        parts.append(f"--seed {advice.settings.get('seed', 0)}")
    return " ".join([*parts, f"--out {out}"])


def write_advice(advice: Advice, adapters: dict[str, Adapter], out: str | Path) -> Path:
    """Write ``advice.json``, ``advice.md`` and the recommended merged adapter (``adapter/``,
    loadable by plain peft, each task's head under ``adapter/heads/``, its model card with the
    held-out scores)."""
    from osrm_core.atomic import write_json, write_text
    from osrm_core.export import write_merged_adapter, write_model_card

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path, written = write_merged_adapter(out / "adapter", advice.merged, adapters)
    rec = advice.recommended
    params = {"weights": list(rec["weights"]), **({} if rec["density"] is None else {"density": rec["density"]})}
    held = advice.candidates[advice.candidates["candidate"] == rec["candidate"]]
    on = ("the advisor's held-out share of each task's samples (texts the search never scored; from: "
          + ", ".join(f"{n} {s['split']}" for n, s in advice.shares.items()) + ")")
    write_model_card(path, adapters, method=rec["method"], lam=1.0, params=params,
                     scores=held[["task", "metric", "score", "single", "normalized"]],
                     evaluation={"on": on, "rows": {n: len(s["heldout"]) for n, s in advice.shares.items()},
                                 "max_length": advice.settings.get("max_length"), "seed": advice.settings.get("seed")},
                     written=written)
    write_json(out / "advice.json", {**advice.to_dict(), "command": merge_command(advice, adapters)})
    write_text(out / "advice.md", advice_markdown(advice) + "\n## The same adapter from the command line\n\n"
               f"```bash\n{merge_command(advice, adapters)}\n```\n")
    return out
