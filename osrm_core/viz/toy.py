"""The Learn page's toy figure: task clouds and each adapter's row space."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import plotly.graph_objects as go

from osrm_core.errors import OsrmInputError

from .common import _finish, _task_colors, color_of


def toy_figure(
    clouds: Mapping[str, np.ndarray], adapters: Mapping[str, np.ndarray], *, title: str = ""
) -> go.Figure:
    """The task clouds and each adapter's row space (a line per row; in 3-D a rank-2 row space
    is drawn as a plane)."""
    if not clouds:
        raise OsrmInputError("clouds is empty")
    dim = next(iter(clouds.values())).shape[1]
    reach = max(float(np.abs(c).max()) for c in clouds.values()) * 1.05
    colors = _task_colors(list(clouds))
    at = "(%{x:.2f}, %{y:.2f})" if dim == 2 else "(%{x:.2f}, %{y:.2f}, %{z:.2f})"
    fig = go.Figure()
    for name, pts in clouds.items():
        fig.add_trace(_trace(pts, mode="markers", name=name, opacity=0.45,
                             marker=dict(size=5 if dim == 2 else 2.5, color=colors[name]),
                             hovertemplate=f"{name}<br>{at}<extra></extra>"))
    for i, (label, A) in enumerate(adapters.items()):
        color = color_of(label.split(" ")[0].lower(), i + 3)
        dash = "dash" if label.lower().startswith("standard") else "solid"
        A = np.atleast_2d(A)
        if dim == 3 and A.shape[0] >= 2:
            fig.add_trace(_plane(A[0] * reach, A[1] * reach, f"{label} row space", color))
            continue
        for k, row in enumerate(A):
            name = f"{label} row space" + (f" ({k + 1})" if A.shape[0] > 1 else "")
            hover = f"{name}<br>direction ({row[0]:.2f}, {row[1]:.2f})" if dim == 2 else name
            fig.add_trace(_trace(np.stack([-row * reach, row * reach]), mode="lines", name=name, legendgroup=label,
                                 line=dict(color=color, width=4 if dim == 2 else 6, dash=dash),
                                 hovertemplate=f"{hover}<extra></extra>"))
    if dim == 2:
        fig.update_xaxes(range=[-reach, reach], title="h[0]")
        fig.update_yaxes(range=[-reach, reach], title="h[1]", scaleanchor="x", scaleratio=1)
    else:
        fig.update_layout(
            scene=dict(aspectmode="cube", xaxis_title="h[0]", yaxis_title="h[1]", zaxis_title="h[2]")
        )
    return _finish(fig, title, height=520)


def _trace(pts: np.ndarray, **style) -> go.Scatter | go.Scatter3d:
    """Points (rows of ``pts``, 2 or 3 columns) as a 2-D or 3-D scatter trace."""
    if pts.shape[1] == 2:
        return go.Scatter(x=pts[:, 0], y=pts[:, 1], **style)
    return go.Scatter3d(x=pts[:, 0], y=pts[:, 1], z=pts[:, 2], **style)


def _plane(u: np.ndarray, v: np.ndarray, name: str, color: str) -> go.Mesh3d:
    """The square spanned by ``u`` and ``v`` (two triangles), for a rank-2 row space in 3-D."""
    corners = np.array([u + v, u - v, -u - v, -u + v])
    return go.Mesh3d(x=corners[:, 0], y=corners[:, 1], z=corners[:, 2], i=[0, 0], j=[1, 2], k=[2, 3], color=color,
                     opacity=0.25, name=name, showlegend=True, hovertemplate=f"{name}<extra></extra>")
