"""Independent units of work (a study's variants, a run's adapters) in several processes, on this
host or as the tasks of a Ray cluster.

The CPU cores are split between the processes, never shared: on this kind of machine two
fine-tuning processes with two threads each on two cores did 2.3x less work in all than one
(NOTES.md), so ``jobs`` processes on ``C`` cores get ``C // jobs`` torch threads each. Workers are
started with ``spawn`` (a fork of a process that already ran torch threads can deadlock). On a
Ray cluster (:class:`RayCluster`) each task takes as many of the cluster's CPUs as it runs
torch threads (one unless asked), and Ray places the tasks.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NoReturn

from osrm_core.errors import OsrmInputError

#: The addresses a Ray cluster is given by, as :func:`ray.init` takes them.
RAY_ADDRESSES = ("'local' (a new cluster on this machine), 'auto' (the cluster `ray start` runs here), "
                 "HOST:PORT of a running cluster's head, or ray://HOST:PORT through Ray Client")


@dataclass(frozen=True)
class RayCluster:
    """A Ray cluster that runs the items as Ray tasks: ``address`` as :func:`ray.init` takes it
    (:data:`RAY_ADDRESSES`); each task takes ``threads`` of the cluster's CPUs and runs torch with
    as many threads. The tasks read and write the same paths as this process: files they write
    must be on a folder every node shares."""

    address: str
    threads: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.threads, int) or isinstance(self.threads, bool) or self.threads < 1:
            raise OsrmInputError(f"threads of a Ray task must be an integer >= 1, got {self.threads!r}")


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


def check_backend(jobs: int, cluster: RayCluster | None = None) -> None:
    """Refuse a bad ``jobs`` (see :func:`threads_per_job`), or ``jobs`` with a Ray cluster."""
    threads_per_job(jobs)
    if cluster is not None and jobs != 1:
        raise OsrmInputError(f"jobs={jobs} splits this machine's cores between processes; on a Ray cluster Ray "
                         f"places the tasks (each with its threads): give one of them")


def _check_reachable(address: str) -> None:
    """A concrete address must answer at once (ray.init waits minutes for one that does not)."""
    if address in ("local", "auto"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not (host and port.isdigit()):
        raise OsrmInputError(f"Ray cluster address {address!r} is not one of {RAY_ADDRESSES}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as err:
        raise OsrmInputError(f"Ray cluster {address!r} cannot be reached ({err}); give {RAY_ADDRESSES}") from None


@contextmanager
def ray_connection(cluster: RayCluster | None) -> Iterator[None]:
    """This process connected to ``cluster`` for the block (nothing to do for None). A connection
    made before (``ray.init``) is used as it is, whatever the address; one made here is closed
    after the block (a cluster started here with ``'local'`` stops)."""
    if cluster is None:
        yield
        return
    try:
        import ray
    except ImportError:
        raise OsrmInputError("a Ray cluster needs the ray package: pip install 'osrm-workbench[ray]'") from None
    if ray.is_initialized():
        yield
        return
    _check_reachable(cluster.address)
    try:
        ray.init(address=cluster.address, logging_level=logging.WARNING)
    except (ConnectionError, ValueError, RuntimeError) as err:
        reason = str(err).strip().splitlines()[0].split(". ")[0] if str(err).strip() else type(err).__name__
        raise OsrmInputError(f"Ray cluster {cluster.address!r} cannot be reached ({reason}); "
                         f"give {RAY_ADDRESSES}") from None
    try:
        yield
    finally:
        ray.shutdown()


def _raise_named(err: BaseException, label: str | None) -> NoReturn:
    """Raise ``err`` with ``label`` before its message, as its class where that class takes a message."""
    if label is None:
        raise err
    try:
        named = type(err)(f"{label}: {err}")
    except TypeError:
        named = RuntimeError(f"{label}: {type(err).__name__}: {err}")
    raise named from err


def _ray_task(fn: Callable[[Any], Any], item: Any, threads: int) -> Any:
    _start_worker(threads)
    return fn(item)


def _run_on_ray(fn: Callable[[Any], Any], items: Sequence[Any], cluster: RayCluster,
                on_done: Callable[[int, Any], None] | None, labels: Sequence[str | None]) -> list:
    import ray

    task = ray.remote(num_cpus=cluster.threads)(_ray_task)
    index = {task.remote(fn, item, cluster.threads): k for k, item in enumerate(items)}
    results: list = [None] * len(items)
    pending = list(index)
    try:
        while pending:
            (ready,), pending = ray.wait(pending, num_returns=1)
            k = index[ready]
            try:
                results[k] = ray.get(ready)
            except ray.exceptions.RayError as err:
                _raise_named(getattr(err, "cause", None) or err, labels[k])
            if on_done:
                on_done(k, results[k])
    except KeyboardInterrupt:
        for ref in pending:
            ray.cancel(ref, force=True)  # as Ctrl-C stops a pool's processes; a rerun resumes
        raise
    except BaseException:
        for ref in pending:
            ray.cancel(ref)  # a task not started never starts; a running one finishes, as in a pool
        if pending:
            ray.wait(pending, num_returns=len(pending))
        raise
    return results


def run_parallel(
    fn: Callable[[Any], Any],
    items: Sequence[Any],
    jobs: int = 1,
    *,
    on_done: Callable[[int, Any], None] | None = None,
    cluster: RayCluster | None = None,
    labels: Sequence[str] | None = None,
) -> list:
    """``[fn(item) for item in items]``, in ``jobs`` processes when ``jobs > 1``, or as the tasks
    of ``cluster``.

    ``fn`` must be a module-level function and the items picklable. ``on_done(index, result)``
    is called in this process as each item finishes (in finishing order). The first failure is
    raised once the items already running have stopped, its message led by the item's entry of
    ``labels`` when given; items not started are cancelled. With ``jobs == 1`` and no cluster
    everything runs here, in order, with this process's threads.
    """
    check_backend(jobs, cluster)
    labels = list(labels) if labels is not None else [None] * len(items)
    if cluster is not None:
        with ray_connection(cluster):
            return _run_on_ray(fn, items, cluster, on_done, labels)
    results: list = [None] * len(items)
    if jobs == 1 or len(items) <= 1:
        for k, item in enumerate(items):
            try:
                results[k] = fn(item)
            except Exception as err:
                _raise_named(err, labels[k])
            if on_done:
                on_done(k, results[k])
        return results
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(jobs, len(items)), mp_context=context, initializer=_start_worker,
                             initargs=(threads_per_job(jobs),)) as pool:
        futures = {pool.submit(fn, item): k for k, item in enumerate(items)}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for future in done:
                if future.exception() is not None:
                    for other in pending:
                        other.cancel()
                    _raise_named(future.exception(), labels[futures[future]])
                results[futures[future]] = future.result()
                if on_done:
                    on_done(futures[future], results[futures[future]])
    return results
