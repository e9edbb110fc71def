"""A small finished run, built once per test session with the library, for the app tests.

Import the fixture into a test module (``from fixtures_run import small_run_fixture  # noqa: F401``);
it is registered under the name ``small_run``.
The run lives under pytest's session base temp folder; when a second module asks for it, the
finished run found there is reused, so it is built once (about 20 s on two CPU cores).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from osrm_core.demo import demo_task
from osrm_core.pipeline import run_experiment
from osrm_core.settings import MergeSettings, RunConfig, TaskEntry, TrainSettings

#: Demo tasks of the small run.
SMALL_TASKS = ("sentiment", "topic", "question")


def small_run_config() -> RunConfig:
    """Rank 4, 16 samples, 5 training steps, two merge methods, two lambdas, standard + OSRM."""
    return RunConfig(
        name="small",
        tasks=[TaskEntry(name=k, spec=f"demo:{k}") for k in SMALL_TASKS],
        rank=4,
        samples=16,
        max_length=32,
        max_test=40,
        train=TrainSettings(steps=5, batch_size=8),
        merge=MergeSettings(methods=["task_arithmetic", "ties"], lambdas=[0.5, 1.0]),
        inits=["standard", "osrm"],
    )


def build_small_run(path: str | Path) -> Path:
    """Run (or finish) the small experiment in ``path``."""
    path = Path(path)
    tasks = [demo_task(k, n_train=60, n_test=40) for k in SMALL_TASKS]
    with warnings.catch_warnings():
        # 16 short examples give fewer tokens than the width 384: expected, and warned about.
        warnings.simplefilter("ignore")
        run_experiment(small_run_config(), path, tasks=tasks)
    return path


@pytest.fixture(scope="session", name="small_run")
def small_run_fixture(tmp_path_factory) -> Path:
    """Path of the small finished run (shared: tests must not write into it)."""
    path = tmp_path_factory.getbasetemp() / "osrm_small_run"
    if not (path / "results" / "summary.json").is_file():
        build_small_run(path)
    return path
