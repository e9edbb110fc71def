"""The ``osrm`` command line: one subcommand, one library call.

Exit codes: 0 success, 2 bad input (one ``error: ...`` line on stderr, no traceback),
1 internal failure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from osrm_core.advise import ADVISE_BUDGET, ADVISE_DENSITIES, ADVISE_LAMBDAS, ADVISE_METHODS
from osrm_core.constraints import CONSTRAINTS
from osrm_core.data import METRICS
from osrm_core.errors import OsrmInputError, UsageError
from osrm_core.inits import INITS
from osrm_core.merge import all_param_specs
from osrm_core.rundir import RunDir, write_csv
from osrm_core.settings import DEFAULT_LAMBDAS, RunConfig, TaskEntry

EXAMPLES = """examples:
  osrm demo --quick --json
  osrm run config.yaml --out runs/mine
  osrm stats --task sst2=data/sst2 --task trec=data/trec --samples 100 --out runs/mine
  osrm train --task a=demo:sentiment --task b=demo:topic --init osrm --steps 200 --out runs/mine
  osrm merge --adapter a=runs/mine/adapters/osrm/a --adapter b=runs/mine/adapters/osrm/b \\
      --method ties --lambda 0.7 --out merged/
  osrm diagnose --adapter a=adA.zip --adapter b=adB/ --task a=a.csv --task b=b.csv --json
  osrm advise --adapter a=adA/ --adapter b=adB/ --task a=a.csv --task b=b.csv --out advice/
"""


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
    if getattr(args, "osrm_gen_eps", None) is not None:
        data["osrm_gen_eps"] = args.osrm_gen_eps
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
    if needs_gram and args.space == "core":
        raise UsageError(f"--space core does not support --method {args.method} (it needs Gram matrices of the "
                         "full input space); use --space full")
    adapters = _load_adapters(args)
    weights = _weights(args.weights, list(adapters))
    model = tok = None
    if args.full or args.task or needs_gram or args.model is not None:  # with --model, the adapters are checked
        model, tok = load_base_for(adapters, args.model)
    tasks = _load_tasks(args, required=needs_gram)
    stats = _gram_stats(args, model, tok, adapters, [args.method], tasks)
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


def _gram_stats(args, model, tok, adapters, methods, tasks):
    """The tasks' statistics when one of ``methods`` needs Gram matrices (RegMean), else None."""
    from osrm_core.adapters import union_layers
    from osrm_core.merge import get_merge_method
    from osrm_core.workflows import task_stats

    if not any(get_merge_method(m).needs_gram for m in methods):
        return None
    return task_stats(model, tok, tasks, samples=args.samples, max_length=args.max_length,
                      target_modules=list(union_layers(adapters)), seed=args.seed)


def cmd_sweep(args) -> None:
    from osrm_core.evaluate import best_points
    from osrm_core.workflows import load_base_for, sweep_adapters

    adapters = _load_adapters(args)
    model, tok = load_base_for(adapters, args.model)
    tasks = _load_tasks(args)
    stats = _gram_stats(args, model, tok, adapters, args.methods, tasks)
    df = sweep_adapters(model, tok, adapters, tasks, methods=args.methods, lambdas=args.lambdas,
                        densities=args.densities, params=_grid(args.param), stats=stats, max_test=args.max_test,
                        max_length=args.max_length, seed=args.seed, progress=_progress_bar())
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
    import torch

    from osrm_core.adapters import union_layers
    from osrm_core.workflows import diagnose_adapters, load_base_for, task_stats

    adapters = _load_adapters(args)
    projected = _projected_or_dense(args.stats, adapters, len(args.task or []))  # before any work
    model, tok = load_base_for(adapters, args.model, dtype=getattr(torch, args.dtype))
    stats = task_stats(model, tok, _load_tasks(args), samples=args.samples, max_length=args.max_length,
                       target_modules=list(union_layers(adapters)), seed=args.seed,
                       adapters=adapters if projected else None)
    result = diagnose_adapters(model, adapters, stats, posthoc_rank=args.posthoc_rank)
    result.pop("projected", None)
    if args.out:
        for name, df in result.items():
            write_csv(Path(args.out) / f"{name}.csv", df.reset_index() if name == "matrix" else df)
    payload = {k: (v.reset_index() if k == "matrix" else v).to_dict(orient="records") for k, v in result.items()}
    text = ["layers each adapter covers",
            result["coverage"].to_string(index=False),
            "", "input interference sum_l E||A_j h_i||^2 (rows: adapter j, columns: data i)",
            result["matrix"].to_string(float_format=lambda x: f"{x:.4g}"),
            *(["", "post-hoc OSRM energy kept (mean over layers)",
               result["posthoc"].groupby("adapter")["energy_kept"].mean().to_string(float_format=lambda x: f"{x:.3f}")]
              if "posthoc" in result else []),
            "", "own-task energy share vs random (mean over layers)",
            result["own_energy"].groupby("task")[["share", "random_share"]].mean().to_string(float_format=lambda x: f"{x:.4f}"),
            "", "data-free: share of adapter j's Delta W on the input directions of adapter i's (rows j, columns i;"
            " mean over layers)",
            result["sv_interference"].pivot_table(index="adapter", columns="data", values="sv_overlap")
            .to_string(float_format=lambda x: f"{x:.4f}"),
            "", "data-free: spectrum of the task-arithmetic merge against its parts (mean over layers; "
            "retention 1 = nothing cancels)",
            result["spectrum"][["nuclear_retention", "energy_ratio", "effective_rank_merged", "effective_rank_parts"]]
            .mean().to_string(float_format=lambda x: f"{x:.4f}")]
    _emit(args, payload, "\n".join(text))


def _projected_or_dense(choice: str, adapters, tasks: int) -> bool:
    """Whether ``osrm diagnose`` collects projected statistics: ``projected``; ``dense`` (refused
    in one line when the d x d moments do not fit); ``auto``: dense when they fit, else projected."""
    from osrm_core.adapters import union_layers
    from osrm_core.memory import MemoryPlanError, check_fits, dense_stats_bytes

    if choice == "projected":
        return True
    widths = {n: next(iter(a.layers[n].A.shape[1] for a in adapters.values() if n in a.layers))
              for n in union_layers(adapters)}
    try:  # the command loads the model on the CPU
        check_fits(dense_stats_bytes(widths, max(tasks, 1)), f"dense statistics of {tasks} tasks",
                   "use --stats projected (every table but post-hoc OSRM and the principal angles)")
    except MemoryPlanError as err:
        if choice == "dense":
            raise
        print(f"note: {err}; collecting projected statistics", file=sys.stderr)
        return True
    return False


def cmd_advise(args) -> None:
    from osrm_core.advise import advise, write_advice
    from osrm_core.workflows import load_base_for

    if not args.out:
        raise UsageError("--out DIR is required (the advice and the recommended adapter go there)")
    _check_out_folder(args.out)
    adapters = _load_adapters(args)
    model, tok = load_base_for(adapters, args.model)
    advice = advise(model, tok, adapters, _load_tasks(args), methods=args.methods, lambdas=args.lambdas,
                    densities=args.densities, budget=args.budget, holdout=args.holdout,
                    max_samples=args.samples, max_length=args.max_length, seed=args.seed,
                    use_train=args.use_train_texts, progress=_progress_bar(), on_stage=lambda s: print(s, file=sys.stderr))
    out = write_advice(advice, adapters, args.out)
    cols = ["method", "density", "weights", "validation", "score", "low", "high", "normalized"]
    text = [advice.summary.sort_values("score", ascending=advice.lower_is_better)[cols].to_string(index=False, float_format="%.3f"),
            "", f"recommended: {advice.reason}", f"advice and adapter: {out}"]
    _emit(args, {"out": str(out), **advice.to_dict()}, "\n".join(text))


def cmd_study(args) -> None:
    from osrm_core.study import StudyConfig, quick_study_config, run_study

    if args.config is None and not args.quick:
        raise UsageError("give a study config file, or --quick for the small study on the demo tasks")
    study = quick_study_config() if args.config is None else StudyConfig.from_yaml(args.config)
    out = args.out or f"runs/{study.name}"
    report = run_study(study, out, jobs=args.jobs, progress=_progress_bar(),
                       on_stage=lambda s: print(s, file=sys.stderr))
    _emit(args, {"report": str(report)}, f"report: {report}")


def cmd_show(args) -> None:
    run = RunDir(args.run)
    if not run.exists():
        raise UsageError(f"{args.run!r} is not a run directory (no config.yaml)")
    summary = run.summary()
    if summary is None:
        raise UsageError(f"run {args.run!r} has no summary yet; resume it with osrm run {args.run}/config.yaml --out {args.run}")
    _emit(args, summary, _summary_text(summary))


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    from osrm_core.merge import MERGE_METHODS

    parser = argparse.ArgumentParser(
        prog="osrm", description="OSRM workbench: LoRA interference, OSRM init, merging.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--dist-timeout", type=float, default=None, metavar="SECONDS",
        help="under torchrun/accelerate launch: how long a rank waits for the others before failing "
             "(default $OSRM_DIST_TIMEOUT or 1800)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p, *, tasks=True, adapters=False, lora_rank=True):
        p.add_argument("--model", default=None, help="Hugging Face id or path (default: packaged MiniLM)")
        if tasks:
            p.add_argument("--task", action="append", metavar="NAME=SPEC",
                           help="CSV/JSONL/TXT file (no label column: unlabeled texts), folder with "
                                "train/test, demo:KEY or hf:DATASET[/CONFIG]:SPLIT")
            p.add_argument("--metric", action="append", metavar="NAME=METRIC",
                           help=f"a task's metric, one of {', '.join(METRICS)} (default accuracy; "
                                "loss for unlabeled texts and causal LMs)")
        if adapters:
            p.add_argument("--adapter", action="append", metavar="NAME=PATH", help="PEFT adapter folder or zip")
            p.add_argument("--allow-pickle", action="store_true", help="also load pickled adapter_model.bin")
        p.add_argument("--samples", type=int, default=100, help="samples per task for statistics")
        if lora_rank:
            p.add_argument("--rank", type=int, default=8, help="LoRA rank of the adapters")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--max-length", type=int, default=128)
        p.add_argument("--out", default=None, help="output (run) directory")
        p.add_argument("--json", action="store_true", help="machine-readable summary on stdout")

    def out_and_json(p) -> None:
        p.add_argument("--out", default=None)
        p.add_argument("--json", action="store_true")

    p = sub.add_parser("demo", help="the whole pipeline on the embedded default: standard LoRA against "
                       "osrm_gen with A frozen at rank 32")
    p.add_argument("--quick", action="store_true", help="small settings (minutes)")
    out_and_json(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("run", help="run or resume an experiment from a config.yaml")
    p.add_argument("config")
    p.add_argument("--jobs", type=int, default=1,
                   help="fine-tune the adapters (inits x tasks) in this many processes, the CPU cores split between them")
    out_and_json(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("stats", help="collect feature statistics (DIR/stats/NAME.safetensors)")
    common(p)
    p.set_defaults(func=cmd_stats)

    for name, func, helptext in (("init", cmd_init, "write initialized (untrained) adapters"),
                                 ("train", cmd_train, "initialize and fine-tune an adapter per task")):
        p = sub.add_parser(name, help=helptext)
        common(p)
        p.add_argument("--init", action="append", choices=list(INITS),
                       help=f"initialization, repeatable: {', '.join(INITS)}")
        if name == "train":
            p.add_argument("--steps", type=int)
            p.add_argument("--lr", type=float)
            p.add_argument("--batch-size", type=int)
            p.add_argument("--constraint", choices=list(CONSTRAINTS))
            p.add_argument("--penalty-beta", type=float, help="weight of the penalty constraints")
            p.add_argument("--b-density", type=float, help="sparse_B: share of B's entries kept (default 0.1)")
            p.add_argument("--calibration", type=float,
                           help="sparse_B: share of the steps before B's mask is fixed (default 0.1)")
        p.add_argument("--osrm-gen-eps", type=float, help="osrm_gen's trade-off eps (default 0.01)")
        p.set_defaults(func=func)

    p = sub.add_parser("merge", help="merge adapters into one adapter (or full weights)")
    common(p, adapters=True, lora_rank=False)
    p.add_argument("--method", default="task_arithmetic", choices=list(MERGE_METHODS), metavar="METHOD",
                   help=f"merge method: {', '.join(MERGE_METHODS)} (default task_arithmetic)")
    p.add_argument("--lambda", dest="lam", type=float, default=1.0, help="scale of the merge, >= 0")
    for spec in all_param_specs().values():  # each method's parameters, from its dataclass
        p.add_argument(f"--{spec.name.replace('_', '-')}", dest=f"param_{spec.name}", default=None,
                       type=float if spec.choices is None else str, choices=spec.choices,
                       help=f"{spec.help} (default {spec.default})".replace("%", "%%"))
    p.add_argument("--weights", default=None, metavar="NAME=W,...",
                   help="per-adapter weights >= 0, e.g. a=0.8,b=1.2 (1 for an adapter not named)")
    p.add_argument("--space", default="full", choices=["full", "core"],
                   help="merge the (d_out, d_in) deltas (full) or the LoRA factors' small core matrices (core: "
                        "the same merge for task arithmetic, TSV-M, Iso-C, Iso-CTS and CART, another one for "
                        "TIES and DARE)")
    p.add_argument("--out-rank", type=int, default=None,
                   help="truncate the merged adapter to this rank (default: the merge's numerical rank, exact)")
    p.add_argument("--max-test", type=int, default=None,
                   help="test examples per --task when scoring the merge (all by default)")
    p.add_argument("--full", action="store_true", help="write full merged model weights")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("sweep", help="merged scores of adapters over lambda (and density)")
    common(p, adapters=True, lora_rank=False)
    p.add_argument("--methods", nargs="+", default=["task_arithmetic", "ties"], choices=list(MERGE_METHODS),
                   metavar="METHOD", help=f"merge methods: {', '.join(MERGE_METHODS)} (default task_arithmetic ties)")
    p.add_argument("--lambdas", nargs="+", type=float, default=DEFAULT_LAMBDAS)
    p.add_argument("--densities", nargs="+", type=float, default=[0.5])
    p.add_argument("--param", action="append", metavar="NAME=V1,V2",
                   help="values to sweep of another merge parameter: " + ", ".join(
                       f"{s.name} ({s.help})" for s in all_param_specs().values() if s.name != "density"))
    p.add_argument("--max-test", type=int, default=None)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("diagnose", help="interference, angles, own-energy for given adapters")
    common(p, adapters=True, lora_rank=False)
    p.add_argument("--posthoc-rank", type=int, default=None,
                   help="rank of the post-hoc OSRM subspaces (default: each adapter's own rank)")
    p.add_argument("--stats", default="auto", choices=["auto", "projected", "dense"],
                   help="projected: only the adapters' projections A_j h (r x r per layer; every table but "
                        "post-hoc OSRM and the principal angles); dense: the d x d moments (refused when they "
                        "do not fit); auto (default): dense when they fit, else projected")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="the base model's weights (bfloat16 halves its memory; statistics stay float64)")
    p.set_defaults(func=cmd_diagnose)

    p = sub.add_parser("advise", help="search method, lambda, density and per-adapter weights; write the advised adapter")
    common(p, adapters=True, lora_rank=False)
    p.add_argument("--methods", nargs="+", default=list(ADVISE_METHODS))
    p.add_argument("--lambdas", nargs="+", type=float, default=list(ADVISE_LAMBDAS))
    p.add_argument("--densities", nargs="+", type=float, default=list(ADVISE_DENSITIES))
    p.add_argument("--budget", type=int, default=ADVISE_BUDGET, help="validation evaluations for the per-adapter weights")
    p.add_argument("--holdout", type=float, default=0.5, help="share of each task's samples held out from the search")
    p.add_argument("--use-train-texts", action="store_true",
                   help="also score on the train split of a task folder (its adapter may have trained on those "
                        "texts: the scores then look better than they are); by default only its test split")
    # --samples: sample texts used per task (a seeded subset of the task's examples).
    p.set_defaults(func=cmd_advise)

    p = sub.add_parser("study", help="the evidence study: inits x constraints x seeds x ablations, with a report")
    p.add_argument("config", nargs="?", default=None, help="study YAML (base run config + what to vary)")
    p.add_argument("--quick", action="store_true", help="a small study on the demo tasks")
    p.add_argument("--jobs", type=int, default=1,
                   help="variants run in this many processes, the CPU cores split between them (default 1)")
    out_and_json(p)
    p.set_defaults(func=cmd_study)

    p = sub.add_parser("show", help="print the summary of a run directory")
    p.add_argument("run")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_show)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. Under ``torchrun``/``accelerate launch`` every rank runs it: the
    commands of :data:`DISTRIBUTED_COMMANDS` share the work, the others run on rank 0 alone;
    rank 0 alone writes and prints, and an error names the rank it happened on."""
    from osrm_core.distributed import close_distributed

    parser = build_parser()
    args = parser.parse_args(argv)
    for flag in ("rank", "posthoc_rank", "out_rank", "samples", "max_length"):
        value = getattr(args, flag, None)
        if value is not None and value < (2 if flag == "max_length" else 1):
            dashed = flag.replace("_", "-")
            print(f"error: --{dashed} must be >= {2 if flag == 'max_length' else 1}, got {value}", file=sys.stderr)
            return 2
    if args.dist_timeout is not None:
        if not args.dist_timeout > 0:
            print(f"error: --dist-timeout must be > 0 seconds, got {args.dist_timeout:g}", file=sys.stderr)
            return 2
        os.environ["OSRM_DIST_TIMEOUT"] = str(args.dist_timeout)
    try:
        rank, world = _launch_rank()
    except OsrmInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if rank != 0 and args.command not in DISTRIBUTED_COMMANDS:
        return 0  # a single-process command: rank 0 does it
    where = f"rank {rank}/{world}: " if world > 1 else ""
    try:
        args.func(args)
    except OsrmInputError as err:  # bad input: one line, exit 2
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"error: {where}{message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as err:  # anything else is a bug: one line, exit 1
        message = str(err).strip().splitlines()[0] if str(err).strip() else ""
        print(f"internal error: {where}{type(err).__name__}: {message}", file=sys.stderr)
        return 1
    finally:
        close_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
