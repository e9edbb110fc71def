"""Exact interference from feature statistics, principal angles, own-task energy, post-hoc OSRM.

For task ``i``'s inputs ``h_i`` at a layer with second moment ``S_i = E[h_i h_i^T]``:

* input interference of adapter ``j``: ``E||A_j h_i||^2 = tr(A_j S_i A_j^T)``;
* output shift: ``E||s_j B_j A_j h_i||^2 = s_j^2 tr(B_j A_j S_i A_j^T B_j^T)``, reported
  relative to the layer's own output energy ``tr(W0 S_i W0^T)``.

No data is run again: these are exact expectations over the tokens the statistics saw.

The signals that need no data at all live in :mod:`osrm_core.datafree` (imported here too).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import scipy.linalg
import torch

from osrm_core.adapters import Adapter, LoraWeights
from osrm_core.datafree import factored_svd, merged_spectrum, pair_signals, sv_interference_table  # noqa: F401
from osrm_core.errors import OsrmInputError
from osrm_core.stats import FeatureStats, LayerStats, ProjectedLayer, ProjectedStats


def quadratic_trace(M: torch.Tensor, S: torch.Tensor) -> float:
    """``tr(M S M^T)`` for M (k, d) and symmetric S (d, d), in float64."""
    # detach: base weights are Parameters, and no graph is wanted for a diagnostic number
    M = M.detach().to(torch.float64)
    return float(((M @ S.detach().to(M)) * M).sum())


def input_interference(A: torch.Tensor, stats_layer_moment: torch.Tensor) -> float:
    """``E||A h||^2 = tr(A S A^T)`` for A (r, d_in) and S (d_in, d_in)."""
    return quadratic_trace(A, stats_layer_moment)


def output_shift(lora: LoraWeights, S: torch.Tensor) -> float:
    """``E||s B A h||^2 = tr(Delta_W S Delta_W^T) = s^2 tr((B^T B)(A S A^T))``, in float64.

    The low-rank form costs ``r d^2`` instead of ``d^3``.
    """
    A = lora.A.to(torch.float64)
    return _shift_from_moment(lora, (A @ S.to(A)) @ A.T)


def interference_table(
    adapters: dict[str, Adapter],
    stats: dict[str, FeatureStats | ProjectedStats],
    base_weights: dict[str, torch.Tensor] | None = None,
) -> pd.DataFrame:
    """Interference of every adapter on every task's data, per layer.

    Parameters
    ----------
    adapters : dict of task name to Adapter
    stats : dict of task name to FeatureStats or ProjectedStats
        Statistics of each task (at least those of the adapters' layers): dense, or projected
        on these very adapters (:func:`osrm_core.stats.collect_projected_stats`; the same
        numbers to float64 rounding, ``tr(W0 S W0^T)`` then at the model's precision).
    base_weights : dict of layer name to tensor (d_out, d_in), optional
        ``W0`` per layer, for the relative output shift of dense statistics (projected ones
        carry ``tr(W0 S W0^T)`` themselves).

    Returns
    -------
    DataFrame with columns ``layer, adapter, data, input_energy, output_shift,
    relative_shift, own`` (``own`` is True where adapter == data); ``input_energy`` is
    ``E||A_j h_i||^2`` and ``relative_shift`` is ``output_shift / tr(W0 S_i W0^T)`` (NaN without
    ``base_weights`` for dense statistics).
    """
    if not adapters or not stats:
        raise OsrmInputError("interference_table needs at least one adapter and one task's statistics")
    rows = []
    base_energy: dict[tuple[str, str], float] = {}
    for j, adapter in adapters.items():
        gram: dict[str, torch.Tensor] = {}  # B_j^T B_j per layer, once for every task
        for layer, lw in adapter.layers.items():
            for i, st in stats.items():
                if layer not in st.layers:
                    raise OsrmInputError(f"statistics of task {i!r} have no layer {layer!r}")
                sl = st.layers[layer]
                M = adapter_moment(sl, j, lw.A, layer)
                if layer not in gram:
                    gram[layer] = lw.B.detach().to(torch.float64).T @ lw.B.detach().to(torch.float64)
                shift = float(lw.scale**2 * (gram[layer] * M.to(torch.float64)).sum())
                if isinstance(sl, ProjectedLayer):
                    base_energy[(i, layer)] = sl.base_energy
                elif base_weights is not None and (i, layer) not in base_energy:
                    base_energy[(i, layer)] = quadratic_trace(base_weights[layer], sl.second_moment)
                base = base_energy.get((i, layer), math.nan)
                rows.append(
                    {
                        "layer": layer,
                        "adapter": j,
                        "data": i,
                        "input_energy": float(torch.trace(M)),
                        "output_shift": shift,
                        "relative_shift": shift / base if base > 0 else math.nan,
                        "own": i == j,
                    }
                )
    return pd.DataFrame(rows)


def adapter_moment(sl: LayerStats | ProjectedLayer, name: str, A: torch.Tensor, layer: str = "") -> torch.Tensor:
    """``A S A^T`` (r x r, float64) of adapter ``name`` at one layer of a task's statistics:
    from the dense ``S``, or the block the projected statistics hold."""
    if isinstance(sl, ProjectedLayer):
        return sl.moment(name, A)
    if sl.d != A.shape[1]:
        raise OsrmInputError(f"size mismatch for layer {layer!r}: statistics {sl.d}, adapter {A.shape[1]}")
    A = A.detach().to(torch.float64)
    return (A @ sl.second_moment.to(A)) @ A.T


def _shift_from_moment(lora: LoraWeights, M: torch.Tensor) -> float:
    """``s^2 tr((B^T B) M)`` with ``M = A S A^T``."""
    B = lora.B.to(torch.float64)
    return float(lora.scale**2 * ((B.T @ B) * M.to(torch.float64)).sum())


def interference_matrix(table: pd.DataFrame, value: str = "input_energy") -> pd.DataFrame:
    """Task-by-task matrix (rows: adapter, columns: data) of ``value`` summed over layers."""
    if value not in table.columns:
        raise OsrmInputError(f"value {value!r} is not a column; columns are {list(table.columns)}")
    return table.pivot_table(index="adapter", columns="data", values=value, aggfunc="sum")


def summed_interference(A: dict[str, torch.Tensor], other_stats: list[FeatureStats]) -> dict[str, float]:
    """Per layer, ``sum_j tr(A S_j A^T)`` over the other tasks (the quantity OSRM minimizes)."""
    return {
        layer: sum(quadratic_trace(a, st.layers[layer].second_moment) for st in other_stats)
        for layer, a in A.items()
    }


# --------------------------------------------------------------------------- subspaces


def row_space(M: torch.Tensor, k: int | None = None, rtol: float | None = None) -> torch.Tensor:
    """Orthonormal basis of the row space of M (k, d) as columns, shape (d, rank).

    With ``k``, the top-``k`` right singular vectors; otherwise all above ``rtol * s_max``
    (default ``max(1e-10, max(M.shape) * eps)`` with ``eps`` of M's own dtype: a float32
    ``Delta_W = s B A`` of rank r has rounding-level singular values far above 1e-10, which
    would otherwise count as a full-rank row space).
    """
    _, s, vh = torch.linalg.svd(M.to(torch.float64), full_matrices=False)
    if k is None:
        k = _kept_rank(M, s, rtol)
    return vh[: max(k, 0)].T


def _kept_rank(M: torch.Tensor, s: torch.Tensor, rtol: float | None = None) -> int:
    """How many singular values ``s`` of ``M`` :func:`row_space` keeps."""
    if rtol is None:
        eps = torch.finfo(M.dtype).eps if M.is_floating_point() else 0.0
        rtol = max(1e-10, max(M.shape) * eps)
    return int((s > rtol * s.max().clamp_min(1e-300)).sum()) if s.numel() else 0


def lora_row_space(lora: LoraWeights) -> torch.Tensor:
    """Orthonormal basis of the row space of ``Delta_W = s B A`` as columns, shape (d_in, k).

    Works on the factors (QR of ``A^T``, then the SVD of the small ``B R^T``), so it costs
    ``d r^2`` instead of the ``d^3`` of an SVD of ``Delta_W``; the same subspace.
    """
    q, r = torch.linalg.qr(lora.A.to(torch.float64).T)
    small = lora.B.to(torch.float64) @ r.T
    rows = row_space(small)  # (r, k): directions of R^T-space that B keeps
    if rows.shape[1] == 0:
        return row_space(lora.A)
    return q @ rows


def principal_angles(U: torch.Tensor, V: torch.Tensor) -> np.ndarray:
    """Principal angles in degrees, descending (scipy), between the column spaces of U and V."""
    if U.shape[0] != V.shape[0]:
        raise OsrmInputError(f"subspaces live in different spaces: {U.shape[0]} vs {V.shape[0]} rows")
    return np.degrees(scipy.linalg.subspace_angles(U.cpu().numpy(), V.cpu().numpy()))


def task_subspace(stats: FeatureStats, layer: str, k: int) -> torch.Tensor:
    """Top-``k`` eigenvectors of a task's second moment at ``layer`` as columns, (d, k)."""
    from osrm_core.spectra import symmetric_eigh

    return symmetric_eigh(stats.layers[layer].second_moment).largest(k).T


def angle_rank(adapters: dict[str, Adapter]) -> int:
    """The one size of the subspaces whose angles are compared: the smallest adapter rank (data
    subspaces of the top-k eigenvectors and adapter row spaces then have the same dimension)."""
    return min(max(lw.rank for lw in a.layers.values()) for a in adapters.values())


def data_subspaces(stats: dict[str, FeatureStats], k: int) -> dict[tuple[str, str], torch.Tensor]:
    """Each task's top-``k`` data subspace per layer (:func:`task_subspace`), keyed by ``(task,
    layer)``; computed once per group of layers that share their inputs."""
    if k < 1:
        raise OsrmInputError(f"k must be >= 1, got {k}")
    bases = {}
    for t, st in stats.items():
        for g in st.groups():
            basis = task_subspace(st, g[0], k)
            for layer in g:
                bases[(t, layer)] = basis
    return bases


def angle_table(
    stats: dict[str, FeatureStats],
    k: int = 8,
    adapters: dict[str, Adapter] | None = None,
    bases: dict[tuple[str, str], torch.Tensor] | None = None,
) -> pd.DataFrame:
    """Principal angles per layer between task data subspaces (top-``k`` eigenvectors) and,
    with ``adapters``, between each adapter's row space (SVD of Delta_W) and each task's data.
    ``bases``: the data subspaces when already computed (:func:`data_subspaces` with this ``k``).

    Returns
    -------
    DataFrame with columns ``layer, kind, a, b, min_angle, mean_angle`` (degrees); ``kind`` is
    ``"data-data"`` or ``"adapter-data"``.
    """
    if k < 1:
        raise OsrmInputError(f"k must be >= 1, got {k}")
    names = list(stats)
    layers = list(next(iter(stats.values())).layers)
    bases = bases if bases is not None else data_subspaces(stats, k)
    rows = []
    for layer in layers:
        for x in range(len(names)):
            for y in range(x + 1, len(names)):
                ang = principal_angles(bases[(names[x], layer)], bases[(names[y], layer)])
                rows.append(_angle_row(layer, "data-data", names[x], names[y], ang))
        for a_name, adapter in (adapters or {}).items():
            if layer not in adapter.layers:
                continue
            space = lora_row_space(adapter.layers[layer])
            for t in names:
                ang = principal_angles(space, bases[(t, layer)])
                rows.append(_angle_row(layer, "adapter-data", a_name, t, ang))
    return pd.DataFrame(rows)


def _angle_row(layer: str, kind: str, a: str, b: str, angles: np.ndarray) -> dict:
    return {
        "layer": layer,
        "kind": kind,
        "a": a,
        "b": b,
        "min_angle": float(angles.min()),
        "mean_angle": float(angles.mean()),
    }


def own_energy(A: torch.Tensor, S: torch.Tensor) -> tuple[float, float]:
    """:func:`own_energy_of_moment` from the dense second moment ``S``."""
    A64 = A.detach().to(torch.float64)
    return own_energy_of_moment(A, (A64 @ S.to(A64)) @ A64.T, float(torch.trace(S.to(torch.float64))))


def own_energy_of_moment(A: torch.Tensor, M: torch.Tensor, trace: float) -> tuple[float, float]:
    """Share of a task's own feature energy that A's row space sees, and a random subspace's,
    from ``M = A S A^T`` (:func:`adapter_moment`) and ``tr S``.

    Returns ``(tr(P S P^T) / tr(S), r / d)`` with ``P`` an orthonormal basis of A's row space:
    the expected share of a random orthonormal subspace of the same rank is ``r / d``. With
    ``A = U Sigma V^T``, ``P = V_k^T = Sigma_k^{-1} U_k^T A`` (``k``: the singular values
    :func:`row_space` keeps), so ``tr(P S P^T) = tr(Sigma_k^{-1} U_k^T M U_k Sigma_k^{-1})``.
    """
    u, s, _ = torch.linalg.svd(A.detach().to(torch.float64), full_matrices=False)
    k = _kept_rank(A, s)
    w = u[:, :k] / s[:k]
    return float((w * (M.to(torch.float64) @ w)).sum()) / trace, k / A.shape[1]


def own_energy_table(adapters: dict[str, Adapter], stats: dict[str, FeatureStats | ProjectedStats]) -> pd.DataFrame:
    """Per task and layer, the own-task energy share of the adapter's A against random, from
    dense or projected statistics.

    Columns ``task, layer, share, random_share, ratio``.
    """
    rows = []
    for t, adapter in adapters.items():
        if t not in stats:
            raise OsrmInputError(f"no statistics for task {t!r}")
        for layer, lw in adapter.layers.items():
            sl = stats[t].layers[layer]
            trace = sl.trace if isinstance(sl, ProjectedLayer) else float(torch.trace(sl.second_moment.double()))
            share, rnd = own_energy_of_moment(lw.A, adapter_moment(sl, t, lw.A, layer), trace)
            rows.append(
                {"task": t, "layer": layer, "share": share, "random_share": rnd, "ratio": share / rnd}
            )
    return pd.DataFrame(rows)


def posthoc_osrm(adapter: Adapter, subspaces: dict[str, torch.Tensor]) -> tuple[Adapter, pd.DataFrame]:
    """Project an existing adapter onto OSRM row spaces: ``A = subspace``, ``B = Delta_W A^+ / s``.

    Returns the projected adapter (same scale, rank of the subspace) and a table with the
    energy kept per layer, ``||Delta_W A^+ A||_F / ||Delta_W||_F``.
    """
    layers: dict[str, LoraWeights] = {}
    rows = []
    for name, lw in adapter.layers.items():
        if name not in subspaces:
            raise OsrmInputError(f"no OSRM subspace for layer {name!r}")
        A = subspaces[name].to(torch.float64)
        if A.shape[1] != lw.A.shape[1]:
            raise OsrmInputError(f"size mismatch for layer {name!r}: subspace {A.shape[1]}, adapter {lw.A.shape[1]}")
        delta = lw.delta.to(torch.float64)
        pinv = torch.linalg.pinv(A)
        B = delta @ pinv / lw.scale
        kept = torch.linalg.norm(delta @ pinv @ A) / torch.linalg.norm(delta).clamp_min(1e-300)
        layers[name] = LoraWeights(A.to(lw.A.dtype), B.to(lw.B.dtype), lw.scale)
        rows.append({"layer": name, "energy_kept": float(kept)})
    return Adapter(layers, dict(adapter.head), dict(adapter.config)), pd.DataFrame(rows)


def posthoc_osrm_adapters(
    adapters: dict[str, Adapter], stats: dict[str, FeatureStats], rank: int | None = None
) -> tuple[dict[str, Adapter], pd.DataFrame]:
    """Post-hoc OSRM for several adapters: each one projected on the OSRM subspace of the other
    tasks' statistics (tasks matched to adapters by name).

    ``rank`` None uses each adapter's own (largest) rank. Returns the projected adapters and a
    table ``layer, energy_kept, adapter``.
    """
    from osrm_core.inits import osrm_subspace

    missing = [n for n in adapters if n not in stats]
    if missing:
        raise OsrmInputError(f"no statistics for adapter {missing[0]!r}; tasks are {sorted(stats)}")
    projected, kept = {}, []
    for name, adapter in adapters.items():
        others = [stats[n] for n in adapters if n != name]
        r = rank or max(lw.rank for lw in adapter.layers.values())
        projected[name], table = posthoc_osrm(adapter, osrm_subspace(others, r))
        kept.append(table.assign(adapter=name))
    return projected, pd.concat(kept, ignore_index=True)


def layer_verdicts(interference: pd.DataFrame, kept: pd.DataFrame) -> pd.DataFrame:
    """Per layer: how much the adapters interfere with the other tasks, which pair dominates,
    and what post-hoc OSRM would remove at what cost.

    Parameters
    ----------
    interference : DataFrame
        :func:`interference_table` rows (with ``relative_shift``) of the adapters as they are,
        and of their post-hoc OSRM projections, told apart by a column ``init``
        (``uploaded`` / ``posthoc_osrm``), as :func:`osrm_core.workflows.diagnose_adapters` gives.
    kept : DataFrame
        ``adapter, layer, energy_kept`` of the projection (:func:`posthoc_osrm_adapters`).

    Returns
    -------
    DataFrame, one row per layer, most interference first: ``layer``; ``cross_shift`` (sum over
    pairs j != i of adapter j's relative output shift ``E||s_j B_j A_j h_i||^2 / E||W0 h_i||^2``
    on task i's inputs); ``own_shift`` (the same for j == i, the wanted change); ``cross_to_own``;
    ``top_adapter``, ``top_data``, ``top_share`` (the largest pair and its share of
    ``cross_shift``); ``top_input_norm`` (that pair's exact RMS ``||A_j h_i||``);
    ``cross_shift_posthoc`` and ``removed_by_posthoc`` (``1 - after / before``); ``kept_by_posthoc``
    (mean over adapters of ``||Delta_W A^+ A|| / ||Delta_W||``); ``rank`` (1 = most interference).
    Without ``posthoc_osrm`` rows (projected statistics: post-hoc OSRM needs the ``d x d``
    moments) the three post-hoc columns are NaN.
    """
    need = {"layer", "adapter", "data", "input_energy", "relative_shift", "init"}
    if not need <= set(interference.columns):
        raise OsrmInputError(f"interference needs columns {sorted(need)}, got {list(interference.columns)}")
    rows = []
    posthoc_done = bool((interference["init"] == "posthoc_osrm").any())
    for layer, part in interference.groupby("layer", sort=False):
        before = part[part["init"] == "uploaded"]
        cross = before[before["adapter"] != before["data"]]
        if cross.empty:
            raise OsrmInputError(f"layer {layer!r}: no pair of different adapter and task to compare")
        after = part[(part["init"] == "posthoc_osrm") & (part["adapter"] != part["data"])]
        top = cross.loc[cross["relative_shift"].idxmax()]
        total = float(cross["relative_shift"].sum())
        own = float(before.loc[before["adapter"] == before["data"], "relative_shift"].sum())
        posthoc = float(after["relative_shift"].sum()) if posthoc_done else math.nan
        rows.append({
            "layer": layer,
            "cross_shift": total,
            "own_shift": own,
            "cross_to_own": total / own if own > 0 else math.nan,
            "top_adapter": top["adapter"],
            "top_data": top["data"],
            "top_share": float(top["relative_shift"]) / total if total > 0 else math.nan,
            "top_input_norm": math.sqrt(max(float(top["input_energy"]), 0.0)),
            "cross_shift_posthoc": posthoc,
            "removed_by_posthoc": 1 - posthoc / total if total > 0 else math.nan,
            "kept_by_posthoc": float(kept.loc[kept["layer"] == layer, "energy_kept"].mean()),
        })
    out = pd.DataFrame(rows).sort_values("cross_shift", ascending=False, kind="stable").reset_index(drop=True)
    return out.assign(rank=np.arange(1, len(out) + 1))
