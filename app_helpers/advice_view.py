"""The Adapter diagnosis page's merge advice and merge form: what the advice puts in the form,
its charts and tables, and the rank and size a merged adapter will have."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import streamlit as st

from .widgets import show_figure, show_table


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
    from osrm_core.merge import MERGE_METHODS

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
    from osrm_core.merge import MERGE_METHODS

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
    from osrm_core.advise import grid_table

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
