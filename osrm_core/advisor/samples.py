"""Where the advisor's sample texts come from, their stratified split into a validation and a
held-out share, and the 95% intervals of the held-out scores."""

from __future__ import annotations

import math
import warnings

import numpy as np

from osrm_core.data import Split, TaskData
from osrm_core.errors import OsrmInputError
from osrm_core.evaluate import score

#: z of a two-sided 95% interval.
Z95 = 1.959964


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``successes / n`` (95% by default)."""
    if n <= 0:
        raise OsrmInputError(f"n must be positive, got {n}")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def score_interval(
    metric: str, y_true: np.ndarray, y_pred: np.ndarray, *, seed: int = 0, resamples: int = 200
) -> tuple[float, float]:
    """95% interval of a task's metric: Wilson for accuracy, a seeded percentile bootstrap for
    Matthews correlation and F1 (no closed form from the sample count alone)."""
    n = len(y_true)
    if metric == "accuracy":
        return wilson_interval(int((y_true == y_pred).sum()), n)
    rng = np.random.default_rng(seed)
    draws = [score(metric, y_true[idx], y_pred[idx]) for idx in rng.integers(0, n, size=(resamples, n))]
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return float(lo), float(hi)


def loss_interval(total: np.ndarray, units: np.ndarray, *, seed: int = 0, resamples: int = 200) -> tuple[float, float]:
    """95% percentile-bootstrap interval of a mean loss ``sum(total) / sum(units)`` over examples
    (e.g. the token losses of each text, :func:`osrm_core.evaluate.example_losses`)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(total), size=(resamples, len(total)))
    draws = total[idx].sum(1) / np.maximum(units[idx].sum(1), 1)
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return float(lo), float(hi)


def sample_pool(task: TaskData, *, use_train: bool = False) -> tuple[Split, str]:
    """The texts the advisor may score a task's adapter on, and where they came from.

    A task whose source gave a test split of its own (a folder's ``test.csv``, a dataset's test
    split, the demo tasks) contributes that split alone: its training texts are what the adapter
    may have been fine-tuned on, and a test text that is also a training text is left out.
    ``use_train`` adds them anyway (the user's call; a warning says so). Sample texts (train and test the same texts) and a single file (split here) are pooled
    whole. Exact duplicates (text and pair) are kept once, so no text can land in both shares.

    Returns
    -------
    (Split, str)
        The pool, and its origin: ``"test"`` for a source's test split, ``"train+test"`` with
        ``use_train``, else the task's source (a file name, ``upload``, ``sample texts``).
    """
    a, b = task.train, task.test
    same = a is b or (a.text == b.text and a.text_pair == b.text_pair)
    if same:
        pool, origin = b, task.source or "sample texts"
    elif task.drawn_test or use_train:
        if use_train and not task.drawn_test:
            warnings.warn(f"task {task.name!r}: the advisor scores on its training texts too (use_train); "
                          "an adapter trained on them looks better than it is", stacklevel=3)
        pair = None if a.text_pair is None else a.text_pair + b.text_pair
        label = None if a.label is None else np.concatenate([a.label, b.label])
        pool = Split(a.text + b.text, label, pair)
        origin = (task.source or "sample texts") if task.drawn_test else "train+test"
    else:
        pool, origin = b, "test"
    seen: set = set(_pairs(a)) if origin == "test" else set()  # a test text also in train: seen in training
    keep = []
    for i, key in enumerate(_pairs(pool)):
        if key not in seen:
            seen.add(key)
            keep.append(i)
    if len(keep) < len(pool.text):
        pool = _subset(pool, np.asarray(keep))
    return pool, origin


def _pairs(split: Split):
    """(text, text_pair) of each sample: what makes two samples the same."""
    return zip(split.text, split.text_pair or [None] * len(split.text))


def _subset(split: Split, idx: np.ndarray) -> Split:
    pair = None if split.text_pair is None else [split.text_pair[i] for i in idx]
    return Split([split.text[i] for i in idx], None if split.label is None else split.label[idx], pair)


def split_samples(
    task: TaskData, holdout: float = 0.5, *, max_samples: int | None = None, seed: int = 0,
    use_train: bool = False,
) -> tuple[TaskData, TaskData, dict]:
    """Stratified, seeded split of a task's sample pool (:func:`sample_pool`) into a validation
    and a held-out share.

    Every class with at least two samples puts at least one in each share. Returns the two
    shares as tasks (train = test = the share) and what was split: ``{"split": origin,
    "validation": indices, "heldout": indices}``, indices into the pool.
    """
    if not 0 < holdout < 1:
        raise OsrmInputError(f"holdout is {holdout}; it must be in (0, 1)")
    pooled, origin = sample_pool(task, use_train=use_train)
    rng = np.random.default_rng(seed)
    idx = np.arange(len(pooled))
    if max_samples is not None and max_samples < len(idx):
        idx = np.sort(rng.choice(idx, size=max_samples, replace=False))
    strata = pooled.label if task.labeled else np.zeros(len(pooled), dtype=np.int64)  # texts: one stratum
    val, held = [], []
    for label in np.unique(strata[idx]):
        members = rng.permutation(idx[strata[idx] == label])
        k = int(round(holdout * len(members)))
        if len(members) >= 2:
            k = min(max(k, 1), len(members) - 1)
        held += members[:k].tolist()
        val += members[k:].tolist()
    shares = []
    for name, chosen in (("validation", sorted(val)), ("held-out", sorted(held))):
        if len(chosen) < 2 or (task.labeled and np.unique(strata[chosen]).size < 2):
            raise OsrmInputError(
                f"task {task.name!r}: the {name} share has {len(chosen)} samples of "
                f"{np.unique(strata[chosen]).size} class(es) (from its {origin} texts); give at least 2 samples"
                + (" of each of 2 classes" if task.labeled else " in each share (4 texts or more)")
            )
        part = _subset(pooled, np.asarray(chosen))
        shares.append(TaskData(task.name, part, part, task.label_names, task.metric, source=origin))
    return shares[0], shares[1], {"split": origin, "validation": sorted(val), "heldout": sorted(held)}
