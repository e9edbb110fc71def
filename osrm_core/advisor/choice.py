"""How the advisor picks among its finalists: task arithmetic unless another candidate wins
clearly on the validation share, and the sentence that says why."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from .result import method_label


def summarize(table: pd.DataFrame) -> pd.DataFrame:
    """Per candidate: mean held-out score, its 95% interval (per-task half-widths combined as
    independent normal errors), mean normalized score and the validation score."""
    rows = []
    for k, part in table.groupby("candidate", sort=True):
        half = np.sqrt((((part["high"] - part["low"]) / 2) ** 2).sum()) / len(part)
        mean = float(part["score"].mean())
        first = part.iloc[0]
        rows.append({"candidate": k, "method": first["method"], "density": first["density"],
                     "weights": first["weights"], "origin": first["origin"],
                     "validation": first["validation"], "score": mean, "low": mean - half, "high": mean + half,
                     "normalized": float(part["normalized"].mean())})
    return pd.DataFrame(rows)


#: Complexity of a finalist: task arithmetic with one lambda, another method's lambda, searched weights.
_TIER = {"default": 0, "grid": 1, "weights": 2}


def selection_margin(shares: Sequence[tuple[str, int]]) -> float:
    """How far another method or searched weights must beat task arithmetic's validation score to
    be chosen over it.

    Half the width of a 95% interval of a mean over tasks of ``n_t`` validation texts each, at
    the largest variance a score can have (0.25 for an accuracy or F1, 1 for a Matthews
    correlation in [-1, 1]): ``1.96 sqrt(sum_t v_t / n_t) / T``. With 20 texts per task and
    three tasks that is 6.3 points: picking the best of many candidates on a few dozen texts
    over-fits them, so the advisor keeps task arithmetic unless a candidate wins clearly.
    Losses (causal LMs): 0.
    """
    if not shares or any(metric == "loss" for metric, _ in shares):
        return 0.0
    var = sum((1.0 if metric == "mcc" else 0.25) / max(n, 1) for metric, n in shares)
    return 1.96 * math.sqrt(var) / len(shares)


def _baseline(summary: pd.DataFrame) -> pd.Series | None:
    """Task arithmetic at its best lambda on the validation share (lambda 1, the plain default,
    on a tie): one scalar tuned, the simplest candidate worth having."""
    ta = summary[(summary["method"] == "task_arithmetic") & summary["origin"].isin(["default", "grid"])]
    if ta.empty:
        return None
    return ta.assign(_d=ta["origin"] != "default").sort_values(["validation", "_d"], ascending=[False, True]).iloc[0]


def choose(summary: pd.DataFrame, margin: float = 0.0) -> pd.Series:
    """Task arithmetic at its best validation lambda (:func:`_baseline`) unless another finalist
    (another method, or searched weights) beats its validation score by more than ``margin``;
    among those that do, the best validation score, then the simpler, then the earlier."""
    base = _baseline(summary)
    if base is None:
        ok = summary
    else:
        ok = summary[(summary["candidate"] == base["candidate"]) | (summary["validation"] > base["validation"] + margin)]
    ranked = ok.assign(_tier=ok["origin"].map(_TIER).fillna(3)).sort_values(
        ["validation", "_tier", "candidate"], ascending=[False, True, True]
    )
    return ranked.iloc[0].drop("_tier")


def reason(summary: pd.DataFrame, chosen: pd.Series, margin: float = 0.0, lower: bool = False) -> str:
    what = method_label(chosen["method"], chosen["density"])
    if chosen["origin"] == "weights":
        what += f", per-adapter weights {chosen['weights']}"
    else:
        what += f", lambda {chosen['weights'].split('/')[0]}"
    held = f"{'mean loss ' if lower else ''}{chosen['score']:.3f} [{chosen['low']:.3f}, {chosen['high']:.3f}]"
    default = summary[summary["origin"] == "default"]
    base = _baseline(summary)
    if default.empty or base is None or lower:
        best = f"the best validation {'loss' if lower else 'score'} ({abs(chosen['validation']):.3f})"
        return f"{what}: {best}; held-out {held}."
    ref = default.iloc[0]
    plain = f"the plain default (task arithmetic, lambda 1: held-out {ref['score']:.3f})"
    gain = 100 * (chosen["score"] - ref["score"])
    versus = f"{abs(gain):.1f} points {'above' if gain >= 0 else 'below'} {plain}"
    if int(base["candidate"]) == int(chosen["candidate"]):
        lam = "the plain default" if chosen["origin"] == "default" else "task arithmetic's best lambda on the validation texts"
        return (f"{what}: {lam}; no other method or weighting beat it there by more than {100 * margin:.1f} points, "
                f"the uncertainty of so few texts; held-out {held}" + ("." if chosen["origin"] == "default" else f", {versus}."))
    return (f"{what}: validation {100 * (chosen['validation'] - base['validation']):.1f} points above task "
            f"arithmetic's best lambda (margin {100 * margin:.1f}); held-out {held}, {versus}.")
