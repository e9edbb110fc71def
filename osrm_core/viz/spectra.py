"""Eigenspectra figures: eigenvalues per task and layer input, cumulative energy, effective rank."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from osrm_core.errors import OsrmInputError

from .common import _finish, _task_colors, _unique


def _desc(values) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64).ravel()
    return np.sort(v)[::-1]


#: Eigenvalues below this share of the largest are zero to float precision (float64 eigh: ~1e-16).
NUMERICAL_ZERO = 1e-12


def zero_smallest(spectra: Mapping[str, np.ndarray], rank: int, rel: float = NUMERICAL_ZERO) -> dict[str, int]:
    """Per spectrum, how many of its ``rank`` smallest eigenvalues are at numerical zero (at
    most ``rel`` times the largest); only spectra with any. Such directions carry no energy of
    the sample at all (fewer tokens than dimensions, or rank-deficient features): OSRM's choice
    among them is arbitrary and says nothing about the tasks."""
    out = {}
    for name, values in spectra.items():
        lam = _desc(values)
        if lam.size == 0 or rank < 1:
            continue
        r = min(int(rank), lam.size)
        n = int((np.abs(lam[-r:]) <= rel * max(float(np.abs(lam).max()), np.finfo(float).tiny)).sum())
        if n:
            out[name] = n
    return out


def eigenspectrum_figure(
    spectra: Mapping[str, np.ndarray], rank: int | None = None, *, title: str = ""
) -> go.Figure:
    """Eigenvalues (descending, log scale) of one or more second moments.

    Parameters
    ----------
    spectra : mapping of name to array of shape (d,)
        Eigenvalues in any order (sorted here, largest first).
    rank : int, optional
        Mark the ``rank`` smallest eigenvalues: the directions OSRM gives an adapter whose
        *other* tasks have this spectrum. The band's note says when they are at numerical
        zero (:func:`zero_smallest`).

    The x axis runs from 1 to the feature width (the longest spectrum).
    """
    fig = go.Figure()
    colors = _task_colors(list(spectra))
    floor = None
    for name, values in spectra.items():
        lam = _desc(values)
        if lam.size == 0:
            continue
        tiny = max(float(lam.max()), 1e-300) * 1e-16
        floor = tiny if floor is None else min(floor, tiny)
        y = np.clip(lam, tiny, None)
        x = np.arange(1, lam.size + 1)
        fig.add_trace(
            go.Scatter(
                x=x,
                y=y,
                mode="lines",
                name=name,
                legendgroup=name,
                line=dict(color=colors[name]),
                customdata=lam,
                hovertemplate=f"{name}<br>k = %{{x}}<br>eigenvalue = %{{customdata:.4g}}<extra></extra>",
            )
        )
        if rank:
            r = min(int(rank), lam.size)
            fig.add_trace(
                go.Scatter(
                    x=x[-r:],
                    y=y[-r:],
                    mode="markers",
                    name=f"{name}: {r} smallest",
                    legendgroup=name,
                    showlegend=False,
                    marker=dict(color=colors[name], size=7, symbol="diamond"),
                    customdata=lam[-r:],
                    hovertemplate=(
                        f"{name}, OSRM direction<br>k = %{{x}}<br>eigenvalue = %{{customdata:.4g}}<extra></extra>"
                    ),
                )
            )
    d = max((len(t.x) for t in fig.data), default=0)
    if rank and fig.data:
        r = min(int(rank), d)
        zero = zero_smallest(spectra, r)
        fig.add_vrect(
            x0=d - r + 0.5,
            x1=d + 0.5,
            fillcolor="#EF553B",
            opacity=0.12,
            line_width=0,
            annotation_text=f"{r} smallest (OSRM)" + (": numerically zero" if zero else ""),
            annotation_position="top right",
        )
    fig.update_yaxes(type="log", title="eigenvalue (log scale)", exponentformat="power")
    # The axis ends at the width of the features (the band and its note must not stretch it).
    fig.update_xaxes(title="index k (largest first)", range=[0.5, d + 0.5] if d else None)
    return _finish(fig, title)


def cumulative_energy_figure(
    spectra: Mapping[str, np.ndarray], levels: Sequence[float] = (0.9, 0.99), *, title: str = ""
) -> go.Figure:
    """Share of the trace in the top-k eigenvalues against k, with reference levels."""
    fig = go.Figure()
    colors = _task_colors(list(spectra))
    for name, values in spectra.items():
        lam = np.clip(_desc(values), 0, None)
        if lam.size == 0:
            continue
        cum = np.cumsum(lam) / max(lam.sum(), np.finfo(float).tiny)
        fig.add_trace(
            go.Scatter(
                x=np.arange(1, lam.size + 1),
                y=cum,
                mode="lines",
                name=name,
                line=dict(color=colors[name]),
                hovertemplate=f"{name}<br>top %{{x}} directions<br>energy share = %{{y:.3f}}<extra></extra>",
            )
        )
    for level in levels:
        fig.add_hline(y=level, line_dash="dot", line_color="grey", annotation_text=f"{level:.0%}")
    fig.update_yaxes(title="cumulative energy share", range=[0, 1.02])
    fig.update_xaxes(title="number of top directions k", type="log")
    return _finish(fig, title)


def effective_rank_heatmap(table: pd.DataFrame, *, title: str = "") -> go.Figure:
    """Heatmap of the effective rank, layers (rows) by tasks (columns).

    ``table`` has columns ``task, layer, effective_rank`` (``layer`` a label, in row order).
    """
    for col in ("task", "layer", "effective_rank"):
        if col not in table.columns:
            raise OsrmInputError(f"table needs a column {col!r}; columns are {list(table.columns)}")
    layers, tasks = _unique(table["layer"]), _unique(table["task"])
    m = table.pivot_table(index="layer", columns="task", values="effective_rank", aggfunc="mean")
    m = m.reindex(index=layers, columns=tasks)
    fig = go.Figure(
        go.Heatmap(
            z=m.to_numpy(),
            x=tasks,
            y=layers,
            colorscale="Viridis",
            colorbar=dict(title="eff. rank"),
            text=np.round(m.to_numpy(), 1),
            texttemplate="%{text}",
            hovertemplate="task %{x}<br>layer %{y}<br>effective rank %{z:.2f}<extra></extra>",
        )
    )
    fig.update_yaxes(autorange="reversed", title="layer")
    fig.update_xaxes(title="task", side="top")
    return _finish(fig, title, height=max(300, 40 * len(layers) + 120))


def merged_spectrum_figure(spectra: pd.DataFrame, layer: str | None = None, *, title: str = "") -> go.Figure:
    """Singular values of the task-arithmetic merge against its parts' (from
    :func:`osrm_core.diagnostics.merged_spectrum`), at ``layer`` or summed over layers by index
    (``layer`` None): where the merged curve falls below the parts', merging cancels directions."""
    data = spectra if layer is None else spectra[spectra["layer"] == layer]
    fig = go.Figure()
    names = {"parts": "parts, each on its own (sorted together)", "merged": "merged (sum)"}
    for kind, dash in (("parts", "dot"), ("merged", "solid")):
        sigma = data[data["kind"] == kind].groupby("index")["sigma"].sum().sort_index()
        fig.add_trace(go.Scatter(
            x=sigma.index + 1, y=sigma.to_numpy(), mode="lines+markers", name=names[kind],
            line=dict(dash=dash), hovertemplate=f"{names[kind]}<br>k = %{{x}}<br>σ = %{{y:.4g}}<extra></extra>",
        ))
    fig.update_yaxes(type="log", title="singular value (log scale)", exponentformat="power")
    fig.update_xaxes(title="index k (largest first)")
    return _finish(fig, title)
