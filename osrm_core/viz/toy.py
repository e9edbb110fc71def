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
