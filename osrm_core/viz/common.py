"""What every figure shares: fixed colours per init and per task, short layer labels, the
layout finish and the standalone HTML export."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import plotly.graph_objects as go
from plotly.colors import qualitative

from osrm_core.inits import INITS

#: Fixed colours of the inits (from their registry), so that standard and OSRM look the same on
#: every page; uploaded adapters look like standard ones, their post-hoc OSRM form like OSRM.
INIT_COLORS: dict[str, str] = {
    **{name: init.color for name, init in INITS.items()},
    "uploaded": INITS["standard"].color,
    "posthoc_osrm": INITS["osrm"].color,
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


#: Height (px) of the band at the top of a figure that plotly's toolbar (modebar) takes on hover.
MODEBAR_BAND = 34


def _finish(fig: go.Figure, title: str = "", height: int | None = None) -> go.Figure:
    """The shared layout. The title starts at the figure's left edge (the full width for long
    titles of narrow side-by-side charts), just above the plot area and below the toolbar's
    band (:data:`MODEBAR_BAND`), so the toolbar never covers it, also in narrow side-by-side charts."""
    # Subplot titles sit just above the plot area too: the title goes above them.
    above = 24 if any(a.yref == "paper" and a.yanchor == "bottom" and (a.y or 0) >= 1
                      for a in fig.layout.annotations) else 0
    fig.update_layout(
        title=dict(text=title, x=0.01, xref="container", xanchor="left", y=1, yref="paper", yanchor="bottom",
                   pad=dict(b=8 + above)) if title else None,
        margin=dict(l=60, r=20, t=MODEBAR_BAND + 36 + above if title else MODEBAR_BAND + above, b=50),
        hovermode="closest",
        legend=dict(groupclick="toggleitem"),
        **({"height": height} if height else {}),
    )
    return fig


def figures_page(figs: dict[str, go.Figure], title: str = "") -> str:
    """One HTML page with several figures, plotly.js loaded once from its CDN."""
    parts = [fig.to_html(include_plotlyjs="cdn" if i == 0 else False, full_html=False) for i, fig in enumerate(figs.values())]
    body = "\n".join(f"<h2>{name}</h2>\n{html}" for name, html in zip(figs, parts))
    return f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{title}</title></head>\n<body>\n<h1>{title}</h1>\n{body}\n</body></html>\n"


def figure_html(fig: go.Figure) -> str:
    """A standalone HTML page of ``fig`` that works offline (plotly.js included)."""
    return fig.to_html(include_plotlyjs=True, full_html=True)
