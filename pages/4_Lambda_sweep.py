"""Merged score against the merge scale lambda, per method, per task or averaged, standard vs
OSRM, with the best point of each curve marked."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from app_helpers import require_run, show_figure, show_table, sweep_table
from osrm_core.viz import average_choices, edge_notes, metric_label, sweep_best, sweep_curves, sweep_figure


def choices(sweep: pd.DataFrame) -> tuple[str, pd.DataFrame, str, str | None, str | None, float | None]:
    """The widgets: score, inits, methods, task (or an average) and density; returns the score,
    the chosen rows, the task's label, the task and metric to plot, and the density."""
    y = st.radio("Score", ["normalized", "score"], horizontal=True, key="sw_y",
                 format_func={"normalized": "normalized (merged / single)", "score": "raw metric"}.get,
                 help="Raw scores of different metrics (accuracy, MCC ...) are averaged per metric only")
    inits, methods = list(dict.fromkeys(sweep["init"])), list(dict.fromkeys(sweep["method"]))
    c1, c2, c3 = st.columns(3)
    shown_inits = c1.multiselect("Inits", inits, default=inits, key="sw_inits")
    shown_methods = c2.multiselect("Methods", methods, default=methods, key="sw_methods")
    averages = average_choices(sweep, y)
    task = c3.selectbox("Task", [*averages, *dict.fromkeys(sweep["task"])], key="sw_task")
    task_arg, metric_arg = averages.get(task, (task, None))
    _, c2 = st.columns(2)
    densities = sorted(float(d) for d in sweep["density"].dropna().unique()) if "density" in sweep else []
    density = None
    if len(densities) > 1:
        density = c2.select_slider("Density (TIES / DARE)", densities, value=densities[0], key="sw_density")
    elif densities:
        density = densities[0]
        c2.caption(f"Density of TIES / DARE: {density:g} (the only one in this run)")
    rows = sweep[sweep["init"].isin(shown_inits) & sweep["method"].isin(shown_methods)]
    return y, rows, task, task_arg, metric_arg, density


def best_section(rows: pd.DataFrame, y: str, task: str, task_arg, metric_arg, density) -> None:
    curves = sweep_curves(rows, task=task_arg, y=y, density=density, metric=metric_arg)
    metric, lower = metric_label(rows if metric_arg is None else rows[rows["metric"] == metric_arg], task_arg)
    st.subheader(f"Best point per init and method ({metric}, {'lowest' if lower else 'highest'} {y})")
    best = sweep_best(curves, y, lower_is_better=lower)
    for note in edge_notes(curves, best):
        st.caption(f"Note: {note}")
    show_table(best, f"sweep_best_{y}_{task}", "sw_best")
    with st.expander("Curves (table)"):
        show_table(curves, f"sweep_curves_{y}_{task}", "sw_curves")


def render() -> None:
    st.title("Lambda sweep")
    run = require_run()
    sweep = sweep_table(run)
    if sweep is None:
        st.info("This run has no merge sweep yet (results/sweep_<init>.csv): run or resume it on the home page.")
        st.stop()
    st.markdown(
        "Each task keeps its own classification head; the backbone gets `W0 + λ · merge(ΔW_1..ΔW_T)`. "
        "The normalized score divides a task's merged score by its single-task score (1 = no loss "
        "from merging). The star marks each curve's best λ."
    )
    y, rows, task, task_arg, metric_arg, density = choices(sweep)
    if rows.empty:
        st.info("Choose at least one init and one method.")
        st.stop()
    fig = sweep_figure(rows, task=task_arg, y=y, density=density, metric=metric_arg, title=f"{y} vs lambda ({task})")
    show_figure(fig, f"sweep_{y}_{task}", "sw_fig")
    best_section(rows, y, task, task_arg, metric_arg, density)
    with st.expander("Full sweep (every task and grid point)"):
        show_table(rows, "sweep", "sw_full")


render()
