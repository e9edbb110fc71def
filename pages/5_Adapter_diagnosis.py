"""Diagnose adapters you already have: upload two or more PEFT LoRA adapters and a few texts
per task, see their interference and angles, project them post hoc onto OSRM subspaces, get
merge advice (method, lambda, per-adapter weights) and download the merged adapter."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from app_helpers import (
    ProgressDisplay,
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
    text_column_picker,
    text_task,
    texts_feature_stats,
    uploads_signature,
)
from app_helpers.advice_view import form_values, show_advice, size_note, weights_text
from osrm_core.adapters import num_labels_of, union_layers
from osrm_core.advise import ADVISE_BUDGET, ADVISE_LAMBDAS, ADVISE_METHODS, advise, layer_notes
from osrm_core.data import MAX_DATA_BYTES, DataError, read_table
from osrm_core.demo import DEMO_TASKS, demo_task
from osrm_core.diagnostics import layer_verdicts
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
    merged_spectrum_figure,
    overlap_matrix,
    short_layer,
)
from osrm_core.workflows import (
    coverage_table,
    diagnose_adapters,
    is_causal_lm_set,
    load_base_for,
)

st.title("Adapter diagnosis")
st.markdown(
    "Upload LoRA adapters trained on one base model, and a few sample texts of each adapter's "
    "task. The statistics of the texts give the exact interference `E‖A_j h_i‖²` of every "
    "adapter on every task, the principal angles, and the post-hoc OSRM projection "
    "`B = ΔW A⁺` onto each task's OSRM subspace with the share of `ΔW` it keeps. With labels, the "
    "merge advisor recommends a method, λ and a weight per adapter, and builds that merged adapter. "
    "Nothing you upload leaves your session."
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


def span(values) -> str:
    low, high = min(values), max(values)
    return f"{low:g}" if low == high else f"{low:g}–{high:g}"


st.dataframe(
    [
        {
            "adapter": n,
            "rank": span([lw.rank for lw in a.layers.values()]),
            "layers": len(a.layers),
            "missing layers": coverage.loc[n, "missing"],
            "scale": span([round(lw.scale, 4) for lw in a.layers.values()]),
            "head classes": num_labels_of(a),
        }
        for n, a in adapters.items()
    ],
    hide_index=True,
)
if (coverage["missing"] != "").any():
    st.caption("The adapters cover different layers: the diagnosis and merges use the union, each adapter "
               "contributing where it has weights (zero elsewhere).")
with st.expander("Rank and scale of every layer"):
    show_table(
        pd.DataFrame(
            [
                {"adapter": n, "layer": layer, "rank": lw.rank, "scale": lw.scale}
                for n, a in adapters.items()
                for layer, lw in sorted(a.layers.items())
            ]
        ),
        "adapter_layers",
        "diag_layers_table",
    )

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
layers = tuple(union_layers(adapters))
collected, failed = {}, []
for tab, n in zip(st.tabs(names), names):
    with tab:
        csv = st.file_uploader(f"CSV of {n}", key=f"diag_csv_{n}", max_upload_size=MAX_DATA_BYTES >> 20)
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
            text_col = text_column_picker(df, csv.name, f"diag_text_col_{n}", where=c1)
            label_col = column_picker("Label column", cols, "label", f"diag_label_col_{n}", optional=True, where=c2)
            st.dataframe(df.head(5), hide_index=True)
            texts[n] = [] if text_col is None else df[text_col].astype(str).tolist()
            if label_col is not None:
                labels[n] = df[label_col].tolist()
        else:
            raw = st.text_area(f"Texts of {n}, one per line", key=f"diag_texts_{n}", height=150)
            texts[n] = [t for t in raw.splitlines() if t.strip()]
        st.caption(f"{len(texts[n])} texts" + (", labelled" if labels[n] is not None else ", no labels"))
        if len(texts[n]) >= 2:  # statistics as soon as a task's texts arrive: the last upload waits for one task
            try:
                collected[n] = texts_feature_stats(model_name, n, tuple(texts[n]), layers, int(max_length))
            except (DataError, ValueError) as err:
                st.error(f"{n}: {err}")
                failed.append(n)

missing = [n for n in names if len(texts.get(n, [])) < 2]
if missing:
    st.info(f"Give at least 2 sample texts for: {', '.join(missing)}.")
    st.stop()
if failed:
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

# --------------------------------------------------------------------------- per-layer verdicts

st.subheader("Per-layer verdicts")
st.caption(
    "Per block, ranked: how much the adapters shift the other tasks' outputs (exact, from the "
    "statistics), which adapter on which task dominates, and what post-hoc OSRM would remove at "
    "what cost in ΔW."
)
verdicts = layer_verdicts(result["interference"], result["posthoc"])
st.markdown("\n".join(f"{note}" for note in layer_notes(verdicts)))
with st.expander("Per-layer table"):
    show_table(verdicts, "layer_verdicts", "diag_verdicts_table")

# --------------------------------------------------------------------------- data-free signals

st.subheader("Data-free signals")
st.caption(
    "From the adapters' weights alone, no texts. Left: the share of adapter j's ΔW on the input "
    "directions of adapter i's ΔW (its right singular vectors), the counterpart of the "
    "interference above. Right: the singular values of the task-arithmetic merge against all "
    "the parts' together: where the merged curve falls below, merging cancels directions "
    "(nuclear-norm retention below 1). Which signal predicts the measured merge loss is tested "
    "in the study report (question 6)."
)
overlap = result["sv_interference"]
if layer != SUM_OVER_LAYERS:
    overlap = overlap[overlap["layer"] == layer]
c1, c2 = st.columns(2)
with c1:
    m = overlap_matrix(overlap, names)  # the order of the other matrices; the diagonal is blank
    at = "mean over layers" if layer == SUM_OVER_LAYERS else where
    show_figure(interference_heatmap(m, title=f"Singular-vector overlap, {at}", value_label="share of ΔW_j",
                                     zmin=0.0, zmax=1.0, x_title="input directions of adapter i",
                                     y_title="adapter j"),
                f"diagnosis_sv_overlap_{at}", "diag_sv_overlap")
with c2:
    show_figure(merged_spectrum_figure(result["spectra"], None if layer == SUM_OVER_LAYERS else layer,
                                       title=f"Merged spectrum vs parts, {where}"),
                f"diagnosis_merged_spectrum_{where}", "diag_merged_spectrum")
with st.expander("Spectrum per layer"):
    show_table(result["spectrum"], "merged_spectrum", "diag_spectrum_table")

# --------------------------------------------------------------------------- merge advice


def numbers(text: str, what: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise DataError(f"{what} {text!r}: give numbers separated by commas") from None


def prefill_merge_form(method: str, lam: float, weights: list[float], params: dict) -> None:
    """Put a recommended merge into the merge form below (its widgets are drawn later in this run)."""
    ss["diag_merge_source"] = "uploaded"
    ss["diag_merge_method"] = method
    ss["diag_merge_lambda"] = float(lam)
    ss["diag_merge_weights"] = weights_text(weights)
    for spec in MERGE_METHODS[method].param_specs():  # the widgets of merge_param_widgets
        if params.get(spec.name) is not None and not pd.isna(params[spec.name]):
            ss[f"diag_merge_{spec.name}"] = params[spec.name]


def advise_merge(methods: list[str], lambdas: list[float], budget: int) -> None:
    """The merge advisor on the sample texts (validation search, held-out report)."""
    tasks = [text_task(n, texts[n], None if causal else labels[n]) for n in names]
    display = ProgressDisplay("Searching for the best merge", 6)
    # the search writes merged weights in place: a private model
    search_model, _ = load_base_for(adapters, model_name) if causal else fresh_model(model_name)
    advice = advise(
        search_model, tokenizer, adapters, tasks, methods=methods, lambdas=lambdas, budget=budget,
        max_length=int(max_length), progress=display.progress, on_stage=display.on_stage,
    )
    display.finish(f"Advice ready: {advice.evaluations} evaluations in {advice.seconds:.1f} s")
    ss["diag_advice"] = {"key": key, "advice": advice}
    rec = advice.recommended
    lam, weights = form_values(rec)  # as the sentence says it: "lambda 1.3" is λ 1.3 with weights 1
    prefill_merge_form(rec["method"], lam, weights, {"density": rec["density"]})


st.subheader("Merge advice")
st.markdown(
    "The advisor splits each task's texts into a **validation** share, on which it searches the "
    "merge method, density, λ and then a weight per adapter, and a **held-out** share, on which "
    "it reports the finalists (the best λ of each method and density, and the weights found) with a "
    "95% interval. Absolute scores come first: a normalized "
    "score (merged / single) looks good when the single-task score is poor. The recommended "
    "settings fill the merge form below."
    + (" Causal-LM adapters: each task is scored by the mean token loss of its texts (lower is better)."
       if causal else "")
)
unlabelled = [] if causal else [n for n in names if labels.get(n) is None]
if unlabelled:
    st.caption(f"Advice needs labels for every task; without labels: {', '.join(unlabelled)}.")
c1, c2, c3 = st.columns(3)
methods = c1.multiselect(
    "Methods", list(MERGE_METHODS), default=list(ADVISE_METHODS), key="diag_methods"
)
grid = c2.text_input("Lambda grid", ", ".join(f"{x:g}" for x in ADVISE_LAMBDAS), key="diag_lambdas")
budget = c3.number_input(
    "Evaluations for per-adapter weights", 0, 500, ADVISE_BUDGET, step=2, key="diag_budget",
    help="Each evaluation scores every task's validation texts once",
)
if st.button("Get merge advice", key="diag_advise_button", type="primary"):
    try:
        lambdas = numbers(grid, "lambda grid")
        if unlabelled:
            raise DataError(
                f"task {unlabelled[0]!r} has no labels: upload a CSV with a label column for every task"
            )
        if not methods:
            raise DataError("choose at least one merge method")
        advise_merge(methods, lambdas, int(budget))
    except (DataError, ValueError) as err:
        st.error(str(err))
advised = ss.get("diag_advice")
if advised is not None and advised["key"] == key:
    show_advice(advised["advice"])

# --------------------------------------------------------------------------- merged adapter

st.subheader("Build a merged adapter")
st.caption(
    "One PEFT LoRA adapter with the merged ΔW of every layer (exact: the rank it needs); each "
    "task's head is written under heads/. Loads with plain `PeftModel.from_pretrained` on the base model. "
    "Adapter i enters the merge as w_i ΔW_i and λ scales the result."
)
ss.setdefault("diag_merge_lambda", 1.0)
ss.setdefault("diag_merge_weights", weights_text([1] * len(names)))
c1, c2, c3, c4 = st.columns(4)
source = c1.radio("Adapters", ["uploaded", "posthoc_osrm"], format_func=titles.get, key="diag_merge_source")
method = c2.selectbox("Method", list(MERGE_METHODS), key="diag_merge_method")
lam = c3.number_input("λ", 0.01, 10.0, step=0.05, key="diag_merge_lambda")
weights_text = c4.text_input(f"Weights ({', '.join(names)})", key="diag_merge_weights")
params = merge_param_widgets(method, "diag_merge")
truncate = st.number_input("Truncate to rank (0: exact, the rank the merge needs)", 0, 4096, 0, step=8,
                           key="diag_merge_rank") or None
note, warn = size_note(adapters, method, truncate)
(st.warning if warn else st.caption)(note)
if st.button("Build the merged adapter", key="diag_merge_button"):
    chosen = adapters if source == "uploaded" else result["projected"]
    name = f"merged_{method}_{source}"
    try:
        weights = numbers(weights_text, "weights")
        ss["diag_merged"] = {"key": key, "name": name, "zip": merged_adapter_zip(
            chosen, name, method, lam=float(lam), weights=weights, stats=stats, rank=truncate, **params)}
    except ValueError as err:
        st.error(str(err))
built = ss.get("diag_merged")
if built is not None and built["key"] == key:
    download("Download merged adapter (zip)", lambda: built["zip"], built["name"], "zip", "diag_merged_dl")
