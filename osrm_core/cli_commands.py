"""The ``osrm`` subcommands: each reads its parsed arguments, calls one library function and
prints (or, with ``--json``, emits) what it found. The parser and ``main`` are in
:mod:`osrm_core.cli`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from osrm_core.errors import UsageError
from osrm_core.rundir import RunDir, write_csv
from osrm_core.settings import RunConfig, TaskEntry


def _pairs(values: list[str] | None, flag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for v in values or []:
        name, sep, spec = v.partition("=")
        if not sep or not name or not spec:
            raise UsageError(f"{flag} {v!r}: use {flag} NAME=VALUE")
        if name in out:
            raise UsageError(f"{flag}: name {name!r} given twice")
        out[name] = spec
    return out


def _progress_bar():
    if _launch_rank()[0] != 0:
        return None
    from tqdm import tqdm

    state: dict = {"bar": None, "message": None}

    def progress(step: int, total: int, message: str) -> None:
        key = message.split(" lambda=")[0]
        if state["message"] != key or state["bar"] is None or state["bar"].total != total:
            if state["bar"] is not None:
                state["bar"].close()
            state["bar"] = tqdm(total=total, desc=key, file=sys.stderr, leave=False, dynamic_ncols=True)
            state["message"] = key
        state["bar"].n = step
        state["bar"].refresh()

    return progress


def _config_from_args(args, name: str = "run") -> RunConfig:
    tasks = _pairs(args.task, "--task")
    if len(tasks) < 2:
        raise UsageError("give at least two tasks with --task NAME=SPEC")
    metrics = _pairs(getattr(args, "metric", None), "--metric")
    unknown = sorted(set(metrics) - set(tasks))
    if unknown:
        raise UsageError(f"--metric {unknown[0]}=...: no --task of that name; tasks are {sorted(tasks)}")
    data = {
        "name": name,
        "model": args.model,
        "tasks": [TaskEntry(name=n, spec=s, metric=metrics.get(n)).model_dump() for n, s in tasks.items()],
        "rank": args.rank,
        "samples": args.samples,
        "seed": args.seed,
        "max_length": args.max_length,
    }
    if getattr(args, "init", None):
        data["inits"] = args.init
    init_params: dict[str, dict] = {}
    for key, value in vars(args).items():  # the flags of cli._param_flag: init_param.INIT.NAME
        if key.startswith("init_param.") and value is not None:
            _, init, name = key.split(".")
            init_params.setdefault(init, {})[name] = value
    if init_params:
        data["init_params"] = init_params
    train = {}
    for key in ("steps", "lr", "batch_size", "constraint", "penalty_beta", "b_density", "calibration"):
        if getattr(args, key, None) is not None:
            train[key] = getattr(args, key)
    if train:
        data["train"] = train
    return RunConfig.validate_dict(data, where="command line")


#: Commands that run data-parallel under torchrun / accelerate launch; the others run on rank 0.
DISTRIBUTED_COMMANDS = ("demo", "run", "stats", "init", "train")


def _launch_rank() -> tuple[int, int]:
    """(rank, world size) from the launcher's environment, (0, 1) when not launched by one."""
    from osrm_core.distributed import launched_world_size

    world = launched_world_size()
    return (int(os.environ.get("RANK", "0")), world) if world > 1 else (0, 1)


def _join(config: RunConfig) -> None:
    """Join the job's process group (no-op in a single process) on the config's device type."""
    from osrm_core.distributed import init_distributed

    init_distributed(device=config.device)


def _emit(args, payload: dict, text: str) -> None:
    if _launch_rank()[0] != 0:  # one answer per job: rank 0's
        return
    if args.json:
        print(json.dumps(payload, indent=2, default=str))
    else:
        print(text)


def _summary_text(summary: dict) -> str:
    lines = []
    for init, res in summary["results"].items():
        single = ", ".join(f"{t}={v:.3f}" for t, v in res["single"].items())
        lines.append(f"[{init}] single-task: {single}")
        for method, best in res["best"].items():
            lines.append(
                f"[{init}] {method}: best lambda={best['lambda']:g}"
                + (f" density={best['density']:g}" if best["density"] is not None else "")
                + f" normalized avg={best['normalized_avg']:.3f}"
            )
    return "\n".join(lines)


# --------------------------------------------------------------------------- commands


def cmd_demo(args) -> None:
    from osrm_core.pipeline import run_experiment
    from osrm_core.settings import demo_config

    config = demo_config(quick=args.quick)
    out = args.out or f"runs/{config.name}"
    _join(config)
    summary = run_experiment(config, out, progress=_progress_bar())
    if summary:  # the other ranks of a data-parallel job return an empty summary
        _emit(args, {"run_dir": out, **summary}, f"run directory: {out}\n" + _summary_text(summary))


def cmd_run(args) -> None:
    from osrm_core.pipeline import run_experiment

    config = RunConfig.from_yaml(args.config)
    out = args.out or f"runs/{config.name}"
    _join(config)
    summary = run_experiment(config, out, progress=_progress_bar(), jobs=args.jobs)
    if summary:  # the other ranks of a data-parallel job return an empty summary
        _emit(args, {"run_dir": out, **summary}, f"run directory: {out}\n" + _summary_text(summary))


def _pipeline(args, name: str):
    from osrm_core.pipeline import Pipeline

    if not args.out:
        raise UsageError("--out DIR is required")
    config = _config_from_args(args, name)
    _join(config)
    return Pipeline(config, args.out, progress=_progress_bar())


def cmd_stats(args) -> None:
    pipeline = _pipeline(args, "stats")
    stats = pipeline.collect_stats()
    payload = {
        name: {"path": str(pipeline.run.stats_path(name)), "tokens": s.count, "layers": len(s.layers)}
        for name, s in stats.items()
    }
    _emit(args, {"stats": payload}, "\n".join(f"{n}: {p['tokens']} tokens -> {p['path']}" for n, p in payload.items()))


def cmd_init(args) -> None:
    written = _pipeline(args, "init").write_inits()
    _emit(args, {"adapters": written}, "\n".join(f"{i}: {p}" for i, ps in written.items() for p in ps))


def cmd_train(args) -> None:
    results = _pipeline(args, "train").train_adapters()
    _emit(args, {"test_scores": results}, "\n".join(f"{i} {t}: {s:.4f}" for i, r in results.items() for t, s in r.items()))


def _load_adapters(args) -> dict:
    """The ``--adapter`` folders and zips, read safely (checked against a base model later)."""
    from osrm_core.adapters import load_adapter

    specs = _pairs(args.adapter, "--adapter")
    if len(specs) < 2:
        raise UsageError("give at least two adapters with --adapter NAME=DIR_OR_ZIP")
    return {n: load_adapter(p, allow_pickle=getattr(args, "allow_pickle", False)) for n, p in specs.items()}


def _load_tasks(args, required: bool = True):
    from osrm_core.task_spec import parse_task_spec

    specs = _pairs(args.task, "--task")
    metrics = _pairs(getattr(args, "metric", None), "--metric")
    unknown = sorted(set(metrics) - set(specs))
    if unknown:
        raise UsageError(f"--metric {unknown[0]}=...: no --task of that name; tasks are {sorted(specs)}")
    if required and not specs:
        raise UsageError("give task data with --task NAME=SPEC (one per adapter, same names)")
    return [parse_task_spec(s, name=n, seed=args.seed, metric=metrics.get(n)) for n, s in specs.items()]


def cmd_merge(args) -> None:
    from osrm_core.export import merge_adapters, write_merged_model
    from osrm_core.merge import get_merge_method
    from osrm_core.workflows import build_merged_adapter, evaluation_record, load_base_for, merge_scores

    if not args.out:
        raise UsageError("--out DIR is required")
    _check_out_folder(args.out)
    if not 0 <= args.lam < float("inf"):
        raise UsageError(f"--lambda must be a number >= 0, got {args.lam:g}")
    params = _merge_params(args)
    needs_gram = get_merge_method(args.method).needs_gram
    adapters = _load_adapters(args)
    weights = _weights(args.weights, list(adapters))
    _check_grams(args, adapters, needs_gram)
    _check_space(args, adapters, [args.method])
    model = tok = None
    if args.full or args.task or needs_gram or args.model is not None:  # with --model, the adapters are checked
        model, tok = load_base_for(adapters, args.model)
    tasks = _load_tasks(args, required=needs_gram)
    stats = _gram_stats(args, model, tok, adapters, tasks) if needs_gram else None
    if args.full and args.out_rank is not None:
        raise UsageError("--out-rank truncates a merged adapter; --full writes whole weights: give one of them")
    scores, cols = None, ["task", "metric", "score", "single", "normalized"]
    if tasks:  # measured, for the model card and the summary
        scores = merge_scores(model, tok, adapters, tasks, args.method, lam=args.lam, stats=stats,
                              max_test=args.max_test, max_length=args.max_length, seed=args.seed, weights=weights,
                              space=args.space, **params)[cols]
    if args.full:
        merged = merge_adapters(adapters, args.method, lam=args.lam, stats=stats, seed=args.seed, weights=weights,
                                space=args.space, **params)
        path = write_merged_model(model, tok, merged, args.out)
        payload = {"out": str(path), "layers": len(merged)}
        text = f"merged {len(adapters)} adapters -> {path} (full weights)"
    else:
        path, table = build_merged_adapter(adapters, args.out, args.method, lam=args.lam, weights=weights,
                                           stats=stats, rank=args.out_rank, seed=args.seed, scores=scores,
                                           space=args.space, evaluation=evaluation_record(
                                               tasks, max_test=args.max_test, max_length=args.max_length,
                                               seed=args.seed) if tasks else None, **params)
        size = (path / "adapter_model.safetensors").stat().st_size
        rank, error = int(table["rank"].iloc[0]), float(table["relative_error"].max())
        how = "exact" if args.out_rank is None else f"truncated by SVD, largest relative error {error:.3g}"
        payload = {"out": str(path), "layers": len(table), "rank": rank, "bytes": size,
                   "max_relative_error": error, "errors": table.to_dict(orient="records")}
        text = (f"merged {len(adapters)} adapters -> {path}\n"
                f"rank {rank} on {len(table)} layers ({how}); adapter_model.safetensors {size / 2**20:.2f} MiB")
        note = _rank_note(args.method, adapters, rank, size) if args.out_rank is None else None
        if note:
            payload["note"] = note
            text += "\n" + note
    if scores is not None:
        payload["scores"] = scores.to_dict(orient="records")
        text += ("\nmeasured (score: merged; single: the task's own adapter alone):\n"
                 + scores.to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    _emit(args, payload, text)


def _check_out_folder(out: str) -> None:
    """--out names a folder (new or existing); an existing file is refused before any work."""
    if Path(out).exists() and not Path(out).is_dir():
        raise UsageError(f"--out {out!r} is an existing file; give a folder (new, or existing to add to)")


def _weights(spec: str | None, names: list[str]) -> list[float] | None:
    """``--weights a=0.8,b=1.2`` as one weight per adapter in ``names``' order (1 where not given)."""
    if spec is None:
        return None
    given: dict[str, float] = {}
    for item in spec.split(","):
        name, sep, text = item.strip().partition("=")
        if not sep or not name:
            raise UsageError(f"--weights {spec!r}: use --weights NAME=W,NAME=W with adapter names {', '.join(names)}")
        if name not in names:
            raise UsageError(f"--weights: no adapter named {name!r}; adapters are {', '.join(names)}")
        if name in given:
            raise UsageError(f"--weights: adapter {name!r} given twice")
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not 0 <= value < float("inf"):
            raise UsageError(f"--weights: weight of {name!r} must be a finite number >= 0, got {text!r}")
        given[name] = value
    return [given.get(n, 1.0) for n in names]


def _rank_note(method: str, adapters: dict, rank: int, size: int) -> str | None:
    """A note when the merge is not low-rank: its rank exceeds what the sources have together at
    some layer (entry-wise methods such as TIES and DARE give full-rank deltas)."""
    from osrm_core.adapters import union_layers

    shapes = union_layers(adapters)
    together = max(sum(a.layers[n].rank for a in adapters.values() if n in a.layers) for n in shapes)
    if rank <= together:
        return None
    full = max(min(shape) for shape in shapes.values())
    sources = sum(lw.A.numel() + lw.B.numel() for a in adapters.values() for lw in a.layers.values()) * 4
    return (f"note: {method} gives a delta of rank {rank} (full rank is {full}; the {len(adapters)} source adapters "
            f"have rank {together} together): the adapter is {size / 2**20:.2f} MiB against "
            f"{sources / 2**20:.2f} MiB of sources; --out-rank K truncates it")


def _merge_params(args) -> dict:
    """The merge method's parameters given as flags; a flag of another method is refused."""
    from osrm_core.merge import MERGE_METHODS

    given = {k[6:]: v for k, v in vars(args).items() if k.startswith("param_") and v is not None}
    allowed = [p.name for p in MERGE_METHODS[args.method].param_specs()]
    for name in given:
        if name not in allowed:
            raise UsageError(f"--{name.replace('_', '-')} is not a parameter of merge method {args.method!r}; "
                             f"its parameters: {', '.join(allowed) or 'none'}")
    return given


def _grid(values: list[str] | None) -> dict[str, list]:
    """``--param NAME=V1,V2`` as a sweep grid, checked like a config's ``merge.params``."""
    from osrm_core.settings import MergeSettings, parse_values, validate_settings

    grid = {name: parse_values(text) for name, text in _pairs(values, "--param").items()}
    return validate_settings(MergeSettings, {"params": grid}, "--param").params


def _check_space(args, adapters, methods: list[str]) -> None:
    """``--space``: core space refuses methods that need Gram matrices; full space is refused in
    one line, before any work, when the deltas, a method's prepared copy of them and the merge do
    not fit."""
    from osrm_core.memory import space_plan
    from osrm_core.merge import get_merge_method

    gram = [m for m in methods if get_merge_method(m).needs_gram]
    if gram and args.space == "core":
        raise UsageError(f"--space core does not support {gram[0]} (it needs Gram matrices of the full input "
                         "space); use --space full")
    space_plan(args.space, adapters, 2 * len(adapters) + 1)


def _check_grams(args, adapters, needed: bool) -> None:
    """When a method needs Gram matrices (RegMean), the memory plan refuses them in one line,
    before any work, if they do not fit."""
    from osrm_core.memory import check_grams

    if needed:
        check_grams(adapters, len(args.task or []), args.stats_dtype)


def _gram_stats(args, model, tok, adapters, tasks):
    """The tasks' Gram matrices (``sum h h^T`` and ``sum h``, no more) at the layers the merge
    covers, in ``--stats-dtype``."""
    import torch

    from osrm_core.adapters import union_layers
    from osrm_core.workflows import task_stats

    return task_stats(model, tok, tasks, samples=args.samples, max_length=args.max_length,
                      target_modules=list(union_layers(adapters)), seed=args.seed,
                      dtype=getattr(torch, args.stats_dtype), sample_means=False)


def cmd_sweep(args) -> None:
    from osrm_core.evaluate import best_points
    from osrm_core.merge import get_merge_method
    from osrm_core.workflows import load_base_for, sweep_adapters

    adapters = _load_adapters(args)
    needs_gram = any(get_merge_method(m).needs_gram for m in args.methods)
    _check_grams(args, adapters, needs_gram)
    _check_space(args, adapters, args.methods)
    model, tok = load_base_for(adapters, args.model)
    tasks = _load_tasks(args)
    stats = _gram_stats(args, model, tok, adapters, tasks) if needs_gram else None
    df = sweep_adapters(model, tok, adapters, tasks, methods=args.methods, lambdas=args.lambdas,
                        densities=args.densities, params=_grid(args.param), stats=stats, max_test=args.max_test,
                        max_length=args.max_length, seed=args.seed, space=args.space, progress=_progress_bar())
    if args.out:
        write_csv(Path(args.out) / "sweep.csv", df)
    best = best_points(df)
    per_task = df.pivot_table(index=["method", "density", "lambda"], columns="task", values="score", dropna=False).dropna(how="all")  # no (method, density) pair a method lacks
    single = df.groupby("task")[["metric", "single"]].first()
    lines = ["single-task: " + ", ".join(f"{t} {r.metric}={r.single:.4g}" for t, r in single.iterrows()),
             "", "per-task scores of the merge:", per_task.to_string(float_format=lambda x: f"{x:.4g}"),
             "", "best point per method (normalized = merged / single, averaged over tasks):",
             best.to_string(index=False)]
    _emit(args, {"sweep": df.to_dict(orient="records"), "best": best.to_dict(orient="records")}, "\n".join(lines))


def cmd_diagnose(args) -> None:
    import pandas as pd
    import torch

    from osrm_core.adapters import union_layers
    from osrm_core.memory import stats_plan
    from osrm_core.workflows import diagnose_adapters, load_base_for, task_sketches, task_stats

    if args.sketch_power < 0:
        raise UsageError(f"--sketch-power must be >= 0, got {args.sketch_power}")
    adapters = _load_adapters(args)

    def make_plan():  # no table reads the per-sample means
        return stats_plan(args.stats, adapters, len(args.task or []), stats_dtype=args.stats_dtype, sample_means=False)

    make_plan()  # refused here, before any work, when dense statistics do not fit
    model, tok = load_base_for(adapters, args.model, dtype=getattr(torch, args.dtype))
    plan = make_plan()  # again with the model's weights in memory: auto may now choose projected statistics
    for note in plan.notes:
        print(f"note: {note}", file=sys.stderr)
    tasks = _load_tasks(args)
    stats = task_stats(model, tok, tasks, samples=args.samples, max_length=args.max_length,
                       target_modules=list(union_layers(adapters)), seed=args.seed,
                       adapters=adapters if plan.projected else None, dtype=getattr(torch, args.stats_dtype),
                       sample_means=False)
    sketches = None
    if args.angles == "sketch" and plan.projected:
        sketches = task_sketches(model, tok, tasks, adapters, power=args.sketch_power, samples=args.samples,
                                 max_length=args.max_length, seed=args.seed)
    diagnosis = diagnose_adapters(model, adapters, stats, posthoc_rank=args.posthoc_rank, sketches=sketches)
    tables = diagnosis.tables()
    if sketches:
        tables["sketch"] = pd.concat([s.table() for s in sketches.values()], ignore_index=True)
    if args.out:
        for name, df in tables.items():
            write_csv(Path(args.out) / f"{name}.csv", df)
    payload = {name: df.to_dict(orient="records") for name, df in tables.items()}
    text = diagnosis.to_text()
    if sketches:
        text += (f"\n\nprincipal angles from sketches of the data subspaces ({args.sketch_power} power passes): "
                 f"every angle within its row's bound, the largest {diagnosis.angles['bound'].max():.3g} degrees "
                 "(angles and sketch tables)")
    _emit(args, {**payload, "layer_notes": diagnosis.notes()}, text)


def cmd_advise(args) -> None:
    from osrm_core.advisor import advice_plan, advise, write_advice
    from osrm_core.workflows import load_base_for

    if not args.out:
        raise UsageError("--out DIR is required (the advice and the recommended adapter go there)")
    _check_out_folder(args.out)
    adapters = _load_adapters(args)
    advice_plan(args.stats, args.space, adapters, args.methods, args.stats_dtype)  # refused here, before any work
    model, tok = load_base_for(adapters, args.model)
    advice = advise(model, tok, adapters, _load_tasks(args), methods=args.methods, lambdas=args.lambdas,
                    densities=args.densities, budget=args.budget, holdout=args.holdout,
                    max_samples=args.samples, max_length=args.max_length, seed=args.seed,
                    use_train=args.use_train_texts, stats=args.stats, stats_dtype=args.stats_dtype, space=args.space,
                    progress=_progress_bar(), on_stage=lambda s: print(s, file=sys.stderr))
    out = write_advice(advice, adapters, args.out)
    cols = ["method", "density", "weights", "validation", "score", "low", "high", "normalized"]
    text = [advice.summary.sort_values("score", ascending=advice.lower_is_better)[cols].to_string(index=False, float_format="%.3f"),
            "", f"recommended: {advice.reason}", *[f"note: {note}" for note in advice.notes],
            f"advice and adapter: {out}"]
    _emit(args, {"out": str(out), **advice.to_dict()}, "\n".join(text))


def cmd_study(args) -> None:
    from osrm_core.parallel import RayCluster
    from osrm_core.study import StudyConfig, quick_study_config, run_study

    if args.config is None and not args.quick:
        raise UsageError("give a study config file, or --quick for the small study on the demo tasks")
    if args.ray_threads is not None and args.ray is None:
        raise UsageError("--ray-threads sets the threads of each Ray task: give it with --ray ADDRESS")
    cluster = None if args.ray is None else RayCluster(args.ray, args.ray_threads or 1)
    study = quick_study_config() if args.config is None else StudyConfig.from_yaml(args.config)
    out = args.out or f"runs/{study.name}"
    report = run_study(study, out, jobs=args.jobs, cluster=cluster, progress=_progress_bar(),
                       on_stage=lambda s: print(s, file=sys.stderr))
    _emit(args, {"report": str(report)}, f"report: {report}")


def cmd_show(args) -> None:
    from osrm_core.rundir import inits_vs_standard
    from osrm_core.viz import summary_tables

    run = RunDir(args.run)
    if not run.exists():
        raise UsageError(f"{args.run!r} is not a run directory (no config.yaml)")
    summary = run.summary()
    if summary is None:
        raise UsageError(f"run {args.run!r} has no summary yet; resume it with osrm run {args.run}/config.yaml --out {args.run}")
    versus = inits_vs_standard(summary_tables(summary)[1])
    text = _summary_text(summary)
    if not versus.empty:
        text += ("\n\neach init minus standard at its best merged point (plain merged average and normalized):\n"
                 + versus.to_string(index=False, float_format=lambda x: f"{x:+.3f}"))
    _emit(args, {**summary, "inits_vs_standard": versus.to_dict(orient="records")}, text)
