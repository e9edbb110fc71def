"""Home: open or create a run, run the pipeline, see its summary."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

from app_helpers import (
    ArchiveError,
    ProgressDisplay,
    current_run,
    download,
    list_runs,
    open_run,
    open_uploaded_run,
    run_problems,
    run_summary,
    runs_root,
    safe_name,
    save_task_dir,
    shared_config_problem,
    shared_mode,
    show_figure,
    show_table,
    zip_directory,
)
from app_helpers.home_form import PRESETS, apply_preset, form_to_config, settings_widgets
from app_helpers.home_tasks import task_entries, uploaded_tasks
from osrm_core.demo import DEMO_TASKS
from osrm_core.lock import DirLock
from osrm_core.pipeline import run_experiment
from osrm_core.rundir import RunDir, inits_vs_standard, stage_count
from osrm_core.settings import ConfigError, RunConfig, demo_config
from osrm_core.task_spec import parse_task_spec
from osrm_core.viz import edge_notes, summary_figure, summary_tables

MODEL_KINDS = {"packaged": "Packaged all-MiniLM-L6-v2 (offline)", "hub": "Hugging Face id", "path": "Local path"}


def open_section() -> None:
    """Open a run: a folder on this machine (not in shared mode), one of the listed runs, a zip."""
    if shared_mode():
        st.subheader("Your runs in this session")
    else:
        st.subheader("A run directory on this machine")
        path_text = st.text_input("Path of a run directory", key="home_open_path", placeholder="runs/demo-quick")
        if st.button("Open", key="home_open_button"):
            _open(path_text.strip())
    found = list_runs()
    if found:
        choice = st.selectbox(f"Runs under {runs_root()}/", [str(p) for p in found], key="home_run_choice",
                              format_func=lambda p: Path(p).name)
        if st.button("Open selected run", key="home_open_choice"):
            _open(choice)
    else:
        st.caption("No runs of this session yet." if shared_mode() else f"No runs under {runs_root().resolve()} yet.")

    st.subheader("A zipped run")
    st.caption(
        "A zip of a run folder (config.yaml, manifest.json, stats/, adapters/, results/). It is "
        "unpacked into a temporary folder of your session only, removed when the session ends."
    )
    upload = st.file_uploader("Zipped run", type=["zip"], key="home_run_zip")
    if upload is not None and st.session_state.get("home_run_zip_done") != upload.file_id:
        try:
            run = open_uploaded_run(upload.getvalue(), upload.name)
            st.session_state.home_run_zip_done = upload.file_id
            st.success(f"Opened the uploaded run {run.path.name}")
        except (ArchiveError, ValueError, OSError) as err:
            st.error(f"{upload.name}: {err}")


def _open(path: str) -> None:
    try:
        run = open_run(path)
        st.success(f"Opened {run.path}")
    except (ValueError, OSError) as err:
        st.error(str(err))


def model_section() -> str | None:
    """The base model: packaged, a Hub id or a local folder (packaged only in shared mode)."""
    st.subheader("Base model")
    kind = st.radio("Base model", ["packaged"] if shared_mode() else list(MODEL_KINDS), format_func=MODEL_KINDS.get,
                    horizontal=True, key="home_model_kind", label_visibility="collapsed")
    if kind == "packaged" or shared_mode():
        return None
    placeholder = "bert-base-uncased" if kind == "hub" else "/path/to/model"
    return st.text_input("Model id or folder", key="home_model_name", placeholder=placeholder).strip() or None


def new_run_section() -> None:
    """Presets, model, tasks and settings; the config they make, and the button that runs it."""
    for col, (key, (label, config, help_text)) in zip(st.columns([1, 1, 1, 2]), PRESETS.items()):
        col.button(label, key=key, on_click=apply_preset, args=(config,), help=help_text)
    model_name = model_section()
    st.subheader("Tasks")
    demo_keys = st.multiselect("Built-in demo tasks (synthetic, no download)", list(DEMO_TASKS),
                               key="home_demo_tasks", format_func=lambda k: f"{k}: {DEMO_TASKS[k]}")
    own_tasks, task_errors = uploaded_tasks(int(st.session_state.get("home_seed", 0)))
    st.subheader("Settings")
    settings_widgets()
    run_name = safe_name(st.text_input("Run name", key="home_name"), "run")
    out = RunDir(runs_root() / run_name)
    st.caption(f"The run is written to `{out.path}`; an unfinished run with the same settings resumes.")
    config = None
    try:
        config = form_to_config(st.session_state, name=run_name, model=model_name,
                                tasks=task_entries(demo_keys, own_tasks, out))
    except ConfigError as err:
        st.error(str(err))
    if config is not None and task_errors:
        st.error(f"Fix or remove the task files with errors: {', '.join(task_errors)}")
    elif config is not None:
        with st.expander("config.yaml of this run"):
            st.code(config.to_yaml(), language="yaml")
    ready = config is not None and not task_errors
    if st.button("Run the pipeline", type="primary", key="home_run", disabled=not ready) and ready:
        start_run(config, out, demo_keys, own_tasks)


def start_run(config: RunConfig, out: RunDir, demo_keys: list[str], own_tasks: list) -> None:
    display = ProgressDisplay(f"Running {config.name}", stage_count(config))
    try:
        with DirLock(out.path):  # the task files too: another writer stops before any file
            tasks = None
            if own_tasks:
                # The pipeline gets every task as data; uploaded ones are saved so the config's
                # spec can load them again (resume, command line).
                for task in own_tasks:
                    save_task_dir(task, out.task_data_path(task.name))
                tasks = [parse_task_spec(f"demo:{k}", name=k, seed=config.seed) for k in demo_keys] + own_tasks
            run_experiment(config, out.path, progress=display.progress, on_stage=display.on_stage, tasks=tasks)
    except (ValueError, OSError, RuntimeError) as err:
        display.finish(f"The run stopped: {err}", ok=False)
        st.error(str(err))
    else:
        display.finish(f"Finished {config.name}")
        open_run(out.path)  # the sidebar names it now
        st.success(f"Finished and opened {out.path}; see the summary tab and the pages.")


def summary_section() -> None:
    """The open run: its settings and status, then its scores (or a button that resumes it)."""
    run = current_run()
    if run is None:
        st.info("No run is open: open one or start a new run in the other tabs.")
        return
    try:
        config = run.config()
    except ConfigError as err:
        st.error(str(err))
        config = None
    for problem in run_problems(run):
        st.error(f"Damaged file in this run: {problem}")
    run_header(run, config)
    summary = run_summary(run)
    if summary is not None:
        scores(summary, config)
    else:
        st.info("This run has no merge results yet.")
        problem = None if config is None else shared_config_problem(config, run)
        if problem:
            st.error(f"This run cannot be resumed here: {problem}")
        elif config is not None and st.button("Resume this run", key="home_resume"):
            display = ProgressDisplay(f"Resuming {config.name}", stage_count(config))
            try:
                run_experiment(config, run.path, progress=display.progress, on_stage=display.on_stage)
            except (ValueError, OSError, RuntimeError) as err:
                display.finish(f"The run stopped: {err}", ok=False)
                st.error(str(err))
            else:
                display.finish(f"Finished {config.name}")
                st.rerun()
    download("Download this run (zip)", lambda: zip_directory(run.path), run.path.name, "zip", "home_run_download")


def run_header(run: RunDir, config: RunConfig | None) -> None:
    try:
        manifest = run.manifest()
    except ValueError:  # named as a damaged file
        manifest = {"stages": {}}
    st.subheader(f"Run {config.name if config else run.path.name}")
    c1, c2, c3, c4 = st.columns(4)
    c1.metric("Tasks", len(config.tasks) if config else "?")
    c2.metric("Inits", len(config.inits) if config else "?", help=", ".join(config.inits) if config else None)
    c3.metric("Rank", " / ".join(dict.fromkeys(str(config.for_init(i).rank) for i in config.inits)) if config else "?",
              help=", ".join(f"{i}: {config.for_init(i).rank}" for i in config.inits) if config else None)
    c4.metric("Status", manifest.get("status", "unfinished"), help=f"{len(manifest.get('stages', {}))} units of work done")
    if config:
        tasks = ", ".join(f"{t.name} ({t.spec if t.spec.startswith('demo:') else 'file'})" for t in config.tasks)
        st.caption(f"Model: {config.model or 'packaged all-MiniLM-L6-v2'} · inits: {', '.join(config.inits)} · "
                   f"tasks: {tasks}")
        with st.expander("config.yaml"):
            st.code(config.to_yaml(), language="yaml")


def scores(summary: dict, config: RunConfig | None) -> None:
    """Single-task scores, the best merged point per method, and each init against standard."""
    single, best = summary_tables(summary)
    st.markdown("**Single-task scores** (each task with only its own adapter)")
    show_table(single, "single_task_scores", "home_single")
    if best.empty:
        return
    st.markdown("**Best merged point per method** (highest average normalized score over λ)")
    show_table(best, "best_merged", "home_best")
    if config is not None:  # a best lambda at the end of the run's grid may lie beyond it
        grid = best[["init", "method"]].merge(pd.DataFrame({"lambda": config.merge.lambdas}), how="cross")
        for note in edge_notes(grid, best):
            st.caption(f"Note: {note}")
    show_figure(summary_figure(best, title="Best merged score per method and init"), "best_merged", "home_best_fig")
    versus = inits_vs_standard(best)
    if not versus.empty:
        st.markdown("**Each init minus standard** at its best merged point, plain merged average and normalized")
        show_table(versus, "inits_vs_standard", "home_diff")


def render() -> None:
    if "home_rank" not in st.session_state:
        apply_preset(demo_config(quick=True))
    st.title("OSRM workbench")
    st.markdown(
        "Fine-tune one LoRA adapter per task on one base model, merge them, and see how much they "
        "interfere. OSRM (Zhang & Zhou, ACL 2025, [arXiv:2505.22934](https://arxiv.org/abs/2505.22934)) "
        "starts each adapter's `A` in the directions the *other* tasks' features barely use, so "
        "that after merging `B_j A_j h_i` stays small. Open a run or start one here; the pages on "
        "the left show its eigenspectra, interference, subspace angles and merge sweeps."
    )
    tab_summary, tab_open, tab_new = st.tabs(["Summary of the open run", "Open a run", "New run"])
    with tab_open:
        open_section()
    with tab_new:
        new_run_section()
    with tab_summary:  # last: a run opened or finished in the other tabs shows here
        summary_section()


render()
