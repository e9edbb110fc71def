"""Adaptive search for a merge method's best lambda (and density): successive halving.

A full sweep runs every task's whole test set at every grid point. Most of those forward
passes go to points far from the peak, which a few examples already rule out. Successive
halving (Jamieson & Talwalkar, AISTATS 2016) scores every point on a small random share of
each task's test examples, keeps the best ``1/eta`` of the points, and grows the share by
``eta`` for them, until the survivors are scored on all examples. Predictions made on a share
are kept, so a survivor only runs the examples it has not seen: with 10 points and ``eta = 3``
the search runs about a third of the full grid's examples. The best point is chosen, as in
:func:`osrm_core.evaluate.best_points`, by the normalized score averaged over tasks, and its
figures are those of all test examples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from osrm_core.errors import OsrmInputError
from osrm_core.evaluate import LOWER_IS_BETTER, SweepEngine, score, tokenize_for_eval
from osrm_core.stats import FeatureStats


@dataclass
class SearchResult:
    """The best grid point found, and what the search cost.

    Attributes
    ----------
    method : str
    density : float or None
    lam : float
    normalized_avg : float
        Mean over tasks of merged / single-task score, on all test examples.
    scores : dict of task to float
        Merged scores on all test examples.
    trace : DataFrame
        ``round, share, density, lambda, normalized_avg`` of every point scored in every round.
    examples : int
        Test examples run through the model by the search (single-task scores excluded).
    grid_examples : int
        Test examples the full grid runs for the same points.
    """

    method: str
    density: float | None
    lam: float
    normalized_avg: float
    scores: dict[str, float]
    trace: pd.DataFrame
    examples: int
    grid_examples: int


def halving_shares(points: int, eta: int, smallest_test: int, min_examples: int) -> list[float]:
    """The shares of the test examples of each round: ``eta**-(R-1), ..., 1/eta, 1`` with
    ``R = ceil(log_eta(points))`` rounds, fewer if the first share would give the smallest test
    set fewer than ``min_examples`` examples."""
    rounds = max(1, math.ceil(math.log(points) / math.log(eta) - 1e-9)) if points > 1 else 1
    while rounds > 1 and smallest_test * eta ** -(rounds - 1) < min_examples:
        rounds -= 1
    return [float(eta ** -(rounds - 1 - r)) for r in range(rounds)]


def search_best(
    engine: SweepEngine,
    method: str,
    lambdas: Sequence[float],
    *,
    densities: Sequence[float] = (0.5,),
    stats: dict[str, FeatureStats] | None = None,
    single: dict[str, float] | None = None,
    seed: int = 0,
    eta: int = 3,
    min_examples: int = 8,
    method_params: dict | None = None,
) -> SearchResult:
    """Find the (density, lambda) of ``method`` with the best normalized average over tasks.

    Parameters
    ----------
    engine : SweepEngine
        Holds the model, the tasks' test sets, adapters and heads.
    lambdas, densities : sequences of float
        The grid (densities only for methods that use one).
    eta : int
        Each round keeps ``ceil(n / eta)`` of its ``n`` points and multiplies the share by ``eta``.
    min_examples : int
        Fewest test examples of the smallest task in the first round.
    seed : int
        Draws each task's order of test examples (and seeds DARE's dropping).
    """
    from osrm_core.export import merge_inputs
    from osrm_core.merge import get_merge_method, merge_deltas

    if not lambdas or any(not 0 < x <= 10 for x in lambdas):
        raise OsrmInputError(f"lambdas must be a non-empty list of numbers in (0, 10], got {list(lambdas)}")
    if not isinstance(eta, int) or eta < 2:
        raise OsrmInputError(f"eta must be an integer >= 2, got {eta!r}")
    if min_examples < 1:
        raise OsrmInputError(f"min_examples must be >= 1, got {min_examples}")
    params = dict(method_params or {})
    merge = get_merge_method(method, **params)
    if merge.needs_gram and stats is None:
        raise OsrmInputError(f"merge method {method!r} needs the tasks' feature statistics")
    loss_scored = [n for n, te in engine.tasks.items() if te.metric in LOWER_IS_BETTER]
    if loss_scored:
        raise OsrmInputError(f"task {loss_scored[0]!r} is scored by its loss; the adaptive search ranks points by "
                             "predicted labels (accuracy, mcc, f1): sweep the full grid instead")
    single = single or engine.single_task_scores()
    names = list(engine.tasks)
    deltas, grams = merge_inputs({n: engine.adapters[n] for n in names}, stats)
    grid_densities = list(densities) if merge.uses_density else [None]
    merged = {d: merge_deltas(deltas, method, lam=1.0, grams=grams, seed=seed,
                              **(params if d is None else {**params, "density": d})) for d in grid_densities}
    points = [(d, float(lam)) for d in grid_densities for lam in lambdas]
    sizes = {n: len(engine.tasks[n].test) for n in names}
    shares = halving_shares(len(points), eta, min(sizes.values()), min_examples)
    chunks = _chunks(engine, sizes, shares, seed)
    seen: dict[tuple, dict[str, list]] = {p: {n: [] for n in names} for p in points}
    alive, rows, examples = list(points), [], 0
    for r, share in enumerate(shares):
        results = []
        for point in alive:
            engine.apply(merged[point[0]], point[1])
            task_scores, examples = {}, examples + _predict_chunks(engine, chunks, seen[point], r)
            for n in names:
                labels = np.concatenate([x[0] for x in seen[point][n]])
                preds = np.concatenate([x[1] for x in seen[point][n]])
                task_scores[n] = score(engine.tasks[n].metric, labels, preds)
            norm = [task_scores[n] / single[n] if single[n] > 0 else float("nan") for n in names]
            avg = float(np.nanmean(norm)) if not np.all(np.isnan(norm)) else float("-inf")
            results.append((avg, point, task_scores))
            rows.append({"round": r, "share": share, "density": point[0], "lambda": point[1], "normalized_avg": avg})
        ranked = sorted(results, key=lambda x: -x[0])  # stable: ties keep grid order
        alive = [p for _, p, _ in ranked[: math.ceil(len(ranked) / eta)]] if r < len(shares) - 1 else alive
    engine.apply(None)
    best_avg, (density, lam), best_scores = ranked[0]
    return SearchResult(method, density, lam, best_avg, best_scores, pd.DataFrame(rows), examples,
                        len(points) * sum(sizes.values()))


def _chunks(engine: SweepEngine, sizes: dict[str, int], shares: list[float], seed: int) -> dict[str, list]:
    """Each task's test examples in a seeded random order, cut into one chunk per round and
    tokenized once: ``(labels, batches, order)``; a point scored on round r's share has run
    chunks 0..r."""
    rng = np.random.default_rng(seed)
    chunks: dict[str, list] = {}
    for n in engine.tasks:
        perm = rng.permutation(sizes[n])
        ends = [max(1, math.ceil(s * sizes[n])) for s in shares]
        starts = [0, *ends[:-1]]
        chunks[n] = []
        for a, b in zip(starts, ends, strict=True):
            part = engine.tasks[n].test.take(perm[a:b])
            batches, order = tokenize_for_eval(engine.tokenizer, part, engine.batch_size, engine.max_length)
            chunks[n].append((part.label, batches, order))
    return chunks


def _predict_chunks(engine: SweepEngine, chunks: dict[str, list], seen: dict[str, list], r: int) -> int:
    """Predict the chunks up to round ``r`` that the applied point has not run yet (appended
    to ``seen`` as (labels, predictions) per task); returns how many examples that ran."""
    examples = 0
    for n in engine.tasks:
        for label, batches, order in chunks[n][len(seen[n]) : r + 1]:
            seen[n].append((label, engine.predict(n, batches, order)))
            examples += len(label)
    return examples
