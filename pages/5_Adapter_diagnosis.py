"""Diagnose adapters you already have: upload two or more PEFT LoRA adapters and a few texts
per task, see their interference and angles, project them post hoc onto OSRM subspaces, get a
suggested merge, and download the merged adapter."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from app_helpers import (
    adapter_zip,
    base_model,
    column_picker,
    current_run,
    download,
    fresh_model,
    layer_selector,
    merge_param_widgets,
    merged_adapter_zip,
    read_hub_adapters,
    read_uploaded_adapters,
    shared_mode,
    show_figure,
    show_table,
    text_task,
    texts_feature_stats,
    uploads_signature,
)
from osrm_core.adapters import num_labels_of, union_layers
from osrm_core.data import DataError, read_table
from osrm_core.demo import DEMO_TASKS, demo_task
from osrm_core.merge import MERGE_METHODS
from osrm_core.settings import ConfigError
from osrm_core.viz import (
    INTERFERENCE_VALUES,
    SUM_OVER_LAYERS,
    angle_heatmap,
    angle_matrix,
    energy_kept_figure,
    interference_heatmap,
    interference_view,
    matrix_range,
    metric_label,
    short_layer,
    sweep_best,
    sweep_curves,
    sweep_figure,
)
from osrm_core.workflows import (
    adapter_rank,
    coverage_table,
    diagnose_adapters,
    is_causal_lm_set,
    load_base_for,
    sweep_adapters,
)

st.title("Adapter diagnosis")
st.markdown(
    "Upload LoRA adapters trained on one base model, and a few sample texts of each adapter's "
    "task. The statistics of the texts give the exact interference `E‖A_j h_i‖²` of every "
    "adapter on every task, the principal angles, and the post-hoc OSRM projection "
    "`B = ΔW A⁺` onto each task's OSRM subspace with the share of `ΔW` it keeps. With labels, a "
    "quick sweep suggests a merge method and λ. Nothing you upload leaves your session."
)
ss = st.session_state

# --------------------------------------------------------------------------- base model and adapters

run = current_run()
default_model = ""
if run is not None:
    try:
        default_model = run.config().model or ""
    except ConfigError:
        pass
if shared_mode():
    # No model from a typed id or server path in a shared deployment: the packaged one only.
    model_name = None
    st.caption("Base model: the packaged all-MiniLM-L6-v2 (shared mode).")
else:
    model_name = (
        st.text_input(
            "Base model (Hugging Face id or folder; empty: the packaged all-MiniLM-L6-v2)",
            value=default_model,
            key="diag_model",
        ).strip()
        or None
    )
try:
    model, tokenizer = base_model(model_name)
except ValueError as err:
    st.error(str(err))
    st.stop()

files = st.file_uploader(
    "Adapters: a .zip of each PEFT adapter folder, or adapter_config.json + adapter_model.safetensors of one",
    accept_multiple_files=True,
    key="diag_files",
)
files = files or []
loose_name = "adapter"
if any(f.name.lower() in ("adapter_config.json", "adapter_model.safetensors") for f in files):
    loose_name = st.text_input(
        "Task name of the adapter given as two files", "adapter", key="diag_loose_name"
    )
hub_lines = ""
if not shared_mode():  # a shared deployment fetches nothing on a visitor's behalf
    hub_lines = st.text_area(
        "Adapters on the Hugging Face Hub: NAME=hf:OWNER/REPO or NAME=hf:OWNER/REPO@REVISION, one per line "
        "(adapter_config.json and safetensors only)",
        key="diag_hub",
        height=70,
    )
signature = uploads_signature(files, model_name or "", loose_name) + hub_lines
if ss.get("diag_read", {}).get("signature") != signature:
    adapters, errors = read_uploaded_adapters(files, model, loose_name)
    hub_adapters, hub_errors = read_hub_adapters(hub_lines, model)
    adapters, errors = {**adapters, **hub_adapters}, errors + hub_errors
    ss["diag_read"] = {"signature": signature, "adapters": adapters, "errors": errors}
adapters, errors = ss["diag_read"]["adapters"], ss["diag_read"]["errors"]
for message in errors:
    st.error(message)
if len(adapters) < 2:
    st.info("Upload two or more LoRA adapters for the base model above to diagnose them.")
    st.stop()
names = list(adapters)
try:
    causal = is_causal_lm_set(adapters)  # a causal LM scores each task by the token loss of its texts
except ValueError as err:
    st.error(str(err))
    st.stop()
coverage = coverage_table(adapters).set_index("adapter")
st.dataframe(
    [
        {
            "adapter": n,
            "rank": adapter_rank(a),
            "layers": len(a.layers),
            "missing layers": coverage.loc[n, "missing"],
            "scale": next(iter(a.layers.values())).scale,
            "head classes": num_labels_of(a),
        }
        for n, a in adapters.items()
    ],
    hide_index=True,
)
if (coverage["missing"] != "").any():
    st.caption("The adapters cover different layers: the diagnosis and merges use the union, each adapter "
               "contributing where it has weights (zero elsewhere).")

# --------------------------------------------------------------------------- sample texts


def fill_demo_texts() -> None:
    keys = list(DEMO_TASKS)
    for i, n in enumerate(names):
        key = n if n in DEMO_TASKS else keys[i % len(keys)]
        ss[f"diag_texts_{n}"] = "\n".join(demo_task(key, n_train=24, n_test=10).train.text)


st.subheader("Sample texts per task")
st.caption(
    "Paste texts, one per line, or upload a CSV with a text column and optionally a label "
    "column (labels 0..K-1 in the order of the adapter's head, or names, mapped in sorted "
    "order). A few dozen texts per task are enough for the statistics."
)
st.button(
    "Fill in demo texts",
    key="diag_fill_demo",
    on_click=fill_demo_texts,
    help="Texts of the built-in demo tasks (matched by name, else in turn)",
)
max_length = st.number_input("Max tokens per text", 8, 2048, 64, step=8, key="diag_max_length")
texts: dict[str, list[str]] = {}
labels: dict[str, list | None] = {}
for tab, n in zip(st.tabs(names), names):
    with tab:
        csv = st.file_uploader(f"CSV of {n}", key=f"diag_csv_{n}")
        labels[n] = None
        if csv is not None:
            try:
                df = read_table(csv.getvalue(), fmt="csv")
            except DataError as err:
                st.error(f"{csv.name}: {err}")
                texts[n] = []
                continue
            cols = [str(c) for c in df.columns]
            c1, c2 = st.columns(2)
            text_col = column_picker("Text column", cols, "text", f"diag_text_col_{n}", where=c1)
            label_col = column_picker("Label column", cols, "label", f"diag_label_col_{n}", optional=True, where=c2)
            st.dataframe(df.head(5), hide_index=True)
            texts[n] = df[text_col].astype(str).tolist()
            if label_col is not None:
                labels[n] = df[label_col].tolist()
        else:
            raw = st.text_area(f"Texts of {n}, one per line", key=f"diag_texts_{n}", height=150)
            texts[n] = [t for t in raw.splitlines() if t.strip()]
        st.caption(f"{len(texts[n])} texts" + (", labelled" if labels[n] is not None else ", no labels"))

missing = [n for n in names if len(texts.get(n, [])) < 2]
if missing:
    st.info(f"Give at least 2 sample texts for: {', '.join(missing)}.")
    st.stop()

layers = tuple(union_layers(adapters))
try:
    collected = {
        n: texts_feature_stats(model_name, n, tuple(texts[n]), layers, int(max_length)) for n in names
    }
except (DataError, ValueError) as err:
    st.error(str(err))
    st.stop()
stats = {n: c[0] for n, c in collected.items()}
for _, notes in collected.values():
    for note in notes:
        st.caption(
            f"Note: {note}. The numbers below are exact for these tokens; more texts make them representative."
        )
key = signature + str(hash((int(max_length), *(tuple(texts[n]) for n in names))))
if ss.get("diag_result", {}).get("key") != key:
    with st.spinner("Interference, angles and post-hoc OSRM ..."):
        ss["diag_result"] = {"key": key, **diagnose_adapters(model, adapters, stats)}
result = ss["diag_result"]

# --------------------------------------------------------------------------- interference

st.subheader("Interference")
c1, c2, c3 = st.columns([2, 2, 1])
value = c1.selectbox(
    "Value",
    ["input_norm", "relative_shift", "output_shift"],
    format_func=INTERFERENCE_VALUES.get,
    key="diag_value",
)
layer = layer_selector(list(layers), "diag_layer", first=SUM_OVER_LAYERS, where=c2)
log = c3.checkbox("log colour scale", value=True, key="diag_log")
table = result["interference"]
where = "summed over layers" if layer == SUM_OVER_LAYERS else short_layer(layer)
label = {"input_norm": "‖A_j h_i‖", "relative_shift": "relative shift"}.get(value, value)
views = {
    init: interference_view(table[table["init"] == init], value, layer)
    for init in ("uploaded", "posthoc_osrm")
}
zmin, zmax = matrix_range(views.values())
titles = {"uploaded": "as uploaded", "posthoc_osrm": "after post-hoc OSRM"}
for col, (init, m) in zip(st.columns(2), views.items()):
    with col:
        fig = interference_heatmap(
            m, title=f"{titles[init]}: {label}, {where}", value_label=label, zmin=zmin, zmax=zmax, log=log
        )
        show_figure(fig, f"diagnosis_interference_{init}_{where}", f"diag_heat_{init}")
        show_table(m.reset_index(), f"diagnosis_interference_{init}_{where}", f"diag_heat_tab_{init}")

# --------------------------------------------------------------------------- angles

st.subheader("Subspace angles")
st.caption(
    "Principal angles in degrees, at the layer chosen above (or the mean over layers); 90° is orthogonal."
)
angles = result["angles"]
stat = st.radio("Statistic", ["min_angle", "mean_angle"], horizontal=True, key="diag_stat")
layer_arg = None if layer == SUM_OVER_LAYERS else layer
angles_at = "mean over layers" if layer_arg is None else short_layer(layer)
c1, c2, c3 = st.columns(3)
with c1:
    m = angle_matrix(angles, layer_arg, stat, "data-data")
    show_figure(
        angle_heatmap(m, title=f"Data vs data, {angles_at}"),
        f"diagnosis_angles_data_{angles_at}",
        "diag_ang_dd",
    )
for col, init in zip((c2, c3), ("uploaded", "posthoc_osrm")):
    with col:
        m = angle_matrix(angles[angles["init"] == init], layer_arg, stat, "adapter-data")
        show_figure(
            angle_heatmap(m, title=f"Adapter vs data, {titles[init]}"),
            f"diagnosis_angles_{init}_{angles_at}",
            f"diag_ang_{init}",
        )
with st.expander("Angle table"):
    show_table(angles, "diagnosis_angles", "diag_ang_table")

# --------------------------------------------------------------------------- post-hoc OSRM

st.subheader("Post-hoc OSRM projection")
st.markdown(
    "Each adapter's `A` is replaced by its task's OSRM subspace (the r smallest eigenvectors of "
    "the other tasks' `Σ`) and `B = ΔW A⁺ / s`: `ΔW` is projected on that row space. The bars "
    "show `‖ΔW A⁺A‖ / ‖ΔW‖`, the share kept; a low share means the adapter needs directions the "
    "other tasks use, and fine-tuning again from the projection is advised."
)
kept = result["posthoc"]
show_figure(
    energy_kept_figure(kept, title="Energy kept by the projection"), "posthoc_energy_kept", "diag_kept"
)
show_table(kept, "posthoc_energy_kept", "diag_kept_table")
cols = st.columns(min(len(names), 4))
for i, n in enumerate(names):
    with cols[i % len(cols)]:
        download(f"Projected adapter {n} (zip)", lambda n=n: adapter_zip(result["projected"][n], f"{n}_posthoc_osrm"),
                 f"{n}_posthoc_osrm", "zip", f"diag_proj_dl_{n}")

# --------------------------------------------------------------------------- suggested merge


def prefill_merge_form(best: pd.Series) -> None:
    """Put the suggested merge (a row of the sweep's best points) into the merge form below."""
    ss["diag_merge_source"] = best["init"]
    ss["diag_merge_method"] = best["method"]
    ss["diag_merge_lambda"] = float(best["lambda"])
    for spec in MERGE_METHODS[best["method"]].param_specs():  # the widgets of merge_param_widgets
        if spec.name in best and pd.notna(best[spec.name]):
            ss[f"diag_merge_{spec.name}"] = best[spec.name]


ss.setdefault("diag_merge_lambda", 1.0)

st.subheader("Suggested merge")
unlabelled = [] if causal else [n for n in names if labels.get(n) is None]
if unlabelled:
    st.caption(f"A sweep needs labels for every task; without labels: {', '.join(unlabelled)}.")
elif causal:
    st.caption("Causal-LM adapters: each task is scored by the mean token loss of its texts (lower is better).")
c1, c2, c3 = st.columns(3)
methods = c1.multiselect(
    "Methods", list(MERGE_METHODS), default=["task_arithmetic", "ties"], key="diag_methods"
)
grid = c2.text_input("Lambda grid", "0.2, 0.4, 0.6, 0.8, 1.0", key="diag_lambdas")
both = c3.checkbox("Also sweep the post-hoc OSRM adapters", value=True, key="diag_sweep_both")
if st.button("Run a quick sweep", key="diag_sweep_button"):
    try:
        lambdas = [float(x) for x in grid.split(",") if x.strip()]
        if unlabelled:
            raise DataError(
                f"task {unlabelled[0]!r} has no labels: upload a CSV with a label column for every task to sweep"
            )
        if not methods:
            raise DataError("choose at least one merge method")
        tasks = []
        for n in names:
            task = text_task(n, texts[n], None if causal else labels[n])
            classes = num_labels_of(adapters[n])
            if classes is not None and task.num_labels > classes:
                raise DataError(
                    f"task {n!r}: labels 0..{task.num_labels - 1} but the adapter's head has {classes} classes"
                )
            tasks.append(task)
        sets = {"uploaded": adapters}
        if both:
            sets["posthoc_osrm"] = result["projected"]
        with st.spinner("Sweeping ..."):
            sweep_model, _ = load_base_for(adapters, model_name) if causal else fresh_model(model_name)
            df = pd.concat(
                [
                    sweep_adapters(sweep_model, tokenizer, chosen, tasks, methods=methods, lambdas=lambdas,
                                   stats=stats, max_length=int(max_length)).assign(init=label)
                    for label, chosen in sets.items()
                ],
                ignore_index=True,
            )
        lower = metric_label(df)[1]
        best = sweep_best(sweep_curves(df), lower_is_better=lower).sort_values("normalized", ascending=lower)
        ss["diag_sweep"] = {"key": key, "df": df, "best": best}
        prefill_merge_form(best.iloc[0])
    except (DataError, ValueError) as err:
        st.error(str(err))
sweep = ss.get("diag_sweep")
if sweep is not None and sweep["key"] == key:
    df = sweep["df"]
    show_figure(
        sweep_figure(df, title="Quick sweep on the sample texts"), "diagnosis_sweep", "diag_sweep_fig"
    )
    best = sweep["best"]
    show_table(best, "diagnosis_sweep_best", "diag_sweep_best")
    top = best.iloc[0]
    density = "" if pd.isna(top.get("density")) else f", density {top['density']:g}"
    st.success(
        f"Suggested: **{top['method']}** with λ = {top['lambda']:g}{density} on the {top['init']} adapters "
        f"(normalized score {top['normalized']:.3f} on the sample texts)."
    )

# --------------------------------------------------------------------------- merged adapter

st.subheader("Download a merged adapter")
st.caption(
    "One PEFT LoRA adapter with the merged ΔW of every layer (exact: the rank it needs); each "
    "task's head is written under heads/. Loads with plain `PeftModel.from_pretrained` on the base model."
)
c1, c2, c3 = st.columns(3)
source = c1.radio("Adapters", ["uploaded", "posthoc_osrm"], format_func=titles.get, key="diag_merge_source")
method = c2.selectbox("Method", list(MERGE_METHODS), key="diag_merge_method")
lam = c3.number_input("λ", 0.01, 10.0, step=0.05, key="diag_merge_lambda")
params = merge_param_widgets(method, "diag_merge")
if st.button("Build the merged adapter", key="diag_merge_button"):
    chosen = adapters if source == "uploaded" else result["projected"]
    name = f"merged_{method}_{source}"
    try:
        ss["diag_merged"] = {"key": key, "name": name,
                             "zip": merged_adapter_zip(chosen, name, method, lam=float(lam), stats=stats, **params)}
    except ValueError as err:
        st.error(str(err))
built = ss.get("diag_merged")
if built is not None and built["key"] == key:
    download("Download merged adapter (zip)", lambda: built["zip"], built["name"], "zip", "diag_merged_dl")
