"""Collecting feature statistics with forward hooks: padding masked, float64 sums, streaming over
batches, data-parallel over processes, and optionally a few layer inputs per pass."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from osrm_core.batching import iter_batches, move_batch
from osrm_core.data import TaskData
from osrm_core.errors import InputTypeError, OsrmInputError
from osrm_core.models import decoder_position_ids, find_target_layers, get_module

from .moments import FeatureStats, LayerStats

Progress = Callable[[int, int, str], None]


class _Collector:
    """Forward pre-hooks on the target layers that add each batch's real tokens to the sums.

    On the first batch, layers whose input is the very same tensor are grouped (references to
    the inputs are held during that batch so that no freed memory can be mistaken for a shared
    input); afterwards only one layer per group accumulates.
    """

    def __init__(self, model: nn.Module, names: list[str], dtype: torch.dtype, sample_means: bool = True) -> None:
        self.model, self.names, self.dtype, self.sample_means = model, names, dtype, sample_means
        self.mask: torch.Tensor | None = None
        self.layers: dict[str, LayerStats] = {}
        self.leaders: set[str] = set()
        self._first: dict[tuple, tuple[torch.Tensor, str]] | None = {}

    def _hook(self, name: str):
        def hook(module, args, kwargs=None):
            x = args[0] if args else next(iter(kwargs.values()))
            if self._first is not None:
                key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.device)
                if key in self._first:
                    self.layers[name] = self.layers[self._first[key][1]]
                    return
                self._first[key] = (x, name)
                self.layers[name] = LayerStats.zeros(x.shape[-1], x.device, self.dtype, sample_means=self.sample_means)
                self.leaders.add(name)
            elif name not in self.leaders:
                return
            self._accumulate(name, x)

        return hook

    @torch.no_grad()
    def _accumulate(self, name: str, x: torch.Tensor) -> None:
        mask = self.mask.to(x.device)
        if x.shape[:2] != mask.shape:
            raise OsrmInputError(
                f"layer {name!r}: input of shape {tuple(x.shape)} does not match the attention "
                f"mask {tuple(mask.shape)}; only (batch, tokens, features) inputs are supported"
            )
        # Real tokens in row-major order: sample by sample, each sample's tokens in order.
        real = x[mask].to(self.dtype)
        column_sums = real.sum(0)
        # A NaN or Inf entry makes its column's sum non-finite, so the (d,) sums screen the
        # (tokens, d) block; only a non-finite sum (NaN/Inf, or a float32 overflow) needs the
        # entry-wise check. Cheaper than isfinite over every entry, and the same verdict.
        if not torch.isfinite(column_sums).all() and not torch.isfinite(real).all():
            raise OsrmInputError(f"layer {name!r}: input features contain NaN or Inf")
        st = self.layers[name]
        st.sum_outer.addmm_(real.T, real)
        st.sum += column_sums
        st.count += real.shape[0]
        lengths = mask.sum(1)
        st.n_samples += int((lengths > 0).sum())
        if not self.sample_means:
            return
        if real.device.type == "cpu" and real.dtype == torch.float64:
            # Per-sample sums from the real tokens alone, without two float64 copies of the padded
            # (batch, tokens, d) block (fresh pages, slow to fault in). index_add_ on CPU adds the
            # rows in order, as torch's float64 sum over the block does: the same bits. Not on
            # CUDA (atomics, no fixed order) nor in float32 (torch's float32 sum groups terms).
            sample_ids = torch.repeat_interleave(torch.arange(len(lengths), device=real.device), lengths)
            sums = real.new_zeros(len(lengths), real.shape[1]).index_add_(0, sample_ids, real)
        else:
            sums = (x.to(self.dtype) * mask.unsqueeze(-1)).sum(1)
        sample_means = sums / lengths.clamp_min(1).unsqueeze(1).to(self.dtype)
        st.sum_sample_mean_outer.addmm_(sample_means.T, sample_means)

    def run(
        self,
        batches: Iterable[dict[str, torch.Tensor]],
        device,
        progress,
        total,
        *,
        stop_after: str | None = None,
        done: int = 0,
    ) -> None:
        """Run the batches through the model; with ``stop_after``, each forward pass stops once
        that layer's input has been seen (the layers after it are not needed)."""
        handles = [
            get_module(self.model, n).register_forward_pre_hook(self._hook(n), with_kwargs=True)
            for n in self.names
        ]
        if stop_after is not None:  # registered last, so it runs after the collector's hook there
            handles.append(get_module(self.model, stop_after).register_forward_pre_hook(_stop_forward))
        try:
            with torch.no_grad():
                for i, batch in enumerate(batches):
                    batch = move_batch(decoder_position_ids(batch, self.model), device)
                    self.mask = batch["attention_mask"].bool()
                    try:
                        self.model(**batch)
                    except StopForward:
                        pass
                    self._first = None
                    if progress:
                        progress(done + i + 1, total, "feature statistics")
        finally:
            for h in handles:
                h.remove()
            self._first = None


class StopForward(Exception):
    """Raised by a hook to end a forward pass early: the remaining layers are not needed."""


def _stop_forward(module, args):
    raise StopForward


def select_samples(n: int, max_samples: int | None, seed: int) -> np.ndarray:
    """Indices of at most ``max_samples`` of ``n`` examples, a seeded random subset if fewer."""
    if max_samples is None or max_samples >= n:
        return np.arange(n)
    if max_samples < 1:
        raise OsrmInputError(f"max_samples must be >= 1, got {max_samples}")
    return np.sort(np.random.default_rng(seed).choice(n, size=max_samples, replace=False))


def collect_feature_stats(
    model: nn.Module,
    tokenizer,
    task: TaskData,
    *,
    offload: bool = False,
    **options,
) -> FeatureStats:
    """Collect the feature statistics of ``task`` at the inputs of the adapted layers.

    Parameters
    ----------
    offload : bool
        Move each finished pass's sums to the CPU.
    **options
        Every keyword of :func:`iter_feature_stats` (``target_modules``, ``max_samples``,
        ``batch_size``, ``max_length``, ``split``, ``seed``, ``dtype``, ``shard``,
        ``distributed``, ``layers_per_pass``, ``sample_means``, ``progress``).

    Returns
    -------
    FeatureStats
        ``.layers[name].second_moment`` is ``E[h h^T]`` of shape (d_in, d_in) over real tokens.
    """
    parts = []
    for part in iter_feature_stats(model, tokenizer, task, **options):
        parts.append(part.to("cpu") if offload else part)
    stats = parts[0] if len(parts) == 1 else FeatureStats.union(parts)
    from osrm_core.distributed import is_main_process

    if stats.meta.get("shard") is None and is_main_process():
        _warn_if_tiny(stats)
    return stats


def iter_feature_stats(
    model: nn.Module,
    tokenizer,
    task: TaskData,
    *,
    target_modules: list[str] | None = None, max_samples: int | None = 100, batch_size: int = 32,
    max_length: int = 128, split: str = "train", seed: int = 0, dtype: torch.dtype = torch.float64,
    shard: tuple[int, int] | None = None, distributed: bool | None = None,
    layers_per_pass: int | None = None, sample_means: bool = True, progress: Progress | None = None,
) -> Iterator[FeatureStats]:
    """The statistics of :func:`collect_feature_stats`, one pass (``layers_per_pass`` layer
    inputs) at a time, each yielded as soon as it is complete (and all-reduced), so that a
    caller can write it to disk and free it before the next pass (see :func:`write_feature_stats`).

    Parameters
    ----------
    model : nn.Module
        The base model (a PEFT model works too; its LoRA layers are then the targets). It may
        be spread over devices (``device_map="auto"``): each layer's sums live where its input is.
    target_modules : list of str, optional
        Layers to adapt (default: by architecture, see :func:`osrm_core.models.find_target_layers`).
    max_samples : int or None
        At most this many examples (a seeded random subset); None for all.
    dtype : torch.dtype
        Accumulation dtype, float64 (default) or float32 for very wide layers.
    shard : (rank, world_size), optional
        Collect only this share of the samples and do not reduce (to add shards up yourself).
    distributed : bool, optional
        Data-parallel collection: each process of the ``torch.distributed`` group takes every
        ``world``-th sample and the sums are all-reduced, so every rank returns the statistics
        of all samples (equal to one process's up to float64 rounding). None (default) does so
        whenever a process group with several ranks is initialized; True requires one.
    layers_per_pass : int, optional
        Collect this many layer inputs (a group of layers reading one input counts once) per
        pass over the data, each pass stopping after its last layer: device memory then holds
        only those layers' sums. None collects all in one pass.
    sample_means : bool
        Also sum the per-sample mean features' outer products (for the mean-feature OSRM
        variant); False holds ``sum h h^T`` and ``sum h`` alone, half the memory (enough for
        RegMean's Gram matrices, the interference tables and post-hoc OSRM).
    progress : callable (step, total, message), optional
    """
    from osrm_core.distributed import dist_info

    data = check_collect_args(task, split, dtype, layers_per_pass, shard, distributed)
    info = dist_info()
    reduce = shard is None and info.active and distributed is not False
    shard = (info.rank, info.world) if reduce else shard
    inner, prefix = _inner(model)
    targets = find_target_layers(inner, target_modules)
    idx = select_samples(len(data), max_samples, seed)
    local = idx if shard is None else idx[shard[0] :: shard[1]]
    device = next(model.parameters()).device
    names = [prefix + t.name for t in targets]
    meta = {"max_samples": max_samples, "max_length": max_length, "split": split, "seed": seed,
            "shard": None if shard is None or reduce else list(shard)}
    model_name = getattr(model, "name_or_path_", "") or getattr(inner, "name_or_path_", "")

    def batches(indices):
        return iter_batches(tokenizer, data, batch_size=batch_size, max_length=max_length, indices=indices,
                            with_labels=False)
    with eval_mode(model):
        passes = [names] if layers_per_pass is None else _passes(
            _shared_input_groups(model, names, next(batches(idx[:1])), device), layers_per_pass)
        n_batches = -(-len(local) // batch_size)
        total = n_batches * len(passes)
        for p, pass_names in enumerate(passes):
            stop = pass_names[-1] if layers_per_pass is not None and p < len(passes) - 1 else None
            collected = _collect_pass(_Collector(model, pass_names, dtype, sample_means), lambda: batches(local),
                                      device, progress, total, stop_after=stop, done=p * n_batches)
            layers = {name[len(prefix) :]: st for name, st in collected.items()}
            part = FeatureStats({t.name: layers[t.name] for t in targets
                                 if t.name in layers and prefix + t.name in pass_names},
                                task=task.name, model=model_name, meta=dict(meta))
            if reduce:
                part = _reduce_across_ranks(part, model, prefix, dtype, sample_means)
            yield part


def _collect_pass(collector: _Collector, batches, device, progress, total: int, *, stop_after, done: int):
    """One pass over ``batches()`` collecting the inputs of the collector's layers, stopping after
    ``stop_after`` (a model that runs its layers in another order than it lists them is run
    again without the early stop)."""
    names = collector.names
    collector.run(batches(), device, progress, total, stop_after=stop_after, done=done)
    if stop_after is not None and any(n not in collector.layers for n in names):
        collector = _Collector(collector.model, names, collector.dtype, collector.sample_means)
        collector.run(batches(), device, None, total)
    return collector.layers


@contextmanager
def eval_mode(model: nn.Module):
    """``model`` in eval mode inside the block, each module's own mode restored after it (a
    PeftModel reports training=True around an inner model in eval mode, and model.train(True)
    would switch the inner dropout on)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode


def _inner(model: nn.Module) -> tuple[nn.Module, str]:
    """The base model inside ``model`` (itself unless a PEFT model) and the prefix of its layer
    names in ``model``."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner, _prefix(model, inner)


def check_collect_args(task, split: str, dtype: torch.dtype, layers_per_pass, shard, distributed):
    """The arguments of :func:`iter_feature_stats` checked; returns the split's examples."""
    import torch.distributed as dist

    if not isinstance(task, TaskData):
        raise InputTypeError(f"task must be a TaskData, got {type(task).__name__}")
    if dtype not in (torch.float64, torch.float32):
        raise OsrmInputError(f"dtype must be torch.float64 or torch.float32, got {dtype}")
    data = getattr(task, split, None)
    if split not in ("train", "test") or data is None:
        raise OsrmInputError(f"split must be 'train' or 'test', got {split!r}")
    if len(data) == 0:
        raise OsrmInputError(f"task {task.name!r} has no examples in split {split!r}")
    if layers_per_pass is not None and (not isinstance(layers_per_pass, int) or layers_per_pass < 1):
        raise OsrmInputError(f"layers_per_pass must be a positive integer or None, got {layers_per_pass!r}")
    if shard is not None:
        if distributed:
            raise OsrmInputError("give shard or distributed=True, not both (distributed shards by rank itself)")
        rank, world = shard
        if not (isinstance(world, int) and isinstance(rank, int) and 0 <= rank < world):
            raise OsrmInputError(f"shard must be (rank, world) with 0 <= rank < world, got {shard!r}")
    if distributed and not (dist.is_available() and dist.is_initialized()):
        raise OsrmInputError(
            "distributed=True needs an initialized torch.distributed process group: launch with "
            "torchrun or accelerate launch and call osrm_core.distributed.init_distributed()"
        )
    return data


def _passes(groups: list[list[str]], layers_per_pass: int) -> list[list[str]]:
    """The layer names of each pass: ``layers_per_pass`` groups of layers reading one input."""
    return [[n for g in groups[k : k + layers_per_pass] for n in g] for k in range(0, len(groups), layers_per_pass)]


def _shared_input_groups(model: nn.Module, names: list[str], batch, device) -> list[list[str]]:
    """Target layers grouped by the input tensor they read, in the order they run (one batch)."""
    groups: dict[tuple, list[str]] = {}
    keep: list[torch.Tensor] = []  # hold the inputs so no freed memory is mistaken for a shared one

    def hook(name):
        def record(module, args, kwargs=None):
            x = args[0] if args else next(iter(kwargs.values()))
            keep.append(x)
            groups.setdefault((x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.device), []).append(name)

        return record

    handles = [get_module(model, n).register_forward_pre_hook(hook(n), with_kwargs=True) for n in names]
    try:
        with torch.no_grad():
            model(**move_batch(decoder_position_ids(batch, model), device))
    finally:
        for h in handles:
            h.remove()
    out = list(groups.values())
    seen = {n for g in out for n in g}
    return out + [[n] for n in names if n not in seen]


def _reduce_across_ranks(part: FeatureStats, model: nn.Module, prefix: str, dtype: torch.dtype,
                         sample_means: bool = True) -> FeatureStats:
    """All-reduce one pass's sums; a rank that had no samples joins with zeros laid out like
    rank 0's statistics (rank 0 always has the first sample)."""
    from osrm_core.distributed import DistributedError, all_gather_object, dist_info

    layouts = all_gather_object(part.layout() if part.layers else None, "comparing the statistics' layers")
    ref = layouts[0]
    if not part.layers:
        layers: dict[str, LayerStats] = {}
        for names, d in ref:
            module = get_module(model, prefix + names[0])
            st = LayerStats.zeros(d, getattr(module, "base_layer", module).weight.device, dtype,
                                  sample_means=sample_means)
            for name in names:
                layers[name] = st
        part = FeatureStats(layers, part.task, part.model, part.meta)
    for rank, other in enumerate(layouts):
        if other is not None and other != ref:
            raise DistributedError(
                f"{dist_info().prefix()}statistics of task {part.task!r} cover other layers or groups on "
                f"rank {rank} than on rank 0; every rank must run the same model and target_modules"
            )
    return part.all_reduce(check=False)


def write_feature_stats(
    model: nn.Module,
    tokenizer,
    task: TaskData,
    folder: str | Path,
    *,
    layers_per_pass: int = 1,
    **options,
) -> Path:
    """Collect statistics ``layers_per_pass`` layer inputs at a time and write each pass to
    ``folder/part-NNNN.safetensors`` as soon as it is done, freeing it before the next pass.

    For models whose statistics do not fit in memory at once (a 7B model holds 8 GiB of float64
    sums; see :func:`osrm_core.memory.memory_plan`). Only rank 0 writes; every rank returns
    once its passes are done. :meth:`FeatureStats.load` reads the folder back.
    """
    from osrm_core.distributed import is_main_process

    folder = Path(folder)
    main = is_main_process()
    if main:
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("part-*.safetensors"):
            old.unlink()
    for k, part in enumerate(iter_feature_stats(model, tokenizer, task, layers_per_pass=layers_per_pass, **options)):
        if main:
            part.save(folder / f"part-{k:04d}.safetensors")
        del part
    return folder


def _prefix(model: nn.Module, inner: nn.Module) -> str:
    """Name prefix of ``inner``'s modules inside ``model`` (``base_model.model.`` for PEFT)."""
    if model is inner:
        return ""
    for name, module in model.named_modules():
        if module is inner:
            return name + "."
    return ""


def _warn_if_tiny(stats: FeatureStats) -> None:
    for names in stats.groups():
        st = stats.layers[names[0]]
        if st.count < st.d:
            warnings.warn(
                f"task {stats.task!r}: statistics at {names[0]!r} rest on {st.count} tokens, fewer "
                f"than the width {st.d}; the second moment is rank-deficient",
                stacklevel=3,
            )
            return


