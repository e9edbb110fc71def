"""The merge advisor on the four real tasks: its recommendation, measured on each task's test
split (never seen by the advice), against the best grid point found on that test split and
against task arithmetic at lambda 1; for several draws of the sample texts and several search
settings side by side.

    python reports/advisor/measure.py runs/advisor-real/adapters/standard --samples 40 --max-test 200 \\
        --seeds 0 1 2 3 4 --settings 40,2 12,1 0,1

Adapters: one per task in ADAPTERS/<task> (``osrm train``). Sample texts: ``--samples`` drawn
(seeded) from each task's train split, one draw per seed. A setting is ``BUDGET,REFINE``
(:func:`osrm_core.advise.advise`'s ``budget`` and ``refine``). Prints a JSON summary.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from osrm_core.adapters import load_adapter  # noqa: E402
from osrm_core.advise import ADVISE_DENSITIES, ADVISE_LAMBDAS, advise  # noqa: E402
from osrm_core.data import Split, TaskData, load_task_dir  # noqa: E402
from osrm_core.evaluate import SweepEngine  # noqa: E402
from osrm_core.models import load_base_model  # noqa: E402

DATA = Path("/work/shared/data/real")
METHODS = ("task_arithmetic", "ties")


def draw_samples(full: list[TaskData], n: int, seed: int) -> list[TaskData]:
    rng = np.random.default_rng(seed)
    samples = []
    for task in full:
        idx = rng.choice(len(task.train), size=n, replace=False)
        pair = None if task.train.text_pair is None else [task.train.text_pair[i] for i in idx]
        part = Split([task.train.text[i] for i in idx], task.train.label[idx], pair)
        samples.append(TaskData(task.name, part, part, task.label_names, task.metric))
    return samples


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("adapters", type=Path)
    parser.add_argument("--tasks", nargs="+", default=["sst2", "agnews", "trec", "rte"])
    parser.add_argument("--samples", type=int, default=40)
    parser.add_argument("--max-test", type=int, default=200)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--settings", nargs="+", default=["40,2"], help="BUDGET,REFINE of the weight search")
    args = parser.parse_args()
    settings = [tuple(int(x) for x in s.split(",")) for s in args.settings]

    model, tok = load_base_model()
    base = copy.deepcopy(model)  # each advice starts from a copy of the untouched base model
    adapters = {t: load_adapter(args.adapters / t, model) for t in args.tasks}
    full = [load_task_dir(t, DATA / t) for t in args.tasks]
    engine = SweepEngine(model, tok, full, adapters, max_test=args.max_test, max_length=args.max_length)
    try:
        single = engine.single_task_scores()
        grid = engine.sweep(list(METHODS), list(ADVISE_LAMBDAS), densities=list(ADVISE_DENSITIES), single=single)
        runs = []
        for seed in args.seeds:
            samples = draw_samples(full, args.samples, seed)
            for budget, refine in settings:
                start = time.perf_counter()
                advice = advise(copy.deepcopy(base), tok, adapters, samples, methods=METHODS,
                                max_length=args.max_length, seed=seed, budget=budget, refine=refine)
                seconds = time.perf_counter() - start
                engine.apply(advice.merged)
                test = engine.evaluate()
                runs.append({
                    "seed": seed, "budget": budget, "refine": refine, "seconds": round(seconds, 1),
                    "evaluations": advice.evaluations, "reason": advice.reason,
                    "recommended": {k: advice.recommended[k] for k in ("method", "density", "weights", "heldout")},
                    "test": round(float(np.mean(list(test.values()))), 4),
                    "test_per_task": {k: round(v, 4) for k, v in test.items()},
                })
                print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    finally:
        engine.restore()
    avg = grid.groupby(["method", "density", "lambda"], dropna=False)["score"].mean().reset_index()
    best = avg.loc[avg["score"].idxmax()]
    ta1 = avg[(avg["method"] == "task_arithmetic") & (avg["lambda"] == 1.0)]["score"].item()
    per_setting = {}
    for budget, refine in settings:
        mine = [r for r in runs if (r["budget"], r["refine"]) == (budget, refine)]
        scores = np.array([r["test"] for r in mine])
        per_setting[f"{budget},{refine}"] = {
            "test_mean": round(float(scores.mean()), 4), "test_min": float(scores.min()), "test_max": float(scores.max()),
            "seconds_mean": round(float(np.mean([r["seconds"] for r in mine])), 1),
            "evaluations_mean": float(np.mean([r["evaluations"] for r in mine])),
            "points_below_best_grid": round(100 * (float(best["score"]) - scores.mean()), 2),
            "points_over_ta_lambda_1": round(100 * (scores.mean() - ta1), 2),
        }
    out = {
        "per_setting": per_setting,
        "best_grid_point_on_test": {"method": best["method"], "density": None if best["density"] != best["density"]
                                    else float(best["density"]), "lambda": float(best["lambda"]),
                                    "score": round(float(best["score"]), 4)},
        "task_arithmetic_lambda_1": round(ta1, 4),
        "single": {k: round(v, 4) for k, v in single.items()},
        "runs": runs,
        "settings": {"samples": args.samples, "max_test": args.max_test, "max_length": args.max_length,
                     "seeds": args.seeds, "adapters": str(args.adapters)},
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
