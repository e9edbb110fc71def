"""OSRM workbench: the frame of the app. Page config, session state and the sidebar are set here
once; each page in ``pages/`` is a view that wires widgets to :mod:`osrm_core` and draws figures.

Start with ``streamlit run app.py``; ``OSRM_RUN_DIR=runs/NAME streamlit run app.py`` opens a
run at the start of every session.

The first page of a fresh server process waits for torch, transformers, peft and scikit-learn
(about 10 s on a busy two-core machine, more with a cold disk cache): the menu and a "loading"
note are drawn before those imports, so the page is never blank.
"""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path

import streamlit as st

#: The views, in menu order: every file of pages/, titled and addressed by its name
#: (``5_Adapter_diagnosis.py`` is "Adapter diagnosis" at ``/Adapter_diagnosis``); a new page is
#: a new file there.
PAGE_FILES = sorted((Path(__file__).parent / "pages").glob("[0-9]_*.py"))
#: The heavy libraries every page needs (torch, transformers, peft, scikit-learn, plotly behind them).
HEAVY_MODULES = ("app_helpers", "osrm_core.merge", "osrm_core.pipeline", "osrm_core.viz")

st.set_page_config(page_title="OSRM workbench", page_icon="🧭", layout="wide")
page = st.navigation([st.Page(f, default=i == 0) for i, f in enumerate(PAGE_FILES)])

if not all(name in sys.modules for name in HEAVY_MODULES):
    # Only the first page of a server process gets here: later ones find the modules loaded.
    loading = st.empty()
    with loading.container():
        st.title("OSRM workbench")
        with st.spinner(
            "Loading the libraries (torch, transformers, peft, scikit-learn): about 10 s at the first "
            "page of a new server, longer on a busy machine ...",
            show_time=True,
        ):
            start = time.perf_counter()
            for name in HEAVY_MODULES:
                importlib.import_module(name)
            st.session_state["_osrm_import_seconds"] = time.perf_counter() - start
    loading.empty()

from app_helpers import SHARED_NOTE, init_state, shared_mode, sidebar_run  # noqa: E402

init_state()
with st.sidebar:
    sidebar_run(st.empty())
    if st.session_state.get("run_note"):
        st.warning(st.session_state.run_note)
    if shared_mode():
        st.caption(SHARED_NOTE)

page.run()
