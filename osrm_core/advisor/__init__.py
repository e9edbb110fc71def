"""The merge advisor: from adapters and labelled sample texts to a recommended merge.

* :mod:`.samples` — the sample pool of each task, its validation and held-out shares, intervals;
* :mod:`.search` — :func:`advise`: the grid, the per-adapter weight search, the held-out report;
* :mod:`.choice` — which finalist is recommended, and why;
* :mod:`.result` — :class:`Advice` and the per-layer verdicts;
* :mod:`.report` — ``advice.md``, ``advice.json``, the merged adapter, the ``osrm merge`` command.
"""

from .choice import choose, reason, selection_margin
from .report import advice_markdown, grid_table, merge_command, write_advice
from .result import Advice, adapter_layer_verdicts, layer_notes, weights_label
from .samples import loss_interval, sample_pool, score_interval, split_samples, wilson_interval
from .search import (
    ADVISE_BUDGET,
    ADVISE_DENSITIES,
    ADVISE_LAMBDAS,
    ADVISE_METHODS,
    ADVISE_REFINE,
    AdvicePlan,
    Search,
    advice_plan,
    advise,
)

__all__ = [
    "ADVISE_BUDGET",
    "ADVISE_DENSITIES",
    "ADVISE_LAMBDAS",
    "ADVISE_METHODS",
    "ADVISE_REFINE",
    "Advice",
    "Search",
    "adapter_layer_verdicts",
    "advice_markdown",
    "AdvicePlan",
    "advice_plan",
    "advise",
    "choose",
    "grid_table",
    "layer_notes",
    "loss_interval",
    "merge_command",
    "reason",
    "sample_pool",
    "score_interval",
    "selection_margin",
    "split_samples",
    "weights_label",
    "wilson_interval",
    "write_advice",
]
