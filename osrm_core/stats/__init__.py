"""Feature statistics: what they hold (:mod:`.moments`: :class:`LayerStats`, :class:`FeatureStats`,
saving and loading, all-reduce) and how they are collected (:mod:`.collect`: hooks on the
adapted layers' inputs, padding masked)."""

from __future__ import annotations

from .collect import (
    collect_feature_stats,
    iter_feature_stats,
    select_samples,
    write_feature_stats,
)
from .moments import FORMAT, FeatureStats, LayerStats, check_same_layers

__all__ = [
    "FORMAT",
    "FeatureStats",
    "LayerStats",
    "check_same_layers",
    "collect_feature_stats",
    "iter_feature_stats",
    "select_samples",
    "write_feature_stats",
]
