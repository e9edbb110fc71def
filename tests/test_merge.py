"""Tests of osrm_core.merge: each method against a naive reference, properties, error paths."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from osrm_core.merge import (
    MERGE_METHODS,
    MergeMethod,
    get_merge_method,
    low_rank_factors,
    merge_deltas,
    merge_layer,
    stack_lora_factors,
)
from osrm_core.merge.knots import knots_basis

F64 = torch.float64
NAMES = [
    "task_arithmetic", "ties", "dare_linear", "dare_ties", "regmean", "knots_ta", "knots_ties",
    "tsv_m", "iso_c", "iso_cts", "cart",
]


def lora_deltas(n_tasks=3, d_out=6, d_in=5, rank=2):
    """Low-rank deltas B_i A_i like those of LoRA adapters, float64."""
    return [
        torch.randn(d_out, rank, dtype=F64) @ torch.randn(rank, d_in, dtype=F64)
        for _ in range(n_tasks)
    ]


def grams_for(n_tasks=3, d_in=5, tokens=40):
    xs = [
        torch.randn(tokens, d_in, dtype=F64) * torch.rand(d_in, dtype=F64) for _ in range(n_tasks)
    ]
    return [x.T @ x for x in xs]


# ---------------------------------------------------------------- naive references (numpy, loops)


def ref_trim(x, density):
    """Keep the int(density * n) largest-magnitude entries of x."""
    flat = x.ravel().copy()
    k = int(density * flat.size)
    order = sorted(range(flat.size), key=lambda j: -abs(flat[j]))
    out = np.zeros_like(flat)
    for j in order[:k]:
        out[j] = flat[j]
    return out.reshape(x.shape)


def ref_elect_mean(xs, method="total"):
    """Per entry: elected sign, then the mean of the entries that carry it."""
    xs = [np.asarray(x) for x in xs]
    out = np.zeros_like(xs[0])
    for idx in np.ndindex(out.shape):
        vals = [x[idx] for x in xs]
        if method == "total":
            score = sum(vals)
        else:
            score = sum(np.sign(v) for v in vals)
        sign = 1.0 if score >= 0 else -1.0
        agree = [v for v in vals if v != 0 and np.sign(v) == sign]
        out[idx] = sum(agree) / len(agree) if agree else 0.0
    return out


def ref_ties(deltas, density, method="total"):
    return ref_elect_mean([ref_trim(d.numpy(), density) for d in deltas], method)


def ref_dare_masks(shape, n_tasks, density, seed):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.bernoulli(torch.full(shape, density, dtype=F64), generator=g).numpy()
        for _ in range(n_tasks)
    ]


def ref_regmean(deltas, grams, alpha):
    gt = [alpha * g.numpy() + (1 - alpha) * np.diag(np.diag(g.numpy())) for g in grams]
    num = sum(d.numpy() @ g for d, g in zip(deltas, gt, strict=True))
    return num @ np.linalg.inv(sum(gt))


def ref_knots(deltas, merge_blocks):
    joint = np.concatenate([d.numpy() for d in deltas], axis=1)
    u, s, vh = np.linalg.svd(joint, full_matrices=False)
    k = int((s > s.max() * max(joint.shape) * np.finfo(np.float64).eps).sum())
    for j in range(k):  # sign convention: largest-magnitude entry of each column of U positive
        if u[np.argmax(np.abs(u[:, j])), j] < 0:
            u[:, j], vh[j] = -u[:, j], -vh[j]
    d_in = deltas[0].shape[1]
    blocks = [vh[:k, i * d_in : (i + 1) * d_in] for i in range(len(deltas))]
    return (u[:, :k] * s[:k]) @ merge_blocks(blocks), k


def t(x):
    return torch.as_tensor(np.asarray(x), dtype=F64)


# ------------------------------------------------------------------------------------ registry


def test_registry_declares_every_method():
    assert list(MERGE_METHODS) == NAMES
    for name, cls in MERGE_METHODS.items():
        assert cls.name == name
        assert cls.reference.startswith("https://arxiv.org/abs/")
        assert dataclasses.is_dataclass(cls.params_type)
        for f in dataclasses.fields(cls.params_type):
            assert f.metadata["help"]
        method = get_merge_method(name)
        assert isinstance(method, MergeMethod)
        assert cls.needs_gram == (name == "regmean")
        assert cls.uses_density == (name in {"ties", "dare_linear", "dare_ties", "knots_ties"})
        assert ("density" in [p.name for p in cls.param_specs()]) == cls.uses_density
    assert get_merge_method("ties").params.density == 0.5
    assert get_merge_method("regmean").params.alpha == 0.9
    assert "density=0.3" in repr(get_merge_method("dare_ties", density=0.3))


# ----------------------------------------------------------------------------- task arithmetic


def test_task_arithmetic_is_scaled_sum():
    torch.manual_seed(0)
    deltas = lora_deltas()
    ref = 0.7 * (deltas[0].numpy() + deltas[1].numpy() + deltas[2].numpy())
    assert_close(merge_layer(deltas, "task_arithmetic", lam=0.7), t(ref))


def test_task_arithmetic_one_task_is_scaled_delta():
    torch.manual_seed(1)
    (delta,) = lora_deltas(1)
    assert_close(merge_layer([delta], "task_arithmetic", lam=0.3), 0.3 * delta)


# ------------------------------------------------------------------------------------------ TIES


@pytest.mark.parametrize("density", [0.2, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("sign_method", ["total", "frequency"])
def test_ties_matches_naive_reference(density, sign_method):
    torch.manual_seed(2)
    deltas = [torch.randn(6, 5, dtype=F64) for _ in range(3)]
    got = merge_layer(deltas, "ties", lam=1.5, density=density, majority_sign_method=sign_method)
    assert_close(got, t(1.5 * ref_ties(deltas, density, sign_method)))


def test_ties_density_one_identical_deltas_is_that_delta():
    torch.manual_seed(3)
    (delta,) = lora_deltas(1)
    assert_close(merge_layer([delta, delta.clone()], "ties", density=1.0), delta)


# ------------------------------------------------------------------------------------------ DARE


@pytest.mark.parametrize("density", [0.3, 0.7])
def test_dare_linear_matches_explicit_masks(density):
    torch.manual_seed(4)
    deltas = lora_deltas()
    g = torch.Generator().manual_seed(11)
    got = merge_layer(deltas, "dare_linear", lam=0.5, generator=g, density=density)
    masks = ref_dare_masks((6, 5), 3, density, seed=11)
    ref = np.zeros((6, 5))
    for d, m in zip(deltas, masks, strict=True):
        for idx in np.ndindex(ref.shape):
            ref[idx] += d.numpy()[idx] / density if m[idx] else 0.0
    assert_close(got, t(0.5 * ref))


@pytest.mark.parametrize("sign_method", ["total", "frequency"])
def test_dare_ties_matches_explicit_masks(sign_method):
    torch.manual_seed(5)
    deltas = lora_deltas()
    g = torch.Generator().manual_seed(12)
    got = merge_layer(
        deltas, "dare_ties", generator=g, density=0.6, majority_sign_method=sign_method
    )
    masks = ref_dare_masks((6, 5), 3, 0.6, seed=12)
    dropped = [d.numpy() * m / 0.6 for d, m in zip(deltas, masks, strict=True)]
    assert_close(got, t(ref_elect_mean(dropped, sign_method)))


def test_dare_statistics_and_reproducibility():
    torch.manual_seed(6)
    delta = torch.randn(200, 100, dtype=F64)
    a = merge_layer([delta], "dare_linear", generator=torch.Generator().manual_seed(3), density=0.3)
    b = merge_layer([delta], "dare_linear", generator=torch.Generator().manual_seed(3), density=0.3)
    c = merge_layer([delta], "dare_linear", generator=torch.Generator().manual_seed(4), density=0.3)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    kept = a != 0
    assert abs(kept.double().mean().item() - 0.3) < 0.02
    assert_close(a[kept], delta[kept] / 0.3)
    # without a generator the default seed makes it reproducible too
    assert torch.equal(merge_layer([delta], "dare_ties"), merge_layer([delta], "dare_ties"))


def test_dare_expectation_is_task_arithmetic():
    torch.manual_seed(7)
    deltas = lora_deltas(3, 4, 3)
    g = torch.Generator().manual_seed(0)
    runs = torch.stack(
        [merge_layer(deltas, "dare_linear", generator=g, density=0.5) for _ in range(4000)]
    )
    ta = merge_layer(deltas, "task_arithmetic")
    scale = ta.abs().max().item()
    assert_close(runs.mean(dim=0), ta, atol=0.1 * scale, rtol=0.0)


def test_dare_density_one_is_task_arithmetic():
    torch.manual_seed(8)
    deltas = lora_deltas()
    assert_close(
        merge_layer(deltas, "dare_linear", density=1.0), merge_layer(deltas, "task_arithmetic")
    )


# --------------------------------------------------------------------------------------- RegMean


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.9, 1.0])
def test_regmean_matches_explicit_inverse(alpha):
    torch.manual_seed(9)
    deltas, grams = lora_deltas(), grams_for()
    got = merge_layer(deltas, "regmean", gram=grams, alpha=alpha)
    assert_close(got, t(ref_regmean(deltas, grams, alpha)), rtol=1e-6, atol=1e-9)


def test_regmean_identical_grams_is_average():
    torch.manual_seed(10)
    deltas = lora_deltas()
    (gram,) = grams_for(1)
    got = merge_layer(deltas, "regmean", gram=[gram] * 3, alpha=0.7)
    assert_close(got, sum(deltas) / 3, rtol=1e-6, atol=1e-9)


def test_regmean_one_task_alpha_one_reproduces_delta():
    torch.manual_seed(11)
    (delta,), (gram,) = lora_deltas(1), grams_for(1)
    # the ridge (1e-8 of each diagonal entry) moves the result at relative order 1e-8 * cond
    got = merge_layer([delta], "regmean", gram=[gram], alpha=1.0)
    assert_close(got, delta, rtol=1e-5, atol=1e-9)


def test_regmean_singular_gram_keeps_outputs_on_task_inputs():
    torch.manual_seed(12)
    (delta,) = lora_deltas(1, 6, 8)
    x = torch.randn(3, 8, dtype=F64)  # fewer tokens than d_in: the Gram is singular
    got = merge_layer([delta], "regmean", gram=[x.T @ x], alpha=1.0)
    assert torch.isfinite(got).all()
    assert_close(x @ got.T, x @ delta.T, rtol=1e-5, atol=1e-6)


def test_regmean_from_gram_only_statistics_equals_the_full_statistics_merge(default_model):
    """What ``osrm merge``/``sweep``/``advise`` collect for RegMean now (``sum h h^T`` and ``sum h`` at
    the adapters' layers, in the chosen dtype) against the float64 statistics with per-sample means
    they collected before, on the packaged MiniLM: the same merge to the bit in float64, within
    1e-5 relative in float32 (measured: 2.3e-6)."""
    from _helpers import random_adapters

    from osrm_core.demo import demo_tasks
    from osrm_core.export import merge_adapters
    from osrm_core.stats import collect_feature_stats
    from osrm_core.workflows import task_stats

    model, tokenizer = default_model
    tasks = demo_tasks(seed=0, n_train=24, n_test=10)[:2]
    layers = [f"bert.encoder.layer.{k}.attention.self.{kind}" for k in (0, 4) for kind in ("query", "value")]
    layers.append("bert.encoder.layer.2.output.dense")  # a 1536-wide input
    adapters = random_adapters(model, [t.name for t in tasks], layers, rank=4)
    full = {t.name: collect_feature_stats(model, tokenizer, t, max_samples=None, max_length=32, target_modules=layers)
            for t in tasks}
    ref = merge_adapters(adapters, "regmean", stats=full)
    errors = {}
    for dtype in (torch.float64, torch.float32):
        grams = task_stats(model, tokenizer, tasks, samples=None, max_length=32, target_modules=layers, dtype=dtype,
                           sample_means=False)
        assert all(st.sum_sample_mean_outer.numel() == 0 and st.sum_outer.dtype == dtype
                   for g in grams.values() for st in g.layers.values())
        got = merge_adapters(adapters, "regmean", stats=grams)
        errors[dtype] = max(float((got[n] - ref[n]).norm() / ref[n].norm()) for n in ref)
    assert errors[torch.float64] == 0.0 and errors[torch.float32] < 1e-5, errors


# ----------------------------------------------------------------------------------------- KnOTS


def test_knots_basis_is_exact():
    torch.manual_seed(13)
    deltas = lora_deltas(3, 8, 5, rank=2)
    u, s, blocks = knots_basis(deltas)
    assert u.shape == (8, 6) and s.shape == (6,)
    for d, v in zip(deltas, blocks, strict=True):
        assert v.shape == (6, 5)
        assert_close((u * s) @ v, d)


def test_knots_ta_is_task_arithmetic():
    torch.manual_seed(14)
    deltas = lora_deltas(3, 8, 5, rank=2)
    assert_close(
        merge_layer(deltas, "knots_ta", lam=0.4), merge_layer(deltas, "task_arithmetic", lam=0.4)
    )


def test_knots_ta_matches_numpy_svd():
    torch.manual_seed(15)
    deltas = lora_deltas(3, 8, 5, rank=2)
    ref, k = ref_knots(deltas, lambda blocks: sum(blocks))
    assert k == 6
    assert_close(merge_layer(deltas, "knots_ta"), t(ref))


@pytest.mark.parametrize("density", [0.3, 1.0])
@pytest.mark.parametrize("sign_method", ["total", "frequency"])
def test_knots_ties_matches_numpy_svd(density, sign_method):
    torch.manual_seed(16)
    deltas = lora_deltas(3, 8, 5, rank=2)

    def ties_blocks(blocks):
        return ref_elect_mean([ref_trim(b, density) for b in blocks], sign_method)

    ref, k = ref_knots(deltas, ties_blocks)
    assert k == knots_basis(deltas)[1].numel() == 6
    got = merge_layer(deltas, "knots_ties", density=density, majority_sign_method=sign_method)
    assert_close(got, t(ref))


def test_knots_zero_deltas_give_zero():
    zeros = [torch.zeros(4, 3, dtype=F64)] * 2
    for name in ("knots_ta", "knots_ties"):
        assert torch.equal(merge_layer(zeros, name), torch.zeros(4, 3, dtype=F64))


# --------------------------------------------------------------------------------- merge_deltas


def layered(n_tasks=3):
    shapes = {"enc.0.query": (6, 5), "enc.0.value": (6, 5), "enc.1.query": (4, 7)}
    deltas = [
        {name: torch.randn(*shape, dtype=F64) for name, shape in shapes.items()}
        for _ in range(n_tasks)
    ]
    grams = [
        {
            name: g
            for name, g in zip(
                shapes, [grams_for(1, s[1])[0] for s in shapes.values()], strict=True
            )
        }
        for _ in range(n_tasks)
    ]
    return deltas, grams


@pytest.mark.parametrize("name", NAMES)
def test_merge_deltas_equals_per_layer_merge_in_sorted_order(name):
    torch.manual_seed(17)
    deltas, grams = layered()
    got = merge_deltas(deltas, name, lam=0.6, grams=grams, seed=5)
    assert list(got) == list(deltas[0])
    g = torch.Generator().manual_seed(5)
    for layer in sorted(deltas[0]):
        ref = merge_layer(
            [d[layer] for d in deltas], name, lam=0.6, gram=[gm[layer] for gm in grams], generator=g
        )
        assert torch.equal(got[layer], ref)
    again = merge_deltas(deltas, get_merge_method(name), lam=0.6, grams=grams, seed=5)
    assert all(torch.equal(got[k], again[k]) for k in got)


def test_merge_deltas_seed_changes_dare_only():
    torch.manual_seed(18)
    deltas, _ = layered()
    a, b = merge_deltas(deltas, "dare_ties", seed=1), merge_deltas(deltas, "dare_ties", seed=2)
    assert not torch.equal(a["enc.0.query"], b["enc.0.query"])
    a, b = merge_deltas(deltas, "ties", seed=1), merge_deltas(deltas, "ties", seed=2)
    assert torch.equal(a["enc.0.query"], b["enc.0.query"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", NAMES)
def test_output_keeps_input_dtype(name, dtype):
    torch.manual_seed(19)
    deltas, grams = layered(2)
    low = [{k: v.to(dtype) for k, v in d.items()} for d in deltas]
    got = merge_deltas(low, name, grams=grams)
    ref = merge_deltas([{k: v.double() for k, v in d.items()} for d in low], name, grams=grams)
    tol = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    for k in got:
        assert got[k].dtype == dtype
        # computed in float32: only the final rounding to the input dtype differs
        assert_close(got[k].double(), ref[k], rtol=tol, atol=tol * ref[k].abs().max().item())


# ------------------------------------------------------------------------------------- factors


def test_low_rank_factors_exact_at_numerical_rank():
    torch.manual_seed(20)
    (delta,) = lora_deltas(1, 7, 5, rank=3)
    b, a = low_rank_factors(delta)
    assert b.shape == (7, 3) and a.shape == (3, 5)
    assert_close(b @ a, delta)
    assert_close(b.T @ b, a @ a.T)  # sqrt(S) split evenly: both are diag(S)
    b2, a2 = low_rank_factors(delta)
    assert torch.equal(b, b2) and torch.equal(a, a2)


def test_low_rank_factors_truncation_is_best_approximation():
    torch.manual_seed(21)
    delta = torch.randn(7, 5, dtype=F64)
    b, a = low_rank_factors(delta, rank=2)
    u, s, vh = np.linalg.svd(delta.numpy())
    assert_close(b @ a, t((u[:, :2] * s[:2]) @ vh[:2]))
    assert low_rank_factors(torch.zeros(3, 4))[0].shape == (3, 1)


def test_stack_lora_factors_exact():
    torch.manual_seed(22)
    factors = [(torch.randn(6, r, dtype=F64), torch.randn(r, 5, dtype=F64)) for r in (2, 3, 1)]
    weights = [0.5, -1.0, 2.0]
    b, a = stack_lora_factors(factors, weights)
    assert b.shape == (6, 6) and a.shape == (6, 5)
    ref = sum(w * bi.numpy() @ ai.numpy() for (bi, ai), w in zip(factors, weights, strict=True))
    assert_close(b @ a, t(ref))
    # the same as task arithmetic on the weighted deltas
    weighted = [w * bi @ ai for (bi, ai), w in zip(factors, weights, strict=True)]
    assert_close(b @ a, merge_layer(weighted, "task_arithmetic"))


# ---------------------------------------------------------------------------------- error paths


def test_unknown_method_lists_known_names():
    with pytest.raises(
        ValueError, match="unknown merge method 'avg'; known: task_arithmetic, ties"
    ):
        get_merge_method("avg")
    with pytest.raises(ValueError, match="knots_ties"):
        merge_layer(lora_deltas(), "avg")


@pytest.mark.parametrize("name", ["ties", "dare_linear", "dare_ties", "knots_ties"])
@pytest.mark.parametrize("density", [0, 0.0, -0.1, 1.5, float("nan"), "0.5", True])
def test_density_out_of_range(name, density):
    with pytest.raises(ValueError, match=r"density must be a number in \(0.0, 1.0\], got"):
        get_merge_method(name, density=density)


def test_invalid_params():
    with pytest.raises(
        ValueError, match="majority_sign_method must be one of 'total', 'frequency'"
    ):
        get_merge_method("ties", majority_sign_method="mean")
    with pytest.raises(ValueError, match=r"alpha must be a number in \[0.0, 1.0\], got 1.2"):
        get_merge_method("regmean", alpha=1.2)
    with pytest.raises(ValueError, match="unknown parameter dens=0.5 .* allowed: density"):
        get_merge_method("dare_linear", dens=0.5)
    with pytest.raises(ValueError, match="unknown parameter density=0.5 .* allowed: none"):
        merge_layer(lora_deltas(), "task_arithmetic", density=0.5)
    with pytest.raises(ValueError, match="given with a MergeMethod object"):
        merge_layer(lora_deltas(), get_merge_method("ties"), density=0.5)
    with pytest.raises(TypeError, match="method must be a name or a MergeMethod"):
        merge_layer(lora_deltas(), 3)


@pytest.mark.parametrize("lam", [-0.1, float("nan"), float("inf"), "1"])
def test_bad_lam(lam):
    with pytest.raises(ValueError, match=r"lam must be a number in \[0.0, inf\)"):
        merge_layer(lora_deltas(), "task_arithmetic", lam=lam)
    deltas, _ = layered()
    with pytest.raises(ValueError, match="lam must be"):
        merge_deltas(deltas, "ties", lam=lam)


def test_missing_or_bad_gram_for_regmean():
    torch.manual_seed(23)
    deltas = lora_deltas()
    with pytest.raises(ValueError, match="'regmean' needs the Gram matrices"):
        merge_layer(deltas, "regmean")
    with pytest.raises(ValueError, match="need 3 Gram matrices"):
        merge_layer(deltas, "regmean", gram=grams_for(2))
    with pytest.raises(
        ValueError, match=r"size mismatch: Gram matrix of task 1 has shape \(4, 4\)"
    ):
        merge_layer(deltas, "regmean", gram=[grams_for(1)[0], grams_for(1, 4)[0], grams_for(1)[0]])
    with pytest.raises(ValueError, match="all zero"):
        merge_layer(deltas, "regmean", gram=[torch.zeros(5, 5, dtype=F64)] * 3)
    layers, grams = layered()
    with pytest.raises(ValueError, match="'regmean' needs grams"):
        merge_deltas(layers, "regmean")
    del grams[2]["enc.1.query"]
    with pytest.raises(ValueError, match="Gram matrix of layer 'enc.1.query' missing from task 2"):
        merge_deltas(layers, "regmean", grams=grams)
    # other methods ignore grams
    merge_layer(deltas, "ties", gram=[torch.zeros(1)])


def test_mismatched_layers_and_shapes():
    torch.manual_seed(24)
    deltas, _ = layered()
    del deltas[2]["enc.0.value"]
    with pytest.raises(ValueError, match="layer 'enc.0.value' missing from task 2"):
        merge_deltas(deltas, "task_arithmetic")
    deltas, _ = layered()
    deltas[1]["extra"] = torch.zeros(2, 2, dtype=F64)
    with pytest.raises(ValueError, match="layer 'extra' of task 1 missing from task 0"):
        merge_deltas(deltas, "task_arithmetic")
    deltas, _ = layered()
    deltas[1]["enc.1.query"] = torch.zeros(4, 6, dtype=F64)
    with pytest.raises(ValueError, match=r"size mismatch for layer 'enc.1.query': delta of task 1"):
        merge_deltas(deltas, "ties")
    with pytest.raises(ValueError, match=r"size mismatch: delta of task 1 has shape \(6, 4\)"):
        merge_layer([torch.zeros(6, 5), torch.zeros(6, 4)], "ties")


def test_bad_deltas():
    with pytest.raises(ValueError, match="deltas is empty"):
        merge_layer([], "task_arithmetic")
    with pytest.raises(ValueError, match="deltas is empty"):
        merge_deltas([], "task_arithmetic")
    with pytest.raises(ValueError, match="hold no layers"):
        merge_deltas([{}], "task_arithmetic")
    with pytest.raises(ValueError, match=r"must have shape \(d_out, d_in\), got \(5,\)"):
        merge_layer([torch.zeros(5)], "ties")
    with pytest.raises(ValueError, match="must be floating-point"):
        merge_layer([torch.zeros(2, 2, dtype=torch.int64)], "ties")
    with pytest.raises(ValueError, match="delta of task 1 contains NaN or Inf"):
        merge_layer([torch.zeros(2, 2), torch.full((2, 2), float("nan"))], "ties")
    with pytest.raises(ValueError, match="task 0 is torch.float32"):
        merge_layer([torch.zeros(2, 2), torch.zeros(2, 2, dtype=F64)], "ties")
    with pytest.raises(TypeError, match="seed must be an integer"):
        merge_deltas([{"a": torch.zeros(2, 2)}], "dare_ties", seed=1.5)
    # nothing is computed before every layer is checked
    deltas, _ = layered()
    deltas[2]["enc.1.query"][0, 0] = float("inf")
    with pytest.raises(ValueError, match="delta of task 2 for layer 'enc.1.query' contains NaN"):
        merge_deltas(deltas, "dare_ties")


def test_factor_errors():
    with pytest.raises(ValueError, match=r"rank must be None or an integer in \[1, 4\], got 0"):
        low_rank_factors(torch.randn(4, 6), rank=0)
    with pytest.raises(ValueError, match=r"integer in \[1, 4\], got 5"):
        low_rank_factors(torch.randn(4, 6), rank=5)
    with pytest.raises(ValueError, match="factors is empty"):
        stack_lora_factors([], [])
    pair = (torch.randn(6, 2), torch.randn(2, 5))
    with pytest.raises(ValueError, match="got 1 weights for 2 factor pairs"):
        stack_lora_factors([pair, pair], [1.0])
    with pytest.raises(ValueError, match="size mismatch in pair 1"):
        stack_lora_factors([pair, (torch.randn(6, 2), torch.randn(3, 5))], [1.0, 1.0])
    with pytest.raises(ValueError, match="weight 1 must be a finite number"):
        stack_lora_factors([pair, pair], [1.0, float("nan")])
