"""Tests for LoRA initialization (:mod:`osrm_core.inits`): OSRM subspaces against naive float64
references and Ky Fan's bound, numbers refused with the allowed range, singular, zero and
repeated-eigenvalue statistics, and ``init_lora`` for every method."""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
from _helpers import Q0, _stats, assert_message, full
from conftest import TINY_TARGETS

from osrm_core.batching import iter_batches
from osrm_core.demo import demo_task, demo_tasks
from osrm_core.diagnostics import quadratic_trace, summed_interference
from osrm_core.inits import (
    INIT_METHODS,
    init_lora,
    osrm_gen_subspace,
    osrm_mean_subspace,
    osrm_subspace,
    rest_moment,
    task_subspaces,
)
from osrm_core.spectra import symmetric_eigh
from osrm_core.stats import FeatureStats, LayerStats, collect_feature_stats

RANK = 4
EYE = torch.eye(RANK, dtype=torch.float64)


def _others(all_stats: list[FeatureStats], i: int) -> list[FeatureStats]:
    return [s for j, s in enumerate(all_stats) if j != i]


def _naive_trace(A: torch.Tensor, S: torch.Tensor) -> float:
    return float(torch.trace(A @ S @ A.T))


def _projector(A: torch.Tensor) -> torch.Tensor:
    return A.T @ torch.linalg.solve(A @ A.T, A)


# --------------------------------------------------------------------------- OSRM subspace


@pytest.mark.parametrize("i", range(4))
def test_osrm_is_the_ky_fan_minimum(tiny_stats, random_orthonormal, i) -> None:
    others = _others(tiny_stats, i)
    A = osrm_subspace(others, RANK)  # weighting="equal": S_rest is the MEAN of the others
    assert list(A) == TINY_TARGETS
    summed = summed_interference(A, others)
    g = torch.Generator().manual_seed(i)
    for name, a in A.items():
        assert a.shape == (RANK, 32) and a.dtype == torch.float64
        torch.testing.assert_close(a @ a.T, EYE, rtol=0, atol=1e-12)
        S_sum = sum(s.layers[name].sum_outer / s.layers[name].count for s in others)
        bound = float(torch.linalg.eigvalsh(S_sum)[:RANK].sum())
        naive = sum(_naive_trace(a, s.layers[name].second_moment) for s in others)
        assert math.isclose(naive, bound, rel_tol=1e-9)
        assert math.isclose(summed[name], bound, rel_tol=1e-9)
        # Against the mean of the others' moments the bound is divided by their number.
        mean = _naive_trace(a, S_sum / len(others))
        assert math.isclose(
            mean, float(torch.linalg.eigvalsh(S_sum / len(others))[:RANK].sum()), rel_tol=1e-9
        )
        for _ in range(50):
            R = random_orthonormal(RANK, 32, g)
            assert sum(_naive_trace(R, s.layers[name].second_moment) for s in others) > bound
    # Query and value read the same input: the same subspace object.
    assert A[TINY_TARGETS[0]] is A[TINY_TARGETS[1]]


def test_osrm_weighting_and_moment(tiny_stats) -> None:
    others = tiny_stats[1:]
    name = TINY_TARGETS[2]
    counts = [s.layers[name].count for s in others]
    assert len(set(counts)) > 1  # token weighting differs from equal weighting here
    weighted = sum(s.layers[name].sum_outer for s in others) / sum(counts)
    torch.testing.assert_close(rest_moment(others, "tokens")[name], weighted, rtol=1e-12, atol=1e-14)
    a = osrm_subspace(others, RANK, weighting="tokens")[name]
    assert math.isclose(
        _naive_trace(a, weighted), float(torch.linalg.eigvalsh(weighted)[:RANK].sum()), rel_tol=1e-9
    )
    cov = sum(s.layers[name].covariance for s in others) / len(others)
    c = osrm_subspace(others, RANK, moment="covariance")[name]
    assert math.isclose(_naive_trace(c, cov), float(torch.linalg.eigvalsh(cov)[:RANK].sum()), rel_tol=1e-9)
    with pytest.raises(ValueError, match="weighting must be 'equal' or 'tokens', got 'count'"):
        osrm_subspace(others, RANK, weighting="count")


def test_osrm_gen_sees_more_own_energy_per_other_energy(tiny_stats, random_orthonormal) -> None:
    g = torch.Generator().manual_seed(0)
    for i in range(4):
        own, others = tiny_stats[i], _others(tiny_stats, i)
        gen = osrm_gen_subspace(own, others, RANK)
        plain = osrm_subspace(others, RANK)
        rest = rest_moment(others)
        for name, a in gen.items():
            torch.testing.assert_close(a @ a.T, EYE, rtol=0, atol=1e-10)
            S_own = own.layers[name].second_moment

            def ratio(M, S_own=S_own, S_rest=rest[name]):
                return _naive_trace(M, S_own) / _naive_trace(M, S_rest)

            assert ratio(a) > ratio(plain[name]), (i, name)
            assert ratio(a) > max(ratio(random_orthonormal(RANK, 32, g)) for _ in range(10)), (i, name)
            # Rows are ordered by own-task energy, largest first.
            energy = [_naive_trace(a[k : k + 1], S_own) for k in range(RANK)]
            assert energy == sorted(energy, reverse=True)
            # Naive reference: the span of the top generalized eigenvectors (scipy, full problem).
            ridge = 1e-2 * float(torch.trace(rest[name])) / 32
            _, vecs = scipy.linalg.eigh(S_own.numpy(), rest[name].numpy() + ridge * np.eye(32))
            ref = torch.from_numpy(vecs[:, -RANK:]).T
            torch.testing.assert_close(_projector(a), _projector(ref), rtol=0, atol=1e-8)


def test_osrm_mean_is_the_null_space_of_stacked_sample_means(
    tiny_model, tokenizer, tiny_tasks, tiny_stats, naive_layer_inputs
) -> None:
    others = tiny_stats[1:]
    # Every task has 40 samples, so equal weighting is the same as stacking all the means.
    assert {s.layers[TINY_TARGETS[0]].n_samples for s in others} == {40}
    A = osrm_mean_subspace(others, RANK)
    stacked = {0: [], 1: []}
    for task in tiny_tasks[1:]:
        inputs = naive_layer_inputs(tiny_model, tokenizer, task.train)
        for layer in (0, 1):
            stacked[layer] += [h.mean(0) for h in inputs[layer]]
    for layer, names in enumerate((TINY_TARGETS[:2], TINY_TARGETS[2:])):
        M = torch.stack(stacked[layer])
        assert M.shape == (120, 32)
        _, s, vh = torch.linalg.svd(M, full_matrices=True)
        ref = vh[-RANK:]
        assert s[-RANK] / s[-RANK - 1] < 0.999  # a gap, so the subspace is well defined
        for name in names:
            torch.testing.assert_close(A[name] @ A[name].T, EYE, rtol=0, atol=1e-12)
            torch.testing.assert_close(_projector(A[name]), _projector(ref), rtol=0, atol=1e-7)
    tokens = osrm_mean_subspace(others, RANK, weighting="tokens")
    torch.testing.assert_close(
        _projector(tokens[TINY_TARGETS[0]]), _projector(A[TINY_TARGETS[0]]), rtol=0, atol=1e-9
    )


def test_task_subspaces_dispatch(tiny_stats) -> None:
    for method, direct in (
        ("osrm", osrm_subspace(tiny_stats[1:], RANK)),
        ("osrm_mean", osrm_mean_subspace(tiny_stats[1:], RANK)),
        ("osrm_gen", osrm_gen_subspace(tiny_stats[0], tiny_stats[1:], RANK)),
    ):
        got = task_subspaces(method, tiny_stats, 0, RANK)
        for name in TINY_TARGETS:
            torch.testing.assert_close(got[name], direct[name], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"task_index must be in 0\.\.3, got 4"):
        task_subspaces("osrm", tiny_stats, 4, RANK)
    with pytest.raises(
        ValueError, match="method 'pissa' has no subspace; allowed: osrm, osrm_mean, osrm_gen"
    ):
        task_subspaces("pissa", tiny_stats, 0, RANK)


# --------------------------------------------------------------------------- init_lora


def _trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.filterwarnings("ignore:lora with eva initialization used with low_cpu_mem_usage")
@pytest.mark.parametrize("method", INIT_METHODS)
def test_init_lora_methods(method, make_tiny_model, tokenizer, tiny_tasks, tiny_stats) -> None:
    from peft import PeftModel

    # PiSSA's SVD init refuses float64 weights (a peft rule), so that one runs in float32.
    model = make_tiny_model(seed=1, dtype=torch.float32 if method == "pissa" else torch.float64)
    original = {n: model.get_submodule(n).weight.detach().clone() for n in TINY_TARGETS}
    kwargs: dict = {}
    if method in ("osrm", "osrm_mean", "osrm_gen"):
        kwargs["other_stats"] = tiny_stats[1:]
    if method == "osrm_gen":
        kwargs["own_stats"] = tiny_stats[0]
    if method == "eva":
        kwargs["eva_batches"] = list(
            iter_batches(tokenizer, tiny_tasks[0].train, batch_size=8, with_labels=False)
        )
    peft_model = init_lora(model, method, rank=RANK, alpha=8, **kwargs)
    assert isinstance(peft_model, PeftModel)
    assert peft_model.osrm_init_ == {"method": method, "rank": RANK, "alpha": 8, "a_scale": 1.0}
    base = peft_model.get_base_model()
    for name in TINY_TARGETS:
        layer = base.get_submodule(name)
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert A.shape == (RANK, 32) and B.shape == (32, RANK)
        assert A.requires_grad and B.requires_grad
        assert float(layer.scaling["default"]) == 2.0
        if method == "pissa":
            # The residual plus the adapter is the original weight.
            W = layer.base_layer.weight + layer.scaling["default"] * B @ A
            torch.testing.assert_close(W, original[name], rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(B, torch.zeros_like(B))
            assert torch.equal(layer.base_layer.weight, original[name])
    trainable = _trainable(peft_model)
    # The task's head is trainable, the backbone is frozen.
    assert any("classifier" in n for n in trainable)
    assert all("lora_" in n or "classifier" in n for n in trainable)
    assert not base.bert.embeddings.word_embeddings.weight.requires_grad


def test_osrm_a_is_the_scaled_subspace(make_tiny_model, tiny_stats) -> None:
    sub = osrm_subspace(tiny_stats[1:], RANK)
    peft_model = init_lora(
        make_tiny_model(seed=2), "osrm", rank=RANK, subspaces=sub, a_scale=2.5, freeze_a=True
    )
    base = peft_model.get_base_model()
    for name in TINY_TARGETS:
        layer = base.get_submodule(name)
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        torch.testing.assert_close(A, 2.5 * sub[name], rtol=0, atol=0)
        assert torch.equal(B, torch.zeros_like(B))
        assert not A.requires_grad and B.requires_grad
    # From the statistics directly: the same A.
    direct = init_lora(make_tiny_model(seed=2), "osrm", rank=RANK, other_stats=tiny_stats[1:], freeze_b=True)
    layer = direct.get_base_model().get_submodule(TINY_TARGETS[3])
    torch.testing.assert_close(layer.lora_A["default"].weight, sub[TINY_TARGETS[3]], rtol=0, atol=0)
    assert layer.lora_A["default"].weight.requires_grad and not layer.lora_B["default"].weight.requires_grad
    assert any("classifier" in n for n in _trainable(direct))


def test_standard_init_is_seeded_and_leaves_the_global_rng(make_tiny_model) -> None:
    models = [make_tiny_model(seed=3) for _ in range(3)]
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    first = init_lora(models[0], "standard", rank=RANK, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    same = init_lora(models[1], "standard", rank=RANK, seed=7)
    other = init_lora(models[2], "standard", rank=RANK, seed=8)
    assert torch.equal(torch.get_rng_state(), state)

    def a_of(m):
        return m.get_base_model().get_submodule(TINY_TARGETS[0]).lora_A["default"].weight

    assert torch.equal(a_of(first), a_of(same))
    assert not torch.equal(a_of(first), a_of(other))
    assert float(a_of(first).detach().abs().sum()) > 0


# --------------------------------------------------------------------------- bad input


def test_rank_larger_than_the_layer(tiny_stats, make_tiny_model) -> None:
    with pytest.raises(
        ValueError, match=rf"rank 33 is larger than the width 32 of layer '{TINY_TARGETS[0]}'"
    ):
        osrm_subspace(tiny_stats[1:], 33)
    with pytest.raises(ValueError, match="rank 40 is larger than the width 32"):
        osrm_mean_subspace(tiny_stats[1:], 40)
    with pytest.raises(ValueError, match="rank 33 is larger than the width 32"):
        osrm_gen_subspace(tiny_stats[0], tiny_stats[1:], 33)
    with pytest.raises(ValueError, match="rank 64 is larger than the width 32"):
        init_lora(make_tiny_model(), "standard", rank=64)
    with pytest.raises(ValueError, match="rank must be a positive integer, got 0"):
        osrm_subspace(tiny_stats[1:], 0)


def test_one_task_only(tiny_stats) -> None:
    with pytest.raises(
        ValueError, match="other_stats is empty: OSRM needs the statistics of at least one other task"
    ):
        osrm_subspace([], RANK)
    with pytest.raises(ValueError, match="other_stats is empty"):
        osrm_gen_subspace(tiny_stats[0], [], RANK)
    with pytest.raises(ValueError, match="other_stats is empty"):
        task_subspaces("osrm_mean", tiny_stats[:1], 0, RANK)
    with pytest.raises(TypeError, match="other_stats must be a list of FeatureStats, got one FeatureStats"):
        osrm_subspace(tiny_stats[1], RANK)


def test_mismatched_layers_between_tasks(tiny_stats) -> None:
    part = FeatureStats({n: tiny_stats[2].layers[n] for n in TINY_TARGETS[:2]}, task="part")
    with pytest.raises(ValueError, match="statistics of tasks 'topic' and 'part' cover different layers"):
        osrm_subspace([tiny_stats[1], part], RANK)
    with pytest.raises(ValueError, match="cover different layers"):
        osrm_gen_subspace(part, tiny_stats[1:], RANK)


def test_init_lora_rejects(make_tiny_model, tiny_stats) -> None:
    with pytest.raises(
        ValueError, match="unknown init 'lora-ga'; allowed: standard, osrm, osrm_mean"
    ):
        init_lora(make_tiny_model(), "lora-ga")
    with pytest.raises(ValueError, match="method 'osrm' needs subspaces, or other_stats"):
        init_lora(make_tiny_model(), "osrm")
    with pytest.raises(ValueError, match="method 'osrm_gen' needs subspaces, or other_stats and own_stats"):
        init_lora(make_tiny_model(), "osrm_gen", other_stats=tiny_stats[1:])
    with pytest.raises(ValueError, match="method 'eva' needs eva_batches"):
        init_lora(make_tiny_model(), "eva")
    with pytest.raises(ValueError, match="a_scale must be > 0, got 0"):
        init_lora(make_tiny_model(), "standard", a_scale=0)
    sub = osrm_subspace(tiny_stats[1:], RANK)
    with pytest.raises(ValueError, match=f"subspaces have no entry for layer '{TINY_TARGETS[3]}'"):
        init_lora(make_tiny_model(), "osrm", rank=RANK, subspaces={n: sub[n] for n in TINY_TARGETS[:3]})
    with pytest.raises(
        ValueError,
        match=rf"size mismatch for layer '{TINY_TARGETS[0]}': subspace \(4, 32\), expected \(2, 32\)",
    ):
        init_lora(make_tiny_model(), "osrm", rank=2, subspaces=sub)
    with pytest.raises(ValueError, match="eps must be > 0, got 0"):
        osrm_gen_subspace(tiny_stats[0], tiny_stats[1:], RANK, eps=0)
    wrapped = init_lora(make_tiny_model(), "standard", rank=RANK)
    with pytest.raises(ValueError, match="model already has LoRA adapters; pass the base model"):
        init_lora(wrapped, "standard", rank=RANK)


# --------------------------------------------------------------------------- packaged model


@pytest.mark.slow
def test_osrm_cuts_interference_tenfold_on_the_default_model(default_model, random_orthonormal) -> None:
    """All-MiniLM-L6-v2 and the four demo tasks, 100 samples each, rank 8: at every adapted
    layer OSRM's A sees at least 10x less of the other tasks' input energy than a random
    orthonormal A of the same rank."""
    model, tokenizer = default_model
    tasks = demo_tasks(seed=0, n_train=100, n_test=10)
    stats = [collect_feature_stats(model, tokenizer, t, max_samples=100, batch_size=50) for t in tasks]
    assert len(stats[0].layers) == 12 and stats[0].layers[next(iter(stats[0].layers))].d == 384
    g = torch.Generator().manual_seed(0)
    worst = math.inf
    for i, task in enumerate(tasks):
        others = _others(stats, i)
        A = osrm_subspace(others, 8)
        print(f"\n{task.name}: random / OSRM summed input interference on the other tasks")
        for group in stats[i].groups():
            R = random_orthonormal(8, 384, g)
            osrm = sum(quadratic_trace(A[group[0]], s.layers[group[0]].second_moment) for s in others)
            rand = sum(quadratic_trace(R, s.layers[group[0]].second_moment) for s in others)
            ratio = rand / osrm
            worst = min(worst, ratio)
            for name in group:
                print(f"  {name}: {ratio:8.1f}x")
            assert ratio >= 10, (task.name, group, ratio)
    print(f"smallest ratio: {worst:.1f}x")


def test_numbers_refused_with_the_allowed_range(tiny_stats):
    with pytest.raises(ValueError) as caught:
        osrm_subspace(tiny_stats[1:], rank=33)
    assert_message(str(caught.value), f"rank 33 is larger than the width 32 of layer '{Q0}'")
    with pytest.raises(ValueError) as caught:
        osrm_subspace(tiny_stats[1:], rank=0)
    assert_message(str(caught.value), "rank must be a positive integer, got 0")
    with pytest.raises(ValueError) as caught:
        symmetric_eigh(torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]]))
    assert_message(str(caught.value), "matrix contains NaN or Inf")
    with pytest.raises(ValueError) as caught:
        symmetric_eigh(torch.tensor([[1.0, 2.0], [0.0, 1.0]]))
    assert_message(str(caught.value), "matrix is not symmetric")


def test_few_tokens_warn(tokenizer, tiny_model):
    few = _stats(torch.randn(5, 32, generator=torch.Generator().manual_seed(0)))
    with pytest.warns(UserWarning) as caught:
        A = osrm_subspace([few], rank=8)["layer"]
    assert [str(w.message) for w in caught] == [
        "OSRM rank 8 at 'layer': the other tasks' statistics rest on 5 tokens, fewer than the width 32; "
        "at least 27 directions carry none of their energy, and the choice among them is a fixed rule, "
        "not the data (collect more samples)"
    ]
    torch.testing.assert_close(A @ A.T, torch.eye(8, dtype=torch.float64), rtol=0, atol=1e-12)
    assert float(torch.trace(A @ few.layers["layer"].second_moment @ A.T)) < 1e-12  # in the null space
    # A tiny task: the statistics rest on fewer tokens than the width.
    tiny = demo_task("sentiment", n_train=10, n_test=10)
    tiny.train = tiny.train.head(1)
    with pytest.warns(UserWarning) as caught:
        collect_feature_stats(tiny_model, tokenizer, tiny, max_samples=None)
    assert len(caught) == 1
    assert_message(str(caught[0].message), full(
        rf"task 'sentiment': statistics at '{re.escape(Q0)}' rest on \d+ tokens, fewer than the width 32; "
        r"the second moment is rank-deficient"))


def test_singular_and_zero_statistics():
    gen = torch.Generator().manual_seed(0)
    rank_one = _stats(torch.randn(40, 1, generator=gen) @ torch.randn(1, 16, generator=gen))
    nearly = _stats(torch.randn(40, 16, generator=gen) * torch.logspace(0, -9, 16, dtype=torch.float64))
    zero = FeatureStats({"layer": LayerStats.zeros(16)}, task="z")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zero tokens: the few-tokens warning, checked above
        for others in ([rank_one], [nearly], [zero], [rank_one, zero]):
            A = osrm_subspace(others, rank=4)["layer"]
            torch.testing.assert_close(A @ A.T, torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-10)
            rest = sum(s.layers["layer"].second_moment for s in others) / len(others)
            lowest = torch.linalg.eigvalsh(rest)[:4].sum()
            assert math.isclose(float(torch.trace(A @ rest @ A.T)), float(lowest), abs_tol=1e-9 * float(rest.abs().max()) + 1e-300)
            G = osrm_gen_subspace(nearly, others, rank=4)["layer"]  # S_rest + ridge stays invertible
            torch.testing.assert_close(G @ G.T, torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-10)
    # No tokens at all: the canonical basis of the whole space, the first unit vectors.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        A = osrm_subspace([zero], rank=3)["layer"]
    torch.testing.assert_close(A, torch.eye(16, dtype=torch.float64)[:3], rtol=0, atol=1e-12)


@pytest.mark.filterwarnings("ignore:OSRM rank")
def test_repeated_eigenvalues_give_one_choice():
    """The same matrix built from two bases of its repeated eigenspaces: eigh returns different
    eigenvectors for them, OSRM's subspace is the same (a fixed rule, not rounding noise)."""
    gen = torch.Generator().manual_seed(1)
    d = 12
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    lam = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 2, 3, 4, 5], dtype=torch.float64)
    Q2 = Q.clone()
    for a, b in ((0, 5), (5, 8)):
        U, _ = torch.linalg.qr(torch.randn(b - a, b - a, generator=gen, dtype=torch.float64))
        Q2[:, a:b] = Q[:, a:b] @ U
    M1, M2 = Q @ torch.diag(lam) @ Q.T, Q2 @ torch.diag(lam) @ Q2.T
    assert float((M1 - M2).abs().max()) < 1e-14
    # (torch.linalg.eigh's first three eigenvectors of M1 and M2 differ by about 0.7 here.)
    for k in (3, 5, 7):  # cuts inside the 5-fold and the 3-fold eigenvalue
        A1 = osrm_subspace([FeatureStats({"l": LayerStats(M1, torch.zeros(d, dtype=torch.float64), 1, M1, 1)})], k)["l"]
        A2 = osrm_subspace([FeatureStats({"l": LayerStats(M2, torch.zeros(d, dtype=torch.float64), 1, M2, 1)})], k)["l"]
        torch.testing.assert_close(A1, A2, rtol=0, atol=1e-10)
    spectrum = symmetric_eigh(M1)
    V = spectrum.eigenvectors
    torch.testing.assert_close(M1 @ V, V * spectrum.eigenvalues, rtol=0, atol=1e-12)
    torch.testing.assert_close(V.T @ V, torch.eye(d, dtype=torch.float64), rtol=0, atol=1e-12)
