"""Eigenspectra of each task's features at each adapted input: where the energy is, how many
directions it needs, and which directions OSRM gives an adapter."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from app_helpers import require_run, rest_spectrum, run_spectra, show_figure, show_table
from osrm_core.viz import (
    cumulative_energy_figure,
    effective_rank_heatmap,
    eigenspectrum_figure,
    zero_smallest,
)


def chosen_spectra(run) -> tuple[dict, str, int, dict]:
    """The widgets: moment, layer input, tasks, r and the other tasks' moment of one task; the
    spectra they pick (by name), the layer, r and the run's spectra."""
    c1, c2, c3 = st.columns([2, 2, 1])
    moment = c3.radio("Moment", ["second_moment", "covariance"], key="eig_moment",
                      format_func={"second_moment": "E[hhᵀ] (uncentred)", "covariance": "covariance (centred)"}.get)
    data = run_spectra(run, moment)
    tasks = list(data["eigenvalues"])
    layer = c1.selectbox("Layer input", [g[0] for g in data["groups"]], key="eig_layer",
                         help="Layers that read the same hidden states (query and value) share statistics")
    chosen = c2.multiselect("Tasks", tasks, default=tasks, key="eig_tasks")
    rank = st.slider("r (marked: the r smallest)", 1, 64, int(min(run.config().rank, 64)), key="eig_rank")
    osrm_for = st.selectbox("Also show the other tasks' combined moment that OSRM decomposes for task ...",
                            ["(none)", *tasks], key="eig_osrm_for")
    spectra = {t: data["eigenvalues"][t][layer] for t in chosen}
    if osrm_for != "(none)":
        spectra[f"others of {osrm_for}"] = rest_spectrum(run, osrm_for, moment)[layer]
    return spectra, layer, rank, data


def spectra_section(spectra: dict, layer: str, rank: int) -> None:
    zero = zero_smallest(spectra, rank)
    if zero:
        st.warning(
            "At numerical zero (below 1e-12 of the largest eigenvalue): "
            + ", ".join(f"{n} of the {rank} smallest of {name}" for name, n in zero.items())
            + ". No token of the sample has energy there (fewer tokens than dimensions, or rank-deficient "
            "features), so OSRM's choice among these directions is arbitrary; more samples for the statistics "
            "make it meaningful."
        )
    left, right = st.columns(2)
    with left:
        show_figure(eigenspectrum_figure(spectra, rank=rank, title=f"Eigenvalues at {layer}"),
                    f"eigenspectrum_{layer}", "eig_spec")
    with right:
        show_figure(cumulative_energy_figure(spectra, title=f"Cumulative energy at {layer}"),
                    f"cumulative_energy_{layer}", "eig_cum")


def effective_rank_section(data: dict) -> None:
    st.subheader("Effective rank, layer by task")
    st.caption("exp of the entropy of the normalized eigenvalues (Roy & Vetterli, 2007): the number of directions "
               "a task really uses.")
    eff = data["effective_rank"]
    show_figure(effective_rank_heatmap(eff, title="Effective rank"), "effective_rank", "eig_eff")
    show_table(eff, "effective_rank", "eig_eff_table")


def values_table(spectra: dict, layer: str) -> None:
    with st.expander("Eigenvalues of this layer (table)"):
        table = pd.DataFrame({name: values for name, values in spectra.items()})
        table.insert(0, "k", range(1, len(table) + 1))
        show_table(table, f"eigenvalues_{layer}", "eig_values")


def render() -> None:
    st.title("Eigenspectra")
    run = require_run()
    if not any((run.path / "stats").glob("*.safetensors")):
        st.info("This run has no feature statistics yet: run or resume it on the home page.")
        st.stop()
    st.markdown(
        "For task i at an adapted layer, `Σ_i = E[h hᵀ]` over the real tokens that enter the layer. "
        "A steep spectrum means the task uses few directions. OSRM gives task i's adapter the "
        "eigenvectors of the **r smallest** eigenvalues of the *other* tasks' combined moment."
    )
    spectra, layer, rank, data = chosen_spectra(run)
    if not spectra:
        st.info("Choose at least one task.")
        st.stop()
    spectra_section(spectra, layer, rank)
    effective_rank_section(data)
    values_table(spectra, layer)


render()
