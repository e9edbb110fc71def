"""A run's ``summary.json``: per init the single-task scores and every merged sweep point, with
the best point per method (what ``osrm show`` prints and the app's pages read)."""

from __future__ import annotations

import pandas as pd

from osrm_core.evaluate import param_columns
from osrm_core.rundir import RunDir


def _rounded(x: float) -> float | None:
    """Rounded for JSON; NaN (no valid normalized score) becomes None."""
    return None if pd.isna(x) else round(float(x), 4)


def build_summary(run: RunDir, task_names: list[str], inits: list[str]) -> dict:
    """``tasks``, ``inits`` and per init ``single`` scores and ``merged`` sweep points per method,
    with the best point per method."""
    out: dict = {"tasks": task_names, "inits": inits, "results": {}}
    for init in inits:
        df = run.read_csv(f"sweep_{init}.csv")
        if df is None:
            continue
        single = df.drop_duplicates("task").set_index("task")["single"].to_dict()
        merged: dict[str, list] = {}
        best: dict[str, dict] = {}
        params = param_columns(df)
        for (method, *values, lam), g in df.groupby(["method", *params, "lambda"], dropna=False):
            point = {
                "lambda": float(lam),
                **{p: None if pd.isna(x) else x for p, x in zip(params, values)},
                "scores": g.set_index("task")["score"].round(4).to_dict(),
                "normalized_avg": _rounded(g["normalized"].mean()),
                "avg": round(float(g["score"].mean()), 4),
            }
            merged.setdefault(method, []).append(point)
            if point["normalized_avg"] is not None and (
                method not in best or point["normalized_avg"] > best[method]["normalized_avg"]
            ):
                best[method] = point
        out["results"][init] = {"single": single, "merged": merged, "best": best}
    return out
