"""Figure builders for the app: plain functions that take tables or arrays and return plotly
figures (no Streamlit here), plus the small table reshaping the figures need and the 2-D/3-D toy
of the teaching page.

Every figure carries hover values; colours are fixed per init (standard vs OSRM) and per task
so that the same thing has the same colour on every page.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative

#: Fixed colours of the inits, so that standard and OSRM look the same on every page.
INIT_COLORS: dict[str, str] = {
    "standard": "#636EFA",
    "osrm": "#EF553B",
    "osrm_mean": "#FFA15A",
    "osrm_gen": "#AB63FA",
    "eva": "#00CC96",
    "pissa": "#19D3F3",
    "uploaded": "#636EFA",
    "posthoc_osrm": "#EF553B",
}
INIT_DASH: dict[str, str] = {"standard": "dash", "uploaded": "dash"}
_PALETTE = qualitative.Plotly + qualitative.D3
_TASK_PALETTE = qualitative.Dark2 + qualitative.Set1
_DASHES = ("solid", "dash", "dot", "dashdot", "longdash", "longdashdot")
_SYMBOLS = ("circle", "square", "diamond", "triangle-up", "x", "cross", "pentagon")
SUM_OVER_LAYERS = "sum over layers"

InterferenceValue = Literal["input_norm", "input_energy", "output_shift", "relative_shift"]
INTERFERENCE_VALUES: dict[str, str] = {
    "input_norm": "||A_j h_i|| (RMS over tokens)",
    "relative_shift": "relative output shift E||s B_j A_j h_i||² / E||W0 h_i||²",
    "output_shift": "output shift E||s B_j A_j h_i||²",
    "input_energy": "input energy E||A_j h_i||²",
}


# --------------------------------------------------------------------------- small helpers


def short_layer(name: str) -> str:
    """A short label for a module name: ``bert.encoder.layer.3.attention.self.query`` -> ``L3.query``."""
    parts = name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        if parts[i].isdigit():
            return f"L{parts[i]}.{parts[-1]}" if i < len(parts) - 1 else f"L{parts[i]}"
    return ".".join(parts[-2:])


def group_label(names: Sequence[str]) -> str:
    """Label of layers that share one input: ``L0 (query, value)``."""
    if len(names) == 1:
        return short_layer(names[0])
    head = short_layer(names[0]).split(".")[0]
    return f"{head} ({', '.join(n.split('.')[-1] for n in names)})"


def color_of(name: str, index: int = 0) -> str:
    """The fixed colour of an init, or a palette colour for anything else."""
    return INIT_COLORS.get(name, _PALETTE[index % len(_PALETTE)])


def _task_colors(names: Sequence[str]) -> dict[str, str]:
    # Tasks take a palette apart from the init colours (blue standard, red OSRM).
    return {n: _TASK_PALETTE[i % len(_TASK_PALETTE)] for i, n in enumerate(names)}


def _unique(values) -> list:
    return list(dict.fromkeys(values))


def _layer_order(names) -> list[str]:
    """Layer names in network order (by their block index, then as first seen)."""
    seen = _unique(names)

    def key(n: str):
        nums = [int(p) for p in n.split(".") if p.isdigit()]
        return (nums[-1] if nums else -1, seen.index(n))

    return sorted(seen, key=key)


def _finish(fig: go.Figure, title: str = "", height: int | None = None) -> go.Figure:
    fig.update_layout(
        title=dict(text=title) if title else None,
        margin=dict(l=60, r=20, t=60 if title else 30, b=50),
        hovermode="closest",
        legend=dict(groupclick="toggleitem"),
        **({"height": height} if height else {}),
    )
    return fig


# --------------------------------------------------------------------------- eigenspectra


def _desc(values) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64).ravel()
    return np.sort(v)[::-1]


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
        *other* tasks have this spectrum.
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
    if rank and fig.data:
        d = max(len(t.x) for t in fig.data)
        r = min(int(rank), d)
        fig.add_vrect(
            x0=d - r + 0.5,
            x1=d + 0.5,
            fillcolor="#EF553B",
            opacity=0.12,
            line_width=0,
            annotation_text=f"{r} smallest (OSRM)",
            annotation_position="top left",
        )
    fig.update_yaxes(type="log", title="eigenvalue (log scale)", exponentformat="power")
    fig.update_xaxes(title="index k (largest first)")
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
            raise ValueError(f"table needs a column {col!r}; columns are {list(table.columns)}")
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


# --------------------------------------------------------------------------- interference


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
        raise ValueError(f"value {value!r} is unknown: allowed are {', '.join(INTERFERENCE_VALUES)}")
    column = "input_energy" if value == "input_norm" else value
    if column not in table.columns:
        raise ValueError(f"table has no column {column!r}")
    rows = table if layer in (None, SUM_OVER_LAYERS) else table[table["layer"] == layer]
    if rows.empty:
        raise ValueError(f"no rows for layer {layer!r}")
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
) -> go.Figure:
    """Heatmap of an adapter (rows) by data (columns) matrix; the own-task cells are outlined.

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
            text=[[f"{v:.3g}" for v in row] for row in z],
            texttemplate="%{text}",
            hovertemplate=(
                "adapter %{y}<br>on data of %{x}<br>" + value_label + " = %{customdata:.4g}<extra></extra>"
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
    fig.update_yaxes(autorange="reversed", title="adapter j")
    fig.update_xaxes(title="data of task i", side="bottom")
    return _finish(fig, title, height=max(320, 60 * len(y) + 140))


def own_energy_figure(table: pd.DataFrame, *, title: str = "") -> go.Figure:
    """Own-task energy that each adapter's row space sees, relative to a random subspace.

    ``table`` has columns ``task, layer, ratio`` and optionally ``init`` (rows of
    :func:`osrm_core.diagnostics.own_energy_table`); one line per task and init over layers, the
    ratio on a log scale with 1 (a random subspace) marked.
    """
    for col in ("task", "layer", "ratio"):
        if col not in table.columns:
            raise ValueError(f"table needs a column {col!r}; columns are {list(table.columns)}")
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


# --------------------------------------------------------------------------- angles


def angle_matrix(
    table: pd.DataFrame, layer: str | None, stat: str = "min_angle", kind: str = "data-data"
) -> pd.DataFrame:
    """The ``a`` by ``b`` matrix of one angle statistic at one layer (None: mean over layers).

    For ``data-data`` the matrix is made symmetric with zeros on the diagonal.
    """
    if stat not in ("min_angle", "mean_angle"):
        raise ValueError(f"stat must be 'min_angle' or 'mean_angle', got {stat!r}")
    rows = table[table["kind"] == kind]
    if layer not in (None, SUM_OVER_LAYERS, "mean over layers"):
        rows = rows[rows["layer"] == layer]
    if rows.empty:
        raise ValueError(f"no {kind} angles for layer {layer!r}")
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
    else:
        m = m.reindex(index=_unique(rows["a"]), columns=_unique(rows["b"]))
    m.index.name, m.columns.name = "a", "b"
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
    table: pd.DataFrame, stat: str = "min_angle", kind: str = "data-data", *, title: str = ""
) -> go.Figure:
    """Principal angles over layers: one line per pair (and per init for adapter-data).

    ``table`` has the columns of :func:`osrm_core.diagnostics.angle_table` and optionally
    ``init``; data-data angles do not depend on the init, so only the first init is drawn.
    """
    if stat not in ("min_angle", "mean_angle"):
        raise ValueError(f"stat must be 'min_angle' or 'mean_angle', got {stat!r}")
    rows = table[table["kind"] == kind]
    if rows.empty:
        raise ValueError(f"no {kind} angles in the table")
    if "init" not in rows.columns:
        rows = rows.assign(init="")
    if kind == "data-data":
        rows = rows[rows["init"] == rows["init"].iloc[0]]
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


# --------------------------------------------------------------------------- lambda sweep


def sweep_curves(
    sweep: pd.DataFrame, *, task: str | None = None, y: str = "normalized", density: float | None = None
) -> pd.DataFrame:
    """The sweep reduced to one value per (init, method, lambda): a task's or the task average.

    ``density`` keeps only that density for methods that use one (rows with a density);
    methods without density are kept as they are.
    """
    if y not in ("score", "normalized"):
        raise ValueError(f"y must be 'score' or 'normalized', got {y!r}")
    df = sweep if "init" in sweep.columns else sweep.assign(init="")
    if density is not None and "density" in df.columns:
        df = df[df["density"].isna() | np.isclose(df["density"].astype(float), density)]
    if task is not None:
        if task not in set(df["task"]):
            raise ValueError(f"task {task!r} is not in the sweep; tasks are {_unique(df['task'])}")
        df = df[df["task"] == task]
    keys = ["init", "method", "lambda"]
    if "density" in df.columns:
        df = df.assign(density=df["density"].astype(float))
        keys = ["init", "method", "density", "lambda"]
    out = df.groupby(keys, dropna=False, sort=False)[y].mean().reset_index()
    return out.sort_values(keys, kind="stable").reset_index(drop=True)


def sweep_best(curves: pd.DataFrame, y: str = "normalized") -> pd.DataFrame:
    """Per init and method, the row of :func:`sweep_curves` with the highest ``y``."""
    idx = curves.groupby(["init", "method"], sort=False)[y].idxmax().dropna()
    return curves.loc[idx.astype(int)].reset_index(drop=True)


def sweep_figure(
    sweep: pd.DataFrame,
    *,
    task: str | None = None,
    y: str = "normalized",
    density: float | None = None,
    title: str = "",
) -> go.Figure:
    """Merged score against lambda: one line per init and method, the best point starred.

    Parameters
    ----------
    sweep : DataFrame
        Rows of a merge sweep (``init, method, density, lambda, task, score, single,
        normalized``), several inits concatenated.
    task : str, optional
        One task, or None for the average over tasks.
    y : {"normalized", "score"}
    density : float, optional
        The density shown for TIES/DARE.
    """
    curves = sweep_curves(sweep, task=task, y=y, density=density)
    methods = _unique(curves["method"])
    inits = _unique(curves["init"])
    # Colour says the init (standard vs OSRM, the comparison that matters), dash and marker the method.
    icolor = {init: color_of(str(init), i) for i, init in enumerate(inits)}
    mdash = {m: _DASHES[i % len(_DASHES)] for i, m in enumerate(methods)}
    msymbol = {m: _SYMBOLS[i % len(_SYMBOLS)] for i, m in enumerate(methods)}
    fig = go.Figure()
    for (init, method), g in curves.groupby(["init", "method"], sort=False):
        name = f"{method} ({init})" if init else str(method)
        fig.add_trace(
            go.Scatter(
                x=g["lambda"],
                y=g[y],
                mode="lines+markers",
                name=name,
                legendgroup=name,
                line=dict(color=icolor[init], dash=mdash[method]),
                marker=dict(symbol=msymbol[method], size=7),
                hovertemplate=f"{name}<br>lambda = %{{x:g}}<br>{y} = %{{y:.4f}}<extra></extra>",
            )
        )
    best = sweep_best(curves, y)
    for _, row in best.iterrows():
        init, method = row["init"], row["method"]
        name = f"{method} ({init})" if init else str(method)
        fig.add_trace(
            go.Scatter(
                x=[row["lambda"]],
                y=[row[y]],
                mode="markers",
                name=f"best: {name}",
                legendgroup=name,
                showlegend=False,
                marker=dict(symbol="star", size=16, color=icolor[init], line=dict(color="black", width=1)),
                hovertemplate=f"best {name}<br>lambda = %{{x:g}}<br>{y} = %{{y:.4f}}<extra></extra>",
            )
        )
    if y == "normalized":
        fig.add_hline(y=1.0, line_dash="dot", line_color="grey", annotation_text="single-task")
    what = "average over tasks" if task is None else task
    fig.update_yaxes(title=f"{'normalized score' if y == 'normalized' else 'score'} ({what})")
    fig.update_xaxes(title="lambda")
    return _finish(fig, title)


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


# --------------------------------------------------------------------------- summary of a run


def summary_tables(summary: Mapping) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Two tables from a run's ``summary.json``: single-task scores (task by init) and the best
    merged point per init and method (with the per-task scores)."""
    results = summary.get("results", {})
    single = pd.DataFrame({init: r.get("single", {}) for init, r in results.items()})
    single.index.name = "task"
    rows = []
    for init, r in results.items():
        for method, p in r.get("best", {}).items():
            rows.append(
                {
                    "init": init,
                    "method": method,
                    "lambda": p.get("lambda"),
                    "density": p.get("density"),
                    "avg_score": p.get("avg"),
                    "normalized_avg": p.get("normalized_avg"),
                    **{f"score_{t}": s for t, s in p.get("scores", {}).items()},
                }
            )
    return single.reset_index(), pd.DataFrame(rows)


def summary_figure(best: pd.DataFrame, *, y: str = "normalized_avg", title: str = "") -> go.Figure:
    """Bars of the best merged score per method, one bar per init side by side."""
    fig = go.Figure()
    for i, (init, g) in enumerate(best.groupby("init", sort=False)):
        fig.add_trace(
            go.Bar(
                x=g["method"],
                y=g[y],
                name=str(init),
                marker_color=color_of(str(init), i),
                customdata=np.stack([g["lambda"].astype(float), g["avg_score"].astype(float)], axis=1),
                hovertemplate=(
                    f"{init}<br>%{{x}}<br>{y} = %{{y:.4f}}<br>lambda = %{{customdata[0]:g}}"
                    "<br>avg score = %{customdata[1]:.4f}<extra></extra>"
                ),
            )
        )
    fig.update_layout(barmode="group")
    if y == "normalized_avg":
        fig.add_hline(y=1.0, line_dash="dot", line_color="grey", annotation_text="single-task")
    fig.update_yaxes(title="best normalized score (avg over tasks)" if y == "normalized_avg" else y)
    fig.update_xaxes(title="merge method")
    return _finish(fig, title)


# --------------------------------------------------------------------------- diagnosis page


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


# --------------------------------------------------------------------------- teaching toy


def _rotation(dim: int, angle: float, tilt: float = 0.0) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    if dim == 2:
        return np.array([[c, -s], [s, c]])
    rz = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    ct, st_ = np.cos(tilt), np.sin(tilt)
    rx = np.array([[1.0, 0.0, 0.0], [0.0, ct, -st_], [0.0, st_, ct]])
    return rz @ rx


def toy_moments(
    n_tasks: int = 2, angle_deg: float = 60.0, spread: float = 0.2, dim: int = 2
) -> list[np.ndarray]:
    """Second moments ``E[h h^T]`` of ``n_tasks`` zero-mean Gaussian clouds.

    Each cloud has standard deviation 1 along its main axis and ``spread`` across it; task
    ``k``'s main axis is turned by ``k * angle_deg`` (in 3-D also tilted out of the plane).

    Returns
    -------
    list of arrays of shape (dim, dim)
    """
    if dim not in (2, 3):
        raise ValueError(f"dim must be 2 or 3, got {dim}")
    if not 2 <= n_tasks <= 3:
        raise ValueError(f"n_tasks must be 2 or 3, got {n_tasks}")
    if not 0 < spread <= 1:
        raise ValueError(f"spread must be in (0, 1], got {spread}")
    stds = np.array([1.0, spread] if dim == 2 else [1.0, spread, spread * 0.5])
    out = []
    for k in range(n_tasks):
        a = np.radians(angle_deg) * k
        R = _rotation(dim, a, tilt=a / 2)
        out.append(R @ np.diag(stds**2) @ R.T)
    return out


def toy_samples(moments: Sequence[np.ndarray], n: int = 200, seed: int = 0) -> list[np.ndarray]:
    """``n`` points of each cloud, arrays of shape (n, dim) (drawn from the exact moments)."""
    rng = np.random.default_rng(seed)
    return [rng.multivariate_normal(np.zeros(m.shape[0]), m, size=n) for m in moments]


def toy_adapters(
    moments: Sequence[np.ndarray], target: int, rank: int = 1, seed: int = 0
) -> dict[str, np.ndarray]:
    """The ``A`` of task ``target``: a random orthonormal one (standard init's row space) and
    OSRM's (eigenvectors of the ``rank`` smallest eigenvalues of the other tasks' summed moment).

    Returns
    -------
    dict with ``"standard"`` and ``"osrm"``, arrays of shape (rank, dim) with orthonormal rows
    """
    dim = moments[0].shape[0]
    if not 1 <= rank < dim:
        raise ValueError(f"rank must be in 1..{dim - 1}, got {rank}")
    rest = sum(m for i, m in enumerate(moments) if i != target)
    _, vecs = np.linalg.eigh(rest)
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((dim, rank)))
    return {"standard": q.T, "osrm": vecs[:, :rank].T}


def toy_interference(A: np.ndarray, moments: Sequence[np.ndarray]) -> list[float]:
    """``sqrt(E||A h_k||^2) = sqrt(tr(A S_k A^T))`` for every task ``k``."""
    return [float(np.sqrt(max(np.trace(A @ m @ A.T), 0.0))) for m in moments]


def toy_table(
    adapters: Mapping[str, np.ndarray], moments: Sequence[np.ndarray], names: Sequence[str], target: int
) -> pd.DataFrame:
    """``||A h||`` (RMS) of each adapter on each toy task, and on all the other tasks together
    (``sqrt(sum_{k != target} E||A h_k||^2)``, the interference that merging adds)."""
    rows = []
    for label, A in adapters.items():
        norms = toy_interference(A, moments)
        others = float(np.sqrt(sum(v**2 for k, v in enumerate(norms) if k != target)))
        rows.append(
            {"A": label, **{f"||A h|| on {n}": v for n, v in zip(names, norms)}, "other tasks": others}
        )
    return pd.DataFrame(rows)


def toy_figure(
    clouds: Mapping[str, np.ndarray], adapters: Mapping[str, np.ndarray], *, title: str = ""
) -> go.Figure:
    """The task clouds and each adapter's row space (a line per row; in 3-D a rank-2 row space
    is drawn as a plane)."""
    if not clouds:
        raise ValueError("clouds is empty")
    dim = next(iter(clouds.values())).shape[1]
    reach = max(float(np.abs(c).max()) for c in clouds.values()) * 1.05
    colors = _task_colors(list(clouds))
    fig = go.Figure()
    for name, pts in clouds.items():
        if dim == 2:
            fig.add_trace(
                go.Scatter(
                    x=pts[:, 0],
                    y=pts[:, 1],
                    mode="markers",
                    name=name,
                    opacity=0.45,
                    marker=dict(size=5, color=colors[name]),
                    hovertemplate=f"{name}<br>(%{{x:.2f}}, %{{y:.2f}})<extra></extra>",
                )
            )
        else:
            fig.add_trace(
                go.Scatter3d(
                    x=pts[:, 0],
                    y=pts[:, 1],
                    z=pts[:, 2],
                    mode="markers",
                    name=name,
                    opacity=0.45,
                    marker=dict(size=2.5, color=colors[name]),
                    hovertemplate=f"{name}<br>(%{{x:.2f}}, %{{y:.2f}}, %{{z:.2f}})<extra></extra>",
                )
            )
    for i, (label, A) in enumerate(adapters.items()):
        color = color_of(label.split(" ")[0].lower(), i + 3)
        dash = "dash" if label.lower().startswith("standard") else "solid"
        A = np.atleast_2d(A)
        if dim == 3 and A.shape[0] >= 2:
            u, v = A[0] * reach, A[1] * reach
            corners = np.array([u + v, u - v, -u - v, -u + v])
            fig.add_trace(
                go.Mesh3d(
                    x=corners[:, 0],
                    y=corners[:, 1],
                    z=corners[:, 2],
                    i=[0, 0],
                    j=[1, 2],
                    k=[2, 3],
                    color=color,
                    opacity=0.25,
                    name=f"{label} row space",
                    showlegend=True,
                    hovertemplate=f"{label} row space<extra></extra>",
                )
            )
            continue
        for k, row in enumerate(A):
            p = np.stack([-row * reach, row * reach])
            name = f"{label} row space" + (f" ({k + 1})" if A.shape[0] > 1 else "")
            if dim == 2:
                fig.add_trace(
                    go.Scatter(
                        x=p[:, 0],
                        y=p[:, 1],
                        mode="lines",
                        name=name,
                        legendgroup=label,
                        line=dict(color=color, width=4, dash=dash),
                        hovertemplate=f"{name}<br>direction ({row[0]:.2f}, {row[1]:.2f})<extra></extra>",
                    )
                )
            else:
                fig.add_trace(
                    go.Scatter3d(
                        x=p[:, 0],
                        y=p[:, 1],
                        z=p[:, 2],
                        mode="lines",
                        name=name,
                        legendgroup=label,
                        line=dict(color=color, width=6, dash=dash),
                        hovertemplate=f"{name}<extra></extra>",
                    )
                )
    if dim == 2:
        fig.update_xaxes(range=[-reach, reach], title="h[0]")
        fig.update_yaxes(range=[-reach, reach], title="h[1]", scaleanchor="x", scaleratio=1)
    else:
        fig.update_layout(
            scene=dict(aspectmode="cube", xaxis_title="h[0]", yaxis_title="h[1]", zaxis_title="h[2]")
        )
    return _finish(fig, title, height=520)


def figure_html(fig: go.Figure) -> str:
    """A standalone HTML page of ``fig`` that works offline (plotly.js included)."""
    return fig.to_html(include_plotlyjs=True, full_html=True)


# --------------------------------------------------------------------------- study


def study_curve_figure(curves: pd.DataFrame, *, title: str = "") -> go.Figure:
    """Normalized average against lambda per init (and constraint), mean over seeds with a band
    of one standard deviation.

    ``curves`` has columns ``init, constraint, lambda, mean, std``.
    """
    fig = go.Figure()
    for k, ((init, constraint), g) in enumerate(curves.groupby(["init", "constraint"], sort=False)):
        g = g.sort_values("lambda")
        label = init if constraint == "none" else f"{init} ({constraint})"
        color = color_of(init, k)
        std = g["std"].fillna(0.0)
        fig.add_trace(go.Scatter(
            x=np.concatenate([g["lambda"], g["lambda"][::-1]]),
            y=np.concatenate([g["mean"] + std, (g["mean"] - std)[::-1]]),
            fill="toself", line={"width": 0}, fillcolor=color, opacity=0.15,
            hoverinfo="skip", showlegend=False, legendgroup=label,
        ))
        fig.add_trace(go.Scatter(
            x=g["lambda"], y=g["mean"], mode="lines+markers", name=label, legendgroup=label,
            line={"color": color, "dash": "dash" if constraint != "none" else "solid"},
            customdata=std, hovertemplate=f"{label}<br>λ=%{{x}}<br>normalized=%{{y:.3f}} ± %{{customdata:.3f}}<extra></extra>",
        ))
    fig.update_xaxes(title="lambda")
    fig.update_yaxes(title="normalized average (merged / single)")
    return _finish(fig, title)
