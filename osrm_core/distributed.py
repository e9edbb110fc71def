"""Data-parallel runs on ``torch.distributed``, set up by ``torchrun`` or ``accelerate launch``.

The launchers start one process per device and pass the rendezvous in the environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``).
:func:`init_distributed` joins that process group through accelerate's ``PartialState`` (NCCL on
GPUs, gloo on CPUs) with a timeout on every collective, so a rank that crashed or hangs makes
the others fail with a message that names the step, instead of waiting forever.

Everything here is a no-op in a single process: the library runs the same code either way.
Only rank 0 writes files; the other ranks wait at :func:`barrier` where they need its files.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch

from osrm_core.errors import OsrmInputError

T = TypeVar("T")

#: Seconds a collective may wait for the other ranks (``OSRM_DIST_TIMEOUT`` overrides it).
DEFAULT_TIMEOUT_S = 1800.0


class DistributedError(RuntimeError):
    """A collective failed or timed out: another rank crashed, hangs or took another path."""


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the process group (rank 0 of 1 without one)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        """True when several processes work together."""
        return self.world > 1

    def prefix(self) -> str:
        """``"rank 1/4: "`` for messages, empty in a single process."""
        return f"rank {self.rank}/{self.world}: " if self.active else ""


def dist_info() -> DistInfo:
    """Rank, world size and local rank of the initialized process group (or ``0, 1, 0``)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    rank, world = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank, world, int(os.environ.get("LOCAL_RANK", rank)))


def is_main_process() -> bool:
    """True on rank 0 and in a single process: the one that writes files and prints."""
    return dist_info().is_main


def launched_world_size() -> int:
    """``WORLD_SIZE`` set by ``torchrun``/``accelerate launch`` (1 when not launched by them)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise OsrmInputError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None


#: The timeout :func:`init_distributed` was given (used by barriers and error messages).
_configured_timeout_s: float | None = None


def timeout_seconds(timeout_s: float | None = None) -> float:
    """The collective timeout: the argument, else the one given to :func:`init_distributed`,
    else ``OSRM_DIST_TIMEOUT``, else 30 minutes."""
    if timeout_s is None:
        timeout_s = _configured_timeout_s
    if timeout_s is None:
        raw = os.environ.get("OSRM_DIST_TIMEOUT")
        try:
            timeout_s = float(raw) if raw else DEFAULT_TIMEOUT_S
        except ValueError:
            raise OsrmInputError(f"OSRM_DIST_TIMEOUT={raw!r} is not a number of seconds") from None
    if not timeout_s > 0:
        raise OsrmInputError(f"the distributed timeout must be > 0 seconds, got {timeout_s}")
    return float(timeout_s)


def _use_cpu(device: str | None) -> bool:
    return not torch.cuda.is_available() or (device is not None and str(device).startswith("cpu"))


def init_distributed(timeout_s: float | None = None, *, device: str | None = None) -> DistInfo:
    """Join the process group of a ``torchrun``/``accelerate launch`` job; no-op otherwise.

    Parameters
    ----------
    timeout_s : float, optional
        How long a collective waits for the other ranks before failing (default
        ``OSRM_DIST_TIMEOUT`` or 1800 s). Long single-rank work (rank 0 writing results) must
        fit in it.
    device : str, optional
        ``"cpu"`` forces the gloo backend on a machine with GPUs; otherwise NCCL is used when
        CUDA is available, and each process takes the GPU of its ``LOCAL_RANK``.

    Returns
    -------
    DistInfo
    """
    import torch.distributed as dist

    global _configured_timeout_s
    seconds = timeout_seconds(timeout_s)
    timeout = timedelta(seconds=seconds)
    if timeout_s is not None:
        _configured_timeout_s = seconds
    if dist.is_available() and dist.is_initialized():
        _export_env()
        return dist_info()
    if launched_world_size() <= 1:
        return DistInfo()
    if "MASTER_ADDR" not in os.environ or "RANK" not in os.environ:
        raise OsrmInputError(
            "WORLD_SIZE > 1 but no RANK/MASTER_ADDR in the environment: start the job with "
            "torchrun --nproc_per_node N or accelerate launch --num_processes N"
        )
    from accelerate import PartialState

    try:
        state = PartialState(cpu=_use_cpu(device), timeout=timeout)
    except Exception as err:  # rendezvous failures come as many types
        raise DistributedError(
            f"cannot join the process group (rank {os.environ.get('RANK')}, world "
            f"{os.environ.get('WORLD_SIZE')}): {err}"
        ) from err
    if state.num_processes != launched_world_size():
        raise DistributedError(
            f"accelerate set up {state.num_processes} processes but WORLD_SIZE is {launched_world_size()}"
        )
    return dist_info()


def _export_env() -> None:
    """Give a process group that was set up by hand the variables accelerate reads."""
    import torch.distributed as dist

    os.environ.setdefault("RANK", str(dist.get_rank()))
    os.environ.setdefault("WORLD_SIZE", str(dist.get_world_size()))
    os.environ.setdefault("LOCAL_RANK", os.environ["RANK"])


def close_distributed() -> None:
    """Leave the process group (at the end of a command)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def local_device(device: str = "cpu") -> str:
    """The device this process should use for ``device``: with several processes on GPUs,
    ``"cuda"``/``"auto"`` becomes ``"cuda:<LOCAL_RANK>"`` so that each process has its own."""
    info = dist_info()
    if info.active and str(device) in ("cuda", "auto") and torch.cuda.is_available():
        return f"cuda:{info.local_rank % torch.cuda.device_count()}"
    return device


def communication_device() -> torch.device:
    """Where tensors must be for collectives: the current GPU with NCCL, else the CPU."""
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _timeout_td() -> timedelta:
    return timedelta(seconds=timeout_seconds())


def _fail(what: str, err: Exception) -> DistributedError:
    info = dist_info()
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return DistributedError(
        f"{info.prefix()}{what} failed: another rank crashed, hangs or took another path "
        f"(collective timeout {timeout_seconds():g} s; set OSRM_DIST_TIMEOUT to change it): {first}"
    )


def barrier(what: str = "barrier") -> None:
    """Wait for every rank. With gloo, the error names the ranks that did not arrive."""
    import torch.distributed as dist

    if not dist_info().active:
        return
    try:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=_timeout_td(), wait_all_ranks=True)
        else:
            dist.barrier()
    except Exception as err:  # DistBackendError, RuntimeError, ...
        raise _fail(what, err) from err


def broadcast_object(obj: T, what: str = "broadcast") -> T:
    """Rank 0's ``obj`` on every rank (picklable objects)."""
    import torch.distributed as dist

    if not dist_info().active:
        return obj
    box = [obj]
    try:
        dist.broadcast_object_list(box, src=0)
    except Exception as err:
        raise _fail(what, err) from err
    return box[0]


def all_gather_object(obj: T, what: str = "all-gather") -> list[T]:
    """Every rank's ``obj``, in rank order."""
    import torch.distributed as dist

    info = dist_info()
    if not info.active:
        return [obj]
    out: list = [None] * info.world
    try:
        dist.all_gather_object(out, obj)
    except Exception as err:
        raise _fail(what, err) from err
    return out


def all_reduce_sum(tensors: Sequence[torch.Tensor], what: str = "all-reduce", group=None) -> None:
    """Sum each tensor over all ranks, in place, wherever it lives (moved to the
    communication device and back when needed)."""
    import torch.distributed as dist

    if not dist_info().active:
        return
    comm = communication_device()
    try:
        for t in tensors:
            buf = t if t.device == comm else t.to(comm)
            dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
            if buf is not t:
                t.copy_(buf)
    except Exception as err:
        raise _fail(what, err) from err


def run_on_main(fn: Callable[[], T], what: str) -> T:
    """Run ``fn`` on rank 0 only and hand its result to every rank.

    A ``ValueError`` (bad input: an existing run with another config, ...) raised on rank 0 is
    raised on every rank, so that all of them stop with the same message instead of waiting.
    """
    info = dist_info()
    if not info.active:
        return fn()
    outcome: tuple = ("ok", None)
    if info.is_main:
        try:
            outcome = ("ok", fn())
        except ValueError as err:
            outcome = ("error", type(err), str(err))
        except Exception as err:  # still tell the others, then fail here with the real traceback
            broadcast_object(("crash", type(err).__name__, str(err)), what)
            raise
    outcome = broadcast_object(outcome, what)
    if outcome[0] == "ok":
        return outcome[1]
    if outcome[0] == "error":
        try:
            err = outcome[1](outcome[2])
        except Exception:  # an error type that is not built from a message alone
            err = ValueError(outcome[2])
        raise err
    raise DistributedError(f"{info.prefix()}{what} failed on rank 0: {outcome[1]}: {outcome[2]}")
