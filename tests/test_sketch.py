"""Sketches of the top-k data subspace (streamed randomized range finder): against the dense
second moment's eigendecomposition in float64 on the packaged default model; the stated error
(residuals, angle bound) equal to what the dense ``S`` gives and never below the true error."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from _helpers import assert_message

from osrm_core.demo import demo_tasks
from osrm_core.errors import InputTypeError, OsrmInputError
from osrm_core.spectra import symmetric_eigh
from osrm_core.stats import collect_feature_stats, collect_sketch

QUERY0, QUERY3, KEY3 = (f"bert.encoder.layer.{n}.attention.self.{kind}" for n, kind in
                        ((0, "query"), (3, "query"), (3, "key")))
DENSE5 = "bert.encoder.layer.5.output.dense"  # a 1536-wide input
LAYERS = [QUERY0, QUERY3, KEY3, DENSE5]
OPTIONS = {"max_samples": None, "batch_size": 8, "max_length": 32}


@pytest.fixture(scope="module")
def task():
    return demo_tasks(seed=0, n_train=40, n_test=10)[0]


@pytest.fixture(scope="module")
def dense(default_model, task):
    """Per layer, the dense ``S`` and its eigenvalues (descending) and eigenvectors (columns)."""
    model, tokenizer = default_model
    with pytest.warns(UserWarning, match="rank-deficient"):  # 756 tokens at the 1536-wide input
        stats = collect_feature_stats(model, tokenizer, task, target_modules=LAYERS, **OPTIONS)
    out = {}
    for layer in LAYERS:
        S = stats.layers[layer].second_moment.to(torch.float64)
        spectrum = symmetric_eigh(S)
        out[layer] = (S, spectrum.eigenvalues_desc, spectrum.eigenvectors.flip(1))
    return out


def _check_stated_error(sketch, dense, layer: str) -> float:
    """The stated residuals equal the dense ``S``'s, an eigenvalue of ``S`` lies within each, the
    true angle is within the stated bound; returns the true angle in degrees."""
    S, lam, vectors = dense[layer]
    sl, k = sketch.layers[layer], sketch.k
    residuals = torch.linalg.vector_norm(S @ sl.basis - sl.basis * sl.eigenvalues, dim=0)
    torch.testing.assert_close(sl.residuals, residuals, rtol=0, atol=1e-10 * float(lam[0]))
    assert bool(((sl.eigenvalues[:, None] - lam[None, :]).abs().min(1).values <= sl.residuals).all())
    assert bool((sl.eigenvalues <= lam[:k] + 1e-12 * lam[0]).all())  # Ritz values interlace from below
    assert sl.count > 0 and sl.trace == pytest.approx(float(torch.trace(S)), rel=1e-12)
    torch.testing.assert_close(sl.basis.T @ sl.basis, torch.eye(k, dtype=torch.float64), rtol=0, atol=1e-12)
    angle = float(np.degrees(scipy.linalg.subspace_angles(sl.basis.numpy(), vectors[:, :k].numpy())).max())
    assert angle <= sl.angle_bound
    return angle


def test_with_enough_power_passes_the_sketch_matches_the_dense_eigenpairs(default_model, task, dense) -> None:
    model, tokenizer = default_model
    sketch = collect_sketch(model, tokenizer, task, LAYERS, 4, power=8, **OPTIONS)
    assert sketch.layers[QUERY3] is sketch.layers[KEY3]  # one input, one sketch
    for layer in (QUERY3, DENSE5):  # eigenvalue gaps after the 4th of 0.9 and 0.77 (lambda_4 about 3)
        _check_stated_error(sketch, dense, layer)
        sl = sketch.layers[layer]
        torch.testing.assert_close(sl.eigenvalues, dense[layer][1][:4], rtol=1e-8, atol=0)
        assert bool(((sl.eigenvalues - dense[layer][1][:4]).abs() <= sl.residuals).all())  # the same rank's
        assert sl.angle_bound < 0.01 and sl.max_residual < 1e-3
    # A small gap (lambda_4 - lambda_5 = 0.09 of 2.41 at the first layer): the bound honestly grows.
    _check_stated_error(sketch, dense, QUERY0)
    assert sketch.layers[QUERY0].angle_bound > 100 * sketch.layers[QUERY3].angle_bound
    table = sketch.table()
    assert list(table["layer"]) == LAYERS and (table["captured"].between(0, 1)).all()
    assert table.loc[1, "angle_bound_deg"] == sketch.layers[QUERY3].angle_bound


@pytest.mark.parametrize(("power", "dtype"), [(0, torch.float64), (2, torch.float64), (2, torch.float32)])
def test_the_stated_error_holds_with_few_passes(default_model, task, dense, power, dtype) -> None:
    """Few passes leave a large error, and the statement says so (90 degrees: no bound)."""
    model, tokenizer = default_model
    sketch = collect_sketch(model, tokenizer, task, [QUERY0, QUERY3], 8, power=power, dtype=dtype, **OPTIONS)
    if dtype == torch.float64:
        angles = [_check_stated_error(sketch, dense, layer) for layer in (QUERY0, QUERY3)]
        assert max(angles) > 5  # not converged, and not claimed to be
    else:
        reference = collect_sketch(model, tokenizer, task, [QUERY0], 8, power=power, **OPTIONS).layers[QUERY0]
        torch.testing.assert_close(sketch.layers[QUERY0].eigenvalues, reference.eigenvalues, rtol=1e-4, atol=0)
    assert sketch.layers[QUERY0].angle_bound == 90.0


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"k": 0}, OsrmInputError, "k must be an integer >= 1, got 0"),
    ({"k": 384}, OsrmInputError, f"k must be below the width of layer '{QUERY0}' (384), got 384"),
    ({"k": 8.0}, InputTypeError, "k must be an integer >= 1, got 8.0"),
    ({"power": -1}, OsrmInputError, "power must be an integer >= 0, got -1"),
    ({"oversampling": 0}, OsrmInputError, "oversampling must be an integer >= 1, got 0"),
    ({"layers": []}, OsrmInputError, "a sketch needs at least one layer"),
])
def test_bad_arguments_are_named(default_model, task, kwargs, error, message) -> None:
    model, tokenizer = default_model
    args = {"layers": [QUERY0], "k": 8, **kwargs}
    with pytest.raises(error) as caught:
        collect_sketch(model, tokenizer, task, args.pop("layers"), args.pop("k"), **args)
    assert_message(str(caught.value), message)
