"""Tests of the evidence study: variants, a tiny end-to-end study with its report, the tables'
numbers against the runs they come from, and the command line's bad inputs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_pipeline import TASKS, _word_task, tiny_config

from osrm_core.runs import RunDir
from osrm_core.study import (
    StudyConfig,
    curve_metrics,
    find_studies,
    load_study_tables,
    run_study,
    variant_name,
    variants,
)


def tiny_study(model_dir) -> StudyConfig:
    return StudyConfig(
        name="tiny-study",
        base=tiny_config(model_dir, train={"steps": 20, "batch_size": 8, "lr": 5e-2, "warmup_ratio": 0.0}),
        inits=["standard", "osrm"],
        constraints=["none", "freeze_A"],
        seeds=[0, 1],
        sample_sizes=[6, 12],
        ranks=[2],
        a_lr_scales=[1.0, 3.0],
    )


def test_variants_cover_the_grid_once(tiny_model_dir) -> None:
    study = tiny_study(tiny_model_dir)
    vs = variants(study)
    names = [variant_name(v) for v in vs]
    assert len(names) == len(set(names))
    main = [v for v in vs if v["group"] == "main"]
    # standard: 2 seeds; osrm: 2 seeds x 2 constraints
    assert len(main) == 2 + 4
    assert {v["samples"] for v in vs if v["init"] == "osrm"} == {6, 12}
    assert {v["a_lr_scale"] for v in vs if v["init"] == "osrm"} == {1.0, 3.0}
    assert all(v["constraint"] == "none" for v in vs if v["init"] == "standard")


def test_curve_metrics() -> None:
    curve = pd.DataFrame({"lambda": [0.1, 0.5, 1.0], "normalized_avg": [0.8, 0.9, 0.89]})
    m = curve_metrics(curve)
    assert m["best"] == 0.9 and m["best_lambda"] == 0.5
    assert m["width_2pt"] == pytest.approx(0.5)  # 0.5..1.0 are within 2 points
    expected_auc = np.trapezoid([0.8, 0.9, 0.89], [0.1, 0.5, 1.0]) / 0.9
    assert m["auc"] == pytest.approx(expected_auc)


@pytest.fixture(scope="module")
def study_dir(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "tiny"
    tasks = [_word_task(t, seed) for seed, t in enumerate(TASKS)]
    run_study(tiny_study(tiny_model_dir), out, tasks=tasks)
    return out


def test_study_writes_report_and_tables(study_dir) -> None:
    report = (study_dir / "report.md").read_text()
    for heading in ("## Findings", "## 1.", "## 2.", "## 4.", "## 5.", "## 6.", "## 7."):
        assert heading in report
    tables = load_study_tables(study_dir)
    for name in ("q1_merged", "q2_single", "q4_samples", "q6_prediction", "q7_own_energy", "curves"):
        assert name in tables, name
    q1 = tables["q1_merged"]
    assert set(q1["init"]) == {"standard", "osrm"}
    assert set(q1[q1["init"] == "osrm"]["constraint"]) == {"none", "freeze_A"}
    assert (q1["seeds"] == 2).all()
    assert list((study_dir / "figures").glob("curve_*.html"))
    assert find_studies(study_dir) == [study_dir]


def test_q1_is_the_mean_of_each_seeds_best(study_dir) -> None:
    tables = load_study_tables(study_dir)
    row = tables["q1_merged"].query("init == 'standard' and method == 'task_arithmetic'").iloc[0]
    bests = []
    for seed in (0, 1):
        name = f"standard-none-n12-r2-a1-s{seed}"
        sweep = RunDir(study_dir / "runs" / name).read_csv("sweep_standard.csv")
        ta = sweep[sweep["method"] == "task_arithmetic"]
        bests.append(ta.groupby("lambda")["normalized"].mean().max())
    assert row["normalized_best_mean"] == pytest.approx(np.mean(bests))


def test_freeze_a_keeps_osrm_subspace(study_dir) -> None:
    """With A frozen the trained adapter's A is still the OSRM init."""
    from osrm_core.init import osrm_subspace

    run = RunDir(study_dir / "runs" / "osrm-freeze_A-n12-r2-a1-s0")
    stats = run.load_stats()
    adapters = run.load_adapters("osrm")
    name = TASKS[0]
    A = osrm_subspace([stats[TASKS[1]]], 2)
    layer = next(iter(adapters[name].layers))
    np.testing.assert_allclose(adapters[name].layers[layer].A.double().numpy(), A[layer].numpy(), atol=1e-6)


def test_pairwise_losses_are_measured(study_dir) -> None:
    pairs = RunDir(study_dir / "runs" / "standard-none-n12-r2-a1-s0").read_csv("pairwise.csv")
    assert len(pairs) == 2  # two tasks: (a, b) and (b, a)
    np.testing.assert_allclose(pairs["loss"], pairs["single"] - pairs["merged"])


def test_resumed_study_does_no_work(study_dir, tiny_model_dir, monkeypatch) -> None:
    import osrm_core.runs as runs

    def fail(*a, **k):
        raise AssertionError("a finished study must not train again")

    monkeypatch.setattr(runs, "finetune", fail)
    tasks = [_word_task(t, seed) for seed, t in enumerate(TASKS)]
    run_study(tiny_study(tiny_model_dir), study_dir, tasks=tasks)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("base: [", "not valid YAML"),
        ("inits: [standard]\n", "base"),
        ("base: {tasks: [{name: a, spec: demo:sentiment}, {name: b, spec: demo:topic}]}\ninits: [bogus]\n", "unknown init 'bogus'"),
    ],
)
def test_cli_study_bad_config_exits_2(tmp_path, content, message) -> None:
    path = tmp_path / "study.yaml"
    path.write_text(content)
    proc = subprocess.run([sys.executable, "-m", "osrm_core.cli", "study", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error:") and message in proc.stderr
    assert "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- app page


def _study_app(run_path=None):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(Path(__file__).parents[1] / "app.py"), default_timeout=60)
    if run_path is not None:
        at.session_state["run_path"] = str(run_path)
    at.run()
    at.switch_page("pages/7_Study.py").run()
    assert not at.exception
    return at


def test_study_page_without_run_or_study(study_dir, tmp_path, monkeypatch) -> None:
    import shutil

    monkeypatch.delenv("OSRM_RUN_DIR", raising=False)
    at = _study_app()
    assert any("Open or create a run" in i.value for i in at.info)
    run = tmp_path / "run"
    shutil.copytree(study_dir / "runs" / "standard-none-n12-r2-a1-s0", run)
    at = _study_app(run)
    assert any("no study yet" in i.value for i in at.info)


def test_study_page_shows_the_latest_study(study_dir, tmp_path, monkeypatch) -> None:
    import json
    import shutil

    monkeypatch.delenv("OSRM_RUN_DIR", raising=False)
    run = tmp_path / "run"
    shutil.copytree(study_dir / "runs" / "standard-none-n12-r2-a1-s0", run)
    shutil.copytree(study_dir, run / "studies" / "tiny")
    at = _study_app(run)
    charts = at.get("plotly_chart")
    assert charts
    inits = {t.get("name") for t in json.loads(charts[0].proto.spec)["data"]}
    assert {"standard", "osrm", "osrm (freeze_A)"} <= inits
    assert any("Findings" in s.value for s in at.subheader)
    before = json.loads(charts[0].proto.spec)["layout"]["title"]["text"]
    at.selectbox(key="study_method").set_value("ties").run()
    after = json.loads(at.get("plotly_chart")[0].proto.spec)["layout"]["title"]["text"]
    assert before != after and "ties" in after
