"""Evaluation: per-task metrics, and the merge sweep engine.

The sweep engine holds one loaded base model. For each grid point it writes
``W0 + Delta_W_merged`` into the adapted layers in place, swaps in each task's own head and
runs that task's test set: no model is reloaded and no PEFT model is rebuilt per point.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from osrm_core.adapters import Adapter, union_layers
from osrm_core.batching import iter_batches, move_batch
from osrm_core.data import Split, TaskData
from osrm_core.embed_cache import EmbeddingCache
from osrm_core.errors import OsrmInputError
from osrm_core.inplace import AppliedDeltas
from osrm_core.models import decoder_position_ids, is_causal_lm
from osrm_core.stats import FeatureStats

Progress = Callable[[int, int, str], None]


#: Metrics where a lower value is better; their normalized score is merged / single all the same.
LOWER_IS_BETTER = frozenset({"loss"})


def score(metric: str, y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Accuracy, Matthews correlation, or F1 (binary: of class 1; multi-class: macro)."""
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef  # a slow import, when scoring

    if metric == "accuracy":
        return float(accuracy_score(y_true, y_pred))
    if metric == "mcc":
        return float(matthews_corrcoef(y_true, y_pred))
    if metric == "f1":
        binary = max(int(np.max(y_true)), int(np.max(y_pred))) <= 1
        return float(f1_score(y_true, y_pred, average="binary" if binary else "macro", zero_division=0))
    raise OsrmInputError(f"metric {metric!r} is unknown: allowed are accuracy, mcc, f1, loss")


def task_metric(task: TaskData, model: nn.Module) -> str:
    """How ``task`` is scored on ``model``: a causal LM by its mean token loss, a classifier by
    the task's metric (which needs labels)."""
    if is_causal_lm(model):
        return "loss"
    if not task.labeled:
        raise OsrmInputError(
            f"task {task.name!r} has no labels, so a classifier cannot be scored on it; give labelled "
            "data, or adapters of a causal LM (scored by the token loss of plain texts)"
        )
    return task.metric


@torch.no_grad()
def example_losses(
    model: nn.Module, split: Split, batches: list[dict[str, torch.Tensor]], order: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per example of ``split`` (in the split's order): the summed loss and the number of units
    it sums over. A causal LM: next-token cross-entropy over the real tokens of the text; a
    classifier: the cross-entropy of the label (one unit)."""
    device = next(model.parameters()).device
    causal = is_causal_lm(model)
    sums, counts, seen = [], [], 0
    for batch in batches:
        logits = model(**move_batch(decoder_position_ids(batch, model), device)).logits
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # half -> float32, float64 kept
        if causal:
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device).bool()
            valid = mask[:, 1:] & mask[:, :-1]
            nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none") * valid
            sums.append(nll.sum(1).cpu())
            counts.append(valid.sum(1).cpu())
        else:
            labels = torch.as_tensor(split.label[order[seen : seen + len(logits)]], device=device)
            sums.append(F.cross_entropy(logits, labels, reduction="none").cpu())
            counts.append(torch.ones(len(labels), dtype=torch.long))
        seen += len(batch["input_ids"])
    total, units = np.empty(len(order)), np.empty(len(order), dtype=np.int64)
    total[order], units[order] = torch.cat(sums).double().numpy(), torch.cat(counts).numpy()
    return total, units


def mean_loss(model: nn.Module, split: Split, batches: list[dict[str, torch.Tensor]], order: np.ndarray) -> float:
    """Mean loss per token (causal LM: next-token cross-entropy over real tokens) or per example
    (classifier: cross-entropy of the label), over all of ``batches`` (see :func:`example_losses`)."""
    total, units = example_losses(model, split, batches, order)
    if units.sum() == 0:
        raise OsrmInputError("no tokens to score: every text is one token or empty")
    return float(total.sum() / units.sum())


def split_score(
    model: nn.Module, metric: str, split: Split, batches: list[dict[str, torch.Tensor]], order: np.ndarray
) -> float:
    """The one place a task is scored: ``metric`` of ``model`` on ``split`` (tokenized as
    ``batches`` in ``order``, see :func:`tokenize_for_eval`)."""
    if metric == "loss":
        return mean_loss(model, split, batches, order)
    return score(metric, split.label, predict(model, None, split, batches=batches, order=order))


@torch.no_grad()
def predict(model: nn.Module, tokenizer, split: Split, *, batch_size: int = 64, max_length: int = 128,
            batches: list[dict[str, torch.Tensor]] | None = None, order: np.ndarray | None = None) -> np.ndarray:
    """Predicted labels for every example of ``split`` (in the split's order)."""
    device = next(model.parameters()).device
    if batches is None:
        batches, order = tokenize_for_eval(tokenizer, split, batch_size, max_length)
    preds = []
    for batch in batches:
        preds.append(model(**move_batch(decoder_position_ids(batch, model), device)).logits.argmax(-1).cpu())
    out = np.empty(len(order), dtype=np.int64)
    out[order] = torch.cat(preds).numpy()
    return out


def tokenize_for_eval(
    tokenizer, split: Split, batch_size: int, max_length: int
) -> tuple[list[dict[str, torch.Tensor]], np.ndarray]:
    """Batches sorted by length (less padding) and the example order they follow."""
    from osrm_core.batching import length_order

    idx = np.arange(len(split))
    order = idx[length_order(tokenizer, split, idx, max_length)]
    batches = list(
        iter_batches(
            tokenizer, split, batch_size=batch_size, max_length=max_length, indices=order, with_labels=False
        )
    )
    return batches, order


def evaluate_model(model: nn.Module, tokenizer, task: TaskData, *, batch_size: int = 64, max_length: int = 128,
                   max_test: int | None = None) -> float:
    """The task's metric on its test split (first ``max_test`` examples), see :func:`task_metric`."""
    was_training = model.training
    model.eval()
    test = task.test.head(max_test)
    metric = task_metric(task, model)
    try:
        batches, order = tokenize_for_eval(tokenizer, test, batch_size, max_length)
        return split_score(model, metric, test, batches, order)
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------- sweep engine


@dataclass
class _TaskEval:
    task: TaskData
    metric: str
    test: Split
    batches: list[dict[str, torch.Tensor]]
    order: np.ndarray
    params: dict[str, nn.Parameter]


class SweepEngine:
    """Evaluate merged deltas on one in-place model, each task with its own head.

    Parameters
    ----------
    model : nn.Module
        A base model (not a PEFT model); its adapted layers are overwritten during a sweep and
        restored by :meth:`restore`.
    tokenizer
    tasks : list of TaskData
    adapters : dict of task name to Adapter
        Each task's fine-tuned adapter (for its head and its single-task delta). Adapters may
        cover different layers: the engine works on the union, zero where one has no weights.
        A task's head is every module its adapter trained in full (``modules_to_save``),
        swapped in while that task is scored.
    max_test : int, optional
        Test examples per task.
    cache_embeddings : bool
        Compute the embeddings' output of each test batch once per sweep when no adapter
        changes the embeddings (see :mod:`osrm_core.embed_cache`).
    base_from : SweepEngine, optional
        Another engine on the same model and adapters, with which this one shares what is
        applied to the model and the adapters' factors (the advisor scores two shares of the
        texts, alternating).

    Memory: each adapter's LoRA factors. A delta given as :class:`osrm_core.merge.LoraFactors`
    (an adapter alone, a core-space merge) is applied as forward hooks, without a copy of the
    base weights; a dense delta (a full-space merge) is written into the weights, the changed
    layers' base weights saved meanwhile (:class:`osrm_core.inplace.AppliedDeltas`).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        tasks: Sequence[TaskData],
        adapters: dict[str, Adapter],
        *,
        max_test: int | None = None,
        batch_size: int = 64,
        max_length: int = 128,
        cache_embeddings: bool = True,
        base_from: SweepEngine | None = None,
    ) -> None:
        from osrm_core.export import aligned_factors

        missing = [t.name for t in tasks if t.name not in adapters]
        if missing:
            raise OsrmInputError(f"no adapter for task {missing[0]!r}")
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.adapters = adapters
        self.layers = {n: model.get_submodule(n) for n in union_layers(adapters)}
        if base_from is None:
            self.applied = AppliedDeltas(self.layers)
            self.single = dict(zip(adapters, aligned_factors(adapters), strict=True))
        elif base_from.model is model and base_from.adapters is adapters:
            self.applied, self.single = base_from.applied, base_from.single
        else:
            raise OsrmInputError("base_from must be an engine on the same model and adapters")
        self.original_params = {
            key: model.get_parameter(key) for ad in adapters.values() for key in ad.head
        }
        self.tokenizer, self.batch_size, self.max_length = tokenizer, batch_size, max_length
        self.tasks: dict[str, _TaskEval] = {}
        for task in tasks:
            test = task.test.head(max_test)
            batches, order = tokenize_for_eval(tokenizer, test, batch_size, max_length)
            params = {
                key: nn.Parameter(t.to(self.device, self.original_params[key].dtype), requires_grad=False)
                for key, t in adapters[task.name].head.items()
            }
            self.tasks[task.name] = _TaskEval(task, task_metric(task, model), test, batches, order, params)
        self.forward_seconds = 0.0
        changed = [*self.layers, *self.original_params]  # no replay if an adapter changes the embeddings
        self.embeddings = EmbeddingCache(model, changed) if cache_embeddings else None

    def _set_params(self, params: dict[str, nn.Parameter]) -> None:
        """Put a task's head (and other fully trained modules) in place; the base model's elsewhere."""
        for key, original in self.original_params.items():
            owner_name, _, pname = key.rpartition(".")
            owner = self.model.get_submodule(owner_name) if owner_name else self.model
            setattr(owner, pname, params.get(key, original))

    def apply(self, deltas: dict | None, lam: float = 1.0) -> None:
        """Apply ``lam * delta`` at each adapted layer (``None``: the base model); a delta is a
        (d_out, d_in) tensor or :class:`osrm_core.merge.LoraFactors`, see
        :meth:`osrm_core.inplace.AppliedDeltas.set`."""
        self.applied.set(deltas, lam)

    def restore(self) -> None:
        """Put the base weights and heads back."""
        self.apply(None)
        self._set_params({})

    def evaluate(self, names: Sequence[str] | None = None) -> dict[str, float]:
        """Each task's score (:func:`split_score`) on the model as it is now, with its own head."""
        out = {}
        for name in names or list(self.tasks):
            te = self.tasks[name]
            with self._task_forward(name, te.batches):
                out[name] = split_score(self.model, te.metric, te.test, te.batches, te.order)
        return out

    def predictions(self, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Each task's predicted labels on its test examples, on the model as it is now."""
        return {name: self.predict(name, self.tasks[name].batches, self.tasks[name].order)
                for name in names or list(self.tasks)}

    def predict(self, name: str, batches: list[dict[str, torch.Tensor]], order: np.ndarray) -> np.ndarray:
        """Task ``name``'s predicted labels for ``batches`` (see :func:`tokenize_for_eval`) on the
        model as it is now, with that task's head."""
        with self._task_forward(name, batches):
            return predict(self.model, None, self.tasks[name].test, batches=batches, order=order)

    def example_losses(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Task ``name``'s per-example summed loss and unit count (:func:`example_losses`) on
        its test examples, on the model as it is now."""
        te = self.tasks[name]
        with self._task_forward(name, te.batches):
            return example_losses(self.model, te.test, te.batches, te.order)

    @contextlib.contextmanager
    def _task_forward(self, name: str, batches: list[dict[str, torch.Tensor]]):
        """Forward passes of task ``name`` over ``batches``: its head in place, the embeddings'
        outputs replayed (:mod:`osrm_core.embed_cache`), the time counted in ``forward_seconds``."""
        self._set_params(self.tasks[name].params)
        start = time.perf_counter()
        try:
            with self.embeddings.replay(batches) if self.embeddings else contextlib.nullcontext():
                yield
        finally:
            self.forward_seconds += time.perf_counter() - start

    def single_task_scores(self) -> dict[str, float]:
        """Each task with only its own adapter (the reference for normalized scores)."""
        out = {}
        for name in self.tasks:
            self.apply(self.single[name])
            out.update(self.evaluate([name]))
        self.apply(None)
        return out

    def sweep(
        self,
        methods: Sequence[str],
        lambdas: Sequence[float],
        *,
        densities: Sequence[float] = (0.5,),
        params: Mapping[str, Sequence] | None = None,
        stats: dict[str, FeatureStats] | None = None,
        single: dict[str, float] | None = None,
        seed: int = 0,
        weights: Sequence[float] | None = None,
        space: str = "full",
        progress: Progress | None = None,
    ) -> pd.DataFrame:
        """Merged scores over methods, their parameters and ``lambdas``.

        Each method runs every combination of its own parameters' values: ``densities`` for
        ``density`` and ``params`` (parameter name -> values, e.g. ``{"alpha": [0.5, 0.9]}``)
        for the others; a parameter not given keeps its default. The merge is computed once per
        (method, parameters); ``lambda`` only scales it. ``weights`` (one per task, >= 0) are
        the methods' per-task weights; ``space="core"`` merges the LoRA factors in core space.

        Returns
        -------
        DataFrame with columns ``method, density, <each parameter of params>, lambda, task,
        metric, score, single, normalized`` (and ``perplexity`` where a task is scored by loss,
        see :func:`score_columns`; a parameter a method does not have is empty).
        """
        from osrm_core.merge import get_merge_method, merge_deltas

        if not lambdas:
            raise OsrmInputError("lambdas is empty")
        bad = [x for x in lambdas if not 0 < x <= 10]
        if bad:
            raise OsrmInputError(f"lambda {bad[0]} is not allowed: lambdas must be in (0, 10]")
        from osrm_core.export import merge_inputs

        single = single or self.single_task_scores()
        names = list(self.tasks)
        if space == "core":  # the factors: no dense delta (core space refuses methods that need Gram matrices)
            deltas, grams = [self.single[n] for n in names], None
        else:
            deltas, grams = merge_inputs({n: self.adapters[n] for n in names}, stats)
        grid = {"density": list(densities), **(params or {})}
        plan = []
        for method in methods:
            cls = get_merge_method(method)
            if cls.needs_gram and grams is None and space != "core":
                raise OsrmInputError(f"merge method {method!r} needs the tasks' feature statistics")
            own = [p.name for p in cls.param_specs() if p.name in grid]
            for values in itertools.product(*(grid[name] for name in own)):
                plan.append((method, dict(zip(own, values))))
        columns = dict.fromkeys(grid)
        total, done, rows = len(plan) * len(lambdas), 0, []
        for method, chosen in plan:
            merged = merge_deltas(deltas, method, lam=1.0, grams=grams, seed=seed, weights=weights, space=space,
                                  **chosen)
            for lam in lambdas:
                self.apply(merged, lam)
                scores = self.evaluate()
                for n in names:
                    rows.append(
                        {"method": method, **columns, **chosen, "lambda": float(lam), "task": n,
                         **score_columns(self.tasks[n].metric, scores[n], single[n])}
                    )
                done += 1
                if progress:
                    progress(done, total, f"sweep {method} lambda={lam:g}")
        self.apply(None)
        return pd.DataFrame(rows)


def param_columns(sweep: pd.DataFrame) -> list[str]:
    """The merge-parameter columns of a sweep table (``density`` and any swept parameter)."""
    from osrm_core.merge import all_param_specs

    return [c for c in all_param_specs() if c in sweep.columns]


def score_columns(metric: str, merged: float, single: float) -> dict:
    """A result row's score columns: ``metric, score, single, normalized`` (merged / single,
    for a loss too, where lower is better) and, for a loss, the ``perplexity`` ``exp(loss)``."""
    row = {
        "metric": metric,
        "score": merged,
        "single": single,
        "normalized": merged / single if single > 0 else float("nan"),
    }
    if metric in LOWER_IS_BETTER:
        row["perplexity"] = math.exp(min(merged, 700.0))
    return row


def best_points(sweep: pd.DataFrame) -> pd.DataFrame:
    """Per method, the (parameters, lambda) with the best normalized average over tasks: the
    highest, or the lowest where every task is scored by a loss. Tasks scored by a loss and by
    a classification metric cannot be averaged together (ValueError)."""
    lower = _lower_is_better(sweep)
    avg = (
        sweep.groupby(["method", *param_columns(sweep), "lambda"], dropna=False)["normalized"]
        .mean()
        .reset_index(name="normalized_avg")
    )
    grouped = avg.groupby("method")["normalized_avg"]
    idx = grouped.idxmin() if lower else grouped.idxmax()
    return avg.loc[idx].reset_index(drop=True)


def _lower_is_better(results: pd.DataFrame) -> bool:
    if "metric" not in results.columns:
        return False
    kinds = {m in LOWER_IS_BETTER for m in results["metric"].unique()}
    if len(kinds) > 1:
        raise OsrmInputError(
            "tasks scored by a loss (lower is better) and by accuracy/mcc/f1 cannot be averaged "
            "together; sweep them separately"
        )
    return kinds == {True}
