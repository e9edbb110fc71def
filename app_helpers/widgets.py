"""Reusable widgets: the download button, figure and table with their downloads, the column picker, the layer
selector and the progress of long work."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

import pandas as pd
import streamlit as st

from osrm_core.downloads import MIME_TYPES, escaped_figure, safe_csv, safe_file_name, safe_name
from osrm_core.viz import figure_html, short_layer

NONE = "(none)"


def download(label: str, data: Callable[[], bytes | str], name: str, kind: Literal["csv", "html", "zip"],
             key: str) -> None:
    """The one download button of the app: the file name made safe
    (:func:`osrm_core.downloads.safe_file_name`), the MIME type of ``kind``; ``data`` is built
    only when the button is pressed."""
    st.download_button(
        label, data=data, file_name=safe_file_name(name, kind), mime=MIME_TYPES[kind], key=key, on_click="ignore"
    )


def show_figure(fig, name: str, key: str) -> None:
    """An interactive plotly chart and a button that downloads it as standalone HTML; user text
    in it (task names ...) is escaped, so it shows as text (:func:`osrm_core.downloads.escaped_figure`)."""
    fig = escaped_figure(fig)
    st.plotly_chart(
        fig, key=f"{key}_chart", config={"displaylogo": False, "toImageButtonOptions": {"filename": safe_name(name, "figure")}}
    )
    download("Download figure (HTML)", lambda: figure_html(fig), name, "html", f"{key}_html")


def show_table(df: pd.DataFrame, name: str, key: str, **kwargs) -> None:
    """A table and a button that downloads it as CSV, formula-leading cells neutralized
    (:func:`osrm_core.downloads.safe_csv`)."""
    st.dataframe(df, hide_index=True, **kwargs)
    download("Download table (CSV)", lambda: safe_csv(df), name, "csv", f"{key}_csv")


def duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``1 h 02 min``."""
    seconds = max(int(round(seconds)), 0)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def time_left(elapsed: float, fraction: float) -> float | None:
    """Seconds left at the pace so far (``elapsed`` seconds for ``fraction`` of the work), or
    None while too little is done for an estimate (under 2% or 3 s)."""
    if fraction < 0.02 or elapsed < 3 or fraction >= 1:
        return None if fraction < 1 else 0.0
    return elapsed * (1 - fraction) / fraction


class ProgressDisplay:
    """The progress of long work that stays open on the page: a bordered box with the stage
    (``Stage 2 of 6: train standard``), a bar of the stage's steps, and the time spent with a
    rough estimate of the time left (the pace so far, stages counted as equal shares).

    ``progress`` and ``on_stage`` are the callbacks of :func:`osrm_core.pipeline.run_experiment`
    and friends; ``label`` maps a stage name to the text shown (e.g. internal ids to labels)."""

    def __init__(self, title: str, n_stages: int, *, where=st, label: Callable[[str], str] | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        self.n_stages, self.label, self.clock = max(int(n_stages), 1), label or (lambda s: s), clock
        self.start = clock()
        self.box = where.container(border=True)
        self.box.markdown(f"**{title}**")
        self.head = self.box.empty()
        self.bar = self.box.progress(0.0, text="starting ...")
        self.time = self.box.empty()
        self.stages: list[str] = []
        self.fraction = 0.0
        self.head.markdown("Starting ...")

    def overall(self) -> float:
        """The share of the work done: finished stages plus the current stage's share."""
        done = max(len(self.stages) - 1, 0)
        return min((done + self.fraction) / self.n_stages, 1.0)

    def _tick(self) -> None:
        elapsed = self.clock() - self.start
        left = time_left(elapsed, self.overall())
        estimate = "estimating the time left ..." if left is None else f"about {duration(left)} left (rough)"
        self.time.caption(f"{duration(elapsed)} so far · {estimate}")

    def on_stage(self, name: str) -> None:
        if name == "done":
            self.fraction = 1.0
            self.bar.progress(1.0, text="done")
            return
        self.stages.append(name)
        self.fraction = 0.0
        count = f"Stage {len(self.stages)} of {self.n_stages}" if len(self.stages) <= self.n_stages else \
            f"Stage {len(self.stages)}"
        self.head.markdown(f"{count}: {self.label(name)}")
        self.bar.progress(0.0, text=self.label(name))
        self._tick()

    def progress(self, step: int, total: int, message: str) -> None:
        self.fraction = min(max(step / max(total, 1), 0.0), 1.0)
        self.bar.progress(self.fraction, text=f"{self.label(message)} ({step}/{total})")
        self._tick()

    def finish(self, message: str, *, ok: bool = True) -> None:
        elapsed = duration(self.clock() - self.start)
        if ok:
            self.bar.progress(1.0, text="done")
            self.head.markdown(f"✅ {message} ({elapsed})")
        else:
            self.head.markdown(f"❌ {message}")
        self.time.caption(f"{elapsed} in all")


def progress_callbacks(
    where, n_stages: int, title: str = "Working ..."
) -> tuple[Callable[[int, int, str], None], Callable[[str], None]]:
    """``progress`` and ``on_stage`` callbacks of a :class:`ProgressDisplay` in ``where``."""
    display = ProgressDisplay(title, n_stages, where=where)
    return display.progress, display.on_stage


def column_picker(label: str, columns: list[str], preferred: str, key: str, *, optional: bool = False,
                  start_empty: bool = False, where=st) -> str | None:
    """A select box of ``columns`` that starts on ``preferred`` when present (else the first
    column; ``optional`` adds a "(none)" choice, the start when ``preferred`` is absent;
    ``start_empty``: no choice until the user makes one). Returns the column, or None for
    "(none)" or no choice."""
    options = [NONE, *columns] if optional else list(columns)
    index = options.index(preferred) if preferred in options else (None if start_empty else 0)
    choice = where.selectbox(label, options, index=index, key=key, placeholder="choose a column")
    return None if choice in (NONE, None) else choice


def text_column_picker(df: pd.DataFrame, file_name: str, key: str, *, where=st) -> str | None:
    """The text column of an uploaded table: ``text`` when it has one; else no choice and the
    command line's error (:func:`osrm_core.data.check_columns`) until the user picks a column."""
    from osrm_core.data import DataError, check_columns

    choice = column_picker("Text column", [str(c) for c in df.columns], "text", key, start_empty=True, where=where)
    if choice is None:
        try:
            check_columns(df, file_name, text="text")
        except DataError as err:
            st.error(f"{err}. Choose the text column to use this file.")
    return choice


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
