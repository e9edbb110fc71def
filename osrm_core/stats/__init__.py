"""Feature statistics: what they hold (:mod:`.moments`: :class:`LayerStats`, :class:`FeatureStats`,
saving and loading, all-reduce) and how they are collected (:mod:`.collect`: hooks on the
adapted layers' inputs, padding masked) and, for given adapters, :mod:`.projected`: only the
projections ``A_j h`` the interference tables need, never the ``d x d`` matrix, and :mod:`.sketch`:
a task's top-k data subspace by a streamed randomized range finder, with a stated error (both
stream the texts through :mod:`.stream`)."""

from __future__ import annotations

from .collect import (
    collect_feature_stats,
    iter_feature_stats,
    select_samples,
    write_feature_stats,
)
from .moments import FORMAT, FeatureStats, LayerStats, check_same_layers
from .projected import ProjectedLayer, ProjectedStats, collect_projected_stats
from .sketch import Sketch, SketchLayer, collect_sketch

__all__ = [
    "FORMAT",
    "FeatureStats",
    "LayerStats",
    "ProjectedLayer",
    "ProjectedStats",
    "Sketch",
    "SketchLayer",
    "check_same_layers",
    "collect_feature_stats",
    "collect_projected_stats",
    "collect_sketch",
    "iter_feature_stats",
    "select_samples",
    "write_feature_stats",
]
