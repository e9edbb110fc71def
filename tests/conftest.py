"""Shared fixtures: the packaged tokenizer, tiny BERT models built from a config, small demo
tasks, their feature statistics, and naive float64 references that the library is checked
against.

Anything slow is session-scoped. Session objects are shared: tests must not mutate them
(``init_lora`` wraps a model in place, so tests that call it build their own model with
``make_tiny_model``).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from osrm_core.adapters import write_adapter
from osrm_core.data import Split, TaskData
from osrm_core.demo import demo_tasks
from osrm_core.inits import init_lora
from osrm_core.models import default_model_path, load_base_model
from osrm_core.stats import FeatureStats, collect_feature_stats
from osrm_core.train import adapter_of

#: Shape of the tiny test model.
TINY_HIDDEN, TINY_LAYERS, TINY_HEADS, TINY_INTERMEDIATE = 32, 2, 4, 64
#: The tiny model's adapted layers (BERT's default targets).
TINY_TARGETS = [
    f"bert.encoder.layer.{layer}.attention.self.{kind}"
    for layer in range(TINY_LAYERS)
    for kind in ("query", "value")
]


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Tiny models are dominated by per-op overhead; with two threads on a shared two-core
    machine each op can wait milliseconds for the second thread, so use one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same global seeds."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tokenizer():
    """The packaged default model's tokenizer (offline)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(default_model_path()))


@pytest.fixture(scope="session")
def make_tiny_model(tokenizer) -> Callable[..., torch.nn.Module]:
    """Factory for a tiny randomly initialized BERT classifier in eval mode.

    ``make_tiny_model(seed=0, num_labels=2, dtype=torch.float64)``; the same seed gives the
    same weights. Hidden size 32, 2 layers, 4 heads, intermediate 64, the packaged vocabulary.
    """
    from transformers import BertConfig, BertForSequenceClassification

    def make(seed: int = 0, num_labels: int = 2, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
        config = BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=TINY_HIDDEN,
            num_hidden_layers=TINY_LAYERS,
            num_attention_heads=TINY_HEADS,
            intermediate_size=TINY_INTERMEDIATE,
            max_position_embeddings=256,
            num_labels=num_labels,
            pad_token_id=tokenizer.pad_token_id,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = BertForSequenceClassification(config)
        return model.to(dtype).eval()

    return make


@pytest.fixture(scope="session")
def tiny_model(make_tiny_model) -> torch.nn.Module:
    """A shared float64 tiny model (do not wrap it with init_lora)."""
    return make_tiny_model(seed=0)


@pytest.fixture(scope="session")
def tiny_tasks() -> list[TaskData]:
    """The four demo tasks, small: 40 train and 16 test examples each."""
    return demo_tasks(seed=0, n_train=40, n_test=16)


@pytest.fixture(scope="session")
def tiny_stats(tiny_model, tokenizer, tiny_tasks) -> list[FeatureStats]:
    """Float64 statistics of every tiny task (all 40 training examples) on ``tiny_model``."""
    return [
        collect_feature_stats(tiny_model, tokenizer, task, max_samples=None, batch_size=8)
        for task in tiny_tasks
    ]


@pytest.fixture(scope="session")
def default_model():
    """The packaged all-MiniLM-L6-v2 and its tokenizer (shared: do not wrap or modify)."""
    return load_base_model()


# --------------------------------------------------------------------------- naive references


def _naive_layer_inputs(model, tokenizer, split: Split, max_length: int = 128) -> list[list[torch.Tensor]]:
    """The inputs of every encoder layer's attention, one example at a time (so no padding).

    Returns ``inputs[layer][example]``, a float64 tensor of shape (n_tokens, hidden): the
    hidden states that enter layer ``layer``, where query, key and value read them.
    """
    per_layer: list[list[torch.Tensor]] = [[] for _ in range(model.config.num_hidden_layers)]
    with torch.no_grad():
        for k in range(len(split)):
            pair = None if split.text_pair is None else split.text_pair[k]
            enc = tokenizer(split.text[k], pair, truncation=True, max_length=max_length, return_tensors="pt")
            assert bool(enc["attention_mask"].all())
            out = model(**enc, output_hidden_states=True)
            for layer in range(model.config.num_hidden_layers):
                per_layer[layer].append(out.hidden_states[layer][0].to(torch.float64))
    return per_layer


@pytest.fixture(scope="session")
def naive_layer_inputs() -> Callable[..., list[list[torch.Tensor]]]:
    """``naive_layer_inputs(model, tokenizer, split)``: per-layer, per-example input features."""
    return _naive_layer_inputs


def _naive_moments(tokens: list[torch.Tensor]) -> dict[str, torch.Tensor | int]:
    """Reference statistics of a list of (n_tokens, d) feature blocks, in float64."""
    X = torch.cat(tokens).to(torch.float64)
    means = torch.stack([t.to(torch.float64).mean(0) for t in tokens])
    return {
        "count": X.shape[0],
        "second_moment": X.T @ X / X.shape[0],
        "mean": X.mean(0),
        "covariance": torch.cov(X.T, correction=0),
        "sample_means": means,
        "n_samples": len(tokens),
    }


@pytest.fixture(scope="session")
def naive_moments() -> Callable[[list[torch.Tensor]], dict]:
    """``naive_moments(blocks)``: count, E[hh^T], mean, torch.cov, per-sample means."""
    return _naive_moments


def _random_orthonormal(r: int, d: int, generator: torch.Generator) -> torch.Tensor:
    """A random (r, d) float64 matrix with orthonormal rows (Haar via QR with sign fix)."""
    q, rr = torch.linalg.qr(torch.randn(d, r, generator=generator, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(rr))).T.contiguous()


@pytest.fixture(scope="session")
def random_orthonormal() -> Callable[[int, int, torch.Generator], torch.Tensor]:
    """``random_orthonormal(r, d, generator)``: random (r, d) float64 with orthonormal rows."""
    return _random_orthonormal


@pytest.fixture(scope="session")
def tiny_model_dir(make_tiny_model, tokenizer, tmp_path_factory):
    """A float32 tiny BERT classifier (2 labels) and the packaged tokenizer, saved with
    ``save_pretrained``: a local model folder to pass wherever a model id or path is taken."""
    path = tmp_path_factory.mktemp("tiny-model")
    make_tiny_model(dtype=torch.float32).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def base(make_tiny_model):
    """The float32 tiny base model the adapters must fit (2 labels)."""
    return make_tiny_model(dtype=torch.float32)


@pytest.fixture(scope="module")
def good_adapter(make_tiny_model, tmp_path_factory) -> Path:
    """A valid rank-2 PEFT adapter folder for the tiny model, with a random B."""
    model = init_lora(make_tiny_model(dtype=torch.float32), "standard", rank=2, alpha=4, seed=0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=gen))
    adapter = adapter_of(model)
    config = {**adapter.config, "base_model_name_or_path": "tiny-bert"}
    return write_adapter(tmp_path_factory.mktemp("good") / "good", adapter.layers, config, adapter.head)
