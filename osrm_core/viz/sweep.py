"""Merge-sweep figures: score against lambda per method, best points, a run's summary, a study's
curves."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from osrm_core.errors import OsrmInputError
from osrm_core.evaluate import param_columns

from .common import _DASHES, _SYMBOLS, _finish, _unique, color_of


def _of_metric(sweep: pd.DataFrame, metric: str | None) -> pd.DataFrame:
    if metric is None:
        return sweep
    if "metric" not in sweep.columns or metric not in set(sweep["metric"]):
        raise OsrmInputError(f"no task of the sweep is scored by {metric!r}")
    return sweep[sweep["metric"] == metric]


def sweep_curves(
    sweep: pd.DataFrame, *, task: str | None = None, y: str = "normalized", density: float | None = None,
    metric: str | None = None,
) -> pd.DataFrame:
    """The sweep reduced to one value per (init, method, lambda): a task's or the task average.

    ``density`` keeps only that density for methods that use one (rows with a density);
    methods without density are kept as they are. ``metric`` keeps only the tasks scored by
    it. Raw scores (``y="score"``) of different metrics (accuracy and MCC ...) are not averaged:
    ValueError; average the normalized scores, or one metric's tasks.
    """
    if y not in ("score", "normalized"):
        raise OsrmInputError(f"y must be 'score' or 'normalized', got {y!r}")
    sweep = _of_metric(sweep, metric)
    if y == "score" and task is None and "metric" in sweep.columns and sweep["metric"].nunique() > 1:
        raise OsrmInputError(
            f"raw scores of different metrics ({', '.join(map(str, _unique(sweep['metric'])))}) are not averaged: "
            "choose one metric's tasks, one task, or the normalized score"
        )
    df = sweep if "init" in sweep.columns else sweep.assign(init="")
    if density is not None and "density" in df.columns:
        df = df[df["density"].isna() | np.isclose(df["density"].astype(float), density)]
    if task is not None:
        if task not in set(df["task"]):
            raise OsrmInputError(f"task {task!r} is not in the sweep; tasks are {_unique(df['task'])}")
        df = df[df["task"] == task]
    keys = ["init", "method", *param_columns(df), "lambda"]
    if "density" in df.columns:
        df = df.assign(density=df["density"].astype(float))
    out = df.groupby(keys, dropna=False, sort=False)[y].mean().reset_index()
    return out.sort_values(keys, kind="stable").reset_index(drop=True)


def sweep_best(curves: pd.DataFrame, y: str = "normalized", *, lower_is_better: bool = False) -> pd.DataFrame:
    """Per init and method, the row of :func:`sweep_curves` with the highest ``y`` (the lowest
    with ``lower_is_better``: tasks scored by a loss)."""
    grouped = curves.groupby(["init", "method"], sort=False)[y]
    idx = (grouped.idxmin() if lower_is_better else grouped.idxmax()).dropna()
    return curves.loc[idx.astype(int)].reset_index(drop=True)


def average_choices(sweep: pd.DataFrame, y: str = "normalized") -> dict[str, tuple[str | None, str | None]]:
    """The averages a sweep view can show, label -> ``(task, metric)`` for :func:`sweep_curves`:
    the average over all tasks, except for raw scores of mixed metrics, where each metric's
    tasks are averaged apart (``"average of the mcc tasks (a, b)"``)."""
    metrics = _unique(sweep["metric"]) if "metric" in sweep.columns else []
    if y == "normalized" or len(metrics) <= 1:
        return {"average over tasks": (None, None)}
    return {
        f"average of the {m} tasks ({', '.join(map(str, _unique(sweep.loc[sweep['metric'] == m, 'task'])))})": (None, m)
        for m in metrics
    }


def edge_notes(curves: pd.DataFrame, best: pd.DataFrame) -> list[str]:
    """A note per best point (of :func:`sweep_best`) at the end of its lambda grid: the best
    may lie beyond the grid."""
    notes = []
    for _, row in best.iterrows():
        part = curves[(curves["init"] == row["init"]) & (curves["method"] == row["method"])]
        lams = sorted(part["lambda"].astype(float).unique())
        if len(lams) < 2:
            continue
        lam = float(row["lambda"])
        end = "largest" if np.isclose(lam, lams[-1]) else "smallest" if np.isclose(lam, lams[0]) else None
        if end:
            name = f"{row['method']} ({row['init']})" if row["init"] else str(row["method"])
            notes.append(f"{name}: the best lambda {lam:g} is the {end} of the grid "
                         f"({lams[0]:g} to {lams[-1]:g}); the best may lie beyond it, widen the grid to see.")
    return notes


def metric_label(sweep: pd.DataFrame, task: str | None = None) -> tuple[str, bool]:
    """The metrics of a sweep's rows (of ``task``, or all) as a label, e.g. ``"mcc"`` or
    ``"accuracy, f1"``, and whether lower is better (all scored by a loss)."""
    from osrm_core.evaluate import LOWER_IS_BETTER

    if "metric" not in sweep.columns:
        return "score", False
    rows = sweep if task is None else sweep[sweep["task"] == task]
    metrics = _unique(rows["metric"])
    return ", ".join(map(str, metrics)), bool(metrics) and all(m in LOWER_IS_BETTER for m in metrics)


def sweep_figure(
    sweep: pd.DataFrame,
    *,
    task: str | None = None,
    y: str = "normalized",
    density: float | None = None,
    title: str = "",
    metric: str | None = None,
) -> go.Figure:
    """Merged score against lambda: one line per init and method, the best point starred.

    Parameters
    ----------
    sweep : DataFrame
        Rows of a merge sweep (``init, method, density, lambda, task, score, single,
        normalized``), several inits concatenated.
    task : str, optional
        One task, or None for the average over tasks.
    y : {"normalized", "score"}
    density : float, optional
        The density shown for TIES/DARE.
    metric : str, optional
        Only the tasks scored by this metric (raw scores of mixed metrics are not averaged,
        see :func:`sweep_curves`).
    """
    curves = sweep_curves(sweep, task=task, y=y, density=density, metric=metric)
    sweep = _of_metric(sweep, metric)
    n_tasks = sweep["task"].nunique()
    metric, lower = metric_label(sweep, task)
    methods = _unique(curves["method"])
    inits = _unique(curves["init"])
    # Colour says the init (standard vs OSRM, the comparison that matters), dash and marker the method.
    icolor = {init: color_of(str(init), i) for i, init in enumerate(inits)}
    mdash = {m: _DASHES[i % len(_DASHES)] for i, m in enumerate(methods)}
    msymbol = {m: _SYMBOLS[i % len(_SYMBOLS)] for i, m in enumerate(methods)}
    fig = go.Figure()
    for (init, method), g in curves.groupby(["init", "method"], sort=False):
        name = f"{method} ({init})" if init else str(method)
        fig.add_trace(
            go.Scatter(
                x=g["lambda"],
                y=g[y],
                mode="lines+markers",
                name=name,
                legendgroup=name,
                line=dict(color=icolor[init], dash=mdash[method]),
                marker=dict(symbol=msymbol[method], size=7),
                hovertemplate=f"{name}<br>lambda = %{{x:g}}<br>{y} = %{{y:.4f}}<extra></extra>",
            )
        )
    best = sweep_best(curves, y, lower_is_better=lower)
    for _, row in best.iterrows():
        init, method = row["init"], row["method"]
        name = f"{method} ({init})" if init else str(method)
        fig.add_trace(
            go.Scatter(
                x=[row["lambda"]],
                y=[row[y]],
                mode="markers",
                name=f"best: {name}",
                legendgroup=name,
                showlegend=False,
                marker=dict(symbol="star", size=16, color=icolor[init], line=dict(color="black", width=1)),
                hovertemplate=f"best {name}<br>lambda = %{{x:g}}<br>{y} = %{{y:.4f}}<extra></extra>",
            )
        )
    if y == "normalized":
        fig.add_hline(y=1.0, line_dash="dot", line_color="grey", annotation_text="single-task")
    what = f"average over {n_tasks} tasks" if task is None else task
    better = "lower is better" if lower else "higher is better"
    fig.update_yaxes(title=f"{'normalized ' if y == 'normalized' else ''}{metric} ({what}; {better})")
    fig.update_xaxes(title="lambda")
    return _finish(fig, title)


# --------------------------------------------------------------------------- summary of a run


def summary_tables(summary: Mapping) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Two tables from a run's ``summary.json``: single-task scores (task by init) and the best
    merged point per init and method (with the per-task scores)."""
    results = summary.get("results", {})
    single = pd.DataFrame({init: r.get("single", {}) for init, r in results.items()})
    single.index.name = "task"
    rows = []
    for init, r in results.items():
        for method, p in r.get("best", {}).items():
            rows.append(
                {
                    "init": init,
                    "method": method,
                    "lambda": p.get("lambda"),
                    "density": p.get("density"),
                    "avg_score": p.get("avg"),
                    "normalized_avg": p.get("normalized_avg"),
                    **{f"score_{t}": s for t, s in p.get("scores", {}).items()},
                }
            )
    return single.reset_index(), pd.DataFrame(rows)


def summary_figure(best: pd.DataFrame, *, y: str = "normalized_avg", title: str = "") -> go.Figure:
    """Bars of the best merged score per method, one bar per init side by side."""
    fig = go.Figure()
    for i, (init, g) in enumerate(best.groupby("init", sort=False)):
        fig.add_trace(
            go.Bar(
                x=g["method"],
                y=g[y],
                name=str(init),
                marker_color=color_of(str(init), i),
                customdata=np.stack([g["lambda"].astype(float), g["avg_score"].astype(float)], axis=1),
                hovertemplate=(
                    f"{init}<br>%{{x}}<br>{y} = %{{y:.4f}}<br>lambda = %{{customdata[0]:g}}"
                    "<br>avg score = %{customdata[1]:.4f}<extra></extra>"
                ),
            )
        )
    fig.update_layout(barmode="group")
    if y == "normalized_avg":
        fig.add_hline(y=1.0, line_dash="dot", line_color="grey", annotation_text="single-task")
    fig.update_yaxes(title="best normalized score (avg over tasks)" if y == "normalized_avg" else y)
    fig.update_xaxes(title="merge method")
    return _finish(fig, title)

def arm_label(row, table: pd.DataFrame | None = None) -> str:
    """``init (constraint, rRANK, lr LR)`` of a study table row; rank and learning rate appear
    when they vary in ``table`` (all of the row's when no table is given)."""
    parts = [row["constraint"]] if row.get("constraint", "none") != "none" else []
    for col, fmt in (("rank", "r{:g}"), ("lr", "lr {:g}")):
        varies = table is None or (col in table and table[col].nunique(dropna=False) > 1)
        if col in row and not pd.isna(row[col]) and varies:
            parts.append(fmt.format(row[col]))
    return f"{row['init']} ({', '.join(parts)})" if parts else str(row["init"])


def study_curve_figure(curves: pd.DataFrame, *, title: str = "") -> go.Figure:
    """Normalized average against lambda per init (and constraint), mean over seeds with a band
    of one standard deviation.

    ``curves`` has columns ``init, constraint, lambda, mean, std``.
    """
    fig = go.Figure()
    arms = [c for c in ("init", "constraint", "rank", "lr") if c in curves]
    for k, (_, g) in enumerate(curves.groupby(arms, sort=False, dropna=False)):
        g = g.sort_values("lambda")
        init, constraint, label = g["init"].iloc[0], g["constraint"].iloc[0], arm_label(g.iloc[0], curves)
        color = color_of(init, k)
        std = g["std"].fillna(0.0)
        fig.add_trace(go.Scatter(
            x=np.concatenate([g["lambda"], g["lambda"][::-1]]),
            y=np.concatenate([g["mean"] + std, (g["mean"] - std)[::-1]]),
            fill="toself", line={"width": 0}, fillcolor=color, opacity=0.15,
            hoverinfo="skip", showlegend=False, legendgroup=label,
        ))
        fig.add_trace(go.Scatter(
            x=g["lambda"], y=g["mean"], mode="lines+markers", name=label, legendgroup=label,
            line={"color": color, "dash": "dash" if constraint != "none" else "solid"},
            customdata=std, hovertemplate=f"{label}<br>λ=%{{x}}<br>normalized=%{{y:.3f}} ± %{{customdata:.3f}}<extra></extra>",
        ))
    fig.update_xaxes(title="lambda")
    fig.update_yaxes(title="normalized average (merged / single)")
    return _finish(fig, title)
