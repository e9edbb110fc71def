"""Session state and the shared-mode rules: the open run, this session's folders, which runs
and models a session may use.

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

import os
import secrets
import tempfile
from pathlib import Path

import streamlit as st

from osrm_core.archive import find_root_with, safe_extract_zip
from osrm_core.rundir import RunDir
from osrm_core.settings import RunConfig

from .uploads import safe_name

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
    _refresh_sidebar_run()
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


def open_uploaded_run(data: bytes, filename: str) -> RunDir:
    """Extract a zipped run into this session's temporary folder and open it."""
    base = session_tmp() / "uploaded_runs"
    base.mkdir(parents=True, exist_ok=True)
    dest = Path(tempfile.mkdtemp(prefix=safe_name(Path(filename).stem, "run") + "-", dir=base))
    safe_extract_zip(data, dest)
    return open_run(find_root_with(dest, "config.yaml"))



def sidebar_run(where) -> None:
    """The sidebar's "Open run" block, drawn into ``where`` (a slot that :func:`open_run` fills
    again when a page opens a run, so the sidebar names it in the same script run)."""
    st.session_state["_osrm_sidebar_slot"] = where
    _draw_sidebar_run(where, "home_close")


def _draw_sidebar_run(where, key: str) -> None:
    run = current_run()
    with where.container():
        st.markdown("**Open run**")
        if run is None:
            st.caption("none")
        else:
            st.code(str(run.path), language=None)
            st.button("Close this run", key=key, on_click=close_run)


def _refresh_sidebar_run() -> None:
    slot = st.session_state.get("_osrm_sidebar_slot")
    if slot is not None:
        # A second key: the first button of this script run may already hold "home_close".
        _draw_sidebar_run(slot, "home_close_opened")
