"""The advice written out: Markdown report, ``advice.json``, the merged adapter and the
``osrm merge`` command that makes it again."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from osrm_core.adapters import Adapter
from osrm_core.markdown import markdown_table

from .result import Advice, layer_notes, method_label


def grid_table(search: pd.DataFrame) -> pd.DataFrame:
    """The grid stage of :attr:`Advice.search` as a table: one row per method and density, one
    column per lambda, the validation score in the cells."""
    grid = search[search["stage"] == "grid"] if not search.empty else search
    if grid.empty:
        return pd.DataFrame()
    grid = grid.assign(
        config=[method_label(m, d) for m, d in zip(grid["method"], grid["density"])],
        lam=grid["weights"].str.split("/").str[0],
    )
    table = grid.pivot_table(index="config", columns="lam", values="validation", sort=False)
    return table.rename_axis(columns=None).reset_index().rename(columns={"config": "method"})


def advice_markdown(advice: Advice) -> str:
    """The advice as a short Markdown report."""
    cols = ["method", "density", "weights", "origin", "validation", "score", "low", "high", "normalized"]
    table = advice.summary.sort_values("score", ascending=advice.lower_is_better)[cols]
    single = advice.single.pivot_table(index="task", columns="share", values="score").reset_index()
    lines = [
        "# Merge advice", "",
        f"Adapters: {', '.join(advice.names)}. {advice.evaluations} evaluations in {advice.seconds:.1f} s.", "",
        f"**Recommended**: {advice.reason}", "",
        *[f"Note: {note}\n" for note in advice.notes],
        "Where each task's samples came from (`test`: the test split of a task folder, never its train",
        "texts), and how many went to each share: "
        + "; ".join(f"{n} {s['split']} ({len(s['validation'])} validation, {len(s['heldout'])} held out)"
                    for n, s in advice.shares.items()) + ".", "",
        "Scores are each task's metric on the held-out share (never seen by the search), averaged over",
        "tasks, with a 95% interval (Wilson per task for accuracy, bootstrap otherwise); for adapters of",
        "a causal LM the metric is the mean token loss (lower is better). `normalized` divides by each",
        "adapter alone. `validation` is the search objective (higher is better: minus a loss).", "",
        markdown_table(table), "", "## Single-task scores", "", markdown_table(single), "",
        "## The search on the validation share", "",
        f"Validation score of each grid point (rows: method and density; columns: lambda); then "
        f"{int((advice.search['stage'] == 'weights').sum()) if len(advice.search) else 0} evaluations of "
        "per-adapter weights.", "",
        markdown_table(grid_table(advice.search)), "",
        "## Interference per layer", "",
        "Exact, from the statistics of the validation texts; ranked by the summed relative output",
        "shift of every adapter on the other tasks' inputs.", "",
        *[f"{note}  " for note in layer_notes(advice.layers)], "",
        markdown_table(advice.layers), "",
    ]
    return "\n".join(lines)


def merge_command(advice: Advice, adapters: dict[str, Adapter], out: str = "merged/") -> str:
    """The ``osrm merge`` command that writes the recommended adapter again (equal weights are
    one lambda: every method here is positively homogeneous, ``merge(w D) = w merge(D)``)."""
    rec = advice.recommended
    weights = list(rec["weights"])
    parts = ["osrm merge", *[f"--adapter {n}={adapters[n].source or n}" for n in advice.names],
             f"--method {rec['method']}"]
    if rec["density"] is not None:
        parts.append(f"--density {rec['density']:g}")
    if len(set(weights)) == 1:
        parts.append(f"--lambda {weights[0]:g}")
    else:
        parts += ["--lambda 1", "--weights " + ",".join(f"{n}={w:g}" for n, w in zip(advice.names, weights))]
    if rec["method"].startswith("dare"):
        parts.append(f"--seed {advice.settings.get('seed', 0)}")
    if advice.settings.get("space") == "core":
        parts.append("--space core")
    return " ".join([*parts, f"--out {out}"])


def write_advice(advice: Advice, adapters: dict[str, Adapter], out: str | Path) -> Path:
    """Write ``advice.json``, ``advice.md`` and the recommended merged adapter (``adapter/``,
    loadable by plain peft, each task's head under ``adapter/heads/``, its model card with the
    held-out scores)."""
    from osrm_core.atomic import write_json, write_text
    from osrm_core.export import write_merged_adapter, write_model_card

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path, written = write_merged_adapter(out / "adapter", advice.merged, adapters)
    rec = advice.recommended
    params = {"weights": list(rec["weights"]), **({} if rec["density"] is None else {"density": rec["density"]})}
    held = advice.candidates[advice.candidates["candidate"] == rec["candidate"]]
    on = ("the advisor's held-out share of each task's samples (texts the search never scored; from: "
          + ", ".join(f"{n} {s['split']}" for n, s in advice.shares.items()) + ")")
    write_model_card(path, adapters, method=rec["method"], lam=1.0, params=params,
                     scores=held[["task", "metric", "score", "single", "normalized"]],
                     evaluation={"on": on, "rows": {n: len(s["heldout"]) for n, s in advice.shares.items()},
                                 "max_length": advice.settings.get("max_length"), "seed": advice.settings.get("seed")},
                     written=written)
    write_json(out / "advice.json", {**advice.to_dict(), "command": merge_command(advice, adapters)})
    write_text(out / "advice.md", advice_markdown(advice) + "\n## The same adapter from the command line\n\n"
               f"```bash\n{merge_command(advice, adapters)}\n```\n")
    return out
