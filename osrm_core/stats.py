"""Feature statistics: per adapted input, streaming sums of ``h h^T``, ``h`` and token counts.

The statistics are plain sums, so they add exactly over batches, files and processes
(:meth:`FeatureStats.__add__`, :meth:`FeatureStats.all_reduce`). Padding tokens are excluded
with the attention mask. Layers that read the same input tensor (query, key and value of one
attention block) share one :class:`LayerStats`, collected once.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from osrm_core.batching import iter_batches, move_batch
from osrm_core.data import TaskData
from osrm_core.models import find_target_layers, get_module

FORMAT = "osrm-feature-stats/1"
Progress = Callable[[int, int, str], None]


@dataclass
class LayerStats:
    """Sums over the real tokens that entered one layer.

    Attributes
    ----------
    sum_outer : tensor of shape (d, d), float64
        ``sum h h^T`` over tokens.
    sum : tensor of shape (d,), float64
        ``sum h`` over tokens.
    count : int
        Number of tokens.
    sum_sample_mean_outer : tensor of shape (d, d), float64
        ``sum m m^T`` over samples, ``m`` the mean of a sample's tokens (the reference code's
        mean-feature variant uses the stacked ``m``; its right singular vectors are the
        eigenvectors of this sum).
    n_samples : int
    """

    sum_outer: torch.Tensor
    sum: torch.Tensor
    count: int
    sum_sample_mean_outer: torch.Tensor
    n_samples: int

    @classmethod
    def zeros(cls, d: int, device: torch.device | str = "cpu", dtype=torch.float64) -> LayerStats:
        z = torch.zeros(d, d, dtype=dtype, device=device)
        return cls(z, torch.zeros(d, dtype=dtype, device=device), 0, z.clone(), 0)

    @property
    def d(self) -> int:
        return self.sum.shape[0]

    @property
    def second_moment(self) -> torch.Tensor:
        """``E[h h^T]``, shape (d, d)."""
        return self.sum_outer / max(self.count, 1)

    @property
    def mean(self) -> torch.Tensor:
        """``E[h]``, shape (d,)."""
        return self.sum / max(self.count, 1)

    @property
    def covariance(self) -> torch.Tensor:
        """Centred covariance ``E[h h^T] - mu mu^T`` (biased), shape (d, d)."""
        mu = self.mean
        return self.second_moment - torch.outer(mu, mu)

    @property
    def gram(self) -> torch.Tensor:
        """``sum h h^T`` (RegMean's Gram matrix), shape (d, d)."""
        return self.sum_outer

    def __add__(self, other: LayerStats) -> LayerStats:
        if self.d != other.d:
            raise ValueError(f"cannot add statistics of width {self.d} and {other.d}")
        return LayerStats(
            self.sum_outer + other.sum_outer.to(self.sum_outer.device),
            self.sum + other.sum.to(self.sum.device),
            self.count + other.count,
            self.sum_sample_mean_outer + other.sum_sample_mean_outer.to(self.sum.device),
            self.n_samples + other.n_samples,
        )

    def to(self, device: torch.device | str) -> LayerStats:
        return LayerStats(
            self.sum_outer.to(device),
            self.sum.to(device),
            self.count,
            self.sum_sample_mean_outer.to(device),
            self.n_samples,
        )


@dataclass
class FeatureStats:
    """Statistics of one task's features at every adapted layer.

    Attributes
    ----------
    layers : dict of str to LayerStats
        Full module name (``bert.encoder.layer.0.attention.self.query``) to its statistics;
        modules that read the same input map to the same object.
    task : str
    model : str
        The base model's id or path, to catch statistics of another model.
    """

    layers: dict[str, LayerStats]
    task: str = ""
    model: str = ""
    meta: dict = field(default_factory=dict)

    def groups(self) -> list[list[str]]:
        """Module names grouped by shared statistics, in first-seen order."""
        out: dict[int, list[str]] = {}
        for name, st in self.layers.items():
            out.setdefault(id(st), []).append(name)
        return list(out.values())

    @property
    def count(self) -> int:
        """Tokens seen (the same at every layer of an encoder)."""
        return max((s.count for s in self.layers.values()), default=0)

    def _check_compatible(self, other: FeatureStats) -> None:
        if set(self.layers) != set(other.layers):
            missing = sorted(set(self.layers) ^ set(other.layers))
            raise ValueError(f"statistics cover different layers: {missing[:3]} in only one")

    def __add__(self, other: FeatureStats) -> FeatureStats:
        """Statistics over the union of both token sets (sums add exactly)."""
        self._check_compatible(other)
        layers: dict[str, LayerStats] = {}
        for group in self.groups():
            merged = self.layers[group[0]] + other.layers[group[0]]
            for name in group:
                layers[name] = merged
        return FeatureStats(layers, self.task, self.model, dict(self.meta))

    def all_reduce(self, group=None) -> FeatureStats:
        """Sum the statistics over all processes of ``torch.distributed`` (in place)."""
        import torch.distributed as dist

        for names in self.groups():
            st = self.layers[names[0]]
            for t in (st.sum_outer, st.sum, st.sum_sample_mean_outer):
                dist.all_reduce(t, group=group)
            counts = torch.tensor([st.count, st.n_samples], dtype=torch.float64, device=st.sum.device)
            dist.all_reduce(counts, group=group)
            st.count, st.n_samples = int(counts[0].item()), int(counts[1].item())
        return self

    def to(self, device: torch.device | str) -> FeatureStats:
        layers: dict[str, LayerStats] = {}
        for group in self.groups():
            moved = self.layers[group[0]].to(device)
            for name in group:
                layers[name] = moved
        return FeatureStats(layers, self.task, self.model, dict(self.meta))

    def save(self, path: str | Path) -> None:
        """Write to a safetensors file (atomically) with the layer names and counts as metadata."""
        from safetensors.torch import save_file

        from osrm_core.atomic import atomic_path

        tensors, groups = {}, []
        for g, names in enumerate(self.groups()):
            st = self.layers[names[0]]
            tensors[f"{g}.sum_outer"] = st.sum_outer.detach().cpu().contiguous()
            tensors[f"{g}.sum"] = st.sum.detach().cpu().contiguous()
            tensors[f"{g}.sum_sample_mean_outer"] = st.sum_sample_mean_outer.detach().cpu().contiguous()
            groups.append({"names": names, "count": st.count, "n_samples": st.n_samples})
        metadata = {
            "format": FORMAT,
            "task": self.task,
            "model": self.model,
            "groups": json.dumps(groups),
            "meta": json.dumps(self.meta),
        }
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> FeatureStats:
        """Read statistics written by :meth:`save`."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise ValueError(f"statistics file {str(path)!r} does not exist")
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                metadata = f.metadata() or {}
                if metadata.get("format") != FORMAT:
                    raise ValueError(f"{path.name}: not an OSRM statistics file (format {FORMAT})")
                layers: dict[str, LayerStats] = {}
                for g, group in enumerate(json.loads(metadata["groups"])):
                    st = LayerStats(
                        f.get_tensor(f"{g}.sum_outer"),
                        f.get_tensor(f"{g}.sum"),
                        int(group["count"]),
                        f.get_tensor(f"{g}.sum_sample_mean_outer"),
                        int(group["n_samples"]),
                    )
                    for name in group["names"]:
                        layers[name] = st
        except (OSError, KeyError, json.JSONDecodeError, SafetensorError) as err:
            raise ValueError(f"{path.name}: damaged statistics file ({err})") from None
        return cls(layers, metadata.get("task", ""), metadata.get("model", ""), json.loads(metadata.get("meta", "{}")))


# --------------------------------------------------------------------------- collection


class _Collector:
    """Forward pre-hooks on the target layers that add each batch's real tokens to the sums.

    On the first batch, layers whose input is the very same tensor are grouped (references to
    the inputs are held during that batch so that no freed memory can be mistaken for a shared
    input); afterwards only one layer per group accumulates.
    """

    def __init__(self, model: nn.Module, names: list[str], dtype: torch.dtype) -> None:
        self.model, self.names, self.dtype = model, names, dtype
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
                self.layers[name] = LayerStats.zeros(x.shape[-1], x.device, self.dtype)
                self.leaders.add(name)
            elif name not in self.leaders:
                return
            self._accumulate(name, x)

        return hook

    @torch.no_grad()
    def _accumulate(self, name: str, x: torch.Tensor) -> None:
        mask = self.mask.to(x.device)
        if x.shape[:2] != mask.shape:
            raise ValueError(
                f"layer {name!r}: input of shape {tuple(x.shape)} does not match the attention "
                f"mask {tuple(mask.shape)}; only (batch, tokens, features) inputs are supported"
            )
        real = x[mask].to(self.dtype)
        if not torch.isfinite(real).all():
            raise ValueError(f"layer {name!r}: input features contain NaN or Inf")
        st = self.layers[name]
        st.sum_outer.addmm_(real.T, real)
        st.sum += real.sum(0)
        st.count += real.shape[0]
        lengths = mask.sum(1, keepdim=True).clamp_min(1).to(self.dtype)
        sample_means = (x.to(self.dtype) * mask.unsqueeze(-1)).sum(1) / lengths
        st.sum_sample_mean_outer.addmm_(sample_means.T, sample_means)
        st.n_samples += int((mask.sum(1) > 0).sum())

    def run(self, batches: Iterable[dict[str, torch.Tensor]], device, progress, total) -> None:
        handles = [
            get_module(self.model, n).register_forward_pre_hook(self._hook(n), with_kwargs=True)
            for n in self.names
        ]
        try:
            with torch.no_grad():
                for i, batch in enumerate(batches):
                    batch = move_batch(batch, device)
                    self.mask = batch["attention_mask"].bool()
                    self.model(**batch)
                    self._first = None
                    if progress:
                        progress(i + 1, total, "feature statistics")
        finally:
            for h in handles:
                h.remove()
            self._first = None


def select_samples(n: int, max_samples: int | None, seed: int) -> np.ndarray:
    """Indices of at most ``max_samples`` of ``n`` examples, a seeded random subset if fewer."""
    if max_samples is None or max_samples >= n:
        return np.arange(n)
    if max_samples < 1:
        raise ValueError(f"max_samples must be >= 1, got {max_samples}")
    return np.sort(np.random.default_rng(seed).choice(n, size=max_samples, replace=False))


def collect_feature_stats(
    model: nn.Module,
    tokenizer,
    task: TaskData,
    *,
    target_modules: list[str] | None = None,
    max_samples: int | None = 100,
    batch_size: int = 32,
    max_length: int = 128,
    split: str = "train",
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    shard: tuple[int, int] | None = None,
    progress: Progress | None = None,
) -> FeatureStats:
    """Collect the feature statistics of ``task`` at the inputs of the adapted layers.

    Parameters
    ----------
    model : nn.Module
        The base model (a PEFT model works too; its LoRA layers are then the targets).
    task : TaskData
    target_modules : list of str, optional
        Layers to adapt (default: by architecture, see :func:`osrm_core.models.find_target_layers`).
    max_samples : int or None
        At most this many examples (a seeded random subset); None for all.
    dtype : torch.dtype
        Accumulation dtype, float64 (default) or float32 for very wide layers.
    shard : (rank, world_size), optional
        Collect only this process's share of the samples (for data-parallel collection,
        followed by :meth:`FeatureStats.all_reduce`).
    progress : callable (step, total, message), optional

    Returns
    -------
    FeatureStats
        ``.layers[name].second_moment`` is ``E[h h^T]`` of shape (d_in, d_in) over real tokens.
    """
    if not isinstance(task, TaskData):
        raise TypeError(f"task must be a TaskData, got {type(task).__name__}")
    if dtype not in (torch.float64, torch.float32):
        raise ValueError(f"dtype must be torch.float64 or torch.float32, got {dtype}")
    data = getattr(task, split, None)
    if split not in ("train", "test") or data is None:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if len(data) == 0:
        raise ValueError(f"task {task.name!r} has no examples in split {split!r}")
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    targets = find_target_layers(inner, target_modules)
    prefix = _prefix(model, inner)
    idx = select_samples(len(data), max_samples, seed)
    if shard is not None:
        rank, world = shard
        idx = idx[rank::world]
    device = next(model.parameters()).device
    collector = _Collector(model, [prefix + t.name for t in targets], dtype)
    total = -(-len(idx) // batch_size)
    batches = iter_batches(
        tokenizer, data, batch_size=batch_size, max_length=max_length, indices=idx, with_labels=False
    )
    # Restore each module's own mode: a PeftModel reports training=True around an inner model in
    # eval mode, and model.train(True) would switch the inner dropout on.
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        collector.run(batches, device, progress, total)
    finally:
        for m, mode in modes:
            m.training = mode
    layers = {name[len(prefix) :]: st for name, st in collector.layers.items()}
    stats = FeatureStats(
        {t.name: layers[t.name] for t in targets if t.name in layers},
        task=task.name,
        model=getattr(model, "name_or_path_", "") or getattr(inner, "name_or_path_", ""),
        meta={"max_samples": max_samples, "max_length": max_length, "split": split, "seed": seed},
    )
    if shard is None:
        _warn_if_tiny(stats)
    return stats


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


def check_same_layers(all_stats: list[FeatureStats]) -> list[str]:
    """The common layer names of several statistics, or a ValueError naming the mismatch."""
    if not all_stats:
        raise ValueError("no statistics given")
    first = all_stats[0]
    for other in all_stats[1:]:
        if set(other.layers) != set(first.layers):
            diff = sorted(set(other.layers) ^ set(first.layers))
            raise ValueError(
                f"statistics of tasks {first.task!r} and {other.task!r} cover different layers "
                f"(e.g. {diff[0]!r}); collect them with the same model and target_modules"
            )
        for name, st in other.layers.items():
            if st.d != first.layers[name].d:
                raise ValueError(f"size mismatch for layer {name!r}: {st.d} vs {first.layers[name].d}")
    return list(first.layers)
