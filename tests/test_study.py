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

from osrm_core.rundir import RunDir
from osrm_core.study import (
    StudyConfig,
    VariantSpec,
    run_study,
    variant_config,
    variant_name,
    variants,
)
from osrm_core.study_report import curve_metrics, find_studies, load_study_tables


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
        ablation_methods=["task_arithmetic"],
    )


def test_variants_cover_the_grid_once(tiny_model_dir) -> None:
    study = tiny_study(tiny_model_dir)
    vs = variants(study)
    names = [variant_name(v) for v in vs]
    assert len(names) == len(set(names))
    main = [v for v in vs if v["group"] == "main"]
    # every init with every seed, without a constraint
    assert sorted((v["init"], v["seed"]) for v in main) == [("osrm", 0), ("osrm", 1), ("standard", 0), ("standard", 1)]
    assert all(v["constraint"] == "none" for v in main)
    # ablations: the first seed only
    assert [(v["init"], v["constraint"], v["seed"]) for v in vs if v["group"] == "constraint"] == [("osrm", "freeze_A", 0)]
    assert {v["samples"] for v in vs if v["init"] == "osrm"} == {6, 12}
    assert {v["a_lr_scale"] for v in vs if v["init"] == "osrm"} == {1.0, 3.0}
    assert all(v["seed"] == 0 for v in vs if v["group"] != "main")
    assert all(v["constraint"] == "none" for v in vs if v["init"] == "standard")


def test_extra_variants_run_with_every_seed(tiny_model_dir) -> None:
    study = tiny_study(tiny_model_dir).model_copy(update={"variants": [
        VariantSpec(init="standard", constraint="freeze_A", rank=4, lr=0.1),
        VariantSpec(init="osrm", constraint="freeze_A", rank=4)]})
    extra = [v for v in variants(study) if v["group"] == "main" and v["rank"] == 4]
    assert sorted((v["init"], v["constraint"], v["lr"], v["seed"]) for v in extra) == [
        ("osrm", "freeze_A", 5e-2, 0), ("osrm", "freeze_A", 5e-2, 1),
        ("standard", "freeze_A", 0.1, 0), ("standard", "freeze_A", 0.1, 1)]
    config = variant_config(study, extra[0])
    assert (config.rank, config.train.constraint) == (4, "freeze_A")
    names = [variant_name(v, study.base.train.lr) for v in extra]
    assert "standard-freeze_A-n12-r4-a1-lr0.1-s0" in names and "osrm-freeze_A-n12-r4-a1-s0" in names
    with pytest.raises(ValueError, match="unknown constraint 'frozen'"):
        VariantSpec(init="standard", constraint="frozen")
    with pytest.raises(ValueError, match="constraint 'project' keeps A in the OSRM subspace, which init 'standard'"):
        VariantSpec(init="standard", constraint="project")


def test_ablations_run_for_the_chosen_inits_and_methods(tiny_model_dir) -> None:
    study = tiny_study(tiny_model_dir).model_copy(update={"inits": ["standard", "osrm", "osrm_gen"],
                                                         "ablation_inits": ["osrm_gen"], "ranks": [2, 4]})
    vs = variants(study)
    assert {v["init"] for v in vs if v["group"] in ("constraint", "samples", "a_lr_scale")} == {"osrm_gen"}
    assert {v["init"] for v in vs if v["group"] == "rank"} == {"standard", "osrm_gen"}
    ablation = next(v for v in vs if v["group"] == "samples")
    main = next(v for v in vs if v["group"] == "main")
    assert variant_config(study, ablation).merge.methods == ["task_arithmetic"]
    assert variant_config(study, main).merge.methods == study.base.merge.methods


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"ablation_inits": ["standard"]}, "ablation init 'standard' is not an OSRM-family init of this study"),
        ({"ablation_inits": ["osrm_gen"]}, "allowed: osrm"),
        ({"ablation_methods": ["bogus"]}, "unknown merge method 'bogus'"),
    ],
)
def test_bad_ablation_settings(tiny_model_dir, change, message) -> None:
    settings = tiny_study(tiny_model_dir).model_dump()
    with pytest.raises(ValueError, match=message):
        StudyConfig(**{**settings, **change})


def test_curve_metrics() -> None:
    curve = pd.DataFrame({"lambda": [0.1, 0.5, 1.0], "normalized_avg": [0.8, 0.9, 0.89]})
    m = curve_metrics(curve)
    assert m["best"] == 0.9 and m["best_lambda"] == 0.5
    assert m["width_2pt"] == pytest.approx(0.5)  # 0.5..1.0 are within 2 points
    expected_auc = np.trapezoid([0.8, 0.9, 0.89], [0.1, 0.5, 1.0]) / 0.9
    assert m["auc"] == pytest.approx(expected_auc)
    assert "merged_at_best" not in m
    m = curve_metrics(curve.assign(merged_avg=[0.5, 0.6, 0.7]))
    assert m["merged_at_best"] == 0.6  # the plain merged score at the best normalized lambda


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
    assert (q1.loc[q1["constraint"] == "none", "seeds"] == 2).all()
    assert (q1.loc[q1["constraint"] == "freeze_A", "seeds"] == 1).all()
    # the ablations ran task arithmetic only, and their tables say so
    assert set(tables["q4_samples"]["method"]) == {"task_arithmetic"}
    sweep = RunDir(study_dir / "runs" / "osrm-none-n6-r2-a1-s0").read_csv("sweep_osrm.csv")
    assert set(sweep["method"]) == {"task_arithmetic"}
    assert (study_dir / "figures" / "curves.html").read_text().count("plotly-graph-div") >= 2
    assert find_studies(study_dir) == [study_dir]
    q6 = tables["q6_prediction"]
    assert set(q6["signal"]) == {"relative_shift", "sv_overlap", "spectral_loss"}
    assert q6["p"].between(0, 1).any() and "p-value" in report


def test_q6_data_free_signals_are_those_of_the_adapters(study_dir) -> None:
    from osrm_core.diagnostics import pair_signals

    pairs = load_study_tables(study_dir)["q6_pairs"]
    name = "standard-none-n12-r2-a1-s0"
    expected = pair_signals(RunDir(study_dir / "runs" / name).load_adapters("standard")).set_index(["adapter", "data"])
    got = pairs[pairs["variant"] == name].set_index(["adapter", "data"])
    assert len(got) == len(expected) > 0
    for key, row in got.iterrows():
        assert row["sv_overlap"] == pytest.approx(expected.loc[key, "sv_overlap"], rel=1e-6)
        assert row["spectral_loss"] == pytest.approx(expected.loc[key, "spectral_loss"], rel=1e-6, abs=1e-12)


def test_q1_is_the_mean_of_each_seeds_best(study_dir) -> None:
    tables = load_study_tables(study_dir)
    row = tables["q1_merged"].query("init == 'standard' and method == 'task_arithmetic'").iloc[0]
    bests = []
    for seed in (0, 1):
        name = f"standard-none-n12-r2-a1-s{seed}"
        sweep = RunDir(study_dir / "runs" / name).read_csv("sweep_standard.csv")
        ta = sweep[sweep["method"] == "task_arithmetic"]
        by_lambda = ta.groupby("lambda")[["normalized", "score"]].mean()
        bests.append(by_lambda.loc[by_lambda["normalized"].idxmax()])
    assert row["normalized_best_mean"] == pytest.approx(np.mean([b["normalized"] for b in bests]))
    assert row["merged_avg_mean"] == pytest.approx(np.mean([b["score"] for b in bests]))


def test_report_states_the_wall_time_of_all_invocations(study_dir) -> None:
    import json

    seconds = json.loads((study_dir / "timing.json").read_text())["seconds"]
    assert seconds > 0
    assert f"Wall time of the runs: {seconds / 60:.1f} min." in (study_dir / "report.md").read_text()


def test_freeze_a_keeps_osrm_subspace(study_dir) -> None:
    """With A frozen the trained adapter's A is still the OSRM init."""
    from osrm_core.inits import osrm_subspace

    run = RunDir(study_dir / "runs" / "osrm-freeze_A-n12-r2-a1-s0")
    stats = run.load_stats()
    adapters = run.load_adapters("osrm")
    name = TASKS[0]
    A = osrm_subspace([stats[TASKS[1]]], 2)
    layer = next(iter(adapters[name].layers))
    np.testing.assert_allclose(adapters[name].layers[layer].A.double().numpy(), A[layer].numpy(), atol=1e-6)


def test_variants_with_equal_statistics_settings_share_them(study_dir, tiny_model_dir) -> None:
    from osrm_core.pipeline import Pipeline

    first, second = (RunDir(study_dir / "runs" / n) for n in ("standard-none-n12-r2-a1-s0", "osrm-none-n12-r2-a1-s0"))
    for task in TASKS:
        assert second.stats_path(task).read_bytes() == first.stats_path(task).read_bytes()
        assert second.manifest()["stages"][f"stats/{task}"]["seconds"] == 0.0  # copied, not collected
    other_seed = Pipeline(second.config(), study_dir / "fresh")
    with pytest.raises(ValueError, match="collected its statistics with other settings"):
        other_seed.reuse_stats(RunDir(study_dir / "runs" / "standard-none-n12-r2-a1-s1"))


def test_pairwise_losses_are_measured(study_dir) -> None:
    pairs = RunDir(study_dir / "runs" / "standard-none-n12-r2-a1-s0").read_csv("pairwise.csv")
    assert len(pairs) == 2  # two tasks: (a, b) and (b, a)
    np.testing.assert_allclose(pairs["loss"], pairs["single"] - pairs["merged"])


def test_resumed_study_does_no_work(study_dir, tiny_model_dir, monkeypatch) -> None:
    import osrm_core.pipeline as runs

    def fail(*a, **k):
        raise AssertionError("a finished study must not train again")

    monkeypatch.setattr(runs, "finetune", fail)
    tasks = [_word_task(t, seed) for seed, t in enumerate(TASKS)]
    run_study(tiny_study(tiny_model_dir), study_dir, tasks=tasks)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("base: [", "not valid YAML"),
        ("inits: [standard]\n", "base"),
        ("base: {tasks: [{name: a, spec: demo:sentiment}, {name: b, spec: demo:topic}]}\ninits: [bogus]\n", "unknown init 'bogus'"),
        ("base: {tasks: [{name: a, spec: demo:sentiment}, {name: b, spec: demo:topic}]}\ninits: []\n",
         "at least one init in inits or one entry in variants"),
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


def test_findings_warn_when_a_task_learned_nothing() -> None:
    from osrm_core.study_report import findings

    q1 = pd.DataFrame([
        {"init": i, "constraint": "none", "method": "task_arithmetic", "normalized_best_mean": n,
         "normalized_best_std": np.nan, "merged_avg_mean": m, "auc_mean": n, "seeds": 1}
        for i, n, m in (("standard", 1.1, 0.59), ("osrm", 4.7, 0.60))
    ])
    q2 = pd.DataFrame([
        {"init": i, "constraint": "none", "task": t, "mean": s, "std": np.nan}
        for i in ("standard", "osrm") for t, s in (("pairs", 0.006), ("topic", 0.9))
    ])
    lines = findings({"q1_merged": q1.assign(best_lambda=[0.5, 1.0]), "q2_single": q2,
                      "curves": pd.DataFrame({"lambda": [0.5, 1.0]})})
    assert any(line.startswith("- Caution: pairs's mean single-task score is below 0.1") for line in lines)
    assert any(line.startswith("- Caution: task_arithmetic's best lambda is the grid's largest (1) for osrm;")
               for line in lines)
    assert not any("topic's" in line for line in lines)
    assert any("merged score there 0.600 vs 0.590" in line and "one seed" in line for line in lines)


def test_quick_study_leaves_out_the_pair_task_it_cannot_learn() -> None:
    from osrm_core.study import quick_study_config

    study = quick_study_config()
    assert [t.name for t in study.base.tasks] == ["sentiment", "topic", "question"]
    assert study.base.train.steps == 60 and study.seeds == [0]


def test_a_runs_per_init_settings_become_study_variants() -> None:
    """The demo's recipe (osrm_gen with A frozen at rank 32) is a variant of the quick study, and
    a study refuses per-init settings in its base (variants are the study's way)."""
    from osrm_core.settings import ConfigError, demo_config, validate_settings
    from osrm_core.study import quick_study_config

    study = quick_study_config()
    assert study.base.per_init == {} and study.inits == ["standard", "osrm", "osrm_gen"]
    assert [(v.init, v.constraint, v.rank) for v in study.variants] == [("osrm_gen", "freeze_A", 32)]
    assert ("osrm_gen", "freeze_A", 32) in {(v["init"], v["constraint"], v["rank"]) for v in variants(study)}
    data = {"base": demo_config(quick=True).model_dump(mode="json"), "inits": ["standard"]}
    with pytest.raises(ConfigError, match="base.per_init: a study gives an init its own settings as an entry of variants"):
        validate_settings(StudyConfig, data, "study")


@pytest.mark.slow
def test_cli_quick_study_end_to_end(tmp_path) -> None:
    """`osrm study --quick --jobs 2` on the packaged model and the demo tasks (a few minutes on 2 cores)."""
    import json

    out = tmp_path / "quick"
    command = ["study", "--quick", "--jobs", "2", "--out", str(out), "--json"]
    proc = subprocess.run([sys.executable, "-m", "osrm_core.cli", *command], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout) == {"report": str(out / "report.md")}
    report = (out / "report.md").read_text()
    assert "Tasks: sentiment, topic, question;" in report and "60 steps; seeds [0]" in report
    # one rank only: question 5 has no runs, and the report says so instead of an empty table
    assert "## 5. Rank\n_No runs in this study answer this question" in report
    q1 = load_study_tables(out)["q1_merged"]
    assert set(q1["init"]) == {"standard", "osrm", "osrm_gen"}
    assert q1["normalized_best_mean"].between(0.3, 1.5).all()
    assert q1["merged_avg_mean"].between(0.3, 1.0).all()
