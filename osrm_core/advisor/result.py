"""What the advisor found (:class:`Advice`) and the per-layer verdicts it reports."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import pandas as pd
import torch

from osrm_core.adapters import Adapter, union_layers
from osrm_core.diagnosis import layer_notes
from osrm_core.evaluate import LOWER_IS_BETTER


@dataclass
class Advice:
    """What :func:`advise` found.

    Attributes
    ----------
    candidates : DataFrame
        One row per finalist and task: ``candidate, method, density, weights, origin,
        validation, task, metric, n, score, low, high, single, normalized`` (held-out share; ``validation``
        is the candidate's mean validation score, the search objective). The finalists are the
        best grid point of each method and density (``origin`` ``grid``) and the weights the
        search found from the best of them (``weights``).
    summary : DataFrame
        One row per finalist: mean held-out score with its 95% interval, mean normalized score,
        validation score.
    search : DataFrame
        Every validation evaluation of the search in order: ``evaluation, stage`` (``grid`` or
        ``weights``), ``method, density, weights, validation`` (minus the loss for causal LMs).
    single : DataFrame
        Single-task scores per task on each share (``task, share, score``).
    recommended : dict
        The chosen candidate (method, density, weights, held-out scores).
    reason : str
        One sentence with numbers saying why.
    shares : dict of task to {"split": origin, "validation": indices, "heldout": indices}
        Where each task's samples came from (``"test"``: the source's test split) and the
        indices of each share into that pool (see :func:`split_samples`).
    merged : dict of layer to tensor (d_out, d_in), or to LoraFactors
        The recommended merge's ``Delta_W`` (its LoRA factors where the search ran in core space).
    layers : DataFrame
        Per-layer verdicts (:func:`osrm_core.diagnostics.layer_verdicts`) from the statistics of
        the validation share; :func:`layer_notes` says them in words.
    notes : list of str
        What the memory plan decided (:func:`osrm_core.advisor.advice_plan`): projected statistics
        (the verdicts then lack post-hoc OSRM), core space, RegMean left out; one line each.
    """

    names: list[str]
    candidates: pd.DataFrame
    summary: pd.DataFrame
    single: pd.DataFrame
    recommended: dict
    reason: str
    evaluations: int
    seconds: float
    shares: dict[str, dict[str, list[int]]] = field(repr=False)
    settings: dict = field(default_factory=dict)
    merged: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    layers: pd.DataFrame = field(default_factory=pd.DataFrame, repr=False)
    search: pd.DataFrame = field(default_factory=pd.DataFrame, repr=False)
    notes: list[str] = field(default_factory=list)

    @property
    def lower_is_better(self) -> bool:
        """Whether the scores are losses (adapters of a causal LM): the best comes lowest."""
        return bool(len(self.candidates)) and bool(self.candidates["metric"].isin(LOWER_IS_BETTER).all())

    def to_dict(self) -> dict:
        def records(df: pd.DataFrame) -> list[dict]:
            return json.loads(df.to_json(orient="records"))

        return {
            "adapters": self.names,
            "recommended": self.recommended,
            "reason": self.reason,
            "summary": records(self.summary),
            "candidates": records(self.candidates),
            "search": records(self.search),
            "single": records(self.single),
            "evaluations": self.evaluations,
            "seconds": round(self.seconds, 2),
            "shares": self.shares,
            "samples": {n: {"split": s["split"], "validation": len(s["validation"]), "heldout": len(s["heldout"])}
                        for n, s in self.shares.items()},
            "layers": records(self.layers),
            "layer_notes": layer_notes(self.layers) if len(self.layers) else [],
            "notes": self.notes,
            "settings": self.settings,
        }


def weights_label(weights: Sequence[float]) -> str:
    return "/".join(f"{w:.2g}" for w in weights)


def method_label(method: str, density: float | None) -> str:
    return method + ("" if density is None or pd.isna(density) else f" (density {density:g})")


def adapter_layer_verdicts(model, adapters: dict[str, Adapter], stats: dict) -> pd.DataFrame:
    """:func:`osrm_core.diagnostics.layer_verdicts` of the adapters against their tasks' statistics
    (over the union of their layers). From projected statistics
    (:class:`osrm_core.stats.ProjectedStats`) the same numbers but the post-hoc OSRM columns,
    which need the ``d x d`` moments (NaN)."""
    from osrm_core.diagnostics import interference_table, layer_verdicts, posthoc_osrm_adapters
    from osrm_core.models import weight_as_linear
    from osrm_core.stats import ProjectedStats

    if isinstance(next(iter(stats.values())), ProjectedStats):
        return layer_verdicts(interference_table(adapters, stats).assign(init="uploaded"),
                              pd.DataFrame(columns=["adapter", "layer", "energy_kept"]))
    w0 = {n: weight_as_linear(model.get_submodule(n)).detach() for n in union_layers(adapters)}
    projected, kept = posthoc_osrm_adapters(adapters, stats)
    table = pd.concat(
        [interference_table(adapters, stats, w0).assign(init="uploaded"),
         interference_table(projected, stats, w0).assign(init="posthoc_osrm")],
        ignore_index=True,
    )
    return layer_verdicts(table, kept)
