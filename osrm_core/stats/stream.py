"""Streaming a task's texts through a model with forward hooks on some layers: each batch's real
tokens (padding masked) are handed to an accumulator, and each forward pass stops once the last
of those layers has run. One loop for the collectors that never form the ``d x d`` moment: the
projected statistics (:mod:`.projected`) and the sketches of the top-k subspace (:mod:`.sketch`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from osrm_core.batching import iter_batches, move_batch
from osrm_core.errors import OsrmInputError
from osrm_core.models import decoder_position_ids, get_module

from .collect import StopForward, eval_mode, select_samples

Progress = Callable[[int, int, str], None]
#: ``add(name, module, x, y, first)``: ``x`` the layer's input at the batch's real tokens, shape
#: (tokens, d_in); ``y`` its output there (None unless asked for); ``first`` the first layer of
#: this batch that read the very same input tensor (``name`` itself when none did before).
Add = Callable[[str, nn.Module, torch.Tensor, "torch.Tensor | None", str], None]
#: Real tokens cast to the accumulation dtype at once (bounds the scratch of a wide layer).
CHUNK_TOKENS = 2048


def base_modules(model: nn.Module, names: Sequence[str]) -> dict[str, nn.Module]:
    """The modules ``names`` of ``model``, each the base layer where a PEFT layer wraps one."""
    modules = {}
    for name in names:
        module = get_module(model, name)
        modules[name] = getattr(module, "base_layer", module)
    return modules


class _Stream:
    """The forward hooks: real tokens of each input found once, handed on, the pass stopped early."""

    def __init__(self, modules: dict[str, nn.Module], add: Add, outputs: bool) -> None:
        self.modules, self.add, self.outputs = modules, add, outputs
        self.mask: torch.Tensor | None = None
        self.waiting: set[str] = set()
        # The last input seen and its real tokens: layers that read one tensor in a row (query,
        # key and value; gate and up) share one masked copy. Only that one input is held.
        self.last: tuple[torch.Tensor, torch.Tensor, str] | None = None

    def hook(self, name: str):
        def run(module, args, kwargs, output):
            x = args[0] if args else next(iter(kwargs.values()))
            if self.last is None or self.last[0] is not x:
                self.last = (x, self._real(name, x), name)
            y = real_tokens(output, self.mask.to(output.device)) if self.outputs else None
            self.add(name, module, self.last[1], y, self.last[2])
            self.waiting.discard(name)
            if not self.waiting:  # the rest of the model (its LM head too) is not needed
                raise StopForward

        return run

    def _real(self, name: str, x: torch.Tensor) -> torch.Tensor:
        mask = self.mask.to(x.device)
        if x.shape[:2] != mask.shape:
            raise OsrmInputError(
                f"layer {name!r}: input of shape {tuple(x.shape)} does not match the attention "
                f"mask {tuple(mask.shape)}; only (batch, tokens, features) inputs are supported"
            )
        return real_tokens(x, mask)


def stream_layers(model: nn.Module, tokenizer, data, modules: dict[str, nn.Module], add: Add, *,
                  outputs: bool = False, max_samples: int | None = 100, batch_size: int = 32,
                  max_length: int = 128, seed: int = 0, progress: Progress | None = None,
                  what: str = "statistics") -> None:
    """Stream the examples ``data`` (a task's split; the seeded subset of
    :func:`osrm_core.stats.select_samples`) through ``model`` once, in eval mode without
    gradients, calling ``add`` (see :data:`Add`) at every module of ``modules`` for each batch.

    ``progress(batch, batches, what)`` after each batch.
    """
    stream = _Stream(modules, add, outputs)
    idx = select_samples(len(data), max_samples, seed)
    batches = iter_batches(tokenizer, data, batch_size=batch_size, max_length=max_length, indices=idx,
                           with_labels=False)
    total = -(-len(idx) // batch_size)
    device = next(model.parameters()).device
    handles = [m.register_forward_hook(stream.hook(n), with_kwargs=True) for n, m in modules.items()]
    try:
        with eval_mode(model), torch.no_grad():
            for i, batch in enumerate(batches):
                batch = move_batch(decoder_position_ids(batch, model), device)
                stream.mask = batch["attention_mask"].bool()
                stream.waiting = set(modules)
                try:
                    model(**batch)
                except StopForward:
                    pass
                stream.last = None
                if stream.waiting:
                    raise OsrmInputError(f"layer {sorted(stream.waiting)[0]!r} never ran in the model's forward pass")
                if progress:
                    progress(i + 1, total, what)
    finally:
        stream.last = None
        for h in handles:
            h.remove()


def token_chunks(name: str, real: torch.Tensor, dtype: torch.dtype) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """``real`` (tokens, d) in chunks of :data:`CHUNK_TOKENS` rows cast to ``dtype``: ``(start,
    chunk, its sum of squares)``; NaN or Inf entries refused, naming the layer."""
    for start in range(0, real.shape[0], CHUNK_TOKENS):
        h = real[start : start + CHUNK_TOKENS].to(dtype)
        sum_sq = sum_of_squares(h)
        # A NaN or Inf entry makes the sum of squares non-finite; so may a float32 overflow: check the entries.
        if not torch.isfinite(sum_sq) and not torch.isfinite(h).all():
            raise OsrmInputError(f"layer {name!r}: input features contain NaN or Inf")
        yield start, h, sum_sq


def real_tokens(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The rows of ``t`` (batch, tokens, width) at real tokens, as (n, width)."""
    return t.reshape(-1, t.shape[-1]) if bool(mask.all()) else t[mask]


def sum_of_squares(t: torch.Tensor) -> torch.Tensor:
    flat = t.reshape(-1)
    return torch.dot(flat, flat)  # BLAS: an order of magnitude faster than (t * t).sum() on the CPU
