"""osrm_core.inplace: deltas applied to a model's layers and taken back, against a naive
float64 reference (the layer's output with ``W0 + lam * Delta``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from osrm_core.inplace import AppliedDeltas
from osrm_core.merge import LoraFactors


def _layers(seed: int = 0) -> dict[str, nn.Module]:
    torch.manual_seed(seed)
    conv = Conv1D(5, 6)  # GPT-2's layer: weight (d_in, d_out)
    nn.init.normal_(conv.bias)
    return {"linear": nn.Linear(6, 5, dtype=torch.float64), "no_bias": nn.Linear(6, 4, bias=False,
                                                                                 dtype=torch.float64),
            "conv": conv.double()}


def _reference(module: nn.Module, base: dict, x: torch.Tensor, delta: torch.Tensor, lam: float) -> torch.Tensor:
    """``x (W0 + lam Delta)^T + b0 + lam shift`` from the base weights ``base`` (``Delta = [dW |
    shift]`` where it has a bias column)."""
    w = base["weight"].T if isinstance(module, Conv1D) else base["weight"]
    d_in = w.shape[1]
    dw, shift = (delta[:, :d_in], delta[:, d_in]) if delta.shape[1] == d_in + 1 else (delta, None)
    out = x @ (w + lam * dw).T
    if "bias" in base:
        out = out + base["bias"]
    return out if shift is None else out + lam * shift


@pytest.mark.parametrize("bias_column", [False, True])
def test_factors_and_dense_deltas_give_the_reference_output_and_come_off_exactly(bias_column) -> None:
    layers = _layers()
    before = {n: {k: t.clone() for k, t in m.state_dict().items()} for n, m in layers.items()}
    x = torch.randn(3, 7, 6, dtype=torch.float64)
    base = {n: m(x) for n, m in layers.items()}
    factors, dense = {}, {}
    for n, m in layers.items():
        d_out = m.nf if isinstance(m, Conv1D) else m.out_features
        b, a = torch.randn(d_out, 2, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64)
        if bias_column:  # [s B | s b] and [[A, 0], [0, 1]]: the bias shift as one more rank
            b = torch.cat([b, torch.randn(d_out, 1, dtype=torch.float64)], 1)
            a = torch.cat([torch.cat([a, torch.zeros(2, 1, dtype=torch.float64)], 1),
                           torch.cat([torch.zeros(1, 6, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64)], 1)])
        factors[n], dense[n] = LoraFactors(b, a), b @ a
    applied = AppliedDeltas(layers)
    for deltas in (factors, dense, factors):
        applied.set(deltas, 0.7)
        for n, m in layers.items():
            if n == "no_bias" and bias_column and deltas is dense:
                continue  # a dense delta cannot move a bias the layer does not have
            torch.testing.assert_close(m(x), _reference(m, before[n], x, dense[n], 0.7), rtol=1e-12, atol=1e-12)
        assert (applied.hooks.keys() == layers.keys()) == (deltas is factors)
        assert not applied.saved if deltas is factors else applied.saved.keys() == layers.keys()
    applied.set(None)
    assert not applied.hooks and not applied.saved
    for n, m in layers.items():
        assert all(torch.equal(t, before[n][k]) for k, t in m.state_dict().items())  # the base weights, bit for bit
        assert torch.equal(m(x), base[n])
