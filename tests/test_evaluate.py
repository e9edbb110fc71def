"""Tests of osrm_core.evaluate: metrics against sklearn, and the in-place sweep engine against
PEFT models and models whose weights were set by hand."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef
from torch import nn
from torch.testing import assert_close

from osrm_core.adapters import Adapter, LoraWeights
from osrm_core.batching import iter_batches
from osrm_core.demo import demo_task
from osrm_core.evaluate import SweepEngine, best_points, evaluate_model, predict, score
from osrm_core.export import merge_adapters, write_merged_adapter
from osrm_core.inits import init_lora
from osrm_core.merge import merge_deltas
from osrm_core.train import adapter_of

RANK = 2
MAX_LENGTH = 32


# --------------------------------------------------------------------------- metrics


@pytest.mark.parametrize("k", [2, 4])
def test_score_matches_sklearn(k) -> None:
    rng = np.random.default_rng(k)
    y_true, y_pred = rng.integers(0, k, 50), rng.integers(0, k, 50)
    assert score("accuracy", y_true, y_pred) == pytest.approx(accuracy_score(y_true, y_pred))
    assert score("mcc", y_true, y_pred) == pytest.approx(matthews_corrcoef(y_true, y_pred))
    average = "binary" if k == 2 else "macro"
    assert score("f1", y_true, y_pred) == pytest.approx(f1_score(y_true, y_pred, average=average))
    assert score("accuracy", y_true, y_true) == 1.0 and score("mcc", y_true, y_true) == pytest.approx(1.0)


def test_score_rejects_an_unknown_metric() -> None:
    with pytest.raises(ValueError, match="auc"):
        score("auc", np.array([0, 1]), np.array([0, 1]))


# --------------------------------------------------------------------------- sweep engine


@pytest.fixture(scope="module")
def sweep_tasks():
    """Two tasks with different head sizes: sentiment (2 labels) and topic (4 labels)."""
    return [demo_task("sentiment", n_train=10, n_test=24), demo_task("topic", n_train=10, n_test=24)]


def _peft_model(make_tiny_model, tokenizer, task, seed: int):
    """A LoRA model of ``task`` with random (non-zero) B and head, as if it had been trained."""
    model = init_lora(make_tiny_model(num_labels=task.num_labels), "standard", rank=RANK, alpha=4, seed=seed)
    gen = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)
            elif "classifier" in name and p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 10)
        # Centre the logits over the test set, so that predictions differ between examples.
        logits = _logits(model.eval(), tokenizer, task.test)
        model.get_base_model().classifier.modules_to_save["default"].bias -= logits.mean(0)
    return model


@pytest.fixture(scope="module")
def peft_models(make_tiny_model, tokenizer, sweep_tasks):
    return {t.name: _peft_model(make_tiny_model, tokenizer, t, seed) for seed, t in enumerate(sweep_tasks)}


@pytest.fixture(scope="module")
def adapters(peft_models) -> dict[str, Adapter]:
    return {name: adapter_of(m) for name, m in peft_models.items()}


def _logits(model, tokenizer, split) -> torch.Tensor:
    batch = next(
        iter_batches(tokenizer, split, batch_size=len(split), max_length=MAX_LENGTH, with_labels=False)
    )
    with torch.no_grad():
        return model(**batch).logits


def _engine(make_tiny_model, tokenizer, sweep_tasks, adapters) -> SweepEngine:
    return SweepEngine(make_tiny_model(), tokenizer, sweep_tasks, adapters, max_length=MAX_LENGTH)


def test_one_adapter_at_lambda_one_is_the_peft_model(
    make_tiny_model, tokenizer, sweep_tasks, peft_models, adapters
) -> None:
    engine = _engine(make_tiny_model, tokenizer, sweep_tasks, adapters)
    single = engine.single_task_scores()
    for task in sweep_tasks:
        peft_model = peft_models[task.name]
        engine.apply(adapters[task.name].deltas(), 1.0)
        scores = engine.evaluate([task.name])  # also puts this task's head on the model
        assert_close(_logits(engine.model, tokenizer, task.test), _logits(peft_model, tokenizer, task.test),
                     atol=1e-5, rtol=1e-4)
        expected = predict(peft_model, tokenizer, task.test, max_length=MAX_LENGTH)
        assert np.array_equal(predict(engine.model, tokenizer, task.test, max_length=MAX_LENGTH), expected)
        reference = evaluate_model(peft_model, tokenizer, task, max_length=MAX_LENGTH)
        assert scores[task.name] == single[task.name] == reference
    engine.restore()


def _by_hand(make_tiny_model, adapters, task, lam: float) -> nn.Module:
    """A base model with ``W0 + lam * sum_i s_i B_i A_i`` (float64) and ``task``'s head."""
    model = make_tiny_model()
    with torch.no_grad():
        for name in adapters[task.name].layers:
            layer = model.get_submodule(name)
            delta = sum(ad.layers[name].scale * ad.layers[name].B.double() @ ad.layers[name].A.double()
                        for ad in adapters.values())
            layer.weight += lam * delta
        head = adapters[task.name].head
        model.classifier = nn.Linear(head["classifier.weight"].shape[1], head["classifier.weight"].shape[0])
        model.classifier.weight.copy_(head["classifier.weight"])
        model.classifier.bias.copy_(head["classifier.bias"])
    return model.double().eval()


@pytest.mark.parametrize("lam", [0.4, 1.0])
def test_task_arithmetic_matches_weights_set_by_hand(
    make_tiny_model, tokenizer, sweep_tasks, adapters, lam
) -> None:
    engine = _engine(make_tiny_model, tokenizer, sweep_tasks, adapters)
    merged = merge_deltas([adapters[t.name].deltas() for t in sweep_tasks], "task_arithmetic", lam=1.0)
    engine.apply(merged, lam)
    for task in sweep_tasks:
        engine.evaluate([task.name])
        reference = _by_hand(make_tiny_model, adapters, task, lam)
        assert_close(_logits(engine.model, tokenizer, task.test), _logits(reference, tokenizer, task.test),
                     atol=1e-5, rtol=1e-4)

    # The sweep's rows are the same merged models, scored.
    df = engine.sweep(["task_arithmetic"], [lam])
    assert list(df.columns) == ["method", "density", "lambda", "task", "score", "single", "normalized"]
    for task in sweep_tasks:
        row = df[df.task == task.name].iloc[0]
        reference = _by_hand(make_tiny_model, adapters, task, lam)
        assert row.score == evaluate_model(reference, tokenizer, task, max_length=MAX_LENGTH)
        assert row.normalized == pytest.approx(row.score / row.single)


def test_restore_puts_w0_back_bit_exactly(make_tiny_model, tokenizer, sweep_tasks, adapters) -> None:
    engine = _engine(make_tiny_model, tokenizer, sweep_tasks, adapters)
    before = {k: v.clone() for k, v in engine.model.state_dict().items()}
    head = engine.model.classifier
    df = engine.sweep(["task_arithmetic", "ties", "dare_linear"], [0.3, 1.0], densities=[0.5, 0.9])
    assert len(df) == (1 + 2 + 2) * 2 * len(sweep_tasks)
    engine.apply(adapters["topic"].deltas(), 3.0)
    engine.evaluate(["topic"])
    engine.restore()
    assert engine.model.classifier is head
    after = engine.model.state_dict()
    assert sorted(after) == sorted(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), key


def test_the_sweep_never_reloads_the_model(
    make_tiny_model, tokenizer, sweep_tasks, adapters, monkeypatch
) -> None:
    import peft
    import transformers

    import osrm_core.models

    def fail(*args, **kwargs):
        raise AssertionError("the sweep engine must not load or wrap a model")

    monkeypatch.setattr(osrm_core.models, "load_base_model", fail)
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", fail)
    monkeypatch.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained", fail)
    monkeypatch.setattr(peft.PeftModel, "from_pretrained", fail)
    monkeypatch.setattr(peft, "get_peft_model", fail)
    engine = _engine(make_tiny_model, tokenizer, sweep_tasks, adapters)
    calls = []
    df = engine.sweep(["task_arithmetic", "ties"], [0.5, 1.0], progress=lambda s, t, m: calls.append((s, t)))
    engine.restore()
    assert calls[-1] == (4, 4)
    assert df["score"].notna().all() and set(df.task) == {t.name for t in sweep_tasks}
    best = best_points(df)
    assert sorted(best.method) == ["task_arithmetic", "ties"]


def test_sweep_engine_rejects(make_tiny_model, tokenizer, sweep_tasks, adapters) -> None:
    with pytest.raises(ValueError, match="no adapter for task 'topic'"):
        SweepEngine(make_tiny_model(), tokenizer, sweep_tasks, {"sentiment": adapters["sentiment"]})
    other = copy.copy(adapters["topic"])
    other.layers = dict(list(other.layers.items())[:1])
    with pytest.raises(ValueError, match="other layers"):
        SweepEngine(make_tiny_model(), tokenizer, sweep_tasks, {**adapters, "topic": other})
    engine = _engine(make_tiny_model, tokenizer, sweep_tasks, adapters)
    single = {t.name: 1.0 for t in sweep_tasks}
    with pytest.raises(ValueError, match="empty"):
        engine.sweep(["task_arithmetic"], [], single=single)
    with pytest.raises(ValueError, match="lambda 0"):
        engine.sweep(["task_arithmetic"], [0.0], single=single)
    with pytest.raises(ValueError, match="feature statistics"):
        engine.sweep(["regmean"], [1.0], single=single)
    with pytest.raises(ValueError, match="unknown merge method"):
        engine.sweep(["average"], [1.0], single=single)


# --------------------------------------------------------------------------- export


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_exact_merged_adapter_loads_with_plain_peft(make_tiny_model, adapters, method, tmp_path) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file

    merged = merge_adapters(adapters, method, lam=0.7)
    out = write_merged_adapter(tmp_path / method, merged, adapters)
    rank = json.loads((out / "adapter_config.json").read_text())["r"]
    if method == "task_arithmetic":  # the sum of two rank-2 deltas has rank 4, not full rank
        assert rank == len(adapters) * RANK
    base = make_tiny_model()
    w0 = {name: base.get_submodule(name).weight.detach().clone() for name in merged}
    loaded = PeftModel.from_pretrained(base, str(out)).eval()
    inner = loaded.get_base_model()
    for name, delta in merged.items():
        layer = inner.get_submodule(name)
        assert torch.equal(layer.base_layer.weight, w0[name])
        lora = layer.scaling["default"] * (layer.lora_B["default"].weight @ layer.lora_A["default"].weight)
        assert_close(layer.base_layer.weight + lora.double(), w0[name] + delta.double(), atol=1e-5, rtol=0)

    for task, adapter in adapters.items():
        head = load_file(str(out / "heads" / f"{task}.safetensors"))
        assert sorted(head) == sorted(adapter.head)
        for key, tensor in adapter.head.items():
            assert_close(head[key], tensor.float())


def test_merged_model_has_the_merged_weights(make_tiny_model, tokenizer, adapters, tmp_path) -> None:
    from transformers import AutoModelForSequenceClassification

    from osrm_core.export import write_merged_model

    merged = merge_adapters(adapters, "task_arithmetic", lam=0.5)
    base = make_tiny_model()
    out = write_merged_model(base, tokenizer, merged, tmp_path / "full")
    loaded = AutoModelForSequenceClassification.from_pretrained(str(out), dtype=torch.float64)
    for name, delta in merged.items():
        assert torch.equal(base.get_submodule(name).weight, make_tiny_model().get_submodule(name).weight)
        assert_close(loaded.get_submodule(name).weight, base.get_submodule(name).weight + delta.double())


def test_truncated_merged_adapter_has_the_asked_rank(adapters, tmp_path) -> None:
    from osrm_core.adapters import read_adapter_dir

    merged = merge_adapters(adapters, "task_arithmetic")
    out = write_merged_adapter(tmp_path / "r1", merged, adapters, rank=1)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 1
    written = read_adapter_dir(out)
    for name, delta in merged.items():
        lw = written.layers[name]
        assert lw.A.shape == (1, delta.shape[1]) and lw.B.shape == (delta.shape[0], 1)
        s = torch.linalg.svdvals(delta.double())
        error = torch.linalg.matrix_norm(delta.double() - lw.delta.double())
        assert float(error) == pytest.approx(float(s[1:].norm()), rel=1e-4)  # Eckart-Young


def test_merge_adapters_rejects(adapters) -> None:
    with pytest.raises(ValueError, match="at least one"):
        merge_adapters({})
    with pytest.raises(ValueError, match="feature statistics"):
        merge_adapters(adapters, "regmean")
    other = copy.copy(adapters["topic"])
    other.layers = dict(list(other.layers.items())[:1])
    with pytest.raises(ValueError, match="other layers"):
        merge_adapters({**adapters, "topic": other})
    wide = copy.copy(adapters["topic"])
    wide.layers = {n: LoraWeights(torch.ones(RANK, 48), torch.ones(48, RANK), 1.0) for n in wide.layers}
    with pytest.raises(ValueError, match="size mismatch for layer .*48x48"):
        merge_adapters({**adapters, "topic": wide})
