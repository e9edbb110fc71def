"""Tests for the synthetic demo tasks in :mod:`osrm_core.demo`."""

from __future__ import annotations

import time

import numpy as np
import pytest

from osrm_core.data import TaskData
from osrm_core.demo import DEMO_TASKS, demo_task, demo_tasks

KEYS = ("sentiment", "topic", "question", "paraphrase")
SINGLE = ("sentiment", "topic", "question")


@pytest.fixture(scope="module")
def tasks() -> dict[str, TaskData]:
    return {task.name: task for task in demo_tasks()}


def test_keys_order_and_metadata(tasks: dict[str, TaskData]) -> None:
    assert tuple(DEMO_TASKS) == KEYS
    assert [t.name for t in demo_tasks(n_train=20, n_test=20)] == list(KEYS)
    for key, task in tasks.items():
        assert task.description == DEMO_TASKS[key]
        assert task.metric == ("mcc" if key == "paraphrase" else "accuracy")
    assert tasks["sentiment"].label_names == ["negative", "positive"]
    assert tasks["topic"].num_labels == 4
    assert 5 <= tasks["question"].num_labels <= 6
    assert tasks["paraphrase"].num_labels == 2


def test_same_seed_same_data() -> None:
    for key in KEYS:
        a, b = demo_task(key, seed=3), demo_task(key, seed=3)
        for split_a, split_b in ((a.train, b.train), (a.test, b.test)):
            assert split_a.text == split_b.text
            assert split_a.text_pair == split_b.text_pair
            np.testing.assert_array_equal(split_a.label, split_b.label)


def test_different_seed_different_data() -> None:
    for key in KEYS:
        a, b = demo_task(key, seed=0), demo_task(key, seed=1)
        assert a.train.text != b.train.text
        assert a.test.text != b.test.text
        assert not np.array_equal(a.train.label, b.train.label)


def test_generation_leaves_global_random_state_alone() -> None:
    np.random.seed(123)
    expected = np.random.random()
    np.random.seed(123)
    demo_task("topic", n_train=50, n_test=20)
    assert np.random.random() == expected


def test_default_sizes(tasks: dict[str, TaskData]) -> None:
    for task in tasks.values():
        assert len(task.train) >= 1000
        assert len(task.test) >= 300


def test_custom_sizes() -> None:
    task = demo_task("question", n_train=37, n_test=10)
    assert (len(task.train), len(task.test)) == (37, 10)


def test_labels_balanced(tasks: dict[str, TaskData]) -> None:
    for task in tasks.values():
        for split in (task.train, task.test):
            share = np.bincount(split.label, minlength=task.num_labels) / len(split)
            assert np.all(np.abs(share - 1 / task.num_labels) <= 0.02), (task.name, share)


def test_only_paraphrase_has_pairs(tasks: dict[str, TaskData]) -> None:
    for key, task in tasks.items():
        assert task.is_pair == (key == "paraphrase")
        for split in (task.train, task.test):
            if key == "paraphrase":
                assert len(split.text_pair) == len(split.text)
                assert all(isinstance(s, str) and s for s in split.text_pair)
            else:
                assert split.text_pair is None


def test_texts_varied_and_test_mostly_unseen(tasks: dict[str, TaskData]) -> None:
    for task in tasks.values():
        assert len(set(task.train.text)) > 0.95 * len(task.train), task.name
        train = set(task.train.text)
        seen = sum(text in train for text in task.test.text)
        assert seen < 0.05 * len(task.test), task.name


def test_text_lengths(tasks: dict[str, TaskData]) -> None:
    for task in tasks.values():
        texts = task.train.text + task.test.text + (task.train.text_pair or [])
        words = [len(text.split()) for text in texts]
        assert 5 <= min(words) and max(words) <= 35, (task.name, min(words), max(words))
        assert max(words) - min(words) >= 8, task.name


def test_paraphrase_pairs_mix_same_and_changed(tasks: dict[str, TaskData]) -> None:
    split = tasks["paraphrase"].train
    identical = np.array([a == b for a, b in zip(split.text, split.text_pair, strict=True)])
    # Most pairs are worded differently, positives included.
    assert identical.mean() < 0.5
    # A negative is identical only when label noise gave it a positive's text.
    assert identical[split.label == 0].mean() < 0.05


def test_generation_is_fast() -> None:
    start = time.perf_counter()
    demo_tasks(seed=7)
    elapsed = time.perf_counter() - start
    print(f"\ngenerated all demo tasks in {elapsed:.3f} s")
    assert elapsed < 1.0


def test_unknown_key() -> None:
    with pytest.raises(ValueError, match=r"unknown demo task 'mnli'.*sentiment, topic, question"):
        demo_task("mnli")


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"n_train": 9}, r"n_train must be in \[10, 100000\], got 9"),
        ({"n_test": 0}, r"n_test must be in \[10, 100000\], got 0"),
        ({"n_test": -5}, r"n_test must be in \[10, "),
        ({"n_train": 10**6}, r"n_train must be in \[10, 100000\]"),
        ({"seed": -1}, r"seed must be a non-negative integer"),
    ],
)
def test_bad_arguments(kwargs: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        demo_task("sentiment", **kwargs)
    with pytest.raises(ValueError, match=pattern):
        demo_tasks(**kwargs)


def test_non_integer_size() -> None:
    with pytest.raises(TypeError, match=r"n_train must be an integer"):
        demo_task("topic", n_train=100.0)


@pytest.mark.parametrize("key", SINGLE)
def test_bag_of_words_learnable_but_not_trivial(tasks: dict[str, TaskData], key: str) -> None:
    pytest.importorskip("sklearn")
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression

    task = tasks[key]
    vectorizer = CountVectorizer()
    features = vectorizer.fit_transform(task.train.text)
    model = LogisticRegression(max_iter=2000).fit(features, task.train.label)
    accuracy = model.score(vectorizer.transform(task.test.text), task.test.label)
    chance = 1 / task.num_labels
    print(f"\nbag-of-words accuracy on {key}: {accuracy:.3f} (chance {chance:.3f})")
    assert chance + 0.15 < accuracy < 0.99
