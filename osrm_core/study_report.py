"""The study's report: the runs' results collected into the tables that answer the questions of
:mod:`osrm_core.study`, the findings in words (``findings.json`` and ``report.md``), the merge
curves as HTML; and the readers of a study folder (its tables and findings) for the app.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from osrm_core import viz
from osrm_core.atomic import write_json, write_text
from osrm_core.errors import OsrmInputError, RunFileError
from osrm_core.runcheck import read_csv_checked
from osrm_core.rundir import RunDir, write_csv
from osrm_core.study import SPARSE_B_SETTINGS, StudyConfig, _md, study_seconds, variant_name, variants

#: The variant groups compared across seeds (the main comparison and the constraint ablation).
COMPARED_GROUPS = ("main", "constraint")
#: The findings of a study's report, one statement each (``{"study": name, "findings": [...]}``).
FINDINGS = "findings.json"
#: Pair signals set against the measured merge loss in question 6: data-aware (statistics) first.
PAIR_SIGNALS = ("relative_shift", "sv_overlap", "spectral_loss")  # the variants of table 1 and the curves
UNLEARNED = 0.1  # a single-task score below this (MCC or F1 near 0) makes normalized scores explode


def find_studies(run_path: str | Path) -> list[Path]:
    """Study folders (with a report) in a run's ``studies/`` or the folder itself, newest first."""
    root = Path(run_path)
    found = [p for p in [root, *sorted((root / "studies").glob("*"))] if (p / "report.md").is_file()]
    return sorted(found, key=lambda p: (p / "report.md").stat().st_mtime, reverse=True)


def load_study_tables(path: str | Path) -> dict[str, pd.DataFrame]:
    """The CSV tables a study's report was built from, by name (RunFileError names a damaged one)."""
    return {p.stem: read_csv_checked(p, f"{Path(path).name}/tables/{p.name}")
            for p in sorted((Path(path) / "tables").glob("*.csv"))}


def read_findings(path: str | Path) -> tuple[list[str], bool]:
    """The findings of the study in ``path`` (one statement each, markdown) and whether they were
    read from ``findings.json``; a study written before it had one gives the bullets of its
    report's "Findings" section (False)."""
    path = Path(path)
    if (path / FINDINGS).is_file():
        data = json.loads((path / FINDINGS).read_text(encoding="utf-8"))
        if not isinstance(data, dict) or not isinstance(data.get("findings"), list):
            raise RunFileError(f"{path.name}/{FINDINGS}: expected an object with a list 'findings'")
        return [str(line) for line in data["findings"]], True
    report = (path / "report.md").read_text(encoding="utf-8")
    section = report.split("## Findings", 1)[-1].split("\n## ", 1)[0] if "## Findings" in report else ""
    return [line.removeprefix("- ") for line in section.splitlines() if line.strip()], False


def _collect(study: StudyConfig, out: Path) -> dict[str, pd.DataFrame]:
    from osrm_core.diagnostics import pair_signals

    sweeps, singles, inter, own, pairs, signals = [], [], [], [], [], []
    for v in variants(study):
        run = RunDir(out / "runs" / variant_name(v, study.base.train.lr))
        tags = {k: v[k] for k in ("init", "constraint", "seed", "samples", "rank", "a_lr_scale", "lr", "group")}
        tags["variant"] = variant_name(v, study.base.train.lr)
        # A variant's own sparse_B settings tell its arm apart in the tables (not averaged as seeds).
        tags["constraint"] += "".join(f" {mark}{v[n]:g}" for n, mark in SPARSE_B_SETTINGS.items() if v.get(n) is not None)
        sweep = run.read_csv(f"sweep_{v['init']}.csv")
        if sweep is None:
            continue
        sweeps.append(sweep.drop(columns="init").assign(**tags))
        for task_dir in (run.path / "adapters" / v["init"]).iterdir():
            result = json.loads((task_dir / "train.json").read_text())
            singles.append({**tags, "task": task_dir.name, "score": result["test_score"]})
        for name, bucket in (("interference.csv", inter), ("own_energy.csv", own), ("pairwise.csv", pairs)):
            df = run.read_csv(name)
            if df is not None:
                bucket.append(df.drop(columns=["init"], errors="ignore").assign(**tags))
        if run.result_path("pairwise.csv").is_file():  # the data-free signals, from the adapters' weights
            signals.append(pair_signals(run.load_adapters(v["init"])).assign(**tags))
    if not sweeps:
        raise OsrmInputError(f"study {str(out)!r} has no finished variant yet")
    frames = {"sweep": sweeps, "single": singles, "interference": inter, "own_energy": own, "pairwise": pairs,
              "signals": signals}
    return {k: pd.concat(v, ignore_index=True) if v and isinstance(v[0], pd.DataFrame) else pd.DataFrame(v)
            for k, v in frames.items()}


def curve_metrics(curve: pd.DataFrame) -> dict:
    """From a normalized-average-vs-lambda curve: best, its lambda, AUC, width within 2 points."""
    curve = curve.sort_values("lambda")
    lam, y = curve["lambda"].to_numpy(), curve["normalized_avg"].to_numpy()
    best = int(np.argmax(y))
    span = lam[-1] - lam[0]
    auc = float(np.trapezoid(y, lam) / span) if span > 0 else float(y[0])
    near = lam[y >= y[best] - 0.02]
    out = {"best": float(y[best]), "best_lambda": float(lam[best]), "auc": auc,
           "width_2pt": float(near.max() - near.min())}
    if "merged_avg" in curve:
        out["merged_at_best"] = float(curve["merged_avg"].to_numpy()[best])
    return out


def analyse(frames: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """The tables of the report, from the collected frames."""
    sweep, single = frames["sweep"], frames["single"]
    keys = ["variant", "group", "init", "constraint", "seed", "samples", "rank", "a_lr_scale", "lr", "method",
            "density"]
    curves = (sweep.groupby([*keys, "lambda"], dropna=False)
              .agg(normalized_avg=("normalized", "mean"), merged_avg=("score", "mean")).reset_index())
    per_run = pd.DataFrame([
        {**dict(zip(keys, k, strict=True)), **curve_metrics(g)}
        for k, g in curves.groupby(keys, dropna=False)
    ])
    # Best density per (variant, method) for TIES/DARE.
    per_run = per_run.sort_values("best").groupby(keys[:-1], dropna=False).tail(1)
    main = per_run[per_run["group"].isin(COMPARED_GROUPS)]
    q1 = (main.groupby(["init", "constraint", "rank", "lr", "method"])
          .agg(normalized_best_mean=("best", "mean"), normalized_best_std=("best", "std"),
               merged_avg_mean=("merged_at_best", "mean"), merged_avg_std=("merged_at_best", "std"),
               best_lambda=("best_lambda", "median"),
               auc_mean=("auc", "mean"), width_2pt=("width_2pt", "mean"), seeds=("seed", "nunique"))
          .reset_index())
    main_single = single[single["group"].isin(COMPARED_GROUPS)]
    q2 = (main_single.groupby(["init", "constraint", "rank", "lr", "task"])["score"].agg(["mean", "std"]).reset_index())
    def ablation(group: str, col: str) -> pd.DataFrame:
        """Best normalized average of the first seed against ``col``, for the methods the group ran."""
        ran = per_run[per_run["group"] == group]
        rows = per_run[per_run["group"].isin([group, "main"]) & (per_run["seed"] == per_run["seed"].min())
                       & per_run["method"].isin(ran["method"]) & per_run["init"].isin(ran["init"])]
        return rows.groupby(["init", col, "method"])["best"].mean().unstack(col).reset_index()

    tables = {"q1_merged": q1, "q2_single": q2,
              "q4_samples": ablation("samples", "samples"), "q5_rank": ablation("rank", "rank"),
              "q7_a_lr_scale": ablation("a_lr_scale", "a_lr_scale"), "curves": curves, "per_run": per_run}
    inter, pairs = frames["interference"], frames["pairwise"]
    if not inter.empty and not pairs.empty:
        from scipy.stats import spearmanr

        other = inter[~inter["own"]]
        by_pair = other.groupby(["variant", "adapter", "data"])["relative_shift"].sum().reset_index()
        merged = by_pair.merge(pairs[["variant", "adapter", "data", "loss"]], on=["variant", "adapter", "data"])
        if not frames["signals"].empty:
            merged = merged.merge(frames["signals"][["variant", "adapter", "data", "sv_overlap", "spectral_loss"]],
                                  on=["variant", "adapter", "data"], how="left")
        arms = per_run[["variant", "init", "constraint", "rank", "lr"]].drop_duplicates("variant")
        arms = arms.assign(arm=[viz.arm_label(r, arms) for _, r in arms.iterrows()])
        merged = merged.merge(arms[["variant", "arm"]], on="variant")
        rows = []
        for signal in [c for c in PAIR_SIGNALS if c in merged]:
            for arm, g in [*merged.groupby("arm"), ("all", merged)]:
                rho, p = spearmanr(g[signal], g["loss"]) if len(g) > 2 else (np.nan, np.nan)
                rows.append({"signal": signal, "arm": arm, "scope": "summed over layers", "pairs": len(g),
                             "spearman": rho, "p": p})
        per_layer = other.merge(pairs[["variant", "adapter", "data", "loss"]], on=["variant", "adapter", "data"])
        for layer, g in per_layer.groupby("layer"):
            rho, p = spearmanr(g["relative_shift"], g["loss"]) if len(g) > 2 else (np.nan, np.nan)
            rows.append({"signal": "relative_shift", "arm": "all", "scope": layer, "pairs": len(g),
                         "spearman": rho, "p": p})
        tables["q6_prediction"] = pd.DataFrame(rows)
        tables["q6_pairs"] = merged
    own = frames["own_energy"]
    if not own.empty:
        tables["q7_own_energy"] = (own[own["group"] == "main"].groupby(["init", "task"])[["share", "random_share", "ratio"]]
                                   .mean().reset_index())
    return tables


def seed_mean_curves(curves: pd.DataFrame) -> pd.DataFrame:
    """Normalized average vs lambda of the compared variants: mean and std over seeds."""
    compared = curves[curves["group"].isin(COMPARED_GROUPS)]
    return (compared.groupby(["method", "init", "constraint", "rank", "lr", "lambda"])["normalized_avg"]
            .agg(["mean", "std"]).reset_index())


def _reference(df: pd.DataFrame) -> pd.DataFrame:
    """The standard-init rows without a constraint at the lowest rank (plain LoRA): the baseline."""
    ref = df[(df["init"] == "standard") & (df["constraint"] == "none")]
    return ref[ref["rank"] == ref["rank"].min()] if "rank" in ref and not ref.empty else ref


def findings(tables: dict[str, pd.DataFrame]) -> list[str]:
    """Plain statements computed from the tables: each variant against plain standard LoRA, per
    method, by normalized and by plain merged score."""
    q1 = tables["q1_merged"]
    lines = []
    ref_rows = _reference(q1)
    ref = ref_rows.set_index("method")
    if ref.empty:
        return ["- No standard-init baseline in this study; compare the inits in table 1."]
    for _, row in q1.drop(index=ref_rows.index).iterrows():
        if row["method"] not in ref.index:
            continue
        base = ref.loc[row["method"]]
        diff = row["normalized_best_mean"] - base["normalized_best_mean"]
        spread = pd.Series([row["normalized_best_std"], base["normalized_best_std"]]).max()
        verdict = "better than" if diff > 0 else "worse than"
        if not np.isnan(spread) and abs(diff) <= spread:
            verdict = "within the seed spread of"
        merged = f"{row['merged_avg_mean']:.3f} vs {base['merged_avg_mean']:.3f}"
        if "merged_avg_std" in row and row["seeds"] > 1:
            merged = (f"{row['merged_avg_mean']:.3f} ± {row['merged_avg_std']:.3f} vs "
                      f"{base['merged_avg_mean']:.3f} ± {base['merged_avg_std']:.3f}")
        lines.append(
            f"- {viz.arm_label(row, q1)}, {row['method']}: best normalized average "
            f"{row['normalized_best_mean']:.3f} vs standard {base['normalized_best_mean']:.3f} "
            f"({diff:+.3f}; {verdict} standard{'; one seed' if row['seeds'] == 1 else ''}; "
            f"AUC {row['auc_mean']:.3f} vs {base['auc_mean']:.3f}; plain merged score there {merged}, "
            f"{100 * (row['merged_avg_mean'] - base['merged_avg_mean']):+.1f} points)."
        )
    curves = tables.get("curves")
    if curves is not None and not curves.empty:
        top = curves["lambda"].max()
        at_edge = q1[q1["best_lambda"] >= top].groupby("method")["init"].apply(lambda s: sorted(set(s)))
        for method, inits in at_edge.items():
            lines.append(
                f"- Caution: {method}'s best lambda is the grid's largest ({top:g}) for {', '.join(inits)}; "
                "the curve may rise beyond it (TIES and RegMean average the deltas: their lambda = T "
                "matches a task-arithmetic sum of T tasks)."
            )
    weak = tables["q2_single"].query("mean < @UNLEARNED")
    for task, g in weak.groupby("task"):
        lines.append(
            f"- Caution: {task}'s mean single-task score is below {UNLEARNED} for "
            f"{', '.join(sorted(set(g['init'])))} (lowest {g['mean'].min():.3f}); its normalized scores "
            "divide by that, so compare the plain merged scores (`merged_avg_mean`) instead."
        )
    q2 = tables["q2_single"]
    arms = [c for c in ("init", "constraint", "rank", "lr") if c in q2]
    single = q2.groupby(arms, dropna=False)["mean"].mean().reset_index()
    ref_single = _reference(single)
    if not ref_single.empty:
        base = ref_single["mean"].iloc[0]
        for _, row in single.drop(index=ref_single.index).iterrows():
            lines.append(f"- Single-task mean score of {viz.arm_label(row, single)}: {row['mean']:.3f} vs standard {base:.3f} "
                         f"({100 * (row['mean'] - base):+.1f} points).")
    return lines


def curves_page(curves: pd.DataFrame, title: str) -> str:
    """One HTML page with the normalized average vs lambda of every method (mean over seeds)."""
    figs = {
        method: viz.study_curve_figure(mean, title=f"{method}: normalized average vs lambda")
        for method, mean in seed_mean_curves(curves).groupby("method")
    }
    return viz.figures_page(figs, title=f"Study {title}: merge curves")


def write_report(study: StudyConfig, out: str | Path) -> Path:
    """Write ``report.md``, its findings as ``findings.json`` (:func:`read_findings`), the tables
    as CSV and the figures as HTML into ``out``."""
    out = Path(out)
    tables = analyse(_collect(study, out))
    for name, df in tables.items():
        write_csv(out / "tables" / f"{name}.csv", df)
    write_text(out / "figures" / "curves.html", curves_page(tables["curves"], study.name))
    found = [line.removeprefix("- ") for line in findings(tables)]
    write_json(out / FINDINGS, {"study": study.name, "findings": found})
    base = study.base
    seconds = study_seconds(out)
    lines = [
        f"# Study: {study.name}",
        "",
        f"Tasks: {', '.join(t.name for t in base.tasks)}; model: {base.model or 'packaged all-MiniLM-L6-v2'}; "
        f"rank {base.rank}; {base.train.steps} steps; seeds {study.seeds}; "
        f"test examples per task: {base.max_test or 'all'}."
        + (f" Wall time of the runs: {seconds / 60:.1f} min." if seconds else ""),
        "",
        "Scores are the task's metric; *normalized* = merged / single-task score of the same run, "
        "averaged over tasks. Best = best lambda (and density) of each run, then mean ± std over seeds. "
        "`merged_avg_mean` is the plain merged score (mean over tasks) at that lambda: an adapter that "
        "learned little interferes little, so read the normalized score next to it and table 2.",
        "",
        "## Findings",
        *(f"- {line}" for line in found),
        "",
        "## 1. Multi-task normalized score after merging",
        _md(tables["q1_merged"]),
        "",
        "Figure: [normalized average vs lambda, per method](figures/curves.html)",
        "",
        "## 2. Single-task scores (before merging)",
        _md(tables["q2_single"]),
        "",
        "## 3. Robustness to lambda",
        "`auc_mean` in table 1 is the mean normalized score over the lambda range; `width_2pt` the "
        "width of the lambda range within 2 points of the best.",
        "",
        "## 4. Samples per task for the statistics (seed " + str(study.seeds[0]) + ", best normalized average)",
        _md(tables["q4_samples"]),
        "",
        "## 5. Rank",
        _md(tables["q5_rank"]),
        "",
    ]
    if "q6_prediction" in tables:
        lines += [
            "## 6. Does exact interference predict the loss from merging?",
            f"Spearman correlation (with its p-value) between a signal of the pair (adapter j, task i) "
            f"and the measured drop of task i when merged with j alone (task arithmetic, lambda "
            f"{study.pair_lambda:g}). Signals: `relative_shift`, the relative output shift of adapter j "
            f"on task i's data from the statistics (data-aware; it is also the last point of the adapter's "
            f"drift curve, so this row says whether drift predicts merge loss); `sv_overlap`, the share of "
            f"adapter j's Delta W on the input directions of adapter i's (data-free); `spectral_loss`, "
            f"1 - the nuclear-norm retention of the merge of the two (data-free).",
            _md(tables["q6_prediction"]),
            "",
        ]
    lines += ["## 7. Own-task energy and the learning rate of A"]
    if "q7_own_energy" in tables:
        lines += ["Share of each task's own feature energy that its trained A sees, against a random "
                  "subspace of the same rank (r/d).", _md(tables["q7_own_energy"]), ""]
    lines += ["Best normalized average against the learning-rate scale of A:", _md(tables["q7_a_lr_scale"]), ""]
    report = out / "report.md"
    write_text(report, "\n".join(lines) + "\n")
    write_json(out / "tables" / "index.json", sorted(tables))
    return report
