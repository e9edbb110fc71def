"""Item 5: interactive latency of the app with a finished run open.

Driven by ``streamlit.testing.v1.AppTest`` as in tests/test_app.py: a new session with
``session_state["run_path"]`` set to a finished run, the home page run once, then the page
under test opened with ``switch_page(...).run()``; the time of that ``run()`` is the time to the
page's first chart (the run draws every chart of the page; each timed run must draw at least
one and raise nothing). Home is timed on its own first run. The adapter-diagnosis page draws
nothing until adapters and sample texts are given: its time is the run after two adapters of
the run (zipped) were uploaded and twelve sample texts per task typed, which draws its first
charts (its opening run is in the samples as ``5_Adapter_diagnosis:open``).

Caches are cleared before each session (``st.cache_data`` and ``st.cache_resource``), so every
figure is a first visit: eigendecompositions, CSV reads and the base model load included.

The run is the one the app tests use (``tests/fixtures_run.py``: three demo tasks, rank 4,
standard and OSRM inits, two merge methods), built once and kept in the temporary folder
(about 20-40 s the first time), or any finished run given in ``OSRM_BENCH_RUN``.
Goal: every page under 3 s; the figure is the slowest page's median.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

from bench._common import ROOT, Context, Row, median

PAGES = [
    "app.py",
    "pages/1_Eigenspectra.py",
    "pages/2_Interference.py",
    "pages/3_Subspace_angles.py",
    "pages/4_Lambda_sweep.py",
    "pages/5_Adapter_diagnosis.py",
    "pages/6_Learn.py",
]


def finished_run(ctx: Context) -> Path:
    """A finished run: ``OSRM_BENCH_RUN``, or the app tests' small run (built once, cached)."""
    given = os.environ.get("OSRM_BENCH_RUN")
    if given:
        return Path(given).resolve()
    path = Path(tempfile.gettempdir()) / "osrm-bench-small-run"
    if not (path / "results" / "summary.json").is_file():
        ctx.log(f"5 building the app tests' small run in {path} (once)")
        sys.path.insert(0, str(ROOT / "tests"))
        from fixtures_run import build_small_run

        build_small_run(path)
    return path


def _texts(task: str, n: int = 12) -> list[str]:
    from osrm_core.demo import demo_task

    return demo_task(task, n_train=max(n, 10), n_test=10).train.text[:n]


def time_page(run: Path, page: str) -> dict[str, float]:
    """Seconds to the page's first chart in a fresh session with cold caches."""
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    from app_helpers import zip_directory

    st.cache_data.clear()
    st.cache_resource.clear()
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=180)
    at.session_state["run_path"] = str(run)
    start = time.perf_counter()
    at.run()
    out = {}
    if page == "app.py":
        out[page] = time.perf_counter() - start
    elif page.endswith("5_Adapter_diagnosis.py"):
        start = time.perf_counter()
        at.switch_page(page).run()
        out[f"{Path(page).stem}:open"] = time.perf_counter() - start
        up = at.file_uploader(key="diag_files")
        init = "standard"
        tasks = sorted(p.name for p in (run / "adapters" / init).iterdir() if p.is_dir())[:2]
        for task in tasks:
            up.upload(f"{task}.zip", zip_directory(run / "adapters" / init / task), "application/zip")
        at.run()
        for task in tasks:
            at.text_area(key=f"diag_texts_{task}").set_value("\n".join(_texts(task)))
        start = time.perf_counter()
        at.run()
        out[page] = time.perf_counter() - start
    else:
        start = time.perf_counter()
        at.switch_page(page).run()
        out[page] = time.perf_counter() - start
    if at.exception:
        raise RuntimeError(f"{page}: {[e.value for e in at.exception]}")
    if not at.get("plotly_chart"):
        raise RuntimeError(f"{page}: no chart drawn")
    return out


def app_row(ctx: Context) -> Row:
    from streamlit.logger import set_log_level

    # AppTest runs without a server, and Streamlit warns about it on every cached call.
    set_log_level("error")
    sys.path.insert(0, str(ROOT))
    run = finished_run(ctx)
    samples: dict[str, list[float]] = {}
    for _ in range(ctx.repeats):
        for page in PAGES:
            for key, seconds in time_page(run, page).items():
                samples.setdefault(key, []).append(round(seconds, 3))
    medians = {p: median(samples[p]) for p in PAGES}
    slowest = max(medians, key=medians.get)
    return Row(
        "5", "app: slowest page to first chart (cold caches)",
        medians[slowest], "<=", 3.0,
        unit="s",
        ours=medians[slowest], baseline=None, repeats=ctx.repeats,
        detail=f"run {run.name}; slowest {slowest}; medians s: "
        + ", ".join(f"{Path(p).stem}={v:.2f}" for p, v in medians.items()),
        command=ctx.cmd("5"), samples=samples,
    )


def run(ctx: Context, items: set[str]) -> list[Row]:
    if "5" not in items:
        return []
    ctx.log("5 app latency")
    return [app_row(ctx)]
