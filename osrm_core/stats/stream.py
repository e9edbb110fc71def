"""Streaming a task's texts through a model with forward hooks on some layers: each batch's real
tokens (padding masked) are handed to an accumulator, and each forward pass stops once the last
of those layers has run. One loop for the collectors that never form the ``d x d`` moment: the
projected statistics (:mod:`.projected`) and the sketches of the top-k subspace (:mod:`.sketch`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from osrm_core.batching import iter_batches, move_batch
from osrm_core.errors import OsrmInputError
from osrm_core.models import decoder_position_ids, get_module

from .collect import StopForward, eval_mode, select_samples

Progress = Callable[[int, int, str], None]
#: ``add(name, module, x, y, first)``: ``x`` the layer's input at the batch's real tokens
#: (:class:`Tokens`); ``y`` its output there (None unless asked for); ``first`` the first layer of
#: this batch that read the very same input tensor (``name`` itself when none did before).
Add = Callable[[str, nn.Module, "Tokens", "Tokens | None", str], None]
#: Real tokens gathered and cast at once (bounds the scratch of a wide layer).
CHUNK_TOKENS = 512


class Scratch:
    """Buffers reused from batch to batch for the chunks handed to the accumulators: a chunk
    gathered or cast into fresh memory costs several times the copy itself (the pages are
    faulted in anew: a (2048, 2048) bfloat16 to float64 cast took 18 ms fresh and 2 ms into a
    held buffer on one CPU core)."""

    def __init__(self) -> None:
        self.buffers: dict[str, torch.Tensor] = {}

    def take(self, role: str, shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An uninitialized ``shape`` tensor, the one buffer of ``role`` (grown when too small)."""
        numel = shape[0] * shape[1]
        buf = self.buffers.get(role)
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
            buf = self.buffers[role] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel].view(shape)


@dataclass
class Tokens:
    """A layer input's or output's real tokens: the rows of ``flat`` (batch x tokens, width) at
    ``index`` (None: every row is real), gathered and cast a chunk at a time by
    :func:`token_chunks` into ``scratch``'s buffers of ``role``."""

    flat: torch.Tensor
    index: torch.Tensor | None
    scratch: Scratch
    role: str

    @property
    def count(self) -> int:
        return self.flat.shape[0] if self.index is None else self.index.numel()

    @property
    def width(self) -> int:
        return self.flat.shape[1]

    def chunk(self, start: int, dtype: torch.dtype) -> torch.Tensor:
        """Rows ``start`` to ``start + CHUNK_TOKENS`` in ``dtype`` (a scratch buffer: valid until
        the next chunk of this role)."""
        stop = min(start + CHUNK_TOKENS, self.count)
        shape = (stop - start, self.width)
        if self.index is None:
            rows = self.flat[start:stop]
        else:
            rows = self.scratch.take(self.role + " gathered", shape, self.flat.dtype, self.flat.device)
            torch.index_select(self.flat, 0, self.index[start:stop], out=rows)
        return self.scratch.take(self.role, shape, dtype, self.flat.device).copy_(rows)


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
        self.index: torch.Tensor | None = None  # the batch's real rows; None when all are real
        self.scratch = Scratch()
        self.waiting: set[str] = set()
        # The last input seen: layers that read one tensor in a row (query, key and value; gate
        # and up) are told the first of them. Only that one input is held.
        self.last: tuple[torch.Tensor, Tokens, str] | None = None

    def start(self, mask: torch.Tensor) -> None:
        """A new batch of attention mask ``mask`` (batch, tokens)."""
        self.mask = mask
        self.index = None if bool(mask.all()) else mask.reshape(-1).nonzero().squeeze(1)
        self.waiting = set(self.modules)

    def hook(self, name: str):
        def run(module, args, kwargs, output):
            x = args[0] if args else next(iter(kwargs.values()))
            if self.last is None or self.last[0] is not x:
                self.last = (x, self._tokens(name, x, "input"), name)
            y = self._tokens(name, output, "output") if self.outputs else None
            self.add(name, module, self.last[1], y, self.last[2])
            self.waiting.discard(name)
            if not self.waiting:  # the rest of the model (its LM head too) is not needed
                raise StopForward

        return run

    def _tokens(self, name: str, t: torch.Tensor, role: str) -> Tokens:
        if t.shape[:2] != self.mask.shape:
            raise OsrmInputError(
                f"layer {name!r}: {role} of shape {tuple(t.shape)} does not match the attention "
                f"mask {tuple(self.mask.shape)}; only (batch, tokens, features) inputs are supported"
            )
        index = None if self.index is None else self.index.to(t.device)
        return Tokens(t.reshape(-1, t.shape[-1]), index, self.scratch, role)


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
                stream.start(batch["attention_mask"].bool())
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


def token_chunks(name: str, tokens: Tokens, dtype: torch.dtype) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """``tokens`` in chunks of :data:`CHUNK_TOKENS` rows cast to ``dtype``: ``(start, chunk, its
    sum of squares)``, each chunk valid until the next; NaN or Inf entries refused, naming the layer."""
    for start in range(0, tokens.count, CHUNK_TOKENS):
        h = tokens.chunk(start, dtype)
        sum_sq = sum_of_squares(h)
        # A NaN or Inf entry makes the sum of squares non-finite; so may a float32 overflow: check the entries.
        if not torch.isfinite(sum_sq) and not torch.isfinite(h).all():
            raise OsrmInputError(f"layer {name!r}: input features contain NaN or Inf")
        yield start, h, sum_sq


def sum_of_squares(t: torch.Tensor) -> torch.Tensor:
    flat = t.reshape(-1)
    return torch.dot(flat, flat)  # BLAS: an order of magnitude faster than (t * t).sum() on the CPU
