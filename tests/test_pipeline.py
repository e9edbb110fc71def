"""Tests of osrm_core.pipeline, settings and rundir: the end-to-end experiment on a tiny saved model, its run directory,
and resuming: an interrupted or partly deleted run gives the same results as one straight run."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import yaml

from osrm_core.data import Split, TaskData
from osrm_core.pipeline import run_experiment
from osrm_core.rundir import RunDir
from osrm_core.settings import ConfigError, MergeSettings, RunConfig, TaskEntry, TrainSettings
from osrm_core.stats import FeatureStats

TASKS = ("sentiment", "topic")
INITS = ["standard", "osrm"]
METHODS = ["task_arithmetic", "ties"]
LAMBDAS = [0.5, 1.0]
RESULT_CSVS = ["sweep_standard.csv", "sweep_osrm.csv", "interference.csv", "own_energy.csv", "angles.csv"]


def tiny_config(model_dir, **changes) -> RunConfig:
    settings = dict(
        name="tiny",
        model=str(model_dir),
        tasks=[TaskEntry(name=t, spec=f"demo:{t}") for t in TASKS],
        rank=2,
        alpha=4,
        samples=12,
        max_length=16,
        max_test=12,
        inits=INITS,
        train=TrainSettings(steps=30, batch_size=8, lr=5e-2, warmup_ratio=0.0),
        merge=MergeSettings(methods=METHODS, lambdas=LAMBDAS),
    )
    return RunConfig(**{**settings, **changes})


_WORDS = {
    "sentiment": (["awful", "terrible", "bad", "horrible"], ["great", "excellent", "good", "wonderful"]),
    "topic": (["football", "tennis", "goal", "match"], ["market", "bank", "stock", "price"]),
}


def _word_task(name: str, seed: int, n_train: int = 24, n_test: int = 16) -> TaskData:
    """Three words of one class per example: a task the tiny random BERT learns in a few steps."""
    rng = np.random.default_rng(seed)

    def split(n: int) -> Split:
        labels = np.arange(n) % 2
        return Split([" ".join(rng.choice(_WORDS[name][int(y)], 3)) for y in labels], labels)

    return TaskData(name, split(n_train), split(n_test), ["a", "b"])


@pytest.fixture(scope="module")
def tiny_tasks_2() -> list[TaskData]:
    """Two small two-label tasks (the saved tiny model has a 2-label head)."""
    return [_word_task(t, seed) for seed, t in enumerate(TASKS)]


@pytest.fixture(scope="module")
def reference_run(tiny_model_dir, tiny_tasks_2, tmp_path_factory):
    """One uninterrupted run; tests copy it before changing anything."""
    out = tmp_path_factory.mktemp("runs") / "reference"
    stages = []
    summary = run_experiment(tiny_config(tiny_model_dir), out, tasks=tiny_tasks_2, on_stage=stages.append)
    return out, summary, stages


def _results(path) -> dict[str, pd.DataFrame]:
    return {name: pd.read_csv(path / "results" / name) for name in RESULT_CSVS}


def _assert_same_results(a, b) -> None:
    ra, rb = _results(a), _results(b)
    for name in RESULT_CSVS:
        pd.testing.assert_frame_equal(ra[name], rb[name], check_exact=True, obj=name)
    assert json.loads((a / "results" / "summary.json").read_text()) == json.loads(
        (b / "results" / "summary.json").read_text()
    )


def test_run_writes_the_run_directory(reference_run, tiny_model_dir) -> None:
    out, summary, stages = reference_run
    assert stages[0] == "statistics" and stages[-1] == "done"
    assert RunConfig.from_yaml(out / "config.yaml") == tiny_config(tiny_model_dir)

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "done" and "torch" in manifest["versions"]
    expected = {f"stats/{t}" for t in TASKS} | {f"adapters/{i}/{t}" for i in INITS for t in TASKS}
    expected |= {f"sweep/{i}" for i in INITS} | {"diagnostics"}
    assert set(manifest["stages"]) == expected
    assert all(stage["status"] == "done" for stage in manifest["stages"].values())

    for task in TASKS:
        stats = FeatureStats.load(out / "stats" / f"{task}.safetensors")
        assert stats.count > 0
        for init in INITS:
            folder = out / "adapters" / init / task
            for name in ("adapter_config.json", "adapter_model.safetensors", "train.json"):
                assert (folder / name).is_file(), folder / name
            assert json.loads((folder / "adapter_config.json").read_text())["r"] == 2
            drift = pd.read_csv(folder / "drift.csv")  # interference during fine-tuning
            assert set(drift["data"]) == set(TASKS) and drift["step"].min() == 0
            assert set(drift.loc[drift["own"], "data"]) == {task}
    for name in RESULT_CSVS:
        assert len(pd.read_csv(out / "results" / name)) > 0, name
    sweep = pd.read_csv(out / "results" / "sweep_osrm.csv")
    assert set(sweep["method"]) == set(METHODS) and set(sweep["lambda"]) == set(LAMBDAS)
    assert set(sweep["task"]) == set(TASKS) and (sweep["init"] == "osrm").all()

    assert summary == json.loads((out / "results" / "summary.json").read_text())
    assert summary["tasks"] == list(TASKS) and summary["inits"] == INITS
    for init in INITS:
        result = summary["results"][init]
        assert set(result["single"]) == set(TASKS)
        assert all(score >= 0.75 for score in result["single"].values())  # the adapters learned
        assert set(result["merged"]) == set(METHODS)
        for points in result["merged"].values():
            assert sorted(p["lambda"] for p in points) == LAMBDAS
            for point in points:
                assert set(point["scores"]) == set(TASKS)
                assert isinstance(point["normalized_avg"], float)


def test_interrupted_run_resumes_to_the_same_results(reference_run, tiny_model_dir, tiny_tasks_2, tmp_path) -> None:
    reference, summary, _ = reference_run
    out = tmp_path / "interrupted"
    stage = {"now": None}

    def on_stage(name: str) -> None:
        stage["now"] = name

    def progress(step: int, total: int, message: str) -> None:
        if stage["now"] == "fine-tuning (osrm)" and message == f"fine-tuning {TASKS[1]}" and step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_experiment(tiny_config(tiny_model_dir), out, tasks=tiny_tasks_2, progress=progress, on_stage=on_stage)
    run = RunDir(out)
    assert run.is_done(f"adapters/osrm/{TASKS[0]}") and not run.is_done(f"adapters/osrm/{TASKS[1]}")
    assert not (out / "results").exists()

    resumed = run_experiment(tiny_config(tiny_model_dir), out, tasks=tiny_tasks_2)
    assert resumed == summary
    _assert_same_results(out, reference)


def test_deleted_stages_are_redone_to_the_same_results(reference_run, tiny_model_dir, tiny_tasks_2, tmp_path) -> None:
    reference, summary, _ = reference_run
    out = tmp_path / "partial"
    shutil.copytree(reference, out)
    manifest = json.loads((out / "manifest.json").read_text())
    for key in (f"adapters/osrm/{TASKS[1]}", "sweep/osrm", "diagnostics"):
        del manifest["stages"][key]
    manifest.pop("status")
    (out / "manifest.json").write_text(json.dumps(manifest))
    shutil.rmtree(out / "adapters" / "osrm" / TASKS[1])
    for name in ("sweep_osrm.csv", "interference.csv", "angles.csv", "summary.json"):
        (out / "results" / name).unlink()

    stages = []
    assert run_experiment(tiny_config(tiny_model_dir), out, tasks=tiny_tasks_2, on_stage=stages.append) == summary
    _assert_same_results(out, reference)
    assert RunDir(out).is_done(f"adapters/osrm/{TASKS[1]}")


def test_missing_result_files_are_written_again(reference_run, tiny_model_dir, tiny_tasks_2, tmp_path) -> None:
    reference, summary, _ = reference_run
    out = tmp_path / "lost"
    shutil.copytree(reference, out)
    for name in ("sweep_standard.csv", "own_energy.csv"):  # the manifest still says done
        (out / "results" / name).unlink()
    assert run_experiment(tiny_config(tiny_model_dir), out, tasks=tiny_tasks_2) == summary
    _assert_same_results(out, reference)


def test_a_finished_run_does_no_work_again(reference_run, tiny_model_dir, tiny_tasks_2, tmp_path, monkeypatch) -> None:
    import osrm_core.evaluate
    import osrm_core.models
    import osrm_core.pipeline

    reference, summary, _ = reference_run
    out = tmp_path / "again"
    shutil.copytree(reference, out)

    def fail(*args, **kwargs):
        raise AssertionError("a finished run must not compute anything again")

    for module, name in (
        (osrm_core.pipeline, "finetune"),
        (osrm_core.pipeline, "collect_feature_stats"),
        (osrm_core.pipeline, "init_lora"),
        (osrm_core.models, "load_base_model"),
        (osrm_core.evaluate, "SweepEngine"),
    ):
        monkeypatch.setattr(module, name, fail)
    assert run_experiment(tiny_config(tiny_model_dir), out, tasks=tiny_tasks_2) == summary
    _assert_same_results(out, reference)


def test_another_config_in_the_same_directory_is_refused(reference_run, tiny_model_dir, tiny_tasks_2) -> None:
    reference, _, _ = reference_run
    before = (reference / "config.yaml").read_text()
    with pytest.raises(ConfigError, match="another config"):
        run_experiment(tiny_config(tiny_model_dir, rank=3), reference, tasks=tiny_tasks_2)
    assert (reference / "config.yaml").read_text() == before


def test_run_config_validation(tiny_model_dir, tmp_path) -> None:
    config = tiny_config(tiny_model_dir)
    assert RunConfig.validate_dict(yaml.safe_load(config.to_yaml())) == config
    data = config.model_dump(mode="json")
    cases = [
        ({"rank": 0}, "rank"),
        ({"tasks": data["tasks"][:1]}, "at least two tasks"),
        ({"tasks": [data["tasks"][0]] * 2}, "unique"),
        ({"inits": ["lottery"]}, "unknown init"),
        ({"merge": {"methods": ["average"]}}, "unknown merge method"),
        ({"merge": {"lambdas": [0.0]}}, "lambdas"),
        ({"train": {"steps": 0}}, "train.steps"),
        ({"bogus": 1}, "bogus"),
        ({"train": {"constraint": "project"}}, "constraint 'project' keeps A in the OSRM subspace, which init 'standard'"),
        ({"per_init": {"osrm_gen": {"rank": 4}}}, r"per_init\.osrm_gen: 'osrm_gen' is not one of the run's inits"),
        ({"per_init": {"lottery": {"rank": 4}}}, r"per_init\.lottery: unknown init 'lottery'"),
        ({"per_init": {"osrm": {"rank": 0}}}, r"per_init\.osrm\.rank"),
        ({"per_init": {"osrm": {"ranks": 4}}}, r"per_init\.osrm\.ranks: Extra inputs"),
        ({"per_init": {"standard": {"constraint": "freeze_A"}, "osrm": {"constraint": "nope"}}},
         r"per_init\.osrm\.constraint: .*unknown constraint 'nope'"),
        ({"per_init": {"standard": {"constraint": "project"}}},
         "per_init.standard.constraint 'project' keeps A in the OSRM subspace, which init 'standard'"),
        # A run-wide constraint that one init cannot take is fine when that init sets its own.
    ]
    for change, match in cases:
        with pytest.raises(ConfigError, match=match):
            RunConfig.validate_dict({**data, **change})
    ok = RunConfig.validate_dict({**data, "train": {**data["train"], "constraint": "project"},
                                  "per_init": {"standard": {"constraint": "none"}}})
    assert [ok.for_init(i).train.constraint for i in ok.inits] == ["none", "project"]
    with pytest.raises(ConfigError, match="mapping"):
        RunConfig.validate_dict([1, 2])
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks: [")
    with pytest.raises(ConfigError, match="not valid YAML"):
        RunConfig.from_yaml(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        RunConfig.from_yaml(tmp_path / "missing.yaml")


def test_a_task_with_more_labels_than_the_saved_head(tiny_model_dir, tiny_tasks_2, tmp_path) -> None:
    rng = np.random.default_rng(0)

    def split(n: int) -> Split:
        labels = np.arange(n) % 3
        return Split([f"word{y} " + " ".join(rng.choice(["a", "b", "c"], 2)) for y in labels], labels)

    three = TaskData("three", split(12), split(6), ["x", "y", "z"])
    config = tiny_config(
        tiny_model_dir,
        tasks=[TaskEntry(name=t, spec="demo:topic") for t in ("sentiment", "three")],
        inits=["standard"],
        train=TrainSettings(steps=1, batch_size=4),
    )
    summary = run_experiment(config, tmp_path / "three", tasks=[tiny_tasks_2[0], three])
    assert set(summary["results"]["standard"]["single"]) == {"sentiment", "three"}


def test_freeze_A_applies_to_every_init(tiny_model_dir, tiny_tasks_2, tmp_path) -> None:
    """A frozen random A (LoRA-FA) is a control of the study: the constraint is not dropped for
    inits without a subspace, and the saved A equals the initial one."""
    from osrm_core.adapters import read_adapter_dir
    from osrm_core.pipeline import Pipeline

    config = tiny_config(tiny_model_dir, inits=["standard"], train=TrainSettings(
        steps=5, batch_size=8, lr=5e-2, warmup_ratio=0.0, constraint="freeze_A"))
    pipeline = Pipeline(config, tmp_path / "run", tasks=tiny_tasks_2)
    pipeline.train_adapters()
    pipeline.write_inits()
    for task in TASKS:
        trained = read_adapter_dir(pipeline.run.adapter_path("standard", task))
        initial = read_adapter_dir(pipeline.run.path / "init" / "standard" / task)
        for name, layer in trained.layers.items():
            np.testing.assert_array_equal(layer.A.numpy(), initial.layers[name].A.numpy())
            assert layer.B.abs().sum() > 0


def test_osrm_gen_eps_reaches_the_init(tiny_model_dir, tiny_tasks_2, tmp_path) -> None:
    """The run config's ``init_params.osrm_gen.eps`` is the trade-off of the subspace the pipeline builds."""
    from torch.testing import assert_close

    from osrm_core.inits import task_subspaces
    from osrm_core.pipeline import Pipeline

    subspaces = {}
    for eps in (1e-3, 10.0):
        config = tiny_config(tiny_model_dir, inits=["osrm_gen"], init_params={"osrm_gen": {"eps": eps}})
        pipeline = Pipeline(config, tmp_path / f"eps{eps:g}", tasks=tiny_tasks_2)
        stats = pipeline.collect_stats()
        _, _, subspaces[eps] = pipeline.init_adapter("osrm_gen", 0, tiny_tasks_2[0])
        expected = task_subspaces("osrm_gen", [stats[t] for t in TASKS], 0, config.rank, eps=eps)
        for name, a in subspaces[eps].items():
            assert_close(a, expected[name])
    name = next(iter(subspaces[1e-3]))
    assert not np.allclose(subspaces[1e-3][name].numpy(), subspaces[10.0][name].numpy())
    with pytest.raises(ConfigError, match=r"init_params: osrm_gen\.eps must be a number in \(0\.0, inf\), got 0"):
        RunConfig.validate_dict({**tiny_config(tiny_model_dir).model_dump(mode="json"), "init_params": {"osrm_gen": {"eps": 0}}})


def test_per_init_settings_give_each_init_its_own_recipe(tiny_model_dir, tiny_tasks_2, tmp_path) -> None:
    """standard LoRA at the run's rank against osrm_gen with A frozen at a higher rank and its own
    alpha, in one run: each init's adapters are initialized and trained with its own settings,
    and both are swept and summarized."""
    from torch.testing import assert_close

    from osrm_core.adapters import read_adapter_dir
    from osrm_core.inits import task_subspaces

    config = tiny_config(tiny_model_dir, inits=["standard", "osrm_gen"], train=TrainSettings(
        steps=5, batch_size=8, lr=5e-2, warmup_ratio=0.0),
        per_init={"osrm_gen": {"rank": 4, "alpha": 2, "constraint": "freeze_A"}})
    summary = run_experiment(config, tmp_path / "run", tasks=tiny_tasks_2)
    assert set(summary["results"]) == {"standard", "osrm_gen"}
    run = RunDir(tmp_path / "run")
    stats = run.load_stats()
    for i, task in enumerate(TASKS):
        standard = read_adapter_dir(run.adapter_path("standard", task))
        assert {(lw.rank, lw.scale) for lw in standard.layers.values()} == {(2, 2.0)}  # alpha 4 / rank 2
        ours = read_adapter_dir(run.adapter_path("osrm_gen", task))
        assert {(lw.rank, lw.scale) for lw in ours.layers.values()} == {(4, 0.5)}  # alpha 2 / rank 4
        subspace = task_subspaces("osrm_gen", [stats[t] for t in TASKS], i, 4)
        for name, layer in ours.layers.items():  # frozen: A is still the rank-4 subspace
            assert_close(layer.A, subspace[name].to(layer.A.dtype), atol=1e-6, rtol=0)
            assert layer.B.abs().sum() > 0
    assert RunConfig.from_yaml(run.config_path) == config
