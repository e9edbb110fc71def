"""Home: open or create a run, run the pipeline, see its summary."""

from __future__ import annotations

import copy
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
from app_helpers.home_tasks import uploaded_tasks
from osrm_core.constraints import CONSTRAINTS
from osrm_core.demo import DEMO_TASKS
from osrm_core.inits import INITS
from osrm_core.lock import DirLock
from osrm_core.merge import MERGE_METHODS, all_param_specs
from osrm_core.pipeline import run_experiment
from osrm_core.settings import ConfigError, RunConfig, demo_config, merge_ready_config, parse_values
from osrm_core.task_spec import parse_task_spec
from osrm_core.viz import edge_notes, summary_figure, summary_tables

SHARED = shared_mode()

MODEL_KINDS = {
    "packaged": "Packaged all-MiniLM-L6-v2 (offline)",
    "hub": "Hugging Face id",
    "path": "Local path",
}


def _numbers(text: str, field: str) -> list[float]:
    try:
        values = [float(x) for x in text.replace(";", ",").split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{field}: write numbers separated by commas, got {text!r}") from None
    if not values:
        raise ConfigError(f"{field}: give at least one number")
    return values


#: The merge methods' parameters besides density (each with its sweep list in the settings).
OTHER_PARAMS = [spec for spec in all_param_specs().values() if spec.name != "density"]


#: An init's own settings (``per_init``), each a widget per selected init; empty takes the run's.
PER_INIT_FIELDS = ("rank", "alpha", "constraint", "lr", "a_lr_scale")


def _per_init_key(init: str, field: str) -> str:
    return f"home_per_{init}_{field}"


def per_init_widgets(inits: list[str]) -> None:
    """One row of widgets per selected init: its rank, alpha, constraint, lr and lr scale of A.

    The values live in ``home_per_init`` (by init), so an init taken out of the run and put back
    gets its settings back (Streamlit forgets the state of a widget it did not draw)."""
    ss = st.session_state
    saved = ss.setdefault("home_per_init", {})
    st.markdown("**Per-init settings** (empty: the run's; e.g. a higher rank with A frozen for osrm_gen)")
    for init in inits:
        for field in PER_INIT_FIELDS:
            if _per_init_key(init, field) not in ss:
                ss[_per_init_key(init, field)] = saved.get(init, {}).get(field)
        c0, c1, c2, c3, c4, c5 = st.columns([1, 1, 1, 1.3, 1, 1])
        c0.markdown(f"`{init}`")
        c1.number_input("rank", 1, 256, value=None, step=1, key=_per_init_key(init, "rank"), placeholder="run's")
        c2.number_input("alpha", 0.1, 1024.0, value=None, step=1.0, key=_per_init_key(init, "alpha"),
                        placeholder="run's")
        c3.selectbox("constraint", list(CONSTRAINTS), index=None, key=_per_init_key(init, "constraint"),
                     placeholder="run's")
        c4.number_input("learning rate", 1e-6, 1.0, value=None, step=1e-4, format="%.1e",
                        key=_per_init_key(init, "lr"), placeholder="run's")
        c5.number_input("lr scale of A", 0.0, 1000.0, value=None, step=0.5, key=_per_init_key(init, "a_lr_scale"),
                        placeholder="run's")
        saved[init] = {field: ss[_per_init_key(init, field)] for field in PER_INIT_FIELDS}


def per_init_settings(inits: list[str]) -> dict[str, dict]:
    """The per-init settings of the selected inits, without the empty ones."""
    saved = st.session_state.get("home_per_init", {})
    own = {init: {f: v for f, v in saved.get(init, {}).items() if v is not None} for init in inits}
    return {init: values for init, values in own.items() if values}


def apply_preset(config: RunConfig) -> None:
    """Put a config's values into the settings widgets (a button callback, before they draw)."""
    ss = st.session_state
    # Settings without a widget (warm-up, a_scale, ...) come from the preset.
    ss.home_base = config.model_dump(mode="json")
    ss.home_model_kind = "packaged" if config.model is None else "hub"
    ss.home_model_name = config.model or ""
    ss.home_demo_tasks = [t.spec[5:] for t in config.tasks if t.spec.startswith("demo:")]
    ss.home_name = config.name
    ss.home_rank = config.rank
    ss.home_alpha = float(config.alpha)
    ss.home_targets = ", ".join(config.target_modules or [])
    ss.home_samples = config.samples
    ss.home_steps = config.train.steps
    ss.home_lr = float(config.train.lr)
    ss.home_head_lr = float(config.train.head_lr or 0.0)
    ss.home_batch = config.train.batch_size
    ss.home_max_length = config.max_length
    ss.home_max_test = config.max_test or 0
    ss.home_methods = list(config.merge.methods)
    ss.home_lambdas = ", ".join(f"{x:g}" for x in config.merge.lambdas)
    ss.home_densities = ", ".join(f"{x:g}" for x in config.merge.densities)
    for spec in OTHER_PARAMS:
        ss[f"home_param_{spec.name}"] = ", ".join(str(v) for v in config.merge.params.get(spec.name, []))
    ss.home_seed = config.seed
    ss.home_inits = list(config.inits)
    ss.home_constraint = config.train.constraint
    ss.home_per_init = {init: own.model_dump() for init, own in config.per_init.items()}
    for key in [k for k in ss if str(k).startswith("home_per_") and k != "home_per_init"]:
        del ss[key]  # the per-init widgets start again from home_per_init
    ss.home_penalty_beta = config.train.penalty_beta
    ss.home_osrm_gen_eps = config.init_params["osrm_gen"]["eps"]
    ss.home_weighting = config.osrm_weighting
    ss.home_device = config.device


if "home_rank" not in st.session_state:
    apply_preset(demo_config(quick=True))

run = current_run()
st.title("OSRM workbench")
st.markdown(
    "Fine-tune one LoRA adapter per task on one base model, merge them, and see how much they "
    "interfere. OSRM (Zhang & Zhou, ACL 2025, [arXiv:2505.22934](https://arxiv.org/abs/2505.22934)) "
    "starts each adapter's `A` in the directions the *other* tasks' features barely use, so "
    "that after merging `B_j A_j h_i` stays small. Open a run or start one here; the pages on "
    "the left show its eigenspectra, interference, subspace angles and merge sweeps."
)

tab_summary, tab_open, tab_new = st.tabs(["Summary of the open run", "Open a run", "New run"])

# --------------------------------------------------------------------------- open a run

with tab_open:
    if SHARED:
        st.subheader("Your runs in this session")
    else:
        st.subheader("A run directory on this machine")
        path_text = st.text_input("Path of a run directory", key="home_open_path", placeholder="runs/demo-quick")
        if st.button("Open", key="home_open_button"):
            try:
                run = open_run(path_text.strip())
                st.success(f"Opened {run.path}")
            except (ValueError, OSError) as err:
                st.error(str(err))
    found = list_runs()
    if found:
        choice = st.selectbox(
            f"Runs under {runs_root()}/",
            [str(p) for p in found],
            key="home_run_choice",
            format_func=lambda p: Path(p).name,
        )
        if st.button("Open selected run", key="home_open_choice"):
            try:
                run = open_run(choice)
                st.success(f"Opened {run.path}")
            except (ValueError, OSError) as err:
                st.error(str(err))
    else:
        st.caption("No runs of this session yet." if SHARED else f"No runs under {runs_root().resolve()} yet.")

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

# --------------------------------------------------------------------------- new run

with tab_new:
    p1, p2, p3, _ = st.columns([1, 1, 1, 2])
    p1.button(
        "Quick preset",
        key="home_preset_quick",
        on_click=apply_preset,
        args=(demo_config(quick=True),),
        help="demo_config(quick=True): four demo tasks, 80 steps, standard LoRA (rank 8) against osrm_gen with "
             "A frozen at rank 32. Measured: 17.5 minutes on a 2-core CPU that was busy with other work "
             "(issue 23); less on a quiet machine or a GPU. The run shows its time left as it goes",
    )
    p2.button(
        "Full demo preset",
        key="home_preset_full",
        on_click=apply_preset,
        args=(demo_config(),),
        help="demo_config(): four demo tasks, 200 steps, five merge methods, the same two recipes",
    )
    p3.button(
        "Merge-ready preset",
        key="home_preset_merge_ready",
        on_click=apply_preset,
        args=(merge_ready_config(),),
        help="merge_ready_config(): osrm_gen with A frozen at rank 32, 1,000 steps, the recipe that merged "
             "best at full length (reports/long-training); about 20 minutes on a 2-core CPU",
    )

    st.subheader("Base model")
    kind = st.radio(
        "Base model",
        ["packaged"] if SHARED else list(MODEL_KINDS),
        format_func=MODEL_KINDS.get,
        horizontal=True,
        key="home_model_kind",
        label_visibility="collapsed",
    )
    model_name = None
    if kind != "packaged" and not SHARED:
        model_name = (
            st.text_input(
                "Model id or folder",
                key="home_model_name",
                placeholder="bert-base-uncased" if kind == "hub" else "/path/to/model",
            ).strip()
            or None
        )

    st.subheader("Tasks")
    demo_keys = st.multiselect(
        "Built-in demo tasks (synthetic, no download)",
        list(DEMO_TASKS),
        key="home_demo_tasks",
        format_func=lambda k: f"{k}: {DEMO_TASKS[k]}",
    )
    seed = int(st.session_state.get("home_seed", 0))
    own_tasks, task_errors = uploaded_tasks(seed)

    st.subheader("Settings")
    c1, c2, c3, c4 = st.columns(4)
    c1.number_input("LoRA rank r", 1, 256, step=1, key="home_rank")
    c2.number_input("alpha", 0.1, 1024.0, step=1.0, key="home_alpha")
    c3.number_input("Samples per task for the statistics", 1, 100_000, step=16, key="home_samples")
    c4.text_input("Target modules (comma separated; empty: by architecture)", key="home_targets")
    c1, c2, c3, c4 = st.columns(4)
    c1.number_input("Training steps", 1, 100_000, step=10, key="home_steps")
    c2.number_input("Learning rate", 1e-6, 1.0, step=1e-4, format="%.1e", key="home_lr")
    c3.number_input("Batch size", 1, 1024, step=1, key="home_batch")
    c4.number_input("Seed", 0, 2**31 - 1, step=1, key="home_seed")
    c1, c2, c3 = st.columns(3)
    c1.multiselect("Inits", list(INITS), key="home_inits",
                   help="; ".join(f"{n}: {m.description}" for n, m in INITS.items()))
    c2.multiselect("Merge methods", list(MERGE_METHODS), key="home_methods")
    c3.text_input("Lambda grid", key="home_lambdas")
    with st.expander("More settings"):
        c1, c2, c3 = st.columns(3)
        c1.number_input("Max tokens per example", 2, 4096, step=8, key="home_max_length")
        c2.number_input("Test examples per task (0: all)", 0, 1_000_000, step=50, key="home_max_test")
        c3.text_input("Densities (TIES/DARE)", key="home_densities")
        c1, c2, c3 = st.columns(3)
        c1.selectbox(
            "Constraint during training", list(CONSTRAINTS), key="home_constraint"
        )
        c2.selectbox("OSRM weighting of the other tasks", ["equal", "tokens"], key="home_weighting")
        c3.selectbox("Device", ["cpu", "auto", "cuda", "mps"], key="home_device")
        c1, c2, c3 = st.columns(3)
        c1.number_input(
            "Head learning rate (0: the LoRA learning rate)",
            0.0,
            1.0,
            step=1e-3,
            format="%.1e",
            key="home_head_lr",
        )
        c1.number_input("Penalty weight beta (penalty, penalty_ratio)", 0.0, 1e6, step=1e-3, format="%.1e",
                        key="home_penalty_beta")
        c2.number_input("osrm_gen trade-off eps", 1e-6, 1e6, step=1e-2, format="%.1e", key="home_osrm_gen_eps")
        for col, spec in zip((c3, c1, c2, c3, c1), OTHER_PARAMS):
            col.text_input(f"Sweep {spec.name} (comma separated; empty: {spec.default})", key=f"home_param_{spec.name}",
                           help=spec.help)
        per_init_widgets(list(st.session_state.home_inits))

    run_name = safe_name(st.text_input("Run name", key="home_name"), "run")
    out_dir = runs_root() / run_name
    st.caption(f"The run is written to `{out_dir}`; an unfinished run with the same settings resumes.")

    def build_config() -> RunConfig:
        ss = st.session_state
        entries = [{"name": k, "spec": f"demo:{k}"} for k in demo_keys]
        for task in own_tasks:
            spec = str((out_dir / "data" / task.name).resolve())
            entries.append(
                {
                    "name": task.name,
                    "spec": spec,
                    "text": "text",
                    "label": "label",
                    "text_pair": "text_pair" if task.is_pair else None,
                    "metric": task.metric,
                }
            )
        targets = [t.strip() for t in ss.home_targets.split(",") if t.strip()] or None
        data = copy.deepcopy(ss.home_base)
        data.update(
            name=run_name,
            model=model_name,
            tasks=entries,
            rank=int(ss.home_rank),
            alpha=float(ss.home_alpha),
            target_modules=targets,
            samples=int(ss.home_samples),
            max_length=int(ss.home_max_length),
            max_test=int(ss.home_max_test) or None,
            inits=list(ss.home_inits),
            per_init=per_init_settings(list(ss.home_inits)),
            osrm_weighting=ss.home_weighting,
            init_params={"osrm_gen": {"eps": float(ss.home_osrm_gen_eps)}},
            seed=int(ss.home_seed),
            device=ss.home_device,
        )
        data["train"].update(
            steps=int(ss.home_steps),
            batch_size=int(ss.home_batch),
            lr=float(ss.home_lr),
            head_lr=float(ss.home_head_lr) or None,
            constraint=ss.home_constraint,
            penalty_beta=float(ss.home_penalty_beta),
        )
        data["merge"].update(
            methods=list(ss.home_methods),
            lambdas=_numbers(ss.home_lambdas, "lambda grid"),
            densities=_numbers(ss.home_densities, "densities"),
            params={spec.name: parse_values(ss[f"home_param_{spec.name}"]) for spec in OTHER_PARAMS
                    if ss[f"home_param_{spec.name}"].strip()},
        )
        return RunConfig.validate_dict(data, where="settings")

    try:
        config = build_config()
        config_error = None
    except ConfigError as err:
        config, config_error = None, str(err)
    if config_error:
        st.error(config_error)
    elif task_errors:
        st.error(f"Fix or remove the task files with errors: {', '.join(task_errors)}")
    else:
        with st.expander("config.yaml of this run"):
            st.code(config.to_yaml(), language="yaml")
    start = st.button(
        "Run the pipeline", type="primary", key="home_run", disabled=config is None or bool(task_errors)
    )
    if start and config is not None:
        display = ProgressDisplay(f"Running {config.name}", 2 + 2 * len(config.inits))
        try:
            with DirLock(out_dir):  # the task files too: another writer stops before any file
                tasks = None
                if own_tasks:
                    # The pipeline gets every task as data; uploaded ones are saved so the
                    # config's spec can load them again (resume, command line).
                    for task in own_tasks:
                        save_task_dir(task, out_dir / "data" / task.name)
                    tasks = [parse_task_spec(f"demo:{k}", name=k, seed=config.seed) for k in demo_keys] + own_tasks
                run_experiment(config, out_dir, progress=display.progress, on_stage=display.on_stage, tasks=tasks)
        except (ValueError, OSError, RuntimeError) as err:
            display.finish(f"The run stopped: {err}", ok=False)
            st.error(str(err))
        else:
            display.finish(f"Finished {config.name}")
            open_run(out_dir)  # the sidebar names it now
            st.success(f"Finished and opened {out_dir}; see the summary tab and the pages.")

# --------------------------------------------------------------------------- summary


with tab_summary:
    run = current_run()
    if run is None:
        st.info("No run is open: open one or start a new run in the other tabs.")
    else:
        try:
            config = run.config()
        except ConfigError as err:
            st.error(str(err))
            config = None
        for problem in run_problems(run):
            st.error(f"Damaged file in this run: {problem}")
        try:
            manifest = run.manifest()
        except ValueError:  # named above
            manifest = {"stages": {}}
        stages = manifest.get("stages", {})
        st.subheader(f"Run {config.name if config else run.path.name}")
        c1, c2, c3, c4 = st.columns(4)
        c1.metric("Tasks", len(config.tasks) if config else "?")
        c2.metric(
            "Inits", len(config.inits) if config else "?", help=", ".join(config.inits) if config else None
        )
        c3.metric("Rank", " / ".join(dict.fromkeys(str(config.for_init(i).rank) for i in config.inits))
                  if config else "?",
                  help=", ".join(f"{i}: {config.for_init(i).rank}" for i in config.inits) if config else None)
        c4.metric("Status", manifest.get("status", "unfinished"), help=f"{len(stages)} units of work done")
        if config:
            st.caption(
                f"Model: {config.model or 'packaged all-MiniLM-L6-v2'} · inits: {', '.join(config.inits)} · tasks: "
                + ", ".join(
                    f"{t.name} ({t.spec if t.spec.startswith('demo:') else 'file'})" for t in config.tasks
                )
            )
            with st.expander("config.yaml"):
                st.code(config.to_yaml(), language="yaml")
        summary = run_summary(run)
        if summary is None:
            st.info("This run has no merge results yet.")
            problem = None if config is None else shared_config_problem(config, run)
            if problem:
                st.error(f"This run cannot be resumed here: {problem}")
            elif config is not None and st.button("Resume this run", key="home_resume"):
                display = ProgressDisplay(f"Resuming {config.name}", 2 + 2 * len(config.inits))
                try:
                    run_experiment(config, run.path, progress=display.progress, on_stage=display.on_stage)
                except (ValueError, OSError, RuntimeError) as err:
                    display.finish(f"The run stopped: {err}", ok=False)
                    st.error(str(err))
                else:
                    display.finish(f"Finished {config.name}")
                    st.rerun()
        else:
            single, best = summary_tables(summary)
            st.markdown("**Single-task scores** (each task with only its own adapter)")
            show_table(single, "single_task_scores", "home_single")
            if not best.empty:
                st.markdown("**Best merged point per method** (highest average normalized score over λ)")
                show_table(best, "best_merged", "home_best")
                if config is not None:  # a best lambda at the end of the run's grid may lie beyond it
                    grid = best[["init", "method"]].merge(pd.DataFrame({"lambda": config.merge.lambdas}), how="cross")
                    for note in edge_notes(grid, best):
                        st.caption(f"Note: {note}")
                show_figure(
                    summary_figure(best, title="Best merged score per method and init"),
                    "best_merged",
                    "home_best_fig",
                )
                inits = list(dict.fromkeys(best["init"]))
                if "standard" in inits and len(inits) > 1:
                    # Plain merged average (what a merged model scores) and normalized (what merging
                    # cost each task): an init that learned less can lose less and still score lower.
                    diffs = []
                    for value, label in (("avg_score", "plain"), ("normalized_avg", "normalized")):
                        table = best.pivot_table(index="method", columns="init", values=value)
                        diffs += [(table[i] - table["standard"]).rename(f"{i} - standard ({label})")
                                  for i in inits if i != "standard"]
                    st.markdown("**Each init minus standard** at its best merged point, plain merged average and "
                                "normalized")
                    show_table(pd.concat(diffs, axis=1).reset_index(), "inits_vs_standard", "home_diff")
        download("Download this run (zip)", lambda: zip_directory(run.path), run.path.name, "zip", "home_run_download")
