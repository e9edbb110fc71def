"""osrm_core: feature statistics, OSRM initialization, fine-tuning, merging and exact
interference diagnostics for LoRA adapters (Zhang & Zhou, ACL 2025, arXiv:2505.22934)."""

from __future__ import annotations

from osrm_core.adapters import (
    Adapter,
    AdapterError,
    LoraWeights,
    load_adapter,
    lora_from_model,
    read_adapter_dir,
)
from osrm_core.data import DataError, Split, TaskData, from_dataframes, load_task
from osrm_core.demo import DEMO_TASKS, demo_task, demo_tasks
from osrm_core.diagnostics import (
    angle_table,
    interference_matrix,
    interference_table,
    own_energy_table,
    posthoc_osrm,
    principal_angles,
    summed_interference,
)
from osrm_core.distributed import DistributedError, dist_info, init_distributed
from osrm_core.inits import (
    INIT_METHODS,
    init_lora,
    osrm_gen_subspace,
    osrm_mean_subspace,
    osrm_subspace,
    task_subspaces,
)
from osrm_core.models import find_target_layers, load_base_model, resolve_device
from osrm_core.spectra import Spectrum, feature_spectra, symmetric_eigh
from osrm_core.stats import FeatureStats, LayerStats, collect_feature_stats, write_feature_stats
from osrm_core.task_spec import parse_task_spec

__version__ = "0.1.0"

__all__ = [
    "DEMO_TASKS",
    "INIT_METHODS",
    "Adapter",
    "AdapterError",
    "DataError",
    "DistributedError",
    "FeatureStats",
    "LayerStats",
    "LoraWeights",
    "Spectrum",
    "Split",
    "TaskData",
    "angle_table",
    "collect_feature_stats",
    "demo_task",
    "demo_tasks",
    "dist_info",
    "feature_spectra",
    "find_target_layers",
    "from_dataframes",
    "init_distributed",
    "init_lora",
    "interference_matrix",
    "interference_table",
    "load_adapter",
    "load_base_model",
    "load_task",
    "lora_from_model",
    "osrm_gen_subspace",
    "osrm_mean_subspace",
    "osrm_subspace",
    "own_energy_table",
    "parse_task_spec",
    "posthoc_osrm",
    "principal_angles",
    "read_adapter_dir",
    "resolve_device",
    "summed_interference",
    "symmetric_eigh",
    "task_subspaces",
    "write_feature_stats",
]
