"""Studies that grow, and studies and runs in several processes: finished variants are reused, only
what is new is computed, a changed variant is refused by name, and ``jobs=2`` gives the same
files as one process."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest
from test_pipeline import TASKS, _word_task, tiny_config

from osrm_core.parallel import threads_per_job
from osrm_core.pipeline import Pipeline
from osrm_core.rundir import RunDir
from osrm_core.settings import ConfigError
from osrm_core.study import StudyConfig, run_study, variant_config, variant_name, variants


def small_study(model_dir, **changes) -> StudyConfig:
    base = tiny_config(model_dir, train={"steps": 8, "batch_size": 8, "lr": 5e-2, "warmup_ratio": 0.0},
                       merge={"methods": ["task_arithmetic"], "lambdas": [0.5, 1.0]})
    settings = dict(name="grow", base=base, inits=["standard"], constraints=["none"], seeds=[0],
                    sample_sizes=[base.samples], ranks=[base.rank], a_lr_scales=[1.0])
    return StudyConfig(**{**settings, **changes})


@pytest.fixture
def tasks():
    return [_word_task(t, seed) for seed, t in enumerate(TASKS)]


@pytest.fixture
def trainings(monkeypatch) -> list[str]:
    """The run directories of every adapter trained from now on."""
    seen: list[str] = []
    train_adapter = Pipeline.train_adapter

    def counting(self, init, index, task, *args):
        seen.append(self.run.path.name)
        return train_adapter(self, init, index, task, *args)

    monkeypatch.setattr(Pipeline, "train_adapter", counting)
    return seen


def test_growing_by_one_seed_trains_only_that_seed(tiny_model_dir, tmp_path, tasks, trainings) -> None:
    out = tmp_path / "study"
    run_study(small_study(tiny_model_dir), out, tasks=tasks)
    assert trainings == ["standard-none-n12-r2-a1-s0"] * len(TASKS)
    first = RunDir(out / "runs" / "standard-none-n12-r2-a1-s0")
    before = first.manifest()
    trainings.clear()
    grown = small_study(tiny_model_dir, seeds=[0, 1])
    run_study(grown, out, tasks=tasks)
    assert trainings == ["standard-none-n12-r2-a1-s1"] * len(TASKS)
    assert first.manifest()["stages"] == before["stages"]  # the finished variant was not touched
    q1 = pd.read_csv(out / "tables" / "q1_merged.csv")
    assert (q1["seeds"] == 2).all()


def test_pairwise_table_of_an_older_version_is_measured_again(tiny_model_dir, tmp_path, tasks, trainings) -> None:
    """Older versions wrote pairwise.csv without its lambda: growing such a study re-measures the
    pairs of the finished variant (no KeyError) and trains only the new seed."""
    out = tmp_path / "study"
    run_study(small_study(tiny_model_dir), out, tasks=tasks)
    first = RunDir(out / "runs" / "standard-none-n12-r2-a1-s0")
    path = first.result_path("pairwise.csv")
    pd.read_csv(path).drop(columns="lambda").to_csv(path, index=False)
    trainings.clear()
    run_study(small_study(tiny_model_dir, seeds=[0, 1]), out, tasks=tasks)
    assert trainings == ["standard-none-n12-r2-a1-s1"] * len(TASKS)
    assert (pd.read_csv(path)["lambda"] == 1.0).all()


def test_a_study_of_an_older_version_grows_after_a_new_setting(tiny_model_dir, tmp_path, tasks, trainings) -> None:
    """A variant run by a version without a setting that exists now (its config.yaml lacks
    per_init; older versions also left a hash of their config in variant.json) is reused: the
    setting takes its default, only the new seed trains."""
    import yaml

    out = tmp_path / "study"
    run_study(small_study(tiny_model_dir), out, tasks=tasks)
    first = RunDir(out / "runs" / "standard-none-n12-r2-a1-s0")
    old = yaml.safe_load(first.config_path.read_text())
    del old["per_init"]
    first.config_path.write_text(yaml.safe_dump(old, sort_keys=False))
    (first.path / "variant.json").write_text('{"hash": "0123456789abcdef"}')
    trainings.clear()
    run_study(small_study(tiny_model_dir, seeds=[0, 1]), out, tasks=tasks)
    assert trainings == ["standard-none-n12-r2-a1-s1"] * len(TASKS)


def test_a_study_with_the_old_osrm_gen_eps_is_finished_and_grows(tiny_model_dir, tmp_path, tasks, trainings) -> None:
    """Before ``init_params``, osrm_gen's eps was the top-level ``osrm_gen_eps`` of study.yaml and
    of every variant's config.yaml: such a study loads (the value moves to init_params), its
    variants keep their names, settings and statistics key, and it grows without retraining."""
    import yaml

    out = tmp_path / "study"
    run_study(small_study(tiny_model_dir, base=small_study(tiny_model_dir).base.model_copy(
        update={"init_params": {"osrm_gen": {"eps": 0.05}}})), out, tasks=tasks)
    for path in [out / "study.yaml", *(out / "runs").glob("*/config.yaml")]:
        data = yaml.safe_load(path.read_text())
        config = data["base"] if "base" in data else data
        config["osrm_gen_eps"] = config.pop("init_params")["osrm_gen"]["eps"]
        path.write_text(yaml.safe_dump(data, sort_keys=False))
    old = StudyConfig.from_yaml(out / "study.yaml")
    assert old.base.init_params == {"osrm_gen": {"eps": 0.05}}
    first = RunDir(out / "runs" / "standard-none-n12-r2-a1-s0")
    assert first.config().init_params == {"osrm_gen": {"eps": 0.05}} and "osrm_gen_eps" in first.config_path.read_text()
    before = first.manifest()
    trainings.clear()
    run_study(old.model_copy(update={"seeds": [0, 1]}), out, tasks=tasks)
    assert trainings == ["standard-none-n12-r2-a1-s1"] * len(TASKS)
    assert first.manifest()["stages"] == before["stages"]
    assert sorted(p.name for p in (out / "runs").iterdir()) == [variant_name(v) for v in variants(
        old.model_copy(update={"seeds": [0, 1]}))]
    planned = variant_config(old, variants(old)[0])
    assert planned.model_dump() == first.config().model_dump() and planned.stats_key() == first.config().stats_key()


def test_adding_lambdas_and_methods_recomputes_only_the_sweeps(tiny_model_dir, tmp_path, tasks, trainings) -> None:
    out = tmp_path / "study"
    run_study(small_study(tiny_model_dir), out, tasks=tasks)
    run = RunDir(out / "runs" / "standard-none-n12-r2-a1-s0")
    stats_before = {k: v for k, v in run.manifest()["stages"].items() if not k.startswith("sweep/")}
    trainings.clear()
    study = small_study(tiny_model_dir)
    merge = study.base.merge.model_copy(update={"methods": ["task_arithmetic", "ties"], "lambdas": [0.5, 1.0, 1.5]})
    grown = study.model_copy(update={"base": study.base.model_copy(update={"merge": merge})})
    run_study(grown, out, tasks=tasks)
    assert trainings == []
    stages = run.manifest()["stages"]
    assert {k: v for k, v in stages.items() if not k.startswith("sweep/")} == stats_before
    sweep = run.read_csv("sweep_standard.csv")
    assert set(sweep["method"]) == {"task_arithmetic", "ties"} and set(sweep["lambda"]) == {0.5, 1.0, 1.5}
    assert run.config().merge == merge


def test_changing_a_finished_variant_is_refused_by_name(tiny_model_dir, tmp_path, tasks) -> None:
    out = tmp_path / "study"
    run_study(small_study(tiny_model_dir), out, tasks=tasks)
    saved = (out / "study.yaml").read_text()
    study = small_study(tiny_model_dir, seeds=[0, 1])
    changed = study.model_copy(update={"base": study.base.model_copy(
        update={"train": study.base.train.model_copy(update={"steps": 9})})})
    with pytest.raises(ConfigError, match=r"variant 'standard-none-n12-r2-a1-s0' was run with other settings "
                                          r"\(train.steps changed\)"):
        run_study(changed, out, tasks=tasks)
    assert (out / "study.yaml").read_text() == saved  # refused before anything was written
    assert not (out / "runs" / "standard-none-n12-r2-a1-s1").exists()


@pytest.mark.slow
def test_two_jobs_give_the_files_of_one_process(tiny_model_dir, tmp_path, tasks) -> None:
    study = small_study(tiny_model_dir, inits=["standard", "osrm"])
    assert len(variants(study)) == 2
    run_study(study, tmp_path / "one", tasks=tasks)
    run_study(study, tmp_path / "two", tasks=tasks, jobs=2)
    for v in variants(study):
        runs = [RunDir(tmp_path / d / "runs" / variant_name(v)) for d in ("one", "two")]
        for name in (f"sweep_{v['init']}.csv", "pairwise.csv", "interference.csv"):
            pd.testing.assert_frame_equal(runs[0].read_csv(name), runs[1].read_csv(name))
        for task in TASKS:
            path = f"adapters/{v['init']}/{task}/adapter_model.safetensors"
            assert (runs[0].path / path).read_bytes() == (runs[1].path / path).read_bytes()


def test_jobs_split_the_cores() -> None:
    assert threads_per_job(2, cores=2) == 1
    assert threads_per_job(2, cores=16) == 8
    assert threads_per_job(3, cores=16) == 5
    with pytest.raises(ValueError, match="jobs=3 is more than the 2 CPU cores"):
        threads_per_job(3, cores=2)
    with pytest.raises(ValueError, match="jobs must be an integer >= 1, got 0"):
        threads_per_job(0, cores=2)


@pytest.mark.slow
@pytest.mark.parametrize("jobs", ["0", "100000"])
def test_cli_bad_jobs_exits_2(tmp_path, jobs) -> None:
    proc = subprocess.run([sys.executable, "-m", "osrm_core.cli", "study", "--quick", "--jobs", jobs,
                           "--out", str(tmp_path / "s")], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error:") and "jobs" in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert not (tmp_path / "s").exists()


@pytest.mark.slow
def test_run_with_two_jobs_gives_the_files_of_one_process(tiny_model_dir, tmp_path, tasks) -> None:
    from osrm_core.pipeline import run_experiment

    config = tiny_config(tiny_model_dir, train={"steps": 8, "batch_size": 8, "lr": 5e-2, "warmup_ratio": 0.0})
    one = run_experiment(config, tmp_path / "one", tasks=tasks)
    two = run_experiment(config, tmp_path / "two", tasks=tasks, jobs=2)
    assert one == two
    runs = [RunDir(tmp_path / d) for d in ("one", "two")]
    for init in config.inits:
        pd.testing.assert_frame_equal(runs[0].read_csv(f"sweep_{init}.csv"), runs[1].read_csv(f"sweep_{init}.csv"))
        for task in TASKS:
            path = f"adapters/{init}/{task}/adapter_model.safetensors"
            assert (runs[0].path / path).read_bytes() == (runs[1].path / path).read_bytes()
            assert runs[1].is_done(f"adapters/{init}/{task}")


def test_a_finished_study_grows_by_a_sparse_b_variant(tiny_model_dir, tmp_path, tasks, trainings) -> None:
    """A variant run before sparse_B's settings existed (its config.yaml lacks train.b_density and
    train.calibration) is reused when the study grows by a sparse_B variant: the new settings take
    their defaults, only the new variant trains, and its adapters keep b_density of B's entries."""
    import yaml
    from safetensors.torch import load_file

    from osrm_core.study import VariantSpec

    out = tmp_path / "study"
    run_study(small_study(tiny_model_dir), out, tasks=tasks)
    first = RunDir(out / "runs" / "standard-none-n12-r2-a1-s0")
    old = yaml.safe_load(first.config_path.read_text())
    del old["train"]["b_density"], old["train"]["calibration"]
    first.config_path.write_text(yaml.safe_dump(old, sort_keys=False))
    trainings.clear()
    grown = small_study(tiny_model_dir, variants=[VariantSpec(init="standard", constraint="sparse_B", rank=4),
                                                  VariantSpec(init="standard", constraint="sparse_B", rank=4, b_density=0.3)])
    run_study(grown, out, tasks=tasks)
    names = ["standard-sparse_B-n12-r4-a1-s0", "standard-sparse_B-n12-r4-a1-d0.3-s0"]
    assert trainings == [names[0]] * len(TASKS) + [names[1]] * len(TASKS)
    for name, density in zip(names, (0.1, 0.3)):
        for task in TASKS:
            weights = load_file(str(out / "runs" / name / f"adapters/standard/{task}/adapter_model.safetensors"))
            b = [v for k, v in weights.items() if "lora_B" in k]
            assert sum(int((x != 0).sum()) for x in b) == round(density * sum(x.numel() for x in b))
    q1 = pd.read_csv(out / "tables" / "q1_merged.csv")
    assert set(q1["constraint"]) == {"none", "sparse_B", "sparse_B d0.3"}  # two arms, not two seeds of one
