"""Figure builders: plain functions that take tables or arrays and return plotly figures (no
Streamlit here), plus the small table reshaping the figures need. One module per page topic:
:mod:`.spectra`, :mod:`.interference` (and angles), :mod:`.sweep` (and summaries, studies),
:mod:`.toy` (the Learn page), :mod:`.advice` (the merge advisor); :mod:`.common` holds the
fixed colours and layout.

Every figure carries hover values; colours are fixed per init (from the init registry) and per
task so that the same thing has the same colour on every page.
"""

from __future__ import annotations

from .advice import advice_figure, candidate_label
from .common import (
    INIT_COLORS,
    INIT_DASH,
    INTERFERENCE_VALUES,
    SUM_OVER_LAYERS,
    InterferenceValue,
    color_of,
    figure_html,
    figures_page,
    group_label,
    short_layer,
)
from .interference import (
    angle_figure,
    angle_heatmap,
    angle_matrix,
    drift_figure,
    energy_kept_figure,
    interference_heatmap,
    interference_view,
    layer_ratio_figure,
    matrix_range,
    off_diagonal_sum,
    overlap_matrix,
    own_energy_figure,
)
from .spectra import (
    cumulative_energy_figure,
    effective_rank_heatmap,
    eigenspectrum_figure,
    merged_spectrum_figure,
    zero_smallest,
)
from .sweep import (
    arm_label,
    average_choices,
    edge_notes,
    metric_label,
    study_curve_figure,
    summary_figure,
    summary_tables,
    sweep_best,
    sweep_curves,
    sweep_figure,
)
from .toy import (
    toy_figure,
)

__all__ = [
    "advice_figure",
    "candidate_label",
    "arm_label",
    "average_choices",
    "edge_notes",
    "INIT_COLORS",
    "INIT_DASH",
    "INTERFERENCE_VALUES",
    "InterferenceValue",
    "SUM_OVER_LAYERS",
    "angle_figure",
    "angle_heatmap",
    "angle_matrix",
    "color_of",
    "cumulative_energy_figure",
    "drift_figure",
    "effective_rank_heatmap",
    "eigenspectrum_figure",
    "energy_kept_figure",
    "figure_html",
    "figures_page",
    "group_label",
    "interference_heatmap",
    "interference_view",
    "layer_ratio_figure",
    "merged_spectrum_figure",
    "matrix_range",
    "off_diagonal_sum",
    "overlap_matrix",
    "zero_smallest",
    "own_energy_figure",
    "short_layer",
    "study_curve_figure",
    "summary_figure",
    "summary_tables",
    "metric_label",
    "sweep_best",
    "sweep_curves",
    "sweep_figure",
    "toy_figure",
]
