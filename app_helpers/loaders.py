"""Cached loaders: result tables, spectra, the base model and statistics of sample texts.

``st.cache_resource`` holds models (shared: never modify them; :func:`fresh_model` gives a
private copy), ``st.cache_data`` holds results keyed by path and modification time.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from osrm_core.pipeline import build_summary
from osrm_core.runcheck import (
    RunFileError,
    is_run_file,
    read_csv_checked,
    read_result_table,
    validate_run_dir,
)
from osrm_core.rundir import RunDir
from osrm_core.settings import ConfigError
from osrm_core.viz import group_label

from .uploads import text_task


def _mtime(path: Path) -> float:
    return path.stat().st_mtime if path.exists() else 0.0


def run_problems(run: RunDir) -> list[str]:
    """Every damaged file of the run, one line each (:func:`osrm_core.runcheck.validate_run_dir`),
    checked again only when a file changes."""
    files = tuple(
        (str(p), s.st_size, s.st_mtime_ns)
        for p in sorted(run.path.rglob("*"))
        if is_run_file(p) and p.is_file() and (s := p.stat())
    )
    return _run_problems(str(run.path), files)


@st.cache_data(show_spinner="Checking the run's files ...", max_entries=32)
def _run_problems(path: str, files: tuple) -> list[str]:
    return validate_run_dir(path)


def stop_on_damage(err: ValueError) -> None:
    """A damaged file of the open run: say which and why, and end the page there."""
    st.error(f"This page cannot be shown: {err}")
    st.stop()


@st.cache_data(show_spinner=False, max_entries=128)
def _result_table(path: str, name: str, mtime: float) -> pd.DataFrame:
    return read_result_table(path, name)


def result_table(run: RunDir, name: str) -> pd.DataFrame | None:
    """``results/<name>`` of the run as a DataFrame (checked; cached by path and mtime), or None.
    A damaged table ends the page with an error that names it."""
    p = run.result_path(name)
    try:
        return _result_table(str(p), name, _mtime(p)).copy() if p.is_file() else None
    except RunFileError as err:
        stop_on_damage(err)


def required_table(run: RunDir, name: str, what: str) -> pd.DataFrame:
    """``results/<name>`` of the run (:func:`result_table`); when it is missing or empty, a note
    that the run has no ``what`` yet ends the page."""
    table = result_table(run, name)
    if table is None or table.empty:
        st.info(f"This run has no {what} yet (results/{name}): run or resume it on the home page.")
        st.stop()
    return table


def sweep_table(run: RunDir) -> pd.DataFrame | None:
    """All ``results/sweep_<init>.csv`` of the run, concatenated (None when there are none)."""
    try:
        order = run.config().inits
    except ConfigError:
        order = []
    paths = sorted((run.path / "results").glob("sweep_*.csv"))
    # In the config's order of inits (standard before OSRM), others after.
    paths.sort(key=lambda p: order.index(p.stem[6:]) if p.stem[6:] in order else len(order))
    frames = []
    for p in paths:
        df = result_table(run, p.name)
        if not df.empty:
            frames.append(df)
    return pd.concat(frames, ignore_index=True) if frames else None


@st.cache_data(show_spinner=False, max_entries=256)
def _drift_csv(path: str, rel: str, mtime: float) -> pd.DataFrame:
    return read_csv_checked(path, rel)


def drift_table(run: RunDir) -> pd.DataFrame | None:
    """Every ``adapters/<init>/<task>/drift.csv`` of the run (interference during fine-tuning),
    with columns ``init`` and ``adapter`` added; None when there are none. A damaged file ends
    the page with an error that names it."""
    frames = []
    for p in sorted((run.path / "adapters").glob("*/*/drift.csv")):
        try:
            df = _drift_csv(str(p), str(p.relative_to(run.path)), _mtime(p)).copy()
        except RunFileError as err:
            stop_on_damage(err)
        if not df.empty:
            frames.append(df.assign(init=p.parent.parent.name, adapter=p.parent.name))
    return pd.concat(frames, ignore_index=True) if frames else None


def run_summary(run: RunDir) -> dict | None:
    """The run's summary.json, or one built from the sweep tables present so far; None when
    there are none or they are damaged (:func:`run_problems` names the file)."""
    try:
        summary = run.summary()
        if summary is not None:
            return summary
        config = run.config()
        inits = [i for i in config.inits if run.result_path(f"sweep_{i}.csv").is_file()]
        return build_summary(run, [t.name for t in config.tasks], inits) if inits else None
    except ValueError:  # ConfigError, RunFileError
        return None


def _stats_mtime(run: RunDir) -> float:
    files = list((run.path / "stats").glob("*.safetensors"))
    return max((f.stat().st_mtime for f in files), default=0.0)


@st.cache_data(show_spinner="Computing eigenspectra ...", max_entries=16)
def _spectra(run_path: str, mtime: float, moment: str) -> dict:
    from osrm_core.spectra import feature_spectra

    stats = RunDir(run_path).load_stats()
    groups: list[tuple[str, list[str]]] = []
    eigen: dict[str, dict[str, np.ndarray]] = {}
    rows = []
    for task, st_ in stats.items():
        spectra = feature_spectra(st_, moment)
        eigen[task] = {}
        for names in st_.groups():
            label = group_label(names)
            if label not in [g[0] for g in groups]:
                groups.append((label, names))
            spec = spectra[names[0]]
            eigen[task][label] = spec.eigenvalues_desc.numpy()
            rows.append(
                {
                    "task": task,
                    "layer": label,
                    "effective_rank": spec.effective_rank,
                    "tokens": st_.layers[names[0]].count,
                }
            )
    return {"groups": groups, "eigenvalues": eigen, "effective_rank": pd.DataFrame(rows)}


def run_spectra(run: RunDir, moment: str = "second_moment") -> dict:
    """Eigenvalues (descending) per task and input group, and an effective-rank table.

    Returns ``{"groups": [(label, names)], "eigenvalues": {task: {label: array}},
    "effective_rank": DataFrame(task, layer, effective_rank, tokens)}``.
    """
    try:
        return _spectra(str(run.path), _stats_mtime(run), moment)
    except ValueError as err:  # damaged statistics
        stop_on_damage(err)


@st.cache_data(show_spinner=False, max_entries=32)
def _rest_spectrum(
    run_path: str, mtime: float, moment: str, task: str, weighting: str
) -> dict[str, np.ndarray]:
    from osrm_core.inits import rest_spectrum as rest_eigenvalues

    stats = RunDir(run_path).load_stats()
    spectra = rest_eigenvalues(stats, task, weighting=weighting, moment=moment)
    return {group_label(names): spectra[names[0]] for names in next(iter(stats.values())).groups()}


def rest_spectrum(run: RunDir, task: str, moment: str = "second_moment") -> dict[str, np.ndarray]:
    """Eigenvalues of the other tasks' combined moment (the matrix OSRM decomposes for ``task``)."""
    try:
        weighting = run.config().osrm_weighting
    except ConfigError:
        weighting = "equal"
    try:
        return _rest_spectrum(str(run.path), _stats_mtime(run), moment, task, weighting)
    except ValueError as err:  # damaged statistics
        stop_on_damage(err)


@st.cache_resource(
    show_spinner="Loading the base model (once per server: about 4 s for the packaged MiniLM, longer for a "
                 "large model or a download) ...",
    max_entries=2,
)
def _base_model(name: str | None):
    from osrm_core.models import load_base_model

    return load_base_model(name or None)


def base_model(name: str | None = None):
    """The shared (model, tokenizer) for ``name`` (None: packaged MiniLM). Never modify it."""
    return _base_model(name or None)


def fresh_model(name: str | None = None):
    """A private copy of the base model (for hooks or in-place weight changes) and the tokenizer."""
    model, tokenizer = base_model(name)
    fresh = copy.deepcopy(model)
    fresh.name_or_path_ = getattr(model, "name_or_path_", "")
    return fresh, tokenizer


@st.cache_data(show_spinner="Collecting feature statistics of the sample texts ...", max_entries=64)
def texts_feature_stats(
    model_name: str | None, task_name: str, texts: tuple[str, ...], layers: tuple[str, ...], max_length: int
):
    """Feature statistics of sample texts at ``layers`` of the base model (cached), and the
    library's warnings about them (few tokens: a rank-deficient second moment)."""
    from osrm_core.stats import collect_feature_stats

    model, tokenizer = fresh_model(model_name)
    task = text_task(task_name, list(texts))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stats = collect_feature_stats(
            model, tokenizer, task, target_modules=list(layers), max_samples=None, max_length=max_length
        )
    return stats, [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


@st.cache_data(show_spinner=False, max_entries=8)
def real_model_comparison(rank: int = 8, n_samples: int = 32, seed: int = 0, max_length: int = 64) -> pd.DataFrame:
    """:func:`osrm_core.workflows.real_model_comparison` on the packaged model (cached)."""
    from osrm_core.workflows import real_model_comparison as compare

    model, tokenizer = fresh_model(None)
    return compare(model, tokenizer, rank=rank, n_samples=n_samples, seed=seed, max_length=max_length)
