"""Tests for exact interference, principal angles, own-task energy and post-hoc OSRM
(:mod:`osrm_core.diagnostics`), against hooks on real forward passes and naive loops."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_TARGETS

from osrm_core.adapters import Adapter, LoraWeights, lora_from_model
from osrm_core.batching import iter_batches
from osrm_core.diagnostics import (
    angle_table,
    input_interference,
    interference_matrix,
    interference_table,
    output_shift,
    own_energy,
    own_energy_table,
    posthoc_osrm,
    principal_angles,
    quadratic_trace,
    row_space,
    summed_interference,
)
from osrm_core.inits import init_lora, osrm_subspace
from osrm_core.spectra import symmetric_eigh
from osrm_core.stats import collect_feature_stats

RANK = 4


def _random_adapter(seed: int, scale: float = 2.0, rank: int = RANK) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    layers = {
        name: LoraWeights(
            torch.randn(rank, 32, generator=g, dtype=torch.float64),
            torch.randn(32, rank, generator=g, dtype=torch.float64),
            scale,
        )
        for name in TINY_TARGETS
    }
    return Adapter(layers, {}, {"r": rank})


# --------------------------------------------------------------------------- exact interference


def test_trace_formulas_match_hooks_on_real_forward_passes(make_tiny_model, tokenizer, tiny_tasks) -> None:
    """tr(A S A^T), tr(dW S dW^T) and tr(W0 S W0^T) equal the mean over real tokens of
    ||A h||^2, ||s B A h||^2 and ||W0 h||^2 measured inside the adapted model (float64)."""
    peft_model = init_lora(make_tiny_model(seed=4), "standard", rank=RANK, alpha=8, seed=1)
    base = peft_model.get_base_model()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name in TINY_TARGETS:  # B != 0, so the adapters change the later layers' inputs too
            B = base.get_submodule(name).lora_B["default"].weight
            B.copy_(0.3 * torch.randn(B.shape, generator=g, dtype=B.dtype))
    task = tiny_tasks[1]
    stats = collect_feature_stats(peft_model, tokenizer, task, max_samples=None, batch_size=8)
    assert not base.bert.embeddings.dropout.training  # collecting left the model's modes alone
    peft_model.eval()
    assert list(stats.layers) == TINY_TARGETS
    adapter = lora_from_model(peft_model)
    assert sorted(adapter.layers) == sorted(TINY_TARGETS) and adapter.layers[TINY_TARGETS[0]].scale == 2.0
    assert any(k.startswith("classifier") for k in adapter.head)

    sums = {(n, kind): 0.0 for n in TINY_TARGETS for kind in ("A", "BA", "W0")}
    counts = dict.fromkeys(TINY_TARGETS, 0)
    state: dict = {}

    def record(name: str, kind: str, scale: float = 1.0, bias: torch.Tensor | None = None):
        def hook(module, args, out):
            y = out if bias is None else out - bias
            real = (scale * y)[state["mask"]].to(torch.float64)
            sums[(name, kind)] += float((real**2).sum())
            if kind == "A":
                counts[name] += real.shape[0]

        return hook

    handles = []
    for name in TINY_TARGETS:
        layer = base.get_submodule(name)
        handles += [
            layer.lora_A["default"].register_forward_hook(record(name, "A")),
            layer.lora_B["default"].register_forward_hook(
                record(name, "BA", float(layer.scaling["default"]))
            ),
            layer.base_layer.register_forward_hook(record(name, "W0", bias=layer.base_layer.bias)),
        ]
    try:
        with torch.no_grad():
            for batch in iter_batches(tokenizer, task.train, batch_size=5, with_labels=False):
                state["mask"] = batch["attention_mask"].bool()
                peft_model(**batch)
    finally:
        for h in handles:
            h.remove()

    table = interference_table(
        {"topic": adapter},
        {"topic": stats},
        {n: base.get_submodule(n).base_layer.weight for n in TINY_TARGETS},
    )
    for name in TINY_TARGETS:
        S, lw = stats.layers[name].second_moment, adapter.layers[name]
        n = counts[name]
        assert n == stats.layers[name].count
        measured = {kind: sums[(name, kind)] / n for kind in ("A", "BA", "W0")}
        W0 = base.get_submodule(name).base_layer.weight
        assert math.isclose(input_interference(lw.A, S), measured["A"], rel_tol=1e-6)
        assert math.isclose(output_shift(lw, S), measured["BA"], rel_tol=1e-6)
        assert math.isclose(quadratic_trace(W0, S), measured["W0"], rel_tol=1e-6)
        row = table[table.layer == name].iloc[0]
        assert math.isclose(row.input_energy, measured["A"], rel_tol=1e-6)
        assert math.isclose(row.relative_shift, measured["BA"] / measured["W0"], rel_tol=1e-6)
        assert bool(row.own)


def test_interference_table_equals_a_naive_loop(tiny_model, tiny_tasks, tiny_stats) -> None:
    adapters = {t.name: _random_adapter(k, scale=0.5 * (k + 1)) for k, t in enumerate(tiny_tasks[:3])}
    stats = {t.name: s for t, s in zip(tiny_tasks, tiny_stats, strict=True)}
    W0 = {n: tiny_model.get_submodule(n).weight.detach() for n in TINY_TARGETS}
    table = interference_table(adapters, stats, W0)
    # Parameters (requires_grad) work the same, without autograd warnings.
    with_params = interference_table(
        adapters, stats, {n: tiny_model.get_submodule(n).weight for n in TINY_TARGETS}
    )
    assert with_params.equals(table)
    assert list(table.columns) == [
        "layer",
        "adapter",
        "data",
        "input_energy",
        "output_shift",
        "relative_shift",
        "own",
    ]
    assert len(table) == 3 * 4 * 4
    expected = []
    for j, adapter in adapters.items():
        for layer, lw in adapter.layers.items():
            for i, st in stats.items():
                S = st.layers[layer].sum_outer / st.layers[layer].count
                dW = lw.scale * lw.B @ lw.A
                shift = float(torch.trace(dW @ S @ dW.T))
                base = float(torch.trace(W0[layer].double() @ S @ W0[layer].double().T))
                expected.append(
                    (layer, j, i, float(torch.trace(lw.A @ S @ lw.A.T)), shift, shift / base, i == j)
                )
    for row, ref in zip(table.itertuples(index=False), expected, strict=True):
        assert (row.layer, row.adapter, row.data, row.own) == (ref[0], ref[1], ref[2], ref[6])
        for got, want in zip((row.input_energy, row.output_shift, row.relative_shift), ref[3:6], strict=True):
            assert math.isclose(got, want, rel_tol=1e-10)
    # Without base weights there is no relative shift.
    assert table.pipe(lambda t: t.relative_shift.notna().all())
    assert interference_table(adapters, stats).relative_shift.isna().all()
    # The task-by-task matrix sums the layers.
    matrix = interference_matrix(table)
    for j in adapters:
        for i in stats:
            want = sum(r[3] for r in expected if r[1] == j and r[2] == i)
            assert math.isclose(matrix.loc[j, i], want, rel_tol=1e-10)
    shifts = interference_matrix(table, "output_shift")
    assert shifts.shape == (3, 4)


def test_summed_interference_is_the_naive_sum(tiny_stats) -> None:
    A = osrm_subspace(tiny_stats[1:], RANK)
    got = summed_interference(A, tiny_stats[1:])
    for name, a in A.items():
        want = sum(float(torch.trace(a @ s.layers[name].second_moment @ a.T)) for s in tiny_stats[1:])
        assert math.isclose(got[name], want, rel_tol=1e-12)


def test_interference_rejects(tiny_stats) -> None:
    adapter = _random_adapter(0)
    with pytest.raises(ValueError, match="needs at least one adapter and one task's statistics"):
        interference_table({}, {"a": tiny_stats[0]})
    from osrm_core.stats import FeatureStats

    part = FeatureStats({n: tiny_stats[0].layers[n] for n in TINY_TARGETS[:2]}, task="part")
    with pytest.raises(ValueError, match=f"statistics of task 'part' have no layer '{TINY_TARGETS[2]}'"):
        interference_table({"a": adapter}, {"part": part})
    wide = Adapter({TINY_TARGETS[0]: LoraWeights(torch.ones(2, 64), torch.ones(32, 2), 1.0)}, {}, {})
    with pytest.raises(
        ValueError, match=f"size mismatch for layer '{TINY_TARGETS[0]}': statistics 32, adapter 64"
    ):
        interference_table({"a": wide}, {"t": tiny_stats[0]})
    table = interference_table({"a": adapter}, {"t": tiny_stats[0]})
    with pytest.raises(ValueError, match="value 'energy' is not a column"):
        interference_matrix(table, "energy")


# --------------------------------------------------------------------------- angles and energy


def test_principal_angles() -> None:
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(10, 10, generator=g, dtype=torch.float64))
    U, V = Q[:, :3], Q[:, 3:6]
    np.testing.assert_allclose(principal_angles(U, U), 0.0, atol=1e-5)
    np.testing.assert_allclose(
        principal_angles(U, U @ torch.randn(3, 3, generator=g, dtype=torch.float64)), 0.0, atol=1e-5
    )
    np.testing.assert_allclose(principal_angles(U, V), 90.0, atol=1e-8)
    theta = math.radians(30.0)
    tilted = math.cos(theta) * Q[:, :1] + math.sin(theta) * Q[:, 5:6]
    np.testing.assert_allclose(principal_angles(Q[:, :1], tilted), [30.0], atol=1e-8)
    with pytest.raises(ValueError, match="subspaces live in different spaces: 10 vs 8 rows"):
        principal_angles(U, torch.zeros(8, 2))


def test_own_energy_of_top_eigenvectors_is_the_top_energy_share(tiny_stats) -> None:
    S = tiny_stats[0].layers[TINY_TARGETS[2]].second_moment
    spec = symmetric_eigh(S)
    for r in (1, 4, 8):
        share, random_share = own_energy(spec.largest(r), S)
        assert math.isclose(share, float(spec.cumulative_energy[r - 1]), rel_tol=1e-10)
        assert random_share == r / 32
    # Any basis of the same span (not orthonormal) sees the same share.
    g = torch.Generator().manual_seed(1)
    mixed = torch.randn(4, 4, generator=g, dtype=torch.float64) @ spec.largest(4)
    assert math.isclose(own_energy(mixed, S)[0], float(spec.cumulative_energy[3]), rel_tol=1e-9)
    adapter = Adapter(
        {TINY_TARGETS[2]: LoraWeights(spec.largest(4), torch.zeros(32, 4, dtype=torch.float64), 1.0)}, {}, {}
    )
    table = own_energy_table({"sentiment": adapter}, {"sentiment": tiny_stats[0]})
    assert list(table.columns) == ["task", "layer", "share", "random_share", "ratio"]
    assert math.isclose(table.ratio[0], float(spec.cumulative_energy[3]) / (4 / 32), rel_tol=1e-9)
    with pytest.raises(ValueError, match="no statistics for task 'other'"):
        own_energy_table({"other": adapter}, {"sentiment": tiny_stats[0]})


def test_angle_table(tiny_tasks, tiny_stats) -> None:
    stats = {t.name: s for t, s in zip(tiny_tasks[:3], tiny_stats[:3], strict=True)}
    adapter = _random_adapter(3)
    table = angle_table(stats, k=4, adapters={"sentiment": adapter})
    data = table[table.kind == "data-data"]
    assert len(data) == 4 * 3 and len(table[table.kind == "adapter-data"]) == 4 * 3
    name = TINY_TARGETS[2]
    row = data[(data.layer == name) & (data.a == "sentiment") & (data.b == "topic")].iloc[0]
    U = symmetric_eigh(tiny_stats[0].layers[name].second_moment).largest(4).T
    V = symmetric_eigh(tiny_stats[1].layers[name].second_moment).largest(4).T
    ref = principal_angles(U, V)
    assert math.isclose(row.min_angle, ref.min(), rel_tol=1e-9) and math.isclose(
        row.mean_angle, ref.mean(), rel_tol=1e-9
    )
    assert (
        (table.min_angle >= 0) & (table.min_angle <= table.mean_angle + 1e-9) & (table.mean_angle <= 90)
    ).all()
    with pytest.raises(ValueError, match="k must be >= 1, got 0"):
        angle_table(stats, k=0)


# --------------------------------------------------------------------------- post-hoc OSRM


def test_posthoc_osrm_keeps_what_lies_in_the_subspace() -> None:
    adapter = _random_adapter(7, scale=2.0)
    delta = {n: lw.delta for n, lw in adapter.layers.items()}
    inside = {n: row_space(d, RANK).T for n, d in delta.items()}
    projected, table = posthoc_osrm(adapter, inside)
    assert list(table.columns) == ["layer", "energy_kept"] and list(table.layer) == TINY_TARGETS
    np.testing.assert_allclose(table.energy_kept, 1.0, rtol=1e-10)
    for n, lw in projected.layers.items():
        assert lw.scale == 2.0 and lw.rank == RANK
        torch.testing.assert_close(lw.A, inside[n], rtol=0, atol=0)
        torch.testing.assert_close(lw.delta, delta[n], rtol=1e-10, atol=1e-10)
    # A subspace orthogonal to Delta_W's row space keeps nothing.
    outside = {}
    for n, d in delta.items():
        full = row_space(torch.eye(32, dtype=torch.float64) - row_space(d, RANK) @ row_space(d, RANK).T)
        outside[n] = full[:, :RANK].T
    projected, table = posthoc_osrm(adapter, outside)
    np.testing.assert_allclose(table.energy_kept, 0.0, atol=1e-10)
    for lw in projected.layers.values():
        torch.testing.assert_close(lw.delta, torch.zeros(32, 32, dtype=torch.float64), rtol=0, atol=1e-10)
    # In general the energy kept is ||Delta_W P|| / ||Delta_W|| for the projector P on the subspace.
    g = torch.Generator().manual_seed(2)
    some = {
        n: torch.linalg.qr(torch.randn(32, 6, generator=g, dtype=torch.float64))[0].T for n in TINY_TARGETS
    }
    _, table = posthoc_osrm(adapter, some)
    for n, kept in zip(table.layer, table.energy_kept, strict=True):
        P = some[n].T @ some[n]
        assert math.isclose(
            kept, float(torch.linalg.norm(delta[n] @ P) / torch.linalg.norm(delta[n])), rel_tol=1e-10
        )


def test_posthoc_osrm_rejects() -> None:
    adapter = _random_adapter(0)
    with pytest.raises(ValueError, match=f"no OSRM subspace for layer '{TINY_TARGETS[0]}'"):
        posthoc_osrm(adapter, {})
    bad = {n: torch.eye(4, 16, dtype=torch.float64) for n in TINY_TARGETS}
    with pytest.raises(
        ValueError, match=f"size mismatch for layer '{TINY_TARGETS[0]}': subspace 16, adapter 32"
    ):
        posthoc_osrm(adapter, bad)


def test_lora_row_space_is_the_row_space_of_delta() -> None:
    """The factor-based row space spans the same subspace as the SVD of Delta_W."""
    from osrm_core.adapters import LoraWeights
    from osrm_core.diagnostics import lora_row_space, principal_angles, row_space

    torch.manual_seed(0)
    A, B = torch.randn(6, 40, dtype=torch.float64), torch.randn(30, 6, dtype=torch.float64)
    B[:, 2] = 0  # B drops one direction: the row space has rank 5
    lw = LoraWeights(A, B, 2.0)
    fast, reference = lora_row_space(lw), row_space(lw.delta)
    assert fast.shape == reference.shape == (40, 5)
    torch.testing.assert_close(fast.T @ fast, torch.eye(5, dtype=torch.float64))
    assert principal_angles(fast, reference).max() < 1e-5
    # B = 0 (right after init): the row space of A
    assert lora_row_space(LoraWeights(A, torch.zeros_like(B), 2.0)).shape == (40, 6)


def test_posthoc_osrm_adapters_projects_each_on_the_others_subspace(tiny_tasks, tiny_stats) -> None:
    from osrm_core.diagnostics import posthoc_osrm_adapters

    stats = {t.name: s for t, s in zip(tiny_tasks, tiny_stats, strict=True)}
    names = list(stats)[:3]
    adapters = {n: _random_adapter(i) for i, n in enumerate(names)}
    projected, kept = posthoc_osrm_adapters(adapters, stats)
    for name in names:
        others = [stats[n] for n in names if n != name]
        want, table = posthoc_osrm(adapters[name], osrm_subspace(others, RANK))
        for layer, lw in projected[name].layers.items():
            torch.testing.assert_close(lw.delta, want.layers[layer].delta)
        got = kept[kept.adapter == name]["energy_kept"].to_numpy()
        np.testing.assert_allclose(got, table.energy_kept.to_numpy())
    with pytest.raises(ValueError, match="no statistics for adapter 'nobody'"):
        posthoc_osrm_adapters({"nobody": adapters[names[0]]}, stats)


# --------------------------------------------------------------------------- data-free signals


def test_sv_interference_matches_a_dense_svd() -> None:
    """``||Delta_W_j V_i||^2 / ||Delta_W_j||^2`` with V_i from numpy's SVD of the dense delta
    (rank RANK), per layer and ordered pair; an adapter with fewer layers contributes where it
    has them."""
    from osrm_core.diagnostics import sv_interference_table

    adapters = {"a": _random_adapter(0), "b": _random_adapter(1, scale=0.5), "c": _random_adapter(2, rank=2)}
    dropped = sorted(adapters["c"].layers)[0]
    del adapters["c"].layers[dropped]
    table = sv_interference_table(adapters).set_index(["layer", "adapter", "data"])
    expected_rows = 0
    for layer in TINY_TARGETS:
        for j, i in [(j, i) for j in adapters for i in adapters if i != j]:
            if layer not in adapters[i].layers or layer not in adapters[j].layers:
                assert (layer, j, i) not in table.index
                continue
            expected_rows += 1
            d_j = adapters[j].layers[layer].delta.numpy()
            _, s, vt = np.linalg.svd(adapters[i].layers[layer].delta.numpy())
            v_i = vt[: adapters[i].layers[layer].rank].T
            want = np.linalg.norm(d_j @ v_i) ** 2 / np.linalg.norm(d_j) ** 2
            assert table.loc[(layer, j, i), "sv_overlap"] == pytest.approx(want, rel=1e-9)
            assert table.loc[(layer, j, i), "energy"] == pytest.approx(np.linalg.norm(d_j) ** 2, rel=1e-9)
    assert len(table) == expected_rows
    # An adapter reading exactly the other's input directions scores 1; orthogonal ones 0.
    A = torch.eye(32, dtype=torch.float64)
    same = {"x": Adapter({"l": LoraWeights(A[:4], torch.randn(16, 4, dtype=torch.float64), 1.0)}, {}, {}),
            "y": Adapter({"l": LoraWeights(A[:4], torch.randn(16, 4, dtype=torch.float64), 1.0)}, {}, {}),
            "z": Adapter({"l": LoraWeights(A[4:8], torch.randn(16, 4, dtype=torch.float64), 1.0)}, {}, {})}
    t = sv_interference_table(same).set_index(["adapter", "data"])["sv_overlap"]
    assert t[("x", "y")] == pytest.approx(1.0) and t[("z", "x")] == pytest.approx(0.0, abs=1e-12)


def test_merged_spectrum_matches_dense_svds() -> None:
    """Singular values of the dense weighted sum and of each dense part (numpy), their nuclear
    and Frobenius ratios; orthogonal parts retain everything."""
    from osrm_core.diagnostics import merged_spectrum, pair_signals

    adapters = {"a": _random_adapter(0), "b": _random_adapter(1, scale=0.5), "c": _random_adapter(2, rank=2)}
    weights = [1.0, 0.7, 1.3]
    spectra, summary = merged_spectrum(adapters, weights)
    summary = summary.set_index("layer")
    for layer in TINY_TARGETS:
        dense = [w * adapters[n].layers[layer].delta.numpy() for n, w in zip(adapters, weights)]
        merged = np.linalg.svd(sum(dense), compute_uv=False)
        parts = np.sort(np.concatenate([np.linalg.svd(d, compute_uv=False)[: adapters[n].layers[layer].rank]
                                        for n, d in zip(adapters, dense)]))[::-1]
        got = spectra[spectra.layer == layer]
        assert np.allclose(got[got.kind == "merged"]["sigma"], merged[: len(got[got.kind == "merged"])], rtol=1e-9)
        assert np.allclose(got[got.kind == "parts"]["sigma"], parts, rtol=1e-9)
        assert summary.loc[layer, "nuclear_retention"] == pytest.approx(merged.sum() / parts.sum(), rel=1e-9)
        assert summary.loc[layer, "energy_ratio"] == pytest.approx((merged**2).sum() / (parts**2).sum(), rel=1e-9)
        assert summary.loc[layer, "nuclear_retention"] <= 1 + 1e-12
    # Parts in orthogonal row and column spaces: the merge keeps every singular value.
    eye = torch.eye(32, dtype=torch.float64)
    ortho = {"x": Adapter({"l": LoraWeights(eye[:4], eye[:, :4], 1.0)}, {}, {}),
             "y": Adapter({"l": LoraWeights(eye[4:8], eye[:, 4:8], 2.0)}, {}, {})}
    _, s = merged_spectrum(ortho)
    assert s["nuclear_retention"].item() == pytest.approx(1.0) and s["energy_ratio"].item() == pytest.approx(1.0)
    signals = pair_signals(ortho).set_index(["adapter", "data"])
    assert signals.loc[("x", "y"), "spectral_loss"] == pytest.approx(0.0, abs=1e-12)
    assert signals.loc[("x", "y"), "sv_overlap"] == pytest.approx(0.0, abs=1e-12)
    # The same adapter twice: a pair that cancels nothing but overlaps fully.
    twin = {"x": ortho["x"], "y": Adapter(dict(ortho["x"].layers), {}, {})}
    assert pair_signals(twin)["sv_overlap"].tolist() == pytest.approx([1.0, 1.0])


def test_posthoc_refit_keeps_a_in_the_subspace_and_refits_b(make_tiny_model, tokenizer) -> None:
    """Post-hoc OSRM with a B-only re-fit: A ends equal to the OSRM subspace of the other task,
    B starts from the projection (Delta_W A^+ / s) and moves, the head trains, the scale stays."""
    import importlib.util

    from test_pipeline import _word_task

    from osrm_core.settings import TrainSettings
    from osrm_core.train import finetune

    script = Path(__file__).resolve().parents[1] / "reports" / "long-training" / "posthoc_refit.py"
    spec = importlib.util.spec_from_file_location("posthoc_refit_report", script)
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    posthoc_refit = report.posthoc_refit  # serves that report script alone

    own, other = _word_task("sentiment", 0), _word_task("topic", 1)
    stats = {t.name: collect_feature_stats(make_tiny_model(seed=0, dtype=torch.float32), tokenizer, t,
                                           target_modules=TINY_TARGETS, max_length=16) for t in (own, other)}
    peft_model = init_lora(make_tiny_model(seed=0, dtype=torch.float32), "standard", rank=RANK, alpha=8,
                           target_modules=TINY_TARGETS, seed=1)
    finetune(peft_model, tokenizer, own, TrainSettings(steps=6, batch_size=8, lr=5e-2), max_length=16)
    adapter = lora_from_model(peft_model)
    subspace = osrm_subspace([stats["topic"]], RANK)
    projected, _ = posthoc_osrm(adapter, subspace)

    refit, result = posthoc_refit(make_tiny_model(seed=0, dtype=torch.float32), tokenizer, adapter, own,
                                  [stats["topic"]], TrainSettings(steps=6, batch_size=8, lr=5e-2, warmup_ratio=0.0),
                                  max_length=16)
    assert 0.0 <= result.test_score <= 1.0
    for name, lw in refit.layers.items():
        assert lw.scale == adapter.layers[name].scale and lw.rank == RANK
        torch.testing.assert_close(lw.A, subspace[name].to(lw.A.dtype), rtol=0, atol=1e-6)  # A never trained
        assert not torch.allclose(lw.B, projected.layers[name].B.to(lw.B.dtype), atol=1e-4)  # B was re-fitted
    assert not torch.equal(refit.head["classifier.weight"], adapter.head["classifier.weight"])
    # With a vanishing learning rate the re-fit stays where it starts: at the projection's B.
    still, _ = posthoc_refit(make_tiny_model(seed=0, dtype=torch.float32), tokenizer, adapter, own, [stats["topic"]],
                             TrainSettings(steps=1, batch_size=8, lr=1e-12, head_lr=1e-12, warmup_ratio=0.0),
                             max_length=16)
    for name, lw in still.layers.items():
        torch.testing.assert_close(lw.B, projected.layers[name].B.to(lw.B.dtype), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="at least one other task"):
        posthoc_refit(make_tiny_model(seed=0, dtype=torch.float32), tokenizer, adapter, own, [], TrainSettings())
