"""The evidence study of the open run: does OSRM keep tasks after merging, and when? Shows the
latest study's findings, tables and curves, and runs a quick study on this run's tasks."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from app_helpers import (
    ProgressDisplay,
    require_run,
    shared_config_problem,
    show_figure,
    show_table,
    stop_on_damage,
)
from app_helpers.study_view import study_plan
from osrm_core.rundir import RunDir
from osrm_core.study import quick_study_config, run_study
from osrm_core.study_report import find_studies, load_study_tables, read_findings, seed_mean_curves
from osrm_core.viz import study_curve_figure

TITLES = {
    "q1_merged": "1. Merged normalized score (best λ), mean and spread over seeds",
    "q2_single": "2. Single-task scores",
    "q4_samples": "4. Samples per task for the statistics",
    "q5_rank": "5. Rank",
    "q6_prediction": "6. Exact interference vs measured loss (Spearman)",
    "q7_own_energy": "7. Own-task energy seen by A",
    "q7_a_lr_scale": "7. Learning-rate scale of A",
}


def quick_study_section(run: RunDir) -> None:
    """The quick study on this run's tasks: its plan, and the button that runs it (progress in one slot)."""
    with st.expander("Run a quick study on this run's tasks"):
        quick = quick_study_config(run.config())
        arms, label = study_plan(quick)
        st.caption(
            f"{len(arms)} variants, {quick.base.train.steps} steps each, on "
            f"{', '.join(t.name for t in quick.base.tasks)}; written to {run.path / 'studies' / quick.name}. "
            "Resumes where it stopped."
        )
        st.markdown("\n".join(f"- {arm}" for arm in arms))
        if len(quick.base.tasks) < len(run.config().tasks):
            st.caption("The demo's sentence-pair task is left out: it needs about 80 steps to learn at all.")
        problem = shared_config_problem(run.config(), run)
        if problem:
            st.error(f"A study cannot run here: {problem}")
        start = not problem and st.button("Run quick study", key="study_run")
    # One slot below the form: the progress of a study running now, else the note that there is
    # none (so no stale "no study yet" stays under a running study).
    slot = st.empty()
    if start:
        display = ProgressDisplay("Running the quick study", 2 * len(arms) + 1, where=slot, label=label)
        try:
            run_study(quick, run.path / "studies" / quick.name, progress=display.progress, on_stage=display.on_stage)
        except ValueError as err:
            display.finish(f"Study failed: {err}", ok=False)
            st.error(str(err))
        else:
            display.finish("Study finished")
    elif not find_studies(run.path):
        slot.info("This run has no study yet: run the quick study above, or `osrm study` from the command line.")


def findings_section(study: Path) -> None:
    try:
        found, from_json = read_findings(study)
    except (ValueError, OSError) as err:  # a damaged findings.json or report (UnicodeDecodeError is a ValueError)
        stop_on_damage(err)
    if found:
        st.subheader("Findings")
        st.markdown("\n".join(f"- {line}" for line in found))
    if not from_json:
        st.caption("This study was written before studies kept findings.json: its findings are read from report.md.")


def curves_section(tables: dict) -> None:
    curves = tables.get("curves")
    if curves is None or curves.empty:
        return
    mean = seed_mean_curves(curves)
    method = st.selectbox("Merge method", sorted(mean["method"].unique()), key="study_method")
    show_figure(study_curve_figure(mean[mean["method"] == method], title=f"{method}: normalized average vs lambda"),
                f"study_{method}", "study_fig")


def tables_section(study: Path, tables: dict) -> None:
    for name, title in TITLES.items():
        if name in tables:
            st.subheader(title)
            show_table(tables[name], name, f"study_{name}")
    with st.expander("Full report (markdown)"):
        try:
            st.markdown((study / "report.md").read_text(encoding="utf-8"))
        except (ValueError, OSError) as err:
            stop_on_damage(err)


def render() -> None:
    st.title("Study")
    run = require_run()
    st.markdown(
        "A study reruns this run's tasks over inits (standard, OSRM, the mean-null-space variant, "
        "`osrm_gen`, EVA), training constraints, seeds, samples for the statistics, rank and the "
        "learning rate of A, and answers the paper's questions: merged scores, single-task cost, "
        "robustness to λ, and whether exact interference predicts the loss from merging. "
        "Command line: `osrm study STUDY.yaml --out RUN/studies/NAME`."
    )
    quick_study_section(run)
    studies = find_studies(run.path)
    if not studies:
        st.stop()
    chosen = st.selectbox("Study", studies, format_func=lambda p: p.name, key="study_pick")
    try:
        tables = load_study_tables(chosen)
    except (ValueError, OSError) as err:  # a damaged table
        stop_on_damage(err)
    findings_section(chosen)
    curves_section(tables)
    tables_section(chosen, tables)


render()
