"""Item 1: the cost of feature statistics.

1a. ``collect_feature_stats`` (forward passes with our hooks) against the same forward passes
    without hooks: the same model, samples, batches, tokenization and padding. Goal <= 1.10x.
1b. Our whole OSRM initialization (statistics of the other tasks, eigendecomposition, writing A
    with ``init_lora(..., "osrm", other_stats=...)``) against peft's EVA initialization
    (``init_lora(..., "eva", eva_batches=...)``) on the same model, layers (query/value of the
    six layers), rank and amount of data. Goal <= 0.5x.

For 1b "the same data" means: every adapter to initialize gets ``n`` samples of one task. EVA
initializes task i's adapter from task i's own samples (peft cycles over them until its
incremental SVD has converged); OSRM initializes it from the other tasks' statistics, collected
once over the same ``n`` samples of each task. With all T adapters of T tasks (the full run)
both read each task's ``n`` samples; the quick run initializes one adapter of two tasks.
"""

from __future__ import annotations

import copy
import time

import torch

from bench._common import Context, Row, interleave, median, paired_ratio, rounded

BATCH_SIZE = 32
MAX_LENGTH = 128  # collect_feature_stats' default; demo sentences are far shorter, padding is dynamic


def _settings(ctx: Context) -> dict:
    if ctx.quick:
        return {
            "samples": 64,
            "tasks": 4,
            "repeats": max(ctx.repeats, 8),
            "eva_tasks": 2,
            "eva_repeats": ctx.repeats,
        }
    return {
        "samples": 128,
        "tasks": 4,
        "repeats": max(ctx.repeats, 16),
        "eva_tasks": 4,
        "eva_repeats": ctx.repeats,
    }


def _tasks(n: int, k: int):
    from osrm_core.demo import demo_tasks

    return demo_tasks(seed=0, n_train=max(n, 10), n_test=10)[:k]


def stats_overhead(ctx: Context) -> Row:
    """1a: forward passes with the statistics hooks / the same forward passes without.

    Each repeat takes one task (in turn), so that every pair (bare, hooked) is short and its two
    halves run under the same background load.
    """
    from osrm_core.batching import iter_batches
    from osrm_core.stats import collect_feature_stats, select_samples

    s = _settings(ctx)
    model, tok = ctx.base_model()
    tasks = _tasks(s["samples"], s["tasks"])
    turn = {"bare": 0, "stats": 0}

    def bare() -> float:
        task = tasks[turn["bare"] % len(tasks)]
        turn["bare"] += 1
        start = time.perf_counter()
        with torch.no_grad():
            idx = select_samples(len(task.train), s["samples"], 0)
            for batch in iter_batches(tok, task.train, batch_size=BATCH_SIZE, max_length=MAX_LENGTH, indices=idx,
                                      with_labels=False):
                model(**batch)
        return time.perf_counter() - start

    def hooked() -> float:
        task = tasks[turn["stats"] % len(tasks)]
        turn["stats"] += 1
        start = time.perf_counter()
        collect_feature_stats(
            model, tok, task, max_samples=s["samples"], batch_size=BATCH_SIZE, max_length=MAX_LENGTH
        )
        return time.perf_counter() - start

    bare(), hooked()  # warm-up: first calls allocate
    turn.update(bare=0, stats=0)
    samples = interleave({"bare": bare, "stats": hooked}, s["repeats"])
    # The physical floor of exact float64 sums: the float64 products X^T X (and M^T M of the
    # per-sample means) of each batch, timed alone on random data of the same shapes, at every
    # shared input (6), added to the bare forward passes.
    groups = 6
    width = model.config.hidden_size
    gemm, tokens = [], 0
    for task in tasks:
        seconds = 0.0
        for b in iter_batches(
            tok,
            task.train,
            batch_size=BATCH_SIZE,
            max_length=MAX_LENGTH,
            indices=select_samples(len(task.train), s["samples"], 0),
            with_labels=False,
        ):
            n_real, n_seq = int(b["attention_mask"].sum()), b["attention_mask"].shape[0]
            tokens += n_real
            real = torch.randn(n_real, width, dtype=torch.float64)
            means = torch.randn(n_seq, width, dtype=torch.float64)
            acc = torch.zeros(width, width, dtype=torch.float64)
            acc.addmm_(real.T, real)
            start = time.perf_counter()
            for _ in range(groups):
                acc.addmm_(real.T, real)
                acc.addmm_(means.T, means)
            seconds += time.perf_counter() - start
        gemm.append(seconds)
    n_bare = samples["bare"]
    floor = median([1 + gemm[i % len(tasks)] / n_bare[i] for i in range(len(n_bare))])
    samples["float64_products"] = gemm
    return Row(
        "1a", "statistics: forward + hooks / bare forward",
        paired_ratio(samples["stats"], samples["bare"]), "<=", 1.10,
        ours=median(samples["stats"]), baseline=median(samples["bare"]), repeats=s["repeats"],
        detail=(
            f"default MiniLM; each repeat one of {s['tasks']} demo tasks in turn, {s['samples']} samples "
            f"({tokens} real tokens over the 4 tasks), batch {BATCH_SIZE}, float64 sums at the 6 shared "
            f"query/value inputs; same batches both sides; {torch.get_num_threads()} torch thread(s); "
            f"floor of exact float64 sums (their products alone, at this CPU's rate): {floor:.3f}x"
        ),
        command=ctx.cmd("1a"), samples=rounded(samples),
    )


def osrm_vs_eva(ctx: Context) -> Row:
    """1b: OSRM initialization (statistics + eigh + init_lora) / peft's EVA initialization."""
    from osrm_core.batching import iter_batches
    from osrm_core.inits import init_lora
    from osrm_core.stats import collect_feature_stats, select_samples

    s = _settings(ctx)
    base, tok = ctx.base_model()
    tasks = _tasks(s["samples"], s["eva_tasks"])
    n, k = s["samples"], len(tasks)
    # Quick: initialize the adapter of task 0 only; full: the adapter of every task.
    targets = [0] if ctx.quick else list(range(k))
    # OSRM needs the statistics of every task that is "another task" of some target.
    needed = sorted({j for i in targets for j in range(k) if j != i})

    def eva() -> float:
        models = [copy.deepcopy(base) for _ in targets]
        start = time.perf_counter()
        for i, model in zip(targets, models):
            task = tasks[i]
            idx = select_samples(len(task.train), n, 0)
            batches = list(
                iter_batches(
                    tok,
                    task.train,
                    batch_size=BATCH_SIZE,
                    max_length=MAX_LENGTH,
                    indices=idx,
                    with_labels=False,
                )
            )
            init_lora(model, "eva", rank=8, alpha=16, eva_batches=batches)
        return time.perf_counter() - start

    def osrm() -> float:
        models = [copy.deepcopy(base) for _ in targets]
        start = time.perf_counter()
        stats = {
            j: collect_feature_stats(
                base, tok, tasks[j], max_samples=n, batch_size=BATCH_SIZE, max_length=MAX_LENGTH
            )
            for j in needed
        }
        for i, model in zip(targets, models):
            init_lora(model, "osrm", rank=8, alpha=16, other_stats=[stats[j] for j in needed if j != i])
        return time.perf_counter() - start

    samples = interleave({"eva": eva, "osrm": osrm}, s["eva_repeats"])
    return Row(
        "1b", "OSRM init (stats+eigh+A) / peft EVA init",
        paired_ratio(samples["osrm"], samples["eva"]), "<=", 0.5,
        ours=median(samples["osrm"]), baseline=median(samples["eva"]), repeats=s["eva_repeats"],
        detail=(
            f"default MiniLM, rank 8, query/value of 6 layers, {n} samples per task, batch {BATCH_SIZE}; "
            f"{len(targets)} adapter(s) of {k} tasks (EVA: own task's samples, cycled until converged, "
            f"rho=1; OSRM: the other tasks' statistics, each task read once)"
        ),
        command=ctx.cmd("1b"), samples=rounded(samples),
    )


def run(ctx: Context, items: set[str]) -> list[Row]:
    rows = []
    if "1a" in items:
        ctx.log("1a statistics overhead")
        rows.append(stats_overhead(ctx))
    if "1b" in items:
        ctx.log("1b OSRM vs EVA")
        rows.append(osrm_vs_eva(ctx))
    return rows
