"""Projected statistics: every number of the interference and own-energy tables equals the dense
path's and a naive float64 loop over the real tokens, on the packaged default model and on a
tiny LLaMA with plain-peft adapters on all seven linear kinds (the scale test bed, shrunk)."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch
from _helpers import Q0, assert_message, random_adapters

from bench.scale_model import build_testbed
from osrm_core.adapters import Adapter, LoraWeights, load_adapter, union_layers
from osrm_core.batching import iter_batches
from osrm_core.data import load_task
from osrm_core.demo import demo_tasks
from osrm_core.diagnostics import interference_table, own_energy_table, row_space
from osrm_core.memory import MemoryPlanError, check_fits, dense_stats_bytes
from osrm_core.models import decoder_position_ids, weight_as_linear
from osrm_core.stats import collect_feature_stats, collect_projected_stats
from osrm_core.workflows import diagnose_adapters

COLUMNS = ["input_energy", "output_shift", "relative_shift"]


def _naive(model, tokenizer, task, adapters, max_length) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The tables from the layers' inputs, one example at a time (no padding), all in float64."""
    layers = union_layers(adapters)
    inputs: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    handles = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, args, n=n: inputs[n].append(args[0][0].to(torch.float64))) for n in layers]
    try:
        with torch.no_grad():
            for batch in iter_batches(tokenizer, task.train, batch_size=1, max_length=max_length, with_labels=False):
                model(**decoder_position_ids(batch, model))
    finally:
        for h in handles:
            h.remove()
    rows, own = [], []
    for name in layers:
        h = torch.cat(inputs[name])
        w0 = weight_as_linear(model.get_submodule(name)).detach().to(torch.float64)
        base = float(((h @ w0.T) ** 2).sum(1).mean())
        for j, adapter in adapters.items():
            if name not in adapter.layers:
                continue
            lw = adapter.layers[name]
            a, b = lw.A.to(torch.float64), lw.B.to(torch.float64)
            shift = float(((lw.scale * (h @ a.T) @ b.T) ** 2).sum(1).mean())
            rows.append({"layer": name, "adapter": j, "data": task.name, "input_energy": float(((h @ a.T) ** 2).sum(1).mean()),
                         "output_shift": shift, "relative_shift": shift / base})
            if j == task.name:
                p = row_space(lw.A).T
                own.append({"task": j, "layer": name, "share": float(((h @ p.T) ** 2).sum() / (h**2).sum())})
    return pd.DataFrame(rows), pd.DataFrame(own)


def _compare(model, tokenizer, tasks, adapters, max_length) -> None:
    dense = {t.name: collect_feature_stats(model, tokenizer, t, max_samples=None, batch_size=3,
                                           max_length=max_length, target_modules=list(union_layers(adapters)))
             for t in tasks}
    projected = {t.name: collect_projected_stats(model, tokenizer, t, adapters, max_samples=None, batch_size=3,
                                                 max_length=max_length) for t in tasks}
    w0 = {n: weight_as_linear(model.get_submodule(n)).detach() for n in union_layers(adapters)}
    keys = ["layer", "adapter", "data"]
    p_table = interference_table(adapters, projected).sort_values(keys).reset_index(drop=True)
    d_table = interference_table(adapters, dense, w0).sort_values(keys).reset_index(drop=True)
    naive = pd.concat([_naive(model, tokenizer, t, adapters, max_length)[0] for t in tasks])
    naive = naive.sort_values(keys).reset_index(drop=True)
    assert len(p_table) == len(naive) > 0
    assert (p_table[keys] == naive[keys]).all().all() and (d_table[keys] == naive[keys]).all().all()
    for col in COLUMNS:
        np.testing.assert_allclose(p_table[col], d_table[col], rtol=1e-11, atol=0)
        np.testing.assert_allclose(p_table[col], naive[col], rtol=1e-11, atol=0)
    p_own = own_energy_table(adapters, projected).sort_values(["task", "layer"]).reset_index(drop=True)
    d_own = own_energy_table(adapters, dense).sort_values(["task", "layer"]).reset_index(drop=True)
    n_own = pd.concat([_naive(model, tokenizer, t, adapters, max_length)[1] for t in tasks])
    n_own = n_own.sort_values(["task", "layer"]).reset_index(drop=True)
    for frame in (d_own, n_own):
        np.testing.assert_allclose(p_own["share"], frame["share"], rtol=1e-10, atol=0)
    np.testing.assert_array_equal(p_own["random_share"], d_own["random_share"])


def test_projected_equals_dense_and_naive_on_the_default_model(default_model) -> None:
    model, tokenizer = default_model
    model = copy.deepcopy(model).double()  # W0 h from the layer's output is then float64 too
    tasks = demo_tasks(seed=0, n_train=10, n_test=10)[:2]
    layers = [f"bert.encoder.layer.{k}.attention.self.{kind}" for k in (0, 5) for kind in ("query", "value")]
    layers.append("bert.encoder.layer.3.output.dense")  # a 1536-wide input
    adapters = random_adapters(model, [t.name for t in tasks], layers, rank=4)
    _compare(model, tokenizer, tasks, adapters, max_length=24)


@pytest.fixture(scope="module")
def small_llama(tmp_path_factory):
    """The scale test bed at test size, float64, with four plain-peft adapters."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    paths = build_testbed(tmp_path_factory.mktemp("bed"), adapters=4, texts=5, tokens=12)
    model = AutoModelForCausalLM.from_pretrained(paths["model"], dtype=torch.float64).eval()
    return model, AutoTokenizer.from_pretrained(paths["model"]), paths


def test_projected_equals_dense_and_naive_on_a_llama_with_peft_adapters(small_llama) -> None:
    model, tokenizer, paths = small_llama
    loaded = {f"t{k}": load_adapter(p) for k, p in enumerate(paths["adapters"].values())}
    tasks = [load_task(f"t{k}", paths["tasks"]["ab"[k % 2]]) for k in range(4)]
    adapters = {n: Adapter({k: LoraWeights(lw.A.double(), lw.B.double(), lw.scale) for k, lw in a.layers.items()},
                           {}, a.config) for n, a in loaded.items()}
    assert len(union_layers(adapters)) == 14  # seven kinds x two blocks
    _compare(model, tokenizer, tasks, adapters, max_length=16)


def test_diagnosis_from_projected_statistics(small_llama) -> None:
    model, tokenizer, paths = small_llama
    adapters = {f"t{k}": load_adapter(p) for k, p in enumerate(list(paths["adapters"].values())[:2])}
    tasks = [load_task("t0", paths["tasks"]["a"]), load_task("t1", paths["tasks"]["b"])]
    stats = {t.name: collect_projected_stats(model, tokenizer, t, adapters, max_samples=None) for t in tasks}
    result = diagnose_adapters(model, adapters, stats)
    assert result.angles.empty and result.posthoc.empty and result.projected == {}
    assert set(result.interference["init"]) == {"uploaded"}
    assert result.matrix.shape == (2, 2) and bool((result.matrix.to_numpy() > 0).all())
    assert "layers each adapter covers" in result.to_text()
    assert "post-hoc OSRM energy kept (mean over layers)\nleft out: projected statistics" in result.to_text()
    other = {n: Adapter({k: LoraWeights(lw.A * 2, lw.B, lw.scale) for k, lw in a.layers.items()}, {}, a.config)
             for n, a in adapters.items()}
    with pytest.raises(ValueError, match="not the one the projected statistics were taken with"):
        interference_table(other, stats)


@pytest.mark.parametrize("batch_size", [1, 4])  # 1: no padding (every row real); 4: padded rows gathered
def test_chunks_of_real_tokens_change_no_sum(default_model, monkeypatch, batch_size) -> None:
    """The real tokens are gathered and cast a chunk at a time into buffers held from batch to
    batch: chunks of 7 tokens (a short last one each batch) give the sums of one chunk a batch."""
    from osrm_core.stats import stream

    model, tokenizer = default_model
    task = demo_tasks(seed=0, n_train=10, n_test=10)[0]
    adapters = random_adapters(model, [task.name, "other"], [Q0, "bert.encoder.layer.3.output.dense"], rank=3)
    kwargs = {"max_samples": None, "batch_size": batch_size, "max_length": 24}
    whole = collect_projected_stats(model, tokenizer, task, adapters, **kwargs)
    monkeypatch.setattr(stream, "CHUNK_TOKENS", 7)
    chunked = collect_projected_stats(model, tokenizer, task, adapters, **kwargs)
    for name, layer in whole.layers.items():
        other = chunked.layers[name]
        assert other.count == layer.count > 7 * 3
        torch.testing.assert_close(other.sum_outer, layer.sum_outer, rtol=1e-12, atol=1e-12)
        for field in ("sum_sq", "base_sq"):
            torch.testing.assert_close(getattr(other, field), getattr(layer, field), rtol=1e-12, atol=0)


def test_dense_statistics_that_do_not_fit_are_refused_in_one_line() -> None:
    widths = {f"model.layers.{k}.mlp.down_proj": 14336 for k in range(32)}
    need = dense_stats_bytes(widths, tasks=2)
    assert need == 2 * 32 * (2 * 14336**2 + 14336) * 8
    with pytest.raises(MemoryPlanError, match=r"^dense statistics needs \d+\.\d GiB, \d+\.\d GiB available: use"):
        check_fits(need * 10**6, "dense statistics", "use --stats projected")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_overflowing_features_are_named(make_tiny_model, tokenizer, dtype):
    """A float16 model whose features overflow to Inf: refused with the layer named, in either
    accumulation dtype (the check reads the chunk's sum of squares, then its entries)."""
    model = make_tiny_model(dtype=torch.float16)
    with torch.no_grad():
        model.bert.embeddings.LayerNorm.weight.fill_(6e4)  # the next layer's input overflows to Inf
    adapters = random_adapters(model, ["a"], [Q0], 2)
    with pytest.raises(ValueError) as caught:
        collect_projected_stats(model, tokenizer, demo_tasks(seed=0, n_train=10, n_test=10)[0], adapters,
                                dtype=dtype)
    assert_message(str(caught.value), f"layer '{Q0}': input features contain NaN or Inf")
