"""The embeddings' output of each test batch, computed once per sweep.

During a sweep the adapters change the adapted layers only; when none of them lies inside the
model's embeddings module (BERT-style ``base_model.embeddings``: word, position and token-type
embeddings and a LayerNorm), the embeddings' output of a batch is the same at every grid point.
:class:`EmbeddingCache` records it the first time a list of batches is run and replays it
afterwards, in the same order, while the model is in eval mode (no dropout).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class _Replay(nn.Module):
    """Stands in for the embeddings module: replays recorded outputs, or records new ones."""

    def __init__(self, inner: nn.Module, outputs: list[torch.Tensor], record: bool) -> None:
        super().__init__()
        self.inner, self.outputs, self.record, self.next = inner, outputs, record, 0

    def forward(self, *args, **kwargs) -> torch.Tensor:
        if self.record:
            self.outputs.append(self.inner(*args, **kwargs))
            return self.outputs[-1]
        self.next += 1
        return self.outputs[self.next - 1]


class EmbeddingCache:
    """Recorded embeddings' outputs per list of batches, up to ``max_bytes`` in all.

    ``adapted`` are the names of the layers the adapters change; if one lies inside the
    embeddings module, or the model has none, nothing is cached.
    """

    def __init__(self, model: nn.Module, adapted: list[str], max_bytes: int = 256 << 20) -> None:
        self.model, self.max_bytes, self.bytes = model, max_bytes, 0
        inner = getattr(getattr(model, "base_model", model), "embeddings", None)
        name = next((n for n, m in model.named_modules() if m is inner), None) if inner is not None else None
        self.name = None if name is None or any(a.startswith(name + ".") for a in adapted) else name
        self._kept: dict[int, tuple[list, list[torch.Tensor]]] = {}  # id(batches) -> (batches, outputs)

    @contextmanager
    def replay(self, batches: list) -> Iterator[None]:
        """Within this block, the model's forward passes over ``batches`` (in order, once) use
        the recorded embeddings' outputs, recording them the first time."""
        if self.name is None or self.model.training:
            yield
            return
        owner_name, _, attr = self.name.rpartition(".")
        owner = self.model.get_submodule(owner_name) if owner_name else self.model
        inner = getattr(owner, attr)
        kept = self._kept.get(id(batches))
        record = kept is None and self.bytes < self.max_bytes
        if kept is None and not record:
            yield
            return
        outputs = [] if record else kept[1]
        setattr(owner, attr, _Replay(inner, outputs, record))
        try:
            yield
        finally:
            setattr(owner, attr, inner)
        if record:  # kept with the batches, so that their id is not reused while cached
            self._kept[id(batches)] = (batches, outputs)
            self.bytes += sum(o.numel() * o.element_size() for o in outputs)
