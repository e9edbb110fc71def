"""Independent units of work (a study's variants, a run's adapters) in several processes.

The CPU cores are split between the processes, never shared: on this kind of machine two
fine-tuning processes with two threads each on two cores did 2.3x less work in all than one
(NOTES.md), so ``jobs`` processes on ``C`` cores get ``C // jobs`` torch threads each. Workers are
started with ``spawn`` (a fork of a process that already ran torch threads can deadlock).
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from typing import Any

from osrm_core.errors import OsrmInputError


def available_cores() -> int:
    """CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def threads_per_job(jobs: int, cores: int | None = None) -> int:
    """Torch threads of each of ``jobs`` processes on ``cores`` cores (default: this machine's)."""
    cores = available_cores() if cores is None else cores
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise OsrmInputError(f"jobs must be an integer >= 1, got {jobs!r}")
    if jobs > cores:
        raise OsrmInputError(
            f"jobs={jobs} is more than the {cores} CPU cores: parallel jobs split the cores "
            f"(at most {cores} here)"
        )
    return cores // jobs


def _start_worker(threads: int) -> None:
    import torch

    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


def run_parallel(
    fn: Callable[[Any], Any],
    items: Sequence[Any],
    jobs: int = 1,
    *,
    on_done: Callable[[int, Any], None] | None = None,
) -> list:
    """``[fn(item) for item in items]``, in ``jobs`` processes when ``jobs > 1``.

    ``fn`` must be a module-level function and the items picklable. ``on_done(index, result)``
    is called in this process as each item finishes (in finishing order). The first failure is
    raised once the items already running have stopped; items not started are cancelled.
    With ``jobs == 1`` everything runs here, in order, with this process's threads.
    """
    threads = threads_per_job(jobs)
    results: list = [None] * len(items)
    if jobs == 1 or len(items) <= 1:
        for k, item in enumerate(items):
            results[k] = fn(item)
            if on_done:
                on_done(k, results[k])
        return results
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(jobs, len(items)), mp_context=context, initializer=_start_worker,
                             initargs=(threads,)) as pool:
        futures = {pool.submit(fn, item): k for k, item in enumerate(items)}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for future in done:
                if future.exception() is not None:
                    for other in pending:
                        other.cancel()
                    raise future.exception()
                results[futures[future]] = future.result()
                if on_done:
                    on_done(futures[future], results[futures[future]])
    return results
