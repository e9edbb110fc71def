"""Tables as Markdown, for the reports the workbench writes (the study's, the advisor's)."""

from __future__ import annotations

import pandas as pd


def markdown_table(df: pd.DataFrame, digits: int = 3, empty: str = "_None._") -> str:
    """``df`` as a Markdown table, floats with ``digits`` decimals (NaN left blank); ``empty``
    stands for a table without rows or columns."""
    if df.empty or len(df.columns) == 0:
        return empty
    df = df.copy()
    for c in df.columns:
        if pd.api.types.is_float_dtype(df[c]):
            df[c] = df[c].map(lambda x: "" if pd.isna(x) else f"{x:.{digits}f}")
    header = "| " + " | ".join(str(c) for c in df.columns) + " |"
    sep = "|" + "---|" * len(df.columns)
    rows = ["| " + " | ".join(str(x) for x in r) + " |" for r in df.itertuples(index=False)]
    return "\n".join([header, sep, *rows])
