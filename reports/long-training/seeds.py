"""Per-seed view of the long-training study: each arm's plain merged score at its best lambda,
per seed, and the lead of osrm_gen (A frozen, r32) over standard LoRA paired by seed.

    python reports/long-training/seeds.py      # reads tables/curves.csv, writes tables/seeds.md

Run after combine.py (which copies the study's tables here).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from osrm_core.study import _md

HERE = Path(__file__).parent
METHODS = ("task_arithmetic", "ties", "regmean")
CANDIDATE = ("osrm_gen", "freeze_A", 32)
BASELINE = ("standard", "none", 8)


def arm(row) -> str:
    frozen = ", A frozen" if row["constraint"] == "freeze_A" else ""
    return f"{row['init']} r{row['rank']}{frozen}"


def main() -> None:
    curves = pd.read_csv(HERE / "tables" / "curves.csv")
    curves = curves[curves["group"] == "main"]
    keys = ["variant", "init", "constraint", "rank", "seed", "method"]
    runs = curves.groupby(keys, as_index=False)["merged_avg"].max().rename(columns={"merged_avg": "merged_best"})
    runs = runs.assign(arm=lambda d: d.apply(arm, axis=1))
    wide = runs.pivot_table(index=["arm", "method"], columns="seed", values="merged_best").reindex(
        [(a, m) for a in sorted(runs["arm"].unique()) for m in METHODS]).dropna(how="all")
    wide.columns = [f"seed {s}" for s in wide.columns]
    wide["mean"], wide["std"], wide["seeds"] = wide.mean(axis=1), wide.std(axis=1), wide.notna().sum(axis=1)

    def scores(key) -> pd.DataFrame:
        init, constraint, rank = key
        part = runs[(runs["init"] == init) & (runs["constraint"] == constraint) & (runs["rank"] == rank)]
        return part.set_index(["method", "seed"])["merged_best"]

    lead = (scores(CANDIDATE) - scores(BASELINE)).dropna().mul(100).unstack("seed")
    lead.columns = [f"seed {s}" for s in lead.columns]
    lead = lead.reindex([m for m in METHODS if m in lead.index])
    lead["mean"], lead["min"] = lead.mean(axis=1), lead.min(axis=1)
    text = [
        "# Per seed", "",
        "Plain merged average (mean over the four tasks) at each run's best lambda (the lambda where",
        "the plain merged average is highest), per seed; mean and standard deviation over the seeds",
        "that finished.", "",
        _md(wide.round(3).reset_index()), "",
        "Lead of osrm_gen (A frozen, r32) over standard r8 in points of plain merged average, paired",
        "by seed.", "",
        _md(lead.round(1).reset_index(), 1), "",
    ]
    (HERE / "tables" / "seeds.md").write_text("\n".join(text), encoding="utf-8")
    print("\n".join(text))


if __name__ == "__main__":
    main()
