"""Merging 2, 4, 6 and 8 of the eight tasks: does each arm keep its tasks as more are merged?

    OMP_NUM_THREADS=1 python reports/eight-tasks/analyze.py ../runs/eight-tasks [MORE_FOLDERS ...] \
        [--methods task_arithmetic ties regmean] [--lambdas 0.2 0.5 1.0] [--subsets sst2+sst5 ...] \
        [--out reports/eight-tasks]

Run from the repository root: the study's task specs (``../shared/data/real/<task>``) are relative
to it. Every folder is a study folder (its ``runs/*``) or one run directory; every finished run
(``manifest.json`` status ``done``) is an arm per init it trained (one for a study variant). Each
arm's fine-tuned adapters and heads are loaded from its run directory; the merged model is scored
in place by the library's :class:`osrm_core.evaluate.SweepEngine` (the engine of the sweep
stage), each task with its own head on its test split (the run's ``max_test``: 400 in the study).

For each arm, merge method (any name registered in :data:`osrm_core.merge.MERGE_METHODS`; the
method's densities from the run's merge settings where it has one) and the FIXED subsets of
:data:`SUBSETS`, every lambda of the grid (default: the run's) is scored. Written to ``--out``:

* ``tables/merges.csv``: one row per (arm, share, method, density, n_tasks, subset, lambda, task),
  with ``score`` (merged), ``single`` and ``normalized`` (= score / single); ``share`` says which
  test texts: ``report`` the first ``--max-test`` of each test split, ``select`` (``--share
  select``) the next ``--max-test`` (fewer where the split is shorter: rte has 277), on which
  the summaries choose each lambda when a subset has them;
* ``tables/single.csv``: each arm's single-task score per task (the engine's, the reference of
  the normalized scores; ``train_score``: the one fine-tuning reported, for a check);
* ``tables/best_per_subset.csv``: per (arm, method, n_tasks, subset) the best lambda (and
  density) by normalized average over the subset's tasks (on the selection share where it was
  scored, ``selected_on``), the plain merged average on the report share there, the report
  share's own best (``report_best_avg``), and ``at_edge`` when that lambda is the grid's smallest
  or largest (the curve may peak beyond it);
* ``tables/summary.csv``: per (arm, method, n_tasks) those averaged over the subsets
  (``edge_subsets``: how many subsets peaked at the grid's edge);
* ``tables/seeds.csv``: per (variant, method, n_tasks) the mean, smallest and largest of those
  over the variant's seeds (its runs ``<variant>-s<seed>``), and on which shares the lambdas were chosen;
* ``figures/scaling.html``: merged average and normalized score against the number of tasks,
  per arm, one pair of figures per method.

Resumable: rows already in ``merges.csv`` and ``single.csv`` are not scored again, and the
tables are rewritten after every (arm, subset, method), so the script can be stopped and run
again (also with more methods, lambdas or folders).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from osrm_core import viz
from osrm_core.atomic import write_text
from osrm_core.rundir import RunDir, write_csv
from osrm_core.settings import RunConfig

HERE = Path(__file__).parent
TASKS = ("sst2", "agnews", "trec", "rte", "snli", "sst5", "cr", "stsb")
#: The merged subsets, fixed so that every arm and method merges the same tasks. Pairs: two
#: tasks on the same sentences with other labels (sst2+sst5), two single-sentence topic/type tasks,
#: two sentence-pair inference tasks. Fours: the first four tasks, and the other four. Sixes: all
#: but cr and stsb, and all but sst2 and snli.
SUBSETS: dict[int, list[tuple[str, ...]]] = {
    2: [("sst2", "sst5"), ("agnews", "trec"), ("rte", "snli")],
    4: [("sst2", "agnews", "trec", "rte"), ("cr", "sst5", "snli", "stsb")],
    6: [("sst2", "agnews", "trec", "rte", "snli", "sst5"), ("agnews", "trec", "rte", "sst5", "cr", "stsb")],
    8: [TASKS],
}
DEFAULT_METHODS = ("task_arithmetic", "ties", "regmean")
#: Not a merge method: ``osrm advise`` (method, density, lambda and per-adapter weights searched on
#: the selection share, split there into its validation and held-out halves), its recommended
#: merge scored on the report share. Its defaults but a budget of 32 weight evaluations (four per
#: adapter at eight tasks; the default 8 is sized for two to four adapters).
ADVISOR = "advisor"
ADVISOR_BUDGET = 32
MERGE_KEY = ["arm", "share", "method", "density", "n_tasks", "subset", "lambda", "task"]
#: The test texts a row is scored on: ``report`` the first ``max_test`` of each task's test split,
#: ``select`` the next ``max_test`` (fewer where the split is shorter), on which the lambda is chosen.
SHARES = ("report", "select")
ARM_COLUMNS = ["arm", "init", "constraint", "rank", "lr"]


def subset_name(tasks: Sequence[str]) -> str:
    return "+".join(tasks)


@dataclass
class Arm:
    """One init's adapters in one finished run directory."""

    name: str
    run: RunDir
    config: RunConfig  # the run's config for this init (its rank, constraint, lr)
    init: str

    def tasks(self) -> set[str]:
        """The tasks this arm has a finished fine-tuned adapter of (all of a finished run's; in a
        run still training, those whose stage the manifest records as done)."""
        manifest = self.run.manifest()
        stages = manifest.get("stages", {})
        root = self.run.path / "adapters" / self.init

        def finished(task: str) -> bool:
            return manifest.get("status") == "done" or stages.get(f"adapters/{self.init}/{task}", {}).get("status") == "done"

        return {p.name for p in root.iterdir() if p.is_dir() and finished(p.name)} if root.is_dir() else set()

    def tags(self) -> dict:
        t = self.config.train
        return {"arm": self.name, "init": self.init, "constraint": t.constraint, "rank": self.config.rank, "lr": t.lr}


def finished_arms(folders: Sequence[str | Path], partial: bool = False) -> list[Arm]:
    """The arms of every finished run in ``folders`` (study folders or run directories); with
    ``partial``, also of runs still training (their finished adapters only)."""
    arms: list[Arm] = []
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise SystemExit(f"{str(folder)!r} is not a folder")
        runs = sorted(p for p in (folder / "runs").iterdir() if p.is_dir()) if (folder / "runs").is_dir() else [folder]
        for path in runs:
            run = RunDir(path)
            if not run.exists() or (run.manifest().get("status") != "done" and not partial):
                continue
            config = run.config()
            for init in config.inits:
                name = run.path.name if len(config.inits) == 1 else f"{run.path.name}/{init}"
                if name in [a.name for a in arms]:  # the same variant in another study folder
                    name = f"{folder.name}/{name}"
                arms.append(Arm(name, run, config.for_init(init), init))
    return arms


class ArmScorer:
    """Scores one arm's merges with the library: a :class:`~osrm_core.evaluate.SweepEngine` on a
    fresh copy of the base model per subset (the sweep stage's engine), each task with its head."""

    def __init__(self, arm: Arm, *, max_test: int | None = None, device: str | None = None, tasks=None,
                 share: str = "report") -> None:
        from osrm_core.pipeline import Pipeline

        update = {"max_test": max_test or arm.config.max_test, **({"device": device} if device else {})}
        self.config = arm.config.model_copy(update=update)
        self.arm, self.share = arm, share
        self.pipeline = Pipeline(self.config, arm.run.path, tasks=tasks)  # reads only
        self.adapters = arm.run.load_adapters(arm.init)
        self._stats = None

    def tasks(self, share: str | None = None) -> dict:
        """Each task with its test split cut to a share of the test texts (default: this scorer's)."""
        import dataclasses

        import numpy as np

        n = self.config.max_test
        cut = (lambda test: test.head(n)) if (share or self.share) == "report" else (
            lambda test: test.take(np.arange(n, min(2 * n, len(test)))))
        return {t.name: dataclasses.replace(t, test=cut(t.test)) for t in self.pipeline.tasks()}

    def _engine(self, names: Sequence[str]):
        from osrm_core.evaluate import SweepEngine

        model, tok = self.pipeline.base_model()
        tasks = self.tasks()
        return SweepEngine(model, tok, [tasks[n] for n in names], {n: self.adapters[n] for n in names},
                           max_length=self.config.max_length)

    def advised(self, names: Sequence[str], single: dict[str, float]) -> pd.DataFrame:
        """The advisor's recommended merge (:data:`ADVISOR`), searched on the selection share and
        scored on the report share: the rows of :meth:`merged` at lambda 1 (the weights are the
        merge's), ``advised`` naming the method, density and per-adapter weights."""
        from osrm_core.advisor import advise, weights_label
        from osrm_core.advisor.result import method_label
        from osrm_core.evaluate import score_columns

        if self.share != "report":
            raise ValueError("the advisor is scored on the report share (it searches the selection share itself)")
        model, tok = self.pipeline.base_model()
        select = self.tasks("select")
        advice = advise(model, tok, {n: self.adapters[n] for n in names}, [select[n] for n in names],
                        budget=ADVISOR_BUDGET, max_length=self.config.max_length, seed=self.config.seed)
        rec = advice.recommended
        engine = self._engine(names)
        engine.apply(advice.merged)
        scores = engine.evaluate()
        engine.restore()
        label = f"{method_label(rec['method'], rec['density'])}, weights {weights_label(rec['weights'])}"
        return pd.DataFrame([{"method": ADVISOR, "density": math.nan, "lambda": 1.0, "task": n,
                              **score_columns(engine.tasks[n].metric, scores[n], single[n]), "advised": label}
                             for n in names])

    def single(self, names: Sequence[str]) -> dict[str, float]:
        engine = self._engine(names)
        scores = engine.single_task_scores()
        engine.restore()
        return scores

    def merged(self, names: Sequence[str], method: str, lambdas: Sequence[float], densities: Sequence[float],
               single: dict[str, float]) -> pd.DataFrame:
        """Columns ``method, density, lambda, task, metric, score, single, normalized``; ``method``
        as given (``ties:core``: TIES in core space, see :func:`method_space`)."""
        from osrm_core.merge import get_merge_method

        base, space = method_space(method)
        stats = None
        if get_merge_method(base).needs_gram:
            if self._stats is None:
                self._stats = self.arm.run.load_stats()
            stats = self._stats
        engine = self._engine(names)
        df = engine.sweep([base], list(lambdas), densities=list(densities), stats=stats, single=single,
                          seed=self.config.seed, space=space)
        engine.restore()
        return df.assign(method=method)


# --------------------------------------------------------------------------- scoring (resumable)


def _read(path: Path) -> pd.DataFrame | None:
    """A table, its rows from before the shares were introduced marked ``report``."""
    if not path.is_file():
        return None
    df = pd.read_csv(path)
    return df if "share" in df else df.assign(share="report")


def method_space(method: str) -> tuple[str, str]:
    """A method of ``--methods``: a registered name merges the deltas (full space); ``<name>:core``
    merges the LoRA factors' cores (:mod:`osrm_core.merge.core`; another merge than the full
    space's for TIES and DARE, the same for the rest)."""
    base, _, space = method.partition(":")
    return base, space or "full"


def _has_density(method: str) -> bool:
    from osrm_core.merge import get_merge_method

    return "density" in [p.name for p in get_merge_method(method_space(method)[0]).param_specs()]


def score_all(arms: Sequence[Arm], out: str | Path, *, methods: Sequence[str] = DEFAULT_METHODS,
              lambdas: Sequence[float] | None = None, densities: Sequence[float] | None = None,
              subsets: dict[int, list[tuple[str, ...]]] | None = None,
              scorer: Callable[[Arm], ArmScorer] = ArmScorer, share: str = "report",
              log: Callable[[str], None] = print) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Score every arm's single tasks and merges on one share of the test texts (:data:`SHARES`;
    ``scorer`` must score that share) into ``out/tables/single.csv`` and ``merges.csv``, skipping
    rows they hold already; returns both tables.

    ``lambdas`` and ``densities`` default to each arm's run settings; ``subsets`` to
    :data:`SUBSETS` (a subset with a task an arm has no adapter for is skipped, said in ``log``).
    """
    from osrm_core.merge import MERGE_METHODS

    unknown = [m for m in methods if m != ADVISOR and (method_space(m)[0] not in MERGE_METHODS
                                                       or method_space(m)[1] not in ("full", "core"))]
    if unknown:
        raise ValueError(f"unknown merge method {unknown[0]!r}; registered: {', '.join(MERGE_METHODS)} "
                         f"(each also as <name>:core, and {ADVISOR!r})")
    subsets = subsets or SUBSETS
    tables = Path(out) / "tables"
    single_path, merges_path = tables / "single.csv", tables / "merges.csv"
    single_df = _read(single_path)
    merges = _read(merges_path)
    for arm in arms:
        engine: ArmScorer | None = None
        have = arm.tasks()
        wanted = [t for t in dict.fromkeys(t for sets in subsets.values() for s in sets for t in s) if t in have]
        single = {} if single_df is None else single_df[(single_df["arm"] == arm.name) & (single_df["share"] == share)
                                                        ].set_index("task")["single"].to_dict()
        todo = [t for t in wanted if t not in single]
        if todo:
            engine = engine or scorer(arm)
            log(f"{arm.name}: single-task scores of {', '.join(todo)}")
            scores = engine.single(todo)
            rows = [{**arm.tags(), "share": share, "task": t, "single": scores[t], "train_score": _train_score(arm, t)}
                    for t in todo]
            single_df = pd.concat([single_df, pd.DataFrame(rows)], ignore_index=True) if single_df is not None \
                else pd.DataFrame(rows)
            write_csv(single_path, single_df)
            single.update(scores)
        grid = list(lambdas or arm.config.merge.lambdas)
        for n_tasks, sets in sorted(subsets.items()):
            for names in sets:
                missing = [t for t in names if t not in have]
                if missing:
                    log(f"{arm.name}: skipping {subset_name(names)} (no adapter for {', '.join(missing)})")
                    continue
                for method in methods:
                    if method == ADVISOR and share != "report":
                        log(f"{arm.name}: the advisor is scored on the report share only (it searches the selection share)")
                        continue
                    grid_densities = list(densities or arm.config.merge.densities)
                    dens = grid_densities if method != ADVISOR and _has_density(method) else [math.nan]
                    done = set() if merges is None else set(
                        merges.loc[(merges["arm"] == arm.name) & (merges["method"] == method)
                                   & (merges["share"] == share) & (merges["subset"] == subset_name(names)),
                                   ["density", "lambda"]]
                        .itertuples(index=False, name=None))
                    done = {(_key(d), float(x)) for d, x in done}
                    if method == ADVISOR:  # one merge, its weights searched
                        todo = [] if done else [1.0]
                    else:
                        todo = [x for x in grid if any((_key(d), float(x)) not in done for d in dens)]
                    if not todo:
                        continue
                    engine = engine or scorer(arm)
                    start = time.perf_counter()
                    if method == ADVISOR:
                        df = engine.advised(names, single)
                    else:
                        df = engine.merged(names, method, todo, grid_densities, single)
                        if "density" not in df:
                            df["density"] = math.nan
                        df = df[[c for c in ("method", "density", "lambda", "task", "metric", "score", "single",
                                             "normalized") if c in df]]
                        df = df[[(_key(d), float(x)) not in done for d, x in zip(df["density"], df["lambda"])]]
                    df = df.assign(**arm.tags(), share=share, n_tasks=n_tasks, subset=subset_name(names))
                    merges = pd.concat([merges, df], ignore_index=True) if merges is not None else df
                    first = [*ARM_COLUMNS, "share", "method", "density", "n_tasks", "subset", "lambda", "task"]
                    merges = merges[[*first, *[c for c in merges if c not in first]]]
                    write_csv(merges_path, merges)
                    log(f"{arm.name}: {method} on {subset_name(names)} ({share} share), {len(todo)} lambdas "
                        f"({time.perf_counter() - start:.0f} s)")
    if merges is None:
        raise SystemExit("no finished arm with adapters for these subsets yet")
    return single_df, merges


def _key(density) -> float | None:
    return None if density is None or (isinstance(density, float) and math.isnan(density)) else float(density)


def _train_score(arm: Arm, task: str) -> float:
    try:
        return float(arm.run.train_result(arm.init, task)["test_score"])
    except (OSError, KeyError, ValueError, json.JSONDecodeError):
        return math.nan


# --------------------------------------------------------------------------- summaries


def best_per_subset(merges: pd.DataFrame) -> pd.DataFrame:
    """Per (arm, method, n_tasks, subset): the (density, lambda) of the best normalized average
    over the subset's tasks, the plain merged average and single-task average there on the
    report share, and whether that lambda is at the edge of the lambdas scored.

    Where the subset was also scored on the selection share (``share`` ``select``), the point is
    chosen there, among the points scored on both shares, and reported on the report share
    (``selected_on`` ``select``); ``report_best_avg`` is the report share's own best merged average
    (the point chosen on the texts it is reported on: the optimistic figure)."""
    if "share" not in merges:
        merges = merges.assign(share="report")
    arm_cols = [c for c in ARM_COLUMNS if c in merges]
    keys = [*arm_cols, "method", "n_tasks", "subset"]
    curve = (merges.groupby([*keys, "share", "density", "lambda"], dropna=False)
             .agg(merged_avg=("score", "mean"), normalized_avg=("normalized", "mean"),
                  single_avg=("single", "mean"), tasks=("task", "nunique"))
             .reset_index())
    select = {key: g for key, g in curve[curve["share"] == "select"].groupby(keys, dropna=False, sort=False)}
    rows = []
    for key, g in curve[curve["share"] == "report"].groupby(keys, dropna=False, sort=False):
        g = g.set_index(["density", "lambda"])
        chooser = select.get(key)
        on = "report"
        if chooser is not None:
            chooser = chooser.set_index(["density", "lambda"])
            chooser = chooser[chooser.index.isin(g.index)]
            on = "select" if len(chooser) else "report"
        chooser = chooser if on == "select" else g
        if key[keys.index("method")] == ADVISOR:
            on = "select"  # the advisor searched the selection share itself
        point = chooser["normalized_avg"].idxmax() if chooser["normalized_avg"].notna().any() else chooser.index[0]
        best = g.loc[point]
        lams = chooser.index.get_level_values("lambda")
        lo, hi = lams.min(), lams.max()
        rows.append({**dict(zip(keys, key, strict=True)), "best_lambda": float(point[1]),
                     "best_density": point[0], "merged_avg": best["merged_avg"],
                     "normalized_avg": best["normalized_avg"], "single_avg": best["single_avg"],
                     "at_edge": bool(lo < hi and point[1] in (lo, hi)), "lambdas": int(lams.nunique()),
                     "selected_on": on,
                     "report_best_avg": g.loc[g["normalized_avg"].idxmax(), "merged_avg"]
                     if g["normalized_avg"].notna().any() else best["merged_avg"]})
    columns = [*keys, "best_lambda", "best_density", "merged_avg", "normalized_avg", "single_avg", "at_edge",
               "lambdas", "selected_on", "report_best_avg"]
    return pd.DataFrame(rows, columns=columns)  # empty where only the selection share was scored


def summarize(best: pd.DataFrame) -> pd.DataFrame:
    """Per (arm, method, n_tasks): the best-per-subset values averaged over the subsets."""
    arm_cols = [c for c in ARM_COLUMNS if c in best]
    return (best.groupby([*arm_cols, "method", "n_tasks"], dropna=False, sort=False)
            .agg(merged_avg=("merged_avg", "mean"), normalized_avg=("normalized_avg", "mean"),
                 single_avg=("single_avg", "mean"), report_best_avg=("report_best_avg", "mean"),
                 selected_on=("selected_on", lambda s: "+".join(sorted(set(s)))), subsets=("subset", "nunique"),
                 edge_subsets=("at_edge", "sum"),
                 best_lambdas=("best_lambda", lambda s: ";".join(f"{x:g}" for x in s)))
            .reset_index()
            .sort_values(["method", *arm_cols, "n_tasks"], kind="stable")
            .reset_index(drop=True))


def variant_of(arms: pd.Series) -> pd.Series:
    """Each run's variant: its name without the seed (``<variant>-s<seed>``)."""
    return arms.str.replace(r"-s\d+$", "", regex=True)


def seed_of(arms: pd.Series) -> pd.Series:
    """Each run's seed (``<variant>-s<seed>``; NaN for a name without one)."""
    return arms.str.extract(r"-s(\d+)$", expand=False).astype(float)


def over_seeds(summary: pd.DataFrame) -> pd.DataFrame:
    """Per (arm without its seed, method, n_tasks): how many seeds, and the mean, smallest and
    largest plain merged average, normalized score and single-task score over them. A run named
    ``<variant>-s<seed>`` is seed ``<seed>`` of ``<variant>``."""
    frame = summary.assign(variant=variant_of(summary["arm"]),
                           seed=seed_of(summary["arm"]))
    keys = ["variant", "method", "n_tasks"]
    stats = {f"{col}_{how}": (col, how) for col in ("merged_avg", "normalized_avg", "single_avg")
             for how in ("mean", "min", "max")}
    return (frame.groupby(keys, sort=False)
            .agg(seeds=("seed", "nunique"), seed_list=("seed", lambda s: ";".join(f"{x:g}" for x in sorted(s))),
                 selected_on=("selected_on", lambda s: "+".join(sorted(set("+".join(s).split("+"))))), **stats)
            .reset_index())


#: How the report names each variant (a run directory's name without its seed).
LABELS = {
    "standard-none-n100-r8-a1": "standard r8",
    "standard-none-n100-r32-a1": "standard r32 (rank control)",
    "standard-freeze_A-n100-r32-a1": "frozen random A r32",
    "standard-sparse_B-n100-r32-a1": "LoRI-style: frozen random A, sparse B, r32",
    "osrm_gen-freeze_A-n100-r32-a1": "**recipe**: osrm_gen A frozen, r32",
    "osrm_gen-sparse_B-n100-r32-a1": "recipe's A with a sparse B, r32",
}
METHOD_LABELS = {"task_arithmetic": "task arithmetic", "ties": "TIES", "regmean": "RegMean", "tsv_m": "TSV-M",
                 "iso_c": "Iso-C", "iso_cts": "Iso-CTS", "cart": "CART", "ties:core": "TIES (core space)",
                 ADVISOR: "advisor"}


def _cell(row, value: str = "merged_avg", of: int = 1) -> str:
    """``mean [min-max over n seeds]`` of ``value`` (one seed: the value); ``*`` where a lambda
    was chosen on the selection share; which seeds, where fewer than the variant's ``of``."""
    text = f"{row[f'{value}_mean']:.3f}" + ("*" if "select" in row["selected_on"] else "")
    if row["seeds"] > 1:
        text += f" [{row[f'{value}_min']:.3f}-{row[f'{value}_max']:.3f}, {row['seeds']} seeds]"
    if row["seeds"] < of:
        text += f" (seed {row['seed_list'].replace(';', ', ')} only)"
    return text


def report_tables(merges: pd.DataFrame, n_tasks: int = 8) -> str:
    """The report's tables, in markdown, from the merge rows: (1) per variant and merger the plain
    merged average of ``n_tasks`` tasks at the best lambda (mean and range over seeds), the
    single-task mean (and range) and the best merger (among those run on all the variant's
    seeds); (2) the normalized score there (merged / single-task, averaged over the tasks);
    (3) per variant, its best merger's score per task; (4) per seed of the variants with several,
    each merger's score and lambda."""
    best = best_per_subset(merges)
    summary = summarize(best)
    seeds = over_seeds(summary)
    at_n = seeds[seeds["n_tasks"] == n_tasks]
    runs = summary[summary["n_tasks"] == n_tasks]
    runs = runs.assign(variant=variant_of(runs["arm"]), seed=seed_of(runs["arm"]))
    singles = runs.drop_duplicates("arm").groupby("variant")["single_avg"].agg(["mean", "min", "max", "count"])
    variants = [v for v in LABELS if v in set(at_n["variant"])] + sorted(set(at_n["variant"]) - set(LABELS))
    methods = [m for m in METHOD_LABELS if m in set(at_n["method"])]
    lines = [f"| arm | single-task | {' | '.join(METHOD_LABELS[m] for m in methods)} | best merger |",
             "|---|---|" + "---|" * len(methods) + "---|"]
    normalized = ["", f"| arm: normalized score | {' | '.join(METHOD_LABELS[m] for m in methods)} |",
                  "|---|" + "---|" * len(methods)]
    best_method = {}
    for v in variants:
        rows = at_n[at_n["variant"] == v].set_index("method")
        n_seeds = rows["seeds"].max()
        single = singles.loc[v]  # over the variant's seeds
        single_cell = f"{single['mean']:.3f}" + (
            f" [{single['min']:.3f}-{single['max']:.3f}]" if single["count"] > 1 else "")
        best_method[v] = rows.loc[rows["seeds"] == n_seeds, "merged_avg_mean"].idxmax()  # means over the same seeds
        cells = [_cell(rows.loc[m], of=n_seeds) if m in rows.index else "" for m in methods]
        lines.append(f"| {LABELS.get(v, v)} | {single_cell} | {' | '.join(cells)} | {METHOD_LABELS[best_method[v]]} |")
        cells = [_cell(rows.loc[m], "normalized_avg", n_seeds) if m in rows.index else "" for m in methods]
        normalized.append(f"| {LABELS.get(v, v)} | {' | '.join(cells)} |")
    lines += normalized
    # (3) per task, each variant's best merger at its best lambda per seed, mean over seeds
    chosen = best[best["n_tasks"] == n_tasks].assign(variant=lambda f: variant_of(f["arm"]))
    report = merges[(merges.get("share", "report") == "report") & (merges["n_tasks"] == n_tasks)]
    tasks = [t for t in TASKS if t in set(report["task"])]
    lines += ["", f"| arm (best merger) | {' | '.join(tasks)} |", "|---|" + "---|" * len(tasks)]
    for v in variants:
        picks = chosen[(chosen["variant"] == v) & (chosen["method"] == best_method[v])]
        per_task = []
        for _, b in picks.iterrows():
            rows = report[(report["arm"] == b["arm"]) & (report["method"] == b["method"])
                          & (report["lambda"] == b["best_lambda"]) & (report["subset"] == b["subset"])]
            if pd.notna(b["best_density"]):
                rows = rows[rows["density"] == b["best_density"]]
            per_task.append(rows.set_index("task")["score"])
        mean = pd.concat(per_task, axis=1).mean(axis=1)
        lines.append(f"| {LABELS.get(v, v)} ({METHOD_LABELS[best_method[v]]}) | "
                     + " | ".join(f"{mean.get(t, float('nan')):.3f}" for t in tasks) + " |")
    # (4) per seed of the variants with more than one: each merger's score at its best lambda
    several = [v for v in variants if singles.loc[v, "count"] > 1]
    if several:
        lines += ["", f"| arm | seed | single-task | {' | '.join(METHOD_LABELS[m] for m in methods)} |",
                  "|---|---|---|" + "---|" * len(methods)]
        for v in several:
            for seed, g in runs[runs["variant"] == v].groupby("seed"):
                seed = int(seed)
                g = g.set_index("method")
                cells = [("" if m not in g.index else f"{g.loc[m, 'merged_avg']:.3f}"
                          + ("" if m == ADVISOR else f" (λ {g.loc[m, 'best_lambdas']})")) for m in methods]
                lines.append(f"| {LABELS.get(v, v)} | {seed} | {g['single_avg'].iloc[0]:.3f} | {' | '.join(cells)} |")
    return "\n".join(lines)


def scaling_page(summary: pd.DataFrame, title: str = "Eight tasks: merging more tasks") -> str:
    """Merged average and normalized score against the number of tasks, per arm, per method."""
    import plotly.graph_objects as go

    figs = {}
    arms = summary.drop_duplicates("arm")
    for method, by_method in summary.groupby("method", sort=False):
        for y, label in (("merged_avg", "plain merged average (task metric)"),
                         ("normalized_avg", "normalized score (merged / single-task)")):
            fig = go.Figure()
            for k, (arm, g) in enumerate(by_method.groupby("arm", sort=False)):
                g = g.sort_values("n_tasks")
                row = g.iloc[0]
                name = viz.arm_label(row, arms) if "init" in g else arm
                edge = g["edge_subsets"] > 0
                fig.add_trace(go.Scatter(
                    x=g["n_tasks"], y=g[y], mode="lines+markers", name=name, legendgroup=name,
                    line={"color": viz.color_of(row.get("init", arm), k),
                          "dash": "dash" if row.get("constraint", "none") != "none" else "solid"},
                    marker={"symbol": ["circle-open" if e else "circle" for e in edge], "size": 9},
                    customdata=g[["best_lambdas", "subsets", "edge_subsets"]].to_numpy(),
                    hovertemplate=(f"{name}<br>%{{x}} tasks: %{{y:.3f}}<br>best λ per subset %{{customdata[0]}}"
                                   "<br>subsets %{customdata[1]}, at the grid's edge %{customdata[2]}<extra></extra>"),
                ))
            if y == "normalized_avg":
                fig.add_hline(y=1.0, line_dash="dot", line_color="grey", annotation_text="single-task")
            fig.update_xaxes(title="tasks merged", tickvals=sorted(summary["n_tasks"].unique()))
            fig.update_yaxes(title=label)
            figs[f"{method}: {label}"] = fig.update_layout(
                title=f"{method}: {label} at the best lambda per subset, mean over subsets "
                      "(open marker: a subset's best lambda at the grid's edge)",
                margin=dict(l=60, r=20, t=60, b=50), hovermode="closest")
    return viz.figures_page(figs, title=title)


def write_outputs(out: str | Path, merges: pd.DataFrame) -> dict[str, pd.DataFrame]:
    out = Path(out)
    best = best_per_subset(merges)
    summary = summarize(best)
    write_csv(out / "tables" / "best_per_subset.csv", best)
    write_csv(out / "tables" / "summary.csv", summary)
    write_csv(out / "tables" / "seeds.csv", over_seeds(summary))
    write_text(out / "figures" / "scaling.html", scaling_page(summary))
    return {"best_per_subset": best, "summary": summary}


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="+", help="the study folder, and any more study folders or run directories")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS),
                   help="registered merge methods (osrm_core.merge.MERGE_METHODS), <name>:core to merge in core "
                        f"space, or {ADVISOR!r} (osrm advise's recommended merge, searched on the selection share)")
    p.add_argument("--lambdas", nargs="+", type=float, help="lambda grid (default: each run's)")
    p.add_argument("--densities", nargs="+", type=float, help="densities of the methods with one (default: each run's)")
    p.add_argument("--max-test", type=int, help="test examples per task (default: each run's max_test)")
    p.add_argument("--device", help="device of the scoring model (default: each run's)")
    p.add_argument("--subsets", nargs="+", metavar="TASK+TASK",
                   help="other subsets to merge than the fixed ones (SUBSETS), e.g. sst2+sst5 sst2+sst5+cr")
    p.add_argument("--partial", action="store_true",
                   help="also score runs still training, on the adapters they have finished (subsets they lack are skipped)")
    p.add_argument("--share", choices=SHARES, default="report",
                   help="score the report share of each task's test texts (the first --max-test) or the selection "
                        "share (the next --max-test), on which the summaries then choose each lambda")
    p.add_argument("--out", default=str(HERE), help="where tables/ and figures/ go (default: this folder)")
    args = p.parse_args(argv)
    arms = finished_arms(args.folders, partial=args.partial)
    if not arms:
        raise SystemExit("no finished run (manifest status done) in " + ", ".join(args.folders))
    print(f"{len(arms)} finished arm(s): {', '.join(a.name for a in arms)}", flush=True)

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    subsets = None
    if args.subsets:
        subsets = {}
        for text in args.subsets:
            names = tuple(t for t in text.split("+") if t)
            subsets.setdefault(len(names), []).append(names)
    _, merges = score_all(arms, args.out, methods=args.methods, lambdas=args.lambdas, densities=args.densities,
                          subsets=subsets, share=args.share, log=log,
                          scorer=lambda arm: ArmScorer(arm, max_test=args.max_test, device=args.device,
                                                       share=args.share))
    tables = write_outputs(args.out, merges)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(tables["summary"].drop(columns=["lr"], errors="ignore").to_string(index=False))


if __name__ == "__main__":
    main(sys.argv[1:])
