"""The Adapter diagnosis page's inputs: the base model, the uploaded adapters (files and Hub
names) with their table, and each task's sample texts (pasted or a CSV, with labels) and
their feature statistics. Each step stops the page with a note until its input is there."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import streamlit as st

from osrm_core.adapters import Adapter, num_labels_of, union_layers
from osrm_core.data import MAX_DATA_BYTES, DataError, read_table
from osrm_core.demo import DEMO_TASKS, demo_task
from osrm_core.settings import ConfigError
from osrm_core.stats import FeatureStats
from osrm_core.workflows import coverage_table, is_causal_lm_set

from .loaders import base_model, texts_feature_stats
from .state import current_run, shared_mode
from .uploads import read_hub_adapters, read_uploaded_adapters, uploads_signature
from .widgets import column_picker, show_table, text_column_picker


@dataclass
class DiagnosisInputs:
    """What the page diagnoses: the model, the adapters, each task's texts (and labels) and
    their statistics; ``key`` changes whenever one of them does."""

    model_name: str | None
    model: object
    tokenizer: object
    adapters: dict[str, Adapter]
    causal: bool
    texts: dict[str, list[str]]
    labels: dict[str, list | None]
    stats: dict[str, FeatureStats]
    max_length: int
    key: str

    @property
    def names(self) -> list[str]:
        return list(self.adapters)


def choose_model():
    """The base model (the open run's by default; the packaged one in shared mode): name, model, tokenizer."""
    if shared_mode():  # no model from a typed id or server path in a shared deployment
        st.caption("Base model: the packaged all-MiniLM-L6-v2 (shared mode).")
        model_name = None
    else:
        run, default = current_run(), ""
        if run is not None:
            try:
                default = run.config().model or ""
            except ConfigError:
                pass
        model_name = st.text_input("Base model (Hugging Face id or folder; empty: the packaged all-MiniLM-L6-v2)",
                                   value=default, key="diag_model").strip() or None
    try:
        return (model_name, *base_model(model_name))
    except ValueError as err:
        st.error(str(err))
        st.stop()


def read_adapters(model, model_name: str | None) -> tuple[dict[str, Adapter], str]:
    """The uploaded adapters (zips, loose files, Hub names) read once per upload, and their signature."""
    ss = st.session_state
    files = st.file_uploader(
        "Adapters: a .zip of each PEFT adapter folder, or adapter_config.json + adapter_model.safetensors of one",
        accept_multiple_files=True, key="diag_files") or []
    loose_name = "adapter"
    if any(f.name.lower() in ("adapter_config.json", "adapter_model.safetensors") for f in files):
        loose_name = st.text_input("Task name of the adapter given as two files", "adapter", key="diag_loose_name")
    hub_lines = ""
    if not shared_mode():  # a shared deployment fetches nothing on a visitor's behalf
        hub_lines = st.text_area(
            "Adapters on the Hugging Face Hub: NAME=hf:OWNER/REPO or NAME=hf:OWNER/REPO@REVISION, one per line "
            "(adapter_config.json and safetensors only)", key="diag_hub", height=70)
    signature = uploads_signature(files, model_name or "", loose_name) + hub_lines
    if ss.get("diag_read", {}).get("signature") != signature:
        adapters, errors = read_uploaded_adapters(files, model, loose_name)
        hub_adapters, hub_errors = read_hub_adapters(hub_lines, model)
        ss["diag_read"] = {"signature": signature, "adapters": {**adapters, **hub_adapters},
                           "errors": errors + hub_errors}
    for message in ss["diag_read"]["errors"]:
        st.error(message)
    return ss["diag_read"]["adapters"], signature


def _span(values) -> str:
    low, high = min(values), max(values)
    return f"{low:g}" if low == high else f"{low:g}–{high:g}"


def adapter_table(adapters: dict[str, Adapter]) -> None:
    """Rank, layers, coverage, scale and head of each adapter, and every layer's rank and scale."""
    coverage = coverage_table(adapters).set_index("adapter")
    st.dataframe([{"adapter": n, "rank": _span([lw.rank for lw in a.layers.values()]), "layers": len(a.layers),
                   "missing layers": coverage.loc[n, "missing"],
                   "scale": _span([round(lw.scale, 4) for lw in a.layers.values()]), "head classes": num_labels_of(a)}
                  for n, a in adapters.items()], hide_index=True)
    if (coverage["missing"] != "").any():
        st.caption("The adapters cover different layers: the diagnosis and merges use the union, each adapter "
                   "contributing where it has weights (zero elsewhere).")
    with st.expander("Rank and scale of every layer"):
        rows = [{"adapter": n, "layer": layer, "rank": lw.rank, "scale": lw.scale}
                for n, a in adapters.items() for layer, lw in sorted(a.layers.items())]
        show_table(pd.DataFrame(rows), "adapter_layers", "diag_layers_table")


def _fill_demo_texts(names: list[str]) -> None:
    keys = list(DEMO_TASKS)
    for i, n in enumerate(names):
        key = n if n in DEMO_TASKS else keys[i % len(keys)]
        st.session_state[f"diag_texts_{n}"] = "\n".join(demo_task(key, n_train=24, n_test=10).train.text)


def _task_texts(n: str) -> tuple[list[str], list | None]:
    """One task's tab: a CSV (text and optional label column) or pasted texts, one per line."""
    csv = st.file_uploader(f"CSV of {n}", key=f"diag_csv_{n}", max_upload_size=MAX_DATA_BYTES >> 20)
    if csv is None:
        raw = st.text_area(f"Texts of {n}, one per line", key=f"diag_texts_{n}", height=150)
        return [t for t in raw.splitlines() if t.strip()], None
    try:
        df = read_table(csv.getvalue(), fmt="csv")
    except DataError as err:
        st.error(f"{csv.name}: {err}")
        return [], None
    c1, c2 = st.columns(2)
    text_col = text_column_picker(df, csv.name, f"diag_text_col_{n}", where=c1)
    label_col = column_picker("Label column", [str(c) for c in df.columns], "label", f"diag_label_col_{n}",
                              optional=True, where=c2)
    st.dataframe(df.head(5), hide_index=True)
    texts = [] if text_col is None else df[text_col].astype(str).tolist()
    return texts, None if label_col is None else df[label_col].tolist()


def sample_texts(model_name: str | None, adapters: dict[str, Adapter]):
    """Each task's texts and labels, and their statistics at the adapters' layers (as soon as a
    task has two texts); stops the page until every task has them."""
    names = list(adapters)
    st.subheader("Sample texts per task")
    st.caption(
        "Paste texts, one per line, or upload a CSV with a text column and optionally a label "
        "column (labels 0..K-1 in the order of the adapter's head, or names, mapped in sorted "
        "order). A few dozen texts per task are enough for the statistics."
    )
    st.button("Fill in demo texts", key="diag_fill_demo", on_click=_fill_demo_texts, args=(names,),
              help="Texts of the built-in demo tasks (matched by name, else in turn)")
    max_length = int(st.number_input("Max tokens per text", 8, 2048, 64, step=8, key="diag_max_length"))
    layers = tuple(union_layers(adapters))
    texts, labels, collected, failed = {}, {}, {}, []
    for tab, n in zip(st.tabs(names), names):
        with tab:
            texts[n], labels[n] = _task_texts(n)
            st.caption(f"{len(texts[n])} texts" + (", labelled" if labels[n] is not None else ", no labels"))
            if len(texts[n]) >= 2:  # statistics as soon as a task's texts arrive: the last upload waits for one
                try:
                    collected[n] = texts_feature_stats(model_name, n, tuple(texts[n]), layers, max_length)
                except (DataError, ValueError) as err:
                    st.error(f"{n}: {err}")
                    failed.append(n)
    missing = [n for n in names if len(texts[n]) < 2]
    if missing:
        st.info(f"Give at least 2 sample texts for: {', '.join(missing)}.")
        st.stop()
    if failed:
        st.stop()
    for _, notes in collected.values():
        for note in notes:
            st.caption(f"Note: {note}. The numbers below are exact for these tokens; more texts make them "
                       "representative.")
    return texts, labels, {n: c[0] for n, c in collected.items()}, max_length


def read_inputs() -> DiagnosisInputs:
    """Model, adapters (two or more, of one kind), texts and statistics; stops the page until they are there."""
    model_name, model, tokenizer = choose_model()
    adapters, signature = read_adapters(model, model_name)
    if len(adapters) < 2:
        st.info("Upload two or more LoRA adapters for the base model above to diagnose them.")
        st.stop()
    try:
        causal = is_causal_lm_set(adapters)  # a causal LM scores each task by the token loss of its texts
    except ValueError as err:
        st.error(str(err))
        st.stop()
    adapter_table(adapters)
    texts, labels, stats, max_length = sample_texts(model_name, adapters)
    key = signature + str(hash((max_length, *(tuple(texts[n]) for n in adapters))))
    return DiagnosisInputs(model_name, model, tokenizer, adapters, causal, texts, labels, stats, max_length, key)
