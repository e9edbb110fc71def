"""The app's helpers: session state and the shared-mode rules (:mod:`.state`), cached loaders
(:mod:`.loaders`), reusable widgets (:mod:`.widgets`) and uploaded files (:mod:`.uploads`).
No maths here: every number comes from :mod:`osrm_core`."""

from __future__ import annotations

from osrm_core.archive import ArchiveError

from .loaders import (
    base_model,
    drift_table,
    fresh_model,
    real_model_comparison,
    rest_spectrum,
    result_table,
    run_spectra,
    run_summary,
    sweep_table,
    texts_feature_stats,
)
from .state import (
    RUN_INFO,
    SHARED_NOTE,
    close_run,
    current_run,
    init_state,
    list_runs,
    open_run,
    open_uploaded_run,
    require_run,
    runs_root,
    session_tmp,
    shared_config_problem,
    shared_mode,
)
from .uploads import (
    adapter_zip,
    merged_adapter_zip,
    read_uploaded_adapters,
    safe_name,
    save_task_dir,
    text_task,
    uploads_signature,
    zip_directory,
)
from .widgets import (
    NONE,
    column_picker,
    layer_selector,
    merge_param_widgets,
    progress_callbacks,
    show_figure,
    show_table,
)

__all__ = [
    "NONE",
    "RUN_INFO",
    "SHARED_NOTE",
    "ArchiveError",
    "adapter_zip",
    "base_model",
    "close_run",
    "drift_table",
    "column_picker",
    "current_run",
    "fresh_model",
    "init_state",
    "layer_selector",
    "list_runs",
    "merge_param_widgets",
    "merged_adapter_zip",
    "open_run",
    "open_uploaded_run",
    "progress_callbacks",
    "read_uploaded_adapters",
    "real_model_comparison",
    "require_run",
    "rest_spectrum",
    "result_table",
    "run_spectra",
    "run_summary",
    "runs_root",
    "safe_name",
    "save_task_dir",
    "session_tmp",
    "shared_config_problem",
    "shared_mode",
    "show_figure",
    "show_table",
    "sweep_table",
    "text_task",
    "texts_feature_stats",
    "uploads_signature",
    "zip_directory",
]
