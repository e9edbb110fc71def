"""Reusable widgets: figure and table with their download buttons, the column picker, the layer
selector and the progress of long work."""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd
import streamlit as st

from osrm_core.viz import figure_html, short_layer

from .uploads import safe_name

NONE = "(none)"


def show_figure(fig, name: str, key: str) -> None:
    """An interactive plotly chart and a button that downloads it as standalone HTML."""
    st.plotly_chart(
        fig, key=f"{key}_chart", config={"displaylogo": False, "toImageButtonOptions": {"filename": name}}
    )
    st.download_button(
        "Download figure (HTML)",
        data=lambda: figure_html(fig),
        file_name=f"{safe_name(name, 'figure')}.html",
        mime="text/html",
        key=f"{key}_html",
        on_click="ignore",
    )


def show_table(df: pd.DataFrame, name: str, key: str, **kwargs) -> None:
    """A table and a button that downloads it as CSV."""
    st.dataframe(df, hide_index=True, **kwargs)
    st.download_button(
        "Download table (CSV)",
        data=lambda: df.to_csv(index=False),
        file_name=f"{safe_name(name, 'table')}.csv",
        mime="text/csv",
        key=f"{key}_csv",
        on_click="ignore",
    )


def progress_callbacks(
    status, n_stages: int
) -> tuple[Callable[[int, int, str], None], Callable[[str], None]]:
    """``progress`` and ``on_stage`` callbacks that drive an ``st.status`` and an ``st.progress``."""
    bar = status.progress(0.0, text="starting ...")
    seen: list[str] = []

    def on_stage(name: str) -> None:
        if name == "done":
            bar.progress(1.0, text="done")
            return
        seen.append(name)
        status.update(label=f"Stage {len(seen)} of {n_stages}: {name}")
        status.write(f"Stage {len(seen)}: {name}")
        bar.progress(0.0, text=name)

    def progress(step: int, total: int, message: str) -> None:
        bar.progress(min(max(step / max(total, 1), 0.0), 1.0), text=f"{message} ({step}/{total})")

    return progress, on_stage


def column_picker(label: str, columns: list[str], preferred: str, key: str, *, optional: bool = False,
                  where=st) -> str | None:
    """A select box of ``columns`` that starts on ``preferred`` when present (else the first
    column; ``optional`` adds a "(none)" choice, the start when ``preferred`` is absent).
    Returns the column, or None for "(none)"."""
    options = [NONE, *columns] if optional else list(columns)
    choice = where.selectbox(label, options, index=options.index(preferred) if preferred in options else 0, key=key)
    return None if choice == NONE else choice


def layer_selector(layers: list[str], key: str, *, label: str = "Layer", first: str | None = None, where=st,
                   **kwargs) -> str:
    """A select box of module names shown as short labels (``L3.query (full name)``), with an
    optional first entry such as "sum over layers" that is shown as it is."""
    options = [first, *layers] if first is not None else list(layers)
    return where.selectbox(
        label, options, key=key, format_func=lambda n: n if n == first else f"{short_layer(n)} ({n})", **kwargs
    )


def merge_param_widgets(method: str, prefix: str) -> dict:
    """One widget per parameter of merge ``method`` (from its parameter dataclass: a number
    input in its range, or a select box of its choices), in columns; returns the values.
    Widget keys are ``{prefix}_{parameter}``; a key already in session state sets the start."""
    from osrm_core.merge import MERGE_METHODS

    specs = MERGE_METHODS[method].param_specs()
    values = {}
    for col, spec in zip(st.columns(max(len(specs), 1)), specs):
        key = f"{prefix}_{spec.name}"
        st.session_state.setdefault(key, spec.default)
        if spec.choices is not None:
            values[spec.name] = col.selectbox(spec.name, spec.choices, key=key, help=spec.help)
        else:
            low, high = spec.range or (None, None)
            values[spec.name] = col.number_input(spec.name, low, high, step=0.05, key=key, help=spec.help)
    return values
