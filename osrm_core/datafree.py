"""Signals of interference that need no data, only the adapters' weights
(:func:`sv_interference_table`, :func:`merged_spectrum`): how much of adapter ``j``'s
``Delta_W`` reads the input directions of adapter ``i``'s ``Delta_W`` (its right singular
vectors stand in for task ``i``'s inputs), and how much the merge's spectrum loses against the
spectra of its parts. The data-aware counterparts are in :mod:`osrm_core.diagnostics`."""

from __future__ import annotations

import pandas as pd
import torch

from osrm_core.adapters import Adapter, union_layers
from osrm_core.errors import OsrmInputError


def factored_svd(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of ``B @ A`` (B: d_out x r, A: r x d_in) from the factors, in float64, without
    forming the d_out x d_in product: ``U (d_out, r), S (r,), V (d_in, r)`` with
    ``B @ A = U diag(S) V^T``."""
    qb, rb = torch.linalg.qr(B.double())
    qa, ra = torch.linalg.qr(A.double().T)
    u, sigma, vh = torch.linalg.svd(rb @ ra.T)
    return qb @ u, sigma, qa @ vh.T


def factored_svdvals(B: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """The singular values of ``B @ A`` alone (as :func:`factored_svd`, no orthonormal factor formed)."""
    rb = torch.linalg.qr(B.double(), mode="r")[1]
    ra = torch.linalg.qr(A.double().T, mode="r")[1]
    return torch.linalg.svdvals(rb @ ra.T)


def _numerical_rank(sigma: torch.Tensor) -> int:
    if sigma.numel() == 0 or float(sigma[0]) == 0.0:
        return 0
    return int((sigma > sigma[0] * max(sigma.shape) * torch.finfo(torch.float64).eps).sum())


def sv_interference_table(adapters: dict[str, Adapter]) -> pd.DataFrame:
    """Data-free interference of every adapter on every other adapter's task, per layer.

    Task ``i``'s inputs are stood in for by the right singular vectors ``V_i`` of its own
    ``Delta_W_i`` (the input directions its adapter reads); adapter ``j``'s score is the share of
    its energy on them, ``sv_overlap = ||Delta_W_j V_i||_F^2 / ||Delta_W_j||_F^2`` in [0, 1]
    (0: it reads nothing task i's adapter reads; 1: all it reads). The data-aware counterpart
    is :func:`interference_table`'s ``relative_shift``.

    Returns
    -------
    DataFrame with columns ``layer, adapter, data, sv_overlap, energy`` (``energy`` =
    ``||Delta_W_j||_F^2``, the weight when summing over layers), for pairs j != i where both
    adapters have the layer.
    """
    rows = []
    for layer in union_layers(adapters):  # one layer's singular vectors held at a time
        svd = {n: factored_svd(a.layers[layer].scale * a.layers[layer].B, a.layers[layer].A)[1:]
               for n, a in adapters.items() if layer in a.layers}
        reads = {i: v_i[:, : _numerical_rank(s_i)] for i, (s_i, v_i) in svd.items()}  # V_i at its rank
        for j, (s_j, v_j) in svd.items():
            energy = float((s_j**2).sum())
            for i, v_i in reads.items():
                if i == j:
                    continue
                on_i = float(((s_j[:, None] * (v_j.T @ v_i)) ** 2).sum())
                rows.append({"layer": layer, "adapter": j, "data": i,
                             "sv_overlap": on_i / energy if energy > 0 else 0.0, "energy": energy})
    return pd.DataFrame(rows, columns=["layer", "adapter", "data", "sv_overlap", "energy"])


def _effective_rank(sigma: torch.Tensor) -> float:
    """``exp`` of the entropy of the normalized squared singular values (Roy & Vetterli, 2007)."""
    p = sigma**2 / (sigma**2).sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum())) if p.numel() else 0.0


def merged_spectrum(
    adapters: dict[str, Adapter], weights: list[float] | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The spectrum of the task-arithmetic merge ``sum_i w_i Delta_W_i`` against the spectra of
    its parts, per layer (data-free; exact, from the LoRA factors).

    Returns
    -------
    spectra : DataFrame ``layer, kind, index, sigma``
        ``kind`` is ``merged`` (singular values of the merge) or ``parts`` (every part's
        singular values together, sorted: the spectrum the merge would have if the parts did
        not touch).
    summary : DataFrame, one row per layer
        ``adapters`` (how many have the layer); ``nuclear_retention`` =
        ``||sum_i w_i Delta_W_i||_* / sum_i ||w_i Delta_W_i||_*`` in [0, 1] (1: the parts sit in
        orthogonal row and column spaces; lower: merging cancels or collapses directions);
        ``energy_ratio`` = ``||sum||_F^2 / sum ||.||_F^2`` (above 1: the parts reinforce, below:
        they cancel); ``effective_rank_merged`` and ``effective_rank_parts``.
    """
    names = list(adapters)
    weights = [1.0] * len(names) if weights is None else list(weights)
    if len(weights) != len(names):
        raise OsrmInputError(f"weights has {len(weights)} entries for {len(names)} adapters")
    spectra, summary = [], []
    for layer in union_layers(adapters):
        parts = [(w * adapters[n].layers[layer].scale, adapters[n].layers[layer])
                 for n, w in zip(names, weights, strict=True) if layer in adapters[n].layers]
        each = torch.cat([factored_svdvals(s * lw.B, lw.A) for s, lw in parts]).sort(descending=True).values
        merged = factored_svdvals(torch.cat([s * lw.B.double() for s, lw in parts], 1),
                                  torch.cat([lw.A.double() for _, lw in parts], 0))
        total, energy = float(each.sum()), float((each**2).sum())
        summary.append({
            "layer": layer,
            "adapters": len(parts),
            "nuclear_retention": float(merged.sum()) / total if total > 0 else 1.0,
            "energy_ratio": float((merged**2).sum()) / energy if energy > 0 else 1.0,
            "effective_rank_merged": _effective_rank(merged),
            "effective_rank_parts": _effective_rank(each),
        })
        for kind, sigma in (("merged", merged), ("parts", each)):
            spectra += [{"layer": layer, "kind": kind, "index": k, "sigma": float(x)} for k, x in enumerate(sigma)]
    return pd.DataFrame(spectra), pd.DataFrame(summary)


def pair_signals(adapters: dict[str, Adapter]) -> pd.DataFrame:
    """Per ordered pair (task ``data`` i, adapter j != i), summed over layers, the data-free
    signals to set against a measured merge loss: ``sv_overlap`` (:func:`sv_interference_table`,
    energy-weighted over layers) and ``spectral_loss`` = ``1 - nuclear_retention`` of the merge
    of the two adapters (:func:`merged_spectrum`, nuclear norms summed over layers)."""
    table = sv_interference_table(adapters)
    spectral_loss: dict[frozenset, float] = {}  # symmetric: once per unordered pair
    rows = []
    for (j, i), part in table.groupby(["adapter", "data"], sort=False):
        pair = frozenset((i, j))
        if pair not in spectral_loss:
            nuclear = merged_spectrum({i: adapters[i], j: adapters[j]})[0].groupby("kind")["sigma"].sum()
            spectral_loss[pair] = 1.0 - float(nuclear["merged"] / nuclear["parts"]) if nuclear["parts"] > 0 else 0.0
        energy = part["energy"].sum()
        rows.append({
            "adapter": j,
            "data": i,
            "sv_overlap": float((part["sv_overlap"] * part["energy"]).sum() / energy) if energy > 0 else 0.0,
            "spectral_loss": spectral_loss[pair],
        })
    return pd.DataFrame(rows, columns=["adapter", "data", "sv_overlap", "spectral_loss"])
