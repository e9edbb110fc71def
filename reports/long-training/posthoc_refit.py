"""Candidate 3 of issue 15 on the long-training study's standard adapters: post-hoc OSRM
(projection only) and post-hoc OSRM with B re-fitted for a few steps (A frozen in the subspace),
swept like the study's arms.

    python reports/long-training/posthoc_refit.py ../runs/long-training/runs/standard-none-n100-r8-a1-s0 \\
        --steps 100 --out reports/long-training/posthoc

For each task of the run: its 1,000-step standard adapter is projected on the OSRM subspace of
the other three tasks' statistics (rank 8, the adapter's), and a copy of the projection is
re-fitted on the task (:func:`posthoc_refit` below: B and the head, ``--steps`` steps,
the run's batch size and learning rates). Both sets are swept with the run's merge methods and
lambdas on the run's test examples; the table gives each method's best plain merged average and
best normalized average next to the run's own standard sweep.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from osrm_core.diagnostics import posthoc_osrm_adapters  # noqa: E402
from osrm_core.evaluate import SweepEngine  # noqa: E402
from osrm_core.pipeline import Pipeline  # noqa: E402
from osrm_core.rundir import RunDir  # noqa: E402
from osrm_core.errors import OsrmInputError  # noqa: E402
from osrm_core.markdown import markdown_table  # noqa: E402
from osrm_core.workflows import adapter_rank  # noqa: E402


def posthoc_refit(
    model,
    tokenizer,
    adapter,
    task,
    other_stats,
    train,
    *,
    rank: int | None = None,
    max_length: int = 128,
    max_test: int | None = None,
    seed: int = 0,
):
    """Post-hoc OSRM with B re-fitted: ``adapter`` (trained on ``task``) is projected on the OSRM
    subspace of the other tasks (:func:`osrm_core.diagnostics.posthoc_osrm`: ``A = subspace``,
    ``B = Delta_W A^+ / s``), then B and the head are fine-tuned on ``task`` for ``train.steps``
    steps with A frozen, so the adapter wins back what the projection cut while its inputs stay
    in the subspace the other tasks barely use.

    Parameters
    ----------
    model : nn.Module
        A fresh base model with ``task``'s number of labels; wrapped in place.
    train : osrm_core.settings.TrainSettings
        The re-fit's settings; its ``constraint`` is replaced by ``freeze_A``.
    rank : int, optional
        Rank of the subspace (default: the adapter's largest rank).

    Returns
    -------
    (Adapter, TrainResult)
        The re-fitted adapter (scale of the original) and the fine-tuning's result (its test score).
    """
    from osrm_core.adapters import lora_from_model
    from osrm_core.diagnostics import posthoc_osrm
    from osrm_core.inits import init_lora, osrm_subspace
    from osrm_core.train import finetune

    if not other_stats:
        raise OsrmInputError("posthoc_refit needs the statistics of at least one other task")
    r = rank or adapter_rank(adapter)
    subspaces = osrm_subspace(list(other_stats), r)
    projected, _ = posthoc_osrm(adapter, {n: subspaces[n] for n in adapter.layers})
    scales = {lw.scale for lw in projected.layers.values()}
    if len(scales) != 1:
        raise OsrmInputError(f"posthoc_refit needs one LoRA scale for every layer, got {sorted(scales)}")
    unexpected = model.load_state_dict(projected.head, strict=False).unexpected_keys
    if unexpected:
        raise OsrmInputError(f"the adapter's head does not fit the model: {unexpected[0]!r}")
    # The OSRM init sets A to the subspace (the projection's A) and B to zero; B starts from the projection.
    peft_model = init_lora(model, "osrm", rank=r, alpha=scales.pop() * r, target_modules=list(adapter.layers),
                           subspaces={n: subspaces[n].to(torch.float32) for n in adapter.layers}, freeze_a=True,
                           seed=seed)
    base = peft_model.get_base_model()
    with torch.no_grad():
        for name, lw in projected.layers.items():
            base.get_submodule(name).lora_B["default"].weight.copy_(lw.B)
    result = finetune(peft_model, tokenizer, task, train.model_copy(update={"constraint": "freeze_A"}),
                      max_length=max_length, seed=seed, max_test=max_test)
    return lora_from_model(peft_model), result


def best(sweep: pd.DataFrame, arm: str) -> pd.DataFrame:
    keys = ["method", "density", "lambda"]
    avg = sweep.groupby(keys, dropna=False)[["score", "normalized"]].mean().reset_index()
    rows = []
    for method, part in avg.groupby("method"):
        top = part.loc[part["score"].idxmax()]
        rows.append({"arm": arm, "method": method, "merged_best": top["score"], "lambda": top["lambda"],
                     "normalized_best": part["normalized"].max()})
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run", type=Path)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    run = RunDir(args.run)
    config = run.config()
    pipeline = Pipeline(config, args.run)
    tasks = pipeline.tasks()
    stats = dict(zip([t.name for t in tasks], pipeline.all_stats()))
    adapters = run.load_adapters("standard")
    start = time.perf_counter()
    projected, kept = posthoc_osrm_adapters(adapters, stats)
    refitted, trained = {}, {}
    for task in tasks:
        model, tok = pipeline.base_model(task.num_labels)
        others = [stats[n] for n in stats if n != task.name]
        train = config.train.model_copy(update={"steps": args.steps})
        refitted[task.name], result = posthoc_refit(model, tok, adapters[task.name], task, others, train,
                                                    max_length=config.max_length, max_test=config.max_test,
                                                    seed=config.seed)
        trained[task.name] = result.test_score
        print(f"re-fitted {task.name}: {result.test_score:.3f}", file=sys.stderr, flush=True)
    refit_seconds = time.perf_counter() - start

    standard = pd.read_csv(run.result_path("sweep_standard.csv"))
    tables, singles = [best(standard, "standard r8")], {}
    for arm, chosen in (("post-hoc OSRM", projected), (f"post-hoc OSRM + B re-fit ({args.steps} steps)", refitted)):
        model, tok = pipeline.base_model()
        engine = SweepEngine(model, tok, tasks, chosen, max_test=config.max_test, max_length=config.max_length)
        single = engine.single_task_scores()
        sweep = engine.sweep(config.merge.methods, config.merge.lambdas, densities=config.merge.densities,
                             stats=stats, single=single, seed=config.seed)
        engine.restore()
        tables.append(best(sweep, arm))
        singles[arm] = single
    singles = {"standard r8": standard.groupby("task")["single"].first().to_dict(), **singles}
    table = pd.concat(tables, ignore_index=True)
    table["single_mean"] = table["arm"].map({a: sum(s.values()) / len(s) for a, s in singles.items()})
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / f"{args.run.name}.csv", index=False)
    (args.out / f"{args.run.name}.json").write_text(json.dumps({
        "run": args.run.name, "steps": args.steps, "refit_seconds": round(refit_seconds, 1),
        "energy_kept_mean": float(kept["energy_kept"].mean()), "single": singles,
        "refit_test_scores": trained}, indent=2) + "\n")
    print(markdown_table(table))


if __name__ == "__main__":
    main()
