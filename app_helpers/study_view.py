"""The Study page's quick study: its variants in words and the progress of running it."""

from __future__ import annotations

from collections.abc import Callable

from osrm_core.study import StudyConfig, variant_label, variant_name, variants


def study_plan(study: StudyConfig) -> tuple[list[str], Callable[[str], str]]:
    """The study's variants as labels for people (``osrm_gen, freeze_A, rank 32, seed 0``), and a
    function that puts those labels in place of the internal names (``osrm_gen-freeze_A-n64-...``)
    in the study's progress messages."""
    todo = variants(study)
    names = {variant_name(v, study.base.train.lr): variant_label(v, study.base) for v in todo}

    def label(message: str) -> str:
        for name in sorted(names, key=len, reverse=True):  # longer names first: one may contain another
            message = message.replace(name, names[name])
        return message

    return list(names.values()), label
