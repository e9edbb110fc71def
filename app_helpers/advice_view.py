"""The Adapter diagnosis page's merge advice and merge form: what the advice puts in the form,
its charts and tables, and the rank and size a merged adapter will have."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import streamlit as st

from osrm_core.advisor import ADVISE_BUDGET, ADVISE_LAMBDAS, ADVISE_METHODS, advise, grid_table
from osrm_core.merge import MERGE_METHODS
from osrm_core.settings import ConfigError
from osrm_core.workflows import load_base_for

from .home_form import parse_numbers
from .loaders import fresh_model
from .uploads import merged_adapter_zip, text_task
from .widgets import ProgressDisplay, download, merge_param_widgets, show_figure, show_table


def form_values(recommended: dict) -> tuple[float, list[float]]:
    """The merge form's lambda and weights for the advice's recommendation, as its sentence
    states them: a grid point (one lambda for all adapters, weights all equal) is lambda
    ``w`` with weights 1; searched weights are lambda 1 with those weights. The merge is the
    same (adapter i enters as ``lambda * w_i * Delta_W_i``)."""
    weights = [float(w) for w in recommended["weights"]]
    if weights and all(w == weights[0] for w in weights):
        return weights[0], [1.0] * len(weights)
    return 1.0, weights


def merged_size(adapters: dict, method: str, rank: int | None = None) -> dict:
    """The rank a merged adapter will be written at (at most: the exact rank is found when it is
    factored) and its size in float32 bytes, against the parts'. ``rank``: a truncation rank."""
    from osrm_core.adapters import union_layers

    shapes = union_layers(adapters)
    ranks = {layer: sum(a.layers[layer].rank for a in adapters.values() if layer in a.layers) for layer in shapes}
    full = max(min(shape) for shape in shapes.values())
    bound = max(min(ranks[layer], min(shape)) for layer, shape in shapes.items()) if MERGE_METHODS[method].low_rank \
        else full
    written = bound if rank is None else min(int(rank), bound)
    size = sum(written * (d_out + d_in) * 4 for d_out, d_in in shapes.values())
    parts = sum(lw.rank * (lw.B.shape[0] + lw.A.shape[1]) * 4 for a in adapters.values() for lw in a.layers.values())
    return {"rank": written, "bound": bound, "full": full, "bytes": size, "parts_bytes": parts,
            "parts_rank": max(lw.rank for a in adapters.values() for lw in a.layers.values())}


def megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def size_note(adapters: dict, method: str, rank: int | None) -> tuple[str, bool]:
    """The merge form's note on the rank and size it will write, and whether it is a warning
    (a merge much larger than its parts, written without truncation)."""
    s = merged_size(adapters, method, rank)
    low_rank = MERGE_METHODS[method].low_rank
    exact = "up to " if rank is None and low_rank else ""
    text = (f"This merge writes rank {exact}{s['rank']} per layer, about {megabytes(s['bytes'])} of float32 "
            f"weights (the uploaded adapters: rank {s['parts_rank']}, {megabytes(s['parts_bytes'])} together).")
    if rank is not None:
        return text + " Truncated by SVD: the model card states the error per layer.", False
    if not low_rank:
        text += (f" {method} changes ΔW entry by entry (or by Gram matrices), so the merge is full rank "
                 f"({s['full']}); set a truncation rank to write a smaller adapter.")
    return text, s["bytes"] > 2 * s["parts_bytes"]


def show_advice(advice) -> None:
    """The advice: the sentence, held-out charts (the chosen candidate starred, the best held-out
    one named), the candidates' table, the validation grid and the shares."""
    summary = advice.summary.assign(recommended=advice.summary["candidate"] == advice.recommended["candidate"])
    st.success(f"Recommended: {advice.reason}")
    for note in advice.notes:  # what the memory plan decided (projected statistics, RegMean left out)
        st.info(note)
    lower = advice.lower_is_better
    c1, c2 = st.columns(2)
    with c1:
        show_figure(advice_figure_of(summary, "score", "Held-out score (absolute)", lower), "advice_score",
                    "diag_adv_score")
    with c2:
        show_figure(advice_figure_of(summary, "normalized", "Held-out score / single-task score", lower),
                    "advice_normalized", "diag_adv_norm")
    st.caption(
        "★ marks the candidate the advisor chose on the validation share: the plain default (task arithmetic, "
        f"λ 1) unless another candidate beats it there by more than {100 * advice.settings.get('selection_margin', 0):.1f} "
        "points, the uncertainty of so few texts. The held-out share only reports; choosing on it would leave "
        "no unbiased estimate. When another candidate is best held-out, compare the intervals: with a few "
        "dozen texts they usually overlap."
    )
    show_table(
        summary.sort_values("score", ascending=lower)[
            ["method", "density", "weights", "origin", "validation", "score", "low", "high", "normalized", "recommended"]
        ],
        "advice_candidates",
        "diag_adv_table",
    )
    with st.expander("The search on the validation share"):
        st.caption("Validation score of each grid point: rows are method and density, columns λ.")
        show_table(grid_table(advice.search), "advice_grid", "diag_adv_grid")
    st.caption(
        f"{advice.evaluations} evaluations in {advice.seconds:.1f} s. Held-out texts per task: "
        + ", ".join(f"{n} {len(s['heldout'])}" for n, s in advice.shares.items())
        + ". Single-task scores (held-out): "
        + ", ".join(
            f"{r.task} {r.score:.3f}" for r in advice.single[advice.single["share"] == "heldout"].itertuples()
        )
    )


def advice_figure_of(summary: pd.DataFrame, y: str, title: str, lower: bool):
    from osrm_core.viz import advice_figure

    return advice_figure(summary, y=y, title=title, lower_is_better=lower)


def weights_text(weights: Sequence[float]) -> str:
    return ", ".join(f"{w:g}" for w in weights)


#: The two sets of adapters the merge form builds from.
SOURCES = {"uploaded": "as uploaded", "posthoc_osrm": "after post-hoc OSRM"}


def prefill_merge_form(method: str, lam: float, weights: list[float], params: dict) -> None:
    """Put a recommended merge into the merge form (its widgets are drawn later in this run)."""
    ss = st.session_state
    ss["diag_merge_source"] = "uploaded"
    ss["diag_merge_method"] = method
    ss["diag_merge_lambda"] = float(lam)
    ss["diag_merge_weights"] = weights_text(weights)
    for spec in MERGE_METHODS[method].param_specs():  # the widgets of merge_param_widgets
        if params.get(spec.name) is not None and not pd.isna(params[spec.name]):
            ss[f"diag_merge_{spec.name}"] = params[spec.name]


def _advise(inputs, methods: list[str], lambdas: list[float], budget: int) -> None:
    """The merge advisor on the sample texts (validation search, held-out report); fills the merge form."""
    tasks = [text_task(n, inputs.texts[n], None if inputs.causal else inputs.labels[n]) for n in inputs.names]
    display = ProgressDisplay("Searching for the best merge", 6)
    # the search writes merged weights in place: a private model
    loader = load_base_for(inputs.adapters, inputs.model_name) if inputs.causal else fresh_model(inputs.model_name)
    advice = advise(loader[0], inputs.tokenizer, inputs.adapters, tasks, methods=methods, lambdas=lambdas,
                    budget=budget, max_length=inputs.max_length, progress=display.progress, on_stage=display.on_stage)
    display.finish(f"Advice ready: {advice.evaluations} evaluations in {advice.seconds:.1f} s")
    st.session_state["diag_advice"] = {"key": inputs.key, "advice": advice}
    lam, weights = form_values(advice.recommended)  # as the sentence says it: "lambda 1.3" is λ 1.3 with weights 1
    prefill_merge_form(advice.recommended["method"], lam, weights, {"density": advice.recommended["density"]})


def advice_section(inputs) -> None:
    """The merge advisor's form and, once asked, its advice."""
    st.subheader("Merge advice")
    st.markdown(
        "The advisor splits each task's texts into a **validation** share, on which it searches the "
        "merge method, density, λ and then a weight per adapter, and a **held-out** share, on which "
        "it reports the finalists (the best λ of each method and density, and the weights found) with a "
        "95% interval. Absolute scores come first: a normalized score (merged / single) looks good when "
        "the single-task score is poor. The recommended settings fill the merge form below."
        + (" Causal-LM adapters: each task is scored by the mean token loss of its texts (lower is better)."
           if inputs.causal else "")
    )
    unlabelled = [] if inputs.causal else [n for n in inputs.names if inputs.labels.get(n) is None]
    if unlabelled:
        st.caption(f"Advice needs labels for every task; without labels: {', '.join(unlabelled)}.")
    c1, c2, c3 = st.columns(3)
    methods = c1.multiselect("Methods", list(MERGE_METHODS), default=list(ADVISE_METHODS), key="diag_methods")
    grid = c2.text_input("Lambda grid", ", ".join(f"{x:g}" for x in ADVISE_LAMBDAS), key="diag_lambdas")
    budget = c3.number_input("Evaluations for per-adapter weights", 0, 500, ADVISE_BUDGET, step=2, key="diag_budget",
                             help="Each evaluation scores every task's validation texts once")
    if st.button("Get merge advice", key="diag_advise_button", type="primary"):
        try:
            lambdas = parse_numbers(grid, "lambda grid")
            if unlabelled:
                raise ConfigError(f"task {unlabelled[0]!r} has no labels: upload a CSV with a label column for every "
                                  "task")
            if not methods:
                raise ConfigError("choose at least one merge method")
            _advise(inputs, methods, lambdas, int(budget))
        except ValueError as err:
            st.error(str(err))
    advised = st.session_state.get("diag_advice")
    if advised is not None and advised["key"] == inputs.key:
        show_advice(advised["advice"])


def merge_form_section(inputs, projected: dict) -> None:
    """Build one merged adapter (as uploaded, or of the post-hoc OSRM ``projected`` ones) and download it."""
    ss = st.session_state
    st.subheader("Build a merged adapter")
    st.caption(
        "One PEFT LoRA adapter with the merged ΔW of every layer (exact: the rank it needs); each "
        "task's head is written under heads/. Loads with plain `PeftModel.from_pretrained` on the base model. "
        "Adapter i enters the merge as w_i ΔW_i and λ scales the result."
    )
    ss.setdefault("diag_merge_lambda", 1.0)
    ss.setdefault("diag_merge_weights", weights_text([1] * len(inputs.names)))
    c1, c2, c3, c4 = st.columns(4)
    source = c1.radio("Adapters", list(SOURCES), format_func=SOURCES.get, key="diag_merge_source")
    method = c2.selectbox("Method", list(MERGE_METHODS), key="diag_merge_method")
    lam = c3.number_input("λ", 0.01, 10.0, step=0.05, key="diag_merge_lambda")
    weights = c4.text_input(f"Weights ({', '.join(inputs.names)})", key="diag_merge_weights")
    params = merge_param_widgets(method, "diag_merge")
    truncate = st.number_input("Truncate to rank (0: exact, the rank the merge needs)", 0, 4096, 0, step=8,
                               key="diag_merge_rank") or None
    note, warn = size_note(inputs.adapters, method, truncate)
    (st.warning if warn else st.caption)(note)
    if st.button("Build the merged adapter", key="diag_merge_button"):
        chosen = inputs.adapters if source == "uploaded" else projected
        name = f"merged_{method}_{source}"
        try:
            ss["diag_merged"] = {"key": inputs.key, "name": name, "zip": merged_adapter_zip(
                chosen, name, method, lam=float(lam), weights=parse_numbers(weights, "weights"), stats=inputs.stats,
                rank=truncate, **params)}
        except ValueError as err:
            st.error(str(err))
    built = ss.get("diag_merged")
    if built is not None and built["key"] == inputs.key:
        download("Download merged adapter (zip)", lambda: built["zip"], built["name"], "zip", "diag_merged_dl")
