"""Files offered for download, made safe to open: CSV cells that a spreadsheet would run as a
formula are neutralized, user text in figures is escaped so that it shows as text, and file
names are reduced to safe characters.

Task names, sample texts and file names come from users (or from a run someone else made), and
they end up in tables and figure labels. A CSV cell starting with ``=``, ``+``, ``-``, ``@``, a
tab or a carriage return is a formula in Excel, LibreOffice and Google Sheets (CSV injection);
the OWASP rule is to prefix such a cell with ``'``. Plotly renders a small HTML subset in
titles, labels and hover text, so a task named ``<script>`` or ``<a href=...>`` is escaped to
``&lt;script&gt;``, which plotly.js shows as the literal text.
"""

from __future__ import annotations

import html
import re
from typing import Literal

import numpy as np
import pandas as pd
import plotly.graph_objects as go

#: First characters that make a spreadsheet cell a formula (OWASP, CSV injection).
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
#: The markup our figure builders write themselves (line breaks, hover boxes, emphasis); every
#: other tag in a figure's text is escaped.
FIGURE_TAGS = re.compile(r"&lt;(/?(?:br|b|i|em|sub|sup|extra)/?)&gt;")
MIME_TYPES = {"csv": "text/csv", "html": "text/html", "zip": "application/zip"}


def neutralize_cell(value):
    """``value`` with a leading ``'`` when it is text that a spreadsheet would read as a formula."""
    if isinstance(value, str) and value.startswith(FORMULA_START):
        return "'" + value
    return value


def safe_csv(df: pd.DataFrame) -> bytes:
    """``df`` as UTF-8 CSV bytes (no index, RFC 4180 line ends, so that a cell holding a carriage
    return is quoted) with every text cell and column name neutralized (:func:`neutralize_cell`);
    numbers stay numbers (a negative score is not text)."""
    out = df.copy()
    out.columns = [neutralize_cell(str(c)) for c in out.columns]
    for c in out.columns:
        if not pd.api.types.is_numeric_dtype(out[c]):
            out[c] = out[c].map(neutralize_cell)
    return out.to_csv(index=False, lineterminator="\r\n").encode("utf-8")


def _escape_text(text: str) -> str:
    return FIGURE_TAGS.sub(r"<\1>", html.escape(text, quote=False))


def _escape(value):
    if isinstance(value, str):
        return _escape_text(value)
    if isinstance(value, dict):
        return {k: v if k == "template" else _escape(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_escape(v) for v in value]
    if isinstance(value, np.ndarray) and value.dtype.kind in "OUS":
        return np.array([_escape(v) for v in value.ravel()], dtype=object).reshape(value.shape)
    return value


def escaped_figure(fig: go.Figure) -> go.Figure:
    """A copy of ``fig`` whose text (titles, axis and tick labels, trace names, annotations,
    hover text, categories) has ``&``, ``<`` and ``>`` escaped, except the few tags the figure
    builders write (:data:`FIGURE_TAGS`): user text is shown as text, never read as markup."""
    return go.Figure(_escape(fig.to_dict()))


def safe_name(text: str, default: str = "task") -> str:
    """``text`` reduced to letters, digits, ``_`` and ``-`` (a valid task or file name)."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")
    return name or default


def safe_file_name(name: str, kind: Literal["csv", "html", "zip"], default: str = "download") -> str:
    """A download's file name: :func:`safe_name` (at most 100 characters) and the extension."""
    return f"{safe_name(name, default)[:100]}.{kind}"
