"""Tests of the adaptive lambda search (successive halving) against the full grid."""

from __future__ import annotations

import math

import numpy as np
import pytest
from test_evaluate import MAX_LENGTH, _peft_model

from osrm_core.demo import demo_task
from osrm_core.evaluate import SweepEngine
from osrm_core.search import halving_shares, search_best
from osrm_core.train import adapter_of

LAMBDAS = [0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.4, 1.6, 1.8, 2.0]
N_TEST = 72


@pytest.fixture(scope="module")
def engine(make_tiny_model, tokenizer):
    tasks = [demo_task("sentiment", n_train=10, n_test=N_TEST), demo_task("topic", n_train=10, n_test=N_TEST)]
    adapters = {t.name: adapter_of(_peft_model(make_tiny_model, tokenizer, t, seed)) for seed, t in enumerate(tasks)}
    return SweepEngine(make_tiny_model(), tokenizer, tasks, adapters, max_length=MAX_LENGTH)


def test_halving_shares() -> None:
    assert halving_shares(10, 3, 72, 8) == pytest.approx([1 / 9, 1 / 3, 1.0])
    assert halving_shares(10, 3, 40, 8) == pytest.approx([1 / 3, 1.0])  # 40/9 < 8 examples
    assert halving_shares(3, 3, 1000, 8) == [1.0]
    assert halving_shares(1, 3, 1000, 8) == [1.0]


def test_search_scores_its_best_on_all_examples_like_the_grid(engine) -> None:
    single = engine.single_task_scores()
    grid = engine.sweep(["task_arithmetic"], LAMBDAS, single=single)
    found = search_best(engine, "task_arithmetic", LAMBDAS, single=single)
    by_lambda = grid.groupby("lambda")["normalized"].mean()
    assert found.normalized_avg == pytest.approx(by_lambda[found.lam])
    at_best = grid[grid["lambda"] == found.lam].set_index("task")["score"]
    assert found.scores == pytest.approx(at_best.to_dict())
    # rounds on 1/9, 1/3 and all examples: 10 points, then 4, then 2 survivors
    assert list(found.trace.groupby("round").size()) == [10, 4, 2]
    n = 2 * N_TEST
    assert found.examples == 10 * n // 9 + 4 * (n // 3 - n // 9) + 2 * (n - n // 3)
    assert found.grid_examples == len(LAMBDAS) * n
    assert found.examples / found.grid_examples < 0.4
    # the survivors of the last round are the two best of the second
    second = found.trace.query("round == 1").sort_values("normalized_avg", ascending=False, kind="stable")
    assert set(found.trace.query("round == 2")["lambda"]) == set(second["lambda"][:2])


def test_one_round_is_the_full_grid(engine) -> None:
    single = engine.single_task_scores()
    grid = engine.sweep(["ties"], LAMBDAS[:3], densities=[0.3, 0.7], single=single)
    found = search_best(engine, "ties", LAMBDAS[:3], densities=[0.3, 0.7], single=single, eta=6)
    assert found.examples == found.grid_examples
    avg = grid.groupby(["density", "lambda"])["normalized"].mean()
    assert found.normalized_avg == pytest.approx(avg.max())
    assert math.isclose(avg[(found.density, found.lam)], avg.max())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lambdas": []}, "lambdas must be a non-empty list"),
        ({"lambdas": [0.0, 1.0]}, r"lambdas must be a non-empty list of numbers in \(0, 10\]"),
        ({"eta": 1}, "eta must be an integer >= 2, got 1"),
        ({"min_examples": 0}, "min_examples must be >= 1"),
        ({"method": "regmean"}, "needs the tasks' feature statistics"),
        ({"method": "bogus"}, "bogus"),
    ],
)
def test_search_rejects(engine, kwargs, message) -> None:
    settings = {"method": "task_arithmetic", "lambdas": [0.5, 1.0], **kwargs}
    with pytest.raises(ValueError, match=message):
        search_best(engine, settings.pop("method"), settings.pop("lambdas"), single={"sentiment": 1, "topic": 1},
                    **settings)


def test_search_draws_its_shares_from_the_seed(engine) -> None:
    single = engine.single_task_scores()
    a = search_best(engine, "task_arithmetic", LAMBDAS, single=single, seed=3)
    b = search_best(engine, "task_arithmetic", LAMBDAS, single=single, seed=3)
    np.testing.assert_array_equal(a.trace["normalized_avg"], b.trace["normalized_avg"])
