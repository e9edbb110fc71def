"""TIES and RegMean beyond lambda 1 on the main study's adapters (their best lambda in the study
was 1.0, the top of its grid). Run from the repo root after the study:

    python reports/real-4tasks/extended_lambda.py runs/study-real-4tasks

Writes reports/real-4tasks/extended_lambda.csv (best lambda per run) and prints the table.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from osrm_core.pipeline import Pipeline
from osrm_core.rundir import RunDir
from osrm_core.study import StudyConfig, variant_config, variant_name, variants

LAMBDAS = [1.0, 1.5, 2.0, 3.0, 4.0]
METHODS = ["ties", "regmean"]


def main(study_dir: Path) -> pd.DataFrame:
    study = StudyConfig.from_yaml(study_dir / "study.yaml")
    rows = []
    for v in (v for v in variants(study) if v["group"] == "main"):
        run = RunDir(study_dir / "runs" / variant_name(v))
        pipeline = Pipeline(variant_config(study, v), run.path)
        engine = pipeline.sweep_engine(v["init"])
        df = engine.sweep(METHODS, LAMBDAS, densities=study.base.merge.densities, stats=run.load_stats(),
                          seed=v["seed"])
        curve = df.groupby(["method", "lambda"]).agg(normalized=("normalized", "mean"), merged=("score", "mean"))
        for method, g in curve.groupby(level="method"):
            best = g["normalized"].idxmax()
            rows.append({"init": v["init"], "seed": v["seed"], "method": method, "best_lambda": best[1],
                         "normalized": g.loc[best, "normalized"], "merged": g.loc[best, "merged"],
                         "normalized_at_1": g.loc[(method, 1.0), "normalized"]})
        print(rows[-2:], flush=True)
    return pd.DataFrame(rows)


if __name__ == "__main__":
    table = main(Path(sys.argv[1]))
    table.to_csv(Path(__file__).with_name("extended_lambda.csv"), index=False)
    summary = table.groupby(["method", "init"]).agg(
        best_lambda=("best_lambda", "median"), normalized=("normalized", "mean"),
        normalized_std=("normalized", "std"), merged=("merged", "mean"), normalized_at_1=("normalized_at_1", "mean"))
    print(summary.round(3).to_string())
