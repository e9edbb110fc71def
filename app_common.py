"""Helpers shared by ``app.py`` and the pages: session state, the open run, cached loaders,
safe handling of uploaded zips, and figure/table display with downloads.

It lives beside ``app.py`` (not in ``pages/``, where Streamlit would list it as a page). Every
page calls :func:`init_state` first, because a page opened directly by its URL never runs
``app.py``.

Environment variables
---------------------
OSRM_RUN_DIR
    A run directory to open when a session starts (used by the browser test and handy for
    ``OSRM_RUN_DIR=runs/demo streamlit run app.py``).
OSRM_RUNS_ROOT
    Where new runs are written and existing ones listed (default ``runs``).
OSRM_SHARED
    ``1`` (or ``[osrm] shared = true`` in ``.streamlit/secrets.toml``) for a deployment that
    several people use: no model or run is loaded from a server path typed into the app, each
    session writes and lists only its own runs (``OSRM_RUNS_ROOT/sessions/<random id>/``),
    ``OSRM_RUN_DIR`` is ignored, and a run's config may name only the packaged model, demo
    tasks and data inside the run. Uploads work as usual. See README, "Security model".
"""

from __future__ import annotations

import copy
import io
import json
import os
import re
import secrets
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from osrm_core.adapters import Adapter, load_adapter
from osrm_core.archive import ArchiveError, find_root_with, safe_extract_zip  # noqa: F401 (app.py uses it)
from osrm_core.data import DataError, Split, TaskData, from_dataframes
from osrm_core.runs import ConfigError, RunConfig, RunDir, build_summary
from osrm_core.viz import figure_html, group_label

RUN_INFO = "Open or create a run on the home page"


_TRUE = ("1", "true", "yes", "on")


def shared_mode() -> bool:
    """Whether this deployment is shared (``OSRM_SHARED``, else ``[osrm] shared`` in secrets)."""
    env = os.environ.get("OSRM_SHARED", "").strip()
    if env:
        return env.lower() in _TRUE
    try:
        value = st.secrets.get("osrm", {}).get("shared", False)
    except Exception:  # no secrets file: not shared
        return False
    return value is True or str(value).strip().lower() in _TRUE


SHARED_NOTE = (
    "Shared mode: models and runs are not loaded from server paths; this session sees only its "
    "own runs and uploads."
)


def session_id() -> str:
    """A random id of this browser session (names its private runs folder in shared mode)."""
    ss = st.session_state
    if "_osrm_session_id" not in ss:
        ss["_osrm_session_id"] = secrets.token_hex(16)
    return ss["_osrm_session_id"]


def runs_root() -> Path:
    """Where new runs go and runs are listed: ``OSRM_RUNS_ROOT`` (default ``runs``), and in
    shared mode this session's own folder below it."""
    root = Path(os.environ.get("OSRM_RUNS_ROOT", "runs"))
    return root / "sessions" / session_id() if shared_mode() else root


# --------------------------------------------------------------------------- session state


def init_state() -> None:
    """Set this session's defaults once (a guard keeps reruns from resetting them)."""
    ss = st.session_state
    if ss.get("_osrm_ready"):
        return
    ss["_osrm_ready"] = True
    ss.setdefault("run_path", None)
    env = os.environ.get("OSRM_RUN_DIR")
    if env and shared_mode():
        ss["run_note"] = "OSRM_RUN_DIR is ignored in shared mode: each session opens only its own runs"
    elif env and ss["run_path"] is None:
        if RunDir(env).exists():
            ss["run_path"] = str(Path(env).resolve())
        else:
            ss["run_note"] = f"OSRM_RUN_DIR={env!r} is not a run directory (no config.yaml)"


def session_tmp() -> Path:
    """This session's own temporary folder (removed when the session's state is dropped)."""
    ss = st.session_state
    if "_osrm_tmp" not in ss:
        ss["_osrm_tmp"] = tempfile.TemporaryDirectory(prefix="osrm-session-")
    return Path(ss["_osrm_tmp"].name)


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def open_run(path: str | Path) -> RunDir:
    """Make ``path`` the session's open run; ValueError when it is not a run directory (or, in
    shared mode, not one of this session's own runs)."""
    run = RunDir(Path(path).expanduser())
    if shared_mode() and not (_inside(run.path, runs_root()) or _inside(run.path, session_tmp())):
        raise ValueError(
            f"{str(path)!r}: in shared mode only this session's own runs (new or uploaded) can be opened"
        )
    if not run.path.is_dir():
        raise ValueError(f"{str(path)!r} is not a folder")
    if not run.exists():
        raise ValueError(f"{str(path)!r} is not a run directory: it has no config.yaml")
    run.config()  # a damaged config fails here, with the field named
    st.session_state["run_path"] = str(run.path.resolve())
    return run


def shared_config_problem(config: RunConfig, run: RunDir) -> str | None:
    """In shared mode, why ``config`` may not run here (it names a server path), else None.

    Allowed: the packaged model, ``demo:`` tasks and task data inside the run directory.
    """
    if not shared_mode():
        return None
    if config.model is not None:
        return f"in shared mode only the packaged model can be used; this run names model {config.model!r}"
    for task in config.tasks:
        if task.spec.startswith("demo:"):
            continue
        spec = Path(task.spec)
        if task.spec.startswith("hf:") or not spec.is_absolute() or not _inside(spec, run.path):
            return (
                f"in shared mode tasks must be demo tasks or uploads saved in the run; "
                f"task {task.name!r} names {task.spec!r}"
            )
    return None


def close_run() -> None:
    st.session_state["run_path"] = None


def current_run() -> RunDir | None:
    path = st.session_state.get("run_path")
    if not path:
        return None
    run = RunDir(path)
    return run if run.exists() else None


def require_run() -> RunDir:
    """The open run, or an info box and the end of the page."""
    init_state()
    run = current_run()
    if run is None:
        st.info(RUN_INFO)
        st.stop()
    return run


def list_runs(root: str | Path | None = None) -> list[Path]:
    """Run directories directly under ``root`` (those with a config.yaml), newest first."""
    root = Path(root) if root is not None else runs_root()
    if not root.is_dir():
        return []
    runs = [p for p in root.iterdir() if p.is_dir() and (p / "config.yaml").is_file()]
    return sorted(runs, key=lambda p: p.stat().st_mtime, reverse=True)


# --------------------------------------------------------------------------- cached loaders


def _mtime(path: Path) -> float:
    return path.stat().st_mtime if path.exists() else 0.0


@st.cache_data(show_spinner=False, max_entries=128)
def _read_csv(path: str, mtime: float) -> pd.DataFrame:
    return pd.read_csv(path)


def result_table(run: RunDir, name: str) -> pd.DataFrame | None:
    """``results/<name>`` of the run as a DataFrame (cached by path and mtime), or None."""
    p = run.result_path(name)
    return _read_csv(str(p), _mtime(p)).copy() if p.is_file() else None


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
        df = _read_csv(str(p), _mtime(p))
        if not df.empty:
            frames.append(df)
    return pd.concat(frames, ignore_index=True) if frames else None


def run_summary(run: RunDir) -> dict | None:
    """The run's summary.json, or one built from the sweep tables present so far."""
    summary = run.summary()
    if summary is not None:
        return summary
    try:
        config = run.config()
    except ConfigError:
        return None
    inits = [i for i in config.inits if run.result_path(f"sweep_{i}.csv").is_file()]
    return build_summary(run, [t.name for t in config.tasks], inits) if inits else None


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
    return _spectra(str(run.path), _stats_mtime(run), moment)


@st.cache_data(show_spinner=False, max_entries=32)
def _rest_spectrum(
    run_path: str, mtime: float, moment: str, task: str, weighting: str
) -> dict[str, np.ndarray]:
    from osrm_core.init import rest_moment
    from osrm_core.spectra import symmetric_eigh

    stats = RunDir(run_path).load_stats()
    others = [s for name, s in stats.items() if name != task]
    rest = rest_moment(others, weighting, moment)
    out = {}
    for names in others[0].groups():
        out[group_label(names)] = symmetric_eigh(rest[names[0]]).eigenvalues_desc.numpy()
    return out


def rest_spectrum(run: RunDir, task: str, moment: str = "second_moment") -> dict[str, np.ndarray]:
    """Eigenvalues of the other tasks' combined moment (the matrix OSRM decomposes for ``task``)."""
    try:
        weighting = run.config().osrm_weighting
    except ConfigError:
        weighting = "equal"
    return _rest_spectrum(str(run.path), _stats_mtime(run), moment, task, weighting)


@st.cache_resource(show_spinner="Loading the base model ...", max_entries=2)
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


# --------------------------------------------------------------------------- display


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


# --------------------------------------------------------------------------- zips


def zip_directory(path: str | Path) -> bytes:
    """A zip (bytes) of every file under ``path``, with paths relative to its parent."""
    path = Path(path)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(path.rglob("*")):
            if f.is_file() and not f.name.endswith(".tmp"):
                zf.write(f, f.relative_to(path.parent).as_posix())
    return buf.getvalue()


def open_uploaded_run(data: bytes, filename: str) -> RunDir:
    """Extract a zipped run into this session's temporary folder and open it."""
    base = session_tmp() / "uploaded_runs"
    base.mkdir(parents=True, exist_ok=True)
    dest = Path(tempfile.mkdtemp(prefix=safe_name(Path(filename).stem, "run") + "-", dir=base))
    safe_extract_zip(data, dest)
    return open_run(find_root_with(dest, "config.yaml"))


# --------------------------------------------------------------------------- tasks and adapters


def safe_name(text: str, default: str = "task") -> str:
    """``text`` reduced to letters, digits, ``_`` and ``-`` (a valid task or file name)."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")
    return name or default


def save_task_dir(task: TaskData, directory: str | Path) -> Path:
    """Write a task as ``train.csv``/``test.csv`` (columns text[, text_pair], label as names)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for split_name, split in (("train", task.train), ("test", task.test)):
        df = pd.DataFrame({"text": split.text})
        if split.text_pair is not None:
            df["text_pair"] = split.text_pair
        df["label"] = [task.label_names[int(y)] for y in split.label]
        df.to_csv(directory / f"{split_name}.csv", index=False)
    return directory


def text_task(name: str, texts: Sequence[str], labels: Sequence | None = None) -> TaskData:
    """A task made of sample texts, for statistics (and for a sweep when ``labels`` are given).

    The texts serve as both splits. Without labels, placeholder labels are set: such a task is
    only good for feature statistics.
    """
    texts = [str(t) for t in texts]
    keep = [i for i, t in enumerate(texts) if t.strip()]
    if len(keep) < 2:
        raise DataError(f"task {name!r}: give at least 2 sample texts")
    texts = [texts[i] for i in keep]
    if labels is None:
        y = np.arange(len(texts)) % 2
        split = Split(texts, y)
        return TaskData(name, split, split, ["unlabelled_a", "unlabelled_b"], source="sample texts")
    labels = [labels[i] for i in keep]
    df = pd.DataFrame({"text": texts, "label": labels})
    return from_dataframes(name, df, df.copy(), text="text", label="label")


def read_uploaded_adapters(
    files: Sequence, model, loose_name: str = "adapter"
) -> tuple[dict[str, Adapter], list[str]]:
    """Read uploaded PEFT LoRA adapters with :func:`osrm_core.adapters.load_adapter` (zip
    checks, safetensors only, config validated, every tensor checked against ``model``).

    Parameters
    ----------
    files : sequence of uploaded files (``.name`` and ``.getvalue()``)
        A ``.zip`` of an adapter folder per adapter, or one loose pair of
        ``adapter_config.json`` + ``adapter_model.safetensors``.
    model : nn.Module
        The base model the adapters must fit.
    loose_name : str
        Name of the adapter given as a loose pair.

    Returns
    -------
    (adapters, errors)
        Adapters by name, and one message per upload that could not be used.
    """
    adapters: dict[str, Adapter] = {}
    errors: list[str] = []
    loose: dict[str, list[bytes]] = {}

    def add(name: str, adapter: Adapter) -> None:
        key, n = safe_name(name, "adapter"), 2
        while key in adapters:
            key, n = f"{safe_name(name, 'adapter')}_{n}", n + 1
        adapters[key] = adapter

    for f in files:
        name = f.name
        lower = name.lower()
        if lower.endswith(".zip"):
            try:
                # A private folder, removed at once: the upload is a file only while it is read.
                with tempfile.TemporaryDirectory(prefix="osrm-upload-") as tmp:
                    path = Path(tmp) / "upload.zip"
                    path.write_bytes(f.getvalue())
                    add(Path(name).stem, load_adapter(path, model, name=name))
            except (ValueError, OSError) as err:
                errors.append(str(err))
        elif lower in ("adapter_config.json", "adapter_model.safetensors"):
            loose.setdefault(lower, []).append(f.getvalue())
        else:
            errors.append(
                f"{name}: not an adapter file; upload a .zip of a PEFT adapter folder, or "
                "adapter_config.json together with adapter_model.safetensors"
            )
    if loose:
        if any(len(v) > 1 for v in loose.values()):
            errors.append(
                "several adapter_config.json or adapter_model.safetensors: upload each further adapter as a zip"
            )
        elif len(loose) < 2:
            missing = {"adapter_config.json", "adapter_model.safetensors"} - set(loose)
            errors.append(
                f"{next(iter(loose))} needs {missing.pop()} beside it (or upload the adapter as a zip)"
            )
        else:
            try:
                with tempfile.TemporaryDirectory(prefix="osrm-upload-") as tmp:
                    for fname, (data,) in loose.items():
                        (Path(tmp) / fname).write_bytes(data)
                    add(loose_name, load_adapter(tmp, model, name=loose_name))
            except (ValueError, OSError) as err:
                errors.append(str(err))
    return adapters, errors


@st.cache_data(show_spinner="Collecting feature statistics of the sample texts ...", max_entries=64)
def texts_feature_stats(
    model_name: str | None, task_name: str, texts: tuple[str, ...], layers: tuple[str, ...], max_length: int
):
    """Feature statistics of sample texts at ``layers`` of the base model (cached), and the
    library's warnings about them (few tokens: a rank-deficient second moment)."""
    import warnings

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
def real_model_comparison(
    rank: int = 8, n_samples: int = 32, seed: int = 0, max_length: int = 64
) -> pd.DataFrame:
    """On the packaged model and the demo tasks: per task and input, the other tasks' energy
    ``sum_j E||A h_j||^2`` seen by OSRM's A and by a random orthonormal A of the same rank.

    Returns a DataFrame with columns ``task, layer, osrm, random, ratio`` (one row per input
    that layers share: query and value read the same hidden states).
    """
    import torch

    from osrm_core.demo import demo_tasks
    from osrm_core.diagnostics import summed_interference
    from osrm_core.init import osrm_subspace
    from osrm_core.stats import collect_feature_stats

    model, tokenizer = fresh_model(None)
    tasks = demo_tasks(seed=seed, n_train=max(n_samples, 10), n_test=10)
    stats = [
        collect_feature_stats(model, tokenizer, t, max_samples=n_samples, max_length=max_length, seed=seed)
        for t in tasks
    ]
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for i, task in enumerate(tasks):
        others = stats[:i] + stats[i + 1 :]
        firsts = [g[0] for g in stats[i].groups()]
        osrm = {n: a for n, a in osrm_subspace(others, rank).items() if n in firsts}
        rand = {}
        for n, a in osrm.items():
            q, _ = torch.linalg.qr(torch.randn(a.shape[1], rank, generator=generator, dtype=torch.float64))
            rand[n] = q.T
        got, ref = summed_interference(osrm, others), summed_interference(rand, others)
        for n in firsts:
            rows.append(
                {
                    "task": task.name,
                    "layer": n,
                    "osrm": got[n],
                    "random": ref[n],
                    "ratio": got[n] / ref[n] if ref[n] > 0 else float("nan"),
                }
            )
    return pd.DataFrame(rows)


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


# --------------------------------------------------------------------------- adapter diagnosis


def uploads_signature(files: Sequence, *extra: str) -> str:
    """A digest of uploaded files (names and bytes) and extra strings, to key session caches."""
    import hashlib

    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(hashlib.sha256(f.getvalue()).digest())
    for e in extra:
        h.update(b"\x00" + e.encode())
    return h.hexdigest()


def adapter_rank(adapter: Adapter) -> int:
    return max(lw.rank for lw in adapter.layers.values())


def diagnose(adapters: dict[str, Adapter], stats: dict, base_weights: dict) -> dict:
    """Interference, angles and post-hoc OSRM of uploaded adapters, given their tasks' statistics.

    Returns a dict with ``interference`` (uploaded and projected adapters, column ``init``),
    ``angles``, ``kept`` (energy kept per adapter and layer) and ``projected`` (adapters).
    """
    from osrm_core.diagnostics import angle_table, interference_table, posthoc_osrm_adapters

    projected, kept = posthoc_osrm_adapters(adapters, stats)
    interference = pd.concat(
        [
            interference_table(adapters, stats, base_weights).assign(init="uploaded"),
            interference_table(projected, stats, base_weights).assign(init="posthoc_osrm"),
        ],
        ignore_index=True,
    )
    k = min(adapter_rank(a) for a in adapters.values())
    angles = pd.concat(
        [
            angle_table(stats, k=k, adapters=adapters).assign(init="uploaded"),
            angle_table(stats, k=k, adapters=projected)
            .query("kind == 'adapter-data'")
            .assign(init="posthoc_osrm"),
        ],
        ignore_index=True,
    )
    kept_table = kept[["adapter", "layer", "energy_kept"]]
    return {"interference": interference, "angles": angles, "kept": kept_table, "projected": projected}


def merge_advice(
    model_name: str | None,
    tasks: list[TaskData],
    adapters: dict[str, Adapter],
    *,
    progress: Callable[[int, int, str], None] | None = None,
    on_stage: Callable[[str], None] | None = None,
    **settings,
):
    """:func:`osrm_core.advise.advise` on a fresh copy of the base model (the search writes
    merged weights into the model in place)."""
    from osrm_core.advise import advise

    model, tokenizer = fresh_model(model_name)
    return advise(model, tokenizer, adapters, tasks, progress=progress, on_stage=on_stage, **settings)


def adapter_zip(adapter: Adapter, name: str) -> bytes:
    """A zip of ``adapter`` written as a PEFT adapter folder ``name/``."""
    from osrm_core.adapters import write_adapter

    with tempfile.TemporaryDirectory(prefix="osrm-out-") as tmp:
        folder = Path(tmp) / safe_name(name, "adapter")
        write_adapter(folder, adapter.layers, adapter.config, head=adapter.head)
        return zip_directory(folder)


def merged_adapter_zip(
    adapters: dict[str, Adapter],
    name: str,
    method: str,
    *,
    lam: float = 1.0,
    weights: Sequence[float] | None = None,
    stats: dict | None = None,
    **params,
) -> tuple[bytes, int]:
    """A zip of the merged adapter (one PEFT LoRA adapter with the exact merged ``Delta_W``,
    each task's head under ``heads/``) and its rank, by :mod:`osrm_core.export`."""
    from osrm_core.export import merge_adapters, write_merged_adapter

    merged = merge_adapters(adapters, method, lam=lam, weights=weights, stats=stats, **params)
    with tempfile.TemporaryDirectory(prefix="osrm-out-") as tmp:
        folder = write_merged_adapter(Path(tmp) / safe_name(name, "merged"), merged, adapters)
        rank = json.loads((folder / "adapter_config.json").read_text())["r"]
        return zip_directory(folder), int(rank)
