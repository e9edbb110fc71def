"""osrm_core: feature statistics, OSRM initialization, fine-tuning, merging and exact
interference diagnostics for LoRA adapters (Zhang & Zhou, ACL 2025, arXiv:2505.22934).

The workflows (what ``osrm run``, ``diagnose``, ``merge``, ``sweep``, ``advise`` and ``study`` call):
:func:`run_experiment`, :func:`diagnose_adapters`, :func:`merge_adapters` and
:func:`build_merged_adapter`, :func:`sweep_adapters`, :func:`advise` and :func:`write_advice`,
:func:`run_study`; bad input raises an :class:`OsrmInputError`.
"""

from __future__ import annotations

from osrm_core.adapters import (
    Adapter,
    LoraWeights,
    load_adapter,
    lora_from_model,
    read_adapter_dir,
)
from osrm_core.advise import advise, write_advice
from osrm_core.data import Split, TaskData, from_dataframes, load_task
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
from osrm_core.errors import AdapterError, ConfigError, DataError, OsrmInputError
from osrm_core.export import merge_adapters
from osrm_core.inits import (
    INIT_METHODS,
    INITS,
    init_lora,
    osrm_gen_subspace,
    osrm_mean_subspace,
    osrm_subspace,
    task_subspaces,
)
from osrm_core.merge import MERGE_METHODS, get_merge_method, merge_deltas
from osrm_core.models import find_target_layers, load_base_model, resolve_device
from osrm_core.pipeline import Pipeline, run_experiment
from osrm_core.settings import RunConfig
from osrm_core.spectra import Spectrum, feature_spectra, symmetric_eigh
from osrm_core.stats import FeatureStats, LayerStats, collect_feature_stats, write_feature_stats
from osrm_core.study import StudyConfig, run_study
from osrm_core.task_spec import parse_task_spec
from osrm_core.train import finetune
from osrm_core.workflows import build_merged_adapter, diagnose_adapters, merge_scores, sweep_adapters

__version__ = "0.1.0"

__all__ = [
    "DEMO_TASKS",
    "INITS",
    "INIT_METHODS",
    "MERGE_METHODS",
    "Adapter",
    "AdapterError",
    "ConfigError",
    "DataError",
    "DistributedError",
    "FeatureStats",
    "LayerStats",
    "LoraWeights",
    "OsrmInputError",
    "Pipeline",
    "RunConfig",
    "Spectrum",
    "Split",
    "StudyConfig",
    "TaskData",
    "advise",
    "angle_table",
    "build_merged_adapter",
    "collect_feature_stats",
    "demo_task",
    "demo_tasks",
    "diagnose_adapters",
    "dist_info",
    "feature_spectra",
    "find_target_layers",
    "finetune",
    "from_dataframes",
    "get_merge_method",
    "init_distributed",
    "init_lora",
    "interference_matrix",
    "interference_table",
    "load_adapter",
    "load_base_model",
    "load_task",
    "lora_from_model",
    "merge_adapters",
    "merge_deltas",
    "merge_scores",
    "osrm_gen_subspace",
    "osrm_mean_subspace",
    "osrm_subspace",
    "own_energy_table",
    "parse_task_spec",
    "posthoc_osrm",
    "principal_angles",
    "read_adapter_dir",
    "resolve_device",
    "run_experiment",
    "run_study",
    "summed_interference",
    "sweep_adapters",
    "symmetric_eigh",
    "task_subspaces",
    "write_advice",
    "write_feature_stats",
]
