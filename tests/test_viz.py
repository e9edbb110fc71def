"""Figure builders of ``osrm_core.viz`` on small synthetic inputs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest

from osrm_core import toy, viz

TASKS = ["a", "b", "c"]
LAYERS = [f"bert.encoder.layer.{i}.attention.self.{k}" for i in range(2) for k in ("query", "value")]


def _interference(seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for layer in LAYERS:
        for j in TASKS:
            for i in TASKS:
                e = float(rng.uniform(0.1, 1.0)) * (10 if i == j else 1)
                rows.append(
                    {
                        "layer": layer,
                        "adapter": j,
                        "data": i,
                        "input_energy": e,
                        "output_shift": e / 10,
                        "relative_shift": e / 100,
                        "own": i == j,
                    }
                )
    return pd.DataFrame(rows)


def _sweep() -> pd.DataFrame:
    rows = []
    for init, bonus in (("standard", 0.0), ("osrm", 0.05)):
        for method, density in (("task_arithmetic", None), ("ties", 0.5), ("ties", 0.8)):
            for lam in (0.25, 0.5, 0.75, 1.0):
                for t, single in zip(TASKS, (0.8, 0.9, 0.7)):
                    # A peak at lambda 0.5 for task arithmetic, 0.75 for TIES.
                    peak = 0.5 if method == "task_arithmetic" else 0.75
                    score = single * (0.9 + bonus - (lam - peak) ** 2) - (0.01 if density == 0.8 else 0)
                    rows.append(
                        {
                            "init": init,
                            "method": method,
                            "density": density,
                            "lambda": lam,
                            "task": t,
                            "score": score,
                            "single": single,
                            "normalized": score / single,
                        }
                    )
    return pd.DataFrame(rows)


def test_short_layer_and_group_label():
    assert viz.short_layer("bert.encoder.layer.3.attention.self.query") == "L3.query"
    assert viz.short_layer("model.layers.10.self_attn.q_proj") == "L10.q_proj"
    assert viz.short_layer("transformer.h.0") == "L0"
    assert viz.short_layer("classifier") == "classifier"
    assert viz.group_label(LAYERS[:2]) == "L0 (query, value)"
    assert viz.group_label(LAYERS[:1]) == "L0.query"


def test_eigenspectrum_figure_log_axis_and_marked_smallest():
    spectra = {"a": np.array([1e-3, 1.0, 1e-1, 0.0]), "b": np.linspace(1, 2, 4)}
    fig = viz.eigenspectrum_figure(spectra, rank=2)
    assert isinstance(fig, go.Figure)
    assert fig.layout.yaxis.type == "log"
    lines = [t for t in fig.data if t.mode == "lines"]
    marks = [t for t in fig.data if t.mode == "markers"]
    assert [t.name for t in lines] == ["a", "b"] and len(marks) == 2
    # Sorted descending; the zero eigenvalue is clipped for the log axis but kept for hover.
    np.testing.assert_allclose(lines[0].customdata, [1.0, 1e-1, 1e-3, 0.0])
    assert (np.asarray(lines[0].y) > 0).all()
    np.testing.assert_allclose(marks[0].customdata, [1e-3, 0.0])
    assert list(marks[0].x) == [3, 4]
    assert len(fig.layout.shapes) == 1 and fig.layout.shapes[0].x0 == 2.5
    assert "%{customdata" in lines[0].hovertemplate
    assert len(viz.eigenspectrum_figure(spectra).data) == 2  # no rank: no marks


def test_cumulative_energy_figure_ends_at_one():
    fig = viz.cumulative_energy_figure({"a": np.array([4.0, 3.0, 2.0, 1.0])}, levels=(0.9,))
    y = np.asarray(fig.data[0].y)
    np.testing.assert_allclose(y, [0.4, 0.7, 0.9, 1.0])
    assert len(fig.layout.shapes) == 1  # the 90% line


def test_effective_rank_heatmap_shape_and_errors():
    table = pd.DataFrame(
        [
            {"task": t, "layer": f"L{i}", "effective_rank": i + k}
            for i in range(3)
            for k, t in enumerate(TASKS)
        ]
    )
    fig = viz.effective_rank_heatmap(table)
    z = np.asarray(fig.data[0].z)
    assert z.shape == (3, 3) and list(fig.data[0].x) == TASKS and z[2, 1] == 3
    with pytest.raises(ValueError, match="effective_rank"):
        viz.effective_rank_heatmap(table.drop(columns="effective_rank"))


def test_interference_view_per_layer_and_summed():
    table = _interference()
    one = viz.interference_view(table, "input_energy", LAYERS[0])
    assert list(one.index) == TASKS and list(one.columns) == TASKS
    row = table[(table.layer == LAYERS[0]) & (table.adapter == "b") & (table.data == "c")]
    assert one.loc["b", "c"] == pytest.approx(float(row.input_energy.iloc[0]))
    total = viz.interference_view(table, "input_norm", None)
    summed = table[(table.adapter == "a") & (table.data == "b")].input_energy.sum()
    assert total.loc["a", "b"] == pytest.approx(np.sqrt(summed))
    assert viz.interference_view(table, "input_norm", viz.SUM_OVER_LAYERS).equals(total)
    with pytest.raises(ValueError, match="unknown"):
        viz.interference_view(table, "bogus")
    with pytest.raises(ValueError, match="no rows"):
        viz.interference_view(table, "input_norm", "nope")


def test_off_diagonal_sum():
    m = pd.DataFrame([[10.0, 1.0], [2.0, 20.0]], index=["a", "b"], columns=["a", "b"])
    assert viz.off_diagonal_sum(m) == 3.0


def test_interference_heatmap_outlines_own_task_and_log_scale():
    m = viz.interference_view(_interference(), "input_norm", LAYERS[1])
    fig = viz.interference_heatmap(m, value_label="norm", zmax=5.0)
    heat = fig.data[0]
    assert len(fig.layout.shapes) == len(TASKS)
    assert heat.zmax == 5.0 and heat.zmin == 0
    np.testing.assert_allclose(np.asarray(heat.customdata), m.to_numpy())
    assert fig.layout.yaxis.autorange == "reversed"
    logged = viz.interference_heatmap(m, log=True, zmin=0.01, zmax=5.0)
    np.testing.assert_allclose(np.asarray(logged.data[0].z), np.log10(m.to_numpy()))
    assert logged.data[0].zmax == pytest.approx(np.log10(5.0))
    assert logged.data[0].zmin == pytest.approx(-2.0)
    lo, hi = viz.matrix_range([m, m * 10, np.array([[0.0, -1.0]])])
    assert lo == pytest.approx(m.to_numpy().min()) and hi == pytest.approx(m.to_numpy().max() * 10)
    np.testing.assert_allclose(np.asarray(logged.data[0].customdata), m.to_numpy())  # hover: real values


def test_own_energy_figure_lines_per_task_and_init():
    rows = [
        {
            "task": t,
            "layer": layer,
            "share": 0.1,
            "random_share": 0.02,
            "ratio": 5.0 if init == "standard" else 0.5,
            "init": init,
        }
        for init in ("standard", "osrm")
        for t in TASKS
        for layer in LAYERS
    ]
    fig = viz.own_energy_figure(pd.DataFrame(rows))
    assert len(fig.data) == 6 and fig.layout.yaxis.type == "log"
    dashes = {t.name: t.line.dash for t in fig.data}
    assert dashes["a (standard)"] == "dash" and dashes["a (osrm)"] == "solid"
    assert list(fig.data[0].x) == ["L0.query", "L0.value", "L1.query", "L1.value"]


def _angles() -> pd.DataFrame:
    rows = []
    for init in ("standard", "osrm"):
        for k, layer in enumerate(LAYERS):
            for x in range(3):
                for y in range(x + 1, 3):
                    rows.append(
                        {
                            "layer": layer,
                            "kind": "data-data",
                            "a": TASKS[x],
                            "b": TASKS[y],
                            "min_angle": 10.0 * (x + y) + k,
                            "mean_angle": 50.0,
                            "init": init,
                        }
                    )
            for a in TASKS:
                for b in TASKS:
                    v = 80.0 if init == "osrm" else 30.0
                    rows.append(
                        {
                            "layer": layer,
                            "kind": "adapter-data",
                            "a": a,
                            "b": b,
                            "min_angle": v + k,
                            "mean_angle": v + 5,
                            "init": init,
                        }
                    )
    return pd.DataFrame(rows)


def test_angle_matrix_symmetric_for_data_and_heatmap_range():
    table = _angles()
    m = viz.angle_matrix(table[table.init == "standard"], LAYERS[2], "min_angle", "data-data")
    assert m.loc["a", "b"] == m.loc["b", "a"] == 12.0 and m.loc["a", "a"] == 0.0
    mean = viz.angle_matrix(table[table.init == "osrm"], None, "min_angle", "adapter-data")
    assert mean.loc["a", "b"] == pytest.approx(80 + 1.5)
    fig = viz.angle_heatmap(mean)
    assert fig.data[0].zmin == 0 and fig.data[0].zmax == 90
    with pytest.raises(ValueError, match="stat"):
        viz.angle_matrix(table, None, "max_angle")


def test_angle_figure_lines_per_pair():
    table = _angles()
    dd = viz.angle_figure(table, "min_angle", "data-data")
    assert len(dd.data) == 3  # 3 pairs; the data-data rows of the second init are not drawn twice
    assert dd.data[0].name == "a vs b" and list(dd.data[0].y) == [10.0, 11.0, 12.0, 13.0]
    ad = viz.angle_figure(table[table.a != table.b], "mean_angle", "adapter-data")
    assert len(ad.data) == 2 * 6 and tuple(ad.layout.yaxis.range) == (0, 92)
    with pytest.raises(ValueError, match="no adapter-data"):
        viz.angle_figure(table[table.kind == "data-data"], kind="adapter-data")


def test_sweep_figure_best_point_and_density():
    sweep = _sweep()
    fig = viz.sweep_figure(sweep, density=0.5)
    lines = [t for t in fig.data if not t.name.startswith("best")]
    best = [t for t in fig.data if t.name.startswith("best")]
    assert len(lines) == 4 and len(best) == 4
    marks = {t.name: (t.x[0], t.y[0]) for t in best}
    assert marks["best: task_arithmetic (osrm)"][0] == 0.5
    assert marks["best: ties (standard)"][0] == 0.75
    assert all(t.marker.symbol == "star" for t in best)
    assert len(fig.layout.shapes) == 1  # the normalized = 1 line
    ta = next(t for t in lines if t.name == "task_arithmetic (standard)")
    ties = next(t for t in lines if t.name == "ties (osrm)")
    assert list(ta.x) == [0.25, 0.5, 0.75, 1.0]
    # colour: the init; dash: the method
    assert ta.line.color == viz.INIT_COLORS["standard"] and ties.line.color == viz.INIT_COLORS["osrm"]
    assert ta.line.dash == "solid" and ties.line.dash == "dash"
    # Average over tasks vs one task; density changes TIES only.
    curves = viz.sweep_curves(sweep, density=0.8)
    assert set(curves.loc[curves.method == "ties", "density"]) == {0.8}
    one = viz.sweep_curves(sweep, task="b", y="score", density=0.5)
    assert one["score"].max() == pytest.approx(0.9 * (0.95))
    raw = viz.sweep_figure(sweep, task="a", y="score", density=0.5)
    assert not raw.layout.shapes and "a" in raw.layout.yaxis.title.text
    with pytest.raises(ValueError, match="task 'z'"):
        viz.sweep_curves(sweep, task="z")


def test_summary_tables_and_figure():
    summary = {
        "tasks": ["a", "b"],
        "results": {
            init: {
                "single": {"a": 0.9, "b": 0.8},
                "best": {
                    m: {
                        "lambda": 0.5,
                        "density": None,
                        "scores": {"a": 0.8, "b": 0.7},
                        "normalized_avg": v,
                        "avg": 0.75,
                    }
                    for m, v in (("task_arithmetic", 0.9 + d), ("ties", 0.85 + d))
                },
            }
            for init, d in (("standard", 0.0), ("osrm", 0.05))
        },
    }
    single, best = viz.summary_tables(summary)
    assert list(single.columns) == ["task", "standard", "osrm"]
    assert len(best) == 4 and {"score_a", "score_b"} <= set(best.columns)
    fig = viz.summary_figure(best)
    assert [t.name for t in fig.data] == ["standard", "osrm"]
    assert fig.data[1].marker.color == viz.INIT_COLORS["osrm"]
    assert list(fig.data[1].y) == pytest.approx([0.95, 0.9])


def test_energy_kept_and_layer_ratio_figures():
    kept = pd.DataFrame(
        [{"adapter": a, "layer": layer, "energy_kept": 0.5} for a in TASKS for layer in LAYERS]
    )
    fig = viz.energy_kept_figure(kept)
    assert len(fig.data) == 3 and fig.data[0].type == "bar"
    ratio = pd.DataFrame(
        [
            {"task": t, "layer": layer, "osrm": 1e-3, "random": 1.0, "ratio": 1e-3}
            for t in TASKS
            for layer in LAYERS[::2]
        ]
    )
    fig = viz.layer_ratio_figure(ratio)
    assert len(fig.data) == 3 and fig.layout.yaxis.type == "log"


def test_toy_osrm_direction_avoids_the_other_task():
    moments = toy.toy_moments(2, angle_deg=90, spread=0.1, dim=2)
    A = toy.toy_adapters(moments, target=1, rank=1, seed=0)
    # Task 0 lies along x; OSRM for task 1 reads along y, where task 0 has std 0.1.
    np.testing.assert_allclose(np.abs(A["osrm"]), [[0.0, 1.0]], atol=1e-12)
    osrm = toy.toy_interference(A["osrm"], moments)
    rand = toy.toy_interference(A["standard"], moments)
    assert osrm[0] == pytest.approx(0.1) and osrm[0] <= rand[0]
    np.testing.assert_allclose(A["standard"] @ A["standard"].T, [[1.0]])
    table = toy.toy_table(A, moments, ["t1", "t2"], target=1)
    assert table.loc[1, "other tasks"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="rank"):
        toy.toy_adapters(moments, 0, rank=2)
    with pytest.raises(ValueError, match="dim"):
        toy.toy_moments(2, 30, 0.2, dim=4)


@pytest.mark.parametrize(("dim", "rank"), [(2, 1), (3, 1), (3, 2)])
def test_toy_figure_2d_and_3d(dim, rank):
    moments = toy.toy_moments(3, 45, 0.3, dim)
    clouds = dict(zip(["t1", "t2", "t3"], toy.toy_samples(moments, n=20, seed=0)))
    assert all(c.shape == (20, dim) for c in clouds.values())
    A = toy.toy_adapters(moments, 2, rank)
    fig = viz.toy_figure(clouds, {"standard A": A["standard"], "OSRM A": A["osrm"]})
    types = [t.type for t in fig.data]
    if dim == 2:
        assert types == ["scatter"] * 5 and fig.layout.yaxis.scaleanchor == "x"
    elif rank == 1:
        assert types == ["scatter3d"] * 5
    else:
        assert types == ["scatter3d"] * 3 + ["mesh3d"] * 2


def test_figure_html_is_standalone():
    html = viz.figure_html(viz.cumulative_energy_figure({"a": np.ones(3)}))
    assert "<html>" in html[:200] and "plotly" in html and len(html) > 1_000_000  # plotly.js inlined


# --------------------------------------------------------------------------- issue 23: what a user saw


def test_titles_sit_below_the_toolbar_band():
    """The modebar takes the top band of a figure: titles go below it, above the plot area,
    also above subplot titles (the drift figure's panels)."""
    fig = viz.interference_heatmap(viz.interference_view(_interference()), title="a long title")
    title = fig.layout.title
    assert (title.xref, title.xanchor, title.yref, title.y, title.yanchor) == ("container", "left", "paper", 1, "bottom")
    assert fig.layout.margin.t >= viz.common.MODEBAR_BAND + 30
    drift = pd.DataFrame([{"adapter": a, "data": d, "own": a == d, "step": s, "input_energy": 1.0 + s}
                          for a in TASKS[:2] for d in TASKS[:2] for s in (0, 10)])
    faceted = viz.drift_figure(drift, title="drift")
    assert faceted.layout.title.pad.b > title.pad.b and faceted.layout.margin.t > fig.layout.margin.t


def test_overlap_heatmap_has_a_blank_diagonal_named_axes_and_the_pages_order():
    rows = [{"layer": layer, "adapter": j, "data": i, "sv_overlap": 0.1 + 0.01 * k}
            for k, layer in enumerate(LAYERS) for j in TASKS for i in TASKS if i != j]
    table = pd.DataFrame(rows).sort_values(["adapter", "data"], ascending=False)  # another order
    m = viz.overlap_matrix(table, ["b", "c", "a"])
    assert list(m.index) == list(m.columns) == ["b", "c", "a"]
    assert np.isnan(m.loc["a", "a"]) and m.loc["a", "b"] == pytest.approx(0.115)
    fig = viz.interference_heatmap(m, value_label="share", x_title="input directions of adapter i")
    text = [cell for row in fig.data[0].text for cell in row]
    assert "nan" not in " ".join(text).lower() and text.count("") == 3
    assert fig.layout.xaxis.title.text == "input directions of adapter i"
    assert fig.layout.yaxis.title.text == "adapter j"
    assert list(fig.data[0].x) == ["b", "c", "a"]


def test_drift_legend_names_colours_and_line_styles_not_one_panels_lines():
    drift = pd.DataFrame([{"adapter": a, "data": d, "own": a == d, "step": s, "input_energy": 1.0 + s}
                          for a in TASKS for d in TASKS for s in (0, 10)])
    fig = viz.drift_figure(drift)
    legend = [t.name for t in fig.data if t.showlegend is not False]
    assert legend == [f"data of {t}" for t in TASKS] + ["the panel's own task (solid)", "other tasks (dotted)"]
    assert not any("(own)" in (t.name or "") for t in fig.data)
    # In every panel the solid line is that panel's adapter on its own data.
    for t in fig.data:
        if t.x[0] is not None and t.line.dash == "solid":
            assert t.hovertemplate.startswith(f"adapter {t.name.removeprefix('data of ')} on ")


def test_angle_axes_are_named_and_the_pairs_can_be_one_band_per_init():
    table = _angles()
    dd = viz.angle_matrix(table, None, "min_angle", "data-data")
    ad = viz.angle_matrix(table[table.init == "osrm"], None, "min_angle", "adapter-data")
    fig = viz.angle_heatmap(ad)
    assert fig.layout.yaxis.title.text == "row space of adapter"
    assert fig.layout.xaxis.title.text == "data subspace of task"
    assert viz.angle_heatmap(dd).layout.yaxis.title.text == "data subspace of task"
    cross = table[table.a != table.b]
    banded = viz.angle_figure(cross, "min_angle", "adapter-data", aggregate=True)
    lines = [t for t in banded.data if t.mode == "lines+markers"]
    assert [t.name for t in lines] == ["standard: mean over 6 pairs", "osrm: mean over 6 pairs"]
    assert list(lines[1].y) == pytest.approx([80.0, 81.0, 82.0, 83.0])
    assert len(banded.data) == 4  # a band and a line per init, not 12 lines


def test_eigenspectrum_axis_ends_at_the_width_and_zero_smallest_is_flagged():
    d = 384
    lam = np.concatenate([np.logspace(2, -3, d - 8), np.full(8, 1e-16)])
    fig = viz.eigenspectrum_figure({"a": lam}, rank=8)
    assert tuple(fig.layout.xaxis.range) == (0.5, d + 0.5)
    assert fig.layout.annotations[0].text == "8 smallest (OSRM): numerically zero"
    assert viz.zero_smallest({"a": lam, "b": np.logspace(2, -3, d)}, 8) == {"a": 8}
    assert viz.zero_smallest({"a": lam}, 4) == {"a": 4}
    plain = viz.eigenspectrum_figure({"b": np.logspace(2, -3, d)}, rank=8)
    assert plain.layout.annotations[0].text == "8 smallest (OSRM)"


def test_raw_scores_of_mixed_metrics_are_averaged_per_metric_only():
    sweep = _sweep().assign(metric=lambda df: np.where(df["task"] == "c", "mcc", "accuracy"))
    with pytest.raises(ValueError, match=r"different metrics \(accuracy, mcc\) are not averaged"):
        viz.sweep_curves(sweep, y="score")
    choices = viz.average_choices(sweep, "score")
    assert choices == {"average of the accuracy tasks (a, b)": (None, "accuracy"),
                       "average of the mcc tasks (c)": (None, "mcc")}
    assert viz.average_choices(sweep, "normalized") == {"average over tasks": (None, None)}
    fig = viz.sweep_figure(sweep, y="score", metric="accuracy", density=0.5)
    assert fig.layout.yaxis.title.text.startswith("accuracy (average over 2 tasks")
    acc = viz.sweep_curves(sweep, y="score", metric="accuracy", density=0.5)
    expect = sweep[(sweep.metric == "accuracy") & (sweep.method == "task_arithmetic") & (sweep.init == "osrm")
                   & (sweep["lambda"] == 0.5)]["score"].mean()
    got = acc[(acc.method == "task_arithmetic") & (acc.init == "osrm") & (acc["lambda"] == 0.5)]["score"].item()
    assert got == pytest.approx(expect)


def test_best_lambda_at_the_grid_edge_gets_a_note():
    sweep = _sweep()
    curves = viz.sweep_curves(sweep, density=0.5)
    assert viz.edge_notes(curves, viz.sweep_best(curves)) == []  # peaks at 0.5 and 0.75 inside 0.25..1
    edge = curves[curves["lambda"] >= 0.5]  # task arithmetic peaks at 0.5: now the smallest lambda
    notes = viz.edge_notes(edge, viz.sweep_best(edge))
    assert sorted(notes) == [f"task_arithmetic ({init}): the best lambda 0.5 is the smallest of the grid (0.5 to 1); "
                             "the best may lie beyond it, widen the grid to see." for init in ("osrm", "standard")]
