"""Diagnose adapters you already have: upload two or more PEFT LoRA adapters and a few texts
per task, see their interference and angles, project them post hoc onto OSRM subspaces, get
merge advice (method, lambda, per-adapter weights) and download the merged adapter."""

from __future__ import annotations

import streamlit as st

from app_helpers import adapter_zip, download, layer_selector, show_figure, show_table
from app_helpers.advice_view import SOURCES, advice_section, merge_form_section
from app_helpers.diagnosis_inputs import DiagnosisInputs, read_inputs
from osrm_core.adapters import union_layers
from osrm_core.diagnosis import Diagnosis
from osrm_core.viz import (
    INTERFERENCE_VALUES,
    SUM_OVER_LAYERS,
    angle_heatmap,
    angle_matrix,
    energy_kept_figure,
    interference_heatmap,
    interference_view,
    matrix_range,
    merged_spectrum_figure,
    short_layer,
)
from osrm_core.workflows import diagnose_adapters


def diagnose(inputs: DiagnosisInputs) -> Diagnosis:
    """The diagnosis of the inputs, computed once per change of them."""
    ss = st.session_state
    if ss.get("diag_result", {}).get("key") != inputs.key:
        with st.spinner("Interference, angles and post-hoc OSRM ..."):
            ss["diag_result"] = {"key": inputs.key,
                                 "diagnosis": diagnose_adapters(inputs.model, inputs.adapters, inputs.stats)}
    return ss["diag_result"]["diagnosis"]


def interference_section(diagnosis: Diagnosis, layers: list[str]) -> str:
    """The interference heatmaps as uploaded and after post-hoc OSRM; returns the chosen layer
    (or "sum over layers"), which the sections below follow."""
    st.subheader("Interference")
    c1, c2, c3 = st.columns([2, 2, 1])
    value = c1.selectbox("Value", ["input_norm", "relative_shift", "output_shift"], format_func=INTERFERENCE_VALUES.get,
                         key="diag_value")
    layer = layer_selector(layers, "diag_layer", first=SUM_OVER_LAYERS, where=c2)
    log = c3.checkbox("log colour scale", value=True, key="diag_log")
    table = diagnosis.interference
    where = _where(layer)
    label = {"input_norm": "‖A_j h_i‖", "relative_shift": "relative shift"}.get(value, value)
    views = {init: interference_view(table[table["init"] == init], value, layer) for init in SOURCES}
    zmin, zmax = matrix_range(views.values())
    for col, (init, m) in zip(st.columns(2), views.items()):
        with col:
            fig = interference_heatmap(m, title=f"{SOURCES[init]}: {label}, {where}", value_label=label, zmin=zmin,
                                       zmax=zmax, log=log)
            show_figure(fig, f"diagnosis_interference_{init}_{where}", f"diag_heat_{init}")
            show_table(m.reset_index(), f"diagnosis_interference_{init}_{where}", f"diag_heat_tab_{init}")
    return layer


def _where(layer: str) -> str:
    return "summed over layers" if layer == SUM_OVER_LAYERS else short_layer(layer)


def angles_section(diagnosis: Diagnosis, layer: str) -> None:
    st.subheader("Subspace angles")
    st.caption("Principal angles in degrees, at the layer chosen above (or the mean over layers); 90° is orthogonal.")
    angles = diagnosis.angles
    stat = st.radio("Statistic", ["min_angle", "mean_angle"], horizontal=True, key="diag_stat")
    layer_arg = None if layer == SUM_OVER_LAYERS else layer
    at = "mean over layers" if layer_arg is None else short_layer(layer)
    c1, c2, c3 = st.columns(3)
    with c1:
        show_figure(angle_heatmap(angle_matrix(angles, layer_arg, stat, "data-data"), title=f"Data vs data, {at}"),
                    f"diagnosis_angles_data_{at}", "diag_ang_dd")
    for col, init in zip((c2, c3), SOURCES):
        with col:
            m = angle_matrix(angles[angles["init"] == init], layer_arg, stat, "adapter-data")
            show_figure(angle_heatmap(m, title=f"Adapter vs data, {SOURCES[init]}"), f"diagnosis_angles_{init}_{at}",
                        f"diag_ang_{init}")
    with st.expander("Angle table"):
        show_table(angles, "diagnosis_angles", "diag_ang_table")


def posthoc_section(diagnosis: Diagnosis) -> None:
    st.subheader("Post-hoc OSRM projection")
    st.markdown(
        "Each adapter's `A` is replaced by its task's OSRM subspace (the r smallest eigenvectors of "
        "the other tasks' `Σ`) and `B = ΔW A⁺ / s`: `ΔW` is projected on that row space. The bars "
        "show `‖ΔW A⁺A‖ / ‖ΔW‖`, the share kept; a low share means the adapter needs directions the "
        "other tasks use, and fine-tuning again from the projection is advised."
    )
    kept = diagnosis.posthoc
    show_figure(energy_kept_figure(kept, title="Energy kept by the projection"), "posthoc_energy_kept", "diag_kept")
    show_table(kept, "posthoc_energy_kept", "diag_kept_table")
    cols = st.columns(min(len(diagnosis.names), 4))
    for i, n in enumerate(diagnosis.names):
        with cols[i % len(cols)]:
            download(f"Projected adapter {n} (zip)", lambda n=n: adapter_zip(diagnosis.projected[n], f"{n}_posthoc_osrm"),
                     f"{n}_posthoc_osrm", "zip", f"diag_proj_dl_{n}")


def verdicts_section(diagnosis: Diagnosis) -> None:
    st.subheader("Per-layer verdicts")
    st.caption(
        "Per block, ranked: how much the adapters shift the other tasks' outputs (exact, from the "
        "statistics), which adapter on which task dominates, and what post-hoc OSRM would remove at "
        "what cost in ΔW."
    )
    st.markdown("\n".join(diagnosis.notes()))
    with st.expander("Per-layer table"):
        show_table(diagnosis.verdicts, "layer_verdicts", "diag_verdicts_table")


def data_free_section(diagnosis: Diagnosis, layer: str) -> None:
    st.subheader("Data-free signals")
    st.caption(
        "From the adapters' weights alone, no texts. Left: the share of adapter j's ΔW on the input "
        "directions of adapter i's ΔW (its right singular vectors), the counterpart of the "
        "interference above. Right: the singular values of the task-arithmetic merge against all "
        "the parts' together: where the merged curve falls below, merging cancels directions "
        "(nuclear-norm retention below 1). Which signal predicts the measured merge loss is tested "
        "in the study report (question 6)."
    )
    summed = layer == SUM_OVER_LAYERS
    at = "mean over layers" if summed else _where(layer)
    c1, c2 = st.columns(2)
    with c1:
        fig = interference_heatmap(diagnosis.overlap(None if summed else layer), title=f"Singular-vector overlap, {at}",
                                   value_label="share of ΔW_j", zmin=0.0, zmax=1.0,
                                   x_title="input directions of adapter i", y_title="adapter j")
        show_figure(fig, f"diagnosis_sv_overlap_{at}", "diag_sv_overlap")
    with c2:
        show_figure(merged_spectrum_figure(diagnosis.spectra, None if summed else layer,
                                           title=f"Merged spectrum vs parts, {_where(layer)}"),
                    f"diagnosis_merged_spectrum_{_where(layer)}", "diag_merged_spectrum")
    with st.expander("Spectrum per layer"):
        show_table(diagnosis.spectrum, "merged_spectrum", "diag_spectrum_table")


def render() -> None:
    st.title("Adapter diagnosis")
    st.markdown(
        "Upload LoRA adapters trained on one base model, and a few sample texts of each adapter's "
        "task. The statistics of the texts give the exact interference `E‖A_j h_i‖²` of every "
        "adapter on every task, the principal angles, and the post-hoc OSRM projection "
        "`B = ΔW A⁺` onto each task's OSRM subspace with the share of `ΔW` it keeps. With labels, the "
        "merge advisor recommends a method, λ and a weight per adapter, and builds that merged adapter. "
        "Nothing you upload leaves your session."
    )
    inputs = read_inputs()
    diagnosis = diagnose(inputs)
    layer = interference_section(diagnosis, list(union_layers(inputs.adapters)))
    angles_section(diagnosis, layer)
    posthoc_section(diagnosis)
    verdicts_section(diagnosis)
    data_free_section(diagnosis, layer)
    advice_section(inputs)
    merge_form_section(inputs, diagnosis.projected)


render()
