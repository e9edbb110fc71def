"""Item 2: the lambda sweep.

2b. ``SweepEngine`` (one loaded model; per grid point the merged ``W0 + lam * Delta`` is
    written in place, each task's head swapped in, pre-tokenized test batches) against its
    floor, the bare forward passes over the test sets that it must make
    (``SweepEngine.forward_seconds``, timed around each ``predict`` inside the same sweep).
    Goal: within 1.2x. Four demo tasks, random rank-8 adapters (their values do not change the
    cost), task arithmetic and TIES at density 0.5.
2c. The adaptive search (:func:`osrm_core.search.search_best`, successive halving) against
    the full grid, on adapters trained here (real tasks from ``../shared/data/real`` when
    present, else the demo tasks): test examples run through the model (goal <= 0.4x) and the
    gap between the best normalized average the search finds (scored on all examples) and the
    grid's best (goal <= 0.5 points), per method and in all.

(The former row 2a, an obvious reload-and-peft-merge sweep against ``SweepEngine``, is retired:
forward passes bound it at about 1.5x here; see BENCHMARKS.md.)
"""

from __future__ import annotations

import copy
import time

import torch

from bench._common import ROOT, Context, Row, interleave, median, paired_ratio, rounded

RANK, ALPHA = 8, 16


def _settings(ctx: Context) -> dict:
    if ctx.quick:
        return {"lambdas": [0.5, 1.0], "max_test": 32, "repeats": ctx.repeats}
    return {"lambdas": [0.3, 0.5, 0.7, 1.0], "max_test": 64, "repeats": ctx.repeats}


def make_adapters(base, tasks, seed: int = 0):
    """One random rank-8 adapter and head per task, as :class:`osrm_core.adapters.Adapter`."""
    from osrm_core.adapters import Adapter, LoraWeights
    from osrm_core.inits import lora_config
    from osrm_core.models import find_target_layers

    gen = torch.Generator().manual_seed(seed)
    targets = find_target_layers(base)
    config = lora_config(
        "standard", RANK, ALPHA, [t.name for t in targets], modules_to_save=["classifier"]
    ).to_dict()
    hidden = base.config.hidden_size
    adapters = {}
    for task in tasks:
        layers = {
            t.name: LoraWeights(
                torch.randn(RANK, t.d_in, generator=gen) / t.d_in**0.5,
                torch.randn(t.d_out, RANK, generator=gen) * 0.05,
                ALPHA / RANK,
            )
            for t in targets
        }
        head = {
            "classifier.weight": torch.randn(task.num_labels, hidden, generator=gen) * 0.05,
            "classifier.bias": torch.zeros(task.num_labels),
        }
        adapters[task.name] = Adapter(layers, head, config)
    return adapters


def sweep_rows(ctx: Context) -> list[Row]:
    from osrm_core.demo import demo_tasks
    from osrm_core.evaluate import SweepEngine

    s = _settings(ctx)
    base, tok = ctx.base_model()
    tasks = demo_tasks(seed=0, n_train=10, n_test=s["max_test"])
    adapters = make_adapters(base, tasks)
    methods = ["task_arithmetic", "ties"]
    lambdas = s["lambdas"]
    engine_model = copy.deepcopy(base)
    setup = SweepEngine(engine_model, tok, tasks, adapters, max_test=s["max_test"])
    single = setup.single_task_scores()
    setup.restore()
    del setup
    forward: list[float] = []

    def engine() -> float:
        start = time.perf_counter()
        eng = SweepEngine(engine_model, tok, tasks, adapters, max_test=s["max_test"])
        eng.sweep(methods, lambdas, single=single)
        elapsed = time.perf_counter() - start
        forward.append(eng.forward_seconds)
        eng.restore()
        return elapsed

    samples = interleave({"engine": engine}, s["repeats"])
    samples["forward"] = forward
    points = len(methods) * len(lambdas)
    detail = (
        f"default MiniLM; {len(tasks)} demo tasks x {s['max_test']} test examples; {points} grid points "
        f"(task_arithmetic, ties@0.5 x lambdas {lambdas}); rank-{RANK} adapters on query/value"
    )
    return [
        Row(
            "2b", "sweep: SweepEngine / its bare forward passes",
            paired_ratio(samples["engine"], samples["forward"]), "<=", 1.2,
            ours=median(samples["engine"]), baseline=median(samples["forward"]), repeats=s["repeats"],
            detail=detail
            + "; floor = SweepEngine.forward_seconds of the same sweep (engine build included in ours)",
            command=ctx.cmd("2b"),
            samples=rounded({"engine": samples["engine"], "forward": samples["forward"]}),
        ),
    ]


REAL = ROOT.parent / "shared" / "data" / "real"
SEARCH_LAMBDAS = [0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.4, 1.6, 1.8, 2.0]
SEARCH_GRID = {"task_arithmetic": [0.5], "ties": [0.3, 0.7]}


def _search_tasks():
    from osrm_core.demo import demo_task
    from osrm_core.task_spec import parse_task_spec

    if all((REAL / t).is_dir() for t in ("sst2", "agnews", "trec")):
        return [parse_task_spec(str(REAL / t), name=t, seed=0) for t in ("sst2", "agnews", "trec")], "sst2, agnews, trec"
    return [demo_task(k, seed=0, n_train=400, n_test=400) for k in ("sentiment", "topic", "question")], "demo tasks"


def search_row(ctx: Context) -> Row:
    """Train one adapter per task (short), then the full grid and the search on the same engine."""
    from osrm_core.evaluate import SweepEngine
    from osrm_core.inits import init_lora
    from osrm_core.models import load_base_model
    from osrm_core.search import search_best
    from osrm_core.settings import TrainSettings
    from osrm_core.train import adapter_of, finetune

    steps, max_test = (60, 180) if ctx.quick else (200, 450)
    base, tok = ctx.base_model()
    tasks, data = _search_tasks()
    adapters = {}
    for task in tasks:
        ctx.log(f"2c training {task.name} ({steps} steps)")
        model = init_lora(load_base_model(num_labels=task.num_labels)[0], "standard", rank=RANK, alpha=ALPHA, seed=0)
        finetune(model, tok, task, TrainSettings(steps=steps, batch_size=16, lr=2e-3, head_lr=1e-2),
                 max_length=64, seed=0, max_test=16)
        adapters[task.name] = adapter_of(model)
    engine = SweepEngine(copy.deepcopy(base), tok, tasks, adapters, max_test=max_test, max_length=64)
    single = engine.single_task_scores()
    gaps, found_examples, grid_examples, parts = [], 0, 0, []
    times = {"grid": 0.0, "search": 0.0}
    for method, densities in SEARCH_GRID.items():
        start = time.perf_counter()
        grid = engine.sweep([method], SEARCH_LAMBDAS, densities=densities, single=single)
        times["grid"] += time.perf_counter() - start
        start = time.perf_counter()
        found = search_best(engine, method, SEARCH_LAMBDAS, densities=densities, single=single)
        times["search"] += time.perf_counter() - start
        best = grid.groupby(["density", "lambda"], dropna=False)["normalized"].mean().max()
        gaps.append(100 * (best - found.normalized_avg))
        found_examples += found.examples
        grid_examples += found.grid_examples
        parts.append(f"{method}: grid best {best:.4f}, search {found.normalized_avg:.4f} at lambda {found.lam:g}"
                     f"{'' if found.density is None else f' density {found.density:g}'}, "
                     f"{found.examples}/{found.grid_examples} examples")
    engine.restore()
    return Row(
        "2c", "adaptive lambda search / full grid: forward passes",
        found_examples / grid_examples, "<=", 0.4,
        ours=found_examples, baseline=grid_examples, repeats=1,
        detail=(f"default MiniLM, {data}, rank-{RANK} adapters trained {steps} steps, {max_test} test examples "
                f"per task; lambdas {SEARCH_LAMBDAS[0]:g}..{SEARCH_LAMBDAS[-1]:g} x {len(SEARCH_LAMBDAS)}, "
                f"task_arithmetic and ties@{SEARCH_GRID['ties']}; best point within 0.5 points: "
                f"{'yes' if max(gaps) <= 0.5 else 'NO'} (largest gap {max(gaps):.2f} points); "
                + "; ".join(parts)
                + f"; seconds grid {times['grid']:.1f}, search {times['search']:.1f}; ours/baseline = examples"),
        command=ctx.cmd("2c"),
        samples={"gap_points": [round(g, 3) for g in gaps], "seconds": [round(times["grid"], 2), round(times["search"], 2)]},
    )


def run(ctx: Context, items: set[str]) -> list[Row]:
    rows = []
    if "2b" in items:
        ctx.log("2b lambda sweep")
        rows += sweep_rows(ctx)
    if "2c" in items:
        ctx.log("2c adaptive lambda search")
        rows.append(search_row(ctx))
    return rows
