"""The merge advisor against the plain default, on adapter sets it never saw the test texts of.

For each adapter set of a YAML file (name, adapters ``{task: folder}``, how they were made), each
task's **test split** (``../shared/data/real/<task>/test.csv``; never a training text) is cut
once, seeded, into two disjoint parts: ``--samples`` texts per task for the advisor (it splits
them into its own validation and held-out shares) and up to ``--max-test`` other texts per task
for the final score. On the final texts it scores the advised merge, task arithmetic at lambda 1
and task arithmetic at every lambda of a wide grid (its best lambda there is an oracle: chosen
on the very texts it is scored on), and each adapter alone. Writes one JSON with a row per set.

    OMP_NUM_THREADS=1 python reports/advisor/measure.py reports/advisor/sets.yaml \\
        --out reports/advisor/result-sets.json

A set's outcome against task arithmetic at its best lambda is ``win`` / ``tie`` / ``loss`` with
a tie band of +-1 point of mean accuracy.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from osrm_core.adapters import load_adapter  # noqa: E402
from osrm_core.advisor import advise  # noqa: E402
from osrm_core.data import Split, TaskData, load_task_dir  # noqa: E402
from osrm_core.evaluate import SweepEngine  # noqa: E402
from osrm_core.models import load_base_model  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "real"
TA_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0, 1.2, 1.5, 2.0)
TIE = 0.01  # +-1 point of mean accuracy


def _part(task: TaskData, idx: np.ndarray, source: str) -> TaskData:
    test = task.test
    pair = None if test.text_pair is None else [test.text_pair[i] for i in idx]
    split = Split([test.text[i] for i in idx], test.label[idx], pair)
    return TaskData(task.name, split, split, task.label_names, task.metric, source=source)


def cut_test_split(task: TaskData, samples: int, max_test: int, seed: int) -> tuple[TaskData, TaskData]:
    """The advisor's samples and the final texts: disjoint parts of the test split, by text."""
    train = set(zip(task.train.text, task.train.text_pair or [None] * len(task.train)))
    keys = list(zip(task.test.text, task.test.text_pair or [None] * len(task.test)))
    seen, fresh = set(), []
    for i in np.random.default_rng(seed).permutation(len(keys)):
        if keys[i] not in train and keys[i] not in seen:  # never a training text, never twice
            seen.add(keys[i])
            fresh.append(i)
    fresh = np.asarray(fresh)
    advisor, final = fresh[:samples], fresh[samples:samples + max_test]
    return _part(task, advisor, "test (advisor's part)"), _part(task, final, "test (final part)")


def measure_set(entry: dict, model, tok, args) -> dict:
    names = list(entry["adapters"])
    full = [load_task_dir(n, DATA / n) for n in names]
    cuts = [cut_test_split(t, args.samples, args.max_test, args.seed) for t in full]
    for advisor_part, final_part in cuts:  # checked on the texts, not on the code
        assert set(advisor_part.test.text).isdisjoint(final_part.test.text)
    adapters = {n: load_adapter(ROOT / p if not Path(p).is_absolute() else p, model)
                for n, p in entry["adapters"].items()}
    engine = SweepEngine(model, tok, [c[1] for c in cuts], adapters, max_length=args.max_length)
    try:
        single = engine.single_task_scores()
        grid = engine.sweep(["task_arithmetic"], list(TA_GRID), single=single)
        start = time.perf_counter()
        advice = advise(copy.deepcopy(model), tok, adapters, [c[0] for c in cuts],
                        max_length=args.max_length, seed=args.seed)
        seconds = time.perf_counter() - start
        engine.apply(advice.merged)
        final = engine.evaluate()
    finally:
        engine.restore()
    ta = grid.groupby("lambda")["score"].mean()
    advised, best_lam = float(np.mean(list(final.values()))), float(ta.idxmax())
    diff = advised - float(ta.max())
    rec = advice.recommended
    return {
        "set": entry["name"], "made_by": entry.get("made_by", ""), "tasks": names,
        "advice": {"method": rec["method"], "density": rec["density"], "weights": rec["weights"],
                   "reason": advice.reason, "margin": advice.settings["selection_margin"]},
        "final": {"advised": round(advised, 4), "ta_lambda_1": round(float(ta.loc[1.0]), 4),
                  "ta_best": round(float(ta.max()), 4), "ta_best_lambda": best_lam,
                  "ta_best_at_edge": best_lam in (TA_GRID[0], TA_GRID[-1]),
                  "single": round(float(np.mean(list(single.values()))), 4),
                  "advised_per_task": {k: round(v, 4) for k, v in final.items()}},
        "points_vs_ta_best": round(100 * diff, 2), "points_vs_ta_lambda_1": round(100 * (advised - ta.loc[1.0]), 2),
        "outcome": "win" if diff > TIE else "loss" if diff < -TIE else "tie",
        "texts": {"advisor": {c[0].name: len(c[0].test) for c in cuts}, "final": {c[1].name: len(c[1].test) for c in cuts}},
        "seconds": round(seconds, 1), "evaluations": advice.evaluations,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("sets", type=Path, help="YAML: a list of {name, made_by, adapters: {task: folder}}")
    parser.add_argument("--samples", type=int, default=60, help="test texts per task given to the advisor")
    parser.add_argument("--max-test", type=int, default=200, help="other test texts per task for the final score")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="*", help="names of the sets to measure (default: all)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    entries = yaml.safe_load(args.sets.read_text())
    done = json.loads(args.out.read_text())["sets"] if args.out.exists() else []
    model, tok = load_base_model()
    for entry in entries:
        if (args.only and entry["name"] not in args.only) or any(r["set"] == entry["name"] for r in done):
            continue
        row = measure_set(entry, model, tok, args)
        done.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        counts = {k: sum(r["outcome"] == k for r in done) for k in ("win", "tie", "loss")}
        args.out.write_text(json.dumps({"outcomes_vs_ta_best": counts, "sets": done,
                                        "settings": {k: v for k, v in vars(args).items() if k not in ("sets", "out", "only")}},
                                       indent=2, default=str))


if __name__ == "__main__":
    main()
