"""Interference after merging: how much each adapter j responds to task i's features, exactly
from the statistics (no data run again), standard vs OSRM side by side."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from app_helpers import (
    drift_table,
    layer_selector,
    rank_caveat,
    require_run,
    required_table,
    result_table,
    show_figure,
    show_table,
)
from osrm_core.viz import (
    INTERFERENCE_VALUES,
    SUM_OVER_LAYERS,
    drift_figure,
    interference_heatmap,
    interference_view,
    matrix_range,
    off_diagonal_sum,
    own_energy_figure,
    short_layer,
)


def heatmaps_section(run, table: pd.DataFrame) -> None:
    """Value, layer and inits; one heatmap per init on one colour scale, and each against standard."""
    inits = list(dict.fromkeys(table["init"]))
    c1, c2, c3 = st.columns([2, 2, 1])
    value = c1.selectbox("Value", list(INTERFERENCE_VALUES), format_func=INTERFERENCE_VALUES.get, key="int_value")
    layer = layer_selector(list(dict.fromkeys(table["layer"])), "int_layer", first=SUM_OVER_LAYERS, where=c2)
    log = c3.checkbox("log colour scale", value=True, key="int_log")
    shown = st.multiselect("Inits side by side", inits, default=inits[:2], key="int_inits")
    matrices = {init: interference_view(table[table["init"] == init], value, layer) for init in shown}
    zmin, zmax = matrix_range(matrices.values()) if matrices else (None, None)
    label = {"input_norm": "‖A_j h_i‖", "relative_shift": "relative shift"}.get(value, value)
    where = "summed over layers" if layer == SUM_OVER_LAYERS else short_layer(layer)
    for col, (init, m) in zip(st.columns(max(len(shown), 1)), matrices.items()):
        with col:
            fig = interference_heatmap(m, title=f"{init}: {label}, {where}", value_label=label, zmin=zmin, zmax=zmax,
                                       log=log)
            show_figure(fig, f"interference_{init}_{value}_{where}", f"int_heat_{init}")
            show_table(m.reset_index(), f"interference_{init}_{value}_{where}", f"int_tab_{init}")
    caveat = rank_caveat(run.config(), list(matrices))
    if caveat:
        st.caption(f"Note: {caveat}")
    compared = [i for i in matrices if i != "standard"] if "standard" in matrices else []
    for col, init in zip(st.columns(max(len(compared), 1)), compared):
        ratio = off_diagonal_sum(matrices[init]) / max(off_diagonal_sum(matrices["standard"]), 1e-300)
        col.metric(f"Off-diagonal interference, {init} / standard", f"{ratio:.3g}",
                   help=f"{label} summed over the off-diagonal cells ({where})")


def own_energy_section(run) -> None:
    st.subheader("Own-task energy")
    st.markdown(
        "The price of OSRM: the share of a task's **own** feature energy that its adapter's row space "
        "sees, relative to a random subspace of the same rank (1 = random). OSRM picks directions the "
        "other tasks barely use, which can be low-energy for the task itself too."
    )
    own = result_table(run, "own_energy.csv")
    if own is None or own.empty:
        st.info("No results/own_energy.csv in this run.")
        return
    inits = list(dict.fromkeys(own["init"]))
    own_shown = own[own["init"].isin(st.multiselect("Inits", inits, default=inits, key="int_own_inits"))]
    if own_shown.empty:
        st.info("Choose at least one init.")
        return
    show_figure(own_energy_figure(own_shown, title="Own-task energy share / random"), "own_energy", "int_own")
    show_table(own_shown, "own_energy", "int_own_table")


def drift_section(run) -> None:
    st.subheader("During fine-tuning")
    st.markdown(
        "Each adapter's exact energy on every task's inputs as it trains, from the stored statistics "
        "(recorded every few steps): its own task (solid) against the others' (dotted). An adapter "
        "whose dotted curves rise is drifting into the other tasks' subspace."
    )
    drift = drift_table(run)
    if drift is None:
        st.info("No adapters/<init>/<task>/drift.csv in this run (runs made before this was recorded).")
        return
    c1, c2 = st.columns(2)
    drift_init = c1.selectbox("Init", list(dict.fromkeys(drift["init"])), key="int_drift_init")
    drift_value = c2.radio(
        "Value", ["input_energy", "output_shift"], horizontal=True, key="int_drift_value",
        format_func={"input_energy": "input energy tr(A S Aᵀ)", "output_shift": "output shift tr(ΔW S ΔWᵀ)"}.get)
    shown = drift[drift["init"] == drift_init]
    drift_caveat = rank_caveat(run.config(), list(dict.fromkeys(drift["init"])))
    if drift_caveat:
        st.caption(f"Comparing inits here: {drift_caveat}")
    show_figure(drift_figure(shown, y=drift_value, title=f"Energy on each task's inputs during fine-tuning ({drift_init})"),
                f"drift_{drift_init}", "int_drift")
    show_table(shown, f"drift_{drift_init}", "int_drift_table")


INTRO = (
    "After merging, task i's inputs `h_i` also pass through every other adapter: the unwanted "
    "shift at a layer is `Σ_{j≠i} s_j B_j A_j h_i`. From the statistics, exactly: "
    "`E‖A_j h_i‖² = tr(A_j Σ_i A_jᵀ)`. Rows are adapters, columns the data they act on; the "
    "outlined diagonal is each adapter on its own task (wanted), everything else is interference."
)


def render() -> None:
    st.title("Interference")
    run = require_run()
    table = required_table(run, "interference.csv", "interference table")
    st.markdown(INTRO)
    heatmaps_section(run, table)
    own_energy_section(run)
    drift_section(run)
    with st.expander("Full interference table"):
        show_table(table, "interference", "int_full")


render()
