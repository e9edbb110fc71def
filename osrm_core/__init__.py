"""osrm_core: feature statistics, OSRM initialization, fine-tuning, merging and exact
interference diagnostics for LoRA adapters (Zhang & Zhou, ACL 2025, arXiv:2505.22934).

The workflows (what ``osrm run``, ``diagnose``, ``merge``, ``sweep``, ``advise`` and ``study`` call):
:func:`run_experiment`, :func:`diagnose_adapters`, :func:`merge_adapters` and
:func:`build_merged_adapter`, :func:`sweep_adapters`, :func:`advise` and :func:`write_advice`,
:func:`run_study`; bad input raises an :class:`OsrmInputError`.

Importing the package is cheap (the ``osrm`` command line starts without torch's friends):
each public name is imported from its module on first use.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

#: Public name -> the module (under ``osrm_core``) that defines it.
_EXPORTS: dict[str, tuple[str, ...]] = {
    "adapters": ("Adapter", "LoraWeights", "load_adapter", "lora_from_model", "read_adapter_dir"),
    "advisor": ("advise", "write_advice"),
    "data": ("Split", "TaskData", "from_dataframes", "load_task"),
    "demo": ("DEMO_TASKS", "demo_task", "demo_tasks"),
    "diagnostics": (
        "angle_table", "interference_matrix", "interference_table", "own_energy_table", "posthoc_osrm",
        "principal_angles", "summed_interference",
    ),
    "distributed": ("DistributedError", "dist_info", "init_distributed"),
    "errors": ("AdapterError", "ConfigError", "DataError", "OsrmInputError"),
    "export": ("merge_adapters",),
    "inits": (
        "INIT_METHODS", "INITS", "init_lora", "osrm_gen_subspace", "osrm_mean_subspace", "osrm_subspace",
        "task_subspaces",
    ),
    "merge": ("MERGE_METHODS", "get_merge_method", "merge_deltas"),
    "models": ("find_target_layers", "load_base_model", "resolve_device"),
    "pipeline": ("Pipeline", "run_experiment"),
    "settings": ("RunConfig",),
    "spectra": ("Spectrum", "feature_spectra", "symmetric_eigh"),
    "stats": ("FeatureStats", "LayerStats", "collect_feature_stats", "write_feature_stats"),
    "study": ("StudyConfig", "run_study"),
    "task_spec": ("parse_task_spec",),
    "train": ("finetune",),
    "workflows": ("build_merged_adapter", "diagnose_adapters", "merge_scores", "sweep_adapters"),
}
_HOME = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_HOME)


def __getattr__(name: str):
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module 'osrm_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"osrm_core.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
