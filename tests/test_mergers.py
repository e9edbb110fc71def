"""Tests of the spectral merges (TSV-M, Iso-C, Iso-CTS, CART), per-task weights, prepared merges
and core space: each against a naive dense float64 reference written from the papers' equations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from osrm_core.merge import (
    MERGE_METHODS,
    LoraFactors,
    get_merge_method,
    merge_deltas,
    merge_layer,
    prepare_merge,
)
from osrm_core.merge.knots import knots_basis
from osrm_core.merge.ties import ties_merge

F64 = torch.float64
D_OUT, D_IN = 12, 10
SPECTRAL = ["tsv_m", "iso_c", "iso_cts", "cart"]


def lora_factors(ranks=(2, 2, 2), d_out=D_OUT, d_in=D_IN, dtype=F64):
    return [
        LoraFactors(torch.randn(d_out, r, dtype=dtype), torch.randn(r, d_in, dtype=dtype) / 3)
        for r in ranks
    ]


def lora_deltas(ranks=(2, 2, 2), d_out=D_OUT, d_in=D_IN):
    return [f.delta() for f in lora_factors(ranks, d_out, d_in)]


# ------------------------------------------------------------ naive references (numpy, float64)


def np_rank(s, shape, top=None):
    """Numerical rank with the LAPACK tolerance max(shape) * eps * top."""
    top = s.max() if top is None else top
    return int((s > top * max(shape) * np.finfo(np.float64).eps).sum())


def np_polar(x):
    p, _, qh = np.linalg.svd(x, full_matrices=False)
    return p @ qh


def ref_tsv(deltas, fraction=1.0):
    """Gargiulo et al., Alg. 1: top-k triplets per task, stacks whitened by Procrustes."""
    ds = [d.numpy() for d in deltas]
    k_budget = int(fraction * min(ds[0].shape) / len(ds))
    us, ss, vs = [], [], []
    for d in ds:
        u, s, vh = np.linalg.svd(d, full_matrices=False)
        k = min(k_budget, np_rank(s, d.shape))
        us.append(u[:, :k])
        ss.append(s[:k])
        vs.append(vh[:k].T)
    u, s, v = np.concatenate(us, 1), np.concatenate(ss), np.concatenate(vs, 1)
    return np_polar(u) @ np.diag(s) @ np_polar(v).T


def ref_iso_c(deltas):
    """Marczak et al., Eq. (Iso-C): the sum's singular values replaced by their mean."""
    total = sum(d.numpy() for d in deltas)
    u, s, vh = np.linalg.svd(total, full_matrices=False)
    k = np_rank(s, total.shape)
    return s[:k].mean() * u[:, :k] @ vh[:k]


def ref_iso_cts(deltas, common_fraction=0.8):
    """Marczak et al., Iso-CTS: common top directions of the sum plus each task's top directions
    off the common subspace, bases orthogonalized, spectrum flattened to its mean."""
    ds = [d.numpy() for d in deltas]
    total = sum(ds)
    u, s, vh = np.linalg.svd(total, full_matrices=False)
    budget = np_rank(s, total.shape)
    common = int(budget * common_fraction)
    per_task = round((budget - common) / len(ds))
    common = budget - per_task * len(ds)
    uc = u[:, :common]
    us, ss, vs = [uc], [s[:common]], [vh[:common].T]
    for d in ds:
        ut, st, vht = np.linalg.svd(d - uc @ uc.T @ d, full_matrices=False)
        k = min(per_task, np_rank(st, total.shape, top=s.max()))
        us.append(ut[:, :k])
        ss.append(st[:k])
        vs.append(vht[:k].T)
    s_all = np.concatenate(ss)
    return s_all.mean() * np_polar(np.concatenate(us, 1)) @ np_polar(np.concatenate(vs, 1)).T


def ref_cart(deltas, rank_fraction, centred_scale=1.0):
    """Choi et al., Eq. (CART): mean + lambda * sum_i SVD_k(Delta_i - mean)."""
    ds = [d.numpy() for d in deltas]
    mean = sum(ds) / len(ds)
    svds = [np.linalg.svd(d - mean, full_matrices=False) for d in ds]
    top = max(s.max() for _, s, _ in svds)
    out = mean.copy()
    for u, s, vh in svds:
        k = math.ceil(rank_fraction * np_rank(s, mean.shape, top=top))
        out += centred_scale * (u[:, :k] * s[:k]) @ vh[:k]
    return out


def t(x):
    return torch.as_tensor(np.asarray(x), dtype=F64)


# ------------------------------------------------------------------- methods against references


def test_new_methods_are_registered_with_documented_params():
    for name in SPECTRAL:
        cls = MERGE_METHODS[name]
        assert cls.__doc__ and "reference" in cls.__doc__.lower()
        for spec in cls.param_specs():
            assert spec.help and spec.range is not None
    assert get_merge_method("iso_cts").params.common_space_fraction == 0.8
    assert get_merge_method("tsv_m").params.sv_fraction == 1.0


@pytest.mark.parametrize("fraction", [1.0, 0.4])
def test_tsv_m_matches_reference(fraction):
    torch.manual_seed(0)
    deltas = lora_deltas()
    got = merge_layer(deltas, "tsv_m", lam=0.7, sv_fraction=fraction)
    assert_close(got, 0.7 * t(ref_tsv(deltas, fraction)), rtol=1e-9, atol=1e-10)


def test_tsv_m_full_rank_deltas_match_reference():
    torch.manual_seed(1)
    deltas = [torch.randn(D_OUT, D_IN, dtype=F64) for _ in range(3)]  # k = int(10 / 3) = 3 per task
    assert_close(merge_layer(deltas, "tsv_m"), t(ref_tsv(deltas)), rtol=1e-9, atol=1e-10)


def test_tsv_m_orthogonal_tasks_come_back_unchanged():
    torch.manual_seed(2)
    u = torch.linalg.qr(torch.randn(D_OUT, 6, dtype=F64))[0]
    v = torch.linalg.qr(torch.randn(D_IN, 6, dtype=F64))[0]
    s = torch.rand(6, dtype=F64) + 0.5
    deltas = [(u[:, 2 * i : 2 * i + 2] * s[2 * i : 2 * i + 2]) @ v[:, 2 * i : 2 * i + 2].T for i in range(3)]
    assert_close(merge_layer(deltas, "tsv_m"), sum(deltas), rtol=1e-10, atol=1e-12)


def test_iso_c_matches_reference_and_has_flat_spectrum():
    torch.manual_seed(3)
    deltas = lora_deltas()
    got = merge_layer(deltas, "iso_c", lam=1.5)
    assert_close(got, 1.5 * t(ref_iso_c(deltas)), rtol=1e-9, atol=1e-10)
    total_s = torch.linalg.svdvals(sum(deltas))
    got_s = torch.linalg.svdvals(got / 1.5)
    rank = 6
    assert total_s[rank - 1] > 1e-6 and total_s[rank:].max() < 1e-12
    assert_close(got_s[:rank], torch.full((rank,), float(total_s[:rank].mean()), dtype=F64))
    assert got_s[rank:].max() < 1e-12


@pytest.mark.parametrize("fraction", [0.8, 0.5, 0.0])
def test_iso_cts_matches_reference(fraction):
    torch.manual_seed(4)
    deltas = lora_deltas(ranks=(3, 3, 3))
    got = merge_layer(deltas, "iso_cts", common_space_fraction=fraction)
    assert_close(got, t(ref_iso_cts(deltas, fraction)), rtol=1e-9, atol=1e-10)


def test_iso_cts_all_common_is_iso_c():
    torch.manual_seed(5)
    deltas = lora_deltas()
    assert_close(merge_layer(deltas, "iso_cts", common_space_fraction=1.0), merge_layer(deltas, "iso_c"))


@pytest.mark.parametrize(("fraction", "scale"), [(0.4, 1.0), (0.2, 0.6), (0.08, 2.0)])
def test_cart_matches_reference(fraction, scale):
    torch.manual_seed(6)
    deltas = lora_deltas()
    got = merge_layer(deltas, "cart", lam=0.9, rank_fraction=fraction, centred_scale=scale)
    assert_close(got, 0.9 * t(ref_cart(deltas, fraction, scale)), rtol=1e-9, atol=1e-10)


def test_cart_full_rank_is_the_average():
    torch.manual_seed(7)
    deltas = lora_deltas()
    assert_close(merge_layer(deltas, "cart", rank_fraction=1.0), sum(deltas) / 3, rtol=1e-9, atol=1e-10)
    same = [deltas[0]] * 3
    assert_close(merge_layer(same, "cart"), deltas[0])


@pytest.mark.parametrize("name", SPECTRAL)
def test_zero_deltas_give_zero(name):
    assert torch.equal(merge_layer([torch.zeros(4, 3, dtype=F64)] * 2, name), torch.zeros(4, 3, dtype=F64))


# ----------------------------------------------------------------------------- per-task weights

WEIGHTS = [0.5, 1.3, 0.0]


@pytest.mark.parametrize("name", [n for n in MERGE_METHODS if n != "knots_ties"])
def test_weights_equal_merging_the_weighted_deltas(name):
    torch.manual_seed(8)
    deltas = [{"q": d, "v": 2 * d.flip(0)} for d in lora_deltas()]
    grams = [{"q": g, "v": g} for g in (torch.eye(D_IN, dtype=F64) * (i + 1) for i in range(3))]
    got = merge_deltas(deltas, name, lam=0.8, grams=grams, seed=3, weights=WEIGHTS)
    scaled = [{k: w * d for k, d in task.items()} for task, w in zip(deltas, WEIGHTS, strict=True)]
    ref = merge_deltas(scaled, name, lam=0.8, grams=grams, seed=3)
    for k in got:
        assert_close(got[k], ref[k], rtol=1e-9, atol=1e-10)


def test_knots_ties_weights_scale_the_blocks_of_the_unweighted_basis():
    torch.manual_seed(9)
    deltas = lora_deltas()
    u, s, blocks = knots_basis(deltas)
    ref = (u * s) @ ties_merge([w * b for w, b in zip(WEIGHTS, blocks, strict=True)], 0.5)
    assert_close(merge_layer(deltas, "knots_ties", weights=WEIGHTS), ref)


def test_tsv_m_weight_zero_leaves_the_task_out():
    torch.manual_seed(10)
    deltas = lora_deltas()
    got = merge_layer(deltas, "tsv_m", weights=[1.0, 0.0, 2.0])
    assert_close(got, merge_layer([deltas[0], 2 * deltas[2]], "tsv_m"), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name", ["ties", "dare_ties", "knots_ties", "tsv_m", "iso_c", "cart"])
def test_one_preparation_serves_many_weight_vectors(name):
    torch.manual_seed(11)
    deltas = [{"q": d} for d in lora_deltas()]
    prepared = prepare_merge(deltas, name, seed=4)
    for weights in ([1.0, 1.0, 1.0], [0.2, 1.5, 0.9], [1.0, 0.0, 1.0]):
        once = merge_deltas(deltas, name, lam=0.6, seed=4, weights=weights)["q"]
        assert torch.equal(merge_deltas(prepared, lam=0.6, weights=weights)["q"], once)
        assert torch.equal(prepared.merge(lam=0.6, weights=weights)["q"], once)


def test_ties_prepared_trims_once(monkeypatch):
    import osrm_core.merge.ties as ties

    calls = []
    real = ties.trim_by_magnitude
    monkeypatch.setattr(ties, "trim_by_magnitude", lambda d, density: calls.append(1) or real(d, density))
    prepared = prepare_merge([{"q": d} for d in lora_deltas()], "ties", density=0.4)
    for w in (0.5, 1.0, 2.0):
        prepared.merge(weights=[w, 1.0, 1.0])
    assert len(calls) == 3


@pytest.mark.parametrize(
    ("weights", "match"),
    [([1.0, 2.0], "weights must be 3 numbers"), ([1.0, -1.0, 1.0], r"weights\[1\]"),
     ([1.0, float("nan"), 1.0], r"weights\[1\]"), ("abc", "weights must be")],
)
def test_bad_weights(weights, match):
    deltas = [{"q": d} for d in lora_deltas()]
    with pytest.raises(ValueError, match=match):
        merge_deltas(deltas, "ties", weights=weights)
    with pytest.raises(ValueError, match=match):
        prepare_merge(deltas, "ties").merge(weights=weights)


def test_prepared_merge_refuses_other_arguments():
    deltas = [{"q": d} for d in lora_deltas()]
    prepared = prepare_merge(deltas, "ties")
    with pytest.raises(ValueError, match="PreparedMerge carries"):
        merge_deltas(prepared, "ties")
    with pytest.raises(ValueError, match="PreparedMerge carries"):
        merge_deltas(prepared, density=0.3)
    with pytest.raises(ValueError, match="method is required"):
        merge_deltas(deltas)
    layer = get_merge_method("ties").prepare([d["q"] for d in deltas])
    with pytest.raises(ValueError, match="prepare them with this method"):
        get_merge_method("iso_c").merge(layer)
    with pytest.raises(ValueError, match="prepare them with this method"):
        get_merge_method("ties", density=0.2).merge(layer)
    assert torch.equal(get_merge_method("ties").merge(layer), merge_layer([d["q"] for d in deltas], "ties"))


@pytest.mark.parametrize(
    ("name", "param", "value"),
    [("tsv_m", "sv_fraction", 0.0), ("tsv_m", "sv_fraction", 1.5), ("iso_cts", "common_space_fraction", -0.1),
     ("cart", "rank_fraction", 0.0), ("cart", "centred_scale", -1.0), ("cart", "centred_scale", "1")],
)
def test_new_params_out_of_range(name, param, value):
    with pytest.raises(ValueError, match=f"{param} must be a number in"):
        get_merge_method(name, **{param: value})


# ---------------------------------------------------------------------------------- core space

MIXED = (1, 3, 2)


def core_and_full(name, ranks=MIXED, **params):
    factors = lora_factors(ranks)
    core = merge_deltas([{"q": f} for f in factors], name, lam=0.7, space="core", **params)["q"]
    full = merge_deltas([{"q": f.delta()} for f in factors], name, lam=0.7, **params)["q"]
    return factors, core, full


def test_core_task_arithmetic_equals_full_exactly():
    torch.manual_seed(12)
    factors, core, full = core_and_full("task_arithmetic")
    assert isinstance(core, LoraFactors)
    assert core.B.shape == (D_OUT, sum(MIXED)) and core.A.shape == (sum(MIXED), D_IN)
    assert_close(core.delta(), full, rtol=0, atol=1e-10)
    assert_close(full, 0.7 * sum(f.delta() for f in factors), rtol=0, atol=1e-12)


def test_core_with_a_rank_zero_task_and_wide_ranks():
    torch.manual_seed(13)
    _, core, full = core_and_full("task_arithmetic", ranks=(0, 6, 5))  # R = 11 > d_in = 10
    assert core.A.shape == (D_IN, D_IN)
    assert_close(core.delta(), full, rtol=0, atol=1e-10)


@pytest.mark.parametrize(
    ("name", "params"),
    [("knots_ta", {}), ("tsv_m", {}), ("tsv_m", {"sv_fraction": 0.4}), ("iso_c", {}),
     ("iso_cts", {}), ("cart", {"rank_fraction": 0.4})],
)
def test_basis_invariant_methods_equal_in_core_and_full_space(name, params):
    torch.manual_seed(14)
    _, core, full = core_and_full(name, **params)
    assert_close(core.delta(), full, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", ["ties", "dare_ties", "knots_ties"])
def test_entrywise_methods_differ_in_core_space(name):
    torch.manual_seed(15)
    _, core, full = core_and_full(name, density=0.5)
    assert (core.delta() - full).abs().max() > 1e-3


def test_core_space_keeps_dtype_and_weights():
    torch.manual_seed(16)
    factors = lora_factors(MIXED, dtype=torch.float32)
    got = merge_deltas([{"q": f} for f in factors], "iso_c", space="core", weights=[1.0, 0.5, 2.0])["q"]
    assert got.B.dtype == got.A.dtype == torch.float32
    exact = [f.B.double() @ f.A.double() for f in factors]  # a float32 product would add rank
    ref = merge_deltas([{"q": w * d} for d, w in zip(exact, [1.0, 0.5, 2.0], strict=True)], "iso_c")
    assert_close(got.delta().double(), ref["q"], rtol=1e-4, atol=1e-5)


def test_core_space_errors():
    factors = [{"q": f} for f in lora_factors()]
    with pytest.raises(ValueError, match="space must be one of 'full', 'core', got 'svd'"):
        merge_deltas(factors, "ties", space="svd")
    with pytest.raises(ValueError, match="does not support merge method 'regmean'"):
        merge_deltas(factors, "regmean", space="core")
    with pytest.raises(TypeError, match="pair"):
        merge_deltas([{"q": f.delta()} for f in lora_factors()], "ties", space="core")
    bad = [{"q": LoraFactors(torch.randn(D_OUT, 2, dtype=F64), torch.randn(3, D_IN, dtype=F64))}]
    with pytest.raises(ValueError, match="B \\(d_out, r\\) and A \\(r, d_in\\)"):
        merge_deltas(bad, "ties", space="core")
    other = [{"q": LoraFactors(torch.randn(D_OUT + 1, 2, dtype=F64), torch.randn(2, D_IN, dtype=F64))}]
    with pytest.raises(ValueError, match="size mismatch"):
        merge_deltas(factors[:1] + other, "ties", space="core")


def test_study_settings_take_the_new_methods_and_their_params():
    from pydantic import ValidationError

    from osrm_core.settings import MergeSettings

    got = MergeSettings(methods=SPECTRAL, params={"sv_fraction": [0.5, 1.0], "common_space_fraction": [0.8],
                                                  "rank_fraction": [0.1], "centred_scale": [0.5]})
    assert got.methods == SPECTRAL
    with pytest.raises(ValidationError, match="common_space_fraction must be a number in"):
        MergeSettings(methods=["iso_cts"], params={"common_space_fraction": [1.5]})


@pytest.mark.parametrize("rank", [None, 2])
def test_factor_merged_of_core_factors_equals_that_of_the_dense_merge(rank):
    """The writer factors a core-space merge through QR of its factors (no d_out x d_in matrix):
    the same rank, product and relative error as factoring the dense merge."""
    from osrm_core.export import factor_merged

    torch.manual_seed(17)
    factors = lora_factors(MIXED)
    # TSV-M keeps distinct singular values: a truncation is unique (Iso-C's flat spectrum is not)
    core = merge_deltas([{"q": f} for f in factors], "tsv_m", space="core")
    full = merge_deltas([{"q": f.delta()} for f in factors], "tsv_m")
    got, got_table = factor_merged(core, rank)
    ref, ref_table = factor_merged(full, rank)
    assert got_table["rank"].tolist() == ref_table["rank"].tolist() == [rank or sum(MIXED)]
    assert_close(got["q"].delta.double(), ref["q"].delta.double(), rtol=0, atol=1e-5)
    assert got_table["relative_error"].iloc[0] == pytest.approx(ref_table["relative_error"].iloc[0], abs=1e-7)
