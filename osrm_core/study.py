"""The evidence study: does OSRM make merged adapters keep their tasks, and when?

A study runs many small experiments (one run directory per variant: init, training
constraint, samples for the statistics, rank, learning-rate scale of A, seed), all resumable,
then answers the paper's questions in ``report.md`` with tables, figures and CSVs:

1. multi-task normalized score after merging, per init and method (mean and spread over seeds);
2. single-task scores: does the init cost accuracy before merging?
3. robustness to lambda: area under the normalized-score curve, width of the lambda range
   within 2 points of the best;
4. samples per other task the statistics need; 5. rank;
6. does the exact interference from statistics predict the measured loss from merging
   (Spearman correlation over task pairs, and per layer)?
7. the own-task energy trade-off, and the learning-rate scale of A that makes up for it.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from osrm_core import viz
from osrm_core.atomic import write_json, write_text
from osrm_core.constraints import check_constraint, get_constraint
from osrm_core.errors import OsrmInputError
from osrm_core.growth import check_growth, prepare_run
from osrm_core.inits import OSRM_METHODS
from osrm_core.lock import DirLock
from osrm_core.pipeline import Pipeline
from osrm_core.runcheck import read_csv_checked
from osrm_core.rundir import RunDir, write_csv
from osrm_core.settings import (
    ConstraintName,
    InitName,
    MergeSettings,
    RunConfig,
    check_sparse_b_share,
    read_yaml,
    validate_settings,
)

Progress = Callable[[int, int, str], None]
COMPARED_GROUPS = ("main", "constraint")
#: Pair signals set against the measured merge loss in question 6: data-aware (statistics) first.
PAIR_SIGNALS = ("relative_shift", "sv_overlap", "spectral_loss")  # the variants of table 1 and the curves
UNLEARNED = 0.1  # a single-task score below this (MCC or F1 near 0) makes normalized scores explode


class VariantSpec(BaseModel):
    """An extra variant of the main comparison (run with every seed): an init with its own
    constraint, rank, learning rate or learning-rate scale of A; unset fields take the base's.

    With ``constraint: sparse_B`` (LoRI) the base's ``train.b_density`` and ``train.calibration``
    apply unless the variant sets its own (its name then ends in ``-dDENSITY`` / ``-cSHARE``)."""

    model_config = ConfigDict(extra="forbid")
    init: InitName
    constraint: ConstraintName = "none"
    rank: int | None = Field(None, ge=1)
    lr: float | None = Field(None, gt=0)
    a_lr_scale: float | None = Field(None, ge=0)
    b_density: float | None = Field(None, description="sparse_B: share of B's entries kept, in (0, 1]")
    calibration: float | None = Field(None, description="sparse_B: share of the steps before B's mask is fixed")

    @field_validator("b_density", "calibration")
    @classmethod
    def _share(cls, v: float | None, info) -> float | None:
        return None if v is None else check_sparse_b_share(info.field_name, v)

    @model_validator(mode="after")
    def _constraint_fits_init(self) -> VariantSpec:
        check_constraint(self.constraint, [self.init], field="constraint")
        for name in SPARSE_B_SETTINGS:
            if getattr(self, name) is not None and not get_constraint(self.constraint).sparse_b:
                raise OsrmInputError(f"{name} applies to constraint sparse_B only, not {self.constraint!r}")
        return self


#: A variant's own settings of the sparse_B constraint (``train.<name>`` of its run), with the
#: letter that marks them in its name.
SPARSE_B_SETTINGS = {"b_density": "d", "calibration": "c"}


class StudyConfig(BaseModel):
    """What to compare. ``base`` holds the tasks, model and the main settings."""

    model_config = ConfigDict(extra="forbid")
    name: str = "study"
    base: RunConfig
    inits: list[InitName] = Field(default_factory=lambda: ["standard", "osrm", "osrm_mean", "osrm_gen", "eva"])
    constraints: list[ConstraintName] = Field(default_factory=lambda: ["none", "freeze_A"])
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    sample_sizes: list[int] = Field(default_factory=lambda: [10, 50, 100, 500])
    ranks: list[int] = Field(default_factory=lambda: [4, 8, 16])
    a_lr_scales: list[float] = Field(default_factory=lambda: [1.0, 3.0, 10.0])
    ablation_inits: list[str] | None = Field(
        None, description="OSRM-family inits the one-seed ablations run for (default: all of them in inits)")
    ablation_methods: list[str] | None = Field(
        None, description="merge methods of the one-seed ablation runs (default: the base's)")
    pair_lambda: float = Field(1.0, gt=0, description="lambda of the pairwise merges for question 6")
    variants: list[VariantSpec] = Field(
        default_factory=list, description="extra variants of the main comparison, each run with every seed")

    @field_validator("constraints")
    @classmethod
    def _constraints(cls, v: list[str]) -> list[str]:
        return v or ["none"]

    @field_validator("ablation_methods")
    @classmethod
    def _ablation_methods(cls, v: list[str] | None) -> list[str] | None:
        return None if v is None else MergeSettings(methods=v).methods

    @model_validator(mode="after")
    def _ablation_inits_in_inits(self) -> StudyConfig:
        if not self.inits and not self.variants:
            raise OsrmInputError("a study needs at least one init in inits or one entry in variants")
        if self.base.per_init:
            raise OsrmInputError("base.per_init: a study gives an init its own settings as an entry of variants "
                             "(init, constraint, rank, lr, a_lr_scale)")
        allowed = [i for i in self.inits if i in OSRM_METHODS]
        for init in self.ablation_inits or []:
            if init not in allowed:
                raise OsrmInputError(f"ablation init {init!r} is not an OSRM-family init of this study; "
                                 f"allowed: {', '.join(allowed) or 'none (add osrm, osrm_mean or osrm_gen to inits)'}")
        return self

    @classmethod
    def from_yaml(cls, path: str | Path) -> StudyConfig:
        return validate_settings(cls, *read_yaml(path, "study file"))


def quick_study_config(base: RunConfig | None = None) -> StudyConfig:
    """A small study (a few minutes on a CPU): short training, one seed, a coarse lambda grid.

    A hint, not evidence: the full study varies seeds, ranks and the learning rate of A. The
    run's per-init settings become ``variants`` (with the base's alpha: a variant has none of its own).
    """
    from osrm_core.settings import demo_config

    steps = 40
    if base is None:
        base = demo_config(quick=True)
        steps = 60  # the demo's other tasks train longer
    # The demo's sentence-pair task needs about 80 steps to learn at all (MCC ~0 at 40), and a
    # task that learned nothing makes normalized scores explode: left out (a run's too, when two
    # tasks or more remain).
    kept = [t for t in base.tasks if t.spec != "demo:paraphrase"]
    if len(kept) >= 2 and len(kept) < len(base.tasks):
        base = base.model_copy(update={"tasks": kept})
    train = base.train.model_copy(update={"steps": min(base.train.steps, steps)})
    merge = base.merge.model_copy(update={"methods": ["task_arithmetic", "ties"], "lambdas": [0.3, 0.6, 1.0]})
    # The run's per-init recipes (the demo's osrm_gen with A frozen at rank 32) become variants.
    recipes = [VariantSpec(init=init, constraint=own.constraint or base.train.constraint, rank=own.rank, lr=own.lr,
                           a_lr_scale=own.a_lr_scale) for init, own in base.per_init.items()]
    base = base.model_copy(update={"train": train, "merge": merge, "max_test": min(base.max_test or 100, 100),
                                   "per_init": {}})
    return StudyConfig(
        name="study-quick",
        base=base,
        variants=recipes,
        inits=["standard", "osrm", "osrm_gen"],
        constraints=["none"],
        seeds=[base.seed],
        sample_sizes=[16, base.samples],
        ranks=[base.rank],
        a_lr_scales=[1.0],
    )


def variants(study: StudyConfig) -> list[dict]:
    """The experiments of a study, each a dict of the settings it changes (deduplicated).

    ``main``: every init with every seed, trained without a constraint (the paper's method).
    The ablations run with the first seed only, for ``ablation_inits``: ``constraint`` (each
    constraint other than none), ``samples``, ``a_lr_scale`` and ``rank`` (rank also for standard).
    """
    base = study.base
    main = dict(samples=base.samples, rank=base.rank, a_lr_scale=base.train.a_lr_scale, constraint="none",
                lr=base.train.lr)
    out = [dict(main, init=init, seed=seed, group="main") for init, seed in itertools.product(study.inits, study.seeds)]
    for spec, seed in itertools.product(study.variants, study.seeds):
        change = {k: x for k, x in spec.model_dump().items() if x is not None}
        out.append(dict(main, **change, seed=seed, group="main"))
    ablation_inits = study.ablation_inits or [i for i in study.inits if i in OSRM_METHODS]

    def ablation(init: str, group: str, **change) -> dict:
        return dict(main, init=init, seed=study.seeds[0], group=group, **change)

    for init in ablation_inits:
        out += [ablation(init, "constraint", constraint=c) for c in study.constraints if c != "none"]
        out += [ablation(init, "samples", samples=n) for n in study.sample_sizes]
        out += [ablation(init, "a_lr_scale", a_lr_scale=x) for x in study.a_lr_scales]
    rank_inits = (["standard"] if "standard" in study.inits else []) + ablation_inits
    out += [ablation(init, "rank", rank=r) for r in study.ranks for init in rank_inits]
    seen, unique = set(), []
    for v in out:
        key = variant_name(v, study.base.train.lr)
        if key not in seen:
            seen.add(key)
            unique.append(v)
    return unique


def variant_name(v: dict, base_lr: float | None = None) -> str:
    """``init-constraint-nSAMPLES-rRANK-aSCALE[-lrLR][-dDENSITY][-cSHARE]-sSEED``; the learning rate
    appears when it differs from the base's (``base_lr``), sparse_B's settings when the variant
    sets its own."""
    lr = f"-lr{v['lr']:g}" if base_lr is not None and v.get("lr", base_lr) != base_lr else ""
    sparse = "".join(f"-{mark}{v[n]:g}" for n, mark in SPARSE_B_SETTINGS.items() if v.get(n) is not None)
    return f"{v['init']}-{v['constraint']}-n{v['samples']}-r{v['rank']}-a{v['a_lr_scale']:g}{lr}{sparse}-s{v['seed']}"


def variant_label(v: dict, base: RunConfig | None = None) -> str:
    """A variant in words, for people: ``osrm_gen, freeze_A, rank 32, 16 samples, seed 0``; the
    settings equal to ``base``'s (samples, learning rate, scale of A's learning rate) are left out."""
    parts = [str(v["init"])]
    if v.get("constraint", "none") != "none":
        parts.append(str(v["constraint"]))
    parts.append(f"rank {v['rank']}")
    if base is None or v["samples"] != base.samples:
        parts.append(f"{v['samples']} samples for the statistics")
    if v.get("a_lr_scale", 1.0) != (1.0 if base is None else base.train.a_lr_scale):
        parts.append(f"A's learning rate x{v['a_lr_scale']:g}")
    if base is not None and v.get("lr", base.train.lr) != base.train.lr:
        parts.append(f"learning rate {v['lr']:g}")
    parts.append(f"seed {v['seed']}")
    return ", ".join(parts)


def variant_config(study: StudyConfig, v: dict) -> RunConfig:
    base = study.base
    own = {n: v[n] for n in SPARSE_B_SETTINGS if v.get(n) is not None}
    train = base.train.model_copy(update={"constraint": v["constraint"], "a_lr_scale": v["a_lr_scale"], "lr": v["lr"],
                                          **own})
    merge = base.merge
    if v["group"] != "main" and study.ablation_methods:
        merge = merge.model_copy(update={"methods": study.ablation_methods})
    return base.model_copy(
        update={
            "name": variant_name(v, study.base.train.lr),
            "inits": [v["init"]],
            "seed": v["seed"],
            "samples": v["samples"],
            "rank": v["rank"],
            "train": train,
            "merge": merge,
        }
    )


# --------------------------------------------------------------------------- running


def run_study(study: StudyConfig, out: str | Path, *, jobs: int = 1, progress: Progress | None = None,
              on_stage: Callable[[str], None] | None = None, tasks=None) -> Path:
    """Run (or resume, or grow) every variant of ``study`` under ``out/runs/`` and write the report.

    A study directory grows: a config that adds seeds, inits, ablations, merge methods or
    lambdas reuses the finished variants whose settings match and
    computes only what is new (sweeps alone where only the merge settings changed); a config
    that changes a finished variant's settings is refused, naming the variant, before anything
    is written. Variants whose statistics settings match share one collection, made here
    first; the rest of each variant (fine-tuning, sweeps, diagnostics) runs in ``jobs``
    processes (see :mod:`osrm_core.parallel`). ``tasks`` (optional) are used by every variant
    instead of loading the base's task entries. The study directory is locked meanwhile
    (:class:`osrm_core.lock.DirLock`; a second writer gets :class:`osrm_core.lock.LockedError`),
    and each variant's run directory too.
    """
    from osrm_core.parallel import threads_per_job

    threads_per_job(jobs)  # a bad --jobs fails before any work
    with DirLock(out):
        return _run_study(study, Path(out), jobs, progress, on_stage, tasks)


def _run_study(study: StudyConfig, out: Path, jobs: int, progress: Progress | None,
               on_stage: Callable[[str], None] | None, tasks) -> Path:
    from osrm_core.parallel import run_parallel

    todo = variants(study)
    check_growth(out, [(variant_name(v, study.base.train.lr), variant_config(study, v)) for v in todo])
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "study.yaml", yaml.safe_dump(study.model_dump(mode="json"), sort_keys=False))
    stage = on_stage or (lambda s: None)
    timing = out / "timing.json"  # wall time of the variants, summed over resumed invocations
    spent = study_seconds(out)
    start = time.perf_counter()
    tasks_by_seed: dict[int, list] = {}  # a run loads (or generates, or splits) its tasks with its seed
    stats_runs: dict[str, RunDir] = {}  # variants that collect equal statistics share them
    for k, v in enumerate(todo):
        name = variant_name(v, study.base.train.lr)
        stage(f"statistics {k + 1}/{len(todo)}: {name}")
        pipeline = Pipeline(variant_config(study, v), out / "runs" / name, progress=progress,
                            tasks=tasks or tasks_by_seed.get(v["seed"]))
        prepare_run(pipeline)
        key = pipeline.config.stats_key()
        if key in stats_runs:
            pipeline.reuse_stats(stats_runs[key])
        else:
            pipeline.stage_stats()
            stats_runs[key] = pipeline.run
        tasks_by_seed.setdefault(v["seed"], pipeline.tasks())
    left = [v for v in todo if not _variant_done(study, out, v)]
    items = [(study, out, v, tasks or tasks_by_seed[v["seed"]], progress if jobs == 1 else None) for v in left]

    def done(k: int, name: str) -> None:
        write_json(timing, {"seconds": round(spent + time.perf_counter() - start, 1)})
        stage(f"variant {k + 1}/{len(left)} done: {name}")

    run_parallel(_run_variant, items, jobs, on_done=done)
    write_json(timing, {"seconds": round(spent + time.perf_counter() - start, 1)})
    stage("report")
    write_report(study, out)
    return out / "report.md"


def _variant_done(study: StudyConfig, out: Path, v: dict) -> bool:
    run = RunDir(out / "runs" / variant_name(v, study.base.train.lr))
    pairwise = run.read_csv("pairwise.csv")
    pairs_ok = v["group"] != "main" or (
        pairwise is not None and "lambda" in pairwise and (pairwise["lambda"] == study.pair_lambda).all())
    return run.manifest().get("status") == "done" and pairs_ok


def _run_variant(item: tuple) -> str:
    """Fine-tune, sweep and diagnose one variant whose statistics are in place (a worker's unit)."""
    study, out, v, tasks, progress = item
    name = variant_name(v, study.base.train.lr)
    pipeline = Pipeline(variant_config(study, v), out / "runs" / name, progress=progress, tasks=tasks)
    pipeline.run_all()
    if v["group"] == "main":
        pairwise_loss(pipeline, study.pair_lambda)
    return name


def study_seconds(out: str | Path) -> float:
    """Wall time of a study's runs so far (``timing.json``, summed over resumed invocations)."""
    timing = Path(out) / "timing.json"
    return json.loads(timing.read_text(encoding="utf-8"))["seconds"] if timing.is_file() else 0.0


def find_studies(run_path: str | Path) -> list[Path]:
    """Study folders (with a report) in a run's ``studies/`` or the folder itself, newest first."""
    root = Path(run_path)
    found = [p for p in [root, *sorted((root / "studies").glob("*"))] if (p / "report.md").is_file()]
    return sorted(found, key=lambda p: (p / "report.md").stat().st_mtime, reverse=True)


def load_study_tables(path: str | Path) -> dict[str, pd.DataFrame]:
    """The CSV tables a study's report was built from, by name (RunFileError names a damaged one)."""
    return {p.stem: read_csv_checked(p, f"{Path(path).name}/tables/{p.name}")
            for p in sorted((Path(path) / "tables").glob("*.csv"))}


def pairwise_loss(pipeline: Pipeline, lam: float) -> pd.DataFrame:
    """Measured loss of task i when merged with task j alone (task arithmetic at ``lam``)."""
    from osrm_core.merge import merge_deltas

    run = pipeline.run
    path = run.result_path("pairwise.csv")
    if path.is_file():
        done = pd.read_csv(path)
        if "lambda" in done and (done["lambda"] == lam).all():
            return done
    engine = pipeline.sweep_engine(pipeline.config.inits[0])
    adapters = engine.adapters
    single = engine.single_task_scores()
    rows = []
    names = list(adapters)
    for i, j in itertools.permutations(names, 2):
        engine.apply(merge_deltas([adapters[i].deltas(), adapters[j].deltas()], "task_arithmetic"), lam)
        merged = engine.evaluate([i])[i]
        rows.append({"data": i, "adapter": j, "lambda": lam, "single": single[i], "merged": merged, "loss": single[i] - merged})
    engine.restore()
    df = pd.DataFrame(rows)
    write_csv(path, df)
    return df


# --------------------------------------------------------------------------- report


def _collect(study: StudyConfig, out: Path) -> dict[str, pd.DataFrame]:
    from osrm_core.diagnostics import pair_signals

    sweeps, singles, inter, own, pairs, signals = [], [], [], [], [], []
    for v in variants(study):
        run = RunDir(out / "runs" / variant_name(v, study.base.train.lr))
        tags = {k: v[k] for k in ("init", "constraint", "seed", "samples", "rank", "a_lr_scale", "lr", "group")}
        tags["variant"] = variant_name(v, study.base.train.lr)
        # A variant's own sparse_B settings tell its arm apart in the tables (not averaged as seeds).
        tags["constraint"] += "".join(f" {mark}{v[n]:g}" for n, mark in SPARSE_B_SETTINGS.items() if v.get(n) is not None)
        sweep = run.read_csv(f"sweep_{v['init']}.csv")
        if sweep is None:
            continue
        sweeps.append(sweep.drop(columns="init").assign(**tags))
        for task_dir in (run.path / "adapters" / v["init"]).iterdir():
            result = json.loads((task_dir / "train.json").read_text())
            singles.append({**tags, "task": task_dir.name, "score": result["test_score"]})
        for name, bucket in (("interference.csv", inter), ("own_energy.csv", own), ("pairwise.csv", pairs)):
            df = run.read_csv(name)
            if df is not None:
                bucket.append(df.drop(columns=["init"], errors="ignore").assign(**tags))
        if run.result_path("pairwise.csv").is_file():  # the data-free signals, from the adapters' weights
            signals.append(pair_signals(run.load_adapters(v["init"])).assign(**tags))
    if not sweeps:
        raise OsrmInputError(f"study {str(out)!r} has no finished variant yet")
    frames = {"sweep": sweeps, "single": singles, "interference": inter, "own_energy": own, "pairwise": pairs,
              "signals": signals}
    return {k: pd.concat(v, ignore_index=True) if v and isinstance(v[0], pd.DataFrame) else pd.DataFrame(v)
            for k, v in frames.items()}


def curve_metrics(curve: pd.DataFrame) -> dict:
    """From a normalized-average-vs-lambda curve: best, its lambda, AUC, width within 2 points."""
    curve = curve.sort_values("lambda")
    lam, y = curve["lambda"].to_numpy(), curve["normalized_avg"].to_numpy()
    best = int(np.argmax(y))
    span = lam[-1] - lam[0]
    auc = float(np.trapezoid(y, lam) / span) if span > 0 else float(y[0])
    near = lam[y >= y[best] - 0.02]
    out = {"best": float(y[best]), "best_lambda": float(lam[best]), "auc": auc,
           "width_2pt": float(near.max() - near.min())}
    if "merged_avg" in curve:
        out["merged_at_best"] = float(curve["merged_avg"].to_numpy()[best])
    return out


def analyse(frames: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """The tables of the report, from the collected frames."""
    sweep, single = frames["sweep"], frames["single"]
    keys = ["variant", "group", "init", "constraint", "seed", "samples", "rank", "a_lr_scale", "lr", "method",
            "density"]
    curves = (sweep.groupby([*keys, "lambda"], dropna=False)
              .agg(normalized_avg=("normalized", "mean"), merged_avg=("score", "mean")).reset_index())
    per_run = pd.DataFrame([
        {**dict(zip(keys, k, strict=True)), **curve_metrics(g)}
        for k, g in curves.groupby(keys, dropna=False)
    ])
    # Best density per (variant, method) for TIES/DARE.
    per_run = per_run.sort_values("best").groupby(keys[:-1], dropna=False).tail(1)
    main = per_run[per_run["group"].isin(COMPARED_GROUPS)]
    q1 = (main.groupby(["init", "constraint", "rank", "lr", "method"])
          .agg(normalized_best_mean=("best", "mean"), normalized_best_std=("best", "std"),
               merged_avg_mean=("merged_at_best", "mean"), merged_avg_std=("merged_at_best", "std"),
               best_lambda=("best_lambda", "median"),
               auc_mean=("auc", "mean"), width_2pt=("width_2pt", "mean"), seeds=("seed", "nunique"))
          .reset_index())
    main_single = single[single["group"].isin(COMPARED_GROUPS)]
    q2 = (main_single.groupby(["init", "constraint", "rank", "lr", "task"])["score"].agg(["mean", "std"]).reset_index())
    def ablation(group: str, col: str) -> pd.DataFrame:
        """Best normalized average of the first seed against ``col``, for the methods the group ran."""
        ran = per_run[per_run["group"] == group]
        rows = per_run[per_run["group"].isin([group, "main"]) & (per_run["seed"] == per_run["seed"].min())
                       & per_run["method"].isin(ran["method"]) & per_run["init"].isin(ran["init"])]
        return rows.groupby(["init", col, "method"])["best"].mean().unstack(col).reset_index()

    tables = {"q1_merged": q1, "q2_single": q2,
              "q4_samples": ablation("samples", "samples"), "q5_rank": ablation("rank", "rank"),
              "q7_a_lr_scale": ablation("a_lr_scale", "a_lr_scale"), "curves": curves, "per_run": per_run}
    inter, pairs = frames["interference"], frames["pairwise"]
    if not inter.empty and not pairs.empty:
        from scipy.stats import spearmanr

        other = inter[~inter["own"]]
        by_pair = other.groupby(["variant", "adapter", "data"])["relative_shift"].sum().reset_index()
        merged = by_pair.merge(pairs[["variant", "adapter", "data", "loss"]], on=["variant", "adapter", "data"])
        if not frames["signals"].empty:
            merged = merged.merge(frames["signals"][["variant", "adapter", "data", "sv_overlap", "spectral_loss"]],
                                  on=["variant", "adapter", "data"], how="left")
        arms = per_run[["variant", "init", "constraint", "rank", "lr"]].drop_duplicates("variant")
        arms = arms.assign(arm=[viz.arm_label(r, arms) for _, r in arms.iterrows()])
        merged = merged.merge(arms[["variant", "arm"]], on="variant")
        rows = []
        for signal in [c for c in PAIR_SIGNALS if c in merged]:
            for arm, g in [*merged.groupby("arm"), ("all", merged)]:
                rho, p = spearmanr(g[signal], g["loss"]) if len(g) > 2 else (np.nan, np.nan)
                rows.append({"signal": signal, "arm": arm, "scope": "summed over layers", "pairs": len(g),
                             "spearman": rho, "p": p})
        per_layer = other.merge(pairs[["variant", "adapter", "data", "loss"]], on=["variant", "adapter", "data"])
        for layer, g in per_layer.groupby("layer"):
            rho, p = spearmanr(g["relative_shift"], g["loss"]) if len(g) > 2 else (np.nan, np.nan)
            rows.append({"signal": "relative_shift", "arm": "all", "scope": layer, "pairs": len(g),
                         "spearman": rho, "p": p})
        tables["q6_prediction"] = pd.DataFrame(rows)
        tables["q6_pairs"] = merged
    own = frames["own_energy"]
    if not own.empty:
        tables["q7_own_energy"] = (own[own["group"] == "main"].groupby(["init", "task"])[["share", "random_share", "ratio"]]
                                   .mean().reset_index())
    return tables


def seed_mean_curves(curves: pd.DataFrame) -> pd.DataFrame:
    """Normalized average vs lambda of the compared variants: mean and std over seeds."""
    compared = curves[curves["group"].isin(COMPARED_GROUPS)]
    return (compared.groupby(["method", "init", "constraint", "rank", "lr", "lambda"])["normalized_avg"]
            .agg(["mean", "std"]).reset_index())


def _md(df: pd.DataFrame, digits: int = 3) -> str:
    if df.empty or len(df.columns) == 0:
        return "_No runs in this study answer this question (its ablation lists hold only the main setting)._"
    df = df.copy()
    for c in df.columns:
        if pd.api.types.is_float_dtype(df[c]):
            df[c] = df[c].map(lambda x: "" if pd.isna(x) else f"{x:.{digits}f}")
    header = "| " + " | ".join(str(c) for c in df.columns) + " |"
    sep = "|" + "---|" * len(df.columns)
    rows = ["| " + " | ".join(str(x) for x in r) + " |" for r in df.itertuples(index=False)]
    return "\n".join([header, sep, *rows])


def _reference(df: pd.DataFrame) -> pd.DataFrame:
    """The standard-init rows without a constraint at the lowest rank (plain LoRA): the baseline."""
    ref = df[(df["init"] == "standard") & (df["constraint"] == "none")]
    return ref[ref["rank"] == ref["rank"].min()] if "rank" in ref and not ref.empty else ref


def findings(tables: dict[str, pd.DataFrame]) -> list[str]:
    """Plain statements computed from the tables: each variant against plain standard LoRA, per
    method, by normalized and by plain merged score."""
    q1 = tables["q1_merged"]
    lines = []
    ref_rows = _reference(q1)
    ref = ref_rows.set_index("method")
    if ref.empty:
        return ["- No standard-init baseline in this study; compare the inits in table 1."]
    for _, row in q1.drop(index=ref_rows.index).iterrows():
        if row["method"] not in ref.index:
            continue
        base = ref.loc[row["method"]]
        diff = row["normalized_best_mean"] - base["normalized_best_mean"]
        spread = pd.Series([row["normalized_best_std"], base["normalized_best_std"]]).max()
        verdict = "better than" if diff > 0 else "worse than"
        if not np.isnan(spread) and abs(diff) <= spread:
            verdict = "within the seed spread of"
        merged = f"{row['merged_avg_mean']:.3f} vs {base['merged_avg_mean']:.3f}"
        if "merged_avg_std" in row and row["seeds"] > 1:
            merged = (f"{row['merged_avg_mean']:.3f} ± {row['merged_avg_std']:.3f} vs "
                      f"{base['merged_avg_mean']:.3f} ± {base['merged_avg_std']:.3f}")
        lines.append(
            f"- {viz.arm_label(row, q1)}, {row['method']}: best normalized average "
            f"{row['normalized_best_mean']:.3f} vs standard {base['normalized_best_mean']:.3f} "
            f"({diff:+.3f}; {verdict} standard{'; one seed' if row['seeds'] == 1 else ''}; "
            f"AUC {row['auc_mean']:.3f} vs {base['auc_mean']:.3f}; plain merged score there {merged}, "
            f"{100 * (row['merged_avg_mean'] - base['merged_avg_mean']):+.1f} points)."
        )
    curves = tables.get("curves")
    if curves is not None and not curves.empty:
        top = curves["lambda"].max()
        at_edge = q1[q1["best_lambda"] >= top].groupby("method")["init"].apply(lambda s: sorted(set(s)))
        for method, inits in at_edge.items():
            lines.append(
                f"- Caution: {method}'s best lambda is the grid's largest ({top:g}) for {', '.join(inits)}; "
                "the curve may rise beyond it (TIES and RegMean average the deltas: their lambda = T "
                "matches a task-arithmetic sum of T tasks)."
            )
    weak = tables["q2_single"].query("mean < @UNLEARNED")
    for task, g in weak.groupby("task"):
        lines.append(
            f"- Caution: {task}'s mean single-task score is below {UNLEARNED} for "
            f"{', '.join(sorted(set(g['init'])))} (lowest {g['mean'].min():.3f}); its normalized scores "
            "divide by that, so compare the plain merged scores (`merged_avg_mean`) instead."
        )
    q2 = tables["q2_single"]
    arms = [c for c in ("init", "constraint", "rank", "lr") if c in q2]
    single = q2.groupby(arms, dropna=False)["mean"].mean().reset_index()
    ref_single = _reference(single)
    if not ref_single.empty:
        base = ref_single["mean"].iloc[0]
        for _, row in single.drop(index=ref_single.index).iterrows():
            lines.append(f"- Single-task mean score of {viz.arm_label(row, single)}: {row['mean']:.3f} vs standard {base:.3f} "
                         f"({100 * (row['mean'] - base):+.1f} points).")
    return lines


def curves_page(curves: pd.DataFrame, title: str) -> str:
    """One HTML page with the normalized average vs lambda of every method (mean over seeds)."""
    figs = {
        method: viz.study_curve_figure(mean, title=f"{method}: normalized average vs lambda")
        for method, mean in seed_mean_curves(curves).groupby("method")
    }
    return viz.figures_page(figs, title=f"Study {title}: merge curves")


def write_report(study: StudyConfig, out: str | Path) -> Path:
    """Write ``report.md``, the tables as CSV and the figures as HTML into ``out``."""
    out = Path(out)
    tables = analyse(_collect(study, out))
    for name, df in tables.items():
        write_csv(out / "tables" / f"{name}.csv", df)
    write_text(out / "figures" / "curves.html", curves_page(tables["curves"], study.name))
    base = study.base
    seconds = study_seconds(out)
    lines = [
        f"# Study: {study.name}",
        "",
        f"Tasks: {', '.join(t.name for t in base.tasks)}; model: {base.model or 'packaged all-MiniLM-L6-v2'}; "
        f"rank {base.rank}; {base.train.steps} steps; seeds {study.seeds}; "
        f"test examples per task: {base.max_test or 'all'}."
        + (f" Wall time of the runs: {seconds / 60:.1f} min." if seconds else ""),
        "",
        "Scores are the task's metric; *normalized* = merged / single-task score of the same run, "
        "averaged over tasks. Best = best lambda (and density) of each run, then mean ± std over seeds. "
        "`merged_avg_mean` is the plain merged score (mean over tasks) at that lambda: an adapter that "
        "learned little interferes little, so read the normalized score next to it and table 2.",
        "",
        "## Findings",
        *findings(tables),
        "",
        "## 1. Multi-task normalized score after merging",
        _md(tables["q1_merged"]),
        "",
        "Figure: [normalized average vs lambda, per method](figures/curves.html)",
        "",
        "## 2. Single-task scores (before merging)",
        _md(tables["q2_single"]),
        "",
        "## 3. Robustness to lambda",
        "`auc_mean` in table 1 is the mean normalized score over the lambda range; `width_2pt` the "
        "width of the lambda range within 2 points of the best.",
        "",
        "## 4. Samples per task for the statistics (seed " + str(study.seeds[0]) + ", best normalized average)",
        _md(tables["q4_samples"]),
        "",
        "## 5. Rank",
        _md(tables["q5_rank"]),
        "",
    ]
    if "q6_prediction" in tables:
        lines += [
            "## 6. Does exact interference predict the loss from merging?",
            f"Spearman correlation (with its p-value) between a signal of the pair (adapter j, task i) "
            f"and the measured drop of task i when merged with j alone (task arithmetic, lambda "
            f"{study.pair_lambda:g}). Signals: `relative_shift`, the relative output shift of adapter j "
            f"on task i's data from the statistics (data-aware; it is also the last point of the adapter's "
            f"drift curve, so this row says whether drift predicts merge loss); `sv_overlap`, the share of "
            f"adapter j's Delta W on the input directions of adapter i's (data-free); `spectral_loss`, "
            f"1 - the nuclear-norm retention of the merge of the two (data-free).",
            _md(tables["q6_prediction"]),
            "",
        ]
    lines += ["## 7. Own-task energy and the learning rate of A"]
    if "q7_own_energy" in tables:
        lines += ["Share of each task's own feature energy that its trained A sees, against a random "
                  "subspace of the same rank (r/d).", _md(tables["q7_own_energy"]), ""]
    lines += ["Best normalized average against the learning-rate scale of A:", _md(tables["q7_a_lr_scale"]), ""]
    report = out / "report.md"
    write_text(report, "\n".join(lines) + "\n")
    write_json(out / "tables" / "index.json", sorted(tables))
    return report
