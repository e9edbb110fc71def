"""The result of diagnosing adapters (:func:`osrm_core.workflows.diagnose_adapters`): its tables,
the per-layer verdicts, and the summaries that ``osrm diagnose`` prints and the Adapter
diagnosis page draws. The maths is in :mod:`osrm_core.diagnostics`; this is what a diagnosis
found, read one way by every front end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

import pandas as pd

from osrm_core.adapters import Adapter

#: The tables of a diagnosis written as CSV / JSON by ``osrm diagnose`` (``projected`` are adapters).
TABLES = ("coverage", "interference", "matrix", "angles", "own_energy", "posthoc", "verdicts", "sv_interference",
          "spectra", "spectrum")
#: What a diagnosis from projected statistics says in place of post-hoc OSRM.
POSTHOC_LEFT_OUT = "left out: projected statistics (post-hoc OSRM needs the d x d moments; --stats dense)"
#: The columns of :attr:`Diagnosis.spectrum` averaged over layers in the summary.
SPECTRUM_SUMMARY = ("nuclear_retention", "energy_ratio", "effective_rank_merged", "effective_rank_parts")


@dataclass
class Diagnosis:
    """What a diagnosis of existing adapters found.

    Attributes
    ----------
    names : list of str
        The adapters (= tasks), in the order they were given; every matrix follows it.
    coverage : DataFrame
        Which layers each adapter covers (:func:`osrm_core.workflows.coverage_table`).
    interference : DataFrame
        :func:`osrm_core.diagnostics.interference_table` rows per layer, for the adapters as
        uploaded and after post-hoc OSRM: column ``init`` = ``uploaded`` / ``posthoc_osrm``.
    angles : DataFrame
        Principal angles, data-data and adapter-data, same ``init`` column.
    own_energy : DataFrame
        Own-task energy share per task and layer, against a random subspace.
    posthoc : DataFrame
        ``adapter, layer, energy_kept`` of the post-hoc OSRM projection.
    projected : dict of name to Adapter
        The post-hoc OSRM adapters.
    sv_interference : DataFrame
        Data-free singular-vector overlap ``layer, adapter, data, sv_overlap``.
    spectra, spectrum : DataFrame
        The task-arithmetic merge's spectrum against its parts' (per layer; see
        :func:`osrm_core.diagnostics.merged_spectrum`).
    """

    names: list[str]
    coverage: pd.DataFrame
    interference: pd.DataFrame
    angles: pd.DataFrame
    own_energy: pd.DataFrame
    posthoc: pd.DataFrame
    projected: dict[str, Adapter] = field(repr=False)
    sv_interference: pd.DataFrame = field(repr=False)
    spectra: pd.DataFrame = field(repr=False)
    spectrum: pd.DataFrame = field(repr=False)

    @cached_property
    def matrix(self) -> pd.DataFrame:
        """Input energy ``sum_l E||A_j h_i||^2`` of the uploaded adapters (rows adapter j, columns data i)."""
        from osrm_core.diagnostics import interference_matrix

        return interference_matrix(self.interference[self.interference["init"] == "uploaded"])

    @cached_property
    def verdicts(self) -> pd.DataFrame:
        """Per layer, most interference first (:func:`osrm_core.diagnostics.layer_verdicts`)."""
        from osrm_core.diagnostics import layer_verdicts

        return layer_verdicts(self.interference, self.posthoc)

    def notes(self) -> list[str]:
        """The verdicts in words, one ranked sentence per block (:func:`layer_notes`)."""
        return layer_notes(self.verdicts)

    def overlap(self, layer: str | None = None) -> pd.DataFrame:
        """The data-free overlap as an adapter-by-adapter matrix in the order of :attr:`names`
        (mean over layers, or at ``layer``; the diagonal is NaN: not measured)."""
        from osrm_core.viz import overlap_matrix

        return overlap_matrix(self.sv_interference, self.names, layer)

    def kept_by_adapter(self) -> pd.Series:
        """Share of each adapter's ``Delta_W`` the projection keeps, mean over layers."""
        return self.posthoc.groupby("adapter", sort=False)["energy_kept"].mean()

    def own_energy_by_task(self) -> pd.DataFrame:
        """Own-task energy share against a random subspace's, mean over layers."""
        return self.own_energy.groupby("task", sort=False)[["share", "random_share"]].mean()

    def spectrum_summary(self) -> pd.Series:
        """The merged-spectrum columns of :data:`SPECTRUM_SUMMARY`, mean over layers."""
        return self.spectrum[list(SPECTRUM_SUMMARY)].mean()

    def tables(self) -> dict[str, pd.DataFrame]:
        """The tables of :data:`TABLES` as flat frames (the matrix with its adapter column)."""
        return {name: getattr(self, name).reset_index() if name == "matrix" else getattr(self, name)
                for name in TABLES}

    def to_text(self) -> str:
        """The diagnosis as ``osrm diagnose`` prints it."""
        def fmt(digits: int):
            return lambda x: f"{x:.{digits}f}"

        return "\n".join([
            "layers each adapter covers", self.coverage.to_string(index=False),
            "", "input interference sum_l E||A_j h_i||^2 (rows: adapter j, columns: data i)",
            self.matrix.to_string(float_format=lambda x: f"{x:.4g}"),
            "", "post-hoc OSRM energy kept (mean over layers)",
            self.kept_by_adapter().to_string(float_format=fmt(3)) if len(self.posthoc) else POSTHOC_LEFT_OUT,
            "", "per-layer verdicts, most interference first", *self.notes(),
            "", "own-task energy share vs random (mean over layers)",
            self.own_energy_by_task().to_string(float_format=fmt(4)),
            "", "data-free: share of adapter j's Delta W on the input directions of adapter i's (rows j, columns i;"
            " mean over layers)", self.overlap().to_string(float_format=fmt(4), na_rep="-"),
            "", "data-free: spectrum of the task-arithmetic merge against its parts (mean over layers; "
            "retention 1 = nothing cancels)", self.spectrum_summary().to_string(float_format=fmt(4)),
        ])


def layer_notes(verdicts: pd.DataFrame) -> list[str]:
    """One plain sentence per layer group (the adapted layers of one block), ranked by the
    interference they carry, from :func:`osrm_core.diagnostics.layer_verdicts`."""
    from osrm_core.viz.common import short_layer

    block = verdicts["layer"].map(lambda n: short_layer(n).split(".")[0])
    notes = []
    for name, part in verdicts.groupby(block, sort=False):
        total, own = float(part["cross_shift"].sum()), float(part["own_shift"].sum())
        layers = ", ".join(short_layer(n).split(".")[-1] for n in part["layer"])
        if own <= 0:
            notes.append((total, f"{name} ({layers}): the adapters do not change this block."))
            continue
        top = part.iloc[0]  # verdicts come most interference first
        said = (f"{name} ({layers}): the other tasks' adapters shift each task's outputs by {total:.2%} of their "
                f"energy in all ({total / own:.2f}x the wanted change), mostly {top['top_adapter']} on "
                f"{top['top_data']} ({top['top_share']:.0%} at {short_layer(top['layer'])})")
        if part["cross_shift_posthoc"].isna().all():  # projected statistics: no post-hoc OSRM
            notes.append((total, f"{said}: {_verdict(total / own, math.nan, math.nan)}."))
            continue
        removed = 1 - float(part["cross_shift_posthoc"].sum()) / total if total > 0 else 0.0
        kept = float(part["kept_by_posthoc"].mean())
        notes.append((total, f"{said}; post-hoc OSRM would remove {removed:.0%} of it and keep {kept:.0%} of the "
                             f"adapters' ΔW: {_verdict(total / own, removed, kept)}."))
    ranked = sorted(notes, key=lambda x: -x[0])
    return [f"{k}. {text}" for k, (_, text) in enumerate(ranked, start=1)]


def _verdict(cross_to_own: float, removed: float, kept: float) -> str:
    """What to do about a block: its cross shift relative to the wanted change, and what the
    projection removes of it and keeps of the adapters (NaN: not computed)."""
    if cross_to_own < 0.05:
        return "little to fix here"
    if math.isnan(removed):
        return "worth fixing here (what post-hoc OSRM would remove needs the dense statistics)"
    if removed >= 0.5 and kept >= 0.5:
        return "projecting is worth it here"
    if removed >= 0.5:
        return "it would remove the interference but also most of what the adapters learned here"
    return "projection would not help much here"
