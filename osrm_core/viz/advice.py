"""Merge-advisor figures: candidates on held-out texts."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from osrm_core.errors import OsrmInputError

from .common import _PALETTE, _finish, _unique


def candidate_label(row) -> str:
    """A candidate as the advice's sentence names it: ``ties d=0.5, λ 1.3`` (a grid point: one
    lambda for all adapters) or ``task_arithmetic, weights 1.3/0.9`` (searched weights)."""
    head = f"{row.method}{'' if pd.isna(row.density) else f' d={row.density:g}'}"
    parts = str(row.weights).split("/")
    if getattr(row, "origin", "grid") == "grid" and len(set(parts)) == 1:
        return f"{head}, λ {parts[0]}"
    return f"{head}, weights {row.weights}"


def advice_figure(summary: pd.DataFrame, *, y: str = "score", title: str = "",
                  lower_is_better: bool = False) -> go.Figure:
    """The merge advisor's candidates on held-out texts, best first: one marker per candidate
    (colour: method), labelled on the x axis (:func:`candidate_label`), the 95% interval as
    error bars for absolute scores. The chosen candidate (see :func:`osrm_core.advisor.advise`) is
    a star with a note; the best on the held-out share gets a note too when it is another one.

    ``summary`` is :attr:`osrm_core.advisor.Advice.summary` (``candidate, method, density,
    weights, origin, validation, score, low, high, normalized``) with a boolean ``recommended``.
    """
    if y not in ("score", "normalized"):
        raise OsrmInputError(f"y must be 'score' or 'normalized', got {y!r}")
    df = summary.sort_values(y, ascending=lower_is_better and y == "score").reset_index(drop=True)
    labels = [candidate_label(r) for r in df.itertuples()]
    # Two candidates with one label (rare): keep the axis categories apart.
    labels = [lab if labels.index(lab) == k else f"{lab} #{k + 1}" for k, lab in enumerate(labels)]
    fig = go.Figure()
    for i, method in enumerate(_unique(df["method"])):
        rows = df.index[df["method"] == method]
        part = df.loc[rows]
        error = None
        if y == "score":
            error = dict(type="data", symmetric=False, array=part["high"] - part["score"],
                         arrayminus=part["score"] - part["low"])
        fig.add_trace(
            go.Scatter(
                x=[labels[k] for k in rows], y=part[y], error_y=error, mode="markers", name=str(method),
                marker=dict(size=[15 if r else 9 for r in part["recommended"]], color=_PALETTE[i % len(_PALETTE)],
                            symbol=["star" if r else "circle" for r in part["recommended"]]),
                customdata=part[["validation"]].to_numpy(),
                hovertemplate=f"%{{x}}<br>held-out {y} = %{{y:.3f}}<br>validation = %{{customdata[0]:.3f}}<extra></extra>",
            )
        )
    chosen = df.index[df["recommended"]]
    if len(chosen):
        k = int(chosen[0])
        note = "★ chosen" + (" = best held-out" if k == 0 else "")
        fig.add_annotation(x=labels[k], y=df.loc[k, y], text=note, showarrow=True, arrowhead=2, ax=0, ay=-36,
                           bgcolor="rgba(255,255,255,0.85)")
        if k != 0:
            fig.add_annotation(x=labels[0], y=df.loc[0, y], text="best held-out", showarrow=True, arrowhead=2,
                               ax=0, ay=-36, bgcolor="rgba(255,255,255,0.85)")
    if y == "normalized":
        fig.add_hline(y=1.0, line_dash="dot", line_color="grey", annotation_text="single-task")
    fig.update_xaxes(title="candidate (best held-out first)", categoryorder="array", categoryarray=labels,
                     tickangle=-35, automargin=True)
    fig.update_yaxes(title=f"held-out {'normalized score' if y == 'normalized' else 'score'} (average over tasks)")
    return _finish(fig, title)
