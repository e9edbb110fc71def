"""Caveats the pages print beside their figures (plain text from a run's settings)."""

from __future__ import annotations

from osrm_core.settings import RunConfig


def rank_caveat(config: RunConfig, inits: list[str]) -> str | None:
    """A caveat when ``inits`` have different LoRA ranks in ``config`` (e.g. standard at rank 8
    against osrm_gen at rank 32), else None."""
    ranks = {init: config.for_init(init).rank for init in inits if init in config.inits}
    if len(set(ranks.values())) < 2:
        return None
    listed = ", ".join(f"{init} rank {r}" for init, r in ranks.items())
    return (
        f"Different ranks ({listed}): `E‖A_j h_i‖²` sums over the r rows of A, so a higher rank "
        "collects more input energy from the same data, and its ΔW has more directions to shift the "
        "output. The comparison is between the recipes as run, not at equal rank; the relative output "
        "shift is the fairest of the values."
    )
