"""The merge advisor on the four real tasks: its recommendation, measured on each task's test
split (never seen by the advice), against the best grid point found on that test split and
against task arithmetic at lambda 1.

    python reports/advisor/measure.py runs/advisor-real/adapters/standard --samples 40 --max-test 200

Adapters: one per task in ADAPTERS/<task> (``osrm train``). Sample texts: ``--samples`` drawn
(seeded) from each task's train split. Prints a JSON summary.
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
from osrm_core.advise import advise  # noqa: E402
from osrm_core.data import Split, TaskData, load_task_dir  # noqa: E402
from osrm_core.evaluate import SweepEngine  # noqa: E402
from osrm_core.models import load_base_model  # noqa: E402

DATA = Path("/work/shared/data/real")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("adapters", type=Path)
    parser.add_argument("--tasks", nargs="+", default=["sst2", "agnews", "trec", "rte"])
    parser.add_argument("--samples", type=int, default=40)
    parser.add_argument("--max-test", type=int, default=200)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    model, tok = load_base_model()
    adapters = {t: load_adapter(args.adapters / t, model) for t in args.tasks}
    full = [load_task_dir(t, DATA / t) for t in args.tasks]
    rng = np.random.default_rng(args.seed)
    samples = []
    for task in full:
        idx = rng.choice(len(task.train), size=args.samples, replace=False)
        pair = None if task.train.text_pair is None else [task.train.text_pair[i] for i in idx]
        part = Split([task.train.text[i] for i in idx], task.train.label[idx], pair)
        samples.append(TaskData(task.name, part, part, task.label_names, task.metric))

    start = time.perf_counter()
    advice = advise(copy.deepcopy(model), tok, adapters, samples, max_length=args.max_length, seed=args.seed)
    advice_seconds = time.perf_counter() - start

    engine = SweepEngine(model, tok, full, adapters, max_test=args.max_test, max_length=args.max_length)
    try:
        engine.apply(advice.merged)
        recommended = engine.evaluate()
        single = engine.single_task_scores()
        s = advice.settings
        grid = engine.sweep(s["methods"], s["lambdas"], densities=s["densities"], single=single)
    finally:
        engine.restore()
    avg = grid.groupby(["method", "density", "lambda"], dropna=False)["score"].mean().reset_index()
    best = avg.loc[avg["score"].idxmax()]
    ta1 = avg[(avg["method"] == "task_arithmetic") & (avg["lambda"] == 1.0)]["score"].item()
    rec = float(np.mean(list(recommended.values())))
    out = {
        "recommended": {k: advice.recommended[k] for k in ("method", "density", "weights", "heldout")},
        "reason": advice.reason,
        "advice_seconds": round(advice_seconds, 1),
        "evaluations": advice.evaluations,
        "test": {
            "recommended": round(rec, 4),
            "recommended_per_task": {k: round(v, 4) for k, v in recommended.items()},
            "best_grid_point": {"method": best["method"], "density": None if best["density"] != best["density"]
                                else float(best["density"]), "lambda": float(best["lambda"]),
                                "score": round(float(best["score"]), 4)},
            "task_arithmetic_lambda_1": round(ta1, 4),
            "single": {k: round(v, 4) for k, v in single.items()},
            "points_below_best_grid": round(100 * (float(best["score"]) - rec), 2),
            "points_over_ta_lambda_1": round(100 * (rec - ta1), 2),
        },
        "settings": {"samples": args.samples, "max_test": args.max_test, "max_length": args.max_length,
                     "seed": args.seed, "adapters": str(args.adapters)},
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
