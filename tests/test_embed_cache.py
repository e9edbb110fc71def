"""Tests of the embeddings cache of the sweep engine: the same scores as without it, the
embeddings run once per test batch, and no cache where an adapter changes the embeddings."""

from __future__ import annotations

import pandas as pd
import pytest
from test_evaluate import MAX_LENGTH, _peft_model

from osrm_core.demo import demo_task
from osrm_core.embed_cache import EmbeddingCache
from osrm_core.evaluate import SweepEngine
from osrm_core.train import adapter_of


@pytest.fixture(scope="module")
def setup(make_tiny_model, tokenizer):
    tasks = [demo_task("sentiment", n_train=10, n_test=40), demo_task("topic", n_train=10, n_test=40)]
    adapters = {t.name: adapter_of(_peft_model(make_tiny_model, tokenizer, t, seed)) for seed, t in enumerate(tasks)}
    return tasks, adapters


def _engine(make_tiny_model, tokenizer, setup, **kwargs) -> SweepEngine:
    tasks, adapters = setup
    return SweepEngine(make_tiny_model(), tokenizer, tasks, adapters, max_length=MAX_LENGTH, batch_size=16, **kwargs)


def _count_embeddings(engine: SweepEngine) -> list[int]:
    calls = [0]
    engine.model.bert.embeddings.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_cached_sweep_equals_the_plain_sweep(make_tiny_model, tokenizer, setup) -> None:
    cached = _engine(make_tiny_model, tokenizer, setup)
    plain = _engine(make_tiny_model, tokenizer, setup, cache_embeddings=False)
    assert cached.embeddings.name == "bert.embeddings" and plain.embeddings is None
    grid = dict(methods=["task_arithmetic", "ties"], lambdas=[0.5, 1.0, 1.5])
    pd.testing.assert_frame_equal(cached.sweep(**grid), plain.sweep(**grid))


def test_embeddings_run_once_per_test_batch(make_tiny_model, tokenizer, setup) -> None:
    engine = _engine(make_tiny_model, tokenizer, setup)
    calls = _count_embeddings(engine)
    batches = sum(len(te.batches) for te in engine.tasks.values())
    first = engine.evaluate()
    engine.apply(engine.adapters["sentiment"].deltas(), 0.7)
    engine.evaluate()
    engine.apply(None)
    assert engine.evaluate() == first
    assert calls[0] == batches
    assert type(engine.model.bert.embeddings).__name__ == "BertEmbeddings"  # put back after each pass


def test_no_cache_when_an_adapter_changes_the_embeddings_or_over_budget(make_tiny_model, tokenizer, setup) -> None:
    model = make_tiny_model()
    assert EmbeddingCache(model, ["bert.embeddings.word_embeddings"]).name is None
    assert EmbeddingCache(model, ["bert.encoder.layer.0.attention.self.query"]).name == "bert.embeddings"
    engine = _engine(make_tiny_model, tokenizer, setup)
    engine.embeddings.max_bytes = 0
    calls = _count_embeddings(engine)
    engine.evaluate()
    engine.evaluate()
    assert calls[0] == 2 * sum(len(te.batches) for te in engine.tasks.values())
