"""Tests for feature statistics (:mod:`osrm_core.stats`) against naive float64 references, half-precision
models, overflows and damaged statistics files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from _helpers import Q0, _stats, assert_message
from conftest import TINY_TARGETS

from osrm_core.data import Split, TaskData
from osrm_core.demo import demo_task
from osrm_core.inits import osrm_subspace
from osrm_core.stats import (
    FeatureStats,
    LayerStats,
    check_same_layers,
    collect_feature_stats,
    select_samples,
)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _assert_stats_equal(a: FeatureStats, b: FeatureStats, rtol: float = 1e-10) -> None:
    assert list(a.layers) == list(b.layers)
    for name in a.layers:
        x, y = a.layers[name], b.layers[name]
        assert (x.count, x.n_samples) == (y.count, y.n_samples), name
        for attr in ("sum_outer", "sum", "sum_sample_mean_outer"):
            assert _rel(getattr(x, attr), getattr(y, attr)) < rtol, (name, attr)


def _subset(task: TaskData, idx) -> TaskData:
    idx = list(idx)
    tr = task.train
    pair = None if tr.text_pair is None else [tr.text_pair[i] for i in idx]
    return TaskData(
        task.name, Split([tr.text[i] for i in idx], tr.label[idx], pair), task.test, task.label_names
    )


# --------------------------------------------------------------------------- against naive references


@pytest.mark.parametrize("which", [0, 3], ids=["single", "pair"])
def test_statistics_match_naive_unpadded_reference(
    tiny_model, tokenizer, tiny_tasks, tiny_stats, naive_layer_inputs, naive_moments, which
) -> None:
    """Each example run alone (no padding at all) gives the reference tokens."""
    task, stats = tiny_tasks[which], tiny_stats[which]
    inputs = naive_layer_inputs(tiny_model, tokenizer, task.train)
    assert stats.groups() == [TINY_TARGETS[:2], TINY_TARGETS[2:]]
    for layer, group in enumerate(stats.groups()):
        ref = naive_moments(inputs[layer])
        for name in group:
            st = stats.layers[name]
            assert st.count == ref["count"] and st.n_samples == ref["n_samples"] == len(task.train)
            assert st.sum_outer.dtype == torch.float64
            torch.testing.assert_close(st.second_moment, ref["second_moment"], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(st.mean, ref["mean"], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(st.covariance, ref["covariance"], rtol=1e-9, atol=1e-11)
            torch.testing.assert_close(st.gram, ref["second_moment"] * ref["count"], rtol=1e-10, atol=1e-10)
            m = ref["sample_means"]
            torch.testing.assert_close(st.sum_sample_mean_outer, m.T @ m, rtol=1e-10, atol=1e-10)
    assert stats.count == sum(t.shape[0] for t in inputs[0])
    assert stats.task == task.name


def test_padding_is_excluded_whatever_the_batching(tiny_model, tokenizer, tiny_tasks, tiny_stats) -> None:
    """The same texts with other batch sizes (so other padding lengths) give the same sums."""
    task = tiny_tasks[0]
    lengths = [len(ids) for ids in tokenizer(task.train.text)["input_ids"]]
    assert max(lengths) - min(lengths) >= 5  # batches really are padded
    for batch_size in (1, 3, 40):
        other = collect_feature_stats(tiny_model, tokenizer, task, max_samples=None, batch_size=batch_size)
        _assert_stats_equal(other, tiny_stats[0], rtol=1e-10)

    # Far more padding (every row padded to 128 tokens) changes nothing either.
    def pad_to_max(*args, **kwargs):
        return tokenizer(*args, **{**kwargs, "padding": "max_length"})

    seen = []
    handle = tiny_model.bert.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["attention_mask"].shape[1]), with_kwargs=True
    )
    try:
        padded = collect_feature_stats(tiny_model, pad_to_max, task, max_samples=None, batch_size=8)
    finally:
        handle.remove()
    assert set(seen) == {128}
    _assert_stats_equal(padded, tiny_stats[0])


def test_hook_reference_dropping_padded_positions(tiny_model, tokenizer, tiny_tasks, tiny_stats) -> None:
    """Our own hooks on padded batches, with padded positions dropped, match the statistics;
    keeping the padded positions does not."""
    from osrm_core.batching import iter_batches

    name = TINY_TARGETS[2]  # layer 1's query: its input went through attention over padding
    kept, with_pad = [], []

    def hook(module, args):
        kept.append(args[0][mask].to(torch.float64))
        with_pad.append(args[0].reshape(-1, args[0].shape[-1]).to(torch.float64))

    handle = tiny_model.get_submodule(name).register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            for batch in iter_batches(tokenizer, tiny_tasks[0].train, batch_size=8, with_labels=False):
                mask = batch["attention_mask"].bool()
                tiny_model(**batch)
    finally:
        handle.remove()
    X, P = torch.cat(kept), torch.cat(with_pad)
    st = tiny_stats[0].layers[name]
    assert st.count == X.shape[0] < P.shape[0]
    torch.testing.assert_close(st.second_moment, X.T @ X / X.shape[0], rtol=1e-10, atol=1e-12)
    assert _rel(st.second_moment, P.T @ P / P.shape[0]) > 1e-3


# --------------------------------------------------------------------------- sums, files, options


def test_two_halves_add_up_to_all(tiny_model, tokenizer, tiny_tasks, tiny_stats) -> None:
    task = tiny_tasks[1]
    first = collect_feature_stats(
        tiny_model, tokenizer, _subset(task, range(20)), max_samples=None, batch_size=8
    )
    second = collect_feature_stats(
        tiny_model, tokenizer, _subset(task, range(20, 40)), max_samples=None, batch_size=6
    )
    both = first + second
    _assert_stats_equal(both, tiny_stats[1])
    assert both.groups() == tiny_stats[1].groups()
    assert both.layers[TINY_TARGETS[0]] is both.layers[TINY_TARGETS[1]]
    # Shards of a data-parallel run add up the same way.
    shards = [
        collect_feature_stats(tiny_model, tokenizer, task, max_samples=None, batch_size=8, shard=(r, 3))
        for r in range(3)
    ]
    _assert_stats_equal(shards[0] + shards[1] + shards[2], tiny_stats[1])


def test_save_load_round_trip(tmp_path, tiny_stats) -> None:
    stats = tiny_stats[2]
    stats = FeatureStats(dict(stats.layers), task=stats.task, model="tiny-bert", meta=dict(stats.meta))
    path = tmp_path / "stats" / "question.safetensors"
    stats.save(path)
    loaded = FeatureStats.load(path)
    assert (loaded.task, loaded.model, loaded.meta) == ("question", "tiny-bert", stats.meta)
    assert loaded.groups() == stats.groups()
    # Query and value of one layer still share one LayerStats object.
    assert loaded.layers[TINY_TARGETS[0]] is loaded.layers[TINY_TARGETS[1]]
    assert loaded.layers[TINY_TARGETS[0]] is not loaded.layers[TINY_TARGETS[2]]
    for name, st in stats.layers.items():
        got = loaded.layers[name]
        assert (got.count, got.n_samples) == (st.count, st.n_samples)
        assert torch.equal(got.sum_outer, st.sum_outer) and torch.equal(got.sum, st.sum)
        assert torch.equal(got.sum_sample_mean_outer, st.sum_sample_mean_outer)
        assert got.sum_outer.dtype == torch.float64
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "osrm-feature-stats/1"
    assert [g["count"] for g in json.loads(meta["groups"])] == [
        s.count for s in (stats.layers[n] for n in TINY_TARGETS[::2])
    ]
    assert [p.name for p in path.parent.iterdir()] == ["question.safetensors"]  # no temporary left


def test_load_rejects_bad_files(tmp_path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        FeatureStats.load(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(other), metadata={"format": "something"})
    with pytest.raises(ValueError, match="not an OSRM statistics file"):
        FeatureStats.load(other)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 20)
    with pytest.raises(ValueError, match="junk.safetensors: damaged statistics file"):
        FeatureStats.load(junk)


def test_float32_accumulation(tiny_model, tokenizer, tiny_tasks, tiny_stats) -> None:
    st32 = collect_feature_stats(
        tiny_model, tokenizer, tiny_tasks[0], max_samples=None, batch_size=8, dtype=torch.float32
    )
    for name, st in st32.layers.items():
        ref = tiny_stats[0].layers[name]
        assert st.sum_outer.dtype == torch.float32 and st.count == ref.count
        assert _rel(st.second_moment.double(), ref.second_moment) < 1e-5
    with pytest.raises(ValueError, match="dtype must be torch.float64 or torch.float32"):
        collect_feature_stats(tiny_model, tokenizer, tiny_tasks[0], dtype=torch.float16)


def test_max_samples_cap(tiny_model, tokenizer, tiny_tasks) -> None:
    task = tiny_tasks[0]
    capped = collect_feature_stats(tiny_model, tokenizer, task, max_samples=10, seed=4, batch_size=4)
    idx = select_samples(len(task.train), 10, seed=4)
    assert len(idx) == 10 and len(set(idx.tolist())) == 10
    assert all(st.n_samples == 10 for st in capped.layers.values())
    ref = collect_feature_stats(tiny_model, tokenizer, _subset(task, idx), max_samples=None, batch_size=4)
    _assert_stats_equal(capped, ref)
    assert capped.meta["max_samples"] == 10 and capped.meta["seed"] == 4
    assert list(select_samples(5, 10, seed=0)) == list(range(5))
    with pytest.raises(ValueError, match="max_samples must be >= 1, got 0"):
        select_samples(5, 0, seed=0)


def test_progress_and_training_mode(tiny_model, tokenizer, tiny_tasks) -> None:
    calls = []
    tiny_model.train()
    try:
        collect_feature_stats(
            tiny_model,
            tokenizer,
            tiny_tasks[0],
            max_samples=12,
            batch_size=5,
            progress=lambda step, total, msg: calls.append((step, total)),
        )
        assert tiny_model.training  # restored
    finally:
        tiny_model.eval()
    assert calls == [(1, 3), (2, 3), (3, 3)]
    # Mixed modes (as in a PeftModel, training=True around an inner model in eval mode) come
    # back module by module.
    tiny_model.classifier.train()
    try:
        collect_feature_stats(tiny_model, tokenizer, tiny_tasks[0], max_samples=4)
        assert tiny_model.classifier.training and not tiny_model.training
        assert not tiny_model.bert.embeddings.dropout.training
    finally:
        tiny_model.eval()


def test_few_tokens_warn(tiny_model, tokenizer) -> None:
    split = Split(["good", "bad", "fine"], [1, 0, 1])
    task = TaskData("short", split, split, ["neg", "pos"])
    with pytest.warns(UserWarning, match="rest on 9 tokens, fewer than the width 32"):
        collect_feature_stats(tiny_model, tokenizer, task)


# --------------------------------------------------------------------------- LayerStats maths


def test_layerstats_properties() -> None:
    g = torch.Generator().manual_seed(1)
    X = torch.randn(50, 6, generator=g, dtype=torch.float64) + 0.5
    st = LayerStats(X.T @ X, X.sum(0), 50, torch.zeros(6, 6, dtype=torch.float64), 5)
    assert st.d == 6
    torch.testing.assert_close(st.covariance, torch.cov(X.T, correction=0))
    torch.testing.assert_close(st.mean, X.mean(0))
    empty = LayerStats.zeros(6)
    assert empty.count == 0 and torch.equal(empty.second_moment, torch.zeros(6, 6, dtype=torch.float64))
    total = st + empty
    assert total.count == 50 and torch.equal(total.sum_outer, st.sum_outer)
    with pytest.raises(ValueError, match="cannot add statistics of width 6 and 4"):
        st + LayerStats.zeros(4)


# --------------------------------------------------------------------------- bad input


def test_nan_features_name_the_layer(tiny_model, tokenizer, tiny_tasks) -> None:
    name = TINY_TARGETS[2]

    def inject_nan(module, args):
        return (torch.full_like(args[0], math.nan),)

    handle = tiny_model.get_submodule(name).register_forward_pre_hook(inject_nan)
    try:
        with pytest.raises(ValueError, match=rf"layer '{name}': input features contain NaN or Inf"):
            collect_feature_stats(tiny_model, tokenizer, tiny_tasks[0], max_samples=8)
    finally:
        handle.remove()
    # The collector removed its own hooks even though it failed.
    assert not tiny_model.get_submodule(TINY_TARGETS[0])._forward_pre_hooks


def test_nan_embeddings_are_rejected(make_tiny_model, tokenizer, tiny_tasks) -> None:
    model = make_tiny_model(seed=1)
    with torch.no_grad():
        model.bert.embeddings.word_embeddings.weight.fill_(math.nan)
    with pytest.raises(ValueError, match=r"layer 'bert\.encoder\.layer\.0\.attention\.self\.query'.*NaN"):
        collect_feature_stats(model, tokenizer, tiny_tasks[0], max_samples=8)


def test_mismatched_layer_sets(tiny_stats) -> None:
    full = tiny_stats[0]
    partial = FeatureStats({n: full.layers[n] for n in TINY_TARGETS[:2]}, task="part")
    with pytest.raises(ValueError, match="statistics of tasks 'sentiment' and 'part' cover different layers"):
        check_same_layers([full, partial])
    with pytest.raises(ValueError, match="statistics cover different layers"):
        full + partial
    with pytest.raises(ValueError, match="no statistics given"):
        check_same_layers([])
    narrow = FeatureStats({n: LayerStats.zeros(16) for n in TINY_TARGETS}, task="narrow")
    with pytest.raises(ValueError, match=f"size mismatch for layer '{TINY_TARGETS[0]}': 16 vs 32"):
        check_same_layers([full, narrow])


def test_collect_rejects_bad_arguments(tiny_model, tokenizer, tiny_tasks) -> None:
    with pytest.raises(TypeError, match="task must be a TaskData, got list"):
        collect_feature_stats(tiny_model, tokenizer, ["a text"])
    with pytest.raises(ValueError, match="split must be 'train' or 'test', got 'dev'"):
        collect_feature_stats(tiny_model, tokenizer, tiny_tasks[0], split="dev")
    with pytest.raises(ValueError, match=r"target_modules \['nothing'\] match no Linear"):
        collect_feature_stats(tiny_model, tokenizer, tiny_tasks[0], target_modules=["nothing"])


def test_test_split_and_target_choice(tiny_model, tokenizer, tiny_tasks) -> None:
    stats = collect_feature_stats(
        tiny_model,
        tokenizer,
        tiny_tasks[0],
        split="test",
        max_samples=None,
        target_modules=["key", "intermediate.dense", "output.dense"],
    )
    widths = {name.split(".", 4)[-1]: st.d for name, st in stats.layers.items()}
    assert widths == {
        "attention.self.key": 32,
        "attention.output.dense": 32,
        "intermediate.dense": 32,
        "output.dense": 64,
    }
    assert len(stats.layers) == 8 and len(stats.groups()) == 8
    # The pooler reads one vector per sequence, not tokens: refused with the layer named.
    with pytest.raises(ValueError, match=r"layer 'bert\.pooler\.dense': input of shape \(16, 32\)"):
        collect_feature_stats(tiny_model, tokenizer, tiny_tasks[0], split="test", target_modules=["dense"])
    assert stats.meta["split"] == "test"
    assert all(st.n_samples == len(tiny_tasks[0].test) for st in stats.layers.values())
    assert np.isfinite([st.count for st in stats.layers.values()]).all()


def test_float16_overflow_is_named(make_tiny_model, tokenizer):
    model = make_tiny_model(dtype=torch.float16)
    with torch.no_grad():
        model.bert.embeddings.LayerNorm.weight.fill_(6e4)  # the next layer's input overflows to Inf
    with pytest.raises(ValueError) as caught:
        collect_feature_stats(model, tokenizer, demo_task("sentiment", n_train=10, n_test=10))
    assert_message(str(caught.value), f"layer '{Q0}': input features contain NaN or Inf")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_give_float64_statistics(make_tiny_model, tokenizer, tiny_stats, tiny_tasks, dtype):
    stats = collect_feature_stats(make_tiny_model(dtype=dtype), tokenizer, tiny_tasks[0], max_samples=None, batch_size=8)
    ref = tiny_stats[0]  # the same weights in float64
    for name, st_ in stats.layers.items():
        assert st_.sum_outer.dtype == torch.float64 and st_.count == ref.layers[name].count
        scale = float(ref.layers[name].second_moment.abs().max())
        tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
        assert float((st_.second_moment - ref.layers[name].second_moment).abs().max()) < tol * scale
    A = osrm_subspace([stats], rank=4)[Q0]
    assert A.dtype == torch.float64
    torch.testing.assert_close(A @ A.T, torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-12)


def test_damaged_statistics_files_are_named(tmp_path):
    gen = torch.Generator().manual_seed(0)
    good = _stats(torch.randn(40, 8, generator=gen), layer=Q0)
    good.save(tmp_path / "ok.safetensors")
    assert FeatureStats.load(tmp_path / "ok.safetensors").count == 40
    bad = _stats(torch.randn(40, 8, generator=gen), layer=Q0)
    bad.layers[Q0].sum_outer[0, 0] = float("nan")
    bad.save(tmp_path / "nan.safetensors")
    with pytest.raises(ValueError) as caught:
        FeatureStats.load(tmp_path / "nan.safetensors")
    assert_message(str(caught.value), f"nan.safetensors: statistics at '{Q0}' hold NaN or Inf values")
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "ok.safetensors").read_bytes()[:100])
    with pytest.raises(ValueError, match=r"^cut\.safetensors: damaged statistics file \(.+\)$"):
        FeatureStats.load(tmp_path / "cut.safetensors")


def test_statistics_without_sample_means_hold_the_same_gram(tiny_model, tokenizer, tiny_tasks, tiny_stats) -> None:
    """``sample_means=False`` (RegMean's Gram matrices): the same ``sum h h^T``, ``sum h`` and
    counts to the bit, no per-sample means; the mean-feature OSRM variant refuses them."""
    from osrm_core.inits.osrm import osrm_mean_subspace

    grams = [collect_feature_stats(tiny_model, tokenizer, t, max_samples=None, batch_size=8, sample_means=False)
             for t in tiny_tasks[:2]]
    for got, ref in zip(grams, tiny_stats[:2], strict=False):
        assert got.groups() == ref.groups()
        for name, st in got.layers.items():
            assert torch.equal(st.sum_outer, ref.layers[name].sum_outer) and torch.equal(st.sum, ref.layers[name].sum)
            assert (st.count, st.n_samples) == (ref.layers[name].count, ref.layers[name].n_samples)
            assert st.sum_sample_mean_outer.shape == (0, 0)
    with pytest.raises(ValueError, match="hold no per-sample means"):
        osrm_mean_subspace(grams[1:], rank=2)
