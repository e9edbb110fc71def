"""Interference and angle figures: task-by-task heatmaps, own-task energy, principal angles, the
post-hoc energy kept and the Learn page's per-layer ratio."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from osrm_core.errors import OsrmInputError

from .common import (
    _PALETTE,
    INIT_DASH,
    INTERFERENCE_VALUES,
    SUM_OVER_LAYERS,
    InterferenceValue,
    _finish,
    _layer_order,
    _task_colors,
    _unique,
    short_layer,
)


def matrix_range(matrices) -> tuple[float, float]:
    """Smallest positive and largest value over several matrices: one colour scale for all."""
    values = np.concatenate([np.asarray(m, dtype=np.float64).ravel() for m in matrices])
    values = values[np.isfinite(values)]
    positive = values[values > 0]
    return (float(positive.min()) if positive.size else 0.0, float(values.max()) if values.size else 1.0)


def interference_view(
    table: pd.DataFrame, value: InterferenceValue = "input_norm", layer: str | None = None
) -> pd.DataFrame:
    """Adapter-by-data matrix of one interference value at one layer or summed over layers.

    Parameters
    ----------
    table : DataFrame
        Rows of :func:`osrm_core.diagnostics.interference_table` (``layer, adapter, data,
        input_energy, output_shift, relative_shift``), for one init.
    value : {"input_norm", "input_energy", "output_shift", "relative_shift"}
        ``input_norm`` is ``sqrt(E||A_j h_i||^2)``; summed over layers it is the square root of
        the summed energies (the norm over all adapted layers together).
    layer : str, optional
        One layer, or None (or ``"sum over layers"``) for the sum.

    Returns
    -------
    DataFrame indexed by adapter, columns data tasks, in first-seen order.
    """
    if value not in INTERFERENCE_VALUES:
        raise OsrmInputError(f"value {value!r} is unknown: allowed are {', '.join(INTERFERENCE_VALUES)}")
    column = "input_energy" if value == "input_norm" else value
    if column not in table.columns:
        raise OsrmInputError(f"table has no column {column!r}")
    rows = table if layer in (None, SUM_OVER_LAYERS) else table[table["layer"] == layer]
    if rows.empty:
        raise OsrmInputError(f"no rows for layer {layer!r}")
    adapters, data = _unique(table["adapter"]), _unique(table["data"])
    m = rows.pivot_table(index="adapter", columns="data", values=column, aggfunc="sum")
    m = m.reindex(index=adapters, columns=data)
    if value == "input_norm":
        m = np.sqrt(m.clip(lower=0))
    m.index.name, m.columns.name = "adapter", "data"
    return m


def off_diagonal_sum(matrix: pd.DataFrame) -> float:
    """Sum of the cells where the adapter (row) is not the data's task (column): interference."""
    own = matrix.index.to_numpy()[:, None] == matrix.columns.to_numpy()[None, :]
    values = matrix.to_numpy(dtype=np.float64)
    return float(np.nansum(np.where(own, 0.0, values)))


def interference_heatmap(
    matrix: pd.DataFrame,
    *,
    title: str = "",
    value_label: str = "value",
    zmin: float | None = None,
    zmax: float | None = None,
    log: bool = False,
    x_title: str = "data of task i",
    y_title: str = "adapter j",
) -> go.Figure:
    """Heatmap of an adapter (rows) by data (columns) matrix; the own-task cells are outlined.
    Cells without a value (NaN, e.g. an adapter against itself where that is not defined) are
    left blank.

    Parameters
    ----------
    matrix : DataFrame
        From :func:`interference_view`.
    zmin, zmax : float, optional
        Ends of the colour scale (give both to compare heatmaps on one scale); by default 0
        (the smallest positive value with ``log``) and the largest value.
    log : bool
        Colour by ``log10`` of the value (hover still shows the value).
    """
    z = matrix.to_numpy(dtype=np.float64)
    x, y = [str(c) for c in matrix.columns], [str(i) for i in matrix.index]
    shown = z
    if log:
        positive = z[np.isfinite(z) & (z > 0)]
        tiny = float(positive.min()) if positive.size else 1.0
        if zmin is not None and zmin > 0:
            tiny = min(tiny, zmin)
        shown = np.log10(np.clip(z, tiny, None))
        zmin = float(np.log10(tiny))
        zmax = None if zmax is None else float(np.log10(max(zmax, tiny)))
    elif zmin is None:
        zmin = 0.0
    fig = go.Figure(
        go.Heatmap(
            z=shown,
            x=x,
            y=y,
            customdata=z,
            zmin=zmin,
            zmax=zmax,
            colorscale="Reds",
            colorbar=dict(title=("log10 " if log else "") + value_label),
            text=[[f"{v:.3g}" if np.isfinite(v) else "" for v in row] for row in z],
            texttemplate="%{text}",
            hovertemplate=(
                f"{y_title} = %{{y}}<br>{x_title} = %{{x}}<br>" + value_label + " = %{text}<extra></extra>"
            ),
        )
    )
    for i, a in enumerate(y):
        if a in x:
            j = x.index(a)
            fig.add_shape(
                type="rect",
                x0=j - 0.5,
                x1=j + 0.5,
                y0=i - 0.5,
                y1=i + 0.5,
                line=dict(color="black", width=2),
                fillcolor="rgba(0,0,0,0)",
            )
    fig.update_yaxes(autorange="reversed", title=y_title)
    fig.update_xaxes(title=x_title, side="bottom")
    return _finish(fig, title, height=max(320, 60 * len(y) + 140))


def overlap_matrix(table: pd.DataFrame, names, layer: str | None = None) -> pd.DataFrame:
    """Adapter-by-adapter matrix of the data-free singular-vector overlap
    (:func:`osrm_core.diagnostics.sv_interference` rows ``layer, adapter, data, sv_overlap``),
    mean over layers or at ``layer``, rows and columns in the order ``names`` (the order of the
    other matrices of a page). The diagonal (an adapter against itself) is NaN: not measured."""
    rows = table if layer in (None, SUM_OVER_LAYERS, "mean over layers") else table[table["layer"] == layer]
    m = rows.pivot_table(index="adapter", columns="data", values="sv_overlap", aggfunc="mean")
    names = [str(n) for n in names]
    m = m.reindex(index=names, columns=names)
    m.index.name, m.columns.name = "adapter", "data"
    return m


def own_energy_figure(table: pd.DataFrame, *, title: str = "") -> go.Figure:
    """Own-task energy that each adapter's row space sees, relative to a random subspace.

    ``table`` has columns ``task, layer, ratio`` and optionally ``init`` (rows of
    :func:`osrm_core.diagnostics.own_energy_table`); one line per task and init over layers, the
    ratio on a log scale with 1 (a random subspace) marked.
    """
    for col in ("task", "layer", "ratio"):
        if col not in table.columns:
            raise OsrmInputError(f"table needs a column {col!r}; columns are {list(table.columns)}")
    df = table if "init" in table.columns else table.assign(init="")
    layers = _layer_order(df["layer"])
    labels = {n: short_layer(n) for n in layers}
    colors = _task_colors(_unique(df["task"]))
    fig = go.Figure()
    for (init, task), g in df.groupby(["init", "task"], sort=False):
        g = g.set_index("layer").reindex([n for n in layers if n in set(g["layer"])])
        name = f"{task} ({init})" if init else str(task)
        fig.add_trace(
            go.Scatter(
                x=[labels[n] for n in g.index],
                y=g["ratio"],
                mode="lines+markers",
                name=name,
                line=dict(color=colors[task], dash=INIT_DASH.get(init, "solid")),
                hovertemplate=f"{name}<br>%{{x}}<br>share / random = %{{y:.3g}}<extra></extra>",
            )
        )
    fig.add_hline(y=1.0, line_dash="dot", line_color="grey", annotation_text="random subspace")
    fig.update_yaxes(type="log", title="own-task energy share / random (log)")
    fig.update_xaxes(title="layer", categoryorder="array", categoryarray=[labels[n] for n in layers])
    return _finish(fig, title)

def angle_matrix(
    table: pd.DataFrame, layer: str | None, stat: str = "min_angle", kind: str = "data-data"
) -> pd.DataFrame:
    """The ``a`` by ``b`` matrix of one angle statistic at one layer (None: mean over layers).

    For ``data-data`` the matrix is made symmetric with zeros on the diagonal. The axes are
    named for the figures: "data subspace of task" (and "row space of adapter" for the rows of
    ``adapter-data``).
    """
    if stat not in ("min_angle", "mean_angle"):
        raise OsrmInputError(f"stat must be 'min_angle' or 'mean_angle', got {stat!r}")
    rows = table[table["kind"] == kind]
    if layer not in (None, SUM_OVER_LAYERS, "mean over layers"):
        rows = rows[rows["layer"] == layer]
    if rows.empty:
        raise OsrmInputError(f"no {kind} angles for layer {layer!r}")
    m = rows.pivot_table(index="a", columns="b", values=stat, aggfunc="mean")
    if kind == "data-data":
        names = _unique(
            list(table.loc[table["kind"] == kind, "a"]) + list(table.loc[table["kind"] == kind, "b"])
        )
        m = m.reindex(index=names, columns=names)
        full = m.combine_first(m.T)
        for n in names:
            full.loc[n, n] = 0.0
        m = full.reindex(index=names, columns=names)
        m.index.name, m.columns.name = "data subspace of task", "data subspace of task"
    else:
        m = m.reindex(index=_unique(rows["a"]), columns=_unique(rows["b"]))
        m.index.name, m.columns.name = "row space of adapter", "data subspace of task"
    return m


def angle_heatmap(matrix: pd.DataFrame, *, title: str = "", stat_label: str = "angle (degrees)") -> go.Figure:
    """Heatmap of principal angles in degrees on a fixed 0..90 scale (90: orthogonal)."""
    z = matrix.to_numpy(dtype=np.float64)
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=[str(c) for c in matrix.columns],
            y=[str(i) for i in matrix.index],
            zmin=0,
            zmax=90,
            colorscale="Blues",
            colorbar=dict(title="degrees"),
            text=[[f"{v:.1f}" for v in row] for row in z],
            texttemplate="%{text}",
            hovertemplate="%{y} vs %{x}<br>" + stat_label + " = %{z:.2f}°<extra></extra>",
        )
    )
    fig.update_yaxes(autorange="reversed", title=matrix.index.name or "")
    fig.update_xaxes(title=matrix.columns.name or "")
    return _finish(fig, title, height=max(320, 60 * len(matrix.index) + 140))


def angle_figure(
    table: pd.DataFrame, stat: str = "min_angle", kind: str = "data-data", *, title: str = "",
    aggregate: bool = False,
) -> go.Figure:
    """Principal angles over layers: one line per pair (and per init for adapter-data).

    ``table`` has the columns of :func:`osrm_core.diagnostics.angle_table` and optionally
    ``init``; data-data angles do not depend on the init, so only the first init is drawn.
    ``aggregate``: one line per init instead, the mean over its pairs, with a band from the
    smallest to the largest pair (readable with many tasks: 4 tasks and 2 inits are 24 pairs).
    """
    if stat not in ("min_angle", "mean_angle"):
        raise OsrmInputError(f"stat must be 'min_angle' or 'mean_angle', got {stat!r}")
    rows = table[table["kind"] == kind]
    if rows.empty:
        raise OsrmInputError(f"no {kind} angles in the table")
    if "init" not in rows.columns:
        rows = rows.assign(init="")
    if kind == "data-data":
        rows = rows[rows["init"] == rows["init"].iloc[0]]
    if aggregate:
        return _angle_band_figure(rows, stat, kind, title)
    layers = _layer_order(rows["layer"])
    labels = [short_layer(n) for n in layers]
    pairs = _unique(zip(rows["a"], rows["b"]))
    colors = {p: _PALETTE[i % len(_PALETTE)] for i, p in enumerate(pairs)}
    fig = go.Figure()
    for (init, a, b), g in rows.groupby(["init", "a", "b"], sort=False):
        g = g.set_index("layer").reindex([n for n in layers if n in set(g["layer"])])
        name = f"{a} vs {b}" + (f" ({init})" if init and kind != "data-data" else "")
        fig.add_trace(
            go.Scatter(
                x=[short_layer(n) for n in g.index],
                y=g[stat],
                mode="lines+markers",
                name=name,
                line=dict(color=colors[(a, b)], dash=INIT_DASH.get(init, "solid")),
                hovertemplate=f"{name}<br>%{{x}}<br>{stat.replace('_', ' ')} = %{{y:.2f}}°<extra></extra>",
            )
        )
    fig.update_yaxes(range=[0, 92], title=f"{stat.replace('_', ' ')} (degrees)")
    fig.update_xaxes(title="layer", categoryorder="array", categoryarray=labels)
    return _finish(fig, title)

def _angle_band_figure(rows: pd.DataFrame, stat: str, kind: str, title: str) -> go.Figure:
    from .common import color_of

    layers = _layer_order(rows["layer"])
    labels = [short_layer(n) for n in layers]
    fig = go.Figure()
    for k, (init, g) in enumerate(rows.groupby("init", sort=False)):
        agg = g.groupby("layer")[stat].agg(["mean", "min", "max", "count"]).reindex(
            [n for n in layers if n in set(g["layer"])])
        x = [short_layer(n) for n in agg.index]
        color = color_of(str(init), k)
        name = f"{init}: mean over {int(agg['count'].max())} pairs" if init else f"mean over {int(agg['count'].max())} pairs"
        fig.add_trace(go.Scatter(
            x=x + x[::-1], y=list(agg["max"]) + list(agg["min"])[::-1], fill="toself", fillcolor=color,
            opacity=0.18, line=dict(width=0), hoverinfo="skip", name=f"{init} smallest to largest pair",
            legendgroup=str(init), showlegend=False,
        ))
        fig.add_trace(go.Scatter(
            x=x, y=agg["mean"], mode="lines+markers", name=name, legendgroup=str(init),
            line=dict(color=color, dash=INIT_DASH.get(init, "solid")),
            customdata=agg[["min", "max"]].to_numpy(),
            hovertemplate=(f"{name}<br>%{{x}}<br>mean {stat.replace('_', ' ')} = %{{y:.2f}}°"
                           "<br>pairs from %{customdata[0]:.2f}° to %{customdata[1]:.2f}°<extra></extra>"),
        ))
    fig.update_yaxes(range=[0, 92], title=f"{stat.replace('_', ' ')} (degrees; band: smallest to largest pair)")
    fig.update_xaxes(title="layer", categoryorder="array", categoryarray=labels)
    return _finish(fig, title)


def energy_kept_figure(table: pd.DataFrame, *, title: str = "") -> go.Figure:
    """Bars of the share of ``||Delta_W||`` that post-hoc OSRM keeps, per layer and adapter.

    ``table`` has columns ``adapter, layer, energy_kept``.
    """
    layers = _layer_order(table["layer"])
    fig = go.Figure()
    for i, (adapter, g) in enumerate(table.groupby("adapter", sort=False)):
        g = g.set_index("layer").reindex([n for n in layers if n in set(g["layer"])])
        fig.add_trace(
            go.Bar(
                x=[short_layer(n) for n in g.index],
                y=g["energy_kept"],
                name=str(adapter),
                marker_color=_PALETTE[i % len(_PALETTE)],
                hovertemplate=f"{adapter}<br>%{{x}}<br>kept = %{{y:.3f}}<extra></extra>",
            )
        )
    fig.update_layout(barmode="group")
    fig.update_yaxes(title="||ΔW A⁺A|| / ||ΔW||", range=[0, 1.05])
    fig.update_xaxes(title="layer", categoryorder="array", categoryarray=[short_layer(n) for n in layers])
    return _finish(fig, title)


def layer_ratio_figure(table: pd.DataFrame, *, title: str = "") -> go.Figure:
    """Per layer, OSRM's summed interference over a random subspace's (log scale), per task.

    ``table`` has columns ``task, layer, ratio`` (and optionally ``osrm``, ``random``).
    """
    layers = _layer_order(table["layer"])
    colors = _task_colors(_unique(table["task"]))
    fig = go.Figure()
    for task, g in table.groupby("task", sort=False):
        g = g.set_index("layer").reindex([n for n in layers if n in set(g["layer"])])
        fig.add_trace(
            go.Scatter(
                x=[short_layer(n) for n in g.index],
                y=g["ratio"],
                mode="lines+markers",
                name=str(task),
                line=dict(color=colors[task]),
                hovertemplate=f"adapter of {task}<br>%{{x}}<br>OSRM / random = %{{y:.3g}}<extra></extra>",
            )
        )
    fig.add_hline(y=1.0, line_dash="dot", line_color="grey", annotation_text="random subspace")
    fig.update_yaxes(type="log", title="Σ_j E||A h_j||²: OSRM / random (log)")
    fig.update_xaxes(title="layer", categoryorder="array", categoryarray=[short_layer(n) for n in layers])
    return _finish(fig, title)


def drift_figure(drift: pd.DataFrame, *, y: str = "input_energy", title: str = "") -> go.Figure:
    """Interference during fine-tuning: each adapter's energy on every task's inputs against the
    training step, one panel per adapter; its own task solid, the other tasks dotted. The
    legend names the data by colour and the two line styles (the same in every panel).

    ``drift`` has columns ``adapter, step, data, own`` and ``y`` (``input_energy`` =
    ``sum_l tr(A S A^T)`` or ``output_shift``), for one init.
    """
    from plotly.subplots import make_subplots

    if y not in ("input_energy", "output_shift"):
        raise OsrmInputError(f"y must be 'input_energy' or 'output_shift', got {y!r}")
    adapters = _unique(drift["adapter"])
    colors = _task_colors(_unique(drift["data"]))
    fig = make_subplots(rows=1, cols=len(adapters), subplot_titles=[f"adapter {a}" for a in adapters],
                        shared_yaxes=True)
    for col, adapter in enumerate(adapters, start=1):
        part = drift[drift["adapter"] == adapter]
        for data, g in part.groupby("data", sort=False):
            own = bool(g["own"].iloc[0])
            fig.add_trace(
                go.Scatter(
                    x=g["step"], y=g[y], mode="lines+markers", name=f"data of {data}",
                    legendgroup=str(data), showlegend=False,
                    line=dict(color=colors[data], dash="solid" if own else "dot", width=3 if own else 2),
                    hovertemplate=(f"adapter {adapter} on {data}{' (own task)' if own else ''}<br>step %{{x}}"
                                   f"<br>{y} = %{{y:.4g}}<extra></extra>"),
                ),
                row=1, col=col,
            )
        fig.update_xaxes(title="step", row=1, col=col)
    # The legend: colour names the data, the line style whose task it is, in every panel alike
    # (a panel's solid line is that panel's adapter on its own task).
    for data, color in colors.items():
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=f"data of {data}", legendgroup=str(data),
                                 marker=dict(color=color, symbol="square", size=10)), row=1, col=1)
    for name, dash in (("the panel's own task (solid)", "solid"), ("other tasks (dotted)", "dot")):
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", name=name,
                                 line=dict(color="grey", dash=dash, width=3 if dash == "solid" else 2)), row=1, col=1)
    label = "Σ_l tr(A S A^T)" if y == "input_energy" else "Σ_l tr(ΔW S ΔW^T)"
    fig.update_yaxes(title=f"energy on the task's inputs, {label}", row=1, col=1)
    return _finish(fig, title)
