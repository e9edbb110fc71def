"""The Diagnosis result object of ``diagnose_adapters``: its tables, verdicts and summaries equal
what the page, the command line and the advisor computed each on their own before (the old
numbers), one pivot of the data-free overlap, and what ``osrm diagnose`` prints and writes."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from conftest import TINY_TARGETS

from osrm_core.adapters import Adapter, LoraWeights
from osrm_core.diagnosis import TABLES, Diagnosis, layer_notes
from osrm_core.diagnostics import (
    interference_matrix,
    interference_table,
    layer_verdicts,
    posthoc_osrm_adapters,
)
from osrm_core.models import weight_as_linear
from osrm_core.workflows import diagnose_adapters

NAMES = ("sentiment", "topic", "question")


def _random_adapter(seed: int, rank: int = 3) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    layers = {name: LoraWeights(torch.randn(rank, 32, generator=g, dtype=torch.float64),
                                torch.randn(32, rank, generator=g, dtype=torch.float64), 0.5)
              for name in TINY_TARGETS}
    return Adapter(layers, {}, {"r": rank})


@pytest.fixture(scope="module")
def case(tiny_model, tiny_stats, tiny_tasks):
    """Three random adapters on the tiny model, their tasks' statistics and their diagnosis."""
    by_name = {t.name: s for t, s in zip(tiny_tasks, tiny_stats, strict=True)}
    adapters = {n: _random_adapter(k) for k, n in enumerate(NAMES)}
    stats = {n: by_name[n] for n in NAMES}
    return adapters, stats, diagnose_adapters(tiny_model, adapters, stats)


def test_diagnosis_tables_equal_the_old_computation(case, tiny_model) -> None:
    adapters, stats, diagnosis = case
    assert isinstance(diagnosis, Diagnosis) and diagnosis.names == list(NAMES)
    w0 = {n: weight_as_linear(tiny_model.get_submodule(n)).detach() for n in TINY_TARGETS}
    projected, kept = posthoc_osrm_adapters(adapters, stats)
    uploaded = interference_table(adapters, stats, w0)
    old = pd.concat([uploaded.assign(init="uploaded"),
                     interference_table(projected, stats, w0).assign(init="posthoc_osrm")], ignore_index=True)
    pd.testing.assert_frame_equal(diagnosis.interference, old)
    pd.testing.assert_frame_equal(diagnosis.matrix, interference_matrix(uploaded))
    pd.testing.assert_frame_equal(diagnosis.posthoc, kept[["adapter", "layer", "energy_kept"]])
    # The verdicts the page and the advisor computed from these tables, and their sentences.
    verdicts = layer_verdicts(old, kept)
    pd.testing.assert_frame_equal(diagnosis.verdicts, verdicts)
    assert diagnosis.notes() == layer_notes(verdicts)
    assert len(diagnosis.notes()) == 2 and diagnosis.notes()[0].startswith("1. L")  # two blocks, ranked


def test_the_advisor_gets_the_same_verdicts(case, tiny_model) -> None:
    from osrm_core.advisor import adapter_layer_verdicts
    from osrm_core.advisor import layer_notes as advise_notes

    adapters, stats, diagnosis = case
    old = adapter_layer_verdicts(tiny_model, adapters, stats)
    pd.testing.assert_frame_equal(diagnosis.verdicts, old)
    assert diagnosis.notes() == advise_notes(old)


def test_summaries_equal_the_old_command_line_numbers(case) -> None:
    _, _, diagnosis = case
    old_kept = diagnosis.posthoc.groupby("adapter")["energy_kept"].mean()
    pd.testing.assert_series_equal(diagnosis.kept_by_adapter().sort_index(), old_kept)
    old_own = diagnosis.own_energy.groupby("task")[["share", "random_share"]].mean()
    pd.testing.assert_frame_equal(diagnosis.own_energy_by_task().sort_index(), old_own)
    # One pivot of the overlap: the command line's old one (sorted), in the page's order, blank diagonal.
    old_overlap = diagnosis.sv_interference.pivot_table(index="adapter", columns="data", values="sv_overlap")
    overlap = diagnosis.overlap()
    assert list(overlap.index) == list(overlap.columns) == list(NAMES)
    assert overlap.isna().to_numpy().diagonal().all()
    off = ~overlap.isna()
    torch.testing.assert_close(torch.tensor(overlap.to_numpy()[off.to_numpy()]),
                               torch.tensor(old_overlap.loc[list(NAMES), list(NAMES)].to_numpy()[off.to_numpy()]))
    at = diagnosis.overlap(TINY_TARGETS[0])
    first = diagnosis.sv_interference.query("layer == @TINY_TARGETS[0]")
    assert at.loc["topic", "sentiment"] == pytest.approx(
        first.query("adapter == 'topic' and data == 'sentiment'")["sv_overlap"].item())


def test_text_and_tables_of_the_command_line(case) -> None:
    _, _, diagnosis = case
    tables = diagnosis.tables()
    assert list(tables) == list(TABLES)
    assert list(tables["matrix"].columns) == ["adapter", *sorted(NAMES)]
    text = diagnosis.to_text()
    for heading in ("layers each adapter covers", "input interference", "post-hoc OSRM energy kept",
                    "per-layer verdicts", "own-task energy share", "data-free: share", "data-free: spectrum"):
        assert heading in text
    assert all(note in text for note in diagnosis.notes())


def test_layer_notes_verdicts() -> None:
    """Each verdict from hand-made verdict rows: little cross shift, worth projecting, costly, no help."""
    def row(block: int, cross: float, after: float, kept: float) -> dict:
        return {"layer": f"bert.encoder.layer.{block}.attention.self.query", "cross_shift": cross, "own_shift": 1.0,
                "cross_shift_posthoc": after, "kept_by_posthoc": kept, "top_adapter": "a", "top_data": "b",
                "top_share": 1.0}

    notes = layer_notes(pd.DataFrame([row(0, 0.9, 0.1, 0.9), row(1, 0.8, 0.1, 0.2), row(2, 0.7, 0.6, 0.9),
                                      row(3, 0.01, 0.0, 1.0)]))
    assert [n.rsplit(": ", 1)[1] for n in notes] == [
        "projecting is worth it here.",
        "it would remove the interference but also most of what the adapters learned here.",
        "projection would not help much here.",
        "little to fix here.",
    ]


def test_verdicts_without_posthoc_osrm_say_so(case) -> None:
    """From projected statistics (no post-hoc OSRM rows) the post-hoc columns are NaN and each
    note stops at the interference, naming what the rest needs."""
    _, _, diagnosis = case
    uploaded = diagnosis.interference[diagnosis.interference["init"] == "uploaded"]
    verdicts = layer_verdicts(uploaded, diagnosis.posthoc.iloc[:0])
    columns = ["cross_shift_posthoc", "removed_by_posthoc", "kept_by_posthoc"]
    assert verdicts[columns].isna().all().all()
    pd.testing.assert_frame_equal(verdicts.drop(columns=columns), diagnosis.verdicts.drop(columns=columns))
    notes = layer_notes(verdicts)
    assert len(notes) == 2 and all(n.endswith("worth fixing here (what post-hoc OSRM would remove needs the dense "
                                              "statistics).") for n in notes)
