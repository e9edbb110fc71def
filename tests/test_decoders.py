"""Decoder language models through the same API as encoders: tiny random LLaMA (q_proj/v_proj,
grouped-query attention, ``score`` head) and GPT-2 (``c_attn`` Conv1D with a transposed weight),
built from configs with an offline word-level tokenizer. Statistics are checked against
unpadded forward passes (left and right padding), and the exact interference formulas against
the LoRA outputs that peft really adds on a forward pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from osrm_core.adapters import Adapter, check_against_model
from osrm_core.batching import iter_batches
from osrm_core.demo import demo_tasks
from osrm_core.diagnostics import input_interference, interference_table, output_shift
from osrm_core.export import merge_adapters, write_merged_model
from osrm_core.inits import init_lora, osrm_subspace
from osrm_core.models import (
    TargetLayer,
    decoder_position_ids,
    find_target_layers,
    load_base_model,
    weight_as_linear,
)
from osrm_core.settings import TrainSettings
from osrm_core.stats import collect_feature_stats
from osrm_core.train import adapter_of, finetune, save_adapter

HIDDEN = 32
MAX_LENGTH = 24
ARCHS = ["llama", "gpt2"]
TARGETS = {
    "llama": [f"model.layers.{k}.self_attn.{p}" for k in range(2) for p in ("q_proj", "v_proj")],
    "gpt2": [f"transformer.h.{k}.attn.c_attn" for k in range(2)],
}


@pytest.fixture(scope="module")
def tasks():
    """Two binary tasks (one of sentence pairs), so every adapter fits one head size."""
    sentiment, _, _, paraphrase = demo_tasks(seed=0, n_train=16, n_test=10)
    return [sentiment, paraphrase]


@pytest.fixture(scope="module")
def word_tokenizer(tasks):
    """``word_tokenizer(side)``: a word-level tokenizer trained on the tasks' texts (offline),
    with a padding token, padding on ``side`` and no ``token_type_ids`` (as LLaMA and GPT-2)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [x for t in tasks for split in (t.train, t.test) for x in split.text + (split.text_pair or [])]
    core = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[EOS]"]))

    def make(side: str = "right", pad: bool = True):
        return PreTrainedTokenizerFast(
            tokenizer_object=core,
            unk_token="[UNK]",
            eos_token="[EOS]",
            pad_token="[PAD]" if pad else None,
            padding_side=side,
            model_input_names=["input_ids", "attention_mask"],
        )

    return make


@pytest.fixture(scope="module")
def make_decoder(word_tokenizer):
    """``make_decoder(arch, seed=0, num_labels=2, dtype=float64)``: tiny random decoder classifier."""
    from transformers import (
        GPT2Config,
        GPT2ForSequenceClassification,
        LlamaConfig,
        LlamaForSequenceClassification,
    )

    tok = word_tokenizer()

    def make(arch: str, seed: int = 0, num_labels: int = 2, dtype=torch.float64, pad: bool = True):
        common = dict(
            vocab_size=len(tok),
            num_labels=num_labels,
            pad_token_id=tok.pad_token_id if pad else None,
            bos_token_id=tok.eos_token_id,
            eos_token_id=tok.eos_token_id,
        )
        if arch == "llama":  # grouped-query attention: v_proj is narrower than q_proj
            config = LlamaConfig(
                hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, **common,
            )
            cls = LlamaForSequenceClassification
        else:
            config = GPT2Config(
                n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
                attn_pdrop=0.0, **common,
            )
            cls = GPT2ForSequenceClassification
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = cls(config)
        return model.to(dtype).eval()

    return make


def _layer_inputs_alone(model, tokenizer, split, name: str) -> torch.Tensor:
    """The inputs of layer ``name``, one example at a time (no padding), stacked (tokens, d)."""
    seen = []
    handle = model.get_submodule(name).register_forward_pre_hook(lambda m, args: seen.append(args[0][0]))
    try:
        with torch.no_grad():
            for text in split.text:
                model(**tokenizer(text, truncation=True, max_length=MAX_LENGTH, return_tensors="pt"))
    finally:
        handle.remove()
    return torch.cat(seen).to(torch.float64)


def _logits(model, tokenizer, split, batch_size: int) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for batch in iter_batches(tokenizer, split, batch_size=batch_size, max_length=MAX_LENGTH, with_labels=False):
            out.append(model(**decoder_position_ids(batch, model)).logits)
    return torch.cat(out)


# --------------------------------------------------------------------------- layers and padding


def test_target_layers_of_decoders(make_decoder) -> None:
    llama = find_target_layers(make_decoder("llama"))
    assert [t.name for t in llama] == TARGETS["llama"]
    assert llama[:2] == [
        TargetLayer("model.layers.0.self_attn.q_proj", HIDDEN, HIDDEN, False),
        TargetLayer("model.layers.0.self_attn.v_proj", HIDDEN, HIDDEN // 2, False),
    ]
    gpt2 = make_decoder("gpt2")
    layers = find_target_layers(gpt2)
    assert layers == [TargetLayer(n, HIDDEN, 3 * HIDDEN, True) for n in TARGETS["gpt2"]]
    conv = gpt2.get_submodule(layers[0].name)
    assert tuple(conv.weight.shape) == (HIDDEN, 3 * HIDDEN)  # Conv1D stores (d_in, d_out)
    x = torch.randn(5, HIDDEN, dtype=torch.float64)
    assert_close(conv(x), x @ weight_as_linear(conv).T + conv.bias)


@pytest.mark.parametrize("arch", ARCHS)
def test_statistics_and_logits_do_not_depend_on_padding(arch, make_decoder, word_tokenizer, tasks) -> None:
    """Left or right padding: the statistics equal those of every example run alone, and so do
    the classification logits (the head reads the last real token)."""
    model = make_decoder(arch)
    split = tasks[0].train
    by_side = {}
    for side in ("right", "left"):
        tok = word_tokenizer(side)
        stats = collect_feature_stats(model, tok, tasks[0], max_samples=None, batch_size=6, max_length=MAX_LENGTH)
        by_side[side] = stats
        groups = stats.groups()
        if arch == "llama":  # q_proj and v_proj read one input: collected once
            assert groups == [TARGETS["llama"][:2], TARGETS["llama"][2:]]
        else:
            assert groups == [[n] for n in TARGETS["gpt2"]]
        for group in groups:
            X = _layer_inputs_alone(model, tok, split, group[0])
            st = stats.layers[group[0]]
            assert st.count == X.shape[0]
            assert_close(st.second_moment, X.T @ X / X.shape[0], rtol=1e-10, atol=1e-12)
        alone = torch.cat([_logits(model, tok, split.head(k + 1), 1)[-1:] for k in range(len(split))])
        assert_close(_logits(model, tok, split, 6), alone, rtol=1e-9, atol=1e-10)
    for name, st in by_side["left"].layers.items():
        assert_close(st.sum_outer, by_side["right"].layers[name].sum_outer, rtol=1e-10, atol=1e-10)

    if arch == "gpt2":  # learned absolute positions: without position ids left padding shifts tokens
        tok = word_tokenizer("left")
        batch = next(iter_batches(tok, split, batch_size=6, max_length=MAX_LENGTH, with_labels=False))
        assert not bool(batch["attention_mask"][:, 0].all())
        with torch.no_grad():
            shifted = model(**batch).logits
        assert (shifted - _logits(model, tok, split.head(6), 6)).abs().max() > 1e-3


def test_decoder_loads_from_a_folder_without_pad_token(make_decoder, word_tokenizer, tasks, tmp_path) -> None:
    """load_base_model gives the tokenizer the end-of-sequence token as padding and tells the
    config; device_map='auto' places the model (here: all on the CPU)."""
    model = make_decoder("llama", pad=False, dtype=torch.float32)
    assert model.config.pad_token_id is None
    model.save_pretrained(tmp_path)
    word_tokenizer(pad=False).save_pretrained(tmp_path)
    loaded, tok = load_base_model(tmp_path, num_labels=3, device_map="auto")
    assert tok.pad_token == "[EOS]" and loaded.config.pad_token_id == tok.eos_token_id
    assert loaded.score.out_features == 3 and not loaded.training
    stats = collect_feature_stats(loaded, tok, tasks[0], max_samples=8, batch_size=4, max_length=MAX_LENGTH)
    assert list(stats.layers) == TARGETS["llama"] and stats.count > 0
    logits = _logits(loaded, tok, tasks[0].test, 5)
    assert logits.shape == (len(tasks[0].test), 3) and torch.isfinite(logits).all()


# --------------------------------------------------------------------------- the whole path


def _lora_outputs(peft_model, tokenizer, split, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """What peft's LoRA branch adds at layer ``name`` on real tokens, and what ``A`` makes of
    them, measured on a real forward pass: ``(y - base_layer(x), A x)``, each (tokens, .)."""
    layer = peft_model.get_base_model().get_submodule(name)
    added, projected, state = [], [], {}

    def hook(module, args, output):
        x = args[0]
        mask = state["mask"]
        added.append((output - module.base_layer(x))[mask])
        projected.append(module.lora_A["default"](x)[mask])

    handle = layer.register_forward_hook(hook)
    try:
        with torch.no_grad():
            for batch in iter_batches(tokenizer, split, batch_size=6, max_length=MAX_LENGTH, with_labels=False):
                state["mask"] = batch["attention_mask"].bool()
                peft_model(**decoder_position_ids(batch, peft_model))
    finally:
        handle.remove()
    return torch.cat(added), torch.cat(projected)


@pytest.mark.parametrize("arch", ARCHS)
def test_osrm_init_training_merging_and_exact_interference(arch, make_decoder, word_tokenizer, tasks, tmp_path) -> None:
    from peft import PeftModel

    tok = word_tokenizer("left" if arch == "llama" else "right")
    base = make_decoder(arch)
    stats = [
        collect_feature_stats(base, tok, t, max_samples=None, batch_size=8, max_length=MAX_LENGTH) for t in tasks
    ]
    rank = 2
    adapters, models = {}, {}
    for i, task in enumerate(tasks):
        others = [s for j, s in enumerate(stats) if j != i]
        peft_model = init_lora(make_decoder(arch), "osrm", rank=rank, alpha=4, other_stats=others)
        config = peft_model.peft_config["default"]
        assert config.fan_in_fan_out is (arch == "gpt2")
        A0 = osrm_subspace(others, rank)
        for name in TARGETS[arch]:
            layer = peft_model.get_base_model().get_submodule(name)
            assert_close(layer.lora_A["default"].weight, A0[name].to(layer.lora_A["default"].weight))
            assert layer.lora_B["default"].weight.abs().max() == 0
        result = finetune(
            peft_model, tok, task,
            TrainSettings(steps=4, batch_size=8, lr=2e-2, warmup_ratio=0.0), max_length=MAX_LENGTH,
        )
        assert len(result.losses) == 4 and np.isfinite(result.losses).all() and 0 <= result.test_score <= 1
        adapters[task.name], models[task.name] = adapter_of(peft_model), peft_model
        check_against_model(adapters[task.name], base, where=task.name)

    # The exact formulas against what peft's LoRA branch adds on a forward pass (Conv1D included):
    # adapter of task 0 on the data of task 1 (interference) and on its own data. The features
    # are those that reach each layer of the adapted model: statistics collected on it.
    adapted = models[tasks[0].name]
    for k in (0, 1):
        seen = collect_feature_stats(adapted, tok, tasks[k], max_samples=None, batch_size=8, max_length=MAX_LENGTH)
        first = TARGETS[arch][0]  # no adapter before it: the base model's features
        assert_close(seen.layers[first].sum_outer, stats[k].layers[first].sum_outer, rtol=1e-10, atol=1e-10)
        for name in TARGETS[arch]:
            lw = adapters[tasks[0].name].layers[name]
            assert lw.B.abs().max() > 0
            added, projected = _lora_outputs(adapted, tok, tasks[k].train, name)
            S = seen.layers[name].second_moment
            assert added.shape[0] == seen.layers[name].count
            assert_close(output_shift(lw, S), float((added**2).sum(1).mean()), rtol=1e-9, atol=0)
            assert_close(input_interference(lw.A, S), float((projected**2).sum(1).mean()), rtol=1e-9, atol=0)
    weights = {n: weight_as_linear(base.get_submodule(n)).detach() for n in TARGETS[arch]}
    table = interference_table(adapters, {t.name: s for t, s in zip(tasks, stats)}, weights)
    assert len(table) == len(TARGETS[arch]) * 4 and (table["relative_shift"] > 0).all()

    # A saved adapter loads with plain peft (fan_in_fan_out kept for Conv1D) and gives the same logits.
    out = save_adapter(adapters[tasks[0].name], tmp_path / "a")
    loaded = PeftModel.from_pretrained(make_decoder(arch), str(out)).eval()
    assert loaded.peft_config["default"].fan_in_fan_out is (arch == "gpt2")
    assert_close(_logits(loaded, tok, tasks[0].test, 5), _logits(models[tasks[0].name], tok, tasks[0].test, 5))

    # Merged weights W0 + Delta_W written in the layer's own layout equal the adapters applied by
    # peft: one adapter against its peft model, two against both LoRA branches added up.
    backbone = "model" if arch == "llama" else "transformer"

    def hidden(model) -> torch.Tensor:
        batch = next(iter_batches(tok, tasks[1].test, batch_size=10, max_length=MAX_LENGTH, with_labels=False))
        with torch.no_grad():
            return getattr(model, backbone)(**decoder_position_ids(batch, model)).last_hidden_state

    one = merge_adapters({tasks[0].name: adapters[tasks[0].name]}, "task_arithmetic", lam=1.0)
    merged_model = type(base).from_pretrained(write_merged_model(base, tok, one, tmp_path / "m1")).to(torch.float64)
    # (merged deltas are float32: agreement to float32 rounding; a wrong orientation is off by O(1))
    assert_close(hidden(merged_model), hidden(models[tasks[0].name].get_base_model()), rtol=1e-4, atol=1e-5)
    both = merge_adapters(adapters, "task_arithmetic", lam=1.0)
    merged_model = type(base).from_pretrained(write_merged_model(base, tok, both, tmp_path / "m2")).to(torch.float64)
    # peft runs both LoRA branches at once only without per-task heads: save the layers alone.
    paths = []
    for task in tasks:
        ad = adapters[task.name]
        bare = Adapter(ad.layers, {}, {**ad.config, "modules_to_save": None, "task_type": None})
        paths.append(str(save_adapter(bare, tmp_path / f"bare-{task.name}")))
    stacked = PeftModel.from_pretrained(make_decoder(arch), paths[0], adapter_name="a0")
    stacked.load_adapter(paths[1], adapter_name="a1")
    stacked.base_model.set_adapter(["a0", "a1"])
    assert_close(hidden(merged_model), hidden(stacked.get_base_model()), rtol=1e-4, atol=1e-5)
