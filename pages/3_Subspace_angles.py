"""Principal angles between task data subspaces, and between adapters' row spaces and task
data: 90° means orthogonal (no interference), 0° means a shared direction."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from app_helpers import layer_selector, require_run, required_table, show_figure, show_table
from osrm_core.viz import angle_figure, angle_heatmap, angle_matrix, short_layer

MEAN = "mean over layers"
STATS = {"min_angle": "smallest principal angle", "mean_angle": "mean principal angle"}


def data_section(table: pd.DataFrame, stat: str, layer: str) -> None:
    where = MEAN if layer == MEAN else short_layer(layer)
    st.subheader("Task data vs task data")
    left, right = st.columns(2)
    with left:
        m = angle_matrix(table, None if layer == MEAN else layer, stat, "data-data")
        show_figure(angle_heatmap(m, title=f"Data subspaces, {where}", stat_label=STATS[stat]),
                    f"angles_data_{stat}_{where}", "ang_dd_heat")
    with right:
        show_figure(angle_figure(table, stat, "data-data", title="Data subspaces over layers"),
                    f"angles_data_{stat}_layers", "ang_dd_lines")


def adapter_section(table: pd.DataFrame, stat: str, layer: str) -> None:
    where = MEAN if layer == MEAN else short_layer(layer)
    st.subheader("Adapter row space vs task data, standard vs OSRM")
    inits = list(dict.fromkeys(table["init"])) if "init" in table.columns else [""]
    shown = st.multiselect("Inits side by side", inits, default=inits[:2], key="ang_inits")
    for col, init in zip(st.columns(max(len(shown), 1)), shown):
        rows = table[table["init"] == init] if init else table
        with col:
            m = angle_matrix(rows, None if layer == MEAN else layer, stat, "adapter-data")
            show_figure(angle_heatmap(m, title=f"{init}: adapter vs data, {where}", stat_label=STATS[stat]),
                        f"angles_adapter_{init}_{stat}_{where}", f"ang_ad_heat_{init}")
    c1, c2 = st.columns(2)
    cross = c1.checkbox("Only other tasks' data (adapter ≠ data) in the line chart", value=True, key="ang_cross")
    every = c2.checkbox("Every pair as its own line (else the mean per init with a band)", value=False,
                        key="ang_every_pair")
    rows = table[table["kind"] == "adapter-data"]
    if shown and "init" in rows.columns:
        rows = rows[rows["init"].isin(shown)]
    if cross:
        rows = rows[rows["a"] != rows["b"]]
    if not rows.empty:
        show_figure(angle_figure(rows, stat, "adapter-data", title="Adapter vs data over layers", aggregate=not every),
                    f"angles_adapter_{stat}_layers", "ang_ad_lines")


INTRO = (
    "Principal angles (`scipy.linalg.subspace_angles`) between **task data subspaces** (top-r "
    "eigenvectors of each task's `Σ`) and between each **adapter's row space** (SVD of `ΔW`) "
    "and each task's data subspace. An adapter whose row space is near 90° from another task's "
    "data hardly responds to that task's inputs."
)


def render() -> None:
    st.title("Subspace angles")
    run = require_run()
    table = required_table(run, "angles.csv", "angle table")
    st.markdown(INTRO)
    c1, c2 = st.columns(2)
    stat = c1.radio("Statistic", list(STATS), format_func=STATS.get, horizontal=True, key="ang_stat")
    layer = layer_selector(list(dict.fromkeys(table["layer"])), "ang_layer", label="Layer (heatmaps)", first=MEAN,
                           where=c2)
    kinds = set(table["kind"])
    if "data-data" in kinds:
        data_section(table, stat, layer)
    if "adapter-data" in kinds:
        adapter_section(table, stat, layer)
    with st.expander("Angle table"):
        show_table(table, "angles", "ang_table")


render()
