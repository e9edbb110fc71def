"""OSRM workbench: the frame of the app. Page config, session state and the sidebar are set here
once; each page in ``pages/`` is a view that wires widgets to :mod:`osrm_core` and draws figures.

Start with ``streamlit run app.py``; ``OSRM_RUN_DIR=runs/NAME streamlit run app.py`` opens a
run at the start of every session.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from app_helpers import SHARED_NOTE, close_run, current_run, init_state, shared_mode

#: The views, in menu order: every file of pages/, titled by its name (``5_Adapter_diagnosis.py``
#: is "Adapter diagnosis"); a new page is a new file there.
PAGE_FILES = sorted((Path(__file__).parent / "pages").glob("[0-9]_*.py"))

st.set_page_config(page_title="OSRM workbench", page_icon="🧭", layout="wide")
init_state()
page = st.navigation(
    [st.Page(f, title=f.stem.split("_", 1)[1].replace("_", " "), default=i == 0) for i, f in enumerate(PAGE_FILES)]
)

run = current_run()
with st.sidebar:
    st.markdown("**Open run**")
    if run is None:
        st.caption("none")
    else:
        st.code(str(run.path), language=None)
        st.button("Close this run", key="home_close", on_click=close_run)
    if st.session_state.get("run_note"):
        st.warning(st.session_state.run_note)
    if shared_mode():
        st.caption(SHARED_NOTE)

page.run()
