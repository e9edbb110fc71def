"""The evidence study: does OSRM make merged adapters keep their tasks, and when?

A study runs many small experiments (one run directory per variant: init, training
constraint, samples for the statistics, rank, learning-rate scale of A, seed), all resumable,
then answers the paper's questions in ``report.md`` with tables, figures and CSVs
(:mod:`osrm_core.study_report`):

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

import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from osrm_core.atomic import write_json, write_text
from osrm_core.constraints import check_constraint, get_constraint
from osrm_core.errors import OsrmInputError
from osrm_core.growth import check_growth, prepare_run
from osrm_core.inits import OSRM_METHODS
from osrm_core.lock import DirLock
from osrm_core.markdown import markdown_table
from osrm_core.parallel import RayCluster, check_backend, ray_connection, run_parallel
from osrm_core.pipeline import Pipeline
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


def run_study(study: StudyConfig, out: str | Path, *, jobs: int = 1, cluster: RayCluster | None = None,
              progress: Progress | None = None, on_stage: Callable[[str], None] | None = None, tasks=None) -> Path:
    """Run (or resume, or grow) every variant of ``study`` under ``out/runs/`` and write the report.

    A study directory grows: a config that adds seeds, inits, ablations, merge methods or
    lambdas reuses the finished variants whose settings match and
    computes only what is new (sweeps alone where only the merge settings changed); a config
    that changes a finished variant's settings is refused, naming the variant, before anything
    is written. Variants whose statistics settings match share one collection, made here
    first; the rest of each variant (fine-tuning, sweeps, diagnostics) runs in ``jobs``
    processes, or as a task of the Ray ``cluster`` (its nodes must share ``out``; see
    :mod:`osrm_core.parallel`), and a failure names its variant. ``tasks`` (optional) are used by every variant
    instead of loading the base's task entries. The study directory is locked meanwhile
    (:class:`osrm_core.lock.DirLock`; a second writer gets :class:`osrm_core.lock.LockedError`),
    and each variant's run directory too.
    """
    check_backend(jobs, cluster)  # a bad --jobs, or a cluster that does not answer, fails before any work
    with ray_connection(cluster), DirLock(out):
        return _run_study(study, Path(out), jobs, cluster, progress, on_stage, tasks)


def _run_study(study: StudyConfig, out: Path, jobs: int, cluster: RayCluster | None, progress: Progress | None,
               on_stage: Callable[[str], None] | None, tasks) -> Path:
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
    here = jobs == 1 and cluster is None
    items = [(study, out.absolute(), v, tasks or tasks_by_seed[v["seed"]], progress if here else None) for v in left]

    def done(k: int, name: str) -> None:
        if not _variant_done(study, out, left[k]):
            raise OsrmInputError(f"variant {name} finished, but {str(out / 'runs' / name)!r} holds no finished "
                                 "run here: on a Ray cluster the study's folder must be one every node shares")
        write_json(timing, {"seconds": round(spent + time.perf_counter() - start, 1)})
        stage(f"variant {k + 1}/{len(left)} done: {name}")

    run_parallel(_run_variant, items, jobs, on_done=done, cluster=cluster,
                 labels=[f"variant {variant_name(v, study.base.train.lr)}" for v in left])
    write_json(timing, {"seconds": round(spent + time.perf_counter() - start, 1)})
    stage("report")
    from osrm_core.study_report import write_report  # the report reads this module's variants

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


def _md(df: pd.DataFrame, digits: int = 3) -> str:
    """A study table as Markdown (an empty one says no run answers its question)."""
    return markdown_table(df, digits, empty="_No runs in this study answer this question (its ablation lists "
                                            "hold only the main setting)._")
