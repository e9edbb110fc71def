"""Feature statistics: per adapted input, streaming sums of ``h h^T``, ``h`` and token counts.

The statistics are plain sums, so they add exactly over batches, files and processes
(:meth:`FeatureStats.__add__`, :meth:`FeatureStats.all_reduce`). Layers that read the same
input tensor (query, key and value of one attention block) share one :class:`LayerStats`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from osrm_core.errors import OsrmInputError

FORMAT = "osrm-feature-stats/1"


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
        eigenvectors of this sum). Of shape (0, 0) when collected without it
        (``collect_feature_stats(..., sample_means=False)``: RegMean's Gram matrices and the
        interference tables need only ``sum h h^T``, at half the memory).
    n_samples : int
    """

    sum_outer: torch.Tensor
    sum: torch.Tensor
    count: int
    sum_sample_mean_outer: torch.Tensor
    n_samples: int

    @classmethod
    def zeros(cls, d: int, device: torch.device | str = "cpu", dtype=torch.float64, *,
              sample_means: bool = True) -> LayerStats:
        z = torch.zeros(d, d, dtype=dtype, device=device)
        means = z.clone() if sample_means else torch.zeros(0, 0, dtype=dtype, device=device)
        return cls(z, torch.zeros(d, dtype=dtype, device=device), 0, means, 0)

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
            raise OsrmInputError(f"cannot add statistics of width {self.d} and {other.d}")
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
            raise OsrmInputError(f"statistics cover different layers: {missing[:3]} in only one")

    def __add__(self, other: FeatureStats) -> FeatureStats:
        """Statistics over the union of both token sets (sums add exactly)."""
        self._check_compatible(other)
        layers: dict[str, LayerStats] = {}
        for group in self.groups():
            merged = self.layers[group[0]] + other.layers[group[0]]
            for name in group:
                layers[name] = merged
        return FeatureStats(layers, self.task, self.model, dict(self.meta))

    def all_reduce(self, group=None, *, check: bool = True) -> FeatureStats:
        """Sum the statistics over all processes of ``torch.distributed`` (in place).

        Every rank must hold the same layers, grouped the same way (checked first, so that a
        mismatch fails with a message instead of summing unrelated matrices). Tensors are
        reduced on the backend's device (the GPU with NCCL, the CPU with gloo) and stay where
        they are. A no-op in a single process.
        """
        from osrm_core.distributed import DistributedError, all_gather_object, all_reduce_sum, dist_info

        info = dist_info()
        if not info.active:
            return self
        layout = self.layout()
        layouts = all_gather_object(layout, "comparing the statistics' layers") if check else [layout]
        for rank, other in enumerate(layouts):
            if other != layout:
                raise DistributedError(
                    f"{info.prefix()}statistics of task {self.task!r} cover other layers or groups on "
                    f"rank {rank} than here; every rank must run the same model and target_modules"
                )
        for names in self.groups():
            st = self.layers[names[0]]
            what = f"all-reduce of the statistics of task {self.task!r} at {names[0]!r}"
            counts = torch.tensor([st.count, st.n_samples], dtype=torch.float64, device=st.sum.device)
            all_reduce_sum([st.sum_outer, st.sum, st.sum_sample_mean_outer, counts], what, group=group)
            st.count, st.n_samples = int(counts[0].item()), int(counts[1].item())
        return self

    def layout(self) -> list[tuple[list[str], int]]:
        """The groups of layer names with their width: what ranks must agree on to add up."""
        return [(names, self.layers[names[0]].d) for names in self.groups()]

    @classmethod
    def union(cls, parts: list[FeatureStats]) -> FeatureStats:
        """Statistics of disjoint sets of layers of one task (passes over a few layers each)."""
        if not parts:
            raise OsrmInputError("union needs at least one FeatureStats")
        layers: dict[str, LayerStats] = {}
        for part in parts:
            if part.task != parts[0].task:
                raise OsrmInputError(f"cannot join statistics of tasks {parts[0].task!r} and {part.task!r}")
            twice = sorted(set(layers) & set(part.layers))
            if twice:
                raise OsrmInputError(f"layer {twice[0]!r} is in more than one part")
            layers.update(part.layers)
        return cls(layers, parts[0].task, parts[0].model, dict(parts[0].meta))

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
        """Read statistics written by :meth:`save`, or a folder of parts written one pass at a
        time (:class:`StatsPartWriter`), joined with :meth:`union`."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if path.is_dir():
            parts = sorted(path.glob("part-*.safetensors"))
            if not parts:
                raise OsrmInputError(f"statistics folder {str(path)!r} holds no part-*.safetensors")
            return cls.union([cls.load(p, device) for p in parts])
        if not path.is_file():
            raise OsrmInputError(f"statistics file {str(path)!r} does not exist")
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                metadata = f.metadata() or {}
                if metadata.get("format") != FORMAT:
                    raise OsrmInputError(f"{path.name}: not an OSRM statistics file (format {FORMAT})")
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
                        layers[str(name)] = st
                meta = json.loads(metadata.get("meta", "{}"))
        except ValueError as err:
            if str(err).startswith(f"{path.name}: "):
                raise
            raise OsrmInputError(f"{path.name}: damaged statistics file ({err})") from None
        except (OSError, KeyError, TypeError, SafetensorError, RecursionError) as err:
            raise OsrmInputError(f"{path.name}: damaged statistics file ({type(err).__name__}: {err})") from None
        for name, st in layers.items():  # a file from elsewhere (an uploaded run) is checked
            d = st.sum.shape[0] if st.sum.ndim == 1 else -1
            if d < 1 or st.sum_outer.shape != (d, d) or st.sum_sample_mean_outer.shape != (d, d):
                raise OsrmInputError(f"{path.name}: statistics at {name!r} have inconsistent shapes")
            if st.count < 0 or st.n_samples < 0:
                raise OsrmInputError(f"{path.name}: statistics at {name!r} have a negative count")
            if not all(torch.isfinite(t).all() for t in (st.sum_outer, st.sum, st.sum_sample_mean_outer)):
                raise OsrmInputError(f"{path.name}: statistics at {name!r} hold NaN or Inf values")
        return cls(layers, metadata.get("task", ""), metadata.get("model", ""), meta)


def check_same_layers(all_stats: list[FeatureStats]) -> list[str]:
    """The common layer names of several statistics, or a ValueError naming the mismatch."""
    if not all_stats:
        raise OsrmInputError("no statistics given")
    first = all_stats[0]
    for other in all_stats[1:]:
        if set(other.layers) != set(first.layers):
            diff = sorted(set(other.layers) ^ set(first.layers))
            raise OsrmInputError(
                f"statistics of tasks {first.task!r} and {other.task!r} cover different layers "
                f"(e.g. {diff[0]!r}); collect them with the same model and target_modules"
            )
        for name, st in other.layers.items():
            if st.d != first.layers[name].d:
                raise OsrmInputError(f"size mismatch for layer {name!r}: {st.d} vs {first.layers[name].d}")
    return list(first.layers)
