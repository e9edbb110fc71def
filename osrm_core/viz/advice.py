"""Merge-advisor figures: candidates on held-out texts."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from .common import _PALETTE, _finish, _unique


def advice_figure(summary: pd.DataFrame, *, y: str = "score", title: str = "") -> go.Figure:
    """The merge advisor's candidates on held-out texts, best first: one marker per candidate
    (colour: method), the 95% interval as error bars for absolute scores, the recommended one
    starred.

    ``summary`` is :attr:`osrm_core.advise.Advice.summary` (``candidate, method, density,
    weights, origin, validation, score, low, high, normalized``) with a boolean ``recommended``.
    """
    if y not in ("score", "normalized"):
        raise ValueError(f"y must be 'score' or 'normalized', got {y!r}")
    df = summary.sort_values(y, ascending=False).reset_index(drop=True)
    labels = [
        f"{r.method}{'' if pd.isna(r.density) else f' d={r.density:g}'} w={r.weights}" for r in df.itertuples()
    ]
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
                marker=dict(size=9, color=_PALETTE[i % len(_PALETTE)],
                            symbol=["star" if r else "circle" for r in part["recommended"]]),
                customdata=part[["validation"]].to_numpy(),
                hovertemplate=f"%{{x}}<br>held-out {y} = %{{y:.3f}}<br>validation = %{{customdata[0]:.3f}}<extra></extra>",
            )
        )
    if y == "normalized":
        fig.add_hline(y=1.0, line_dash="dot", line_color="grey", annotation_text="single-task")
    fig.update_xaxes(title="candidate (best first)", categoryorder="array", categoryarray=labels, showticklabels=False)
    fig.update_yaxes(title=f"held-out {'normalized score' if y == 'normalized' else 'score'} (average over tasks)")
    return _finish(fig, title)
