"""Tests for base models, devices and adapted-layer discovery (:mod:`osrm_core.models`)."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_TARGETS

from osrm_core.models import (
    DEFAULT_MODEL_NAME,
    TargetLayer,
    default_model_path,
    default_target_modules,
    find_target_layers,
    get_module,
    head_module_names,
    load_base_model,
    resolve_device,
    weight_as_linear,
)


def test_packaged_default_model(default_model) -> None:
    model, tokenizer = default_model
    assert (default_model_path() / "config.json").is_file()
    assert model.config.model_type == "bert" and model.config.hidden_size == 384
    assert model.config.num_hidden_layers == 6 and model.config.num_labels == 2
    assert not model.training and model.name_or_path_ == DEFAULT_MODEL_NAME
    assert next(model.parameters()).dtype == torch.float32
    assert tokenizer.pad_token is not None and model.config.pad_token_id == tokenizer.pad_token_id
    layers = find_target_layers(model)
    assert len(layers) == 12
    assert layers[0] == TargetLayer("bert.encoder.layer.0.attention.self.query", 384, 384, False)
    assert {t.name.rsplit(".", 1)[1] for t in layers} == {"query", "value"}
    assert head_module_names(model) == ["classifier"]
    enc = tokenizer(["a short text", "and another, longer one"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert model(**enc).logits.shape == (2, 2)


def test_load_options_and_errors(tmp_path) -> None:
    model, _ = load_base_model("default", num_labels=3, dtype=torch.float64)
    assert model.classifier.out_features == 3 and model.classifier.weight.dtype == torch.float64
    with pytest.raises(ValueError, match="num_labels must be an integer >= 2, got 1"):
        load_base_model(num_labels=1)
    with pytest.raises(ValueError, match="num_labels must be an integer >= 2, got 2.0"):
        load_base_model(num_labels=2.0)
    with pytest.raises(ValueError, match="cannot load model"):
        load_base_model(tmp_path / "no-model-here")


def test_find_target_layers_on_tiny_bert(tiny_model) -> None:
    layers = find_target_layers(tiny_model)
    assert [t.name for t in layers] == TINY_TARGETS
    assert all((t.d_in, t.d_out, t.fan_in_fan_out) == (32, 32, False) for t in layers)
    assert default_target_modules(tiny_model) == ["query", "value"]
    assert [t.name for t in find_target_layers(tiny_model, "key")] == [
        "bert.encoder.layer.0.attention.self.key",
        "bert.encoder.layer.1.attention.self.key",
    ]
    full = find_target_layers(tiny_model, ["bert.encoder.layer.1.intermediate.dense"])
    assert full == [TargetLayer("bert.encoder.layer.1.intermediate.dense", 32, 64, False)]
    # The classification head is never a target.
    with pytest.raises(ValueError, match=r"target_modules \['classifier'\] match no Linear or Conv1D layer"):
        find_target_layers(tiny_model, ["classifier"])
    with pytest.raises(
        ValueError, match="target module 'bert.embeddings.LayerNorm' is a LayerNorm; only Linear and Conv1D"
    ):
        find_target_layers(tiny_model, ["LayerNorm"])


def test_find_target_layers_through_peft(make_tiny_model) -> None:
    from osrm_core.inits import init_lora

    peft_model = init_lora(make_tiny_model(seed=5), "standard", rank=2)
    base = peft_model.get_base_model()
    assert [t.name for t in find_target_layers(base)] == TINY_TARGETS
    assert all(t.d_in == 32 for t in find_target_layers(base))


def test_gpt2_conv1d_is_transposed() -> None:
    from transformers import GPT2Config, GPT2ForSequenceClassification

    model = GPT2ForSequenceClassification(
        GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=32, pad_token_id=0)
    )
    layers = find_target_layers(model)
    assert layers == [TargetLayer("transformer.h.0.attn.c_attn", 16, 48, True)]
    module = get_module(model, layers[0].name)
    W = weight_as_linear(module)
    assert W.shape == (48, 16)
    x = torch.randn(3, 16)
    torch.testing.assert_close(module(x) - module.bias, x @ W.T)
    assert head_module_names(model) == ["score"]


def test_unknown_architecture_and_missing_module(tiny_model) -> None:
    other = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(
        ValueError, match="no default target modules for model type None; pass target_modules"
    ):
        find_target_layers(other)
    assert [t.name for t in find_target_layers(other, ["0"])] == ["0"]
    with pytest.raises(ValueError, match="model has no module 'bert.nothing'"):
        get_module(tiny_model, "bert.nothing")
    assert head_module_names(other) == []


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(ValueError, match="device 'toaster' is unknown: use 'auto', 'cpu', 'cuda' or 'mps'"):
        resolve_device("toaster")
    if not torch.cuda.is_available():
        assert resolve_device("auto") in (torch.device("cpu"), torch.device("mps"))
        with pytest.raises(ValueError, match="device 'cuda' is not available: no CUDA device here"):
            resolve_device("cuda")
