"""Evaluation: per-task metrics, and the merge sweep engine.

The sweep engine holds one loaded base model. For each grid point it writes
``W0 + Delta_W_merged`` into the adapted layers in place, swaps in each task's own head and
runs that task's test set: no model is reloaded and no PEFT model is rebuilt per point.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef
from torch import nn

from osrm_core.adapters import Adapter
from osrm_core.batching import iter_batches, move_batch
from osrm_core.data import Split, TaskData
from osrm_core.models import decoder_position_ids, head_module_names, weight_as_linear
from osrm_core.stats import FeatureStats

Progress = Callable[[int, int, str], None]


def score(metric: str, y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Accuracy, Matthews correlation, or F1 (binary: of class 1; multi-class: macro)."""
    if metric == "accuracy":
        return float(accuracy_score(y_true, y_pred))
    if metric == "mcc":
        return float(matthews_corrcoef(y_true, y_pred))
    if metric == "f1":
        binary = max(int(np.max(y_true)), int(np.max(y_pred))) <= 1
        return float(f1_score(y_true, y_pred, average="binary" if binary else "macro", zero_division=0))
    raise ValueError(f"metric {metric!r} is unknown: allowed are accuracy, mcc, f1")


@torch.no_grad()
def predict(
    model: nn.Module,
    tokenizer,
    split: Split,
    *,
    batch_size: int = 64,
    max_length: int = 128,
    batches: list[dict[str, torch.Tensor]] | None = None,
    order: np.ndarray | None = None,
) -> np.ndarray:
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


def evaluate_model(
    model: nn.Module,
    tokenizer,
    task: TaskData,
    *,
    batch_size: int = 64,
    max_length: int = 128,
    max_test: int | None = None,
) -> float:
    """The task's metric on its test split (first ``max_test`` examples)."""
    was_training = model.training
    model.eval()
    test = task.test.head(max_test)
    try:
        pred = predict(model, tokenizer, test, batch_size=batch_size, max_length=max_length)
    finally:
        model.train(was_training)
    return score(task.metric, test.label, pred)


# --------------------------------------------------------------------------- sweep engine


@dataclass
class _TaskEval:
    task: TaskData
    test: Split
    batches: list[dict[str, torch.Tensor]]
    order: np.ndarray
    heads: dict[str, nn.Module]


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
        Each task's fine-tuned adapter (for its head and its single-task delta).
    max_test : int, optional
        Test examples per task.
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
    ) -> None:
        missing = [t.name for t in tasks if t.name not in adapters]
        if missing:
            raise ValueError(f"no adapter for task {missing[0]!r}")
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.adapters = adapters
        layer_names = sorted(next(iter(adapters.values())).layers)
        for name, ad in adapters.items():
            if sorted(ad.layers) != layer_names:
                raise ValueError(f"adapter {name!r} adapts other layers than the first adapter")
        self.layers = {n: model.get_submodule(n) for n in layer_names}
        self.w0 = {n: weight_as_linear(m).detach().clone() for n, m in self.layers.items()}
        self.head_names = head_module_names(model)
        self.original_heads = {h: getattr(model, h) for h in self.head_names}
        self.tasks: dict[str, _TaskEval] = {}
        for task in tasks:
            test = task.test.head(max_test)
            batches, order = tokenize_for_eval(tokenizer, test, batch_size, max_length)
            self.tasks[task.name] = _TaskEval(task, test, batches, order, self._heads(adapters[task.name]))
        self.forward_seconds = 0.0

    def _heads(self, adapter: Adapter) -> dict[str, nn.Module]:
        heads = {}
        for h in self.head_names:
            module = copy.deepcopy(self.original_heads[h])
            for key, tensor in adapter.head.items():
                if key.startswith(h + "."):
                    owner_name, _, pname = key[len(h) + 1 :].rpartition(".")
                    owner = module.get_submodule(owner_name) if owner_name else module
                    setattr(owner, pname, nn.Parameter(tensor.to(self.device), requires_grad=False))
            heads[h] = module.to(self.device).eval()
        return heads

    @torch.no_grad()
    def apply(self, deltas: dict[str, torch.Tensor] | None, lam: float = 1.0) -> None:
        """Set each adapted layer's weight to ``W0 + lam * delta`` (``W0`` without deltas)."""
        for name, module in self.layers.items():
            w = weight_as_linear(module)
            if deltas is None:
                w.copy_(self.w0[name])
            else:
                w.copy_(self.w0[name] + lam * deltas[name].to(w.device, w.dtype))

    def restore(self) -> None:
        """Put the base weights and heads back."""
        self.apply(None)
        for h, module in self.original_heads.items():
            setattr(self.model, h, module)

    def predictions(self, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Each task's predicted labels on the model as it is now, with that task's head."""
        out = {}
        for name in names or list(self.tasks):
            te = self.tasks[name]
            for h, module in te.heads.items():
                setattr(self.model, h, module)
            start = time.perf_counter()
            out[name] = predict(self.model, None, te.test, batches=te.batches, order=te.order)
            self.forward_seconds += time.perf_counter() - start
        return out

    def evaluate(self, names: Sequence[str] | None = None) -> dict[str, float]:
        """Each task's metric on the model as it is now, with that task's head."""
        return {
            name: score(self.tasks[name].task.metric, self.tasks[name].test.label, pred)
            for name, pred in self.predictions(names).items()
        }

    def single_task_scores(self) -> dict[str, float]:
        """Each task with only its own adapter (the reference for normalized scores)."""
        out = {}
        for name in self.tasks:
            self.apply(self.adapters[name].deltas())
            out.update(self.evaluate([name]))
        self.apply(None)
        return out

    def sweep(
        self,
        methods: Sequence[str],
        lambdas: Sequence[float],
        *,
        densities: Sequence[float] = (0.5,),
        stats: dict[str, FeatureStats] | None = None,
        single: dict[str, float] | None = None,
        seed: int = 0,
        progress: Progress | None = None,
    ) -> pd.DataFrame:
        """Merged scores over methods, densities (where a method uses one) and ``lambdas``.

        The merge is computed once per (method, density); ``lambda`` only scales it.

        Returns
        -------
        DataFrame with columns ``method, density, lambda, task, score, single, normalized``.
        """
        from osrm_core.merge import get_merge_method, merge_deltas

        if not lambdas:
            raise ValueError("lambdas is empty")
        bad = [x for x in lambdas if not 0 < x <= 10]
        if bad:
            raise ValueError(f"lambda {bad[0]} is not allowed: lambdas must be in (0, 10]")
        single = single or self.single_task_scores()
        names = list(self.tasks)
        deltas = [self.adapters[n].deltas() for n in names]
        grams = None
        if stats is not None:
            grams = [{layer: stats[n].layers[layer].gram for layer in self.layers} for n in names]
        plan = []
        for method in methods:
            params: dict = {}
            cls = get_merge_method(method)
            if cls.needs_gram and grams is None:
                raise ValueError(f"merge method {method!r} needs the tasks' feature statistics")
            for density in densities if cls.uses_density else [None]:
                plan.append((method, density, params))
        total, done, rows = len(plan) * len(lambdas), 0, []
        for method, density, params in plan:
            if density is not None:
                params = {**params, "density": density}
            merged = merge_deltas(deltas, method, lam=1.0, grams=grams, seed=seed, **params)
            for lam in lambdas:
                self.apply(merged, lam)
                scores = self.evaluate()
                for n in names:
                    ref = single[n]
                    rows.append(
                        {
                            "method": method,
                            "density": density,
                            "lambda": float(lam),
                            "task": n,
                            "score": scores[n],
                            "single": ref,
                            "normalized": scores[n] / ref if ref > 0 else float("nan"),
                        }
                    )
                done += 1
                if progress:
                    progress(done, total, f"sweep {method} lambda={lam:g}")
        self.apply(None)
        return pd.DataFrame(rows)


def best_points(sweep: pd.DataFrame) -> pd.DataFrame:
    """Per method, the (density, lambda) with the best normalized average over tasks."""
    avg = (
        sweep.groupby(["method", "density", "lambda"], dropna=False)["normalized"]
        .mean()
        .reset_index(name="normalized_avg")
    )
    idx = avg.groupby("method")["normalized_avg"].idxmax()
    return avg.loc[idx].reset_index(drop=True)
