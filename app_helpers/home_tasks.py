"""The Home page's uploaded tasks: one CSV or JSONL file per task, with its column mapping."""

from __future__ import annotations

import warnings
from pathlib import Path

import streamlit as st

from osrm_core.data import METRICS, DataError, from_dataframes, read_table
from osrm_core.rundir import RunDir

from .uploads import safe_name
from .widgets import column_picker, text_column_picker


def uploaded_tasks(seed: int) -> tuple[list, list[str]]:
    """The tasks of the uploaded files (TaskData), with their column mapping widgets."""
    files = st.file_uploader(
        "Your own tasks: one CSV or JSONL file per task (split 80/20 into train and test)",
        type=["csv", "jsonl", "json"],
        accept_multiple_files=True,
        key="home_task_files",
    )
    tasks, errors = [], []
    for i, f in enumerate(files or []):
        with st.expander(f"Task from {f.name}", expanded=True):
            try:
                fmt = "csv" if f.name.lower().endswith(".csv") else "jsonl"
                df = read_table(f.getvalue(), fmt=fmt)
            except DataError as err:
                st.error(f"{f.name}: {err}")
                errors.append(f.name)
                continue
            st.dataframe(df.head(8), hide_index=True)
            st.caption(f"{len(df)} rows, columns: {', '.join(map(str, df.columns))}")
            cols = [str(c) for c in df.columns]
            c1, c2, c3, c4, c5 = st.columns(5)
            name = c1.text_input("Task name", value=safe_name(Path(f.name).stem), key=f"home_up_name_{i}")
            text = text_column_picker(df, f.name, f"home_up_text_{i}", where=c2)
            # Without a "label" column, the last column (where labels usually are).
            label = column_picker("Label column", cols, "label" if "label" in cols else cols[-1],
                                  f"home_up_label_{i}", where=c3)
            pair = column_picker("Second text (pairs)", cols, "text_pair", f"home_up_pair_{i}", optional=True, where=c4)
            metric = c5.selectbox("Metric", METRICS, key=f"home_up_metric_{i}",
                                  help="how the task is scored: loss is the cross-entropy (lower is better)")
            if text is None:  # no "text" column: the error is shown until one is chosen
                errors.append(f.name)
                continue
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    task = from_dataframes(
                        safe_name(name),
                        df,
                        None,
                        text=text,
                        label=label,
                        text_pair=pair,
                        metric=metric,
                        seed=seed,
                    )
            except DataError as err:
                st.error(f"{f.name}: {err}")
                errors.append(f.name)
                continue
            for w in caught:
                if issubclass(w.category, UserWarning):
                    st.warning(f"{f.name}: {w.message}")
            st.caption(
                f"Task {task.name!r}: {len(task.train)} train, {len(task.test)} test examples, "
                f"labels {', '.join(task.label_names)}"
            )
            tasks.append(task)
    return tasks, errors


def task_entries(demo_keys: list[str], own_tasks: list, out: RunDir) -> list[dict]:
    """The config's task entries: the demo tasks, and each uploaded task saved in the run's ``data/``."""
    entries = [{"name": k, "spec": f"demo:{k}"} for k in demo_keys]
    entries += [{"name": t.name, "spec": str(out.task_data_path(t.name).resolve()), "text": "text", "label": "label",
                 "text_pair": "text_pair" if t.is_pair else None, "metric": t.metric} for t in own_tasks]
    return entries
