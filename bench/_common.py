"""Shared pieces of the benchmarks: the result row, the run context, interleaved timing.

Every figure that goes into the table is a ratio of two things measured in the same run on the
same machine, interleaved (baseline, ours, ours, baseline, ...) so that both sides see the same
background load, repeated, and summarized by medians. Absolute times are kept in the JSON for
reference only: on a shared CPU they say little.
"""

from __future__ import annotations

import gc
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Row:
    """One line of the table: a measured figure against its goal.

    Attributes
    ----------
    item : str
        Issue item and part (``"1a"``).
    name : str
        What is compared.
    figure : float or None
        The number compared with the goal (a ratio unless ``unit`` says otherwise); None when
        pending (no hardware).
    op, target : str, float
        The goal: ``figure <= target`` or ``figure >= target``.
    unit : str
        ``"x"`` for ratios.
    ours, baseline : float or None
        Medians behind the figure (seconds unless ``detail`` says otherwise).
    detail : str
        Settings and how the figure was computed.
    command : str
        The command that produced the row.
    samples : dict
        The raw repeats.
    """

    item: str
    name: str
    figure: float | None
    op: str
    target: float
    unit: str = "x"
    ours: float | None = None
    baseline: float | None = None
    repeats: int = 0
    detail: str = ""
    command: str = ""
    samples: dict = field(default_factory=dict)

    @property
    def met(self) -> bool | None:
        if self.figure is None:
            return None
        return self.figure <= self.target if self.op == "<=" else self.figure >= self.target

    @property
    def goal(self) -> str:
        return f"{self.op} {self.target:g}{self.unit}"

    @property
    def status(self) -> str:
        met = self.met
        if met is None:
            return "pending"
        if met:
            return "met"
        # By how much: the factor the figure would have to improve by.
        factor = self.figure / self.target if self.op == "<=" else self.target / self.figure
        return f"MISSED by {factor:.2f}x"

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(goal=self.goal, met=self.met, status=self.status)
        return out


@dataclass
class Context:
    """Settings shared by the benchmarks, and the default model, loaded once."""

    quick: bool = True
    repeats: int = 3
    threads: int = 1
    seed: int = 0
    command: str = "python bench/run.py --quick"
    verbose: bool = True
    _base: tuple | None = None
    _start: float = field(default_factory=time.perf_counter)

    def base_model(self):
        """The packaged default model and tokenizer (shared: callers copy before wrapping)."""
        if self._base is None:
            from osrm_core import load_base_model

            self._base = load_base_model()
        return self._base

    def log(self, message: str) -> None:
        if self.verbose:
            print(f"[{time.perf_counter() - self._start:6.1f}s] {message}", file=sys.stderr, flush=True)

    def cmd(self, item: str) -> str:
        return f"{self.command} --items {item}"


def setup_process(threads: int) -> None:
    """Same thread count for both sides, no progress bars, no expected-warning noise."""
    os.environ.setdefault("TQDM_DISABLE", "1")  # peft's EVA shows a tqdm bar
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("STREAMLIT_LOGGER_LEVEL", "error")  # AppTest warns on every run otherwise
    import torch

    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def timed(fn: Callable[[], object]) -> float:
    """Seconds that ``fn()`` takes (after a garbage collection, so none happens inside)."""
    gc.collect()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleave(sides: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Run each side ``repeats`` times, alternating the order (A B, B A, ...).

    Each side is a callable that returns the seconds it measured itself (so that setup such as
    copying a model stays outside the timing).
    """
    names = list(sides)
    out: dict[str, list[float]] = {n: [] for n in names}
    for i in range(repeats):
        for name in names if i % 2 == 0 else names[::-1]:
            gc.collect()
            out[name].append(float(sides[name]()))
    return out


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median over repeats of ``num[i] / den[i]``: each pair ran back to back, under the same load."""
    return median([a / b for a, b in zip(num, den)])


def rounded(samples: dict[str, list[float]], digits: int = 4) -> dict[str, list[float]]:
    return {k: [round(v, digits) for v in vs] for k, vs in samples.items()}


def status_kib(key: str) -> int:
    """A ``/proc/self/status`` field in KiB, e.g. ``VmRSS`` or ``VmHWM`` (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def reset_peak() -> bool:
    """Reset ``VmHWM`` to the current ``VmRSS`` (Linux >= 4.0); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
