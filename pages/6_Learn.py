"""Learn: why merged LoRA adapters interfere and how OSRM avoids it, on toy clouds you can
move, then the same comparison on the real default model."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from app_helpers import real_model_comparison, show_figure, show_table
from osrm_core.merge import method_table
from osrm_core.toy import toy_adapters, toy_moments, toy_samples, toy_table
from osrm_core.viz import layer_ratio_figure, toy_figure


def intro() -> None:
    """The maths of interference and of OSRM's A."""
    st.title("Learn: interference and OSRM")

    st.markdown(
        "A LoRA layer adds `s · B A h` to `W₀ h`. `A` (r × d) decides **which directions of the input** "
        "the adapter reads; `B` decides what it writes. After merging, task 1's inputs `h₁` also go "
        "through task 2's adapter, and the damage is `s · B₂ A₂ h₁`: small whenever `A₂ h₁` is small, "
        "whatever `B₂` learned."
    )
    st.latex(r"y = W_0 h + \sum_j s_j B_j A_j h \qquad \text{shift on task } i:\ \sum_{j \ne i} s_j B_j A_j h_i")
    st.latex(
        r"\mathbb{E}\,\lVert A_j h_i \rVert^2 = \operatorname{tr}\!\left(A_j \Sigma_i A_j^\top\right),\qquad \Sigma_i = \mathbb{E}[h_i h_i^\top]"
    )
    st.latex(
        r"A_i^{\text{OSRM}} = \arg\min_{A A^\top = I_r} \sum_{j \ne i} \operatorname{tr}(A \Sigma_j A^\top)"
        r" = \text{eigenvectors of the } r \text{ smallest eigenvalues of } \textstyle\sum_{j\ne i}\Sigma_j"
    )
    st.markdown(
        "The minimum equals the sum of those r eigenvalues (Ky Fan). A standard LoRA starts `A` at "
        "random, so it reads about `r/d` of every other task's energy."
    )


def toy_section() -> None:
    """Toy clouds: standard and OSRM A of one task against the others' features."""
    st.subheader("Toy tasks")
    c1, c2, c3, c4, c5 = st.columns(5)
    dim = c1.radio("Dimensions", [2, 3], horizontal=True, key="learn_dim")
    n_tasks = c2.radio("Tasks", [2, 3], horizontal=True, key="learn_tasks")
    angle = c3.slider("Angle between tasks (°)", 0, 90, 60, key="learn_angle")
    spread = c4.slider("Spread across the main axis", 0.05, 1.0, 0.2, step=0.05, key="learn_spread")
    rank = c5.slider("Rank r", 1, dim - 1, 1, key="learn_rank") if dim == 3 else 1
    names = [f"task {k + 1}" for k in range(n_tasks)]
    target = st.selectbox(
        "Adapter of", list(range(n_tasks)), index=n_tasks - 1, format_func=lambda k: names[k], key="learn_target"
    )

    moments = toy_moments(n_tasks, angle, spread, dim)
    clouds = dict(zip(names, toy_samples(moments, n=250, seed=0)))
    A = toy_adapters(moments, target, rank, seed=1)
    adapters = {"standard A (random)": A["standard"], "OSRM A": A["osrm"]}
    fig = toy_figure(clouds, adapters, title=f"Clouds of the tasks and the row space of {names[target]}'s A")
    left, right = st.columns([3, 2])
    with left:
        show_figure(fig, "toy", "learn_toy")
    with right:
        table = toy_table(adapters, moments, names, target)
        std_other, osrm_other = table["other tasks"].tolist()
        st.metric(f"‖A h‖ on the other tasks, standard A of {names[target]}", f"{std_other:.3f}")
        st.metric(
            f"‖A h‖ on the other tasks, OSRM A of {names[target]}",
            f"{osrm_other:.3f}",
            delta=f"{osrm_other - std_other:+.3f}",
            delta_color="inverse",
        )
        show_table(table, "toy_interference", "learn_toy_table")
        st.caption(
            f"The column on {names[target]} is the adapter's own task: OSRM may read little of it too. "
            "Turn the angle towards 0° and both tasks share their main axis: no direction is quiet "
            "for one and busy for the other, and OSRM can only pick the common weak axis."
        )


def methods_section() -> None:
    st.subheader("The merge methods")
    st.markdown(
        "Every method merges the exact `ΔW_i = s_i B_i A_i` of each layer (never A and B separately). "
        "OSRM changes the adapters so that any of them interferes less; these change how finished adapters are combined."
    )
    show_table(pd.DataFrame(method_table()), "merge_methods", "learn_methods")


def real_model_section() -> None:
    """OSRM against a random A on the packaged model and the demo tasks (on request)."""
    st.subheader("The same comparison on the real model")
    st.markdown(
        "Statistics of the four built-in demo tasks on the packaged all-MiniLM-L6-v2 (32 texts each), "
        "then for each task and layer: the other tasks' energy `Σ_j E‖A h_j‖²` seen by OSRM's `A` "
        "divided by that seen by a random orthonormal `A` of the same rank."
    )
    c1, c2 = st.columns(2)
    real_rank = c1.select_slider("Rank r", [1, 2, 4, 8, 16, 32], value=8, key="learn_real_rank")
    if c2.button("Run on the real model", key="learn_real_button"):
        with st.spinner("Loading the model and collecting statistics ..."):
            st.session_state["learn_real"] = {
                "rank": real_rank,
                "table": real_model_comparison(rank=int(real_rank)),
            }
    real = st.session_state.get("learn_real")
    if real is not None:
        table = real["table"]
        st.caption(f"Rank {real['rank']}; query and value read the same hidden states, so one row per block.")
        show_figure(
            layer_ratio_figure(table, title="OSRM / random, other tasks' energy per layer"),
            "real_ratio",
            "learn_real",
        )
        st.metric("Median ratio OSRM / random", f"{table['ratio'].median():.2e}")
        show_table(table, "real_model_comparison", "learn_real_table")


def render() -> None:
    intro()
    toy_section()
    methods_section()
    real_model_section()


render()
